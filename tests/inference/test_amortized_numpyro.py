"""AmortizedGuide (NumPyro): the SNELBO on the quadratic closed form, b -> log Z, plates, errors, training."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from flax import nnx
from jax.tree_util import Partial
from numpyro import handlers
from numpyro.contrib.module import nnx_module
from numpyro.infer import SVI, Trace_ELBO
from scipy.special import logsumexp
from scipy.stats import norm

from helpers import _jax_quadratic_energy, make_case
from tilted_priors.inference.numpyro import AmortizedGuide, RefinedGuide, ShortRunPosterior
from tilted_priors.inference.numpyro.handlers import normalizer
from tilted_priors.numpyro import (MALA, Contrastive, EnergyMLP, EnergyTiltedNormal, SelfNormalized,
                                   ShortRunLangevin, Unnormalized)

CASE = make_case(dim=2, seed=5)  # log Z = 0.555: the bound at b = 0 is loose by Z - 1 - log Z = 0.187 per datum
D, N, SIGMA = 2, 8, 0.7
ENERGY = Partial(_jax_quadratic_energy, jnp.asarray(CASE.A, jnp.float32), jnp.asarray(CASE.b, jnp.float32))
LOC, SCALE = jnp.asarray(CASE.loc, jnp.float32), jnp.asarray(CASE.scale, jnp.float32)
X = jnp.asarray(np.random.default_rng(0).normal(CASE.mean, 1.0, size=(N, D)), jnp.float32)


def quadratic_model(normalizer_):
    """z ~ the tilted prior of CASE (a Gaussian in closed form) in a data plate, x ~ N(z, SIGMA^2 I)."""
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", EnergyTiltedNormal(ENERGY, LOC, SCALE, normalizer=normalizer_))
            numpyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x)
    return model


def fixed_encoder(x):
    return 0.5 * x + 0.2, jnp.full_like(x, 0.6)


def log_normal(v, loc, scale):
    return norm.logpdf(np.asarray(v, np.float64), np.asarray(loc, np.float64), np.asarray(scale, np.float64)).sum(-1)


def hand_elbo(x, z, log_z_term):
    """sum over data of log N(x|z) + (-E(z) + log N(z; loc, scale)) - log_z_term - log q(z|x), in float64."""
    z = np.asarray(z, np.float64)
    q_loc, q_scale = fixed_encoder(x)
    return float(np.sum(log_normal(x, z, SIGMA) - CASE.energy_np(z) + log_normal(z, CASE.loc, CASE.scale)
                        - log_z_term - log_normal(z, q_loc, q_scale)))


def traces_as_in_trace_elbo(key, params, model, guide, *args):
    """The guide's and model's traces exactly as ``Trace_ELBO`` (one particle) makes them from ``key``."""
    model_seed, guide_seed = jax.random.split(key)
    guide_trace = handlers.trace(handlers.substitute(handlers.seed(guide, guide_seed), data=params)).get_trace(*args)
    model = handlers.replay(handlers.seed(model, model_seed), guide_trace)
    model_trace = handlers.trace(handlers.substitute(model, data=params)).get_trace(*args)
    return guide_trace, model_trace


# --- 1. the SNELBO identity ----------------------------------------------------------------------------------
def test_trace_elbo_is_the_snelbo_computed_by_hand():
    num_samples = 64 * N
    model = quadratic_model(SelfNormalized(num_samples, name="b"))
    guide = AmortizedGuide(model, fixed_encoder)
    params = {"b": jnp.asarray(0.3)}
    key = jax.random.PRNGKey(3)
    loss = Trace_ELBO().loss(key, params, model, guide, X)

    guide_trace, model_trace = traces_as_in_trace_elbo(key, params, model, guide, X)
    z = guide_trace["z"]["value"]
    assert z.shape == (N, D) and np.array_equal(model_trace["z"]["value"], z)
    # Zhat from the prior's own draws: num_samples / N base draws per datum, with the key the prior drew at build
    prior = model_trace["z"]["fn"]
    draws = np.asarray(prior.base.sample(prior.rng_key, (num_samples // N,)), np.float64)
    log_z_hat = logsumexp(-CASE.energy_np(draws), 0) - math.log(num_samples // N)
    bound = 0.3 + np.exp(log_z_hat - 0.3) - 1.0  # b + exp(-b) Zhat - 1 per datum
    np.testing.assert_allclose(-float(loss), hand_elbo(X, z, bound), rtol=1e-5, atol=1e-3)


def test_snelbo_is_below_the_exact_elbo_by_the_bound_gap():
    """b = 0 != log Z: SNELBO - ELBO(exact log Z) = -sum_n (b + e^-b Zhat_n - 1 - log Z), mean -N (Z - 1 - log Z)."""
    per_datum = 4096
    model = quadratic_model(SelfNormalized(per_datum * N, name="b"))
    guide = AmortizedGuide(model, fixed_encoder)
    params = {"b": jnp.asarray(0.0)}
    snelbo = jax.jit(lambda key: -Trace_ELBO().loss(key, params, model, guide, X))
    diffs = []
    for key in jax.random.split(jax.random.PRNGKey(0), 24):
        z = traces_as_in_trace_elbo(key, params, model, guide, X)[0]["z"]["value"]
        diffs.append(float(snelbo(key)) - hand_elbo(X, z, CASE.log_z))
    diffs = np.asarray(diffs)
    gap = N * (math.exp(CASE.log_z) - 1.0 - CASE.log_z)
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert gap > 10 * se  # the gap is resolved
    assert abs(diffs.mean() + gap) < 4 * se + 1e-3, (diffs.mean(), -gap, se)


# --- 2. b learns log Z ----------------------------------------------------------------------------------------
class GaussianEncoder(nnx.Module):
    """loc = Linear(x); scale = exp(a learned vector), the same for every datum."""

    def __init__(self, p: int, d: int, rngs: nnx.Rngs):
        self.loc = nnx.Linear(p, d, rngs=rngs)
        self.log_scale = nnx.Param(jnp.full((d,), -1.0))

    def __call__(self, x):
        loc = self.loc(x)
        return loc, jnp.broadcast_to(jnp.exp(self.log_scale[...]), loc.shape)


def test_b_tracks_log_z_during_training():
    """The SNELBO's b is driven to log Z (the minimiser of E[b + e^-b Zhat - 1] = b + e^-b Z - 1), energy fixed."""
    model = quadratic_model(SelfNormalized(1024 * N, name="b"))
    guide = AmortizedGuide(model, GaussianEncoder(D, D, nnx.Rngs(0)))
    svi = SVI(model, guide, optax.adam(optax.exponential_decay(0.05, 300, 0.1)), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), X)
    update = jax.jit(svi.update)
    distance = [abs(float(svi.get_params(state)["b"]) - CASE.log_z)]
    for _ in range(300):
        state, loss = update(state, X)
        distance.append(abs(float(svi.get_params(state)["b"]) - CASE.log_z))
    distance = np.asarray(distance)
    assert np.isfinite(float(loss))
    # b starts at 0, walks to log Z (Adam: about lr per step), then stays within the noise of Zhat
    assert distance[0] > 0.5 and distance[0] > distance[5] > distance[10], distance[:11]
    assert distance[-1] < 0.03 and distance[-100:].mean() < 0.02, distance[-100:]  # 8 seeds: <= 0.007, 0.011
    assert distance[-100:].mean() < distance[:100].mean() / 3


