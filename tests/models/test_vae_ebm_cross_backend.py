"""VAE-EBM across backends: with the Pyro model's weights copied into the NumPyro one (``load_torch_state_dicts``)
the networks, the program's per-site log densities (normaliser off, conditioned on the same z) and the
importance-weighted log-likelihood agree (the first two to float32 rounding, the last within Monte Carlo error)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pyro
import pytest
import torch
from numpyro import handlers
from numpyro.infer.util import log_density

from tilted_priors.inference.numpyro.handlers import normalizer as numpyro_normalizer
from tilted_priors.inference.pyro.handlers import normalizer as pyro_normalizer
from tilted_priors.models.numpyro import vae_ebm as nvae
from tilted_priors.models.pyro import vae_ebm as pvae
from tilted_priors.numpyro import Unnormalized as NumPyroUnnormalized
from tilted_priors.pyro import Unnormalized as PyroUnnormalized

SHAPE = (2, 2, 1)
LATENT = 3
RTOL, ATOL = 1e-5, 1e-6  # float32 on both sides


pytestmark = pytest.mark.usefixtures("fresh_pyro")


def twins(prior="ebm", latent_dim=LATENT, widen=None, tilt=1.0, likelihood="bernoulli"):
    """The Pyro VAE and a NumPyro VAE holding the same weights. ``widen``: set the encoder's scale head to that
    constant (bounded importance weights); ``tilt``: multiply the energy's output layer."""
    kwargs = dict(image_shape=SHAPE, hidden=(8,), prior=prior, energy_hidden=8, energy_depth=3, likelihood=likelihood)
    p = pvae.build(latent_dim, seed=1, **kwargs)
    n = nvae.build(latent_dim, seed=2, **kwargs)  # another seed: every weight must come from the copy
    with torch.no_grad():
        if widen is not None:
            last = p.encoder.net[-1]
            last.weight[latent_dim:] = 0.0
            last.bias[latent_dim:] = float(np.log(np.expm1(widen - 1e-4)))
        if p.energy is not None:
            p.energy.net[-1].weight.mul_(tilt)
            p.energy.net[-1].bias.mul_(tilt)
    n.load_torch_state_dicts(encoder=p.encoder.state_dict(), decoder=p.decoder.state_dict(),
                             energy=None if p.energy is None else p.energy.state_dict())
    return p, n


def data(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, size=(n,) + SHAPE).astype(np.float32),
            rng.standard_normal((n, LATENT)).astype(np.float32))


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=RTOL, atol=ATOL)


def test_both_backends_initialise_like_torch():
    """Every NumPyro weight lies within torch's bound 1/sqrt(fan_in) (kernel and bias), as the Pyro twin's."""
    _, n = twins()
    fresh_vae = nvae.build(LATENT, image_shape=SHAPE, hidden=(8,), energy_hidden=8)
    for module in (fresh_vae.encoder, fresh_vae.decoder, fresh_vae.energy):
        for layer in module.layers:
            bound = 1.0 / np.sqrt(layer.kernel.get_value().shape[0])
            for w in (layer.kernel.get_value(), layer.bias.get_value()):
                assert float(jnp.abs(w).max()) <= bound and float(jnp.abs(w).max()) > 0.5 * bound
    sd = n.encoder.torch_state_dict()  # round trip into the torch layout
    p2 = pvae.Encoder(LATENT, SHAPE, (8,))
    p2.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
    x, _ = data()
    close(p2(torch.as_tensor(x))[0].detach(), n.encoder(x)[0])


def test_networks_agree():
    p, n = twins()
    x, z = data()
    with torch.no_grad():
        loc, scale = p.encoder(torch.as_tensor(x))
        close(loc, n.encoder(x)[0])
        close(scale, n.encoder(x)[1])
        close(p.decoder(torch.as_tensor(z)), n.decoder(z))
        zz = np.stack([z, 2 * z])  # extra batch dimension
        close(p.decoder(torch.as_tensor(zz)), n.decoder(zz))
        close(p.energy(torch.as_tensor(zz)), n.energy(zz))


