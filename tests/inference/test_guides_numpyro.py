"""ShortRunPosterior (NumPyro): SVI with it gives exactly the LEBM gradient of a hand-written step."""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO

from tilted_priors.inference.numpyro.guides import ShortRunPosterior
from tilted_priors.inference.numpyro.handlers import normalizer, sampler
from tilted_priors.numpyro import Contrastive, EnergyTiltedNormal, MALA, ShortRunLangevin, Unnormalized

N, D, P, SD, H = 6, 2, 3, 0.3, 0.1
rng = np.random.default_rng(0)
PARAMS = {"Wa": jnp.asarray(rng.normal(size=(D, 8))), "va": jnp.asarray(rng.normal(size=8)),
          "Wg": jnp.asarray(rng.normal(size=(D, P))), "bg": jnp.asarray(rng.normal(size=P))}


def energy_fn(p, z):
    return jnp.tanh(z @ p["Wa"]) @ p["va"]


class FixedSamples:
    def __init__(self, z):
        self.z = z

    def run(self, rng_key, log_density, init, **kwargs):
        return jnp.broadcast_to(self.z, init.shape)

    def __hash__(self):
        return id(self)


def make_model(z_neg):
    def model(x, index=None):
        p = {k: numpyro.param(k, v) for k, v in PARAMS.items()}
        with numpyro.plate("data", x.shape[0]):
            prior = EnergyTiltedNormal(lambda z: energy_fn(p, z), jnp.zeros(D), jnp.ones(D),
                                       normalizer=Contrastive(sampler=FixedSamples(z_neg)))
            z = numpyro.sample("z", prior)
            numpyro.sample("x", dist.Normal(z @ p["Wg"] + p["bg"], SD).to_event(1), obs=x)
    return model


def start_guide(z0):
    def start(x, index=None):
        with numpyro.plate("data", x.shape[0]):
            return numpyro.sample("z", dist.Delta(z0, event_dim=1))
    return start


def hand_lebm_loss(p, x, z0, z_neg, steps):
    """LEBM by hand: deterministic Langevin ascent on log p(x, z), then -[log p(x|z+) - E(z+) + E(z-)] + const."""
    def log_joint(z):
        return (dist.Normal(z @ p["Wg"] + p["bg"], SD).log_prob(x).sum() - energy_fn(p, z).sum() - 0.5 * (z * z).sum())

    z = z0
    for _ in range(steps):
        z = z + 0.5 * H * H * jax.grad(log_joint)(z)
    z = jax.lax.stop_gradient(z)
    return -(dist.Normal(z @ p["Wg"] + p["bg"], SD).log_prob(x).sum() - energy_fn(p, z).sum()
             + energy_fn(p, z_neg).sum()), z


def test_svi_loss_gradient_is_the_lebm_gradient():
    x, z0, z_neg = (jnp.asarray(rng.normal(size=s)) for s in ((N, P), (N, D), (N, D)))
    model = make_model(z_neg)
    guide = ShortRunPosterior(model, sampler=ShortRunLangevin(20, H, noise=False), init=start_guide(z0))
    loss = lambda p: Trace_ELBO().loss(jax.random.PRNGKey(1), p, model, guide, x)
    got = jax.grad(loss)(PARAMS)
    want = jax.grad(lambda p: hand_lebm_loss(p, x, z0, z_neg, 20)[0])(PARAMS)
    for k in PARAMS:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-5)
    # the recorded site is the chain's end point, a Delta inside the data plate
    tr = handlers.trace(handlers.seed(guide, 0)).get_trace(x)
    assert isinstance(tr["z"]["fn"], dist.Delta)
    assert [f.name for f in tr["z"]["cond_indep_stack"]] == ["data"]
    np.testing.assert_allclose(tr["z"]["value"], hand_lebm_loss(PARAMS, x, z0, z_neg, 20)[1], rtol=1e-5, atol=1e-6)


def test_svi_trains_in_a_jitted_update():
    model = make_model(jnp.zeros((N, D)))
    svi = SVI(model, ShortRunPosterior(model), optax.adam(1e-2), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 20, jnp.asarray(rng.normal(size=(N, P))), progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    assert set(PARAMS) <= set(result.params)
    moved = [not np.allclose(result.params[k], PARAMS[k]) for k in PARAMS]
    assert all(moved)  # both the energy's and the generator's parameters are trained


def test_persistent_chains_live_in_the_svi_state():
    model = make_model(jnp.zeros((N, D)))
    guide = ShortRunPosterior(model, sampler=ShortRunLangevin(3, H, noise=False), init="persistent", num_data=10)
    x = jnp.asarray(rng.normal(size=(N, P)))
    idx = jnp.arange(N)
    svi = SVI(model, guide, optax.sgd(0.0), Trace_ELBO())  # lr 0: parameters fixed, only the chains move
    state = svi.init(jax.random.PRNGKey(0), x, index=idx)
    state, _ = svi.update(state, x, index=idx)
    chains = state.mutable_state["short_run_posterior$chains"]
    assert bool(chains["seen"][:N].all()) and not bool(chains["seen"][N:].any())
    first = chains["chains.z"][:N]
    state, _ = svi.update(state, x, index=idx)
    second = state.mutable_state["short_run_posterior$chains"]["chains.z"][:N]
    # the second update continued from the first: the same as a fresh 3-step chain started there
    again = ShortRunPosterior(model, sampler=ShortRunLangevin(3, H, noise=False), init=start_guide(first))
    with handlers.seed(rng_seed=0):
        np.testing.assert_allclose(second, again(x)["z"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="index"):
        handlers.seed(guide, 0)(x)


def test_bad_arguments():
    model = make_model(jnp.zeros((N, D)))
    with pytest.raises(ValueError, match="init"):
        ShortRunPosterior(model, init="bogus")
    with pytest.raises(ValueError, match="num_data"):
        ShortRunPosterior(model, init="persistent")
    with pytest.raises(ValueError, match="step_size"):
        ShortRunPosterior(model, step_size=0.0)
    with pytest.raises(ValueError, match="seed"):
        ShortRunPosterior(model)(jnp.zeros((N, P)))

    def discrete():
        numpyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="real-valued"):
        handlers.seed(ShortRunPosterior(discrete), 0)()


def test_handlers_swap_sampler_and_normalizer_without_touching_the_model():
    def model():
        with numpyro.plate("p", 4):
            numpyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(D), jnp.ones(D)).to_event(0))

    with sampler(MALA(7, 0.3)), normalizer(Unnormalized()):
        tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    fn = tr["z"]["fn"]
    assert fn.sampler == MALA(7, 0.3) and isinstance(fn.normalizer, Unnormalized)
    wrapped = sampler(model, MALA(5, 0.2))
    assert handlers.trace(handlers.seed(wrapped, 0)).get_trace()["z"]["fn"].sampler == MALA(5, 0.2)
    assert isinstance(handlers.trace(handlers.seed(model, 0)).get_trace()["z"]["fn"].normalizer, Contrastive)
