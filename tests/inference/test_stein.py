"""The kernel Stein discrepancy: the array layer (tilted_priors.inference.diagnostics.stein) against known answers and
a direct double loop, its bootstrap test, and the scores of both backends against closed forms.

The reference target is a Gaussian N(mu, Sigma) in d = 3, whose score -Sigma^{-1}(x - mu) is known, so every
number here has a known answer:

- for exact i.i.d. draws, E[k_p(x, y)] = 0 for x != y (Stein's identity), so n E[KSD_V^2] = E[k_p(x, x)] =
  tr(Sigma^{-1}) c^{2 beta} - 2 beta d c^{2 beta - 2} exactly, and KSD_V shrinks like 1/sqrt(n);
- the tolerances come from repeating the computations: the mean of KSD_V^2 over 8 seeds, repeated 40 times,
  gives sqrt-ratios between n = 100, 400, 1600 of 2.0 with sd 0.19 (range 1.61-2.51), and n mean(KSD_V^2) /
  E[k_p(x, x)] of 1.0 with sd 0.13 (range 0.69-1.46);
- the wild-bootstrap test rejected 3-6% of 100 exact samples at level 0.05 (n = 300 in d = 2 and 5, n = 1000 in
  d = 16), and every one of 10 samples shifted by 0.25 (n = 300) or scaled by 0.5 or 1.5.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from tilted_priors.inference.diagnostics import SteinDiscrepancy, imq_stein_kernel, stein_discrepancy

D = 3
MU = np.array([1.0, -0.5, 0.3])
L = np.array([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.6]])
COV = L @ L.T
PREC = np.linalg.inv(COV)


def gaussian_draws(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draws from N(MU + shift, scale^2 COV) and the scores of N(MU, COV) at them."""
    x = MU + shift + scale * np.random.default_rng(seed).normal(size=(n, D)) @ L.T
    return x, -(x - MU) @ PREC


# --- known answers ------------------------------------------------------------------------------------------
def test_ksd_of_exact_draws_shrinks_like_one_over_sqrt_n():
    """Means of KSD_V^2 over 8 seeds at n = 100, 400, 1600: each 4x more points halve the KSD (sqrt-ratio 2,
    tolerance 0.5 ~ 2.5 sd of the 8-seed mean), and n E[KSD_V^2] is E[k_p(x, x)] = tr(Sigma^{-1}) + d (beta = -1/2,
    c = 1; tolerance 0.4 ~ 3 sd)."""
    expected = np.trace(PREC) + D
    mean_sq = {n: np.mean([stein_discrepancy(*gaussian_draws(n, 10 * s + i)).ksd_squared for s in range(8)])
               for i, n in enumerate((100, 400, 1600))}
    assert abs(np.sqrt(mean_sq[100] / mean_sq[400]) - 2.0) < 0.5
    assert abs(np.sqrt(mean_sq[400] / mean_sq[1600]) - 2.0) < 0.5
    for n, value in mean_sq.items():
        assert abs(n * value / expected - 1.0) < 0.4, n


def test_u_statistic_of_exact_draws_is_centred_and_the_diagonal_is_what_v_adds():
    """KSD_U^2 is unbiased (mean 0 under p); V - U = (diagonal mean - U) / n exactly."""
    n = 400
    u, v = [], []
    for seed in range(8):
        x, s = gaussian_draws(n, seed)
        ru, rv = stein_discrepancy(x, s, statistic="u"), stein_discrepancy(x, s)
        diag = np.einsum("ij,ij->i", s, s) + D  # k_p(x, x) for beta = -1/2, c = 1
        np.testing.assert_allclose(rv.ksd_squared, ru.ksd_squared + (diag.mean() - ru.ksd_squared) / n, rtol=1e-10)
        assert ru.ksd == np.sqrt(max(ru.ksd_squared, 0.0)) and ru.statistic == "u" and ru.n == n
        u.append(ru.ksd_squared)
        v.append(rv.ksd_squared)
    assert abs(np.mean(u)) < 0.25 * np.mean(v)  # E[V] = E k_p(x, x) / n; U fluctuates on that scale around 0


