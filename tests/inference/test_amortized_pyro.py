"""AmortizedGuide (Pyro): with the SelfNormalized prior, Trace_ELBO is exactly the SNELBO, and it trains.

The reference is the quadratic case of ``tests/helpers.py``: its tilted prior is a Gaussian with known ``log Z``,
so the SNELBO's gap to the exact ELBO, the value ``b`` is driven to, and the optimal encoder of a linear-Gaussian
model are all in closed form.
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
from tilted_priors.inference.pyro import AmortizedGuide, RefinedGuide, ShortRunPosterior
from tilted_priors.inference.pyro.handlers import normalizer
from tilted_priors.pyro import MALA, EnergyMLP, EnergyTiltedNormal, SelfNormalized, ShortRunLangevin, Unnormalized

# seed 1: the importance weights exp(-E) have finite variance with room to spare (the default seed 0 puts an
# eigenvalue of S0^-1 + 2A at 0.03, so the Monte Carlo error of Zhat is barely finite)
CASE = make_case(dim=2, seed=1)
D, SIGMA = 2, 0.7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def bk():
    return PyroBackend(seed=0)  # seeds Pyro and clears the param store


def quadratic_model(bk, prior_normalizer, plate=None):
    """z ~ the case's tilted prior in a data plate, x ~ N(z, SIGMA^2 I) observed (``plate(x)`` makes the plate)."""
    energy, loc, scale = bk.quadratic_energy(CASE), bk.array(CASE.loc), bk.array(CASE.scale)

    def model(x):
        with (plate(x) if plate else pyro.plate("data", x.shape[0])) as ind:
            z = pyro.sample("z", EnergyTiltedNormal(energy, loc, scale, normalizer=prior_normalizer))
            pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x[ind] if plate else x)

    return model


def fixed_encoder(x):
    return 0.5 * x + 0.1, torch.full_like(x, 0.6)


class LinearEncoder(nn.Module):
    """x -> (W x + c, softplus(V x + e))."""

    def __init__(self, d_in=D, d=D):
        super().__init__()
        self.lin = nn.Linear(d_in, 2 * d)

    def forward(self, x):
        loc, raw = self.lin(x).chunk(2, dim=-1)
        return loc, nn.functional.softplus(raw) + 1e-4


def hand_elbo(bk, x, z, loc_q, scale_q, log_z):
    """sum over data of log N(x|z) + (-E(z) + log N(z; loc, scale)) - log_z - log q(z): the ELBO by hand."""
    log_lik = dist.Normal(z, SIGMA).log_prob(x).sum(-1)
    base = dist.Normal(bk.array(CASE.loc), bk.array(CASE.scale))
    log_tilted = -bk.quadratic_energy(CASE)(z) + base.log_prob(z).sum(-1)
    log_q = dist.Normal(loc_q, scale_q).log_prob(z).sum(-1)
    return (log_lik + log_tilted - log_z - log_q).sum()


def snelbo_and_by_hand(bk, model, guide, snl, x, seed):
    """Trace_ELBO's loss, and from the same random numbers the guide's z and the bound b + exp(-b) Zhat - 1."""
    pyro.set_rng_seed(seed)
    loss = Trace_ELBO().loss(model, guide, x)
    pyro.set_rng_seed(seed)  # the same draws: the guide's noise, then the normalizer's proposals (model replayed)
    z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    prior = EnergyTiltedNormal(bk.quadratic_energy(CASE), bk.array(CASE.loc), bk.array(CASE.scale))
    b = pyro.param(snl.name).detach()
    bound = b + torch.exp(snl.log_z_hat(prior.expand([x.shape[0]])) - b) - 1.0
    return loss, z, bound


# --- 1. the SNELBO identity --------------------------------------------------------------------------------
def test_trace_elbo_is_the_elbo_with_log_z_replaced_by_its_bound(bk):
    snl = SelfNormalized(32, name="b_identity")
    model = quadratic_model(bk, snl)
    guide = AmortizedGuide(model, fixed_encoder)
    x = torch.randn(6, D)
    pyro.param("b_identity", torch.tensor(0.3))  # b != 0, so every part of the bound shows
    guide(x)  # the structure trace (and its random draws) happens once per argument shape: done here
    loss, z, bound = snelbo_and_by_hand(bk, model, guide, snl, x, seed=7)
    assert bound.shape == (6,)
    loc_q, scale_q = fixed_encoder(x)
    want = -hand_elbo(bk, x, z, loc_q, scale_q, bound)
    assert loss == pytest.approx(float(want), rel=1e-6, abs=1e-5)


