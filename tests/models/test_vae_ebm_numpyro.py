"""VAE-EBM (tilted_priors.models.numpyro.vae_ebm): the program's sites and param sites, one model trained by each guide, and the
importance-weighted log-likelihood against quadrature on a model small enough to integrate (1-d latent, 2x2
images). The NumPyro twin of tests/models/test_vae_ebm_pyro.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO

from tilted_priors.inference.numpyro import RefinedGuide, ShortRunPosterior
from tilted_priors.models.numpyro import vae_ebm
from tilted_priors.numpyro import ShortRunLangevin

SHAPE = (2, 2, 1)


def binary(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 2, size=(n,) + SHAPE), dtype=jnp.float32)


def test_sites_and_parameters():
    vae = vae_ebm.build(3, image_shape=SHAPE, hidden=(8,), energy_hidden=8)
    tr = handlers.trace(handlers.seed(vae.model, 0)).get_trace(binary(4))
    assert tr["z"]["value"].shape == (4, 3)
    assert tr["x"]["fn"].event_shape == SHAPE and tr["x"]["is_observed"]
    assert {k for k, site in tr.items() if site["type"] == "param"} == {"energy$params", "decoder$params", "snl_b"}
    gaussian = vae_ebm.build(3, image_shape=SHAPE, hidden=(8,), prior="gaussian")
    assert gaussian.energy is None
    tr = handlers.trace(handlers.seed(gaussian.model, 0)).get_trace(binary(4))
    assert {k for k, site in tr.items() if site["type"] == "param"} == {"decoder$params"}
    guide_tr = handlers.trace(handlers.seed(vae.guide(), 0)).get_trace(binary(4))
    assert guide_tr["z"]["value"].shape == (4, 3) and "encoder$params" in guide_tr
    with pytest.raises(ValueError, match="x must have shape"):
        vae.model(jnp.zeros((4, 3, 3, 1)))
    with pytest.raises(ValueError, match="prior must be"):
        vae_ebm.build(3, prior="flow")
    with pytest.raises(ValueError, match="image_shape"):
        vae_ebm.build(3, image_shape=(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        vae.model()


def test_with_params_and_torch_layout():
    vae = vae_ebm.build(2, image_shape=SHAPE, hidden=(8,), energy_hidden=4)
    tr = handlers.trace(handlers.seed(vae.model, 0)).get_trace(binary(3))
    params = {"decoder$params": jax.tree.map(jnp.zeros_like, tr["decoder$params"]["value"])}
    zeroed = vae.with_params(params)
    assert float(jnp.abs(zeroed.decoder(jnp.ones(2))).max()) == 0.0
    assert float(jnp.abs(vae.decoder(jnp.ones(2))).max()) > 0.0  # the original is unchanged
    assert zeroed.encoder is vae.encoder and zeroed.energy is vae.energy
    sd = vae.encoder.torch_state_dict()
    assert sd["net.0.weight"].shape == (8, 4) and sd["net.2.weight"].shape == (4, 8)
    with pytest.raises(ValueError, match="does not match"):
        vae.encoder.load_torch_state_dict({"net.0.weight": sd["net.0.weight"]})
    with pytest.raises(ValueError, match="needs"):
        vae.encoder.load_torch_state_dict({**sd, "net.0.weight": sd["net.0.weight"][:, :3]})
    with pytest.raises(ValueError, match="Gaussian prior"):
        vae_ebm.build(2, image_shape=SHAPE, hidden=(8,), prior="gaussian").load_torch_state_dicts(energy={})


def _guides(vae):
    return {"amortized": vae.guide, "refined": lambda: RefinedGuide(vae.guide(), steps=3),
            "short-run": lambda: ShortRunPosterior(vae.model, steps=3)}


@pytest.mark.parametrize("label", ["amortized", "refined", "short-run"])
def test_one_model_trains_with_each_guide(label):
    """The same ``vae.model`` under the SNELBO (AmortizedGuide), RefinedGuide and ShortRunPosterior: finite losses,
    the model's params move, and the encoder trains under the first two only."""
    x = binary(16)
    vae = vae_ebm.build(2, image_shape=SHAPE, hidden=(8,), energy_hidden=8, prior_sampler=ShortRunLangevin(5, 0.4))
    guide = _guides(vae)[label]()
    svi = SVI(vae.model, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x)
    before = svi.get_params(state)
    update = jax.jit(svi.update)  # one compilation instead of op-by-op dispatch
    losses = []
    for _ in range(3):
        state, loss = update(state, x)
        losses.append(float(loss))
    after = svi.get_params(state)
    assert np.isfinite(losses).all(), label
    assert "snl_b" in after, label  # the prior's SelfNormalized, whatever the guide

    def moved(name):
        if name not in before:
            return False
        return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]),
                                                             jax.tree.leaves(after[name])))

    assert moved("decoder$params") and moved("energy$params") and moved("snl_b"), label
    assert moved("encoder$params") == (label != "short-run"), label
    trained = vae.with_params(after)
    z = jnp.ones((3, 2))
    assert not np.array_equal(trained.decoder(z), vae.decoder(z)) and not np.array_equal(trained.energy(z),
                                                                                          vae.energy(z))


