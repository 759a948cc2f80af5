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


#: Tests over about 9 s of one core on the project's 2-core machine (``--durations``), run by ``make test-slow``
#: and CI rather than ``make test`` (which has a 15-minute budget on that machine), besides those marked in place.
SLOW = {
    "tests/models/test_cli.py::test_train_resume_and_sample[numpyro]",
    "tests/inference/test_tilt.py::test_default_prior_sampler_draws_a_constrained_site_one_chain_per_run[pyro]",
    "tests/models/test_rme_numpyro.py::test_with_params_puts_every_trained_module_back",
    "tests/inference/test_posthoc.py::test_posthoc_tilt_raises_the_held_out_likelihood_and_leaves_the_vae_frozen"
    "[numpyro-nce]",
    "tests/models/test_vae_ebm_pyro.py::test_importance_weighted_log_likelihood_matches_quadrature[ebm]",
    "tests/models/test_evaluate.py::test_log_likelihood_matches_the_closed_form[numpyro]",
    "tests/inference/test_mixture_numpyro.py::test_fit_recursive_trains_diverse_components_stage_after_stage",
    "tests/inference/test_reparam_numpyro.py::test_lebm_trains_through_the_flow_backbone_without_changing_the_model",
    "tests/models/test_vae_ebm_numpyro.py::test_one_model_trains_with_each_guide[refined]",
    "tests/inference/test_tilt.py::test_joint_tilt_moments_under_mcmc[pyro-nuts]",
    "tests/inference/test_guides_numpyro.py::test_svi_trains_in_a_jitted_update",
    "tests/inference/test_tilt.py::test_network_energy_is_registered_and_trained_by_svi[numpyro]",
    "tests/inference/test_amortized_numpyro.py::"
    "test_refined_guide_trains_the_model_on_refined_draws_and_the_encoder_on_its_elbo",
    "tests/inference/test_kernels_mass.py::test_preconditioned_mala_is_exact_and_mixes[numpyro]",
}


def pytest_collection_modifyitems(config, items):
    ids = {item.nodeid for item in items}
    if all(os.path.isdir(arg) for arg in config.args):  # whole files collected: every name in SLOW must exist
        files = {nodeid.split("::")[0] for nodeid in ids}
        stale = sorted(n for n in SLOW if n.split("::")[0] in files and n not in ids)
        if stale:
            raise pytest.UsageError(f"tests/conftest.py: SLOW names tests that do not exist (renamed?): {stale}")
    for item in items:
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)


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