def test_snelbo_is_below_the_exact_elbo_by_the_bounds_gap(bk):
    """b = 0, n large: E[SNELBO] = ELBO - N (b + Z e^{-b} - 1 - log Z) (only Zhat is random given z)."""
    n_data, repeats = 8, 30
    snl = SelfNormalized(n_data * 25000, name="b_gap")  # the weights' sd is 3.3 Z: Zhat needs many draws
    model = quadratic_model(bk, snl)
    guide = AmortizedGuide(model, fixed_encoder)
    x = torch.randn(n_data, D)
    guide(x)
    loc_q, scale_q = fixed_encoder(x)
    gaps = []
    for r in range(repeats):
        loss, z, _ = snelbo_and_by_hand(bk, model, guide, snl, x, seed=r)
        exact_elbo = hand_elbo(bk, x, z, loc_q, scale_q, CASE.log_z)
        gaps.append(loss + float(exact_elbo))  # exact ELBO - SNELBO
    gaps = np.array(gaps)
    b = 0.0
    expected = n_data * (b + math.exp(CASE.log_z - b) - 1.0 - CASE.log_z)
    stderr = gaps.std(ddof=1) / math.sqrt(repeats)
    assert float(pyro.param("b_gap").detach()) == b
    assert expected > 10 * stderr  # the gap is resolved: it is no Monte Carlo accident
    assert abs(gaps.mean() - expected) < 4 * stderr, (gaps.mean(), expected, stderr)


# --- 2. b is driven to log Z --------------------------------------------------------------------------------
def test_b_tracks_log_z_during_training(bk):
    model = quadratic_model(bk, SelfNormalized(2000, name="b_train", init=-1.0))
    guide = AmortizedGuide(model, LinearEncoder())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    x = torch.randn(16, D)
    bs = []
    for _ in range(300):
        svi.step(x)
        bs.append(float(pyro.param("b_train").detach()))
    dist_to_log_z = np.abs(np.array(bs) - CASE.log_z)
    assert dist_to_log_z[0] > 1.0 and dist_to_log_z[99] < 0.2  # started 1.25 away, moved toward log Z
    # The expected gradient N (1 - e^{-b} Z) vanishes exactly at log Z (Zhat is unbiased), so the iterates end up
    # jittering around it; the jitter (sd of the last 100 iterates, ~lr / 2) sets the tolerance of their mean.
    tail = np.array(bs[-100:])
    assert tail.std() < 0.04
    assert abs(tail.mean() - CASE.log_z) < 0.05, (tail.mean(), CASE.log_z)


# --- 3. plates ------------------------------------------------------------------------------------------------
def frames(site):
    return [(f.name, f.size, f.full_size, f.dim) for f in site["cond_indep_stack"]]


def test_guide_sites_carry_the_models_plates():
    def model(x):
        with pyro.plate("groups", 3, dim=-2), pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", EnergyTiltedNormal(lambda z: (z * z).sum(-1), torch.zeros(D), torch.ones(D),
                                                    normalizer=Unnormalized()))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AmortizedGuide(model, lambda x: (torch.zeros(3, 5, D), torch.ones(3, 5, D)))
    x = torch.randn(5, D)
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    assert frames(guide_tr.nodes["z"]) == frames(model_tr.nodes["z"]) == [("groups", 3, 3, -2), ("data", 5, 5, -1)]
    assert isinstance(guide_tr.nodes["z"]["fn"].base_dist, dist.Normal) and guide_tr.nodes["z"]["fn"].event_dim == 1


