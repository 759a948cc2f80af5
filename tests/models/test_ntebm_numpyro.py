"""tilted_priors.models.numpyro.ntebm: the NT-EBM's densities, flow fit, energy fit, sampling and input checks (small and fast)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from tilted_priors.inference.numpyro.handlers import normalizer
from tilted_priors.models.data import toy_mixture
from tilted_priors.models.numpyro import ntebm
from tilted_priors.numpyro import MALA, Unnormalized


@pytest.fixture(scope="module")
def model():
    return ntebm.build(2, flow_layers=1, flow_hidden=8, energy_hidden=8, seed=0)


def test_model_log_density_is_tilted_flow(model):
    x = jnp.asarray(toy_mixture(7, "ring", seed=1), dtype=jnp.float32)
    with normalizer(Unnormalized()):
        tr = handlers.trace(handlers.seed(model.model, 0)).get_trace(x)
    site = tr["x"]
    assert site["is_observed"]
    lp = site["fn"].log_prob(x)
    expected = -model.energy(x) + model.flow_dist().log_prob(x)
    np.testing.assert_allclose(lp, expected, rtol=1e-4, atol=1e-4)


def test_flow_log_density_is_change_of_variables(model):
    u = jax.random.normal(jax.random.PRNGKey(1), (6, 2))
    t = model.transform()
    x = t(u)
    log_n = -0.5 * jnp.sum(u ** 2, -1) - math.log(2 * math.pi)
    np.testing.assert_allclose(model.flow_dist().log_prob(x), log_n - t.log_abs_det_jacobian(u, x),
                               rtol=1e-4, atol=1e-4)


def test_fit_flow_lowers_ring_nll():
    m = ntebm.build(2, flow_layers=1, flow_hidden=8, energy_hidden=8, seed=0)
    hist = ntebm.fit_flow(m, toy_mixture(1024, "ring", seed=0), steps=40, batch_size=256, lr=1e-2)
    assert np.mean(hist[-5:]) < np.mean(hist[:5]) - 0.2


def test_fit_energy_finite_and_only_energy_moves():
    m = ntebm.build(2, flow_layers=1, flow_hidden=8, energy_hidden=8, seed=0)
    flow_before = jax.tree.leaves(m.flow_params)
    e_before = m.energy(jnp.ones((1, 2)))
    hist = ntebm.fit_energy(m, toy_mixture(256, "ring", seed=0), steps=3, chain_steps=5, batch_size=32, reg=0.1)
    assert len(hist) == 3 and all(math.isfinite(h) for h in hist)
    assert all(a is b for a, b in zip(flow_before, jax.tree.leaves(m.flow_params)))
    assert not np.allclose(e_before, m.energy(jnp.ones((1, 2))))


@pytest.mark.parametrize("space", ["latent", "data"])
def test_sample_shapes(model, space):
    x = ntebm.sample(model, 9, MALA(5, 0.3), rng_key=jax.random.PRNGKey(0), space=space)
    assert x.shape == (9, 2) and bool(jnp.isfinite(x).all())


@pytest.mark.parametrize("bad, match", [(np.zeros((5, 3)), r"shape \(N, 2\)"), (np.zeros(4), r"shape \(N, 2\)"),
                                        (np.array([[0.0, np.nan]]), "non-finite"),
                                        (np.array([[np.inf, 0.0]]), "non-finite")])
def test_bad_data_raises(model, bad, match):
    with pytest.raises(ValueError, match=match):
        ntebm.fit_flow(model, bad, steps=1)
    with pytest.raises(ValueError, match=match):
        ntebm.fit_energy(model, bad, steps=1)
    with pytest.raises(ValueError, match=match):
        model.model(bad)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="space"):
        ntebm.sample(model, 2, space="u")
    with pytest.raises(ValueError, match="flow"):
        ntebm.build(2, flow="bnaf")
    with pytest.raises(ValueError, match="data_dim"):
        ntebm.build(1)


def test_build_defaults_and_the_shared_bound_argument():
    """build() has Pyro's signature: flow_layers=None is the flow's default (6 IAF layers), bound is checked."""
    m = ntebm.build(2, flow_hidden=8, energy_hidden=8, bound=3.0)
    assert len(m.flow_params) == ntebm.REFERENCE["flow_layers"] == 6
    assert len(ntebm.build(2, flow_layers=2, flow_hidden=8, energy_hidden=8).flow_params) == 2
    with pytest.raises(ValueError, match="bound must be a finite positive number"):
        ntebm.build(2, bound=0.0)