# --- 3. plates ------------------------------------------------------------------------------------------------
def frames(site):
    return [(f.name, f.dim, f.size) for f in site["cond_indep_stack"]]


def test_guide_sites_sit_in_the_model_plates():
    def model(x):
        g = numpyro.sample("g", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with numpyro.plate("groups", 3, dim=-2), numpyro.plate("data", 4, dim=-1):
            z = numpyro.sample("z", EnergyTiltedNormal(ENERGY, LOC, SCALE, normalizer=Unnormalized()))
            numpyro.sample("x", dist.Normal(z + g, SIGMA).to_event(1), obs=x)

    def encoder(x):
        return {"g": (x.mean((0, 1)), jnp.ones(D)), "z": (x, jnp.full_like(x, 0.5))}

    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, D)), jnp.float32)
    guide = AmortizedGuide(model, encoder)
    guide_trace, model_trace = traces_as_in_trace_elbo(jax.random.PRNGKey(0), {}, model, guide, x)
    for name in ("g", "z"):
        assert frames(guide_trace[name]) == frames(model_trace[name])
        assert guide_trace[name]["fn"].event_dim == model_trace[name]["fn"].event_dim
    assert frames(guide_trace["z"]) == [("data", -1, 4), ("groups", -2, 3)]
    assert guide_trace["z"]["value"].shape == (3, 4, D)
    assert np.isfinite(float(Trace_ELBO().loss(jax.random.PRNGKey(1), {}, model, guide, x)))


