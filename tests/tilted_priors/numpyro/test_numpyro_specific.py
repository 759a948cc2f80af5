"""NumPyro/JAX-specific behaviour of tilted_priors.numpyro: compilation caching, divergence under and outside
traces, PRNG-key resolution, NumPyro handlers and pytree structure. (Statistical behaviour shared with the Pyro
backend is tested elsewhere.)"""
from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.tree_util import Partial
from numpyro import handlers

from tilted_priors.errors import ChainDivergenceError
from tilted_priors.numpyro import (MALA, AnnealedImportance, Contrastive, EnergyMLP, EnergyTilted,
                                   EnergyTiltedNormal, Importance, Persistent, SelfNormalized, ShortRunLangevin,
                                   Unnormalized, langevin)
from tilted_priors.numpyro._chains import run_jit as _run_jit

KEY = jax.random.PRNGKey(0)


def gaussian(z):
    return -0.5 * jnp.sum(z * z, -1)


def small_prior(**kwargs):
    return EnergyTiltedNormal(EnergyMLP(3, 8), jnp.zeros(3), jnp.ones(3), **kwargs)


# --- jit caching ---------------------------------------------------------------------------------------------
def test_run_reuses_compiled_chain_for_same_log_density():
    sampler = ShortRunLangevin(7, 0.1)
    z0 = jnp.zeros((5, 2))
    sampler.run(KEY, gaussian, z0)
    size = _run_jit._cache_size()
    for i in range(3):
        sampler.run(jax.random.PRNGKey(i), gaussian, z0)
    assert _run_jit._cache_size() == size


def test_run_with_partial_reuses_compiled_chain_across_parameter_values():
    def log_density(loc, z):
        return -0.5 * jnp.sum((z - loc) ** 2, -1)

    sampler = MALA(5, 0.3)
    z0 = jnp.zeros((4, 2))
    sampler.run(KEY, Partial(log_density, jnp.zeros(2, jnp.float32)), z0)
    size = _run_jit._cache_size()
    for loc in (1.0, 2.0, -3.0):
        sampler.run(KEY, Partial(log_density, jnp.full(2, loc, jnp.float32)), z0)  # weak types retrace
    assert _run_jit._cache_size() == size


def test_sample_does_not_recompile_for_new_keys_or_new_instances():
    energy = EnergyMLP(3, 8)
    sampler = ShortRunLangevin(9, 0.2)
    d = EnergyTiltedNormal(energy, jnp.zeros(3), jnp.ones(3), sampler=sampler)
    d.sample(KEY, (4,))
    size = _run_jit._cache_size()
    d.sample(jax.random.PRNGKey(1), (4,))
    # new instances: same energy object, another energy of the same structure, other loc/scale, normalizer, key
    EnergyTiltedNormal(energy, jnp.ones(3), 2 * jnp.ones(3), sampler=sampler).sample(KEY, (4,))
    EnergyTiltedNormal(EnergyMLP(3, 8, rngs=1), jnp.zeros(3), jnp.ones(3), sampler=sampler,
                       normalizer=Unnormalized(), rng_key=KEY).sample(jax.random.PRNGKey(2), (4,))
    assert _run_jit._cache_size() == size


def test_samplers_and_normalizers_are_hashable_immutable_settings():
    assert ShortRunLangevin(10, 0.1) == ShortRunLangevin(10, 0.1)
    assert hash(MALA(10, 0.1)) == hash(MALA(10, 0.1))
    assert ShortRunLangevin(10, 0.1) != ShortRunLangevin(10, 0.1, noise=False)
    assert MALA(10, 0.1) != ShortRunLangevin(10, 0.1)
    assert Contrastive(num_samples=4) == Contrastive(num_samples=4)
    assert AnnealedImportance(10, 5) == AnnealedImportance(10, 5)
    assert Unnormalized() == Unnormalized()
    s = ShortRunLangevin(10, 0.1)
    with pytest.raises(AttributeError):
        s.steps = 3
    assert pickle.loads(pickle.dumps(s)) == s
    for sampler in (MALA(10, 0.1, unroll=2), ShortRunLangevin(5, 0.2, False, unroll=True)):
        assert pickle.loads(pickle.dumps(sampler)) == sampler  # MALA's keyword-only unroll once broke this
    with pytest.raises(ValueError):
        ShortRunLangevin(0, 0.1)
    with pytest.raises(ValueError):
        MALA(10, -1.0)


