"""The ``Langevin`` kernel's mass matrix (preconditioned MALA/ULA), both backends.

The targets are Gaussians with known covariance, so the adapted inverse mass matrix must recover it (within the
Monte Carlo error of the warm-up window it is estimated from), the preconditioned chains must keep the exact
moments (within a few Monte Carlo standard errors) and mix much better than the plain ones where the target is
badly scaled or correlated.
"""
import arviz as az
import numpy as np
import pytest

NUM_WARMUP = 1000
#: Stan's schedule for 1000 warm-up steps (both backends): buffer 75, windows 25, 50, 100, 200, then the last
#: window, steps 450-949, whose draws give the final inverse mass matrix; end buffer 50.
LAST_WINDOW = 500


def gaussian_model(backend, mean, cov):
    """``z ~ N(mean, cov)``: the posterior is the prior, with no data."""
    if backend.name == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    loc, cov = backend.array(mean), backend.array(cov)

    def model():
        backend.site("z", dist.MultivariateNormal(loc, covariance_matrix=cov))

    return model


def adapted(backend, mcmc, block=("z",)) -> np.ndarray:
    """The inverse mass matrix after warm-up: Pyro's ``kernel.inverse_mass_matrix`` (a dict by block, as HMC's),
    NumPyro's ``last_state.adapt_state.inverse_mass_matrix`` (as ``HMCAdaptState``)."""
    if backend.name == "pyro":
        return backend.numpy(mcmc.kernel.inverse_mass_matrix[block])
    return np.asarray(mcmc.last_state.adapt_state.inverse_mass_matrix)


def effective_window(draws: np.ndarray) -> np.ndarray:
    """Effective sample size of the last warm-up window for the (co)variance, per coordinate: the window's length
    times the effective fraction of the sampling draws (``draws``: (chain, draw, d)) for ``(z - mean)^2``."""
    flat = draws.reshape(-1, draws.shape[-1])
    ess = np.array([float(az.ess((draws[..., j] - flat[:, j].mean()) ** 2)) for j in range(flat.shape[1])])
    return np.minimum(ess / len(flat), 1.0) * LAST_WINDOW


def regularized(cov: np.ndarray, n: int = LAST_WINDOW) -> np.ndarray:
    """Stan's (and both backends') shrinkage of the window's covariance estimate toward 1e-3 I."""
    return n / (n + 5.0) * cov + 1e-3 * 5.0 / (n + 5.0) * np.eye(len(cov))


def test_diagonal_mass_matrix_recovers_variances(backend):
    """Standard deviations 10 : 1 : 0.2 (a 50x range): the adapted diagonal is the vector of variances.

    (Each window's estimate comes from a chain preconditioned by the previous one, so a wide direction's variance
    grows window by window from the identity's; a far larger range needs a longer warm-up to converge.)"""
    sd = np.array([10.0, 1.0, 0.2])
    cov = np.diag(sd ** 2)
    mcmc, samples = backend.mcmc(backend.langevin(gaussian_model(backend, np.zeros(3), cov), step_size=0.1),
                                 num_warmup=NUM_WARMUP, num_samples=500)
    inverse_mass = adapted(backend, mcmc)
    assert inverse_mass.shape == (3,)
    # a variance from n effective draws has relative standard error sqrt(2 / n): 5 of them on the log scale
    error = np.abs(np.log(inverse_mass / np.diag(regularized(cov))))
    assert (error < 5.0 * np.sqrt(2.0 / effective_window(samples["z"]))).all(), (inverse_mass, sd ** 2)


