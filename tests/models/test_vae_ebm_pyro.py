"""VAE-EBM (tilted_priors.models.pyro.vae_ebm): the program's sites, one model trained by each guide, and the importance-weighted
log-likelihood against quadrature on a model small enough to integrate (1-d latent, 2x2 images)."""
from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from tilted_priors.inference.pyro import RefinedGuide, ShortRunPosterior
from tilted_priors.models.pyro import vae_ebm
from tilted_priors.pyro import ShortRunLangevin

SHAPE = (2, 2, 1)


pytestmark = pytest.mark.usefixtures("fresh_pyro")


def binary(n, seed=0):
    return torch.as_tensor(np.random.default_rng(seed).integers(0, 2, size=(n,) + SHAPE), dtype=torch.float32)


def test_sites_and_parameters():
    vae = vae_ebm.build(3, image_shape=SHAPE, hidden=(8,))
    tr = pyro.poutine.trace(vae.model).get_trace(binary(4))
    assert tr.nodes["z"]["value"].shape == (4, 3)
    assert tr.nodes["x"]["fn"].event_shape == SHAPE and tr.nodes["x"]["is_observed"]
    # the prior's SelfNormalized b is declared when the prior is built, as on NumPyro
    assert {k.split("$$$")[0] for k in pyro.get_param_store()} == {"energy", "decoder", "snl_b"}
    assert vae_ebm.build(3, image_shape=SHAPE, prior="gaussian").energy is None
    with pytest.raises(ValueError, match="x must have shape"):
        vae.model(torch.zeros(4, 3, 3, 1))
    with pytest.raises(ValueError, match="prior must be"):
        vae_ebm.build(3, prior="flow")


def test_one_model_trains_with_each_guide():
    """The same ``vae.model`` under the SNELBO (AmortizedGuide), RefinedGuide and ShortRunPosterior: finite losses,
    and the encoder trains under the first two only."""
    x = binary(16)
    for label in ("amortized", "refined", "short-run"):
        pyro.clear_param_store()
        vae = vae_ebm.build(2, image_shape=SHAPE, hidden=(8,), prior_sampler=ShortRunLangevin(5, 0.4))
        guide = {"amortized": vae.guide, "refined": lambda: RefinedGuide(vae.guide(), steps=3),
                 "short-run": lambda: ShortRunPosterior(vae.model, steps=3)}[label]()
        before = [p.detach().clone() for p in vae.encoder.parameters()]
        svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        assert np.isfinite([svi.step(x) for _ in range(3)]).all(), label
        moved = any(not torch.equal(a, b) for a, b in zip(before, vae.encoder.parameters()))
        assert moved == (label != "short-run"), label
        assert "snl_b" in pyro.get_param_store(), label  # the prior's SelfNormalized, whatever the guide


def quadrature_log_likelihood(vae, x):
    """log p(x) by the trapezoid rule over the 1-d latent, log Z likewise."""
    z = torch.linspace(-9.0, 9.0, 6001).unsqueeze(-1)
    with torch.no_grad():
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 0])
        if vae.energy is not None:
            log_prior = log_prior - vae.energy(z)
        dz = float(z[1, 0] - z[0, 0])
        log_z = torch.logsumexp(log_prior, 0) + np.log(dz)
        log_lik = torch.distributions.Bernoulli(logits=vae.decoder(z).unsqueeze(1)).log_prob(x).sum((-1, -2, -3))
        return (torch.logsumexp(log_lik + log_prior.unsqueeze(-1), 0) + np.log(dz) - log_z).numpy()


@pytest.mark.parametrize("prior", ["gaussian", "ebm"])
def test_importance_weighted_log_likelihood_matches_quadrature(prior):
    """Eight independent estimates per datum (importance samples and AIS chains re-drawn): their mean is within 5
    of its standard errors (from the eight) of the quadrature value."""
    vae = vae_ebm.build(1, image_shape=SHAPE, hidden=(8,), prior=prior, seed=3)
    x = binary(6, seed=1)
    est = np.stack([vae_ebm.log_likelihood(vae, x, num_samples=2000, log_z_chains=2000, log_z_steps=50, seed=s)
                    ["per_datum"] for s in range(8)])
    exact = quadrature_log_likelihood(vae, x)
    se = est.std(0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(est.mean(0) - exact) < 5 * se + 1e-4), (est.mean(0) - exact, se)
    out = vae_ebm.log_likelihood(vae, x, num_samples=10, log_z_chains=100, log_z_steps=5)
    assert out["n"] == 6 and out["stderr"] >= out["data_stderr"] > 0
    assert (out["log_z_stderr"] > 0) == (prior == "ebm")
    with pytest.raises(ValueError, match="x must be finite"):
        vae_ebm.log_likelihood(vae, torch.full((2,) + SHAPE, float("nan")))