def test_subsampled_plate_same_subsample_and_scale():
    size, batch = 20, 5
    x = jnp.asarray(np.random.default_rng(2).normal(size=(size, D)), jnp.float32)

    def model(x):
        with numpyro.plate("data", size, subsample_size=batch) as idx:
            z = numpyro.sample("z", EnergyTiltedNormal(ENERGY, LOC, SCALE, normalizer=Unnormalized()))
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z + w[:, None], SIGMA).to_event(1), obs=x[idx])

    full_loc = jnp.arange(size * D, dtype=jnp.float32).reshape(size, D)

    def encoder(x):  # full-size outputs: the guide takes the subsample's rows
        return {"z": (full_loc, jnp.ones((size, D))), "w": (full_loc[:, 0], jnp.ones(size))}

    guide = AmortizedGuide(model, encoder)
    guide_trace, model_trace = traces_as_in_trace_elbo(jax.random.PRNGKey(0), {}, model, guide, x)
    idx = guide_trace["data"]["value"]
    assert idx.shape == (batch,) and np.array_equal(model_trace["data"]["value"], idx)
    for name in ("z", "w"):
        assert guide_trace[name]["scale"] == model_trace[name]["scale"] == size / batch
        assert frames(guide_trace[name]) == frames(model_trace[name]) == [("data", -1, batch)]
    # both sites use the subsample the model replays (the plate is entered once per site)
    np.testing.assert_array_equal(guide_trace["z"]["fn"].base_dist.loc, full_loc[idx])
    np.testing.assert_array_equal(guide_trace["w"]["fn"].loc, full_loc[idx, 0])
    loss = jax.jit(lambda key: Trace_ELBO().loss(key, {}, model, guide, x))(jax.random.PRNGKey(1))
    assert np.isfinite(float(loss))


class CountingSampler:
    """A prior sampler that counts its runs (the guide's structure trace must not run the prior's chains)."""

    runs = 0

    def run(self, rng_key, log_density, init, **kwargs):
        CountingSampler.runs += 1
        return init


def test_structure_trace_is_abstract_cheap_and_cached():
    calls = []

    def model(x):
        calls.append(type(x).__name__)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", EnergyTiltedNormal(ENERGY, LOC, SCALE, sampler=CountingSampler(),
                                                   normalizer=SelfNormalized(8, name="b")))

    guide = AmortizedGuide(model, fixed_encoder)
    CountingSampler.runs = 0
    for x in (X, X + 1.0, X[:4], X):
        tr = handlers.trace(handlers.seed(guide, 0)).get_trace(x)
        assert set(tr) == {"data", "z"} and tr["z"]["value"].shape == x.shape  # no "b": the model's param
    assert len(calls) == 2 and all("Tracer" in c for c in calls)  # once per argument shape, abstractly
    assert CountingSampler.runs == 0

    def sized_by_value(n):  # a plate sized by an argument's value: traced with the values, outside jit only
        with numpyro.plate("data", int(n)):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    guide = AmortizedGuide(sized_by_value, lambda n: (jnp.zeros(int(n)), jnp.ones(int(n))))
    assert handlers.seed(guide, 0)(jnp.asarray(3))["z"].shape == (3,)