def test_dense_mass_matrix_recovers_correlation(backend):
    """Correlation 0.95 with standard deviations 1 and 3: the adapted dense matrix is the covariance."""
    sd, rho = np.array([1.0, 3.0]), 0.95
    cov = np.outer(sd, sd) * np.array([[1.0, rho], [rho, 1.0]])
    kernel = backend.langevin(gaussian_model(backend, np.array([1.0, -2.0]), cov), step_size=0.1, dense_mass=True)
    mcmc, samples = backend.mcmc(kernel, num_warmup=NUM_WARMUP, num_samples=500)
    inverse_mass = adapted(backend, mcmc)
    assert inverse_mass.shape == (2, 2)
    np.testing.assert_allclose(inverse_mass, inverse_mass.T)
    n = effective_window(samples["z"])
    error = np.abs(np.log(np.diag(inverse_mass) / np.diag(regularized(cov))))
    assert (error < 5.0 * np.sqrt(2.0 / n)).all(), (inverse_mass, cov)
    # a sample correlation from n effective draws has standard error (1 - rho^2) / sqrt(n)
    corr = inverse_mass[0, 1] / np.sqrt(inverse_mass[0, 0] * inverse_mass[1, 1])
    assert abs(corr - rho) < 5.0 * (1.0 - rho ** 2) / np.sqrt(n.min()), (corr, n)


def regression_posterior() -> tuple[np.ndarray, np.ndarray]:
    """Posterior of 4 regression coefficients on collinear covariates (flat prior, unit noise): N(beta, (X'X)^-1)."""
    rng = np.random.default_rng(0)
    common = rng.normal(size=(40, 1))
    x = common + 0.15 * rng.normal(size=(40, 4))  # column correlations ~0.98
    cov = np.linalg.inv(x.T @ x)
    return np.array([1.0, -0.5, 0.25, 2.0]), cov


def test_preconditioned_mala_is_exact_and_mixes(backend):
    """On correlated regression coefficients, MALA with a dense mass matrix keeps the exact moments and has a
    much larger bulk ESS than plain MALA (which, with the step size set by the narrowest direction, crawls
    along the widest)."""
    mean, cov = regression_posterior()
    model = gaussian_model(backend, mean, cov)
    ess = {}
    for dense in (True, None):
        options = {"dense_mass": True} if dense else {"adapt_mass_matrix": False}
        _, samples = backend.mcmc(backend.langevin(model, step_size=0.05, **options), num_warmup=NUM_WARMUP,
                                  num_samples=1000)
        z = samples["z"]
        ess[dense] = min(float(az.ess(z[..., j], method="bulk")) for j in range(4))
        if dense:
            for j in range(4):
                d = z[..., j]
                assert abs(d.mean() - mean[j]) < 4 * float(az.mcse(d, method="mean")), (j, d.mean(), mean[j])
                assert abs(d.std() - np.sqrt(cov[j, j])) < 4 * float(az.mcse(d, method="sd")), (j, d.std())
    assert ess[True] > 5 * ess[None], ess


def test_preconditioned_ula_matches_its_stationary_law(backend):
    """ULA with M^-1 = Sigma (given, not adapted) on N(m, Sigma) at step size h: in the whitened coordinates its
    law is N(0, I / (1 - h^2/4)), so its covariance is Sigma / (1 - h^2/4) (and it checks the noise's factor)."""
    mean, cov = regression_posterior()
    h = 1.0
    kernel = backend.langevin(gaussian_model(backend, mean, cov), step_size=h, adjusted=False,
                              adapt_step_size=False, adapt_mass_matrix=False, dense_mass=True,
                              inverse_mass_matrix=backend.array(cov))
    _, samples = backend.mcmc(kernel, num_warmup=100, num_samples=2000)
    z = samples["z"]
    scale = 1.0 / (1.0 - h * h / 4.0)
    for j in range(4):
        d = z[..., j]
        assert abs(d.mean() - mean[j]) < 4 * float(az.mcse(d, method="mean")), (j, d.mean(), mean[j])
        assert abs(d.std() - np.sqrt(scale * cov[j, j])) < 4 * float(az.mcse(d, method="sd")), (j, d.std())
    # the whitened draws are uncorrelated: the dense preconditioner, not only its diagonal, is applied
    white = np.linalg.solve(np.linalg.cholesky(cov), (z.reshape(-1, 4) - mean).T).T
    assert np.abs(np.corrcoef(white.T) - np.eye(4)).max() < 0.15