def test_subsampled_plate_scales_the_guide_as_the_model(bk):
    """pyro.plate("data", 100, subsample_size=10): the guide draws the indices, Trace_ELBO replays them into the
    model, both sites are scaled by 100/10, and an encoder giving all 100 rows has the subsample's rows taken."""
    model = quadratic_model(bk, Unnormalized(), plate=lambda x: pyro.plate("data", 100, subsample_size=10))
    guide = AmortizedGuide(model, fixed_encoder)
    x = torch.randn(100, D)
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    g, m = guide_tr.nodes["z"], model_tr.nodes["z"]
    assert frames(g) == frames(m) == [("data", 10, 100, -1)]
    assert g["scale"] == m["scale"] == pytest.approx(10.0)
    ind = guide_tr.nodes["data"]["value"]
    assert torch.equal(model_tr.nodes["data"]["value"], ind)
    torch.testing.assert_close(g["fn"].base_dist.loc, fixed_encoder(x)[0][ind])
    # and Trace_ELBO's loss is the hand ELBO of the subsample, times 100/10
    guide(x)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO().loss(model, guide, x)
    pyro.set_rng_seed(3)
    tr = poutine.trace(guide).get_trace(x)
    ind, z = tr.nodes["data"]["value"], tr.nodes["z"]["value"]
    loc_q, scale_q = fixed_encoder(x[ind])
    assert loss == pytest.approx(-10.0 * float(hand_elbo(bk, x[ind], z, loc_q, scale_q, 0.0)), rel=1e-6)


def test_subsample_indices_given_by_the_model_are_used():
    def model(x, index):
        with pyro.plate("data", 100, subsample=index):
            z = pyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D),
                                                    normalizer=Unnormalized()))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AmortizedGuide(model, lambda x, index: fixed_encoder(x))
    x = torch.randn(4, D)
    for index in (torch.tensor([3, 1, 4, 59]), torch.tensor([2, 7, 18, 28])):
        tr = poutine.trace(guide).get_trace(x, index)
        assert torch.equal(tr.nodes["data"]["value"], index) and tr.nodes["z"]["scale"] == pytest.approx(25.0)


def test_model_traced_once_per_argument_shape_and_without_the_prior_sampler():
    calls, chains = [], []

    class Counting(ShortRunLangevin):
        def run(self, log_density, init, **kwargs):
            chains.append(init.shape)
            return super().run(log_density, init, **kwargs)

    def model(x):
        calls.append(x.shape[0])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D),
                                                sampler=Counting(5, 0.1)))

    guide = AmortizedGuide(model, fixed_encoder)
    for n in (8, 8, 8, 5, 8):
        assert guide(torch.randn(n, D))["z"].shape == (n, D)
    assert calls == [8, 5] and chains == []  # retraced when the batch size changed, never ran the prior's chain


# --- 4. errors --------------------------------------------------------------------------------------------------
def one_site_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D)))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("encoder, match", [
    (lambda x: (torch.zeros(5, D + 1), torch.ones(5, D + 1)), r"loc for site 'z' has shape \(5, 3\).*\(5, 2\)"),
    (lambda x: (torch.zeros(5, D), torch.ones(D)), r"scale for site 'z' has shape \(2,\)"),
    (lambda x: (torch.zeros(5, D), torch.zeros(5, D)), r"scale for site 'z' must be positive.*softplus or exp"),
    (lambda x: (torch.zeros(5, D), -torch.ones(5, D)), r"scale for site 'z' must be positive"),
    (lambda x: (torch.zeros(5, D), torch.full((5, D), math.inf)), r"scale for site 'z' must be positive and finite"),
    (lambda x: (torch.full((5, D), math.nan), torch.ones(5, D)), r"loc for site 'z' has non-finite values"),
    (lambda x: {"w": (torch.zeros(5, D), torch.ones(5, D))}, r"model has no latent site.*\['z'\]"),
])
def test_bad_encoder_outputs(encoder, match):
    with pytest.raises(ValueError, match=match):
        AmortizedGuide(one_site_model, encoder)(torch.randn(5, D))


