"""tilted_priors.inference.pyro.Langevin beyond the shared statistical tests: arguments, adaptation, divergences, the MCMC
interface (diagnostics, logging, several chains, ArviZ) and the potential_fn route."""
import json
import math
import warnings
from unittest import mock

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.infer.mcmc import api

from helpers import PyroBackend, make_case
from tilted_priors.inference.diagnostics import to_inference_data
from tilted_priors.inference.pyro import Langevin
from tilted_priors.errors import ChainDivergenceError, ChainRangeWarning
from tilted_priors.pyro import MALA, EnergyTiltedNormal, Importance, ShortRunLangevin
from tilted_priors.pyro._tracing import GraphCache

SIGMA = 0.7
X = np.array([1.0, -0.5])


def quadratic_model(backend: PyroBackend):
    return backend.regression_model(make_case(dim=2, seed=6), SIGMA)


def quartic_model(x):
    """A tilted prior whose ULA drift grows like z^3: a large step sends the chain to infinity."""
    prior = EnergyTiltedNormal(lambda z: (z ** 4).sum(-1), torch.zeros(2), torch.ones(2),
                               sampler=ShortRunLangevin(5, 0.1))
    z = pyro.sample("z", prior)
    pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def run(kernel, *args, num_warmup=0, num_samples=20, num_chains=1, **kwargs):
    """``MCMC(kernel).run(*args)``, chains one after the other in this process (as PyroBackend.mcmc)."""
    with mock.patch.object(api.mp, "cpu_count", lambda: 1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"num_chains=\d+ is more than available_cpu")
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, num_chains=num_chains,
                    disable_progbar=True, **kwargs)
    mcmc.run(*args)
    return mcmc


# --- arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step_size", [0.0, -0.1, math.nan, math.inf, True, "0.1"])
def test_bad_step_size(step_size):
    with pytest.raises(ValueError, match="step_size"):
        Langevin(quartic_model, step_size=step_size)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.2, math.nan])
def test_bad_target_accept_prob(target):
    with pytest.raises(ValueError, match="target_accept_prob"):
        Langevin(quartic_model, target_accept_prob=target)


def test_model_xor_potential_fn():
    with pytest.raises(ValueError, match="exactly one"):
        Langevin()
    with pytest.raises(ValueError, match="exactly one"):
        Langevin(quartic_model, potential_fn=lambda p: (p["z"] ** 2).sum())
    with pytest.raises(TypeError, match="callable"):
        Langevin("model")


def test_potential_fn_needs_initial_params():
    with pytest.raises(ValueError, match="initial_params"):
        run(Langevin(potential_fn=lambda p: 0.5 * (p["z"] ** 2).sum()))


# --- step size adaptation --------------------------------------------------------------------------------
@pytest.mark.parametrize("step_size", [0.3, 0.01, 3.0])
def test_step_size_adapts_to_target(step_size):
    """From a good, a tiny and a huge first step size, the acceptance after warm-up is near 0.57 (the step size's
    adaptation alone: with the mass matrix's windows it is re-tuned over the last 50 warm-up steps only)."""
    backend = PyroBackend(seed=0)
    kernel = backend.langevin(quadratic_model(backend), step_size=step_size, adapt_mass_matrix=False)
    mcmc, _ = backend.mcmc(kernel, X, num_warmup=500, num_samples=500)
    diag = mcmc.diagnostics()
    assert abs(diag["mean accept prob"]["chain 0"] - 0.57) < 0.1, diag
    assert abs(diag["acceptance rate"]["chain 0"] - 0.57) < 0.1, diag


def test_step_size_fixed_without_adaptation_and_after_warmup():
    backend = PyroBackend(seed=0)
    kernel = backend.langevin(quadratic_model(backend), step_size=0.3, adapt_step_size=False)
    sizes = []
    run(kernel, backend.array(X), num_warmup=10, num_samples=10,
               hook_fn=lambda k, p, stage, i: sizes.append(k.step_size))
    assert sizes == [0.3] * 20
    kernel = backend.langevin(quadratic_model(backend), step_size=0.3)
    sizes.clear()
    mcmc = run(kernel, backend.array(X), num_warmup=30, num_samples=10,
               hook_fn=lambda k, p, stage, i: sizes.append(k.step_size))
    assert len(set(sizes[:30])) > 1 and len(set(sizes[29:])) == 1  # adapted in warm-up only, then fixed
    assert mcmc.diagnostics()["step size"]["chain 0"] == sizes[-1]