def test_block_mass_matrix(backend):
    """``dense_mass=[("a",)]``: a dense block for ``a``, a diagonal one for the other sites, keyed by site names."""
    if backend.name == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    cov = np.array([[1.0, 0.9], [0.9, 1.0]])
    loc, cov_a = backend.array(np.zeros(2)), backend.array(cov)

    def model():
        backend.site("a", dist.MultivariateNormal(loc, covariance_matrix=cov_a))
        backend.site("b", dist.Normal(backend.array(np.zeros(3)), 3.0).to_event(1))

    kernel = backend.langevin(model, step_size=0.1, dense_mass=[("a",)])
    mcmc, samples = backend.mcmc(kernel, num_warmup=500, num_samples=100)
    if backend.name == "pyro":
        blocks = {k: backend.numpy(v) for k, v in mcmc.kernel.inverse_mass_matrix.items()}
    else:
        blocks = {k: np.asarray(v) for k, v in mcmc.last_state.adapt_state.inverse_mass_matrix.items()}
    assert set(blocks) == {("a",), ("b",)}
    assert blocks[("a",)].shape == (2, 2) and blocks[("b",)].shape == (3,)
    assert blocks[("a",)][0, 1] > 0.3 and (blocks[("b",)] > 3.0).all()  # the correlation; variances ~9
    assert np.isfinite(samples["b"]).all()


def test_given_inverse_mass_matrix_is_kept(backend):
    """Without adaptation the given matrix (here a diagonal) stays in use, as a dict entry on Pyro."""
    model = gaussian_model(backend, np.zeros(2), np.diag([4.0, 0.25]))
    kernel = backend.langevin(model, step_size=0.5, adapt_mass_matrix=False,
                              inverse_mass_matrix=backend.array([4.0, 0.25]))
    mcmc, samples = backend.mcmc(kernel, num_warmup=50, num_samples=50)
    np.testing.assert_allclose(adapted(backend, mcmc), [4.0, 0.25])


def test_bad_inverse_mass_matrix_shape(backend):
    """Wrong size, a dense matrix for a diagonal mass, a non-square or indefinite matrix: errors that say so."""
    model = gaussian_model(backend, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"inverse_mass_matrix for the sites \('z',\) has shape \(3,\), "
                                         r"expected \(2,\) or \(2, 2\)"):
        backend.mcmc(backend.langevin(model, inverse_mass_matrix=backend.array(np.ones(3)), dense_mass=True),
                     num_warmup=5, num_samples=5)
    with pytest.raises(ValueError, match="pass dense_mass=True"):
        backend.mcmc(backend.langevin(model, inverse_mass_matrix=backend.array(np.eye(2))),
                     num_warmup=5, num_samples=5)
    with pytest.raises(ValueError, match="square matrix"):
        backend.langevin(model, inverse_mass_matrix=backend.array(np.ones((2, 3))))
    with pytest.raises(ValueError, match="positive definite"):
        backend.langevin(model, inverse_mass_matrix=backend.array([[1.0, 2.0], [2.0, 1.0]]), dense_mass=True)
    with pytest.raises(ValueError, match="positive definite"):
        backend.langevin(model, inverse_mass_matrix=backend.array([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"blocks \[\('a',\)\].*\[\('z',\)\]"):
        backend.mcmc(backend.langevin(model, inverse_mass_matrix={("a",): backend.array(np.ones(2))}),
                     num_warmup=5, num_samples=5)


def test_bad_dense_mass(backend):
    model = gaussian_model(backend, np.zeros(2), np.eye(2))
    for bad in ("yes", [("z", "z")], ["z"], [()]):
        with pytest.raises(ValueError, match="dense_mass"):
            backend.langevin(model, dense_mass=bad)
    with pytest.raises(ValueError, match=r"dense_mass names the sites \['w'\].*latent sites: \['z'\]"):
        backend.mcmc(backend.langevin(model, dense_mass=[("w",)]), num_warmup=5, num_samples=5)