def test_bad_models_and_arguments():
    def two_sites(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w, 1.0).expand([D]).to_event(1))

    loc_scale = (torch.zeros(5, D), torch.ones(5, D))
    x = torch.randn(5, D)
    with pytest.raises(ValueError, match=r"covers sites \['z'\] but the model also has latent sites \['w'\]; give an "
                                         "encoder for them"):
        AmortizedGuide(two_sites, lambda x: {"z": loc_scale})(x)
    with pytest.raises(ValueError, match=r"one \(loc, scale\) pair, but the model has latent sites \['w', 'z'\]"):
        AmortizedGuide(two_sites, lambda x: loc_scale)(x)
    # covering both works, each in its own plates
    both = AmortizedGuide(two_sites, lambda x: {"z": loc_scale, "w": (torch.zeros(()), torch.ones(()))})
    tr = poutine.trace(both).get_trace(x)
    assert tr.nodes["w"]["value"].shape == () and frames(tr.nodes["w"]) == []

    def constrained(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("s", dist.LogNormal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"site 's' has support .*constrained latents are not supported"):
        AmortizedGuide(constrained, lambda x: (torch.zeros(5), torch.ones(5)))(x)
    with pytest.raises(TypeError, match="must return"):
        AmortizedGuide(one_site_model, lambda x: torch.zeros(5, D))(x)
    with pytest.raises(ValueError, match="sites"):
        AmortizedGuide(one_site_model, fixed_encoder, sites=[])
    with pytest.raises(TypeError, match="encoder"):
        AmortizedGuide(one_site_model, "not callable")


# --- 5. it trains: the linear-Gaussian model's optimal encoder ------------------------------------------------------
def test_encoder_learns_the_closed_form_posterior_mean(bk):
    """Prior N(m, P^-1) (the quadratic case), x | z ~ N(z, SIGMA^2 I): the posterior is Gaussian with precision
    P + I / SIGMA^2 and a mean affine in x, and the best diagonal Gaussian (min KL(q || posterior)) has exactly
    that mean and variances 1 / diag(precision); a linear encoder can represent both."""
    model = quadratic_model(bk, SelfNormalized(64, name="b_linear"))
    encoder = LinearEncoder()
    guide = AmortizedGuide(model, encoder)
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal(CASE.mean, CASE.cov, size=64)
    x = bk.array(z + SIGMA * rng.normal(size=z.shape))
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    evaluate = Trace_ELBO(num_particles=256, vectorize_particles=True, max_plate_nesting=1)
    before = evaluate.loss(model, guide, x)
    start = [p.detach().clone() for p in encoder.parameters()]

    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99}), elbo)
    for _ in range(300):
        svi.step(x)

    assert all(not torch.equal(p0, p) for p0, p in zip(start, encoder.parameters()))
    assert evaluate.loss(model, guide, x) < before - 100.0  # -ELBO: 917 -> 199 on this data
    precision = CASE.precision + np.eye(D) / SIGMA ** 2
    cov = np.linalg.inv(precision)
    x_test = bk.array(CASE.mean + 1.5 * rng.normal(size=(100, D)))  # posterior sd ~0.5
    want = (bk.numpy(x_test) / SIGMA ** 2 + CASE.precision @ CASE.mean) @ cov.T
    with torch.no_grad():
        loc, scale = encoder(x_test)
    assert np.abs(bk.numpy(loc) - want).max() < 0.1  # 0.03 seen: the gradient noise left after the lr decay
    np.testing.assert_allclose(bk.numpy(scale), np.broadcast_to(np.diag(precision) ** -0.5, (100, D)), atol=0.03)


