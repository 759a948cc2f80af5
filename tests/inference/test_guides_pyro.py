"""ShortRunPosterior (Pyro): SVI with it gives exactly the LEBM gradient of a hand-written step."""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from tilted_priors.inference.pyro.guides import ShortRunPosterior
from tilted_priors.inference.pyro.handlers import normalizer, sampler
from tilted_priors.pyro import Contrastive, EnergyMLP, EnergyTiltedNormal, MALA, ShortRunLangevin, Unnormalized

N, D, P, SD = 6, 2, 3, 0.3


class FixedSamples:
    """A 'sampler' returning given negative samples (the prior side is tested in tilted_priors)."""

    def __init__(self, z):
        self.z = z

    def run(self, log_density, init, **kwargs):
        return self.z.expand(init.shape)


def tiny(z_neg):
    torch.manual_seed(0)
    energy, generator = EnergyMLP(D, 8), torch.nn.Linear(D, P)

    def model(x, index=None):
        pyro.module("energy", energy)
        pyro.module("generator", generator)
        with pyro.plate("data", x.shape[0]):
            prior = EnergyTiltedNormal(energy, torch.zeros(D), torch.ones(D),
                                       normalizer=Contrastive(sampler=FixedSamples(z_neg)))
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(generator(z), SD).to_event(1), obs=x)

    return energy, generator, model


def hand_lebm_grads(energy, generator, x, z0, z_neg, steps, h):
    """LEBM by hand: ULA on log p(x, z) from z0, then grad of -[log p(x|z+) - E(z+) + E(z-)] (+ const)."""
    z = z0.clone()
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        lp = (dist.Normal(generator(z), SD).log_prob(x).sum() - energy(z).sum() - 0.5 * (z * z).sum())
        (g,) = torch.autograd.grad(lp, z)
        z = (z + 0.5 * h * h * g + h * torch.randn(z.numel()).reshape(z.shape)).detach()
    loss = -(dist.Normal(generator(z), SD).log_prob(x).sum() - energy(z).sum() + energy(z_neg).sum())
    params = list(energy.parameters()) + list(generator.parameters())
    return z, torch.autograd.grad(loss, params)


def test_svi_step_is_the_lebm_gradient():
    x = torch.randn(N, P)
    z0 = torch.randn(N, D)
    z_neg = torch.randn(N, D)
    energy, generator, model = tiny(z_neg)
    guide = ShortRunPosterior(model, steps=20, step_size=0.1, init=_start_guide(z0))

    pyro.clear_param_store()
    pyro.set_rng_seed(123)
    loss_fn = Trace_ELBO()
    loss = loss_fn.differentiable_loss(model, guide, x)
    params = list(energy.parameters()) + list(generator.parameters())
    got = torch.autograd.grad(loss, params)

    pyro.set_rng_seed(123)
    z_pos, want = hand_lebm_grads(energy, generator, x, z0, z_neg, 20, 0.1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # and the recorded site holds the chain's end point, as a Delta inside the data plate
    pyro.set_rng_seed(123)
    tr = poutine.trace(guide).get_trace(x)
    assert isinstance(tr.nodes["z"]["fn"], dist.Delta)
    assert [f.name for f in tr.nodes["z"]["cond_indep_stack"]] == ["data"]
    torch.testing.assert_close(tr.nodes["z"]["value"], z_pos)


def _start_guide(z0):
    def start(x, index=None):
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Delta(z0, event_dim=1))
    return start


def test_svi_trains_with_noise_init_and_no_prior_chain_inside_the_posterior_chain():
    """With the default Contrastive prior, the posterior chain runs the prior sampler zero times (normalizer off)."""
    calls = []

    class Counting(ShortRunLangevin):
        def run(self, log_density, init, **kwargs):
            calls.append(init.shape)
            return super().run(log_density, init, **kwargs)

    torch.manual_seed(0)
    energy, generator = EnergyMLP(D, 8), torch.nn.Linear(D, P)

    def model(x):
        pyro.module("energy", energy)
        pyro.module("generator", generator)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(D), torch.ones(D), sampler=Counting(5, 0.4)))
            pyro.sample("x", dist.Normal(generator(z), SD).to_event(1), obs=x)

    pyro.clear_param_store()
    svi = SVI(model, ShortRunPosterior(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(torch.randn(N, P) * 0.1) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert calls == [torch.Size([N, D])] * 3  # one prior chain per step (the model's Contrastive term) and no more


def test_persistent_chains_continue_per_datum():
    torch.manual_seed(0)
    energy, generator, model = tiny(torch.zeros(N, D))
    guide = ShortRunPosterior(model, sampler=ShortRunLangevin(3, 0.1, noise=False), init="persistent", num_data=10)
    x = torch.randn(N, P)
    idx = torch.arange(N)
    first = guide(x, index=idx)["z"]
    second = guide(x, index=idx)["z"]
    # the second call continues from the first: the same as one 6-step deterministic chain from the same start
    again = ShortRunPosterior(model, sampler=ShortRunLangevin(3, 0.1, noise=False), init=_start_guide(first))(x)["z"]
    torch.testing.assert_close(second, again)
    state = guide.state_dict()
    assert state["seen"].sum() == N and state["chains.z"].shape == (10, D)
    fresh = ShortRunPosterior(model, sampler=ShortRunLangevin(3, 0.1, noise=False), init="persistent", num_data=10)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x, index=idx)["z"], guide(x, index=idx)["z"])
    with pytest.raises(ValueError, match="index"):
        guide(x)


