"""FlowBackbone (NumPyro): the reparameterised site has exactly the pulled-back density, samplers run in u space,
and LEBM trains through it without touching the model."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.distributions.flows import InverseAutoregressiveTransform
from numpyro.distributions.transforms import (AffineTransform, ComposeTransform, LowerCholeskyAffine,
                                              ReshapeTransform)
from numpyro.infer import SVI, Trace_ELBO
from numpyro.nn import AutoregressiveNN

from helpers import NumPyroBackend, make_case
from tilted_priors.inference.numpyro import FlowBackbone, ShortRunPosterior
from tilted_priors.inference.numpyro.handlers import normalizer, sampler
from tilted_priors.numpyro import (MALA, EnergyMLP, EnergyTilted, EnergyTiltedNormal, Importance, SelfNormalized,
                                   ShortRunLangevin, Unnormalized)

N, D, P, SD = 5, 3, 4, 0.5


RNG = np.random.default_rng(0)


def _randomize(params, sd=0.4):
    """Random weights drawn with numpy (no per-shape compilation of JAX's random ops)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(sd * RNG.normal(size=np.shape(x)), x.dtype), params)


def make_iaf(permutation, dim=D, hidden=8):
    init_fn, apply_fn = AutoregressiveNN(dim, [hidden], permutation=np.asarray(permutation))
    _, shapes = jax.eval_shape(lambda key: init_fn(key, (dim,)), jax.random.PRNGKey(0))  # the shapes only
    return InverseAutoregressiveTransform(partial(apply_fn, _randomize(shapes)))


@pytest.fixture(scope="module")
def flow():
    """Two inverse-autoregressive layers with random non-zero weights (different orders), then an affine map."""
    affine = AffineTransform(jnp.array([0.3, -1.0, 2.0]), jnp.array([1.5, 0.7, -2.0]))
    return ComposeTransform([make_iaf([0, 1, 2]), make_iaf([2, 0, 1]), affine])


@pytest.fixture(scope="module")
def nets():
    energy = EnergyMLP(D, 16, rngs=1)
    gen = _randomize({"W": jnp.zeros((D, P)), "b": jnp.zeros(P)}, 0.5)
    return energy, lambda z: z @ gen["W"] + gen["b"]


def make_model(generator, prior):
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", prior())
            numpyro.sample("x", dist.Normal(generator(z), SD).to_event(1), obs=x)
        return z

    return model


def trace(model, *args, values=None, seed=0):
    model = handlers.seed(model, seed)
    if values is not None:
        model = handlers.substitute(model, data=values)
    return handlers.trace(model).get_trace(*args)


def log_joint(model, values, *args):
    """Per-datum log joint of all sample sites (normalizer off), with ``values`` at the latent sites."""
    tr = trace(normalizer(model, Unnormalized()), *args, values=values)
    return sum(site["fn"].log_prob(site["value"]) for site in tr.values() if site["type"] == "sample")


def _flow_prior(energy, flow):
    base = dist.Normal(jnp.zeros(D), 1.0).to_event(1)
    return lambda: EnergyTilted(energy, dist.TransformedDistribution(base, flow))


def _normal_prior(energy):
    return lambda: EnergyTiltedNormal(energy, jnp.array([0.5, -0.3, 1.0]), jnp.array([0.8, 1.4, 0.6]))


# --- 1. exact densities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["a: base is the flow", "b: Normal base carried by the flow"])
def test_reparameterised_log_density_is_the_pulled_back_one(form, nets, flow):
    """float32 here (the float64 check of the same identity is in test_reparam_cross_backend.py)."""
    energy, generator = nets
    prior = _flow_prior(energy, flow) if form.startswith("a") else _normal_prior(energy)
    model = make_model(generator, prior)
    model_u = handlers.reparam(model, config={"z": FlowBackbone(flow)})
    x = jnp.asarray(RNG.normal(size=(N, P)), jnp.float32)
    u = jnp.asarray(1.3 * RNG.normal(size=(N, D)), jnp.float32)
    z = flow(u)
    ladj = flow.log_abs_det_jacobian(u, z)
    assert ladj.shape == (N,) and float(jnp.abs(ladj).min()) > 1e-2  # a non-trivial Jacobian
    got = log_joint(model_u, {"z_u": u}, x)
    want = log_joint(model, {"z": z}, x) + ladj  # q_T(z) by inverting the flow
    assert got.shape == (N,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("form", ["a", "b"])
def test_trace_has_a_u_site_and_a_deterministic_z(form, nets, flow):
    energy, generator = nets
    prior = _flow_prior(energy, flow) if form == "a" else _normal_prior(energy)
    model = sampler(handlers.reparam(make_model(generator, prior), config={"z": FlowBackbone(flow)}),
                    ShortRunLangevin(2, 0.1))
    tr = trace(model, jnp.ones((N, P)))
    u_site, z_site = tr["z_u"], tr["z"]
    assert isinstance(u_site["fn"], EnergyTilted) and not u_site["is_observed"]
    assert tuple(u_site["fn"].batch_shape) == (N,) and tuple(u_site["fn"].event_shape) == (D,)
    assert [f.name for f in u_site["cond_indep_stack"]] == ["data"]
    assert z_site["type"] == "deterministic"
    np.testing.assert_allclose(z_site["value"], flow(u_site["value"]), rtol=1e-6)
    np.testing.assert_allclose(u_site["fn"].base.mean, np.zeros((N, D)))
    np.testing.assert_allclose(u_site["fn"].base.variance, np.ones((N, D)))


def test_transform_none_uses_the_flow_of_the_base(nets, flow):
    energy, generator = nets
    model = make_model(generator, _flow_prior(energy, flow))
    x, u = jnp.ones((N, P)), jnp.linspace(-1.0, 1.0, N * D).reshape(N, D)
    a = log_joint(handlers.reparam(model, config={"z": FlowBackbone()}), {"z_u": u}, x)
    b = log_joint(handlers.reparam(model, config={"z": FlowBackbone(flow)}), {"z_u": u}, x)
    np.testing.assert_array_equal(a, b)


def test_wrappers_and_event_dims_are_kept(nets, flow):
    energy, _ = nets
    loc, scale = jnp.zeros((N, D)), jnp.ones((N, D))

    def model():
        return numpyro.sample("z", EnergyTiltedNormal(energy, loc, scale).to_event(1))

    u = jnp.linspace(-1.0, 1.0, N * D).reshape(N, D)
    tr = trace(normalizer(handlers.reparam(model, config={"z": FlowBackbone(flow)}), Unnormalized()),
               values={"z_u": u})
    assert tr["z_u"]["fn"].event_dim == 2
    direct = EnergyTiltedNormal(energy, loc, scale, normalizer=Unnormalized())
    want = (direct.log_prob(flow(u)) + flow.log_abs_det_jacobian(u, flow(u))).sum()
    np.testing.assert_allclose(tr["z_u"]["fn"].log_prob(u), want, rtol=1e-5)


def test_normalizer_sampler_and_key_carry_over(nets):
    energy, _ = nets
    flow = AffineTransform(jnp.array([0.3, -1.0, 2.0]), jnp.array([1.5, 0.7, -2.0]))
    norm, samp = SelfNormalized(10, name="b_flow"), MALA(3, 0.1)

    def model():
        return numpyro.sample("z", EnergyTiltedNormal(energy, jnp.zeros(D), jnp.ones(D), normalizer=norm,
                                                      sampler=samp))

    tr = trace(handlers.reparam(model, config={"z": FlowBackbone(flow)}))
    fn = tr["z_u"]["fn"]
    assert fn.normalizer is norm and fn.sampler is samp and fn.rng_key is not None
    assert "b_flow" in tr and np.isfinite(fn.log_prob(tr["z_u"]["value"]))
    # the effect handlers reach the u site, on either side of the reparam
    model_u = sampler(handlers.reparam(normalizer(model, Importance(4)), config={"z": FlowBackbone(flow)}),
                      ShortRunLangevin(1, 0.1))
    tr = trace(model_u)
    assert isinstance(tr["z_u"]["fn"].normalizer, Importance)
    assert isinstance(tr["z_u"]["fn"].sampler, ShortRunLangevin)


def _quadratic(case):
    """E(z) = z^T A z / 2 + b^T z as a pytree (a Partial of a function and its arrays)."""
    return NumPyroBackend(seed=0).quadratic_energy(case)


def test_log_z_is_the_same_on_the_u_site():
    case = make_case()
    flow = LowerCholeskyAffine(jnp.array([0.2, -0.1, 0.3]), jnp.array([[1.1, 0, 0], [0.3, 0.8, 0], [-0.2, 0.1, 1.2]]))

    def model():
        return numpyro.sample("z", EnergyTiltedNormal(_quadratic(case), case.loc, case.scale))

    fn = trace(handlers.reparam(model, config={"z": FlowBackbone(flow)}))["z_u"]["fn"]
    est = Importance(20000).estimate(fn, jax.random.PRNGKey(1))
    assert abs(float(est.log_z) - case.log_z) < 4 * float(est.stderr)


# --- 2. samplers run in u space ---------------------------------------------------------------------------
def test_mala_in_u_space_recovers_the_tilted_moments():
    case = make_case()
    flow = LowerCholeskyAffine(jnp.array([1.0, -0.5, 0.5]), jnp.array([[0.7, 0, 0], [0.4, 1.3, 0], [-0.3, 0.2, 0.9]]))
    n = 2000

    def model():
        prior = EnergyTiltedNormal(_quadratic(case), case.loc, case.scale, normalizer=Unnormalized())
        with numpyro.plate("chains", n):
            return numpyro.sample("z", prior)

    tr = trace(sampler(handlers.reparam(model, config={"z": FlowBackbone(flow)}), MALA(300, 0.6)))
    z = np.asarray(tr["z"]["value"], np.float64)
    assert z.shape == (n, D)
    np.testing.assert_allclose(z, flow(tr["z_u"]["value"]), rtol=1e-6)
    var = np.diag(case.cov)
    assert np.all(np.abs(z.mean(0) - case.mean) < 4 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0, ddof=1) - var) < 4 * var * np.sqrt(2.0 / (n - 1)))