def quadrature_log_likelihood(vae, x):
    """log p(x) by the trapezoid rule over the 1-d latent, log Z likewise (float64 on the host)."""
    z = np.linspace(-9.0, 9.0, 6001)[:, None]
    log_prior = -0.5 * z[:, 0] ** 2 - 0.5 * np.log(2 * np.pi)
    if vae.energy is not None:
        log_prior = log_prior - np.asarray(vae.energy(jnp.asarray(z, jnp.float32)), np.float64)
    dz = z[1, 0] - z[0, 0]
    log_z = np.logaddexp.reduce(log_prior) + np.log(dz)
    logits = np.asarray(vae.decoder(jnp.asarray(z, jnp.float32)), np.float64)[:, None]  # (Z, 1, H, W, C)
    xs = np.asarray(x, np.float64)[None]
    log_lik = (xs * logits - np.logaddexp(0.0, logits)).sum((-1, -2, -3))             # (Z, N)
    return np.logaddexp.reduce(log_lik + log_prior[:, None], axis=0) + np.log(dz) - log_z


def well_posed(vae, scale=1.5, tilt=10.0):
    """Make the test model's importance sampling well posed and its tilt felt: the encoder's scale head is set to
    ``scale`` (wider than the posterior, so the importance weights are bounded; at its initial ~0.5 they are
    heavy-tailed and eight repeats of 2000 samples under-state the error), and the energy's output layer is
    multiplied by ``tilt`` (log Z about 0.3 instead of 0.03). Done through the torch-layout weight loaders."""
    sd = vae.encoder.torch_state_dict()
    last, d = f"net.{2 * (len(vae.encoder.layers) - 1)}", vae.latent_dim
    sd[f"{last}.weight"][d:] = 0.0
    sd[f"{last}.bias"][d:] = np.log(np.expm1(scale - 1e-4))
    vae.encoder.load_torch_state_dict(sd)
    if vae.energy is not None:
        sd = vae.energy.torch_state_dict()
        last = f"net.{2 * (len(vae.energy.layers) - 1)}"
        sd[f"{last}.weight"] *= tilt
        sd[f"{last}.bias"] *= tilt
        vae.load_torch_state_dicts(energy=sd)
    return vae


@pytest.mark.parametrize("prior", ["gaussian", "ebm"])
def test_importance_weighted_log_likelihood_matches_quadrature(prior):
    """Eight independent estimates per datum (importance samples and AIS chains re-drawn): their mean is within 5
    of its standard errors (from the eight) of the quadrature value."""
    vae = well_posed(vae_ebm.build(1, image_shape=SHAPE, hidden=(8,), prior=prior, energy_hidden=32, seed=3))
    x = binary(6, seed=1)
    settings = dict(num_samples=2000, log_z_chains=2000, log_z_steps=50)
    outs = [vae_ebm.log_likelihood(vae, x, seed=s, **settings) for s in range(8)]
    est = np.stack([out["per_datum"] for out in outs])
    exact = quadrature_log_likelihood(vae, x)
    se = est.std(0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(est.mean(0) - exact) < 5 * se + 1e-4), (est.mean(0) - exact, se)
    out = outs[0]
    assert out["n"] == 6 and out["stderr"] >= out["data_stderr"] > 0
    assert (out["log_z_stderr"] > 0) == (prior == "ebm")
    assert out["log_z_chains"] == (2000 if prior == "ebm" else 0) and out["num_samples"] == 2000
    # the same seed gives the same numbers; the batch size changes only which draws each datum gets
    np.testing.assert_array_equal(vae_ebm.log_likelihood(vae, x, seed=0, **settings)["per_datum"], out["per_datum"])
    assert vae_ebm.log_likelihood(vae, x, batch_size=4, **settings)["per_datum"].shape == (6,)
    with pytest.raises(ValueError, match="x must be finite"):
        vae_ebm.log_likelihood(vae, jnp.full((2,) + SHAPE, jnp.nan))
    with pytest.raises(ValueError, match="x must be finite"):
        vae_ebm.log_likelihood(vae, jnp.zeros((2, 3, 3, 1)))
