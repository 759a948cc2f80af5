"""RecursiveMixtureGuide / RecursiveMixtureELBO / fit_recursive (NumPyro): Trace_ELBO at M = 1, the mixture's exact
log density, gradient routing against a hand-written objective, a short recursive fit, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import nnx
from jax.tree_util import Partial
from numpyro import handlers
from numpyro.infer import Predictive, Trace_ELBO
from scipy.special import logsumexp
from scipy.stats import norm

from helpers import _jax_quadratic_energy, make_case
from tilted_priors.inference.numpyro import (AmortizedGuide, RecursiveMixtureELBO, RecursiveMixtureGuide, fit,
                               fit_recursive)
from tilted_priors.inference.numpyro.train import _nest_params
from tilted_priors.numpyro import EnergyTiltedNormal, SelfNormalized, Unnormalized

CASE = make_case(dim=2, seed=5)
D, N, SIGMA = 2, 8, 0.7
ENERGY = Partial(_jax_quadratic_energy, jnp.asarray(CASE.A, jnp.float32), jnp.asarray(CASE.b, jnp.float32))
LOC, SCALE = jnp.asarray(CASE.loc, jnp.float32), jnp.asarray(CASE.scale, jnp.float32)
X = jnp.asarray(np.random.default_rng(0).normal(CASE.mean, 1.0, size=(N, D)), jnp.float32)
_rng = np.random.default_rng(6)
ENC = [{f"enc_w{k}": jnp.asarray(0.3 * _rng.normal(size=(D, 2 * D)), jnp.float32),
        f"enc_c{k}": jnp.asarray(np.r_[0.3 * _rng.normal(size=D), np.full(D, -0.5)], jnp.float32)} for k in range(3)]


def model_with(normalizer_, learn_energy=True):
    """z ~ the case's tilted prior scaled by a (learnable, or fixed at 1), in a data plate; x ~ N(w * z, SIGMA^2 I)."""
    def model(x):
        w = numpyro.param("w", jnp.full((D,), 1.3))
        a = numpyro.param("a", jnp.asarray(0.8)) if learn_energy else 1.0
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", EnergyTiltedNormal(lambda z: a * ENERGY(z), LOC, SCALE, normalizer=normalizer_))
            numpyro.sample("x", dist.Normal(w * z, SIGMA).to_event(1), obs=x)
    return model


def encoder(k):
    """x -> (W x + c, softplus(V x + e)), its weights the params enc_w{k}, enc_c{k}."""
    def encode(x):
        out = x @ numpyro.param(f"enc_w{k}", ENC[k][f"enc_w{k}"]) + numpyro.param(f"enc_c{k}", ENC[k][f"enc_c{k}"])
        loc, raw = jnp.split(out, 2, axis=-1)
        return loc, jax.nn.softplus(raw) + 1e-3
    return encode


def loc_scale(params, k, x):
    out = x @ params[f"enc_w{k}"] + params[f"enc_c{k}"]
    return out[:, :D], jax.nn.softplus(out[:, D:]) + 1e-3


def log_normal(z, loc, scale):
    return dist.Normal(loc, scale).log_prob(z).sum(-1)


def pi_by_hand(e):
    """pi_k = e_k prod_{j>k} (1 - e_j), e_1 = 1 (numpy, last axis)."""
    e = np.concatenate([np.ones(e.shape[:-1] + (1,)), e], -1)
    return np.stack([e[..., k] * np.prod(1 - e[..., k + 1:], -1) for k in range(e.shape[-1])], -1)


# --- 1. one component is the amortised guide under Trace_ELBO -------------------------------------------------------
@pytest.mark.parametrize("barrier", [0.0, 3.0])
def test_one_component_is_trace_elbo_with_amortized_guide(barrier):
    model = model_with(SelfNormalized(16 * N, name="b"))  # the SNELBO: the normalizer's noise must be the same too
    params = {"w": jnp.full((D,), 1.1), "a": jnp.asarray(0.9), "b": jnp.asarray(0.2), **ENC[0]}
    key = jax.random.PRNGKey(3)
    want, want_grads = jax.value_and_grad(
        lambda p: Trace_ELBO().loss(key, p, model, AmortizedGuide(model, encoder(0)), X))(params)
    two = RecursiveMixtureGuide(model, [encoder(0), encoder(1)], barrier=barrier)
    two.num_active = 1
    for guide in (RecursiveMixtureGuide(model, [encoder(0)], barrier=barrier), two):
        loss, grads = jax.value_and_grad(lambda p: RecursiveMixtureELBO().loss(key, p, model, guide, X))(params)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        assert set(grads) == set(want_grads)
        for name in params:
            np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_particles_average_the_single_particle_losses():
    model = model_with(Unnormalized())
    guide = RecursiveMixtureGuide(model, [encoder(0), encoder(1)])
    params = {"w": jnp.full((D,), 1.3), "a": jnp.asarray(0.8), "rme.mixing": jnp.asarray([0.3]), **ENC[0], **ENC[1]}
    key = jax.random.PRNGKey(1)
    one = [RecursiveMixtureELBO().loss(k, params, model, guide, X) for k in jax.random.split(key, 3)]
    vectorized = jax.jit(lambda p: RecursiveMixtureELBO(num_particles=3).loss(key, p, model, guide, X))  # vmap
    np.testing.assert_allclose(vectorized(params), np.mean(one), rtol=1e-5)


