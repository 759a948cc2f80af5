"""Bad arguments to the public API fail early, with the argument named and the fix said (both backends).

One test per kind of bad input; each asserts the error type and that the message names the argument. Tests of a
behaviour shared by the backends take the ``backend`` fixture (see support/helpers.py).
"""
import sys

import numpy as np
import pytest


def dist_module(backend):
    """``pyro.distributions`` or ``numpyro.distributions``."""
    if backend.name == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    return dist


def square_energy(z):
    return (z ** 2).sum(-1)


def prior(backend, d=3, **kwargs):
    return backend.tp.EnergyTiltedNormal(square_energy, backend.array(np.zeros(d)), backend.array(np.ones(d)),
                                         **kwargs)


# --- proposals of the importance normalizers --------------------------------------------------------------
@pytest.mark.parametrize("normalizer", ["SelfNormalized", "Importance"])
def test_proposal_without_to_event(backend, normalizer):
    dist = dist_module(backend)
    proposal = dist.Normal(backend.array(np.zeros(3)), 1.0)  # a batch of 3 scalars, not one 3-vector
    d = prior(backend, normalizer=getattr(backend.tp, normalizer)(10, proposal=proposal))
    with pytest.raises(ValueError, match=r"proposal has event shape \(\) and batch shape \(3,\).*event shape is "
                                         r"\(3,\).*to_event\(1\)"):
        backend.log_normalizer(d)


def test_proposal_of_another_event_size(backend):
    dist = dist_module(backend)
    proposal = dist.Normal(backend.array(np.zeros(2)), 1.0).to_event(1)
    with pytest.raises(ValueError, match=r"proposal has event shape \(2,\).*event shape is \(3,\)"):
        backend.estimate(backend.tp.Importance(10, proposal=proposal), prior(backend))


def test_proposal_batch_that_does_not_broadcast(backend):
    dist = dist_module(backend)
    proposal = dist.Normal(backend.array(np.zeros((4, 3))), 1.0).to_event(1)
    d = backend.tp.EnergyTiltedNormal(square_energy, backend.array(np.zeros((5, 3))), backend.array(np.ones(3)))
    with pytest.raises(ValueError, match=r"proposal has batch shape \(4,\).*batch shape \(5,\)"):
        backend.estimate(backend.tp.Importance(10, proposal=proposal), d)


def test_proposal_that_is_not_a_distribution(backend):
    with pytest.raises(TypeError, match="proposal must be a .*distribution.*list"):
        backend.tp.SelfNormalized(10, proposal=[0.0, 1.0])


# --- dtypes -----------------------------------------------------------------------------------------------
def test_float32_energy_with_float64_loc_pyro(fresh_pyro):
    import torch

    import tilted_priors.pyro as tp

    energy = tp.EnergyMLP(3, 8)  # float32 parameters
    d = tp.EnergyTiltedNormal(energy, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                              normalizer=tp.Unnormalized())
    with pytest.raises(TypeError, match=r"parameters are torch.float32, but z is torch.float64.*loc.*\.double\(\)"):
        d.log_prob(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"torch.float32.*torch.float64"):
        d.sample((2,))


def test_float32_module_with_a_float64_base_pyro(fresh_pyro):
    """Any torch module as the energy (here a bare Linear layer) and any base: the distribution names the dtypes."""
    import pyro.distributions as dist
    import torch

    import tilted_priors.pyro as tp

    base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
    d = tp.EnergyTilted(torch.nn.Linear(3, 1), base, normalizer=tp.Unnormalized())
    with pytest.raises(TypeError, match=r"energy's parameters are torch.float32, but z is torch.float64"):
        d.log_tilted(torch.zeros(3, dtype=torch.float64))


def test_mixed_dtypes_are_promoted_numpyro():
    """JAX promotes float32 parameters with float64 inputs (under x64): nothing to report, the result is float64."""
    import jax
    import jax.numpy as jnp

    import tilted_priors.numpyro as tp

    with jax.enable_x64(True):
        w = jnp.ones(3, jnp.float32)  # the energy's parameters
        d = tp.EnergyTiltedNormal(lambda z: (w * z ** 2).sum(-1), jnp.zeros(3, jnp.float64), jnp.ones(3, jnp.float64),
                                  normalizer=tp.Unnormalized())
        assert d.log_prob(jnp.zeros((2, 3), jnp.float64)).dtype == jnp.float64