# --- 4. errors ------------------------------------------------------------------------------------------------
def test_errors():
    model = quadratic_model(Unnormalized())
    seeded = lambda guide: handlers.seed(guide, 0)  # noqa: E731
    with pytest.raises(ValueError, match=r"loc for site 'z' has shape \(8, 3\).*\(8, 2\)"):
        seeded(AmortizedGuide(model, lambda x: (jnp.zeros((N, D + 1)), jnp.ones((N, D)))))(X)
    with pytest.raises(ValueError, match=r"scale for site 'z' must be positive.*softplus"):
        seeded(AmortizedGuide(model, lambda x: (x, jnp.zeros_like(x))))(X)
    with pytest.raises(ValueError, match="scale for site 'z' must be positive"):
        seeded(AmortizedGuide(model, lambda x: (x, jnp.full_like(x, jnp.nan))))(X)
    with pytest.raises(ValueError, match="seed"):
        AmortizedGuide(model, fixed_encoder)(X)
    with pytest.raises(TypeError, match="must return"):
        seeded(AmortizedGuide(model, lambda x: x))(X)
    with pytest.raises(ValueError, match="'x'.*not a latent"):
        seeded(AmortizedGuide(model, fixed_encoder, sites="x"))(X)

    def two_latents(x):
        s = numpyro.sample("s", dist.Normal(0.0, 1.0))
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        numpyro.sample("x", dist.Normal(z + s, 1.0).to_event(1), obs=x[0])

    one = lambda x: (jnp.zeros(D), jnp.ones(D))  # noqa: E731
    with pytest.raises(ValueError, match=r"latent sites \['s'\] are not covered"):
        seeded(AmortizedGuide(two_latents, one, sites="z"))(X)
    with pytest.raises(ValueError, match="dict"):
        seeded(AmortizedGuide(two_latents, one))(X)

    def constrained(x):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("x", dist.Normal(0.0, s), obs=x)

    with pytest.raises(ValueError, match="'s' has support.*real line"):
        seeded(AmortizedGuide(constrained, lambda x: (jnp.zeros(()), jnp.ones(()))))(X)
    with pytest.raises(ValueError, match="sites"):
        AmortizedGuide(model, fixed_encoder, sites=[])
    with pytest.raises(TypeError, match="encoder"):
        AmortizedGuide(model, None)


# --- 5. training recovers a known posterior mean ---------------------------------------------------------------
def test_training_recovers_the_posterior_mean_of_a_linear_gaussian_model():
    """Prior N(m0, S0) (CASE's tilted prior in closed form), x ~ N(W z, s^2 I): the posterior mean is linear in x,
    and a mean-field Gaussian fitted to a Gaussian posterior has its exact mean and variances 1 / diag(precision)."""
    p, s, n = 3, 0.5, 32
    rng = np.random.default_rng(3)
    W = jnp.asarray(rng.normal(size=(D, p)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, p)), jnp.float32)

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", EnergyTiltedNormal(ENERGY, LOC, SCALE, normalizer=Unnormalized()))
            numpyro.sample("x", dist.Normal(z @ W, s).to_event(1), obs=x)

    guide = AmortizedGuide(model, GaussianEncoder(p, D, nnx.Rngs(1)))
    # a decaying rate and 16 particles: the final iterate sits within about 0.01 of the optimum
    svi = SVI(model, guide, optax.adam(optax.exponential_decay(0.05, 1500, 0.003)), Trace_ELBO(num_particles=16))
    result = svi.run(jax.random.PRNGKey(0), 1500, x, progress_bar=False)
    assert np.all(np.isfinite(result.losses))

    Wn = np.asarray(W, np.float64)
    precision = CASE.precision + Wn @ Wn.T / s ** 2
    xn = np.asarray(x, np.float64)
    mean = np.linalg.solve(precision, (CASE.precision @ CASE.mean)[:, None] + Wn @ xn.T / s ** 2).T
    fitted = handlers.substitute(handlers.seed(guide, 0), data=result.params)
    q = handlers.trace(fitted).get_trace(x)["z"]["fn"].base_dist
    np.testing.assert_allclose(q.loc, mean, atol=0.03)
    np.testing.assert_allclose(q.scale[0], 1.0 / np.sqrt(np.diag(precision)), rtol=0.02)


# --- 6. one model, many guides ---------------------------------------------------------------------------------
LATENT, PIXELS = 2, 6


class Decoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden, self.out = nnx.Linear(LATENT, 8, rngs=rngs), nnx.Linear(8, PIXELS, rngs=rngs)

    def __call__(self, z):
        return jnp.tanh(self.out(jax.nn.gelu(self.hidden(z))))


class MLPEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(PIXELS, 8, rngs=rngs)
        self.loc, self.scale = nnx.Linear(8, LATENT, rngs=rngs), nnx.Linear(8, LATENT, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.gelu(self.hidden(x))
        return self.loc(h), jax.nn.softplus(self.scale(h)) + 1e-3


def bind(name, module):
    """The module with the values of its param site (a pytree energy: compiled prior chains are reused)."""
    graphdef, state, rest = nnx.split(module, nnx.Param, nnx.Not(nnx.Param))
    nnx.replace_by_pure_dict(state, nnx_module(name, module).args[0])
    return nnx.merge(graphdef, state, rest)


@pytest.mark.slow  # trains the model with each guide
def test_one_model_many_guides():
    energy, decoder = EnergyMLP(LATENT, 8, rngs=0), Decoder(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(decoder, nnx.Param)))

    def model(x):  # LEBM-like; the default (Contrastive) normalizer, a short prior chain to keep the test cheap
        e, g = bind("energy", energy), bind("decoder", decoder)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", EnergyTiltedNormal(e, jnp.zeros(LATENT), jnp.ones(LATENT),
                                                       sampler=ShortRunLangevin(5, 0.4)))
            numpyro.sample("x", dist.Normal(g(z), 0.3).to_event(1), obs=x)

    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, size=(16, PIXELS)), jnp.float32)
    encoder = MLPEncoder(nnx.Rngs(2))
    initial = {f"{k}$params": jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
               for k, m in (("energy", energy), ("decoder", decoder), ("encoder", encoder))}
    guides = {
        "short-run": (model, ShortRunPosterior(model, steps=2)),
        "amortized": (model, AmortizedGuide(model, encoder)),
        "short-run from amortized": (model, ShortRunPosterior(model, steps=2, init=AmortizedGuide(model, encoder))),
        # the SNELBO: the same model with its normalizer swapped by a handler
        "amortized, SNELBO": (normalizer(model, SelfNormalized(64, name="b")), AmortizedGuide(model, encoder)),
        # short-run chains from the encoder's draw, the encoder trained on its own ELBO
        "refined": (model, RefinedGuide(AmortizedGuide(model, encoder), steps=2)),
    }
    for label, (m, guide) in guides.items():
        result = SVI(m, guide, optax.adam(1e-3), Trace_ELBO()).run(jax.random.PRNGKey(0), 2, x, progress_bar=False)
        assert np.all(np.isfinite(result.losses)), label
        assert {"energy$params", "decoder$params"} <= set(result.params), label
        if label.startswith("amortized"):
            assert "encoder$params" in result.params, label
        if label == "amortized, SNELBO":
            assert "b" in result.params
        changed = {k for k, v in initial.items() if k in result.params
                   and any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v),
                                                                    jax.tree.leaves(result.params[k])))}
        # the encoder learns as the guide (RefinedGuide: on its own ELBO); as the chains' start it is only read
        trained = label.startswith("amortized") or label == "refined"
        assert changed == {"energy$params", "decoder$params"} | ({"encoder$params"} if trained else set()), label
    # the model is unchanged: its prior keeps its normalizer, the modules keep their weights (no tracers leaked)
    tr = handlers.trace(handlers.seed(model, 0)).get_trace(x)
    assert isinstance(tr["z"]["fn"].normalizer, Contrastive)
    after = nnx.to_pure_dict(nnx.state(decoder, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
    assert all(isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
               for leaf in jax.tree.leaves(nnx.state(encoder, nnx.Param)))


# --- 7. RefinedGuide (Hoffman 2017) ----------------------------------------------------------------------------
W0 = 1.3
_enc = np.random.default_rng(6)
# scales about 0.3-0.7: whitened steps of 0.5 stay well inside ULA's stability range (h^2 scale^2 precision < 4)
ENCODER_PARAMS = {"enc_w": jnp.asarray(0.2 * _enc.normal(size=(D, 2 * D)), jnp.float32),
                  "enc_c": jnp.asarray(np.r_[0.1 * _enc.normal(size=D), np.full(D, -0.5)], jnp.float32)}


def linear_gaussian_model():
    """z ~ the case's tilted prior (normalizer off: log p~ is the model's log density), x ~ N(w * z, SIGMA^2 I)."""
    def model(x):
        w = numpyro.param("w", jnp.full((D,), W0))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", EnergyTiltedNormal(ENERGY, LOC, SCALE, normalizer=Unnormalized()))
            numpyro.sample("x", dist.Normal(w * z, SIGMA).to_event(1), obs=x)
    return model


def linear_encoder(x):
    """x -> (W x + c, softplus(V x + e)), its weights numpyro.param sites of the guide."""
    loc, raw = jnp.split(x @ numpyro.param("enc_w", ENCODER_PARAMS["enc_w"])
                         + numpyro.param("enc_c", ENCODER_PARAMS["enc_c"]), 2, axis=-1)
    return loc, jax.nn.softplus(raw) + 1e-4


def log_joint_by_hand(w, x, z):
    """log p~(x, z) = log N(x; w z, SIGMA^2) - E(z) + log N(z; loc, scale), summed over the data."""
    return (dist.Normal(w * z, SIGMA).log_prob(x).sum() - ENERGY(z).sum()
            + dist.Normal(LOC, SCALE).log_prob(z).sum())


def test_refined_guide_trains_the_model_on_refined_draws_and_the_encoder_on_its_elbo():
    """One Trace_ELBO gradient: the decoder's is that of log p(x, z_K) at the refined draw alone, the encoder's is
    exactly the plain amortised ELBO's (the same noise), and the loss is -log p~(x, z_K) (the encoder's site is 0)."""
    model = linear_gaussian_model()
    refined = RefinedGuide(AmortizedGuide(model, linear_encoder), steps=4, step_size=0.5)
    plain = AmortizedGuide(model, linear_encoder)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, D)), jnp.float32)
    params = {"w": jnp.full((D,), W0), **ENCODER_PARAMS}
    key = jax.random.PRNGKey(7)
    loss, grads = jax.value_and_grad(lambda p: Trace_ELBO().loss(key, p, model, refined, x))(params)

    guide_trace = traces_as_in_trace_elbo(key, params, model, refined, x)[0]
    z_k = guide_trace["z"]["value"]
    assert isinstance(guide_trace["z"]["fn"], dist.Delta)
    assert float(guide_trace["refined.encoder_elbo"]["fn"].log_factor) == 0.0
    np.testing.assert_allclose(loss, -log_joint_by_hand(params["w"], x, z_k), rtol=1e-6)
    want_w = -jax.grad(log_joint_by_hand)(params["w"], x, z_k)
    np.testing.assert_allclose(grads["w"], want_w, rtol=1e-5, atol=1e-6)

    plain_grads = jax.grad(lambda p: Trace_ELBO().loss(key, p, model, plain, x))(params)
    for name in ENCODER_PARAMS:
        np.testing.assert_allclose(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)
    z_0 = traces_as_in_trace_elbo(key, params, model, plain, x)[0]["z"]["value"]
    assert not np.allclose(z_k, z_0, atol=1e-2) and np.abs(z_k).max() < 5  # the chain moved (and is stable)