# --- 2. the guide's exact log density ---------------------------------------------------------------------------
def test_guide_log_density_is_the_mixture_and_weights_are_normalised():
    model = model_with(Unnormalized())
    logits = np.random.default_rng(1).normal(size=(N, 2)).astype(np.float32)
    guide = RecursiveMixtureGuide(model, [encoder(k) for k in range(3)], mixing=lambda x: jnp.asarray(logits))
    tr = handlers.trace(handlers.seed(guide, 4)).get_trace(X)
    z = np.asarray(tr["z"]["value"], np.float64)
    assert z.shape == (N, D) and [(f.name, f.size) for f in tr["z"]["cond_indep_stack"]] == [("data", N)]
    pi = pi_by_hand(1 / (1 + np.exp(-logits.astype(np.float64))))
    params = {k: np.asarray(v, np.float64) for p in ENC for k, v in p.items()}
    log_q = np.stack([norm.logpdf(z, *map(np.asarray, loc_scale(params, k, np.asarray(X, np.float64)))).sum(-1)
                      for k in range(3)], -1)
    want = logsumexp(np.log(pi) + log_q, -1)
    np.testing.assert_allclose(tr["z"]["fn"].log_prob(tr["z"]["value"]), want, rtol=1e-5)
    np.testing.assert_allclose(np.exp(guide.log_weights(X)), pi, rtol=1e-5)

    default = RecursiveMixtureGuide(model, [encoder(k) for k in range(3)])
    for m in (1, 2, 3):
        default.num_active = m
        weights = np.exp(np.asarray(default.log_weights(X), np.float64))
        assert weights.shape == (N, m)
        np.testing.assert_allclose(weights, 1 / m, rtol=1e-6)  # equal weights: e_k = 1 / k
    # a guide for Predictive (the model's z from the mixture)
    samples = Predictive(model, guide=default, num_samples=3, return_sites=["z"])(jax.random.PRNGKey(0), X)
    assert samples["z"].shape == (3, N, D) and np.all(np.isfinite(samples["z"]))


# --- 3. gradient routing ------------------------------------------------------------------------------------------
def log_joint_by_hand(params, z):
    """log p(x_i, z_i) per datum (normalizer off): log N(x; w z, SIGMA) - a E(z) + log N(z; LOC, SCALE)."""
    return log_normal(X, params["w"] * z, SIGMA) - params["a"] * ENERGY(z) + log_normal(z, LOC, SCALE)