# --- sample_shape -----------------------------------------------------------------------------------------
def test_int_sample_shape_is_taken_as_one_dimension(backend):
    d = prior(backend, sampler=backend.tp.SIR(10))
    assert tuple(backend.sample(d, 4).shape) == (4, 3)


@pytest.mark.parametrize("shape", [2.5, "ab", (2.0,), None])
def test_sample_shape_that_is_not_a_shape(backend, shape):
    d = prior(backend, sampler=backend.tp.SIR(10))
    with pytest.raises(TypeError, match="sample_shape must be a tuple of ints"):
        backend.sample(d, shape)


def test_negative_sample_shape(backend):
    d = prior(backend, sampler=backend.tp.SIR(10))
    with pytest.raises(ValueError, match=r"sample_shape must hold sizes >= 0, got \(-1,\)"):
        backend.sample(d, (-1,))


def test_sample_with_and_sir_check_sample_shape(backend):
    d = prior(backend)
    sir = backend.tp.SIR(10)
    if backend.name == "pyro":
        calls = (lambda: d.sample_with(sir, 2.5), lambda: sir.sample_tilted(d, 2.5))
    else:
        calls = (lambda: d.sample_with(backend.key(), sir, 2.5), lambda: sir.sample_tilted(backend.key(), d, 2.5))
    for call in calls:
        with pytest.raises(TypeError, match="sample_shape"):
            call()


def test_rsample_says_there_are_no_reparameterised_draws(backend):
    d = prior(backend)
    with pytest.raises(NotImplementedError, match=r"has_rsample = False.*\.sample\("):
        d.rsample((2,)) if backend.name == "pyro" else d.rsample(backend.key(), (2,))
    with pytest.raises(TypeError, match="sample_shape"):
        d.rsample(2.5) if backend.name == "pyro" else d.rsample(backend.key(), 2.5)


def test_sir_given_something_else_than_a_tilted_distribution(backend):
    sir = backend.tp.SIR(10)
    with pytest.raises(TypeError, match="dist must be a tilted distribution"):
        sir.sample_tilted([0.0], (2,)) if backend.name == "pyro" else sir.sample_tilted(backend.key(), [0.0], (2,))


# --- keys (NumPyro) ---------------------------------------------------------------------------------------
def test_seed_given_for_a_key_numpyro():
    import jax.numpy as jnp

    import tilted_priors.numpyro as tp

    d = tp.EnergyTiltedNormal(square_energy, jnp.zeros(3), jnp.ones(3), normalizer=tp.Importance(4))
    with pytest.raises(TypeError, match=r"rng_key must be a PRNG key.*got 0 \(int\).*PRNGKey"):
        d.sample(0, (2,))
    with pytest.raises(TypeError, match="rng_key must be a PRNG key"):
        d.log_normalizer(5)
    with pytest.raises(TypeError, match="rng_key must be a PRNG key"):
        tp.EnergyTiltedNormal(square_energy, jnp.zeros(3), jnp.ones(3), rng_key=3)


# --- loc, scale, base, energy -----------------------------------------------------------------------------
def test_loc_and_scale_that_do_not_broadcast(backend):
    with pytest.raises(ValueError, match=r"loc of shape \(3,\) and scale of shape \(2,\) do not broadcast"):
        backend.tp.EnergyTiltedNormal(square_energy, backend.array(np.zeros(3)), backend.array(np.ones(2)))


def test_loc_that_is_not_numbers(backend):
    with pytest.raises(TypeError, match="loc must be .* of shape batch_shape \\+ \\(d,\\).*'a'"):
        backend.tp.EnergyTiltedNormal(square_energy, "a", backend.array(np.ones(2)))


