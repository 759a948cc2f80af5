"""RecursiveMixtureGuide / RecursiveMixtureELBO / fit_recursive (Pyro): RME (Kim & Pavlovic 2020).

One component is exactly the amortised guide under Trace_ELBO; the mixture's trace density and each parameter
group's gradient are checked against the formulas written out by hand from the same draws.
"""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from helpers import PyroBackend, make_case
from tilted_priors.inference.pyro import AmortizedGuide, RecursiveMixtureELBO, RecursiveMixtureGuide, fit_recursive
from tilted_priors.pyro import EnergyTiltedNormal, SelfNormalized, Unnormalized

CASE = make_case(dim=2, seed=1)
D, SIGMA = 2, 0.7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def bk():
    return PyroBackend(seed=0)  # seeds Pyro and clears the param store


def tilted_prior(bk, prior_normalizer):
    return EnergyTiltedNormal(bk.quadratic_energy(CASE), bk.array(CASE.loc), bk.array(CASE.scale),
                              normalizer=prior_normalizer)


def linear_model(bk, prior_normalizer, plate=None):
    """z ~ the case's tilted prior in a data plate, x ~ N(w * z, SIGMA^2 I) with a learned w."""

    def model(x):
        w = pyro.param("w", torch.full((D,), 1.3))
        with (plate(x) if plate else pyro.plate("data", x.shape[0])) as ind:
            z = pyro.sample("z", tilted_prior(bk, prior_normalizer))
            pyro.sample("x", dist.Normal(w * z, SIGMA).to_event(1), obs=x[ind] if plate else x)

    return model


class LinearEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 2 * D)

    def forward(self, x):
        loc, raw = self.lin(x).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw) + 1e-4


def shifted(shift, s=0.5):
    return lambda x: (0.5 * x + shift, torch.full_like(x, s))


def loss_and_grads(loss, model, guide, x, seed):
    """The loss and {param name: .grad} (None kept) of one loss_and_grads call; the grads are then cleared."""
    pyro.set_rng_seed(seed)
    with poutine.trace(param_only=True) as tr:
        value = loss.loss_and_grads(model, guide, x)
    store = pyro.get_param_store()
    grads = {}
    for node in tr.trace.nodes.values():
        p = node["value"].unconstrained()
        grads[store.param_name(p)] = None if p.grad is None else p.grad.clone()
        p.grad = None
    return value, grads


# --- 1. one component is the amortised guide ----------------------------------------------------------------------
@pytest.mark.parametrize("num_components", [1, 2])
@pytest.mark.parametrize("subsample", [False, True])
def test_one_active_component_is_trace_elbo_with_the_amortized_guide(bk, num_components, subsample):
    plate = (lambda x: pyro.plate("data", 40, subsample_size=8)) if subsample else None
    model = linear_model(bk, SelfNormalized(32, name="b"), plate)
    encoders = [LinearEncoder() for _ in range(num_components)]
    rme = RecursiveMixtureGuide(model, encoders, barrier=0.0)
    rme.num_active = 1
    plain = AmortizedGuide(model, encoders[0], name="rme.component0")
    x = torch.randn(40 if subsample else 6, D)
    pyro.param("b", torch.tensor(0.3))
    rme.log_weights(x), plain(x)  # the structure traces (and their random draws) happen once per shape: done here

    want, want_grads = loss_and_grads(Trace_ELBO(), model, plain, x, seed=7)
    got, got_grads = loss_and_grads(RecursiveMixtureELBO(), model, rme, x, seed=7)
    assert got == pytest.approx(want, rel=1e-6)
    assert set(got_grads) == set(want_grads) == {"w", "b", "rme.component0$$$lin.weight", "rme.component0$$$lin.bias"}
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    pyro.set_rng_seed(11)
    want = Trace_ELBO().loss(model, plain, x)
    pyro.set_rng_seed(11)
    assert RecursiveMixtureELBO(barrier=2.0).loss(model, rme, x) == pytest.approx(want, rel=1e-6)