@pytest.mark.parametrize("barrier", [0.0, 0.6, 50.0])
def test_each_parameter_gets_the_gradient_of_its_own_objective(barrier):
    model = model_with(Unnormalized())
    guide = RecursiveMixtureGuide(model, [encoder(0), encoder(1)], barrier=barrier)
    params = {"w": jnp.full((D,), 1.3), "a": jnp.asarray(0.8), "rme.mixing": jnp.asarray([0.4]),
              **ENC[0], **ENC[1]}
    key = jax.random.PRNGKey(5)
    loss, grads = jax.value_and_grad(lambda p: RecursiveMixtureELBO().loss(key, p, model, guide, X))(params)

    # the draws' noise: component k draws with fold_in(guide key, k) (the guide key as Trace_ELBO splits it)
    guide_key = jax.random.split(key)[1]
    eps = []
    for k in range(2):
        seeded = handlers.seed(guide.components[k], guide_key if k == 0 else jax.random.fold_in(guide_key, k))
        z = handlers.substitute(seeded, data=params)(X)["z"]
        loc, scale = loc_scale(params, k, X)
        eps.append((z - loc) / scale)

    def draws(p):
        return [loc_scale(p, k, X) for k in range(2)], [loc_scale(p, k, X)[0] + loc_scale(p, k, X)[1] * eps[k]
                                                        for k in range(2)]

    def neg_elbo_mixture(p):  # -ELBO(Q_2), stratified: sum_k pi_k [log p(x, z_k) - log Q_2(z_k)]
        comps, zs = draws(p)
        e2 = jax.nn.sigmoid(p["rme.mixing"][0])
        log_pi = jnp.log(jnp.stack([1 - e2, e2]))
        total = 0.0
        for k in range(2):
            log_q = jnp.stack([log_normal(zs[k], *comps[j]) for j in range(2)], -1)
            total += jnp.exp(log_pi[k]) * (log_joint_by_hand(p, zs[k]) - jax.nn.logsumexp(log_pi + log_q, -1))
        return -jnp.sum(total)

    def neg_component_objective(p):  # -(ELBO(q_2) + min(KL_hat(q_2 || q_1), C)), per datum
        comps, zs = draws(p)
        log_q2, log_q1 = log_normal(zs[1], *comps[1]), log_normal(zs[1], *comps[0])
        return -jnp.sum(log_joint_by_hand(p, zs[1]) - log_q2 + jnp.minimum(log_q2 - log_q1, barrier))

    np.testing.assert_allclose(loss, neg_elbo_mixture(params), rtol=1e-5)
    mixture_grads, component_grads = jax.grad(neg_elbo_mixture)(params), jax.grad(neg_component_objective)(params)
    for name in ("enc_w0", "enc_c0"):  # frozen: exactly no gradient
        assert np.all(np.asarray(grads[name]) == 0), name
    for name, want in [("enc_w1", component_grads), ("enc_c1", component_grads), ("w", mixture_grads),
                       ("a", mixture_grads), ("rme.mixing", mixture_grads)]:
        np.testing.assert_allclose(grads[name], want[name], rtol=2e-5, atol=1e-5, err_msg=name)
    kl = np.asarray(log_normal(draws(params)[1][1], *draws(params)[0][1])
                    - log_normal(draws(params)[1][1], *draws(params)[0][0]))
    if barrier == 0.6:  # the barrier binds for some data, not for others
        assert np.any(kl > barrier) and np.any(kl < barrier), kl

    # the non-recursive mixture: every parameter learns from ELBO(Q_2), the components included
    loss, grads = jax.value_and_grad(
        lambda p: RecursiveMixtureELBO(recursive=False).loss(key, p, model, guide, X))(params)
    np.testing.assert_allclose(loss, neg_elbo_mixture(params), rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(grads[name], mixture_grads[name], rtol=2e-5, atol=1e-5, err_msg=name)


# --- 4. the recursive schedule -------------------------------------------------------------------------------------
class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.loc, self.scale = nnx.Linear(D, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.loc(x), jax.nn.softplus(self.scale(x)) + 1e-3


def test_fit_recursive_trains_diverse_components_stage_after_stage(tmp_path):
    model = model_with(Unnormalized(), learn_energy=False)  # the energy fixed: log Z is a constant
    data = np.random.default_rng(2).normal(CASE.mean, 1.0, size=(32, D))
    guide = RecursiveMixtureGuide(model, [Encoder(nnx.Rngs(0)), Encoder(nnx.Rngs(0))], barrier=5.0)
    results = fit_recursive(model, guide, data, [150, 150], batch_size=16, lr=0.03, betas=(0.9, 0.999),
                            progress=False, out=tmp_path)
    assert guide.num_active == 2 and [r.steps for r in results] == [150, 150]
    assert all(np.all(np.isfinite(r.losses)) for r in results)
    assert (tmp_path / "component1" / "checkpoint.npz").exists() and (tmp_path / "component2").is_dir()
    first, second = results
    assert not any(k.startswith("rme.component1") or k.startswith("rme.mixing") for k in first.params)
    # stage 2 starts from stage 1's parameters; component 1 is frozen there, so it ends where stage 1 left it
    for name, value in first.params.items():
        if name.startswith("rme.component0"):
            np.testing.assert_array_equal(second.params[name], value, err_msg=name)
    assert not np.array_equal(second.params["w"], first.params["w"])
    assert second.losses[0] < 0.5 * first.losses[0]  # not a restart from the initial values (the same batch)
    # no collapse: the two components' means differ (the KL bonus pushes the second away from the first; seeds
    # 0-2 give 0.97, 0.89, 0.44; with C = 0 about 0.02-0.05)
    x = jnp.asarray(data, jnp.float32)
    template = {n: s["value"] for n, s in handlers.trace(handlers.seed(guide, 0)).get_trace(x).items()
                if s["type"] == "param"}
    fitted = handlers.substitute(handlers.seed(guide, 0), data=_nest_params(second.params, template))
    locs = jnp.stack(handlers.trace(fitted).get_trace(x)["z"]["fn"]
                     .component_distribution.base_dist.loc, 0)
    assert locs.shape == (32, 2, D) and float(jnp.mean(jnp.abs(locs[:, 1] - locs[:, 0]))) > 0.2
    # resume per stage: everything done, nothing runs again
    again = fit_recursive(model, guide, data, 150, batch_size=16, lr=0.03, betas=(0.9, 0.999), progress=False,
                          out=tmp_path, resume=True)
    assert [len(r.history) for r in again] == [150, 150]
    np.testing.assert_array_equal(again[1].params["w"], second.params["w"])


def test_fit_init_params_accepts_fit_results_flat_params():
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(numpyro.param("m", jnp.zeros(())), 1.0), obs=x)

    def empty_guide(x):
        numpyro.param("net$params", {"w": jnp.zeros(2), "b": jnp.zeros(())})

    data = np.random.default_rng(0).normal(2.0, 1.0, size=40)
    first = fit(model, empty_guide, data, num_steps=30, batch_size=20, lr=0.1, progress=False)
    assert abs(first.params["m"]) > 0.5
    again = fit(model, empty_guide, data, num_steps=1, batch_size=20, lr=1e-9, progress=False,
                init_params={**first.params, "net$params/w": np.ones(2), "net$params/b": np.asarray(3.0),
                             "unknown": 1.0})
    np.testing.assert_allclose(again.params["m"], first.params["m"], atol=1e-6)
    np.testing.assert_allclose(again.params["net$params/w"], np.ones(2), atol=1e-6)
    np.testing.assert_allclose(again.params["net$params/b"], 3.0, atol=1e-6)
    with pytest.raises(TypeError, match="init_params"):
        fit(model, empty_guide, data, num_steps=1, batch_size=20, progress=False, init_params=[1.0])
    with pytest.raises(ValueError, match="shape"):
        fit(model, empty_guide, data, num_steps=1, batch_size=20, progress=False, init_params={"m": np.ones(3)})


# --- 5. errors -----------------------------------------------------------------------------------------------------
def test_errors():
    model = model_with(Unnormalized())
    with pytest.raises(ValueError, match="empty"):
        RecursiveMixtureGuide(model, [])
    with pytest.raises(TypeError, match="sequence"):
        RecursiveMixtureGuide(model, encoder(0))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="barrier"):
            RecursiveMixtureGuide(model, [encoder(0)], barrier=bad)
        with pytest.raises(ValueError, match="barrier"):
            RecursiveMixtureELBO(barrier=bad)
    guide = RecursiveMixtureGuide(model, [encoder(0), encoder(1)])
    with pytest.raises(ValueError, match="barrier"):
        guide.barrier = -0.5
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match=r"num_active must be an integer in \[1, 2\]"):
            guide.num_active = bad
    guide.num_active = 1
    assert guide.grow() == 2
    with pytest.raises(ValueError, match="already active"):
        guide.grow()
    with pytest.raises(ValueError, match="seed"):
        guide(X)

    def two_latents(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("s", dist.Normal(0.0, 1.0))
            numpyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    with pytest.raises(NotImplementedError, match=r"one latent site.*\['s', 'z'\]"):
        handlers.seed(RecursiveMixtureGuide(two_latents, [encoder(0)]), 0)(X)

    def no_plate(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    with pytest.raises(ValueError, match="one plate over the data"):
        handlers.seed(RecursiveMixtureGuide(no_plate, [encoder(0)]), 0)(X)
    params = {"w": jnp.ones(D), "a": jnp.asarray(1.0), **ENC[0]}
    with pytest.raises(TypeError, match="RecursiveMixtureGuide"):
        RecursiveMixtureELBO().loss(jax.random.PRNGKey(0), params, model, AmortizedGuide(model, encoder(0)), X)
    with pytest.raises(TypeError, match="RecursiveMixtureGuide"):
        fit_recursive(model, AmortizedGuide(model, encoder(0)), np.asarray(X), 1)
    with pytest.raises(ValueError, match="one per component"):
        fit_recursive(model, guide, np.asarray(X), [1, 2, 3])
    with pytest.raises(TypeError, match="num_steps"):
        fit_recursive(model, guide, np.asarray(X), 1, num_steps=3)
    wrong = RecursiveMixtureGuide(model, [encoder(0), encoder(1)], mixing=lambda x: jnp.zeros((N, 2)))
    with pytest.raises(ValueError, match=r"mixing logits have shape \(8, 2\), expected \(8, 1\)"):
        wrong.log_weights(X)
    with pytest.raises(ValueError, match="mixing logits"):
        jax.jit(lambda p: RecursiveMixtureELBO().loss(jax.random.PRNGKey(0), p, model, wrong, X))(
            {**params, **ENC[1]})
