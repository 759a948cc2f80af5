"""L-lag coupling bounds: the array layer by hand, the coupled kernels, and the bounds against exact distances.

The exact laws: ULA on :math:`\\mathcal N(0, \\sigma^2)` is an AR(1) chain, :math:`z' = a z + h\\xi` with
:math:`a = 1 - h^2/(2\\sigma^2)`, so from a point :math:`x_0` its law after :math:`t` steps is
:math:`\\mathcal N(a^t x_0, h^2 (1 - a^{2t}) / (1 - a^2))` and its stationary law
:math:`\\mathcal N(0, h^2/(1 - a^2))` (per coordinate for independent coordinates); the TV distance between them is
a quadrature of :math:`|p - q|/2`. MALA's law after :math:`t` steps from :math:`x_0` is an atom at :math:`x_0` (every
proposal so far rejected; the chain cannot return to :math:`x_0` exactly once it has moved) plus a density, both
propagated exactly on a fine grid (:func:`mala_exact_tv`); its TV distance from :math:`\\pi` is
:math:`\\tfrac12(r_t + \\int |c_t - \\pi|)`, :math:`r_t` the atom's mass, :math:`c_t` the density.

Each bound must be at least the exact distance less 3 Monte Carlo standard errors at every step of a grid (the
bound is an estimate of an upper bound, and with the reflection coupling in one dimension a nearly tight one).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy import stats

from tilted_priors.inference.diagnostics import CouplingBound, steps_for, tv_bound_from_meeting_times, \
    w1_bound_from_distances


# --- exact distances --------------------------------------------------------------------------------------------
def ula_law(x0, h: float, sigma, t: int):
    """Mean and variance after ``t`` ULA steps from ``x0`` on N(0, sigma^2), and the stationary variance."""
    a = 1.0 - h * h / (2.0 * np.asarray(sigma) ** 2)
    return a ** t * np.asarray(x0), h * h * (1.0 - a ** (2 * t)) / (1.0 - a * a), h * h / (1.0 - a * a)


def gauss_tv(m1, v1, m2, v2, n: int = 801) -> float:
    """TV between two Gaussians with independent coordinates (1 or 2 of them), by quadrature on a grid."""
    m1, v1, m2, v2 = (np.atleast_1d(np.asarray(a, float)) for a in (m1, v1, m2, v2))
    axes = []
    for i in range(m1.size):
        s = np.sqrt(max(v1[i], v2[i]))
        axes.append(np.linspace(min(m1[i], m2[i]) - 9 * s, max(m1[i], m2[i]) + 9 * s, n))
    grids = np.meshgrid(*axes, indexing="ij")
    p = np.prod([stats.norm.pdf(g, m1[i], np.sqrt(v1[i])) for i, g in enumerate(grids)], axis=0)
    q = np.prod([stats.norm.pdf(g, m2[i], np.sqrt(v2[i])) for i, g in enumerate(grids)], axis=0)
    out = np.abs(p - q)
    for ax in reversed(axes):
        out = np.trapezoid(out, ax, axis=-1)
    return 0.5 * float(out)


@functools.lru_cache(maxsize=None)
def mala_exact_law(x0: float, h: float, ts: tuple, n: int = 1801) -> dict:
    """MALA from ``x0`` on N(0, 1), propagated exactly on a grid: ``{t: (TV(pi_t, pi), atom at x0, mean)}``."""
    y = np.linspace(-9.0, 9.0, n)
    dy = y[1] - y[0]
    mean = lambda z: z - 0.5 * h * h * z

    def moves(x):  # (len(x), n): the density of proposing y from x, times the acceptance probability
        log_q = stats.norm.logpdf(y[None, :], mean(x)[:, None], h)
        log_back = stats.norm.logpdf(x[:, None], mean(y)[None, :], h)
        log_alpha = np.minimum(0.0, -0.5 * y[None, :] ** 2 + log_back + 0.5 * x[:, None] ** 2 - log_q)
        return np.exp(log_q + log_alpha)

    kernel = moves(y) * dy  # kernel[x, y]
    stay = 1.0 - kernel.sum(1)  # the rejection probability at each grid point
    from_atom = moves(np.array([x0]))[0]
    stay_atom = 1.0 - from_atom.sum() * dy
    pi = stats.norm.pdf(y)
    atom, density, out = 1.0, np.zeros(n), {}
    for t in range(1, max(ts) + 1):
        density = density @ kernel + density * stay + atom * from_atom
        atom *= stay_atom
        assert abs(atom + density.sum() * dy - 1.0) < 1e-6  # no mass lost off the grid
        if t in ts:
            out[t] = (0.5 * (atom + np.abs(density - pi).sum() * dy), atom, atom * x0 + (density * y).sum() * dy)
    return out


def mala_exact_tv(x0: float, h: float, ts: tuple) -> dict:
    return {t: v[0] for t, v in mala_exact_law(x0, h, ts).items()}


def test_exact_mala_law_matches_a_simulation():
    """The grid propagation of MALA's law against 200k simulated chains: the atom (all proposals rejected) and
    the mean after 1 and 2 steps, within 4 standard errors."""
    rng = np.random.default_rng(0)
    x0, h, n = 3.0, 0.5, 200_000
    exact = mala_exact_law(x0, h, (1, 2))
    x = np.full(n, x0)
    for t in (1, 2):
        m = x - 0.5 * h * h * x
        p = m + h * rng.normal(size=n)
        log_a = (-0.5 * p ** 2 + stats.norm.logpdf(x, p - 0.5 * h * h * p, h) + 0.5 * x ** 2
                 - stats.norm.logpdf(p, m, h))
        x = np.where(np.log(rng.uniform(size=n)) < log_a, p, x)
        _, atom, mean = exact[t]
        assert abs((x == x0).mean() - atom) < 4 * np.sqrt(atom * (1 - atom) / n) + 1e-9
        assert abs(x.mean() - mean) < 4 * x.std() / np.sqrt(n)
    assert exact[1][1] > 0.005  # the atom matters at the first steps


# --- backends ---------------------------------------------------------------------------------------------------
def run_bound(backend, sampler, log_density, init, **kwargs) -> CouplingBound:
    if backend.name == "pyro":
        from tilted_priors.inference.pyro.coupling import coupling_bound

        return coupling_bound(sampler, log_density, init, **kwargs)
    from tilted_priors.inference.numpyro.coupling import coupling_bound

    return coupling_bound(backend.key(), sampler, log_density, init, **kwargs)


def gaussian(backend, sigma):
    """The log density of N(0, diag(sigma^2)) in the backend's operations."""
    s = backend.array(np.asarray(sigma, float))
    return lambda z: -0.5 * ((z / s) ** 2).sum(-1)


