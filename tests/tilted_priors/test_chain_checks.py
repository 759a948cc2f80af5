"""Samplers that notice: runaway-but-finite chains, energies detached from the autodiff graph, integer starting
points, log densities of the wrong type, and energy modules that training would never update.

The rule for "out of range" is in :mod:`tilted_priors._adapt` (``RANGE_FACTOR``): more than 1e6 base standard
deviations from the base's mean for a tilted distribution's chains, else more than 1e6 (1 + max|init|) from 0.
"""
from __future__ import annotations

import contextlib
import pickle
import warnings

import numpy as np
import pytest

import tilted_priors
from tilted_priors import ChainDivergenceError, ChainRangeWarning
from tilted_priors._adapt import RANGE_FACTOR


def standard_normal(z):
    """log N(z; 0, I) up to a constant: a ULA step of size h > 2 is unstable on it (factor |1 - h^2/2| per step)."""
    return -0.5 * (z ** 2).sum(-1)


def steep_linear(z):
    """An improper log density rising linearly with slope 1e8: every sampler, MALA included, drifts away."""
    return 1e8 * z.sum(-1)


def mild_linear(z):
    """Rising with slope 3e5: one unit-step ULA move drifts by 1.5e5, far less than 1e6 per call."""
    return 3e5 * z.sum(-1)


@contextlib.contextmanager
def precision(backend, name: str):
    """The backend's dtype called ``name`` ("float32" or "float64"), with JAX's 64-bit mode on for float64."""
    if backend.name == "pyro":
        yield getattr(backend.torch, name)
    elif name == "float64":
        with backend.jax.enable_x64(True):
            yield backend.jnp.float64
    else:
        yield backend.jnp.float32


def _init(backend, dtype, shape=(8, 2), seed=0):
    return backend.array(np.random.default_rng(seed).normal(size=shape), dtype)


# --- runaway but finite chains ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unstable_ula_warns_about_runaway_chains(backend, dtype):
    with precision(backend, dtype) as dt:
        init = _init(backend, dt)
        with pytest.warns(ChainRangeWarning) as record:
            z = backend.run(backend.tp.ShortRunLangevin(20, 3.0), standard_normal, init)
        z = backend.numpy(z)
        assert z.dtype == np.dtype(dtype)
    assert np.isfinite(z).all() and np.abs(z).max() > 1e9  # finite, and far out: the silent failure
    (w,) = [r.message for r in record if isinstance(r.message, ChainRangeWarning)]
    text = str(w)
    assert text.startswith("ShortRunLangevin: the chains ran away: after 20 steps 8 chains were")
    assert "1 + max|init|" in text and "smaller step size than 3" in text
    assert "step_size='auto'" in text and "MALA instead" in text
    assert w.ratio > RANGE_FACTOR and w.step == 20 and w.num_bad == 8


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strict_sampler_raises_on_runaway_chains(backend, dtype):
    with precision(backend, dtype) as dt:
        init = _init(backend, dt)
        sampler = backend.tp.ShortRunLangevin(20, 3.0, strict=True)
        assert "strict=True" in repr(sampler)
        with pytest.raises(ChainDivergenceError, match="ran away: after 20 steps") as info:
            backend.run(sampler, standard_normal, init)
    err = info.value
    assert err.ratio > RANGE_FACTOR and err.num_bad == 8
    assert err.suggested_step_size is not None and err.suggested_step_size <= 1.5  # within the stability bound
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err)


def test_mala_on_an_improper_target_warns(backend):
    init = _init(backend, None)
    with pytest.warns(ChainRangeWarning, match=r"^MALA: the chains ran away: after 5 steps"):
        backend.run(backend.tp.MALA(5, 1.0), steep_linear, init)