def test_exact_draws_are_not_rejected():
    """20 exact samples of 300 points: the level-0.05 test rejects fewer than 4 (binomial(20, 0.05): P(>= 4) =
    1.6%), and its p-values are spread over (0, 1)."""
    results = [stein_discrepancy(*gaussian_draws(300, 100 + seed), test=True, seed=seed) for seed in range(20)]
    assert np.mean([r.reject for r in results]) < 0.2
    p = np.array([r.p_value for r in results])
    assert 0.2 < np.mean(p < 0.5) < 0.8
    for r in results:  # the three forms of the verdict agree
        assert r.reject == (r.p_value <= 0.05) == (r.ksd_squared > r.threshold)
        assert r.num_bootstrap == 500 and r.level == 0.05


def test_wrong_mean_or_variance_grows_the_ksd_and_is_rejected():
    n = 300
    shifted = [stein_discrepancy(*gaussian_draws(n, 7, shift=shift)).ksd for shift in (0.0, 0.25, 0.5, 1.0)]
    assert all(a < b for a, b in zip(shifted, shifted[1:])), shifted
    scaled = [stein_discrepancy(*gaussian_draws(n, 7, scale=scale)).ksd for scale in (1.0, 1.25, 1.5, 2.0)]
    assert all(a < b for a, b in zip(scaled, scaled[1:])), scaled
    narrow = [stein_discrepancy(*gaussian_draws(n, 7, scale=scale)).ksd for scale in (1.0, 0.8, 0.5)]
    assert all(a < b for a, b in zip(narrow, narrow[1:])), narrow
    for kwargs in ({"shift": 0.25}, {"shift": 1.0}, {"scale": 0.5}, {"scale": 1.5}):
        for seed in range(3):
            for statistic in ("v", "u"):
                r = stein_discrepancy(*gaussian_draws(n, seed, **kwargs), test=True, statistic=statistic, seed=seed)
                assert r.reject and r.p_value < 0.01, (kwargs, seed, statistic)


# --- the formula, against a direct double loop ---------------------------------------------------------------
def stein_kernel_by_differences(x, y, sx, sy, beta, c, h=1e-4) -> float:
    """k_p(x, y) = s(x).s(y) k + s(x).grad_y k + s(y).grad_x k + tr grad_x grad_y k, the derivatives of the IMQ
    kernel by central differences (independent of the closed form)."""
    k = lambda a, b: (c * c + np.sum((a - b) ** 2)) ** beta
    eye = np.eye(len(x)) * h
    grad_x = np.array([(k(x + e, y) - k(x - e, y)) / (2 * h) for e in eye])
    grad_y = np.array([(k(x, y + e) - k(x, y - e)) / (2 * h) for e in eye])
    trace = sum((k(x + e, y + e) - k(x + e, y - e) - k(x - e, y + e) + k(x - e, y - e)) / (4 * h * h) for e in eye)
    return sx @ sy * k(x, y) + sx @ grad_y + sy @ grad_x + trace


@pytest.mark.parametrize("beta, c", [(-0.5, 1.0), (-0.3, 1.7), (-0.9, 0.5)])
def test_v_and_u_statistics_equal_a_double_loop_over_pairs(beta, c):
    rng = np.random.default_rng(3)
    n, d = 7, 2
    x = rng.normal(size=(n, d)) * 1.5 + 4.0  # off-centre: the blocked code centres the points
    s = rng.normal(size=(n, d))
    pairs = np.array([[stein_kernel_by_differences(x[i], x[j], s[i], s[j], beta, c) for j in range(n)]
                      for i in range(n)])
    v = stein_discrepancy(x, s, beta=beta, c=c)
    u = stein_discrepancy(x, s, beta=beta, c=c, statistic="U")
    np.testing.assert_allclose(v.ksd_squared, pairs.sum() / n ** 2, rtol=1e-6)
    np.testing.assert_allclose(u.ksd_squared, (pairs.sum() - np.trace(pairs)) / (n * (n - 1)), rtol=1e-6)
    np.testing.assert_allclose(imq_stein_kernel(x, x, s, s, beta=beta, c=c), pairs, rtol=1e-6, atol=1e-9)
    assert v.ksd == pytest.approx(np.sqrt(v.ksd_squared)) and v.p_value is None and v.reject is None


