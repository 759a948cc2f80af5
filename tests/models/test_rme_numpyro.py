"""tilted_priors.models.numpyro.rme: the mixture proposal is the guide's density, with one component the RME is the VAE, and
trained parameters go back into the modules."""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from tilted_priors.inference.files import unflatten_state
from tilted_priors.inference.numpyro import RecursiveMixtureGuide, fit_recursive
from tilted_priors.models.numpyro import rme, vae_ebm

X = jnp.asarray((np.random.default_rng(0).random((6, 28, 28, 1)) < 0.3).astype(np.float32))


@pytest.mark.parametrize("mixing_hidden", [4, None])
def test_proposal_density_is_the_guides(mixing_hidden):
    model = rme.build(3, latent_dim=2, hidden=(8,), mixing_hidden=mixing_hidden)
    tr = handlers.trace(handlers.seed(model.guide, 0)).get_trace(X)
    z = tr["z"]["value"]
    np.testing.assert_allclose(model.proposal(X).log_prob(z), tr["z"]["fn"].log_prob(z), rtol=1e-6)


def test_mixing_starts_with_equal_weights():
    model = rme.build(4, latent_dim=2, hidden=(8,), mixing_hidden=4)
    for m in range(1, 5):
        model.guide.num_active = m
        np.testing.assert_allclose(jnp.exp(model.guide.log_weights(X)), np.full((6, m), 1.0 / m), rtol=1e-6)


def test_one_component_is_the_vae():
    model = rme.build(1, latent_dim=2, hidden=(8,))
    vae = vae_ebm.build(2, hidden=(8,), prior="gaussian")
    for a, b in zip(jax.tree.leaves(model.vae.encoder), jax.tree.leaves(vae.encoder)):
        np.testing.assert_array_equal(a, b)
    z = jax.random.normal(jax.random.PRNGKey(1), (6, 2))
    loc, scale = vae.encoder(X)
    np.testing.assert_allclose(model.proposal(X).log_prob(z), dist.Normal(loc, scale).to_event(1).log_prob(z),
                               rtol=1e-6)
    assert rme.log_likelihood(model, X, num_samples=5)["per_datum"].shape == (6,)


def test_with_params_puts_every_trained_module_back():
    model = rme.build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
    stages = fit_recursive(model.model, model.guide, np.asarray(X), 3, batch_size=3, lr=1e-2, progress=False)
    trained = model.with_params(stages[-1].params)
    assert trained.guide.num_active == 2 and trained.vae.encoder is trained.encoders[0]
    # the trained proposal differs from the initial one, and equals the guide's density under the trained params
    guide = handlers.substitute(model.guide, data=_nested(stages[-1].params))
    tr = handlers.trace(handlers.seed(guide, 0)).get_trace(X)
    z = tr["z"]["value"]
    np.testing.assert_allclose(trained.proposal(X).log_prob(z), tr["z"]["fn"].log_prob(z), rtol=1e-5)
    assert not np.allclose(model.proposal(X).log_prob(z), trained.proposal(X).log_prob(z))
    decoded = trained.vae.decoder(z)
    assert not np.allclose(model.vae.decoder(z), decoded)


def _nested(flat):
    return unflatten_state({k: jnp.asarray(v) for k, v in flat.items()}, int_keys=True)


def test_warm_start_and_a_frozen_decoder_after_stage_one():
    model = rme.build(2, latent_dim=2, hidden=(8,), mixing_hidden=4)
    lr = 1e-2
    stages = fit_recursive(model.model, model.guide, np.asarray(X), [3, 1], batch_size=3, lr=[lr, {"decoder": 0.0,
                           "": lr}], warm_start=True, progress=False)
    first, second = stages[0].params, stages[1].params
    for key, value in first.items():
        if key.startswith("decoder$params"):
            np.testing.assert_array_equal(second[key], value)  # frozen in stage 2
        if key.startswith("rme.component0$params"):
            new = second[key.replace("component0", "component1")]
            assert np.abs(new - value).max() <= lr * (1 + 1e-3)  # started there, then one Adam step
    with pytest.raises(TypeError, match="Flax NNX modules"):
        plain = RecursiveMixtureGuide(model.model, [model.encoders[0], lambda x, **kw: model.encoders[1](x)])
        fit_recursive(model.model, plain, np.asarray(X), 1, batch_size=3, warm_start=True, progress=False)
