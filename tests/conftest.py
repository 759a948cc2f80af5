"""Shared fixtures: the quadratic reference case, the backend adapter (see support/helpers.py), and torch/Pyro state."""
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``make test`` runs the suite in two pytest-xdist workers on the two cores: one compute thread each (XLA's and
    # torch's), so that the workers do not oversubscribe the cores. Set before anything imports JAX or torch.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# JAX's persistent compilation cache, shared by the workers, the tests' subprocesses and later runs: a program that
# several tests compile (the same model, sampler or update) is compiled once. Under the checkout (ignored by git).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

from helpers import BACKENDS, QuadraticCase, make_case


@pytest.fixture
def quadratic_case() -> QuadraticCase:
    """The sampler-correctness reference: a quadratic energy, so the tilted prior is a known Gaussian."""
    return make_case()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    """Each test that takes it runs once on Pyro and once on NumPyro."""
    return BACKENDS[request.param](seed=0)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def one_torch_thread():
    """Small tensors: one torch thread is steadier than two on a shared 2-core machine (two threads collapse under
    any other load); the previous count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_pyro(one_torch_thread):
    """Pyro seeded at 0 with an empty param store (Pyro models adopt stored weights for their module names)."""
    import pyro

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