@pytest.mark.parametrize("make", ["ula", "mala", "auto", "persistent"])
def test_good_chains_do_not_warn(backend, make):
    tp = backend.tp
    sampler = {"ula": lambda: tp.ShortRunLangevin(20, 0.5), "mala": lambda: tp.MALA(20, 0.8),
               "auto": lambda: tp.ShortRunLangevin(20, "auto"),
               "persistent": lambda: tp.Persistent(tp.ShortRunLangevin(10, 0.5))}[make]()
    init = _init(backend, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            z = backend.run(sampler, standard_normal, init)
    assert np.abs(backend.numpy(z)).max() < 10


def test_tilted_prior_measures_against_its_base(backend):
    """A prior's chains are measured in base standard deviations: with a base of scale 1e-3 (curvature 1e6, stable
    for h < 2e-3), 13 steps of h = 3e-3 end about 1e4 from 0, 1e7 standard deviations out, which the rule on
    1 + max|init| alone would not see."""
    tp = backend.tp
    loc, scale = backend.array(np.zeros(2)), backend.array(np.full(2, 1e-3))
    energy = lambda z: 0.0 * z.sum(-1)  # noqa: E731 - depends on z through the backend's operations
    bad = tp.EnergyTiltedNormal(energy, loc, scale, sampler=tp.ShortRunLangevin(13, 3e-3))
    with pytest.warns(ChainRangeWarning, match="base standard deviations from the base's mean") as record:
        z = backend.numpy(backend.sample(bad, (8,)))
    assert np.abs(z).max() < RANGE_FACTOR  # what the rule on init alone would accept
    assert [r for r in record if isinstance(r.message, ChainRangeWarning)][0].message.ratio > RANGE_FACTOR
    good = tp.EnergyTiltedNormal(energy, loc, scale, sampler=tp.ShortRunLangevin(20, 5e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.sample(good, (8,))


def test_persistent_chains_are_measured_from_their_first_start(backend):
    """Each call drifts by 1.5e5, harmless against its own start; against the first start (0), after seven calls
    the chains are 1.05e6 out."""
    tp = backend.tp
    sampler = tp.Persistent(tp.ShortRunLangevin(1, 1.0))
    init = backend.array(np.zeros((4, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            backend.run(sampler, mild_linear, init)
    with pytest.warns(ChainRangeWarning, match=r"after 1 step 4 chains were 1\.0\de\+06 times 1 \+ max\|init\|"):
        backend.run(sampler, mild_linear, init)
    sampler.reset()  # forgets the chains and their first start
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.run(sampler, mild_linear, init)


def test_range_warning_is_exported_and_pickles():
    import tilted_priors.numpyro as tn
    import tilted_priors.pyro as tt

    assert tilted_priors.ChainRangeWarning is tt.ChainRangeWarning is tn.ChainRangeWarning is ChainRangeWarning
    assert issubclass(ChainRangeWarning, UserWarning)
    assert "ChainRangeWarning" in tilted_priors.__all__ and "ChainRangeWarning" in tt.__all__
    w = ChainRangeWarning("MALA", 7, 3e8, 2, step_size=0.5, reference="times 1 + max|init| (= 2) from 0")
    clone = pickle.loads(pickle.dumps(w))
    assert str(clone) == str(w) and clone.ratio == 3e8 and clone.step == 7
    assert "MALA: the chains ran away: after 7 steps 2 chains were 3e+08 times 1 + max|init| (= 2) from 0" in str(w)


# --- MCMC kernels --------------------------------------------------------------------------------------------------
def _run_kernel(backend, step_size: float, adjusted: bool, dtype):
    """Langevin MCMC on U(z) = |z|^2 / 2 from z = 1 (no adaptation: the step size is the one given)."""
    kwargs = dict(step_size=step_size, adjusted=adjusted, adapt_step_size=False, adapt_mass_matrix=False)
    if backend.name == "pyro":
        from pyro.infer import MCMC

        from tilted_priors.inference.pyro import Langevin

        kernel = Langevin(potential_fn=lambda p: 0.5 * (p["z"] ** 2).sum(), **kwargs)
        kernel.initial_params = {"z": backend.torch.ones(2, dtype=dtype)}
        MCMC(kernel, num_samples=30, warmup_steps=0, disable_progbar=True).run()
    else:
        from numpyro.infer import MCMC

        from tilted_priors.inference.numpyro import Langevin

        kernel = Langevin(potential_fn=lambda p: 0.5 * (p["z"] ** 2).sum(), **kwargs)
        mcmc = MCMC(kernel, num_warmup=0, num_samples=30, progress_bar=False)
        mcmc.run(backend.key(), init_params={"z": backend.jnp.ones(2, dtype)})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unstable_ula_kernel_warns_once(backend, dtype):
    with precision(backend, dtype) as dt, pytest.warns(ChainRangeWarning) as record:
        _run_kernel(backend, 3.0, False, dt)
    found = [r.message for r in record if isinstance(r.message, ChainRangeWarning)]
    assert len(found) == 1  # once per run, at the first step out of range
    text = str(found[0])
    assert text.startswith("Langevin (ULA): the chains ran away: after 1") and "adjusted=True" in text
    assert "step_size='auto'" not in text  # not an option of the kernels
    assert 5 <= found[0].step <= 20  # 3.5^step * 1 > 2e6


def test_stable_kernel_does_not_warn(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_kernel(backend, 0.8, True, None if backend.name == "pyro" else backend.jnp.float32)


# --- energies detached from the graph, argument types --------------------------------------------------------------
def test_detached_energy_warns_once_on_pyro():
    import pyro
    import torch

    from tilted_priors.pyro import EnergyTiltedNormal, ShortRunLangevin

    pyro.set_rng_seed(0)
    energy = lambda z: torch.as_tensor(np.sum(z.detach().numpy() ** 2, -1))  # noqa: E731 - through NumPy
    prior = EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2), sampler=ShortRunLangevin(5, 0.3))
    with pytest.warns(UserWarning, match=r"the energy of EnergyTiltedNormal '<lambda>' \(defined at "
                                         r"test_chain_checks.py:\d+\) does not depend on z "
                                         r"through torch operations \(e.g. it is computed with NumPy or "
                                         r"\.detach\(\)\); write it with torch functions"):
        prior.sample((4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior.sample((4,))  # once per energy
    good = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), torch.zeros(2), torch.ones(2),
                              sampler=ShortRunLangevin(5, 0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good.sample((4,))


def test_detached_log_density_warns_and_gets_no_drift_on_pyro():
    import torch

    from tilted_priors.pyro import ShortRunLangevin

    detached = lambda z: torch.as_tensor(-0.5 * np.sum(z.detach().numpy() ** 2, -1))  # noqa: E731
    with pytest.warns(UserWarning, match=r"the log density '<lambda>' \(defined at test_chain_checks.py:\d+\) "
                                         "does not depend on z through torch"):
        z = ShortRunLangevin(3, 0.1, noise=False).run(detached, torch.ones(4, 2))
    assert torch.equal(z, torch.ones(4, 2))  # no drift: a zero gradient


def test_numpy_energy_is_a_clear_type_error_on_numpyro():
    import jax
    import jax.numpy as jnp

    from tilted_priors.numpyro import EnergyTiltedNormal, ShortRunLangevin

    def numpy_energy(z):
        return np.sum(np.asarray(z) ** 2, -1)

    prior = EnergyTiltedNormal(numpy_energy, jnp.zeros(2), jnp.ones(2), sampler=ShortRunLangevin(5, 0.3))
    with pytest.raises(TypeError, match=r"^the energy 'numpy_energy' \(defined at test_chain_checks.py:\d+\) must "
                                        "be written with jax.numpy, not NumPy: "):
        prior.sample(jax.random.PRNGKey(0), (4,))
    with pytest.raises(TypeError, match="^the log density '<lambda>' .* must be written with jax.numpy, not NumPy"):
        ShortRunLangevin(5, 0.3).run(jax.random.PRNGKey(0), lambda z: -np.sum(np.asarray(z) ** 2, -1),
                                     jnp.zeros((4, 2)))


@pytest.mark.parametrize("make", ["ula", "mala", "persistent"])
def test_integer_init_is_a_clear_type_error(backend, make):
    tp = backend.tp
    sampler = {"ula": lambda: tp.ShortRunLangevin(5, 0.3), "mala": lambda: tp.MALA(5, 0.3),
               "persistent": lambda: tp.Persistent(tp.ShortRunLangevin(5, 0.3))}[make]()
    init = backend.array(np.zeros((4, 2), int), backend.torch.int64 if backend.name == "pyro" else backend.jnp.int32)
    with pytest.raises(TypeError, match=r"^init has integer dtype \S*int(32|64); .* pass floats, e\.g\. init\."):
        backend.run(sampler, standard_normal, init)


def test_log_density_of_the_wrong_type_or_shape(backend):
    sampler = backend.tp.ShortRunLangevin(5, 0.3)
    init = backend.array(np.zeros((4, 2)))
    with pytest.raises(TypeError, match=r"^log_density must return (a tensor|an array) of shape \(4,\) .*got a "
                                        r"Python float: build it with (torch|jax.numpy) operations on z"):
        backend.run(sampler, lambda z: 1.0, init)
    with pytest.raises(TypeError, match="got a numpy.ndarray"):
        backend.run(sampler, lambda z: np.zeros(4), init)
    with pytest.raises(ValueError, match=r"input \(4, 2\) gave output \(4, 1\) \(squeeze its last dimension\)"):
        backend.run(sampler, lambda z: (z ** 2).sum(-1, keepdims=True), init)


# --- energy modules that fit would never train ---------------------------------------------------------------------
def test_unregistered_torch_energy_module_warns(fresh_pyro):
    import pyro
    import torch

    from tilted_priors.inference.pyro.modules import warn_unregistered_modules
    from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal

    net = EnergyMLP(2, hidden=4)
    obs = torch.zeros(2)

    def unregistered(x):
        z = pyro.sample("z", EnergyTiltedNormal(net, torch.zeros(2), torch.ones(2)))
        pyro.sample("x", pyro.distributions.Normal(z, 1.0).to_event(1), obs=x)

    def registered(x):
        pyro.module("energy", net)
        unregistered(x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        pyro.sample("z", pyro.distributions.Normal(loc, 1.0).to_event(1))

    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"the energy of site 'z' is a torch module \(EnergyMLP\) whose parameters "
                                         r"are not registered with pyro.module\(...\), so fit will not train them; "
                                         r"call pyro.module\('energy', net\) in the model"):
        assert warn_unregistered_modules(unregistered, guide, (obs,), {}) == ["z"]
    assert torch.equal(torch.get_rng_state(), state)  # no chain ran, the random stream is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unregistered_modules(registered, guide, (obs,), {}) == []
        assert warn_unregistered_modules(lambda: pyro.sample("z", EnergyTiltedNormal(
            lambda z: (z ** 2).sum(-1), torch.zeros(2), torch.ones(2))), None) == []  # not a module: nothing to train


def test_unregistered_nnx_energy_module_warns():
    import jax.numpy as jnp
    import numpyro
    from flax import nnx

    from tilted_priors.inference.numpyro.modules import register_module, warn_unregistered_modules
    from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal

    net = EnergyMLP(2, hidden=4, rngs=nnx.Rngs(0))

    def prior(energy):
        return EnergyTiltedNormal(energy, jnp.zeros(2), jnp.ones(2))

    def unregistered():
        numpyro.sample("z", prior(net))

    def registered_but_unused():  # the site is trained, the module the prior uses is not
        register_module("energy", net)
        numpyro.sample("z", prior(net))

    def registered():
        numpyro.sample("z", prior(register_module("energy", net)))

    def guide():
        loc = numpyro.param("loc", jnp.zeros(2))
        numpyro.sample("z", numpyro.distributions.Normal(loc, 1.0).to_event(1))

    for model in (unregistered, registered_but_unused):
        with pytest.warns(UserWarning, match=r"the energy of site 'z' is a Flax NNX module \(EnergyMLP\) whose "
                                             r"parameters are not registered as a param site, so fit will not train "
                                             r"them; register it in the model"):
            assert warn_unregistered_modules(model, guide, (), {}) == ["z"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unregistered_modules(registered, guide, (), {}) == []
        assert warn_unregistered_modules(lambda: numpyro.sample("z", prior(lambda z: (z ** 2).sum(-1))), None) == []