def test_loc_and_scale_as_lists(backend):
    d = backend.tp.EnergyTiltedNormal(square_energy, [0.0, 0.0], [1.0, 1.0], sampler=backend.tp.SIR(10))
    assert tuple(backend.sample(d, (4,)).shape) == (4, 2)


def test_base_that_is_not_a_distribution(backend):
    with pytest.raises(TypeError, match=r"base must be a .*Distribution.*to_event\(1\).*list"):
        backend.tp.EnergyTilted(square_energy, [0.0, 1.0])


@pytest.mark.parametrize("setting", ["normalizer", "sampler"])
def test_class_given_for_an_instance(backend, setting):
    cls = backend.tp.Unnormalized if setting == "normalizer" else backend.tp.MALA
    with pytest.raises(TypeError, match=f"{setting} must be an instance.*got the class {cls.__name__}"):
        prior(backend, **{setting: cls})


def test_normalizer_that_is_a_string(backend):
    with pytest.raises(TypeError, match=r"normalizer must have a \.term\(\) method.*'snl'"):
        prior(backend, normalizer="snl")


def test_energy_returning_a_number(backend):
    d = backend.tp.EnergyTiltedNormal(lambda z: 1.0, backend.array(np.zeros(3)), backend.array(np.ones(3)),
                                      normalizer=backend.tp.Unnormalized())
    if backend.name == "pyro":  # torch has no 0-d view of a float: not a tensor
        with pytest.raises(TypeError, match="energy must return a torch tensor of shape"):
            d.log_prob(backend.array(np.zeros((2, 3))))
    else:  # JAX takes a float as a 0-d array: the wrong shape
        with pytest.raises(ValueError, match=r"energy must map shape \(\.\.\., d\) to \(\.\.\.\)"):
            d.log_prob(backend.array(np.zeros((2, 3))))


def test_energy_returning_numpy_pyro():
    import torch

    import tilted_priors.pyro as tp

    d = tp.EnergyTiltedNormal(lambda z: np.zeros(tuple(z.shape[:-1])), torch.zeros(3), torch.ones(3),
                              normalizer=tp.Unnormalized())
    with pytest.raises(TypeError, match="energy must return a torch tensor.*got ndarray"):
        d.log_prob(torch.zeros(2, 3))


def test_energy_of_the_wrong_arity(backend):
    conditional = lambda z, x: (z * x).sum(-1)  # noqa: E731
    d = backend.tp.EnergyTiltedNormal(conditional, backend.array(np.zeros(3)), backend.array(np.ones(3)),
                                      normalizer=backend.tp.Unnormalized())
    with pytest.raises(TypeError, match=r"energy takes the arguments \(z, x\), but the distribution has no "
                                        r"context.*context="):
        d.log_prob(backend.array(np.zeros((2, 3))))
    d = backend.tp.EnergyTiltedNormal(square_energy, backend.array(np.zeros(3)), backend.array(np.ones(3)),
                                      context=backend.array(np.ones((4, 1))), normalizer=backend.tp.Unnormalized())
    with pytest.raises(TypeError, match=r"energy takes the arguments \(z\), but with context=.*energy\(z, context\)"):
        d.log_prob(backend.array(np.zeros((4, 3))))


# --- normalizers', samplers' and networks' settings -------------------------------------------------------
@pytest.mark.parametrize("normalizer", ["SelfNormalized", "LearnedLogZ"])
@pytest.mark.parametrize("init, error", [("a", TypeError), (float("nan"), ValueError), (None, TypeError)])
def test_init_that_is_not_a_finite_number(backend, normalizer, init, error):
    args = (10,) if normalizer == "SelfNormalized" else ()
    with pytest.raises(error, match="init must be a finite real number"):
        getattr(backend.tp, normalizer)(*args, init=init)


@pytest.mark.parametrize("normalizer", ["SelfNormalized", "LearnedLogZ"])
def test_param_name_that_is_not_a_string(backend, normalizer):
    args = (10,) if normalizer == "SelfNormalized" else ()
    with pytest.raises(TypeError, match="name must be a non-empty string.*got 3"):
        getattr(backend.tp, normalizer)(*args, name=3)


