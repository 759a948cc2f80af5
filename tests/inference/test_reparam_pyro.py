"""FlowBackbone (Pyro): the reparameterised site has exactly the pulled-back density, samplers run in u space, and
LEBM trains through it without touching the model."""
import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from helpers import make_case
from tilted_priors.inference.pyro import FlowBackbone, ShortRunPosterior
from tilted_priors.inference.pyro.handlers import normalizer, sampler
from tilted_priors.pyro import (MALA, EnergyMLP, EnergyTilted, EnergyTiltedNormal, Importance,
                                SelfNormalized, ShortRunLangevin, Unnormalized)

N, D, P, SD = 5, 3, 4, 0.5
F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh(fresh_pyro):
    yield


@pytest.fixture
def float64():
    """Pyro's AffineAutoregressive inverse builds its buffer in the default dtype (pyro 1.9.2): a float64 flow
    inverts only when float64 is the default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def _randomize(module, sd=0.4):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, sd)
    return module


def make_flow():
    """Two affine-autoregressive layers with random non-zero weights, then an affine map (float64)."""
    layers = [_randomize(T.affine_autoregressive(D, hidden_dims=[8]).to(F64)) for _ in range(2)]
    affine = T.AffineTransform(torch.tensor([0.3, -1.0, 2.0], dtype=F64), torch.tensor([1.5, 0.7, -2.0], dtype=F64),
                               event_dim=1)
    return T.ComposeTransform(layers + [affine])


def make_nets():
    torch.manual_seed(1)
    energy = _randomize(EnergyMLP(D, 16).to(F64), 0.5)
    generator = _randomize(torch.nn.Linear(D, P).to(F64), 0.5)
    return energy, generator


def make_model(energy, generator, prior):
    """``prior()`` builds the tilted distribution of z (inside the data plate); x | z is observed."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior())
            pyro.sample("x", dist.Normal(generator(z), SD).to_event(1), obs=x)
        return z

    return model


def log_joint(model, values, *args):
    """Per-datum log joint of all sample sites (normalizer off), with ``values`` at the latent sites."""
    with normalizer(Unnormalized()):
        tr = poutine.trace(poutine.condition(model, data=values)).get_trace(*args)
    tr.compute_log_prob()
    return sum(site["log_prob"] for site in tr.nodes.values()
               if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample")


def _flow_prior(energy, flow):
    base = dist.Normal(torch.zeros(D, dtype=F64), 1.0).to_event(1)
    return lambda: EnergyTilted(energy, dist.TransformedDistribution(base, flow))


def _normal_prior(energy):
    loc = torch.tensor([0.5, -0.3, 1.0], dtype=F64)
    scale = torch.tensor([0.8, 1.4, 0.6], dtype=F64)
    return lambda: EnergyTiltedNormal(energy, loc, scale)


# --- 1. exact densities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["a: base is the flow", "b: Normal base carried by the flow"])
def test_reparameterised_log_density_is_the_pulled_back_one(form, float64):
    energy, generator = make_nets()
    flow = make_flow()
    prior = _flow_prior(energy, flow) if form.startswith("a") else _normal_prior(energy)
    model = make_model(energy, generator, prior)
    model_u = poutine.reparam(model, config={"z": FlowBackbone(flow)})
    x = torch.randn(N, P, dtype=F64)
    u = 1.3 * torch.randn(N, D, dtype=F64)
    z = flow(u)
    ladj = flow.log_abs_det_jacobian(u, z)
    assert ladj.shape == (N,) and ladj.abs().min() > 1e-2  # a non-trivial Jacobian
    got = log_joint(model_u, {"z_u": u}, x)
    # the original model evaluates q_T(z) by inverting the flow: a fresh tensor, not the transform's cache
    want = log_joint(model, {"z": z.detach().clone()}, x) + ladj
    assert got.shape == (N,)
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["a", "b"])
def test_trace_has_a_u_site_and_a_deterministic_z(form):
    energy, generator = make_nets()
    flow = make_flow()
    prior = _flow_prior(energy, flow) if form == "a" else _normal_prior(energy)
    model = make_model(energy, generator, prior)
    with sampler(ShortRunLangevin(2, 0.1)):
        tr = poutine.trace(poutine.reparam(model, config={"z": FlowBackbone(flow)})).get_trace(
            torch.randn(N, P, dtype=F64))
    u_site, z_site = tr.nodes["z_u"], tr.nodes["z"]
    assert isinstance(u_site["fn"], EnergyTilted) and not u_site["is_observed"]
    assert tuple(u_site["fn"].batch_shape) == (N,) and tuple(u_site["fn"].event_shape) == (D,)
    assert [f.name for f in u_site["cond_indep_stack"]] == ["data"]
    assert z_site["is_observed"] and isinstance(z_site["fn"].base_dist, dist.Delta)
    torch.testing.assert_close(z_site["value"], flow(u_site["value"]))
    # the base over u is the standard Normal: samplers start from it unchanged
    torch.testing.assert_close(u_site["fn"].base.mean, torch.zeros(N, D, dtype=F64))
    torch.testing.assert_close(u_site["fn"].base.stddev, torch.ones(N, D, dtype=F64))