# --- 3. LEBM: the flow backbone by reparam alone --------------------------------------------------------
def test_lebm_trains_through_the_flow_backbone_without_changing_the_model():
    from tilted_priors.models.numpyro import lebm

    latent = 3
    lvm = lebm.build((28, 28, 1), latent, ngf=2, energy_hidden=8, prior_sampler=ShortRunLangevin(2, 0.4))

    def model(x):
        # a flow to learn is built in the model from its param site, then the unchanged model is reparameterised
        arn = numpyro.module("flow", AutoregressiveNN(latent, [6]), input_shape=(latent,))
        return handlers.reparam(lvm.model, config={"z": FlowBackbone(InverseAutoregressiveTransform(arn))})(x)

    guide = ShortRunPosterior(model, steps=2, step_size=0.1)
    svi = SVI(model, guide, lebm.optimizer(lr_energy=1e-2, lr_generator=1e-2), Trace_ELBO())
    x = 0.5 * jnp.tanh(jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1)))
    state = jax.jit(svi.init)(jax.random.PRNGKey(0), x)  # jitted: fewer compilations than running it eagerly
    p0 = svi.get_params(state)
    state, loss = jax.jit(svi.update)(state, x)
    p1 = svi.get_params(state)
    assert np.isfinite(float(loss))
    assert set(p1) == {"energy$params", "generator$params", "flow$params"}
    for name in p1:
        assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(p1[name]))
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p0[name]),
                                                            jax.tree_util.tree_leaves(p1[name]))]
        assert any(changed), name