def test_bad_arguments():
    _, _, model = tiny(torch.zeros(N, D))
    with pytest.raises(ValueError, match="init"):
        ShortRunPosterior(model, init="bogus")
    with pytest.raises(ValueError, match="num_data"):
        ShortRunPosterior(model, init="persistent")
    with pytest.raises(ValueError, match="step_size"):
        ShortRunPosterior(model, step_size=-1.0)

    def discrete():
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="real-valued"):
        ShortRunPosterior(discrete)()


def test_handlers_swap_sampler_and_normalizer_without_touching_the_model():
    prior = lambda: EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(D), torch.ones(D))

    def model():
        with pyro.plate("p", 4):
            pyro.sample("z", prior().to_event(0))

    with sampler(MALA(7, 0.3)), normalizer(Unnormalized()):
        tr = poutine.trace(model).get_trace()
    fn = tr.nodes["z"]["fn"]
    assert fn.sampler == MALA(7, 0.3) or repr(fn.sampler) == "MALA(steps=7, step_size=0.3)"
    assert isinstance(fn.normalizer, Unnormalized)
    assert isinstance(poutine.trace(model).get_trace().nodes["z"]["fn"].normalizer, Contrastive)


def test_two_latent_sites_in_one_plate():
    """Both sites are recorded inside one plate object, so the guide trace has no duplicate plate site."""
    pyro.set_rng_seed(0)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(a + b, 0.5).to_event(1), obs=x)

    guide = ShortRunPosterior(model, steps=5, step_size=0.1)
    x = torch.randn(4, 2)
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    tr = poutine.trace(guide).get_trace(x)
    assert [f.name for f in tr.nodes["a"]["cond_indep_stack"]] == ["data"] == \
        [f.name for f in tr.nodes["b"]["cond_indep_stack"]]


@pytest.mark.parametrize("reads_values", [False, True], ids=["traceable", "python-reads-data"])
def test_compiled_log_joint_gives_the_chain_of_the_model_run_at_every_step(reads_values):
    """compile_log_joint replays a traced graph of the log joint: the same draws as running the model at each
    step; a model whose Python reads tensor values cannot be traced and runs eagerly, with the same result."""
    torch.manual_seed(0)
    energy, generator = EnergyMLP(D, 8), torch.nn.Linear(D, P)

    def model(x):
        pyro.module("energy", energy)
        scale = SD * (1.0 + float(x.abs().max() > 100.0)) if reads_values else SD
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(D), torch.ones(D)))
            pyro.sample("x", dist.Normal(generator(z), scale).to_event(1), obs=x)

    x = torch.randn(N, P)
    draws = {}
    for compiled in (True, False):
        guide = ShortRunPosterior(model, steps=15, step_size=0.1, compile_log_joint=compiled)
        draws[compiled] = []
        for _ in range(3):  # eager, traced, replayed
            pyro.set_rng_seed(7)
            draws[compiled].append(guide(x)["z"])
    for a, b in zip(draws[True], draws[False]):
        assert torch.equal(a, b)
    compiled_guide = ShortRunPosterior(model, steps=3, step_size=0.1)
    for _ in range(3):  # traced at the second call (a graph is traced from a key's second chain on)
        compiled_guide(x)
    assert compiled_guide._graphs.traced == 1
    assert (compiled_guide._graphs.reason is not None) == reads_values


def test_compiled_log_joint_follows_a_setting_changed_between_calls():
    """A Python number the model reads (baked into the traced graph) changes: the check at the chains' start sees
    the graph disagree with the start trace's joint and traces again, so the draws stay those of the eager model."""
    torch.manual_seed(0)
    generator, noise = torch.nn.Linear(D, P), {"sd": SD}

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), torch.zeros(D), torch.ones(D)))
            pyro.sample("x", dist.Normal(generator(z), noise["sd"]).to_event(1), obs=x)

    x = torch.randn(N, P)
    compiled = ShortRunPosterior(model, steps=10, step_size=0.05)
    eager = ShortRunPosterior(model, steps=10, step_size=0.05, compile_log_joint=False)
    for sd in (SD, SD, 1.0, 1.0):
        noise["sd"] = sd
        draws = []
        for guide in (compiled, eager):
            pyro.set_rng_seed(3)
            draws.append(guide(x)["z"])
        assert torch.equal(*draws)
    assert compiled._graphs.traced == 2 and compiled._graphs.reason is None