def test_contrastive_sampler_that_is_not_a_sampler(backend):
    with pytest.raises(TypeError, match=r"sampler must have a \.run\(\) method.*'mala'"):
        backend.tp.Contrastive(sampler="mala")


def test_annealed_importance_kernel_that_is_not_a_sampler(backend):
    with pytest.raises(TypeError, match="kernel must .*'foo'"):
        backend.tp.AnnealedImportance(10, 5, kernel="foo")


def test_estimate_of_something_else_than_a_tilted_distribution(backend):
    with pytest.raises(TypeError, match="Importance.estimate: dist must be a tilted distribution"):
        backend.estimate(backend.tp.Importance(10), dist_module(backend).Normal(0.0, 1.0))


def test_energy_mlp_activation_that_is_not_callable_pyro():
    import tilted_priors.pyro as tp

    with pytest.raises(TypeError, match="activation must be .*'gelu'"):
        tp.EnergyMLP(3, 8, activation="gelu")


def test_energy_mlp_given_numpy_or_float64_pyro():
    import torch

    import tilted_priors.pyro as tp

    energy = tp.EnergyMLP(3, 8)
    with pytest.raises(TypeError, match=r"EnergyMLP expects torch tensors, got z = ndarray.*torch.as_tensor"):
        energy(np.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"EnergyMLP's parameters are torch.float32, but z is torch.float64"):
        energy(torch.zeros(2, 3, dtype=torch.float64))


# --- handlers and tilt ------------------------------------------------------------------------------------
def _model(backend):
    dist = dist_module(backend)

    def model():
        backend.site("z", dist.Normal(backend.array(np.zeros(2)), 1.0).to_event(1))

    return model


def test_handler_given_a_class(backend):
    with pytest.raises(TypeError, match=r"sampler\(\): sampler must be an instance, got the class MALA"):
        backend.handlers.sampler(_model(backend), backend.tp.MALA)
    with pytest.raises(TypeError, match=r"normalizer\(\): normalizer must be an instance.*Unnormalized"):
        backend.handlers.normalizer(backend.tp.Unnormalized)


def test_tilt_sites_that_are_not_names(backend):
    with pytest.raises(TypeError, match=r"tilt\(\): sites must be a site name or a sequence of site names.*got 3"):
        backend.handlers.tilt(_model(backend), lambda v: v["z"].sum(-1), 3)


def test_tilt_given_a_class(backend):
    with pytest.raises(TypeError, match=r"tilt\(\): normalizer must be an instance.*Unnormalized"):
        backend.handlers.tilt(_model(backend), lambda v: v["z"].sum(-1), "z", normalizer=backend.tp.Unnormalized)


def test_tilt_energy_of_an_array_instead_of_a_dict(backend):
    model = backend.handlers.tilt(_model(backend), lambda z: (z ** 2).sum(-1), "z", sampler=backend.tp.SIR(5))
    with pytest.raises(TypeError, match=r"tilt\(\): the energy raised TypeError.*one dict \{site: value\}.*\['z'\]"):
        backend.site_fn(model, "z")


def test_tilt_energy_asking_for_another_site(backend):
    model = backend.handlers.tilt(_model(backend), lambda v: (v["w"] ** 2).sum(-1), "z", sampler=backend.tp.SIR(5))
    with pytest.raises(KeyError, match=r"tilt\(\): the energy raised KeyError: 'w'.*\['z'\]"):
        backend.site_fn(model, "z")


def test_tilt_of_a_site_the_model_does_not_have(backend):
    model = backend.handlers.tilt(_model(backend), lambda v: (v["w"] ** 2).sum(-1), "w")
    with pytest.warns(UserWarning, match=r"tilt\(\): the model ran without the sample site\(s\) \['w'\].*\['z'\]"):
        backend.site_fn(model, "z")


# --- diagnostics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, shape", [(np.zeros((2, 10, 3)), r"\(2, 10, 3\).*reshape\(-1, d\)"),
                                        (1.0, r"\(\)")])
