"""``log_likelihood`` on both backends against closed forms.

The linear-Gaussian model with a tilted prior: :math:`z \\sim e^{-E(z)} \\mathcal N(z; m_0, S_0) / Z` with the
quadratic energy of :class:`QuadraticCase` (so :math:`z \\sim \\mathcal N(m, C)`), :math:`x \\mid z \\sim
\\mathcal N(W z, s^2 I)` observed; then :math:`\\log p(x) = \\log \\mathcal N(x; W m, W C W^T + s^2 I)`. The
statistical checks allow 4 standard errors (the estimate's own, which includes the AIS error of log Z).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from helpers import QuadraticCase, make_case

S = 0.5  # observation noise


def _problem(dim_x: int = 4, seed: int = 1):
    case = make_case()
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(dim_x, case.dim)) / math.sqrt(case.dim)
    x = rng.normal(size=dim_x)
    return case, W, x


def _exact(case: QuadraticCase, W: np.ndarray, x: np.ndarray) -> float:
    return float(multivariate_normal(W @ case.mean, W @ case.cov @ W.T + S ** 2 * np.eye(len(x))).logpdf(x))


def _posterior(case: QuadraticCase, W: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    precision = np.linalg.inv(case.cov) + W.T @ W / S ** 2
    cov = np.linalg.inv(precision)
    return cov @ (np.linalg.solve(case.cov, case.mean) + W.T @ x / S ** 2), cov


def _api(backend):
    """``(sample, dist, log_likelihood with the backend's key handling)``."""
    if backend.name == "pyro":
        import pyro.distributions as dist

        from tilted_priors.inference.pyro import log_likelihood

        return backend.pyro.sample, dist, log_likelihood
    import numpyro.distributions as dist

    from tilted_priors.inference.numpyro import log_likelihood

    return backend.numpyro.sample, dist, lambda *a, **k: log_likelihood(*a, rng_key=backend.key(), **k)


def _linear_gaussian(backend, case: QuadraticCase, W: np.ndarray):
    sample, dist, _ = _api(backend)
    Wt = backend.array(W.T)

    def model(x):
        z = sample("z", backend.prior(case))
        sample("x", dist.Normal(z @ Wt, S).to_event(1), obs=x)

    return model


def _gaussian_guide(backend, mean: np.ndarray, cov: np.ndarray, name: str = "z"):
    """A fixed (already "trained") guide: a multivariate normal over ``name``."""
    sample, dist, _ = _api(backend)
    loc, tril = backend.array(mean), backend.array(np.linalg.cholesky(cov))

    def guide(x):
        sample(name, dist.MultivariateNormal(loc, scale_tril=tril))

    return guide


def _check(est, exact: float) -> None:
    assert math.isfinite(est.stderr) and est.stderr > 0
    assert abs(est.log_likelihood - exact) < 4 * est.stderr, (est.log_likelihood, exact, est.stderr)


def test_laplace_proposal_matches_closed_form(backend):
    case, W, x = _problem()
    _, _, log_likelihood = _api(backend)
    est = log_likelihood(_linear_gaussian(backend, case, W), backend.array(x), num_samples=500)
    _check(est, _exact(case, W, x))
    # the posterior is Gaussian, so the Laplace proposal is (close to) exact: nearly equal weights
    assert est.ess > 0.9 * 500 and est.log_weights.shape == (500,)
    (site,) = est.log_z
    assert site == "z" and abs(float(est.log_z["z"].log_z) - case.log_z) < 4 * float(est.log_z["z"].stderr)


def test_given_guide_matches_closed_form(backend):
    case, W, x = _problem()
    _, _, log_likelihood = _api(backend)
    mean, cov = _posterior(case, W, x)
    guide = _gaussian_guide(backend, mean + 0.2, 1.5 * cov)  # off-centre and wider than the posterior
    est = log_likelihood(_linear_gaussian(backend, case, W), backend.array(x), proposal=guide, num_samples=1000)
    _check(est, _exact(case, W, x))
    assert 50 < est.ess < 1000


def test_known_log_z_one_draw_at_a_time(backend):
    """A dict of known log Z values (error 0: the stderr is the weights' alone), particles drawn in a loop."""
    case, W, x = _problem()
    _, _, log_likelihood = _api(backend)
    mean, cov = _posterior(case, W, x)
    est = log_likelihood(_linear_gaussian(backend, case, W), backend.array(x), num_samples=100,
                         proposal=_gaussian_guide(backend, mean, 1.3 * cov), log_z={"z": case.log_z},
                         vectorize=False)
    _check(est, _exact(case, W, x))
    assert float(est.log_z["z"].stderr) == 0.0


def test_observed_tilted_site_is_normalised(backend):
    """A data-space energy model (no latents): the result is the normalised log density at x, exactly once."""
    case = make_case()
    sample, _, log_likelihood = _api(backend)
    x = np.array([0.3, -0.2, 0.5])

    def model(x):
        sample("x", backend.prior(case), obs=x)

    est = log_likelihood(model, backend.array(x))
    exact = float(multivariate_normal(case.mean, case.cov).logpdf(x))
    _check(est, exact)
    assert est.ess == math.inf and est.log_weights.shape == (1,)


def test_pyro_param_store_is_left_as_it_was():
    import pyro
    import torch

    from helpers import PyroBackend
    from tilted_priors.inference.pyro import log_likelihood

    backend = PyroBackend()
    case, W, x = _problem()
    pyro.param("untouched", torch.tensor(1.5))
    log_likelihood(_linear_gaussian(backend, case, W), backend.array(x), num_samples=20, laplace_steps=20)
    assert list(pyro.get_param_store().keys()) == ["untouched"]
    assert float(pyro.param("untouched").detach()) == 1.5


@pytest.mark.parametrize("kwargs, error, match", [
    ({"proposal": "mcmc"}, ValueError, "'laplace' or a trained guide"),
    ({"proposal": 3}, TypeError, "'laplace' or a trained guide"),
    ({"num_samples": 0}, ValueError, "num_samples must be a positive integer"),
    ({"laplace_lr": -1.0}, ValueError, "laplace_lr must be a finite positive number"),
    ({"log_z": {"w": 0.0}}, ValueError, r"names no such site\(s\) \['w'\]"),
    ({"log_z": {}}, ValueError, r"misses \['z'\]"),
    ({"log_z": "ais"}, TypeError, "log_z must be an estimator"),
])
def test_bad_input(backend, kwargs, error, match):
    case, W, x = _problem()
    _, _, log_likelihood = _api(backend)
    with pytest.raises(error, match=match):
        log_likelihood(_linear_gaussian(backend, case, W), backend.array(x), **kwargs)


def test_guide_must_cover_the_latents_and_have_a_density(backend):
    case, W, x = _problem()
    _, _, log_likelihood = _api(backend)
    model = _linear_gaussian(backend, case, W)
    with pytest.raises(ValueError, match=r"does not sample the latent site\(s\) \['z'\]"):
        log_likelihood(model, backend.array(x), proposal=_gaussian_guide(backend, np.zeros(3), np.eye(3), "w"),
                       log_z={"z": 0.0})
    if backend.name == "pyro":
        from tilted_priors.inference.pyro import ShortRunPosterior
    else:
        from tilted_priors.inference.numpyro import ShortRunPosterior
    with pytest.raises(ValueError, match="have no density"):
        log_likelihood(model, backend.array(x), proposal=ShortRunPosterior(model))


def test_numpyro_needs_a_key():
    import jax.numpy as jnp

    from tilted_priors.inference.numpyro import log_likelihood

    with pytest.raises(ValueError, match=r"rng_key=jax.random.PRNGKey\(0\)"):
        log_likelihood(lambda x: None, jnp.zeros(2))


def test_trained_model_and_guide_from_fit(backend):
    """``fit``'s ``result.model`` / ``result.guide`` go straight into ``log_likelihood`` (model parameter ``loc``
    learned; global latent ``z ~ N(loc, 1)``, ``x_i ~ N(z, 0.5^2)``: ``x ~ N(loc 1, 0.25 I + 1 1^T)``)."""
    sample, dist, log_likelihood = _api(backend)
    if backend.name == "pyro":
        from pyro.infer.autoguide import AutoNormal

        from tilted_priors.inference.pyro import fit
        param, plate = backend.pyro.param, backend.pyro.plate
    else:
        from numpyro.infer.autoguide import AutoNormal

        from tilted_priors.inference.numpyro import fit
        param, plate = backend.numpyro.param, backend.numpyro.plate

    def model(x):
        z = sample("z", dist.Normal(param("loc", backend.array(0.0)), 1.0))
        with plate("data", x.shape[0]):
            sample("x", dist.Normal(z, 0.5), obs=x)

    data = np.random.default_rng(2).normal(2.0, 1.0, size=20).astype(np.float32)
    result = fit(model, AutoNormal(model), data, num_steps=150, batch_size=20, lr=0.1, betas=(0.9, 0.999),
                 progress=False)
    loc = float(result.params["loc"])
    assert loc > 1.0  # learned (it starts at 0)
    est = log_likelihood(result.model, backend.array(data), proposal=result.guide, num_samples=500)
    exact = float(multivariate_normal(np.full(20, loc), 0.25 * np.eye(20) + np.ones((20, 20))).logpdf(data))
    _check(est, exact)
    assert est.log_z == {} and est.ess > 100