# --- 2. the mixture's density and weights ---------------------------------------------------------------------------
def hand_log_weights(logits, m):
    """log pi_k = log e_k + sum_{j > k} log(1 - e_j), e_1 = 1, e_k = sigmoid(logits[k - 2])."""
    e = torch.cat([torch.ones(logits.shape[:-1] + (1,)), torch.sigmoid(logits[..., :m - 1])], -1)
    pi = torch.stack([e[..., k] * torch.prod(1 - e[..., k + 1:], -1) for k in range(m)], -1)
    return pi.log()


class Mixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("amortized", [False, True])
@pytest.mark.parametrize("num_active", [1, 2, 3])
def test_trace_density_is_the_mixtures_log_sum_exp(bk, amortized, num_active):
    model = linear_model(bk, Unnormalized())
    encoders = [shifted(-1.0, 0.4), shifted(0.0, 0.7), shifted(1.5, 1.1)]
    mixing = Mixing() if amortized else None
    guide = RecursiveMixtureGuide(model, encoders, mixing)
    guide.num_active = num_active
    x = torch.randn(5, D)
    if amortized:
        logits = mixing(x).detach()
    else:
        logits = torch.tensor([0.4, -0.9])
        pyro.param("rme.mixing", logits)
    tr = poutine.trace(guide).get_trace(x)
    site = tr.nodes["z"]
    assert isinstance(site["fn"], dist.MixtureSameFamily)
    assert [(f.name, f.size) for f in site["cond_indep_stack"]] == [("data", 5)]
    tr.compute_log_prob()
    z = site["value"]
    log_pi = hand_log_weights(logits.expand(5, 2), num_active)
    log_q = torch.stack([dist.Normal(*enc(x)).log_prob(z).sum(-1) for enc in encoders[:num_active]], -1)
    torch.testing.assert_close(site["log_prob"], torch.logsumexp(log_pi + log_q, -1))
    got = guide.log_weights(x)
    assert got.shape == (5, num_active)
    torch.testing.assert_close(got, log_pi)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(5))


def test_default_weights_are_equal_among_the_active_components(bk):
    guide = RecursiveMixtureGuide(linear_model(bk, Unnormalized()), [shifted(k) for k in range(4)])
    x = torch.randn(3, D)
    for m in range(1, 5):
        guide.num_active = m
        torch.testing.assert_close(guide.log_weights(x).exp(), torch.full((3, m), 1.0 / m))
    guide.num_active = 1
    assert guide.grow() == guide.num_active == 2 and guide.num_components == 4