# --- 6. one model, many guides ---------------------------------------------------------------------------------
def test_one_model_trains_with_each_guide():
    """An LEBM-like model, never edited: trained by short-run MLE, by the SNELBO (the normalizer swapped by the
    handler), and by short-run chains started at an amortised encoder."""
    P = 5
    torch.manual_seed(0)
    energy = EnergyMLP(D, 16)
    decoder = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, P))

    def model(x):
        pyro.module("energy", energy)
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(D), torch.ones(D),
                                                    sampler=ShortRunLangevin(10, 0.4)))
            pyro.sample("x", dist.Normal(decoder(z), 0.3).to_event(1), obs=x)

    x = torch.randn(16, P)
    runs = {
        "short-run": (model, lambda enc: ShortRunPosterior(model, steps=5)),
        "snelbo": (normalizer(model, SelfNormalized(64, name="b_lebm")), lambda enc: AmortizedGuide(model, enc)),
        "started": (model, lambda enc: ShortRunPosterior(model, steps=5, init=AmortizedGuide(model, enc))),
        "refined": (model, lambda enc: RefinedGuide(AmortizedGuide(model, enc), steps=5)),
    }
    for label, (svi_model, make_guide) in runs.items():
        pyro.clear_param_store()
        encoder = LinearEncoder(P, D)
        nets = {"energy": energy, "decoder": decoder, "encoder": encoder}
        before = {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}
        svi = SVI(svi_model, make_guide(encoder), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        losses = [svi.step(x) for _ in range(3)]
        assert np.isfinite(losses).all(), label
        changed = {k for k, net in nets.items()
                   if any(not torch.equal(p0, p) for p0, p in zip(before[k], net.parameters()))}
        # the energy and the decoder learn under every guide (the energy's output bias only where log Z is
        # estimated: its contrastive gradient is 0); the encoder learns as the guide, and as the chains' start it is
        # only read (RefinedGuide trains it on its own ELBO)
        assert changed == ({"energy", "decoder"} if label in ("short-run", "started") else
                           {"energy", "decoder", "encoder"}), label
        assert ("b_lebm" in pyro.get_param_store()) == (label == "snelbo"), label


# --- 7. RefinedGuide (Hoffman 2017) ----------------------------------------------------------------------------
def linear_gaussian_model(bk):
    """z ~ the case's tilted prior (normalizer off: log p~ is the model's log density), x ~ N(w * z, SIGMA^2 I)."""
    energy, loc, scale = bk.quadratic_energy(CASE), bk.array(CASE.loc), bk.array(CASE.scale)

    def model(x):
        w = pyro.param("w", torch.full((D,), 1.3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", EnergyTiltedNormal(energy, loc, scale, normalizer=Unnormalized()))
            pyro.sample("x", dist.Normal(w * z, SIGMA).to_event(1), obs=x)

    return model


def test_refined_guide_trains_the_model_on_refined_draws_and_the_encoder_on_its_elbo(bk):
    """One Trace_ELBO gradient: the decoder's is that of log p(x, z_K) at the refined draw alone, the encoder's is
    exactly the plain amortised ELBO's (the same noise), and the loss is -log p~(x, z_K) (the encoder's site is 0)."""
    model = linear_gaussian_model(bk)
    encoder = LinearEncoder()
    refined = RefinedGuide(AmortizedGuide(model, encoder), steps=4, step_size=0.5)
    drawn = {}

    def guide(x):
        drawn.update(refined(x))
        return drawn

    x = bk.array(np.random.default_rng(3).normal(size=(6, D)))
    pyro.set_rng_seed(7)
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    w = pyro.param("w")
    loss.backward()
    grad_w, grad_enc = w.grad.clone(), [p.grad.clone() for p in encoder.parameters()]

    z_k = drawn["z"]
    assert not z_k.requires_grad
    prior = EnergyTiltedNormal(bk.quadratic_energy(CASE), bk.array(CASE.loc), bk.array(CASE.scale),
                               normalizer=Unnormalized())
    w_ = w.detach().clone().requires_grad_()
    log_joint = (dist.Normal(w_ * z_k, SIGMA).log_prob(x).sum() + prior.log_prob(z_k).sum())
    torch.testing.assert_close(loss, -log_joint.detach())
    torch.testing.assert_close(grad_w, -torch.autograd.grad(log_joint, w_)[0])

    for p in list(encoder.parameters()) + [w]:
        p.grad = None
    pyro.set_rng_seed(7)
    Trace_ELBO().differentiable_loss(model, AmortizedGuide(model, encoder), x).backward()
    for got, want in zip(grad_enc, [p.grad for p in encoder.parameters()]):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(z_k, encoder(x)[0])  # the chain moved


def test_refined_draws_follow_the_posterior_in_the_encoders_coordinates(bk):
    """A poor fixed encoder (loc 0.3, scale 0.5), 200 whitened ULA steps: the draws' mean is the closed-form
    posterior mean, their covariance ULA's stationary one in u = (z - 0.3) / 0.5 mapped back (4 Monte Carlo
    standard errors)."""
    model = linear_gaussian_model(bk)
    h, s, n = 0.5, 0.5, 4000
    guide = RefinedGuide(AmortizedGuide(model, lambda x: (torch.full_like(x, 0.3), torch.full_like(x, s))),
                         steps=200, step_size=h)
    x0 = np.array([0.8, -0.4])
    with torch.no_grad():
        z = bk.numpy(guide(bk.array(np.tile(x0, (n, 1))))["z"])
    mean, posterior_cov = posterior_moments(x0)
    lam, V = np.linalg.eigh(s * s * np.linalg.inv(posterior_cov))  # the target's precision in u
    cov = s * s * (V * (h * h / (1.0 - (1.0 - 0.5 * h * h * lam) ** 2))) @ V.T
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(z.mean(0) - mean) < 4 * sd / np.sqrt(n))
    assert np.all(np.abs(z.var(0, ddof=1) - np.diag(cov)) < 4 * np.diag(cov) * np.sqrt(2 / n))


def posterior_moments(x0, w=1.3):
    """Closed-form posterior mean and covariance of z given one datum x0 under the linear Gaussian model."""
    precision = CASE.precision + np.eye(D) * w ** 2 / SIGMA ** 2
    return np.linalg.solve(precision, CASE.precision @ CASE.mean + w * x0 / SIGMA ** 2), np.linalg.inv(precision)


def test_mala_refinement_accepts_per_datum_and_is_exact(bk):
    """MALA steps of 1.0 (in the encoder's units) from a poor encoder: each datum's chain accepts on its own, so
    after 200 steps the 4,000 draws have the exact posterior mean and covariance (4 Monte Carlo standard errors).
    One joint accept over the 4,000 data takes the drift towards the mode as a whole but cannot settle each datum's
    spread: its variance stays far from the posterior's."""
    model = linear_gaussian_model(bk)
    n, x0 = 4000, np.array([0.8, -0.4])
    x = bk.array(np.tile(x0, (n, 1)))
    encoder = AmortizedGuide(model, lambda x: (torch.full_like(x, 0.3), torch.full_like(x, 0.5)))
    with torch.no_grad():
        z = bk.numpy(RefinedGuide(encoder, sampler=MALA(200, 1.0))(x)["z"])
        joint = bk.numpy(RefinedGuide(encoder, sampler=MALA(200, 1.0), per_datum=False)(x)["z"])
    mean, cov = posterior_moments(x0)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(z.mean(0) - mean) < 4 * sd / np.sqrt(n))
    assert np.all(np.abs(z.var(0, ddof=1) - np.diag(cov)) < 4 * np.diag(cov) * np.sqrt(2 / n))
    assert np.all(np.abs(joint.var(0, ddof=1) - np.diag(cov)) > 10 * np.diag(cov) * np.sqrt(2 / n))


def test_per_datum_ula_chains_are_the_joint_chain(bk):
    """Under ULA the per-datum chains make exactly the moves of one chain on the summed joint."""
    model = linear_gaussian_model(bk)
    encoder = LinearEncoder()
    x = bk.array(np.random.default_rng(3).normal(size=(6, D)))
    draws = []
    for per_datum in (True, False):
        pyro.set_rng_seed(3)
        with torch.no_grad():
            draws.append(RefinedGuide(AmortizedGuide(model, encoder), steps=5, step_size=0.5,
                                      per_datum=per_datum)(x)["z"])
    torch.testing.assert_close(draws[0], draws[1])


def test_refined_guide_errors(bk):
    model = linear_gaussian_model(bk)
    with pytest.raises(TypeError, match="knows its model"):
        RefinedGuide(fixed_encoder)

    def delta_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(torch.zeros_like(x), event_dim=1))

    delta_guide.model = model
    with pytest.raises(ValueError, match="whiten=False"):
        RefinedGuide(delta_guide)(torch.zeros(3, D))
    assert RefinedGuide(delta_guide, steps=2, whiten=False)(torch.zeros(3, D))["z"].shape == (3, D)