def test_transform_none_uses_the_flow_of_the_base():
    energy, generator = make_nets()
    flow = make_flow()
    model = make_model(energy, generator, _flow_prior(energy, flow))
    x, u = torch.randn(N, P, dtype=F64), torch.randn(N, D, dtype=F64)
    a = log_joint(poutine.reparam(model, config={"z": FlowBackbone()}), {"z_u": u}, x)
    b = log_joint(poutine.reparam(model, config={"z": FlowBackbone(flow)}), {"z_u": u}, x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrappers_and_event_dims_are_kept():
    """A prior reinterpreted with .to_event(1) (event dim 2) stays so on the u site and the Delta."""
    energy, _ = make_nets()
    flow = make_flow()
    loc, scale = torch.zeros(N, D, dtype=F64), torch.ones(N, D, dtype=F64)

    def model():
        return pyro.sample("z", EnergyTiltedNormal(energy, loc, scale).to_event(1))

    u = torch.randn(N, D, dtype=F64)
    model_u = poutine.reparam(model, config={"z": FlowBackbone(flow)})
    with normalizer(Unnormalized()):
        tr = poutine.trace(poutine.condition(model_u, data={"z_u": u})).get_trace()
    assert tr.nodes["z_u"]["fn"].event_dim == 2 and tr.nodes["z"]["fn"].event_dim == 2
    direct = EnergyTiltedNormal(energy, loc, scale, normalizer=Unnormalized())
    want = (direct.log_prob(flow(u)) + flow.log_abs_det_jacobian(u, flow(u))).sum()
    torch.testing.assert_close(tr.nodes["z_u"]["fn"].log_prob(u), want.detach())


def test_normalizer_and_sampler_carry_over():
    energy, _ = make_nets()
    flow = make_flow()
    norm, samp = SelfNormalized(10, name="b_flow"), MALA(3, 0.1)

    def model():
        return pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64),
                                                   normalizer=norm, sampler=samp))

    tr = poutine.trace(poutine.reparam(model, config={"z": FlowBackbone(flow)})).get_trace()
    fn = tr.nodes["z_u"]["fn"]
    assert fn.normalizer is norm and fn.sampler is samp
    assert torch.isfinite(fn.log_prob(tr.nodes["z_u"]["value"]))
    # the effect handlers reach the u site, on either side of the reparam
    with sampler(ShortRunLangevin(1, 0.1)):
        tr = poutine.trace(normalizer(poutine.reparam(model, config={"z": FlowBackbone(flow)}), Importance(4))
                           ).get_trace()
    assert isinstance(tr.nodes["z_u"]["fn"].normalizer, Importance)
    assert isinstance(tr.nodes["z_u"]["fn"].sampler, ShortRunLangevin)


def test_log_z_is_the_same_on_the_u_site():
    """Form (b) with an affine flow on the quadratic case: the importance estimate of log Z on the u site (from
    N(0, I) in u) agrees with the closed form."""
    case = make_case()
    A, b = torch.as_tensor(case.A), torch.as_tensor(case.b)
    energy = lambda z: 0.5 * ((z @ A) * z).sum(-1) + z @ b
    flow = T.LowerCholeskyAffine(torch.tensor([0.2, -0.1, 0.3], dtype=F64),
                                 torch.tensor([[1.1, 0, 0], [0.3, 0.8, 0], [-0.2, 0.1, 1.2]], dtype=F64))

    def model():
        return pyro.sample("z", EnergyTiltedNormal(energy, torch.as_tensor(case.loc), torch.as_tensor(case.scale)))

    tr = poutine.trace(poutine.reparam(model, config={"z": FlowBackbone(flow)})).get_trace()
    est = Importance(20000).estimate(tr.nodes["z_u"]["fn"])
    assert abs(float(est.log_z) - case.log_z) < 4 * float(est.stderr)


# --- 2. samplers run in u space ---------------------------------------------------------------------------
def test_mala_in_u_space_recovers_the_tilted_moments():
    case = make_case()
    A, b = torch.as_tensor(case.A), torch.as_tensor(case.b)
    energy = lambda z: 0.5 * ((z @ A) * z).sum(-1) + z @ b
    flow = T.LowerCholeskyAffine(torch.tensor([1.0, -0.5, 0.5], dtype=F64),
                                 torch.tensor([[0.7, 0, 0], [0.4, 1.3, 0], [-0.3, 0.2, 0.9]], dtype=F64))
    n = 2000

    def model():
        prior = EnergyTiltedNormal(energy, torch.as_tensor(case.loc), torch.as_tensor(case.scale),
                                   normalizer=Unnormalized())
        with pyro.plate("chains", n):
            return pyro.sample("z", prior)

    with sampler(MALA(300, 0.6)):
        tr = poutine.trace(poutine.reparam(model, config={"z": FlowBackbone(flow)})).get_trace()
    z = tr.nodes["z"]["value"].detach().numpy()
    assert z.shape == (n, D)
    np.testing.assert_allclose(z, flow(tr.nodes["z_u"]["value"]).detach().numpy())
    var = np.diag(case.cov)
    assert np.all(np.abs(z.mean(0) - case.mean) < 4 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0, ddof=1) - var) < 4 * var * np.sqrt(2.0 / (n - 1)))