def check_bound(bound: CouplingBound, exact: dict) -> None:
    assert bound.num_unmet == 0 and np.isfinite(bound.meeting_times).all()
    assert np.all(np.diff(bound.tv_bound) <= 0), "the TV bound must not increase with t"
    for t, tv in exact.items():
        assert bound.tv_bound[t] >= tv - 3 * bound.tv_stderr[t], (t, tv, bound.tv_bound[t], bound.tv_stderr[t])


def test_ula_1d_bound_is_above_the_exact_tv(backend):
    h, x0, ts = 0.5, 3.0, (1, 2, 5, 10, 15, 20, 30)
    b = run_bound(backend, backend.tp.ShortRunLangevin(60, h), gaussian(backend, [1.0]), backend.array([x0]),
                  lag=10, num_pairs=1000, max_steps=300)
    exact = {}
    for t in ts:
        m, v, v_inf = ula_law(x0, h, 1.0, t)
        exact[t] = gauss_tv(m, v, 0.0, v_inf)
    check_bound(b, exact)
    assert b.tv_bound[30] < 0.1 and b.steps_for(0.3) is not None
    for t in ts:  # W1 between 1-d Gaussians: E|dm + (s1 - s2) Z| over the comonotone coupling
        m, v, v_inf = ula_law(x0, h, 1.0, t)
        mu, s = m, abs(np.sqrt(v) - np.sqrt(v_inf))
        w1 = s * np.sqrt(2 / np.pi) * np.exp(-mu * mu / (2 * s * s)) + mu * (1 - 2 * stats.norm.cdf(-mu / s))
        assert b.w1_bound[t] >= w1 - 3 * b.w1_stderr[t], (t, w1, b.w1_bound[t], b.w1_stderr[t])


def test_ula_2d_bound_is_above_the_exact_tv(backend):
    h, x0, sigma, ts = 0.5, np.array([3.0, 3.0]), np.array([1.0, 2.0]), (1, 5, 10, 20, 40, 60, 80, 100)
    b = run_bound(backend, backend.tp.ShortRunLangevin(60, h), gaussian(backend, sigma), backend.array(x0),
                  lag=20, num_pairs=1000, max_steps=800)
    exact = {}
    for t in ts:
        m, v, v_inf = ula_law(x0, h, sigma, t)
        exact[t] = gauss_tv(m, v, np.zeros(2), v_inf)
    check_bound(b, exact)