# --- 4. errors --------------------------------------------------------------------------------------------
def _run(model, reparam):
    return trace(handlers.reparam(model, config={"z": reparam}))


def test_observed_site_is_refused():
    prior = EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(D), jnp.ones(D))
    with pytest.raises(ValueError, match="'z'.*observed"):
        _run(lambda: numpyro.sample("z", prior, obs=jnp.zeros(D)), FlowBackbone(AffineTransform(0.0, 2.0)))


def test_non_tilted_site_is_refused():
    with pytest.raises(TypeError, match="'z'.*EnergyTilted"):
        _run(lambda: numpyro.sample("z", dist.Normal(jnp.zeros(D), 1.0).to_event(1)),
             FlowBackbone(AffineTransform(0.0, 2.0)))


def test_event_dim_other_than_one_is_refused():
    prior = EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(D), jnp.ones(D))
    prior._event_shape = (1, D)  # a tilted distribution whose event is not a vector
    with pytest.raises(ValueError, match="'z'.*event dimension 1"):
        _run(lambda: numpyro.sample("z", prior), FlowBackbone(AffineTransform(0.0, 2.0)))
    good = EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(D), jnp.ones(D))
    with pytest.raises(ValueError, match="'z'.*event"):
        _run(lambda: numpyro.sample("z", good), FlowBackbone(ReshapeTransform((D, 1), (D,)).inv))


def test_other_bad_uses():
    good = EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(D), jnp.ones(D))
    with pytest.raises(TypeError, match="Transform"):
        FlowBackbone(lambda u: u)
    with pytest.raises(ValueError, match="'z'.*not a flow"):
        _run(lambda: numpyro.sample("z", good), FlowBackbone())
    proposal = dist.Normal(jnp.zeros(D), 1.0).to_event(1)
    with_proposal = EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(D), jnp.ones(D),
                                       normalizer=Importance(10, proposal=proposal))
    with pytest.raises(ValueError, match="'z'.*proposal"):
        _run(lambda: numpyro.sample("z", with_proposal), FlowBackbone(AffineTransform(0.0, 2.0)))