def test_refined_draws_follow_the_posterior_in_the_encoders_coordinates():
    """A poor fixed encoder (loc 0.3, scale 0.5), 200 whitened ULA steps: the draws' mean is the closed-form
    posterior mean, their covariance ULA's stationary one in u = (z - 0.3) / 0.5 mapped back (4 Monte Carlo
    standard errors)."""
    model = linear_gaussian_model()
    h, s, n = 0.5, 0.5, 4000
    encoder = AmortizedGuide(model, lambda x: (jnp.full_like(x, 0.3), jnp.full_like(x, s)))
    guide = RefinedGuide(encoder, sampler=ShortRunLangevin(200, h))  # a rolled loop: 200 steps compile quickly
    x0 = np.array([0.8, -0.4])
    z = np.asarray(handlers.seed(guide, 0)(jnp.asarray(np.tile(x0, (n, 1)), jnp.float32))["z"], np.float64)
    precision = CASE.precision + np.eye(D) * W0 ** 2 / SIGMA ** 2
    mean = np.linalg.solve(precision, CASE.precision @ CASE.mean + W0 * x0 / SIGMA ** 2)
    lam, V = np.linalg.eigh(s * s * precision)  # the target's precision in u
    cov = s * s * (V * (h * h / (1.0 - (1.0 - 0.5 * h * h * lam) ** 2))) @ V.T
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(z.mean(0) - mean) < 4 * sd / np.sqrt(n))
    assert np.all(np.abs(z.var(0, ddof=1) - np.diag(cov)) < 4 * np.diag(cov) * np.sqrt(2 / n))