def test_init_value_is_pulled_back(float64):
    from pyro.infer.autoguide.initialization import InitMessenger, init_to_value

    energy, _ = make_nets()
    flow = make_flow()
    z0 = torch.randn(D, dtype=F64)

    def model():
        return pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64)))

    model_u = poutine.reparam(model, config={"z": FlowBackbone(flow)})
    with torch.no_grad():
        tr = poutine.trace(InitMessenger(init_to_value(values={"z": z0}))(model_u)).get_trace()
    assert not tr.nodes["z_u"]["is_observed"]
    torch.testing.assert_close(tr.nodes["z"]["value"], z0)
    torch.testing.assert_close(flow(tr.nodes["z_u"]["value"]), z0)


# --- 3. LEBM: the flow backbone by reparam alone --------------------------------------------------------
def test_lebm_trains_through_the_flow_backbone_without_changing_the_model():
    from tilted_priors.models.pyro import lebm

    latent = 3
    lvm = lebm.build((28, 28, 1), latent, ngf=2, energy_hidden=8, prior_sampler=ShortRunLangevin(2, 0.4))
    flow = _randomize(T.affine_autoregressive(latent, hidden_dims=[6]), 0.2)
    model_u = poutine.reparam(lvm.model, config={"z": FlowBackbone(flow)})

    def model(x):  # the flow is a module to train: register it, then run the unchanged, reparameterised model
        pyro.module("flow", flow)
        return model_u(x)

    guide = ShortRunPosterior(model, steps=2, step_size=0.1)
    svi = SVI(model, guide, lebm.optimizer(lr_energy=1e-2, lr_generator=1e-2), Trace_ELBO())
    x = 0.5 * torch.tanh(torch.randn(2, 28, 28, 1))
    assert set(guide(x)) == {"z_u"}
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    loss = svi.step(x)
    assert np.isfinite(loss)
    store = pyro.get_param_store()
    assert {lebm.parameter_group(k) for k in store.keys()} == {"energy", "generator", "other"}
    for name in ("energy$$$net.0.weight", "generator$$$net.0.weight"):
        assert not torch.equal(before[name], store[name].detach()), name
    assert all(torch.isfinite(v).all() for v in store.values())
    assert any(not torch.equal(before[k], v.detach()) for k, v in store.items() if k.startswith("flow$$$"))


# --- 4. errors --------------------------------------------------------------------------------------------
def _run(model, reparam):
    return poutine.trace(poutine.reparam(model, config={"z": reparam})).get_trace()


def test_observed_site_is_refused():
    prior = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D))
    with pytest.raises(ValueError, match="'z'.*observed"):
        _run(lambda: pyro.sample("z", prior, obs=torch.zeros(D)), FlowBackbone(T.AffineTransform(0.0, 2.0)))


def test_non_tilted_site_is_refused():
    with pytest.raises(TypeError, match="'z'.*EnergyTilted"):
        _run(lambda: pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1)),
             FlowBackbone(T.AffineTransform(0.0, 2.0)))


def test_event_dim_other_than_one_is_refused():
    prior = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D))
    prior._event_shape = torch.Size([1, D])  # a tilted distribution whose event is not a vector
    with pytest.raises(ValueError, match="'z'.*event dimension 1"):
        _run(lambda: pyro.sample("z", prior), FlowBackbone(T.AffineTransform(0.0, 2.0)))
    matrix = T.IndependentTransform(T.AffineTransform(0.0, 2.0), 2)
    good = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D))
    with pytest.raises(ValueError, match="'z'.*event dimension"):
        _run(lambda: pyro.sample("z", good), FlowBackbone(matrix))
    with pytest.raises(ValueError, match="'z'.*event"):
        _run(lambda: pyro.sample("z", good), FlowBackbone(T.ReshapeTransform((D,), (D, 1))))


def test_other_bad_uses():
    good = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D))
    with pytest.raises(TypeError, match="Transform"):
        FlowBackbone(lambda u: u)
    with pytest.raises(ValueError, match="'z'.*not a flow"):
        _run(lambda: pyro.sample("z", good), FlowBackbone())
    with_proposal = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D),
                                       normalizer=Importance(10, proposal=dist.Normal(torch.zeros(D), 1.0).to_event(1)))
    with pytest.raises(ValueError, match="'z'.*proposal"):
        _run(lambda: pyro.sample("z", with_proposal), FlowBackbone(T.AffineTransform(0.0, 2.0)))