def test_energy_distance_of_the_wrong_rank(bad, shape):
    from tilted_priors.inference.diagnostics import energy_distance

    with pytest.raises(ValueError, match=r"a must have shape \(n, d\).*got shape " + shape):
        energy_distance(bad, np.zeros((10, 3)))


def test_energy_distance_of_non_numbers_and_non_finite_points():
    from tilted_priors.inference.diagnostics import energy_distance

    with pytest.raises(TypeError, match=r"b must be an array of numbers of shape \(n, d\)"):
        energy_distance(np.zeros((10, 3)), ["a", "b"])
    bad = np.zeros((10, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="b holds 1 non-finite values .* in 1 of its 10 points"):
        energy_distance(np.zeros((10, 3)), bad)
    with pytest.raises(TypeError, match="seed must be a non-negative integer"):
        energy_distance(np.zeros((10, 3)), np.ones((10, 3)), seed="x")


@pytest.mark.parametrize("bad", ["abc", {"a": 1}, [[1.0, 2.0, 3.0, 4.0], [1.0]]])
def test_draws_that_are_not_numbers(bad):
    from tilted_priors.inference.diagnostics import rhat

    with pytest.raises(TypeError, match=r"draws must be an array of numbers of shape \(chain, draw, \*dims\)"):
        rhat(bad)


def test_tail_ess_probability_that_is_not_a_number():
    from tilted_priors.inference.diagnostics import ess

    with pytest.raises(ValueError, match=r"prob must lie in \(0, 0.5\).*'a'"):
        ess(np.random.default_rng(0).normal(size=(2, 20)), method="tail", prob="a")


def test_to_inference_data_arguments():
    from tilted_priors.inference.diagnostics import to_inference_data

    draws = np.zeros((2, 10, 3))
    with pytest.raises(TypeError, match="obj must be an array of numbers"):
        to_inference_data("abc")
    with pytest.raises(TypeError, match="var_name must be a non-empty string"):
        to_inference_data(draws, var_name=3)
    with pytest.raises(TypeError, match="sample_stats must be a mapping"):
        to_inference_data(draws, sample_stats=[1.0])
    with pytest.raises(ValueError, match=r"sample_stats\['lp'\] must have shape \(2, 10\)"):
        to_inference_data(draws, sample_stats={"lp": np.zeros(3)})


def test_compare_chains_log_densities_of_the_wrong_shape():
    from tilted_priors.inference.diagnostics import compare_chains

    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"short_lp must have shape \(chain, draw\) = \(10, 5\).*got shape \(3,\)"):
        compare_chains(rng.normal(size=(10, 5, 2)), rng.normal(size=(10, 5, 2)), short_lp=np.zeros(3))


def test_short_vs_long_arguments():
    import tilted_priors.numpyro as tp
    from tilted_priors.inference.diagnostics import short_vs_long

    f = lambda z: -(z ** 2).sum(-1)  # noqa: E731
    with pytest.raises(TypeError, match="log_density must be a function"):
        short_vs_long(tp.MALA(5, 0.1), tp.MALA(5, 0.1), "f", np.zeros((5, 2)))
    with pytest.raises(TypeError, match="sampler_short must be a sampler instance"):
        short_vs_long("mala", tp.MALA(5, 0.1), f, np.zeros((5, 2)))


def test_plot_arguments(tmp_path):
    from tilted_priors.inference.diagnostics import plots

    with pytest.raises(TypeError, match=r"samples must be a dict \{label: \(n, d\)\}"):
        plots.plot_marginals(np.zeros((10, 2)), tmp_path / "m.png")
    with pytest.raises(ValueError, match="samples is empty"):
        plots.plot_marginals({}, tmp_path / "m.png")
    with pytest.raises(TypeError, match="runs must be a dict"):
        plots.plot_energy_trajectories(np.zeros((10, 2)), tmp_path / "e.png")
    with pytest.raises(ValueError, match=r"chains must have shape \(chain, draw, d\).*chains\[\.\.\., None\]"):
        plots.plot_trace(np.zeros((10, 2)), tmp_path / "t.png")


