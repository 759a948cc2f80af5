"""Traced log densities (Pyro): the replayed value and gradient are the eager function's, and what a graph cannot
know (replaced parameters, Python that reads tensor values, randomness) is caught or runs eagerly."""
import pytest
import torch

from tilted_priors.pyro import EnergyTiltedNormal, ShortRunLangevin
from tilted_priors.pyro._tracing import GraphCache, TracedLogDensity
from tilted_priors.pyro.langevin import value_and_grad


def _eager(fn, z):
    return value_and_grad(lambda u: fn(u), z)


def _second_chain(cache, fn, inputs, z):
    """A log density of ``cache`` whose key was seen by an earlier chain (graphs are traced from the second)."""
    assert cache.log_density(fn, inputs).replay(z) is None
    return cache.log_density(fn, inputs)


def test_a_key_is_traced_from_its_second_chain_on():
    cache, fn = GraphCache(), lambda z: -z.square().sum(-1)
    first = cache.log_density(fn)
    assert first.replay(torch.ones(3, 2)) is None and first.replay(torch.ones(3, 2)) is None
    assert cache.traced == 0
    assert cache.log_density(fn).replay(torch.ones(3, 2)) is not None
    assert cache.traced == 1


def test_a_cache_made_to_trace_first_traces_at_the_first_chain():
    cache, fn = GraphCache(trace_first=True), lambda z: -z.square().sum(-1)
    lp, grad = cache.log_density(fn).replay(torch.ones(3, 2))
    assert cache.traced == 1 and torch.equal(grad, torch.full((3, 2), -2.0))


def test_replay_gives_the_gradient_of_a_gaussian_and_the_eager_numbers():
    torch.manual_seed(0)
    mu, scale = torch.randn(3), torch.rand(3) + 0.5
    z = torch.randn(5, 3)
    f = _second_chain(GraphCache(), lambda z, mu, s: -0.5 * ((z - mu) / s).square().sum(-1), (mu, scale), z)
    for _ in range(2):  # the first evaluation (checked) and a replay
        lp, grad = f.replay(z)
        torch.testing.assert_close(grad, -(z - mu) / scale ** 2)
        want = _eager(f, z)
        assert torch.equal(lp, want[0]) and torch.equal(grad, want[1])
        assert not lp.requires_grad and not grad.requires_grad


def test_inputs_are_arguments_of_the_graph_and_parameters_are_read_at_replay():
    torch.manual_seed(0)
    energy, cache = torch.nn.Linear(2, 1), GraphCache()
    fn = lambda z, shift: -energy(z - shift).squeeze(-1) - 0.5 * z.square().sum(-1)
    z = torch.randn(4, 2)
    _second_chain(cache, fn, (torch.zeros(2),), z).replay(z)
    with torch.no_grad():
        energy.weight.add_(1.0)  # an optimiser's in-place step
    f = cache.log_density(fn, (torch.ones(2),))
    for _ in range(2):
        assert torch.equal(f.replay(z)[1], _eager(f, z)[1])
    assert cache.traced == 1


def test_a_replaced_parameter_is_traced_again():
    torch.manual_seed(0)
    energy, cache = torch.nn.Linear(2, 1), GraphCache()
    fn = lambda z: -energy(z).squeeze(-1)
    z = torch.randn(4, 2)
    _second_chain(cache, fn, (), z).replay(z)
    energy.weight = torch.nn.Parameter(torch.full((1, 2), 3.0))  # a new tensor: the old graph is stale
    f = cache.log_density(fn)
    torch.testing.assert_close(f.replay(z)[1], torch.full((4, 2), -3.0))
    assert cache.traced == 2


def test_python_that_reads_tensor_values_runs_eagerly():
    z = torch.ones(3, 2)
    f = _second_chain(GraphCache(), lambda z: torch.where(z > 0, -z, z).sum(-1) * (2.0 if z.sum() > 0 else 1.0), (), z)
    assert f.replay(z) is None
    assert "cannot be traced" in f.cache.reason
    lp, grad = value_and_grad(f, z)  # the eager path
    assert torch.equal(grad, torch.full((3, 2), -2.0))


def test_a_random_log_density_runs_eagerly():
    torch.manual_seed(0)
    dropout, z = torch.nn.Dropout(0.5), torch.randn(50, 20)
    f = _second_chain(GraphCache(), lambda z: -dropout(z).square().sum(-1), (), z)
    assert f.replay(z) is None
    assert "disagrees" in f.cache.reason


def test_new_shapes_are_traced_once_each_up_to_max_traces():
    cache = GraphCache(max_traces=2)
    fn = lambda z: -z.square().sum(-1)
    eager = [cache.log_density(fn).replay(torch.ones(n, 2)) is None for n in (2, 3, 2, 3, 2, 3)]
    assert eager == [True, True, False, False, False, False]
    assert cache.traced == 2
    _second_chain(cache, fn, (), torch.ones(4, 2))
    assert cache.log_density(fn).replay(torch.ones(4, 2)) is None
    assert "traced already" in cache.reason


def test_a_prior_chain_on_the_traced_log_density_is_the_eager_chain():
    """EnergyTiltedNormal's chains replay a graph shared by every prior with the energy: the same draws."""
    torch.manual_seed(0)
    energy = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Flatten(0))
    prior = EnergyTiltedNormal(energy, torch.full((2,), 0.5), torch.full((2,), 2.0), sampler=ShortRunLangevin(30, 0.3))
    init = torch.randn(16, 2)
    got = []
    for _ in range(3):  # eager, traced, replayed
        torch.manual_seed(1)
        got.append(prior.sampler.run(prior.annealed_log_density(0.7), init))
    eager = lambda z: -0.5 * ((z - 0.5) / 2.0).square().sum(-1) - 0.7 * energy(z)
    torch.manual_seed(1)
    want = ShortRunLangevin(30, 0.3).run(eager, init)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])
    assert prior.annealed_log_density(0.7).cache.traced == 1
    assert isinstance(prior.annealed_log_density(), TracedLogDensity)


def test_a_log_density_that_writes_in_place_replays_right():
    """A tensor the function makes and then fills in place is made afresh at every replay, not folded once."""
    def fn(z):
        out = torch.zeros(z.shape[0], 3)
        out[:, 0] = z[:, 0]
        out[:, 1:] += z.square()
        return -out.square().sum(-1)

    z = torch.randn(4, 2)
    f = _second_chain(GraphCache(), fn, (), z)
    for scale in (1.0, 2.0, 2.0):
        assert torch.equal(f.replay(scale * z)[1], _eager(fn, scale * z)[1])