def test_blocks_give_the_whole_matrix(monkeypatch):
    """Row blocks of 16 rows (the smallest) over 100 points: the same sums and bootstrap as one block."""
    import tilted_priors.inference.diagnostics.stein as stein

    x, s = gaussian_draws(100, 4, shift=0.2)
    whole = stein_discrepancy(x, s, test=True, num_bootstrap=50)
    monkeypatch.setattr(stein, "_BLOCK_ENTRIES", 1)
    blocked = stein_discrepancy(x, s, test=True, num_bootstrap=50)
    np.testing.assert_allclose(blocked.ksd_squared, whole.ksd_squared, rtol=1e-12)
    np.testing.assert_allclose(blocked.threshold, whole.threshold, rtol=1e-12)
    assert blocked.p_value == whole.p_value
    K = imq_stein_kernel(x, x, s, s)
    np.testing.assert_allclose(whole.ksd_squared, K.mean(), rtol=1e-10)


# --- batches and bad input ----------------------------------------------------------------------------------
def test_batch_dimensions_give_what_separate_calls_give():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 60, 2)) + np.arange(3)[:, None, None] * 0.3
    s = -x
    batch = stein_discrepancy(x, s, test=True, num_bootstrap=99, statistic="u", seed=11)
    assert isinstance(batch, SteinDiscrepancy)
    assert batch.ksd.shape == batch.ksd_squared.shape == batch.p_value.shape == batch.reject.shape == (2, 3)
    assert batch.reject.dtype == bool
    for i in range(2):
        for j in range(3):
            one = stein_discrepancy(x[i, j], s[i, j], test=True, num_bootstrap=99, statistic="u", seed=11)
            assert isinstance(one.ksd, float) and isinstance(one.reject, bool)
            assert one.ksd_squared == pytest.approx(batch.ksd_squared[i, j], rel=1e-12)
            assert one.ksd == pytest.approx(batch.ksd[i, j], rel=1e-12)
            assert one.p_value == batch.p_value[i, j] and one.reject == batch.reject[i, j]
            assert one.threshold == pytest.approx(batch.threshold[i, j], rel=1e-12)


