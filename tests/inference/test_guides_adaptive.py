"""ShortRunPosterior's adaptive default (``step_size="auto"``), its no-move warning and its divergence label (both
backends)."""
import warnings

import numpy as np
import pytest

from tilted_priors import ChainDivergenceError

D = 2


def _model(backend, lik_sd: float):
    """z_i ~ EnergyTiltedNormal(E, 0, I) with a small quadratic energy, x_i ~ N(z_i, lik_sd^2 I) observed."""
    ppl = backend.pyro if backend.name == "pyro" else backend.numpyro
    energy = backend.quadratic_energy(None, A=backend.array(0.2 * np.eye(D)), b=backend.array(np.zeros(D)))
    zeros, ones = backend.array(np.zeros(D)), backend.array(np.ones(D))

    def model(x):
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample("z", backend.tp.EnergyTiltedNormal(energy, zeros, ones))
            ppl.sample("x", ppl.distributions.Normal(z, lik_sd).to_event(1), obs=x)

    return model


def _guide(backend, model, **kwargs):
    if backend.name == "pyro":
        from tilted_priors.inference.pyro import ShortRunPosterior
    else:
        from tilted_priors.inference.numpyro import ShortRunPosterior
    return ShortRunPosterior(model, **kwargs)


def _call(backend, guide, x):
    if backend.name == "pyro":
        return backend.numpy(guide(x)["z"])
    from numpyro import handlers

    return backend.numpy(handlers.seed(guide, backend.key())(x)["z"])


def _posterior_mean(x, lik_sd):
    precision = 1.0 + 0.2 + 1.0 / lik_sd ** 2  # prior N(0, I) tilted by 0.1 |z|^2, likelihood N(z, lik_sd^2)
    return x / lik_sd ** 2 / precision, precision ** -0.5


def test_default_guide_adapts_to_a_posterior_100_times_narrower_than_the_prior(backend):
    lik_sd = 0.01  # the posterior's sd is 0.01: LEBM's 0.1 is 5 times its stability bound 2 * 0.01
    x = np.random.default_rng(0).normal(size=(32, D))
    model = _model(backend, lik_sd)
    guide = _guide(backend, model)
    assert repr(guide.sampler).startswith("ShortRunLangevin(steps=20, step_size='auto'")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # in particular no "hardly moved" warning
        z = _call(backend, guide, backend.array(x))
    mean, sd = _posterior_mean(x, lik_sd)
    # 20 steps from the prior (100 posterior sds away) reach the posterior: within 5 of its sds of its mean.
    assert np.abs(z - mean).max() < 5 * sd, np.abs(z - mean).max() / sd


def test_a_diverging_posterior_chain_names_the_guide_its_sites_and_a_stable_step_size(backend):
    x = backend.array(np.random.default_rng(0).normal(size=(8, D)))
    # The curvature is 1e6 (stable for h < 0.002): at 0.1 each step multiplies the distance to the mode by 5000.
    # (8 steps: on NumPyro every eager call compiles a fully unrolled chain, three times on the error path.)
    guide = _guide(backend, _model(backend, 0.001), steps=8, step_size=0.1)
    with pytest.raises(ChainDivergenceError, match=r"posterior guide ShortRunPosterior, sites \['z'\].*"
                                                   r"smaller step size than 0\.1.*try step_size=0\.001"):
        _call(backend, guide, x)


def test_a_chain_that_does_not_move_warns_once(backend):
    x = backend.array(np.random.default_rng(1).normal(size=(16, D)))
    model = _model(backend, 1.0)
    # Short chains: on NumPyro every eager call compiles a fully unrolled chain.
    guide = _guide(backend, model, steps=4, step_size=1e-6)
    with pytest.warns(UserWarning, match=r"hardly moved.*step_size=1e-06, steps=4.*step_size='auto'") as record:
        _call(backend, guide, x)
        _call(backend, guide, x)
    assert sum("hardly moved" in str(w.message) for w in record) == 1  # once per guide
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _call(backend, _guide(backend, model, steps=4), x)  # "auto" moves
    assert not [w for w in record if "hardly moved" in str(w.message)]


def test_the_no_move_check_runs_under_jit_in_svi():
    import jax
    import numpyro
    import optax
    from numpyro.infer import SVI, Trace_ELBO

    from helpers import NumPyroBackend

    backend = NumPyroBackend(seed=0)
    base = _model(backend, 1.0)

    def model(x):
        numpyro.param("w", 0.0)  # something to train
        base(x)

    svi = SVI(model, _guide(backend, model, steps=4, step_size=1e-7), optax.adam(1e-3), Trace_ELBO())
    x = backend.array(np.random.default_rng(2).normal(size=(8, D)))
    with pytest.warns(UserWarning, match="hardly moved") as record:
        state = jax.jit(svi.init)(backend.key(), x)  # the guide runs traced only: the check is a callback
        update = jax.jit(svi.update)
        for _ in range(3):
            state, loss = update(state, x)
        jax.effects_barrier()
    assert sum("hardly moved" in str(w.message) for w in record) == 1