# --- 3. each parameter gets the gradient of its own objective ----------------------------------------------------
@pytest.mark.parametrize("barrier", [0.0, 0.5, 50.0])
def test_gradient_routing_with_two_components(bk, barrier):
    model = linear_model(bk, Unnormalized())  # a deterministic log joint: the draws are the only noise
    torch.manual_seed(1)
    enc0, enc1 = LinearEncoder(), LinearEncoder()
    guide = RecursiveMixtureGuide(model, [enc0, enc1], barrier=barrier)
    x = torch.randn(7, D)
    pyro.param("rme.mixing", torch.tensor([0.4]))
    guide.log_weights(x)
    for p in enc0.parameters():  # as SVI leaves them after a stage-1 step: zeros, which Adam would still apply
        p.grad = torch.zeros_like(p)

    loss, grads = loss_and_grads(RecursiveMixtureELBO(), model, guide, x, seed=5)
    assert grads["rme.component0$$$lin.weight"] is None and grads["rme.component0$$$lin.bias"] is None

    # by hand, from the same draws (the two components' rsample, in order)
    pyro.set_rng_seed(5)
    (loc0, s0), (loc1, s1) = enc0(x), enc1(x)
    z = [dist.Normal(loc0, s0).rsample(), dist.Normal(loc1, s1).rsample()]
    w = pyro.param("w").unconstrained()
    logit = pyro.param("rme.mixing").unconstrained()
    log_pi = torch.cat([nn.functional.logsigmoid(-logit), nn.functional.logsigmoid(logit)]).expand(7, 2)
    prior = tilted_prior(bk, Unnormalized())
    log_p = [prior.log_prob(zk) + dist.Normal(w * zk, SIGMA).log_prob(x).sum(-1) for zk in z]
    log_q = [[dist.Normal(loc, s).log_prob(zk).sum(-1) for loc, s in ((loc0, s0), (loc1, s1))] for zk in z]
    log_Q = [torch.logsumexp(log_pi + torch.stack(log_q[k], -1), -1) for k in range(2)]
    elbo = sum(log_pi[:, k].exp() * (log_p[k] - log_Q[k]) for k in range(2)).sum()
    kl = log_q[1][1] - log_q[1][0]  # KL(q_2 || Q_1) by Monte Carlo, Q_1 = q_1
    own = (log_p[1] - log_q[1][1] + torch.minimum(kl, torch.tensor(barrier))).sum()

    assert loss == pytest.approx(-elbo.item(), rel=1e-6)
    for name, g in zip(["w", "rme.mixing"], torch.autograd.grad(-elbo, [w, logit], retain_graph=True)):
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)
    own_grads = torch.autograd.grad(-own, list(enc1.parameters()), retain_graph=True)
    for (name, _), g in zip(enc1.named_parameters(), own_grads):
        torch.testing.assert_close(grads[f"rme.component1$$${name}"], g, rtol=1e-5, atol=1e-6)
    # the bonus matters: without it component 1's gradient would be another (at C = 0 through the data whose
    # Monte Carlo KL is negative; at C = 50 through every datum)
    assert bool((kl < 0).any()) and bool((kl < 50.0).all())
    bare = torch.autograd.grad(-(log_p[1] - log_q[1][1]).sum(), enc1.lin.weight, retain_graph=True)[0]
    assert not torch.allclose(grads["rme.component1$$$lin.weight"], bare, rtol=1e-3, atol=1e-5)

    # the non-recursive mixture: every component learns from ELBO(Q_2), as the mixing and the model do
    loss, grads = loss_and_grads(RecursiveMixtureELBO(recursive=False), model, guide, x, seed=5)
    assert loss == pytest.approx(-elbo.item(), rel=1e-6)
    params = [w, logit] + list(enc0.parameters()) + list(enc1.parameters())
    names = ["w", "rme.mixing"] + [f"rme.component{k}$$${n}" for k, enc in enumerate((enc0, enc1))
                                   for n, _ in enc.named_parameters()]
    for name, g in zip(names, torch.autograd.grad(-elbo, params, retain_graph=True)):
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)


def test_frozen_component_does_not_move_under_svi(bk):
    model = linear_model(bk, Unnormalized())
    enc0, enc1 = LinearEncoder(), LinearEncoder()
    guide = RecursiveMixtureGuide(model, [enc0, enc1])
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), RecursiveMixtureELBO())
    x = torch.randn(8, D)
    guide.num_active = 1
    svi.step(x)
    before = [p.detach().clone() for p in enc0.parameters()]
    guide.grow()
    for _ in range(3):
        svi.step(x)
    assert all(torch.equal(a, b) for a, b in zip(before, enc0.parameters()))