@pytest.mark.parametrize("prior, likelihood", [("ebm", "bernoulli"), ("gaussian", "bernoulli"), ("ebm", "gaussian")])
def test_model_log_densities_agree(prior, likelihood):
    """Per-site log densities of the program, conditioned on the same z, every tilted normaliser switched off
    (``log p(z) = -E(z) + log N(z; 0, I)``; ``log p(x | z)`` Bernoulli or Gaussian), and their sum."""
    p, n = twins(prior, tilt=10.0, likelihood=likelihood)
    x, z = data()

    model = pyro.poutine.condition(pyro_normalizer(p.model, PyroUnnormalized()), data={"z": torch.as_tensor(z)})
    tr = pyro.poutine.trace(model).get_trace(torch.as_tensor(x))
    tr.compute_log_prob()
    p_sites = {name: tr.nodes[name]["log_prob"].detach() for name in ("z", "x")}
    p_joint = float(tr.log_prob_sum().detach())

    model = handlers.condition(numpyro_normalizer(n.model, NumPyroUnnormalized()), data={"z": jnp.asarray(z)})
    ntr = handlers.trace(handlers.seed(model, 0)).get_trace(jnp.asarray(x))
    n_sites = {name: ntr[name]["fn"].log_prob(ntr[name]["value"]) for name in ("z", "x")}
    n_joint, _ = log_density(model, (jnp.asarray(x),), {}, {})

    for name in ("z", "x"):
        assert n_sites[name].shape == (len(x),)
        close(p_sites[name], n_sites[name])
    close(p_joint, n_joint)
    # the prior's term by hand: -E(z) + log N(z; 0, I)
    expected = -0.5 * (z ** 2).sum(-1) - 0.5 * LATENT * np.log(2 * np.pi)
    if prior == "ebm":
        expected = expected - np.asarray(n.energy(z))
    close(n_sites["z"], expected)
    if likelihood == "gaussian":  # log N(x; sigmoid(decoder(z)), 0.1^2) by hand
        mean = 1.0 / (1.0 + np.exp(-np.asarray(n.decoder(z), np.float64)))
        by_hand = (-0.5 * ((x - mean) / 0.1) ** 2 - np.log(0.1 * np.sqrt(2 * np.pi))).reshape(len(x), -1).sum(-1)
        close(n_sites["x"], by_hand)


@pytest.mark.parametrize("prior", ["gaussian", "ebm"])
def test_log_likelihood_agrees_within_monte_carlo_error(prior):
    """Four seeds on each backend: the mean estimates per datum agree within 5 combined standard errors (both
    estimators have the same law: the same proposal, K and AIS settings), and so do the AIS estimates of log Z."""
    p, n = twins(prior, latent_dim=1, widen=1.5, tilt=10.0)
    x, _ = data(6, seed=1)
    settings = dict(num_samples=2000, log_z_chains=1000, log_z_steps=20)
    p_out = [pvae.log_likelihood(p, x, seed=s, **settings) for s in range(4)]
    n_out = [nvae.log_likelihood(n, x, seed=s, **settings) for s in range(4)]
    p_est, n_est = (np.stack([o["per_datum"] for o in outs]) for outs in (p_out, n_out))
    se = np.hypot(p_est.std(0, ddof=1), n_est.std(0, ddof=1)) / 2.0  # sqrt(var_p / 4 + var_n / 4)
    assert np.all(np.abs(p_est.mean(0) - n_est.mean(0)) < 5 * se + 1e-4), (p_est.mean(0) - n_est.mean(0), se)
    if prior == "ebm":
        p_z, n_z = (np.array([o["log_z"] for o in outs]) for outs in (p_out, n_out))
        z_se = np.hypot(p_z.std(ddof=1), n_z.std(ddof=1)) / 2.0
        assert abs(p_z.mean() - n_z.mean()) < 5 * z_se + 1e-4, (p_z, n_z)
        assert abs(n_z.mean()) > 0.05  # the tilt is felt
    for key in ("n", "num_samples", "log_z_chains"):
        assert p_out[0][key] == n_out[0][key]
    assert set(p_out[0]) == set(n_out[0])