def test_mala_1d_bound_is_above_the_exact_tv(backend):
    h, x0, ts = 0.5, 3.0, (1, 2, 5, 10, 15, 20, 30)
    exact = mala_exact_tv(x0, h, ts)
    b = run_bound(backend, backend.tp.MALA(100, h), gaussian(backend, [1.0]), backend.array([x0]), lag=10,
                  num_pairs=1000, max_steps=300)
    check_bound(b, exact)
    assert b.tv_bound[10] < 0.45  # not vacuous: the exact TV is 0.30 there


def test_init_kinds_and_unmet_pairs(backend):
    """Starting points per pair, a distribution and a function; pairs too far apart to meet make the bound inf."""
    f = gaussian(backend, [1.0, 1.0])
    mala = backend.tp.MALA(10, 0.8)
    starts = backend.array(np.random.default_rng(0).normal(size=(50, 2)))
    b = run_bound(backend, mala, f, starts, lag=5, max_steps=200)
    assert b.num_pairs == 50 and b.num_unmet == 0 and b.steps.tolist() == list(range(201))
    if backend.name == "pyro":
        import pyro.distributions as dist
        import torch

        wide = dist.Normal(torch.zeros(2), 10.0).to_event(1)
        draw = lambda n: 10.0 * torch.randn(n, 2)
    else:
        import jax
        import numpyro.distributions as dist

        wide = dist.Normal(backend.array(np.zeros(2)), 10.0).to_event(1)
        draw = lambda key, n: 10.0 * jax.random.normal(key, (n, 2))
    for init in (wide, draw):
        b = run_bound(backend, backend.tp.ShortRunLangevin(10, 0.05), f, init, lag=2, num_pairs=20, max_steps=4)
        assert b.num_unmet > 0 and np.isinf(b.meeting_times).sum() == b.num_unmet
        assert np.isinf(b.tv_bound).all() and np.isnan(b.tv_stderr).all() and np.isinf(b.w1_bound).all()
        assert b.steps_for(0.5) is None


def test_bad_arguments_are_named(backend):
    f = gaussian(backend, [1.0])
    point = backend.array([1.0])
    tp = backend.tp
    with pytest.raises(ValueError, match="numeric step"):
        run_bound(backend, tp.MALA(10, "auto"), f, point, lag=2, num_pairs=4, max_steps=10)
    with pytest.raises(ValueError, match="noise=False"):
        run_bound(backend, tp.ShortRunLangevin(10, 0.1, noise=False), f, point, lag=2, num_pairs=4, max_steps=10)
    with pytest.raises(TypeError, match=r"\.sampler"):
        run_bound(backend, tp.Persistent(tp.MALA(10, 0.1)), f, point, lag=2, num_pairs=4, max_steps=10)
    with pytest.raises(ValueError, match="max_steps must exceed lag"):
        run_bound(backend, tp.MALA(10, 0.1), f, point, lag=10, num_pairs=4, max_steps=10)
    with pytest.raises(ValueError, match="lag must be a positive integer"):
        run_bound(backend, tp.MALA(10, 0.1), f, point, lag=0, num_pairs=4, max_steps=10)
    with pytest.raises(ValueError, match="give num_pairs"):
        run_bound(backend, tp.MALA(10, 0.1), f, point, lag=2, max_steps=10)
    with pytest.raises(ValueError, match="num_pairs=3"):
        run_bound(backend, tp.MALA(10, 0.1), f, backend.array(np.zeros((5, 1))), lag=2, num_pairs=3, max_steps=10)
    with pytest.raises(ValueError, match="at least 2"):
        run_bound(backend, tp.MALA(10, 0.1), f, point, lag=2, num_pairs=1, max_steps=10)
    with pytest.raises(TypeError, match="integer dtype"):
        run_bound(backend, tp.MALA(10, 0.1), f, _int_array(backend), lag=2, num_pairs=4, max_steps=10)
    with pytest.raises(TypeError, match="init must be"):
        run_bound(backend, tp.MALA(10, 0.1), f, object(), lag=2, num_pairs=4, max_steps=10)


def _int_array(backend):
    if backend.name == "pyro":
        import torch

        return torch.tensor([1, 2])
    import jax.numpy as jnp

    return jnp.array([1, 2])


def test_a_diverging_chain_raises(backend):
    from tilted_priors import ChainDivergenceError

    stiff = gaussian(backend, [0.1])  # curvature 100: a step of 1 multiplies z by -49
    with pytest.raises(ChainDivergenceError, match="coupling_bound"):
        run_bound(backend, backend.tp.ShortRunLangevin(10, 1.0), stiff, backend.array([1.0]), lag=30, num_pairs=4,
                  max_steps=60)