@pytest.mark.parametrize("samples, scores, kwargs, error, match", [
    (np.zeros((5, 2)), np.zeros((5, 3)), {}, ValueError, "scores must have the shape of samples"),
    (np.zeros(5), np.zeros(5), {}, ValueError, r"samples\[:, None\]"),
    (np.zeros((1, 2)), np.zeros((1, 2)), {}, ValueError, "at least n = 2"),
    (np.zeros((5, 0)), np.zeros((5, 0)), {}, ValueError, "d >= 1"),
    (np.array([[0.0], [np.nan]]), np.zeros((2, 1)), {}, ValueError, "samples holds 1 non-finite"),
    (np.zeros((2, 1)), np.array([[0.0], [np.inf]]), {}, ValueError, "scores holds 1 non-finite"),
    ("abc", np.zeros((2, 1)), {}, TypeError, "samples must be an array"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"beta": 0.0}, ValueError, r"beta must be a number in \(-1, 0\)"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"beta": -1.0}, ValueError, "beta must be"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"c": 0.0}, ValueError, "c must be a finite positive number"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"c": np.inf}, ValueError, "c must be"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"kernel": "rbf"}, ValueError, "kernel must be 'imq'"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"statistic": "w"}, ValueError, "statistic must be 'v'"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"test": "yes"}, TypeError, "test must be True or False"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"test": True, "num_bootstrap": 10}, ValueError, "num_bootstrap >= 19"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"test": True, "num_bootstrap": 0}, ValueError, "num_bootstrap must be"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"test": True, "level": 1.5}, ValueError, r"level must be a number in"),
    (np.zeros((4, 1)), np.zeros((4, 1)), {"test": True, "seed": "x"}, TypeError, "seed must be"),
])
def test_bad_input_is_refused_in_the_users_words(samples, scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        stein_discrepancy(samples, scores, **kwargs)


# --- scores from each backend's autodiff --------------------------------------------------------------------
def stein_module(backend):
    return importlib.import_module(f"tilted_priors.inference.{backend.name}.stein")


def test_backend_scores_of_a_gaussian_are_the_closed_form(backend):
    stein = stein_module(backend)
    x, expected = gaussian_draws(50, 0)
    mu, prec = backend.array(MU), backend.array(PREC)

    def log_density(z):  # an unnormalised Gaussian, in the backend's operations
        r = z - mu
        return -0.5 * ((r @ prec) * r).sum(-1)

    np.testing.assert_allclose(stein.stein_scores(log_density, backend.array(x)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stein.stein_scores(log_density, x), expected, rtol=1e-4, atol=1e-5)  # numpy in
    if backend.name == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    mvn = dist.MultivariateNormal(mu, covariance_matrix=backend.array(COV))  # log_prob
    scores = stein.stein_scores(mvn, x)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == x.shape
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4)
    batched = stein.stein_scores(log_density, np.stack([x, x + 1.0]))  # any leading shape
    np.testing.assert_allclose(batched[1], -(x + 1.0 - MU) @ PREC, rtol=1e-4, atol=1e-5)


def test_backend_scores_of_a_tilted_gaussian_are_its_precision(backend, quadratic_case):
    """EnergyTiltedNormal with the quadratic energy: the tilted density is N(m, P^{-1}), score -P (z - m); the
    unnormalised log_tilted is used, so no normalizer runs."""
    stein = stein_module(backend)
    case = quadratic_case
    prior = backend.prior(case)
    z = np.random.default_rng(1).normal(size=(40, case.dim)) * case.sd + case.mean
    expected = -(z - case.mean) @ case.precision
    np.testing.assert_allclose(stein.stein_scores(prior, backend.array(z)), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stein.stein_scores(prior.annealed_log_density(), z), expected, rtol=1e-4, atol=1e-4)


def test_backend_stein_discrepancy_is_the_array_layer_on_autodiff_scores(backend, quadratic_case):
    stein = stein_module(backend)
    case = quadratic_case
    prior = backend.prior(case)
    rng = np.random.default_rng(2)
    exact = case.mean + rng.normal(size=(300, case.dim)) @ np.linalg.cholesky(case.cov).T
    wide = case.mean + 1.6 * (exact - case.mean)
    for z, rejected in ((exact, False), (wide, True)):
        ours = stein.stein_discrepancy(prior, backend.array(z), test=True, seed=3)
        # the samples went through the backend's float dtype (float32 by default on both)
        z32 = backend.numpy(backend.array(z)).astype(np.float64)
        direct = stein_discrepancy(z32, -(z32 - case.mean) @ case.precision, test=True, seed=3)
        assert ours.ksd == pytest.approx(direct.ksd, rel=1e-3)
        assert ours.reject == direct.reject == rejected


def test_backend_errors_name_the_problem(backend):
    stein = stein_module(backend)
    with pytest.raises(TypeError, match="log_density_or_dist must be a log density"):
        stein.stein_scores(3.0, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="one value each"):
        stein.stein_scores(lambda z: z * z, np.zeros((4, 2)))  # (4, 2) -> (4, 2), not (4,)
    with pytest.raises(ValueError, match="d >= 1"):
        stein.stein_scores(lambda z: z.sum(-1), np.zeros((4, 0)))
    with pytest.raises(ValueError, match="scores holds"):  # the density's gradient is inf at 0
        stein.stein_discrepancy(lambda z: (abs(z) ** 0.5).sum(-1), np.zeros((4, 2)))