# --- divergences -----------------------------------------------------------------------------------------
def test_ula_divergence_raises():
    pyro.set_rng_seed(0)
    kernel = Langevin(quartic_model, step_size=5.0, adjusted=False, adapt_step_size=False)
    with pytest.raises(ChainDivergenceError, match=r"step \d+.*smaller step size than 5") as info, \
            pytest.warns(ChainRangeWarning, match="ran away"):  # before the values become non-finite
        run(kernel, torch.tensor([1.0, -0.5]))
    assert 1 <= info.value.step <= 20 and info.value.sampler == "Langevin (ULA)"


def test_mala_rejects_and_counts_divergences():
    """The same step under MALA: divergent proposals are rejected and counted, the chain stays finite."""
    pyro.set_rng_seed(0)
    mcmc = run(Langevin(quartic_model, step_size=5.0, adapt_step_size=False), torch.tensor([1.0, -0.5]))
    divergences = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(divergences) >= 15 and all(0 <= i < 20 for i in divergences)
    assert torch.isfinite(mcmc.get_samples()["z"]).all()
    data = az.from_pyro(mcmc)
    assert int(data.sample_stats["diverging"].sum()) == len(divergences)
    ours = to_inference_data(mcmc)  # keeps them too, at the same draws
    np.testing.assert_array_equal(np.asarray(ours.sample_stats["diverging"]),
                                  np.asarray(data.sample_stats["diverging"]))


# --- the MCMC interface ----------------------------------------------------------------------------------
def test_diagnostics_logging_and_arviz_with_two_chains():
    backend = PyroBackend(seed=0)
    kernel = backend.langevin(quadratic_model(backend), step_size=0.3)
    mcmc, samples = backend.mcmc(kernel, X, num_warmup=50, num_samples=40, num_chains=2)
    assert samples["z"].shape == (2, 40, 2)
    assert not np.allclose(samples["z"][0], samples["z"][1])  # independent starts and noise
    diag = mcmc.diagnostics()
    assert set(diag["acceptance rate"]) == {"chain 0", "chain 1"}
    assert all(0.0 < r <= 1.0 for r in diag["acceptance rate"].values())
    assert diag["divergences"] == {"chain 0": [], "chain 1": []}
    data = az.from_pyro(mcmc)
    assert data.posterior["z"].shape == (2, 40, 2)
    assert data.sample_stats["diverging"].shape == (2, 40)
    assert np.isfinite(float(az.rhat(data)["z"].max()))


def test_logging_is_json_and_cleanup_idempotent():
    pyro.set_rng_seed(0)
    kernel = Langevin(quartic_model, step_size=0.3, adjusted=False)
    kernel.setup(5, torch.tensor([1.0, -0.5]))
    params = kernel.initial_params
    for _ in range(3):
        params = kernel.sample(params)
    logged = json.loads(json.dumps(kernel.logging()))
    assert set(logged) == {"step size", "acc. prob"} and 0.0 < float(logged["acc. prob"]) <= 1.0
    kernel.cleanup()
    kernel.cleanup()
    assert kernel.initial_params is None


def test_ula_reports_metropolis_probability():
    """ULA keeps every move (acceptance rate 1) and reports the probability MALA would have had (< 1)."""
    backend = PyroBackend(seed=0)
    kernel = backend.langevin(quadratic_model(backend), step_size=0.6, adjusted=False, adapt_step_size=False)
    mcmc, _ = backend.mcmc(kernel, X, num_warmup=20, num_samples=100)
    diag = mcmc.diagnostics()
    assert diag["acceptance rate"]["chain 0"] == 1.0
    assert 0.2 < diag["mean accept prob"]["chain 0"] < 0.99