# --- the raw coupled kernel -------------------------------------------------------------------------------------
def coupled_kernel(backend):
    """``(step(state_x, state_y, kind) -> (x, y), init(position) -> state, equal(a, b) -> per-chain bool)``."""
    if backend.name == "pyro":
        import torch

        from tilted_priors.inference.pyro.coupling import _coupled_step
        from tilted_priors.pyro import langevin

        return (lambda f, h: lambda x, y, kind: _coupled_step(None, x, y, f, h, kind),
                lambda z, f: langevin.init(z, f),
                lambda a, b: (a == b).all(-1).numpy())
    import jax

    from tilted_priors.inference.numpyro.coupling import _coupled_step
    from tilted_priors.numpyro import langevin

    return (lambda f, h: lambda x, y, kind: _coupled_step(backend.key(), x, y, f, h, kind),
            lambda z, f: langevin.init(z, f),
            lambda a, b: np.asarray(jax.numpy.all(a == b, -1)))


@pytest.mark.parametrize("kind", ["mala", "ula"])
def test_met_chains_stay_equal_bit_for_bit(backend, kind):
    """Pairs at nearby points meet within a few steps of the raw kernel and are then equal at every later step —
    positions, log densities and gradients — without being forced together."""
    make_step, init, equal = coupled_kernel(backend)
    f = gaussian(backend, [1.0, 2.0, 0.5])
    step = make_step(f, 0.3)
    rng = np.random.default_rng(1)
    start = rng.normal(size=(200, 3))
    x = init(backend.array(start), f)
    y = init(backend.array(start + 0.05 * rng.normal(size=(200, 3))), f)
    met = np.zeros(200, bool)
    for _ in range(30):
        x, y = step(x, y, kind)
        now = equal(x.position, y.position)
        assert now[met].all(), "a pair that met came apart"
        met |= now
        assert (backend.numpy(x.logdensity)[met] == backend.numpy(y.logdensity)[met]).all()
        assert (backend.numpy(x.logdensity_grad)[met] == backend.numpy(y.logdensity_grad)[met]).all()
    assert met.mean() > 0.9


def test_coupled_proposals_keep_their_laws_and_meet_maximally(backend):
    """One ULA step of the coupled kernel: each chain moves by N(mu(z), h^2 I), and the two coincide with the
    probability 1 - TV of the two proposals (the maximal coupling), 2 Phi(-|mu_x - mu_y| / (2h))."""
    make_step, init, equal = coupled_kernel(backend)
    f = gaussian(backend, [1.0, 1.0])
    h, n = 0.5, 4000
    x = init(backend.array(np.tile([0.3, -0.2], (n, 1))), f)
    y = init(backend.array(np.tile([0.0, 0.1], (n, 1))), f)
    new_x, new_y = make_step(f, h)(x, y, "ula")
    shrink = 1.0 - 0.5 * h * h
    for old, new in ((x, new_x), (y, new_y)):
        noise = (backend.numpy(new.position) - shrink * backend.numpy(old.position)) / h
        for j in range(2):
            assert stats.kstest(noise[:, j], "norm").pvalue > 1e-3
    gap = shrink * np.linalg.norm(np.array([0.3, -0.3])) / h
    rate, expected = equal(new_x.position, new_y.position).mean(), 2 * stats.norm.cdf(-gap / 2)
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


# --- the array layer --------------------------------------------------------------------------------------------
def test_tv_bound_by_hand():
    # lag 3, meeting times 4, 9, 3: terms max(0, ceil((tau - 3 - t) / 3)) at t = 0..6
    # tau=4: ceil(1/3)=1, then 0; tau=9: ceil(6/3)=2, ceil(5/3)=2, ceil(4/3)=2, 1, 1, 1, 0; tau=3: 0
    bound, stderr = tv_bound_from_meeting_times(np.array([4, 9, 3]), lag=3, steps=6)
    expected = np.array([[1, 0, 0, 0, 0, 0, 0], [2, 2, 2, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]], float)
    np.testing.assert_allclose(bound, expected.mean(0))
    np.testing.assert_allclose(stderr, expected.std(0, ddof=1) / np.sqrt(3))
    bound, _ = tv_bound_from_meeting_times([4.0, 9.0, 3.0], 3, [6, 0, 3])  # any steps, in any order
    np.testing.assert_allclose(bound, expected.mean(0)[[6, 0, 3]])


