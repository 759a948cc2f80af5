"""EnergyTilted / EnergyTiltedNormal as distributions: densities, shapes, plates and validation, both backends."""
import numpy as np
import pytest
from scipy import stats

from helpers import make_case


def test_log_prob_is_the_tilted_density(backend, quadratic_case):
    """Unnormalized log_prob minus the closed-form log Z is the Gaussian log density of the tilted law."""
    case = quadratic_case
    prior = backend.prior(case, normalizer=backend.tp.Unnormalized())
    z = np.random.default_rng(0).normal(size=(7, case.dim))
    got = backend.numpy(prior.log_prob(backend.array(z))) - case.log_z
    want = stats.multivariate_normal(case.mean, case.cov).logpdf(z)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_samples_have_the_right_law_roughly(backend, quadratic_case):
    """Default short-run prior sampler from the base: close to the target (not exact: short-run ULA)."""
    z = backend.numpy(backend.sample(backend.prior(quadratic_case), (4000,)))
    assert z.shape == (4000, quadratic_case.dim)
    assert np.abs(z.mean(0) - quadratic_case.mean).max() < 0.15


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_shapes(backend, batch):
    case = make_case(dim=4)
    tp = backend.tp
    loc = backend.array(np.zeros(batch + (4,)))
    prior = tp.EnergyTiltedNormal(backend.quadratic_energy(case), loc, backend.array(1.0),
                                  normalizer=tp.Unnormalized(), sampler=tp.ShortRunLangevin(3, 0.1))
    assert tuple(prior.batch_shape) == batch and tuple(prior.event_shape) == (4,)
    assert prior.has_rsample is False
    z = backend.sample(prior, (5,))
    assert tuple(z.shape) == (5,) + batch + (4,)
    assert tuple(prior.log_prob(z).shape) == (5,) + batch
    wide = prior.expand((6,) + batch)
    assert type(wide) is type(prior) and tuple(wide.batch_shape) == (6,) + batch
    assert tuple(backend.sample(wide).shape) == (6,) + batch + (4,)
    if batch:
        ind = prior.to_event(len(batch))
        assert tuple(ind.event_shape) == batch + (4,) and tuple(ind.log_prob(z).shape) == (5,)


def test_general_base_matches_the_normal_case(backend, quadratic_case):
    case, tp = quadratic_case, backend.tp
    if backend.name == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    base = dist.Normal(backend.array(case.loc), backend.array(case.scale)).to_event(1)
    general = tp.EnergyTilted(backend.quadratic_energy(case), base, normalizer=tp.Unnormalized())
    z = backend.array(np.random.default_rng(1).normal(size=(5, case.dim)))
    normal = backend.prior(case, normalizer=tp.Unnormalized())
    np.testing.assert_allclose(backend.numpy(general.log_prob(z)), backend.numpy(normal.log_prob(z)), rtol=1e-5)


def test_in_a_plate(backend, quadratic_case):
    case, tp = quadratic_case, backend.tp
    if backend.name == "pyro":
        import pyro
        from pyro import poutine as handlers

        def model():
            with pyro.plate("data", 10):
                return pyro.sample("z", backend.prior(case, sampler=tp.ShortRunLangevin(2, 0.1)))

        trace = handlers.trace(model).get_trace().nodes
    else:
        import numpyro
        from numpyro import handlers

        def model():
            with numpyro.plate("data", 10):
                return numpyro.sample("z", backend.prior(case, sampler=tp.ShortRunLangevin(2, 0.1)))

        trace = handlers.trace(handlers.seed(model, 0)).get_trace()
    site = trace["z"]
    assert isinstance(site["fn"], tp.EnergyTiltedNormal)
    assert tuple(site["value"].shape) == (10, case.dim)
    assert tuple(site["fn"].batch_shape) == (10,)


def test_no_closed_form_moments(backend, quadratic_case):
    prior = backend.prior(quadratic_case)
    for attr in ("mean", "variance"):
        with pytest.raises(NotImplementedError, match="sample"):
            getattr(prior, attr)


# --- bad input -----------------------------------------------------------------------------------------
def test_non_positive_scale(backend, quadratic_case):
    with pytest.raises(ValueError, match="scale"):
        backend.tp.EnergyTiltedNormal(backend.quadratic_energy(quadratic_case), backend.array(np.zeros(3)),
                                      backend.array([1.0, 0.0, 1.0]), validate_args=True)


def test_scalar_loc_is_rejected(backend, quadratic_case):
    with pytest.raises(ValueError, match="event"):
        backend.tp.EnergyTiltedNormal(backend.quadratic_energy(quadratic_case), backend.array(0.0),
                                      backend.array(1.0))


def test_wrong_event_size(backend, quadratic_case):
    prior = backend.prior(quadratic_case, normalizer=backend.tp.Unnormalized(), validate_args=True)
    with pytest.raises(ValueError):
        prior.log_prob(backend.array(np.zeros((2, quadratic_case.dim + 1))))


def test_non_finite_value(backend, quadratic_case):
    prior = backend.prior(quadratic_case, normalizer=backend.tp.Unnormalized(), validate_args=True)
    z = np.zeros((2, quadratic_case.dim))
    z[1, 0] = np.nan
    with pytest.raises(ValueError, match="support"):
        prior.log_prob(backend.array(z))


def test_energy_of_the_wrong_shape(backend, quadratic_case):
    tp = backend.tp
    prior = tp.EnergyTiltedNormal(lambda z: (z ** 2).sum(-1, keepdims=True), backend.array(np.zeros(3)),
                                  backend.array(np.ones(3)), normalizer=tp.Unnormalized())
    with pytest.raises(ValueError, match="squeeze"):
        prior.log_prob(backend.array(np.zeros((4, 3))))


def test_base_without_event_dim(backend):
    if backend.name == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    with pytest.raises(ValueError, match="to_event"):
        backend.tp.EnergyTilted(lambda z: z.sum(-1), dist.Normal(backend.array(np.zeros(3)), 1.0))


def test_not_callable_energy(backend):
    with pytest.raises(TypeError, match="callable"):
        backend.tp.EnergyTiltedNormal(3.0, backend.array(np.zeros(3)), backend.array(np.ones(3)))