def posterior_moments(x0):
    """Closed-form posterior mean and covariance of z given one datum x0 under the linear Gaussian model."""
    precision = CASE.precision + np.eye(D) * W0 ** 2 / SIGMA ** 2
    return np.linalg.solve(precision, CASE.precision @ CASE.mean + W0 * x0 / SIGMA ** 2), np.linalg.inv(precision)


def test_mala_refinement_accepts_per_datum_and_is_exact():
    """MALA steps of 1.0 (in the encoder's units) from a poor encoder: each datum's chain accepts on its own, so
    after 200 steps the 4,000 draws have the exact posterior mean and covariance (4 Monte Carlo standard errors).
    One joint accept over the 4,000 data takes the drift towards the mode as a whole but cannot settle each datum's
    spread: its variance stays far from the posterior's."""
    model = linear_gaussian_model()
    n, x0 = 4000, np.array([0.8, -0.4])
    x = jnp.asarray(np.tile(x0, (n, 1)), jnp.float32)
    encoder = AmortizedGuide(model, lambda x: (jnp.full_like(x, 0.3), jnp.full_like(x, 0.5)))
    z = np.asarray(handlers.seed(RefinedGuide(encoder, sampler=MALA(200, 1.0)), 0)(x)["z"], np.float64)
    mean, cov = posterior_moments(x0)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(z.mean(0) - mean) < 4 * sd / np.sqrt(n))
    assert np.all(np.abs(z.var(0, ddof=1) - np.diag(cov)) < 4 * np.diag(cov) * np.sqrt(2 / n))
    joint = np.asarray(handlers.seed(RefinedGuide(encoder, sampler=MALA(200, 1.0), per_datum=False), 0)(x)["z"])
    assert np.all(np.abs(joint.var(0, ddof=1) - np.diag(cov)) > 10 * np.diag(cov) * np.sqrt(2 / n))


def test_per_datum_ula_chains_are_the_joint_chain():
    """Under ULA the per-datum chains make exactly the moves of one chain on the summed joint."""
    model = linear_gaussian_model()
    guides = [RefinedGuide(AmortizedGuide(model, linear_encoder), steps=5, step_size=0.5, per_datum=p)
              for p in (True, False)]
    per_datum, joint = (handlers.seed(handlers.substitute(g, ENCODER_PARAMS), 3)(X)["z"] for g in guides)
    np.testing.assert_allclose(per_datum, joint, rtol=1e-5, atol=1e-6)


def test_refined_guide_shows_the_encoders_params_and_keys_and_hides_its_draws():
    model = linear_gaussian_model()
    keys = []

    def encoder(x):  # e.g. dropout: the key comes from the outer seed
        keys.append(numpyro.prng_key())
        return linear_encoder(x)

    guide = RefinedGuide(AmortizedGuide(model, encoder), steps=2)
    tr = handlers.trace(handlers.seed(guide, 0)).get_trace(X)
    assert {name: site["type"] for name, site in tr.items()} == {
        "enc_w": "param", "enc_c": "param", "w": "param", "refined.encoder_elbo": "sample", "data": "plate",
        "z": "sample"}
    assert isinstance(tr["z"]["fn"], dist.Delta) and keys[-1] is not None
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    assert set(svi.get_params(svi.init(jax.random.PRNGKey(0), X))) == {"enc_w", "enc_c", "w"}


def test_refined_guide_errors():
    model = linear_gaussian_model()
    with pytest.raises(TypeError, match="knows its model"):
        RefinedGuide(fixed_encoder)

    def delta_guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Delta(jnp.zeros_like(x), event_dim=1))

    delta_guide.model = model
    with pytest.raises(ValueError, match="whiten=False"):
        handlers.seed(RefinedGuide(delta_guide), 0)(jnp.zeros((3, D)))
    assert handlers.seed(RefinedGuide(delta_guide, steps=2, whiten=False), 0)(jnp.zeros((3, D)))["z"].shape == (3, D)
    for guide in (delta_guide, AmortizedGuide(model, fixed_encoder)):
        with pytest.raises(ValueError, match="seed"):
            RefinedGuide(guide, whiten=False)(X)