def test_w1_bound_by_hand():
    d = np.array([[9.0, 9.0, 4.0, 3.0, 2.0, 1.0, 7.0],   # lag 2, met at 6: D_2..D_5 count, the rest is ignored
                  [9.0, 9.0, 5.0, 0.0, 0.0, 0.0, 0.0]])  # met at 3
    w1, se = w1_bound_from_distances(d, [6, 3], lag=2, steps=6)
    # pair 1: t=0: D_2 + D_4 = 6; t=1: D_3 + D_5 = 4; t=2: D_4 = 2; t=3: D_5 = 1; then 0. pair 2: t=0: D_2 = 5.
    first, second = np.array([6, 4, 2, 1, 0, 0, 0.0]), np.array([5, 0, 0, 0, 0, 0, 0.0])
    np.testing.assert_allclose(w1, (first + second) / 2)
    np.testing.assert_allclose(se, np.abs(first - second) / 2)  # sd (ddof 1) of two values over sqrt(2)


def test_coupling_bound_from_meeting_times_and_steps_for():
    b = CouplingBound.from_meeting_times([4, 9, 3], lag=3, max_steps=12)
    assert b.steps.tolist() == list(range(13)) and b.num_pairs == 3 and b.num_unmet == 0 and b.w1_bound is None
    assert b.steps_for(1.0) == 0 and b.steps_for(0.5) == 3 and steps_for(b, 0.1) == 6
    assert b.steps_for(0.5, num_stderr=1) == 6  # 1/3 + 1/3 > 0.5 until the bound is 0
    assert "num_unmet=0" in repr(b) and "3..9" in repr(b)
    rng = np.random.default_rng(0)
    tau = rng.integers(5, 200, size=300)
    bound, _ = tv_bound_from_meeting_times(tau, 5, 250)
    assert np.all(np.diff(bound) <= 0) and bound[-1] == 0 and bound[int(tau.max()) - 5] == 0
    assert bound[int(tau.max()) - 6] > 0


def test_unmet_pairs_make_the_bound_unavailable():
    b = CouplingBound.from_meeting_times([4, np.inf, 3], lag=3, max_steps=12,
                                        distances=np.ones((3, 13)))
    assert b.num_unmet == 1
    assert np.isinf(b.tv_bound).all() and np.isnan(b.tv_stderr).all()
    assert np.isinf(b.w1_bound).all() and np.isnan(b.w1_stderr).all()
    assert b.steps_for(1.0) is None and "3..4" in repr(b)


@pytest.mark.parametrize("meeting_times, lag, error, match", [
    ([4, 5], 0, ValueError, "lag must be a positive integer"),
    ([4, 5], 1.5, ValueError, "lag must be a positive integer"),
    ([4, 5], True, ValueError, "lag must be a positive integer"),
    ([2, 5], 3, ValueError, "at least the lag 3"),
    ([4.5, 5], 3, ValueError, "whole numbers"),
    ([np.nan, 5], 3, ValueError, "nan"),
    ([-np.inf, 5], 3, ValueError, "nan or -inf"),
    ([[4, 5]], 3, ValueError, r"shape \(num_pairs,\)"),
    ([4], 3, ValueError, "at least 2 pairs"),
    ("45", 3, TypeError, "array of numbers"),
    ([4, "a"], 3, TypeError, "array of numbers"),
])
def test_bad_meeting_times_are_named(meeting_times, lag, error, match):
    with pytest.raises(error, match=match):
        tv_bound_from_meeting_times(meeting_times, lag, 5)


def test_other_bad_inputs_are_named():
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        tv_bound_from_meeting_times([4, 5], 3, -1)
    with pytest.raises(ValueError, match="steps must be"):
        tv_bound_from_meeting_times([4, 5], 3, [0.5, 1])
    with pytest.raises(ValueError, match="exceeds max_steps=6"):
        CouplingBound.from_meeting_times([4, 9], lag=3, max_steps=6)
    with pytest.raises(ValueError, match="max_steps must exceed lag"):
        CouplingBound.from_meeting_times([4, 5], lag=3, max_steps=3)
    with pytest.raises(ValueError, match=r"shape \(num_pairs, max_steps \+ 1\)"):
        w1_bound_from_distances(np.zeros((3, 7)), [4, 5], 3, 6)
    b = CouplingBound.from_meeting_times([4, 5], lag=3, max_steps=6)
    for tv in (0.0, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"tv must be a number in \(0, 1\]"):
            b.steps_for(tv)
    with pytest.raises(ValueError, match="num_stderr"):
        b.steps_for(0.5, num_stderr=-1)
    with pytest.raises(TypeError, match="CouplingBound"):
        steps_for((1, 2), 0.5)