# --- 4. the schedule -----------------------------------------------------------------------------------------------
def test_fit_recursive_grows_distinct_components_from_the_previous_stage(bk, tmp_path):
    model = linear_model(bk, SelfNormalized(64, name="b"))
    torch.manual_seed(0)
    encoders = [LinearEncoder(), LinearEncoder()]
    guide = RecursiveMixtureGuide(model, encoders, barrier=1.0)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(64, D)) * 0.5 + 0.5 * rng.choice([-1.0, 1.0], size=(64, 1))
    w_seen = []
    kwargs = dict(batch_size=32, lr=0.02, betas=(0.9, 0.999), progress=False, out=tmp_path,
                  callback=lambda record: w_seen.append(pyro.param("w").detach().clone()))
    results = fit_recursive(model, guide, data, [150, 100], **kwargs)

    assert [r.steps for r in results] == [150, 100] and guide.num_active == 2
    assert all(np.isfinite(r.losses).all() for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["component1", "component2"]
    # stage 2 starts where stage 1 ended: the model moved far in stage 1, then one Adam step (<= lr) in stage 2
    assert (w_seen[149] - 1.3).abs().max() > 0.5
    assert (w_seen[150] - w_seen[149]).abs().max() <= 0.02 + 1e-6
    # the frozen component is exactly stage 1's
    for name, value in results[0].params.items():
        if name.startswith("rme.component0"):
            np.testing.assert_array_equal(results[1].params[name], value)
    assert "rme.mixing" in results[1].params and "rme.mixing" not in results[0].params
    with torch.no_grad():
        x = torch.as_tensor(data, dtype=torch.float32)
        gap = (encoders[1](x)[0] - encoders[0](x)[0]).abs().mean()
    assert gap > 0.1  # no collapse onto component 0
    # each stage resumes from its own checkpoint
    again = fit_recursive(model, guide, data, [150, 100], resume=True, **kwargs)
    assert [r.steps for r in again] == [150, 100]
    np.testing.assert_array_equal(again[1].params["w"], results[1].params["w"])


# --- 5. errors -------------------------------------------------------------------------------------------------------
def test_bad_arguments(bk):
    model = linear_model(bk, Unnormalized())
    with pytest.raises(ValueError, match="at least one encoder"):
        RecursiveMixtureGuide(model, [])
    with pytest.raises(TypeError, match="sequence of encoders"):
        RecursiveMixtureGuide(model, shifted(0.0))
    for bad in (-0.1, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="barrier"):
            RecursiveMixtureGuide(model, [shifted(0.0)], barrier=bad)
        with pytest.raises(ValueError, match="barrier"):
            RecursiveMixtureELBO(barrier=bad)
    guide = RecursiveMixtureGuide(model, [shifted(0.0), shifted(1.0)])
    for bad in (0, 3, 1.5):
        with pytest.raises(ValueError, match="num_active"):
            guide.num_active = bad
    with pytest.raises(ValueError, match="num_active"):
        guide.grow()
    x = torch.randn(4, D)
    with pytest.raises(TypeError, match="RecursiveMixtureGuide"):
        RecursiveMixtureELBO().loss(model, AmortizedGuide(model, shifted(0.0)), x)
    with pytest.raises(ValueError, match="steps_per_component"):
        fit_recursive(model, guide, x.numpy(), [10, 10, 10])
    with pytest.raises(TypeError, match="num_steps"):
        fit_recursive(model, guide, x.numpy(), 10, num_steps=5)
    with pytest.raises(TypeError, match="torch modules"):
        fit_recursive(model, guide, x.numpy(), 10, warm_start=True)
    with pytest.raises(ValueError, match="one per component"):
        fit_recursive(model, guide, x.numpy(), 10, lr=[1e-3])


def test_bad_models_and_mixing(bk):
    x = torch.randn(4, D)

    def two_sites(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("u", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    with pytest.raises(NotImplementedError, match=r"one latent site.*\['u', 'z'\]"):
        RecursiveMixtureGuide(two_sites, [lambda x: {"u": shifted(0.0)(x), "z": shifted(0.0)(x)}])(x)

    def no_plate(x):
        pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    with pytest.raises(ValueError, match="data plate"):
        RecursiveMixtureGuide(no_plate, [lambda x: (torch.zeros(D), torch.ones(D))]).log_weights(x)

    model = linear_model(bk, Unnormalized())
    for logits in (torch.zeros(4, 2), torch.zeros(4), torch.zeros(3, 1)):
        with pytest.raises(ValueError, match=r"mixing returned logits of shape .*\(4, 1\)"):
            RecursiveMixtureGuide(model, [shifted(0.0), shifted(1.0)], lambda x, l=logits: l)(x)
    with pytest.raises(TypeError, match="tensor of logits"):
        RecursiveMixtureGuide(model, [shifted(0.0), shifted(1.0)], lambda x: 0.0)(x)

    def sharing(x):  # the model reads the encoder's parameter
        pyro.param("shared", torch.ones(D))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    guide = RecursiveMixtureGuide(sharing, [lambda x: (pyro.param("shared", torch.ones(D)) * x,
                                                       torch.ones_like(x))])
    with pytest.raises(ValueError, match="'shared' is used by"):
        RecursiveMixtureELBO().loss(sharing, guide, x)