def test_missing_matplotlib_is_named(monkeypatch, tmp_path):
    from tilted_priors.inference.diagnostics import plots
    from tilted_priors.inference.diagnostics._arviz import arviz_module

    arviz_module()  # loaded before matplotlib goes: ArviZ's own plots then need matplotlib.pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for call in (lambda: plots.plot_marginals({"a": np.zeros((10, 2))}, tmp_path / "m.png"),
                 lambda: plots.plot_trace(np.zeros((2, 10, 2)), tmp_path / "t.png")):
        with pytest.raises(ImportError, match=r"plots uses matplotlib, which is not installed: pip install matplotlib"):
            call()


def test_missing_dependency_of_a_dependency_is_named(monkeypatch, tmp_path):
    """A package that is installed but cannot be imported because of one of its imports (ArviZ without
    matplotlib) is reported with the package actually missing."""
    from tilted_priors._extras import import_dependency

    (tmp_path / "fake_arviz_xyz.py").write_text("import matplotlib.colors\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"uses fake_arviz_xyz, which cannot be imported because matplotlib is "
                                          r"not installed: pip install matplotlib"):
        import_dependency("fake_arviz_xyz", "tilted_priors.inference.diagnostics")


# --- guides -----------------------------------------------------------------------------------------------
def test_guide_given_a_sampler_class(backend):
    from importlib import import_module

    guides = import_module(f"tilted_priors.inference.{backend.name}")
    with pytest.raises(TypeError, match="sampler must be a sampler instance.*MALA"):
        guides.ShortRunPosterior(_model(backend), sampler=backend.tp.MALA)


# --- flags ------------------------------------------------------------------------------------------------------
_FLAGS = {  # what takes a flag: (the flag, a call given it as a string)
    "noise": lambda tp, inf, model: tp.ShortRunLangevin(10, 0.1, noise="False"),
    "strict": lambda tp, inf, model: tp.MALA(10, strict="no"),
    "adjusted": lambda tp, inf, model: inf.Langevin(model, adjusted="False"),
    "adapt_step_size": lambda tp, inf, model: inf.Langevin(model, adapt_step_size="False"),
    "adapt_mass_matrix": lambda tp, inf, model: inf.Langevin(model, adapt_mass_matrix="False"),
    "per_datum": lambda tp, inf, model: inf.ShortRunPosterior(model, per_datum="False"),
    "whiten": lambda tp, inf, model: inf.RefinedGuide(inf.ShortRunPosterior(model), whiten="False"),
    "recursive": lambda tp, inf, model: inf.RecursiveMixtureELBO(recursive="False"),
    "vectorize": lambda tp, inf, model: inf.log_likelihood(model, vectorize="False"),
    "warm_start": lambda tp, inf, model: inf.fit_recursive(model, None, None, 10, warm_start="False"),
    "stein": lambda tp, inf, model: _short_vs_long(tp.ShortRunLangevin(5, 0.1), tp.ShortRunLangevin(50, 0.1),
                                                    lambda z: -(z ** 2).sum(-1), np.zeros((2, 2)), stein="False"),
}


def _short_vs_long(*args, **kwargs):
    from tilted_priors.inference.diagnostics import short_vs_long

    return short_vs_long(*args, **kwargs)


@pytest.mark.parametrize("flag", list(_FLAGS))
def test_a_flag_given_as_a_string(backend, flag):
    """``"False"`` would be taken as true: a flag must be True or False."""
    inference = __import__(f"tilted_priors.inference.{backend.name}", fromlist=["_"])
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got '\w+' \(str\)"):
        _FLAGS[flag](backend.tp, inference, _model(backend))


def test_compile_log_joint_given_as_a_string_pyro(fresh_pyro):
    import pyro
    import pyro.distributions as dist
    import torch

    from tilted_priors.inference.pyro import ShortRunPosterior

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(TypeError, match=r"compile_log_joint must be True or False, got 'no' \(str\)"):
        ShortRunPosterior(model, compile_log_joint="no")