def _scan_unrolls(fn, *args) -> list:
    """The ``unroll`` of every scan in ``fn``'s program."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                found.append(eqn.params["unroll"])
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_unroll_auto_unrolls_a_convolutional_log_density_only():
    kernel = jnp.ones((3, 3, 1, 1)) / 9.0

    def conv(z):  # a 4 x 4 image per chain, smoothed
        image = z.reshape(z.shape[:-1] + (4, 4, 1))
        out = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return -0.5 * jnp.sum(out.reshape(z.shape) ** 2, -1) - 0.5 * jnp.sum(z ** 2, -1)

    sampler = ShortRunLangevin(6, 0.1, unroll="auto")
    z0 = jnp.zeros((3, 16))
    assert _scan_unrolls(lambda z: sampler.run(KEY, conv, z), z0) == [6]
    assert _scan_unrolls(lambda z: sampler.run(KEY, gaussian, z), z0) == [1]
    assert repr(sampler).endswith("unroll='auto')") and pickle.loads(pickle.dumps(sampler)) == sampler
    with pytest.raises(ValueError, match="unroll must be"):
        ShortRunLangevin(6, 0.1, unroll="full")


# --- divergence ----------------------------------------------------------------------------------------------
def test_divergence_raises_eagerly_with_first_step_and_chain_count():
    # Gradient ascent (no noise) on log pi(z) = z moves every chain by h^2/2 = 0.5 per step; the log density is
    # nan beyond 1.2. Chains starting at 0.5 cross at step 2 (two of them), the one at 0 at step 3.
    def log_density(z):
        return jnp.where(z[..., 0] > 1.2, jnp.nan, z[..., 0])

    z0 = jnp.array([[0.0], [0.5], [0.5], [-5.0]])
    with pytest.raises(ChainDivergenceError) as info:
        ShortRunLangevin(10, 1.0, noise=False).run(KEY, log_density, z0)
    assert (info.value.step, info.value.num_bad, info.value.sampler) == (2, 2, "ShortRunLangevin")


def test_divergence_step_matches_a_step_by_step_reference():
    def log_density(z):
        return -jnp.sum(z ** 4, -1)

    steps, h, key, z0 = 30, 1.5, jax.random.PRNGKey(3), jnp.ones((6, 2))
    with pytest.raises(ChainDivergenceError) as info:
        ShortRunLangevin(steps, h).run(key, log_density, z0)
    # The sampler splits the key for the chain as below; replay it one step at a time.
    state = langevin.init(z0, log_density)
    expected = None
    for i, k in enumerate(jax.random.split(key, steps), start=1):
        state, _ = langevin.ula_step(k, state, log_density, h)
        bad = ~np.isfinite(np.asarray(state.logdensity))
        if bad.any():
            expected = (i, int(bad.sum()))
            break
    assert expected is not None
    assert (info.value.step, info.value.num_bad) == expected


def test_divergence_at_initial_state_is_step_zero():
    def log_density(z):
        return jnp.where(z[..., 0] > 0, -jnp.inf, gaussian(z))

    with pytest.raises(ChainDivergenceError) as info:
        MALA(5, 0.1).run(KEY, log_density, jnp.array([[1.0], [-1.0]]))
    assert (info.value.step, info.value.num_bad) == (0, 1)


def test_no_raise_under_outer_jit_nan_propagates():
    def log_density(z):
        return -jnp.sum(z ** 4, -1)

    run = jax.jit(lambda key, z: ShortRunLangevin(30, 3.0).run(key, log_density, z))
    out = run(KEY, jnp.ones((4, 2)))
    assert out.shape == (4, 2)
    assert not bool(jnp.all(jnp.isfinite(out)))


def test_ais_raises_on_divergent_kernel():
    d = EnergyTiltedNormal(lambda z: jnp.sum(z ** 4, -1), jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ChainDivergenceError):
        AnnealedImportance(8, 4, kernel=ShortRunLangevin(10, 3.0)).estimate(d, KEY)


# --- keys and normalizers ------------------------------------------------------------------------------------
def test_log_normalizer_without_any_key_raises_with_instructions():
    d = small_prior()
    with pytest.raises(ValueError, match="rng_key"):
        d.log_normalizer()
    with pytest.raises(ValueError, match="seed"):
        d.log_prob(jnp.zeros(3))


def test_unnormalized_needs_no_key():
    d = small_prior(normalizer=Unnormalized())
    assert float(d.log_normalizer()) == 0.0
    assert d.log_prob(jnp.zeros((2, 3))).shape == (2,)


def test_log_normalizer_key_resolution_order_and_caching():
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    energy = EnergyMLP(3, 8)

    def make(**kw):
        return EnergyTiltedNormal(energy, jnp.zeros(3), jnp.ones(3), normalizer=Importance(50), **kw)

    ref1, ref2 = make().log_normalizer(k1), make().log_normalizer(k2)
    assert float(ref1) != float(ref2)
    assert float(make(rng_key=k1).log_normalizer()) == float(ref1)  # construction key
    d = make(rng_key=k1)
    assert float(d.log_normalizer(k2)) == float(ref2)  # argument wins
    assert d.log_normalizer() is d.log_normalizer()  # computed once per instance


def test_log_normalizer_inside_seeded_model():
    d = small_prior(normalizer=Importance(20))  # built outside any handler: no key

    def model():
        numpyro.factor("lp", d.log_prob(jnp.zeros(3)))

    tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    assert jnp.isfinite(tr["lp"]["fn"].log_factor)


def test_distribution_built_in_seeded_model_keeps_its_key_for_log_density():
    # numpyro.infer.util.log_density evaluates log_prob after the model has run (outside the seed handler).
    from numpyro.infer.util import log_density

    energy = EnergyMLP(3, 8)

    def model():
        prior = EnergyTiltedNormal(energy, jnp.zeros(3), jnp.ones(3), sampler=ShortRunLangevin(5, 0.1))
        with numpyro.plate("data", 4):
            numpyro.sample("z", prior, obs=jnp.zeros((4, 3)))

    value, _ = log_density(handlers.seed(model, 0), (), {}, {})
    assert jnp.isfinite(value)
    with pytest.raises(ValueError, match="PRNG key"):  # no seed: no key anywhere
        log_density(model, (), {}, {})


def test_selfnormalized_registers_its_param_and_gets_its_gradient():
    from numpyro.infer.util import log_density

    energy = EnergyMLP(3, 8)

    def model():
        prior = EnergyTiltedNormal(energy, jnp.zeros(3), jnp.ones(3), normalizer=SelfNormalized(16, name="b_test"))
        with numpyro.plate("data", 4):
            numpyro.sample("z", prior, obs=jnp.zeros((4, 3)))

    tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    assert tr["b_test"]["type"] == "param"
    grad_b = jax.grad(lambda b: log_density(handlers.seed(model, 0), (), {}, {"b_test": b})[0])(0.3)
    assert float(grad_b) != 0.0


def test_contrastive_term_is_zero_with_gradient_to_energy_parameters():
    from flax import nnx

    energy = EnergyMLP(3, 8)
    graphdef, params = nnx.split(energy)

    def log_prob(params):
        d = EnergyTiltedNormal(nnx.merge(graphdef, params), jnp.zeros(3), jnp.ones(3),
                               normalizer=Contrastive(ShortRunLangevin(5, 0.1), num_samples=8), rng_key=KEY)
        return d.log_normalizer()

    value, grads = jax.value_and_grad(log_prob)(params)
    assert float(value) == 0.0
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_annealed_importance_runs_under_jit():
    d = EnergyTiltedNormal(lambda z: jnp.sum(z ** 2, -1), jnp.zeros(1), jnp.ones(1))
    ais = AnnealedImportance(200, 10)
    log_z = jax.jit(lambda key: ais.estimate(d, key).log_z)(KEY)
    assert abs(float(log_z) + 0.5 * np.log(3.0)) < 0.1


# --- NumPyro integration -------------------------------------------------------------------------------------
def test_plate_expand_and_to_event_keep_the_type():
    d = small_prior(normalizer=Unnormalized())

    def model():
        with numpyro.plate("data", 5):
            return numpyro.sample("z", d)

    tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    site = tr["z"]
    assert type(site["fn"]) is EnergyTiltedNormal
    assert site["fn"].batch_shape == (5,) and site["value"].shape == (5, 3)
    e = d.expand((2, 4))
    assert type(e) is EnergyTiltedNormal and e.batch_shape == (2, 4) and e.event_shape == (3,)
    base = dist.Normal(jnp.zeros(3), 1.0).to_event(1)
    g = EnergyTilted(lambda z: jnp.sum(z, -1), base, normalizer=Unnormalized()).expand((4,))
    assert type(g) is EnergyTilted and g.batch_shape == (4,)
    ind = e.to_event(1)
    assert ind.event_shape == (4, 3)
    assert ind.log_prob(jnp.zeros((2, 4, 3))).shape == (2,)


def test_distribution_is_a_pytree():
    d = small_prior(normalizer=Unnormalized(), rng_key=KEY)
    leaves, treedef = jax.tree_util.tree_flatten(d)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is EnergyTiltedNormal and back.batch_shape == d.batch_shape
    assert back.normalizer == d.normalizer and back.sampler == d.sampler
    z = jnp.ones((2, 3))
    np.testing.assert_allclose(back.log_prob(z), d.log_prob(z), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda d, z: d.log_prob(z))(d, z), d.log_prob(z), rtol=1e-6)
    # a plain-function energy is static (aux data), an NNX module's parameters are leaves
    f = EnergyTiltedNormal(lambda z: jnp.sum(z, -1), jnp.zeros(3), jnp.ones(3), normalizer=Unnormalized())
    assert len(jax.tree_util.tree_leaves(f)) < len(leaves)
    assert jax.vmap(lambda loc: EnergyTiltedNormal(d.energy, loc, jnp.ones(3), normalizer=Unnormalized())
                    .log_prob(jnp.zeros(3)))(jnp.zeros((4, 3))).shape == (4,)


def test_validation_messages():
    e = EnergyMLP(3, 8)
    with pytest.raises(ValueError, match="scale must be positive"):
        EnergyTiltedNormal(e, jnp.zeros(3), -jnp.ones(3), validate_args=True)
    d = EnergyTiltedNormal(e, jnp.zeros(3), jnp.ones(3), normalizer=Unnormalized(), validate_args=True)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        d.log_prob(jnp.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        d.log_prob(jnp.array([0.0, jnp.nan, 0.0]))
    with pytest.raises(ValueError, match="event shape"):
        EnergyTilted(e, dist.Normal(0.0, 1.0))
    with pytest.raises(NotImplementedError, match="sample"):
        d.mean
    with pytest.raises(ValueError, match="EnergyMLP expects"):
        e(jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"map shape \(\.\.\., d\) to \(\.\.\.\)"):
        EnergyTiltedNormal(lambda z: z, jnp.zeros(3), jnp.ones(3), normalizer=Unnormalized()).log_prob(jnp.zeros(3))


def test_persistent_continues_eagerly_and_does_not_store_tracers():
    s = Persistent(ShortRunLangevin(3, 0.1))
    a = s.run(KEY, gaussian, jnp.zeros((4, 2)))
    assert s.state is a
    b = s.run(jax.random.PRNGKey(1), gaussian, jnp.zeros((4, 2)))
    assert s.state is b and not bool(jnp.all(a == b))
    jax.jit(lambda key: s.run(key, gaussian, jnp.zeros((4, 2))))(KEY)
    assert s.state is b  # the traced result was not stored
    s.reset()
    assert s.state is None
