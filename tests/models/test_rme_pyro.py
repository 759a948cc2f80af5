"""tilted_priors.models.pyro.rme: the mixture proposal is the guide's density, and with one component the RME is the VAE."""
import numpy as np
import pyro
import pytest
import torch

from tilted_priors.inference.pyro import fit_recursive
from tilted_priors.models.pyro import rme, vae_ebm


pytestmark = pytest.mark.usefixtures("fresh_pyro")


X = torch.as_tensor((np.random.default_rng(0).random((6, 28, 28, 1)) < 0.3).astype(np.float32))


def test_proposal_density_is_the_guides():
    model = rme.build(3, latent_dim=2, hidden=(8,), mixing_hidden=4)
    tr = pyro.poutine.trace(model.guide).get_trace(X)
    z = tr.nodes["z"]["value"]
    torch.testing.assert_close(model.proposal(X).log_prob(z), tr.nodes["z"]["fn"].log_prob(z))


def test_mixing_starts_with_equal_weights():
    model = rme.build(4, latent_dim=2, hidden=(8,), mixing_hidden=4)
    for m in range(1, 5):
        model.guide.num_active = m
        torch.testing.assert_close(model.guide.log_weights(X).exp(), torch.full((6, m), 1.0 / m))


def test_one_component_is_the_vae():
    model = rme.build(1, latent_dim=2, hidden=(8,))
    vae = vae_ebm.build(2, hidden=(8,), prior="gaussian")
    for a, b in zip(model.vae.encoder.parameters(), vae.encoder.parameters()):
        torch.testing.assert_close(a, b)
    z = torch.randn(6, 2)
    loc, scale = model.vae.encoder(X)
    torch.testing.assert_close(model.proposal(X).log_prob(z), pyro.distributions.Normal(loc, scale).to_event(1)
                               .log_prob(z))
    assert rme.log_likelihood(model, X, num_samples=5)["per_datum"].shape == (6,)


def test_warm_start_and_a_frozen_decoder_after_stage_one():
    model = rme.build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
    lr, seen = 1e-2, []
    fit_recursive(model.model, model.guide, X.numpy(), [3, 1], batch_size=3, lr=[lr, {"decoder": 0.0, "": lr}],
                  warm_start=True, progress=False,
                  callback=lambda record: seen.append([p.detach().clone() for p in model.vae.decoder.parameters()]))
    for a, b in zip(seen[2], seen[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # frozen in stage 2
    for old, new in zip(model.encoders[0].parameters(), model.encoders[1].parameters()):
        assert (new - old).abs().max() <= lr * (1 + 1e-3)  # started there, then one Adam step