def test_chain_uses_the_unnormalised_prior():
    """Inside the chain a tilted prior contributes -E(z) + log N(z) only (its normalizer term is off)."""
    energy = lambda z: 0.5 * (z ** 2).sum(-1)  # noqa: E731

    def model():
        pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2), normalizer=Importance(100),
                                            sampler=ShortRunLangevin(5, 0.1)))

    kernel = Langevin(model)
    kernel.setup(0)
    z = torch.tensor([0.3, -1.2])
    expected = energy(z) - dist.Normal(0.0, 1.0).log_prob(z).sum()
    assert torch.allclose(kernel.potential_fn({"z": z}), expected)


# --- the potential_fn route ------------------------------------------------------------------------------
def test_potential_fn_route_samples_a_gaussian():
    pyro.set_rng_seed(0)
    kernel = Langevin(potential_fn=lambda p: 0.5 * (p["z"] ** 2).sum() + 0.5 * (p["w"] ** 2).sum(), step_size=0.5)
    init = {"z": torch.zeros(2, 2), "w": torch.ones(2)}  # leading dimension: one start per chain
    mcmc = run(kernel, num_warmup=200, num_samples=400, num_chains=2, initial_params=init)
    samples = mcmc.get_samples(group_by_chain=True)
    assert samples["z"].shape == (2, 400, 2) and samples["w"].shape == (2, 400)
    flat = torch.cat([samples["z"].reshape(-1), samples["w"].reshape(-1)])
    assert abs(float(flat.mean())) < 0.25 and abs(float(flat.std()) - 1.0) < 0.2


def test_kernel_step_is_the_core_mala_step():
    """With the step size fixed, the kernel's chain is exactly tilted_priors' MALA from the same seed."""
    log_density = lambda z: -0.5 * (z ** 2).sum(-1) - 0.1 * (z ** 4).sum(-1)  # noqa: E731
    start = torch.tensor([0.5, -1.0, 2.0])
    pyro.set_rng_seed(3)
    expected = MALA(25, 0.7).run(log_density, start)
    pyro.set_rng_seed(3)
    kernel = Langevin(potential_fn=lambda p: -log_density(p["z"]), step_size=0.7, adapt_step_size=False)
    kernel.initial_params = {"z": start}
    kernel.setup(0)
    params = kernel.initial_params
    for _ in range(25):
        params = kernel.sample(params)
    assert torch.equal(params["z"], expected)


# --- the compiled potential ------------------------------------------------------------------------------
def _double_well_regression(x, y):
    """A regression with a tilted (double-well) prior on its coefficients and a constrained noise scale."""
    prior = EnergyTiltedNormal(lambda b: ((b ** 2 - 1.0) ** 2).sum(-1), torch.zeros(2), torch.ones(2),
                               sampler=ShortRunLangevin(5, 0.1))
    b = pyro.sample("b", prior)
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ b, s), obs=y)


def _reads_values(x, y):
    b = pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    if float(b.detach().abs().max()) > 1e6:  # Python that reads a tensor's value: torch cannot trace it
        raise AssertionError("unreachable")
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ b, 0.5), obs=y)


@pytest.mark.parametrize("model, traced", [(_double_well_regression, True), (_reads_values, False)],
                         ids=["traced", "eager"])
def test_a_compiled_potential_gives_the_eager_chain(model, traced):
    torch.manual_seed(0)
    x = torch.randn(30, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(30)
    caches = []

    class Recording(GraphCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    draws = []
    for compile_potential in (True, False):
        pyro.set_rng_seed(1)
        kernel = Langevin(model, step_size=0.1, compile_potential=compile_potential)
        with mock.patch("tilted_priors.inference.pyro.kernels.GraphCache", Recording):
            draws.append(run(kernel, x, y, num_warmup=30, num_samples=30).get_samples())
    assert draws[0].keys() == draws[1].keys()
    for name in draws[0]:
        assert torch.equal(draws[0][name], draws[1][name]), name
    (cache,) = caches  # one graph cache for the compiled run, none for the other
    assert (cache.traced, cache.reason is None) == (1, traced)
