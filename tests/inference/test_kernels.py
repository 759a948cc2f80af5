"""``MCMC(Langevin(model))`` and ``MCMC(NUTS(model))`` on a model with a tilted prior, both backends.

The prior is the shared quadratic reference case (a Gaussian in closed form) and the likelihood Gaussian, so the
posterior is a known Gaussian; draws must match its means and standard deviations within a few Monte Carlo
standard errors (ArviZ's, which account for autocorrelation).
"""
import arviz as az
import numpy as np
import pytest

from helpers import QuadraticCase, make_case
from tilted_priors.inference.diagnostics import to_inference_data

SIGMA = 0.7
X = np.array([1.0, -0.5])


def posterior(case: QuadraticCase, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian likelihood x ~ N(z, SIGMA^2 I) on the tilted Gaussian prior: a Gaussian posterior."""
    P = case.precision + np.eye(case.dim) / SIGMA ** 2
    cov = np.linalg.inv(P)
    return cov @ (case.precision @ case.mean + x / SIGMA ** 2), cov


def ula_cov(cov: np.ndarray, h: float) -> np.ndarray:
    """Stationary covariance of ULA with step size h on N(m, cov): Sigma = M Sigma M + h^2 I, M = I - h^2/2 P."""
    lam, V = np.linalg.eigh(np.linalg.inv(cov))
    return (V * (h * h / (1.0 - (1.0 - 0.5 * h * h * lam) ** 2))) @ V.T


def check_moments(draws: np.ndarray, case: QuadraticCase, x: np.ndarray, k: float = 3.5,
                  ula_step: float | None = None) -> None:
    """``draws`` (chain, draw, d) match the closed-form posterior (or ULA's law at ``ula_step``) within ``k`` MCSE."""
    mean, cov = posterior(case, x)
    if ula_step is not None:
        cov = ula_cov(cov, ula_step)  # ULA's stationary law on a Gaussian: the same mean, a wider covariance
    for j in range(case.dim):
        d = draws[..., j]
        assert abs(d.mean() - mean[j]) < k * float(az.mcse(d, method="mean")), (j, d.mean(), mean[j])
        assert abs(d.std() - np.sqrt(cov[j, j])) < k * float(az.mcse(d, method="sd")), (j, d.std(), cov[j, j])


@pytest.mark.slow
def test_nuts_recovers_posterior(backend):
    case = make_case(dim=2, seed=6)
    model = backend.regression_model(case, SIGMA)
    num_warmup, num_samples = (300, 800) if backend.name == "pyro" else (500, 2000)
    _, samples = backend.mcmc(backend.nuts(model), X, num_warmup=num_warmup, num_samples=num_samples)
    check_moments(samples["z"], case, X)


def test_mala_recovers_posterior(backend):
    """MALA with its step size adapted in warm-up is exact: the closed-form posterior moments."""
    case = make_case(dim=2, seed=6)
    model = backend.regression_model(case, SIGMA)
    num_samples = 1500 if backend.name == "pyro" else 4000
    mcmc, samples = backend.mcmc(backend.langevin(model, step_size=0.3), X, num_warmup=500,
                                 num_samples=num_samples)
    check_moments(samples["z"], case, X)
    data = to_inference_data(mcmc)  # the MCMC object itself, as ArviZ data
    assert data.posterior["z"].dims == ("chain", "draw", "latent")
    np.testing.assert_allclose(np.asarray(data.posterior["z"]), samples["z"])


def test_ula_matches_its_stationary_law(backend):
    """ULA at a fixed step size h is biased: its law is the Gaussian with ULA's closed-form covariance."""
    case = make_case(dim=2, seed=6)
    model = backend.regression_model(case, SIGMA)
    h = 0.6
    num_samples = 1500 if backend.name == "pyro" else 4000
    # the identity metric: ULA's law under an (adapted) mass matrix M^-1 differs (test_kernels_mass.py)
    kernel = backend.langevin(model, step_size=h, adjusted=False, adapt_step_size=False, adapt_mass_matrix=False)
    _, samples = backend.mcmc(kernel, X, num_warmup=200, num_samples=num_samples)
    check_moments(samples["z"], case, X, ula_step=h)
