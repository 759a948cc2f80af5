"""Shared fixtures: the quadratic reference case and the backend adapter (see helpers.py)."""
import pytest

from helpers import BACKENDS, QuadraticCase, make_case


@pytest.fixture
def quadratic_case() -> QuadraticCase:
    """The sampler-correctness reference: a quadratic energy, so the tilted prior is a known Gaussian."""
    return make_case()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    """Each test that takes it runs once on Pyro and once on NumPyro."""
    return BACKENDS[request.param](seed=0)
