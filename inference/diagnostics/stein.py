r"""Kernel Stein discrepancy (KSD): does a sample follow :math:`p`, judged from the sample and :math:`\nabla\log p`?

The array layer (numpy only) of the Stein diagnostic: :func:`stein_discrepancy` takes points and the score
:math:`s_p = \nabla \log p` at each point, so it needs no normalising constant and no reference sample. The score
from a Pyro or NumPyro model comes from the backend's autodiff: ``stein_scores`` and ``stein_discrepancy`` in
:mod:`tilted_priors.inference.pyro.stein` and :mod:`tilted_priors.inference.numpyro.stein`.

References: Gorham and Mackey (2017), *Measuring sample quality with kernels* (the IMQ kernel, and why it, unlike
the Gaussian kernel, detects non-convergence); Liu, Lee and Jordan (2016), *A kernelized Stein discrepancy for
goodness-of-fit tests* (the U-statistic); Chwialkowski, Strathmann and Gretton (2016), *A kernel test of goodness
of fit* (the wild bootstrap).
"""
from __future__ import annotations

from numbers import Real
from typing import NamedTuple

import numpy as np

from tilted_priors._validation import check_positive_int, check_probability
from tilted_priors.inference.diagnostics.arrays import _numeric, _rng

__all__ = ["stein_discrepancy", "SteinDiscrepancy", "imq_stein_kernel"]

#: Entries of one row block of the n x n Stein kernel matrix (2 MiB a matrix in float64, a handful alive at once:
#: small enough to stay in cache, which is faster than larger blocks; at least 16 rows a block).
_BLOCK_ENTRIES = 2 ** 18


class SteinDiscrepancy(NamedTuple):
    """The kernel Stein discrepancy of a sample, and the wild-bootstrap test when asked for.

    Each numeric field is a float for samples ``(n, d)``, an array of the batch shape for samples ``(..., n, d)``.
    """

    #: The discrepancy :math:`\sqrt{\max(\mathrm{KSD}^2, 0)}` (the clip matters for the U-statistic only).
    ksd: float | np.ndarray
    #: The V- or U-statistic of the Stein kernel: the mean of :math:`k_p(x_i, x_j)` over pairs.
    ksd_squared: float | np.ndarray
    #: ``"v"`` (all :math:`n^2` pairs) or ``"u"`` (the :math:`n(n-1)` pairs :math:`i \ne j`).
    statistic: str
    #: The number of points in each sample.
    n: int
    #: The wild-bootstrap p-value of H0 "the points are i.i.d. draws from p" (``None`` unless ``test=True``).
    p_value: float | np.ndarray | None
    #: Whether H0 is rejected at ``level``: ``ksd_squared > threshold``, i.e. ``p_value <= level`` (``None``
    #: unless ``test=True``).
    reject: bool | np.ndarray | None
    #: The bootstrap critical value of ``ksd_squared`` at ``level``: the :math:`\lfloor \text{level}
    #: (\text{num\_bootstrap} + 1) \rfloor`-th largest bootstrap statistic (``None`` unless ``test=True``).
    threshold: float | np.ndarray | None
    #: The number of bootstrap draws (0 without the test).
    num_bootstrap: int
    #: The test's level (``None`` without the test).
    level: float | None


# --- the kernel ----------------------------------------------------------------------------------------------
def imq_stein_kernel(x, y, score_x, score_y, *, beta: float = -0.5, c: float = 1.0) -> np.ndarray:
    r"""The Langevin Stein kernel of the IMQ kernel, :math:`k_p(x_i, y_j)`, for all pairs of two small samples.

    ``x``, ``score_x`` of shape ``(n, d)`` and ``y``, ``score_y`` of shape ``(m, d)`` give an ``(n, m)`` matrix,
    built directly from the closed form of :func:`stein_discrepancy` (through an ``(n, m, d)`` array of
    differences: for small samples, checks and plots; :func:`stein_discrepancy` itself never builds one).

    Examples
    --------
    >>> x = np.array([[0.0], [1.0]])
    >>> imq_stein_kernel(x, x, -x, -x).round(4).tolist()    # N(0, 1): s(x) = -x
    [[1.0, -0.5303], [-0.5303, 2.0]]
    """
    x, y, sx, sy = (np.asarray(a, dtype=float) for a in (x, y, score_x, score_y))
    r = x[:, None, :] - y[None, :, :]
    r2 = (r * r).sum(-1)
    u = c * c + r2
    d = x.shape[-1]
    return (sx @ sy.T * u ** beta - 2 * beta * u ** (beta - 1) * ((sx[:, None, :] - sy[None, :, :]) * r).sum(-1)
            - 2 * beta * d * u ** (beta - 1) - 4 * beta * (beta - 1) * r2 * u ** (beta - 2))


def _kernel_sums(x: np.ndarray, s: np.ndarray, beta: float, c: float, weights: np.ndarray | None
                 ) -> tuple[float, float, np.ndarray | None]:
    """``(sum over all pairs, sum over the diagonal, w_b^T K w_b for each bootstrap column w_b)`` of the Stein
    kernel matrix K of one sample, in row blocks of about ``_BLOCK_ENTRIES`` entries."""
    n, d = x.shape
    x = x - x.mean(axis=0)  # distances and (s_i - s_j).(x_i - x_j) are translation invariant; less cancellation
    sq = np.einsum("ij,ij->i", x, x)[:, None]
    sx = np.einsum("ij,ij->i", s, x)[:, None]
    one = np.ones((n, 1))
    # One product per block gives each pairwise term, from columns augmented with the per-point terms:
    # |x_i - x_j|^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j and (s_i - s_j).(x_i - x_j) + d = s_i.x_i + d + s_j.x_j
    # - s_i.x_j - x_i.s_j.
    left_r, right_r = np.hstack([-2.0 * x, sq, one]), np.hstack([x, one, sq])
    left_c, right_c = np.hstack([-s, -x, sx + d, one]), np.hstack([x, s, one, sx])
    c2, a, b = c * c, -2.0 * beta, -4.0 * beta * (beta - 1.0)
    rows = min(n, max(16, _BLOCK_ENTRIES // n))
    total = 0.0
    quad = None if weights is None else np.zeros(weights.shape[1])
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        diag = (np.arange(stop - start), np.arange(start, stop))
        r2 = left_r[start:stop] @ right_r.T
        np.maximum(r2, 0.0, out=r2)
        r2[diag] = 0.0
        cross = left_c[start:stop] @ right_c.T
        cross[diag] = d
        u = r2 + c2
        inv = np.reciprocal(u)
        k = np.sqrt(inv) if beta == -0.5 else np.power(u, beta, out=u)
        # k_p = k [s_i.s_j + (a ((s_i - s_j).(x_i - x_j) + d) + b |x_i - x_j|^2 / u) / u]
        r2 *= inv
        r2 *= b
        cross *= a
        cross += r2
        cross *= inv
        cross += s[start:stop] @ s.T
        cross *= k
        total += float(cross.sum())
        if weights is not None:
            quad += np.einsum("ib,ib->b", cross @ weights, weights[start:stop])
    diag_sum = float((np.einsum("ij,ij->i", s, s) * c2 ** beta - 2.0 * beta * d * c2 ** (beta - 1.0)).sum())
    return total, diag_sum, quad


# --- the discrepancy and the test --------------------------------------------------------------------------
def _check_pair(samples, scores) -> tuple[np.ndarray, np.ndarray]:
    shape = "(..., n, d)"
    x = _numeric(samples, "samples", shape)
    s = _numeric(scores, "scores", shape)
    if x.ndim < 2:
        raise ValueError(f"samples must have shape (..., n, d): n points in d dimensions, got shape {x.shape}"
                         + ("; for n points in one dimension pass samples[:, None] (and scores[:, None])"
                            if x.ndim == 1 else ""))
    if s.shape != x.shape:
        raise ValueError(f"scores must have the shape of samples, one gradient of log p per point: samples have "
                         f"shape {x.shape}, scores {s.shape}")
    n, d = x.shape[-2:]
    if d < 1:
        raise ValueError(f"samples need at least one dimension d >= 1 (shape (..., n, d)), got shape {x.shape}")
    if n < 2:
        raise ValueError(f"samples need at least n = 2 points (shape (..., n, d)), got shape {x.shape}: draw more "
                         "points, or check which axis holds them (points on the second-to-last axis)")
    for name, a, hint in (("samples", x, "drop those points, or rerun the chains that made them (a diverged "
                                         "chain)"),
                          ("scores", s, "the log density's gradient overflowed or is undefined there; drop those "
                                        "points or check the density")):
        bad = ~np.isfinite(a)
        if bad.any():
            points = bad.any(-1)
            raise ValueError(f"{name} holds {int(bad.sum())} non-finite values (nan or inf) in {int(points.sum())} "
                             f"of its {points.size} points (first: index {np.argwhere(points)[0].tolist()}): {hint}")
    return x, s


def _check_kernel(kernel, beta, c) -> tuple[float, float]:
    if not isinstance(kernel, str) or kernel.lower() != "imq":
        raise ValueError(f"kernel must be 'imq' (the inverse multiquadric (c^2 + |x - y|^2)^beta, which detects "
                         f"non-convergence, Gorham and Mackey 2017), got {kernel!r}")
    if isinstance(beta, bool) or not isinstance(beta, Real) or not -1.0 < beta < 0.0:
        raise ValueError(f"beta must be a number in (-1, 0) (the IMQ exponent; -0.5 is the usual choice), got "
                         f"{beta!r}")
    if isinstance(c, bool) or not isinstance(c, Real) or not 0.0 < c < np.inf:
        raise ValueError(f"c must be a finite positive number (the IMQ kernel's length scale; about the scale of "
                         f"the data, 1.0 for standardised data), got {c!r}")
    return float(beta), float(c)


def stein_discrepancy(samples, scores, *, kernel: str = "imq", beta: float = -0.5, c: float = 1.0,
                      statistic: str = "v", test: bool = False, num_bootstrap: int = 500, level: float = 0.05,
                      seed: int | None = 0) -> SteinDiscrepancy:
    r"""Kernel Stein discrepancy of points ``samples`` to the density :math:`p` whose score is ``scores``.

    .. math::

        \mathrm{KSD}^2_V = \frac1{n^2} \sum_{i,j=1}^n k_p(x_i, x_j), \qquad
        \mathrm{KSD}^2_U = \frac1{n(n-1)} \sum_{i \ne j} k_p(x_i, x_j),

    with the Langevin Stein kernel of a base kernel :math:`k` and the score :math:`s = \nabla \log p`,

    .. math::

        k_p(x, y) = s(x)^\top s(y)\, k(x, y) + s(x)^\top \nabla_y k(x, y) + s(y)^\top \nabla_x k(x, y)
                    + \operatorname{tr} \nabla_x \nabla_y k(x, y).

    :math:`\mathbb E_{x, y \sim q}\, k_p(x, y)` is zero when :math:`q = p` (Stein's identity) and positive
    otherwise, so the KSD measures how far the law of the points is from :math:`p`. For the inverse multiquadric
    (IMQ) kernel :math:`k(x, y) = (c^2 + \|x - y\|^2)^\beta`, :math:`\beta \in (-1, 0)`, with :math:`r = x - y`
    and :math:`u = c^2 + \|r\|^2`,

    .. math::

        \nabla_x k = 2\beta u^{\beta-1} r, \qquad \nabla_y k = -2\beta u^{\beta-1} r, \qquad
        \operatorname{tr} \nabla_x \nabla_y k = -2\beta d\, u^{\beta-1} - 4\beta(\beta-1) \|r\|^2 u^{\beta-2},

    .. math::

        k_p(x, y) = s(x)^\top s(y)\, u^\beta - 2\beta u^{\beta-1} \bigl[(s(x) - s(y))^\top r + d\bigr]
                    - 4\beta(\beta-1)\|r\|^2 u^{\beta-2},

    and on the diagonal :math:`k_p(x, x) = \|s(x)\|^2 c^{2\beta} - 2\beta d\, c^{2(\beta-1)}`. For this kernel
    the KSD goes to zero exactly when the points converge to :math:`p` (for distantly dissipative :math:`p` with a
    Lipschitz score, such as a Gaussian base tilted by an energy whose gradient is bounded and Lipschitz; Gorham and
    Mackey 2017), whereas with a Gaussian kernel it can vanish for samples that do not converge in
    :math:`d \ge 3`; hence the IMQ is the only kernel offered.

    **What is normalised.** Only the score enters, so :math:`p` may be unnormalised (its :math:`\log Z` drops out
    of the gradient). ``ksd_squared`` is the *mean* of :math:`k_p` over pairs (divided by :math:`n^2` or
    :math:`n(n-1)`, not multiplied by :math:`n`); the base kernel is not normalised (:math:`k(x, x) = c^{2\beta}`),
    and the KSD is not scale invariant: compare values computed with the same ``c`` and ``beta``, on data of the
    same scale (set ``c`` to about the spread of :math:`p`, or standardise the points and scale the scores by the
    same factor). For exact draws the V-statistic is about :math:`\mathbb E\, k_p(x, x) / n` (a bias that
    shrinks like :math:`1/\sqrt n` in ``ksd``); the U-statistic is unbiased, about 0, and may be negative
    (``ksd`` clips it at 0).

    **The test** (``test=True``): H0 "the points are i.i.d. draws from :math:`p`". Under H0 the statistic is
    a degenerate U/V-statistic; its null law is approximated by the wild bootstrap with Rademacher weights
    :math:`w \in \{-1, 1\}^n` (Chwialkowski et al. 2016; Liu et al. 2016 for the U-statistic),
    :math:`B_b = \frac1{n^2} w_b^\top K w_b` (V) or :math:`\frac1{n(n-1)}(w_b^\top K w_b - \operatorname{tr} K)`
    (U), and ``p_value`` is :math:`(1 + \#\{b: B_b \ge \mathrm{KSD}^2\}) / (1 + \text{num\_bootstrap})`. The
    points must be independent: successive draws of one chain are correlated and make the test reject too often,
    so thin them to about one draw per autocorrelation time, or use the final states of independent chains
    (short-run chains from independent starts are independent across chains: the intended use). Chwialkowski et
    al. also treat correlated draws, with autocorrelated bootstrap weights; not implemented here.

    **Cost.** :math:`O(n^2 d)` time (three products of :math:`n \times d` matrices, :math:`O(d)` columns each,
    and a dozen operations per pair), in row blocks of about :math:`2^{18}` entries (at least 16 rows), so memory
    is :math:`O(nd)` plus a few MiB (no :math:`n \times n` or :math:`n \times n \times d` array; a peak of about
    20 MiB at :math:`n = 10^4`, :math:`d = 16`): about 1 s for :math:`n = 10^4`, :math:`d = 16` on one core
    (``benchmarks/stein.py``). The test adds :math:`O(n^2 \cdot \text{num\_bootstrap})` time and
    :math:`O(n \cdot \text{num\_bootstrap})` memory (the weights: 4 MB at :math:`n = 10^3`).

    Parameters
    ----------
    samples : array_like, shape (..., n, d)
        The points (numpy, torch or JAX arrays); leading dimensions are a batch of independent samples, one result
        per batch element.
    scores : array_like, shape (..., n, d)
        :math:`\nabla_x \log p(x)` at each point (``stein_scores`` of either backend computes them).
    kernel : {"imq"}
        The base kernel.
    beta : float in (-1, 0)
        The IMQ exponent (Gorham and Mackey recommend -0.5).
    c : float > 0
        The IMQ length scale.
    statistic : {"v", "u"}
        The V-statistic (all pairs, always >= 0) or the U-statistic (unbiased, pairs i != j).
    test : bool
        Also run the wild-bootstrap test of H0 "the points are i.i.d. draws from p".
    num_bootstrap : int
        Bootstrap draws for the test; at least :math:`1/\text{level} - 1` (19 at level 0.05).
    level : float in (0, 1)
        The test's level.
    seed : int or None
        Seeds the Rademacher weights (the same weights for every batch element, so that a batch gives what
        separate calls give).

    Returns
    -------
    SteinDiscrepancy
        ``ksd``, ``ksd_squared``, ``statistic``, ``n``, and with the test ``p_value``, ``reject``, ``threshold``
        (the critical value of ``ksd_squared``), ``num_bootstrap`` and ``level``.

    Examples
    --------
    Exact draws from :math:`\mathcal N(0, I)` (score :math:`-x`) against draws that miss its scale:

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 2))
    >>> good = stein_discrepancy(x, -x, test=True)
    >>> bad = stein_discrepancy(0.7 * x, -0.7 * x, test=True)     # N(0, 0.49 I) judged against N(0, I)
    >>> bool(good.ksd < bad.ksd), bool(good.reject), bool(bad.reject)
    (True, False, True)

    A batch of three samples gives three results:

    >>> stein_discrepancy(rng.normal(size=(3, 100, 2)), np.zeros((3, 100, 2))).ksd.shape
    (3,)
    """
    x, s = _check_pair(samples, scores)
    beta, c = _check_kernel(kernel, beta, c)
    if not isinstance(statistic, str) or statistic.lower() not in ("v", "u"):
        raise ValueError(f"statistic must be 'v' (the V-statistic: all pairs, never negative) or 'u' (the unbiased "
                         f"U-statistic: pairs i != j), got {statistic!r}")
    statistic = statistic.lower()
    if not isinstance(test, (bool, np.bool_)):
        raise TypeError(f"test must be True or False (run the bootstrap test or not), got {test!r}")
    n, d = x.shape[-2:]
    batch = x.shape[:-2]
    weights = threshold_rank = None
    if test:
        num_bootstrap = check_positive_int("num_bootstrap", num_bootstrap)
        level = check_probability(level, "level")
        # p <= level  <=>  at most m bootstrap statistics reach the observed one, m = floor(level (B + 1)) - 1
        threshold_rank = int(np.floor(level * (num_bootstrap + 1) + 1e-9)) - 1
        if threshold_rank < 0:
            raise ValueError(f"num_bootstrap={num_bootstrap} cannot give a p-value at or below level={level}: use "
                             f"num_bootstrap >= {int(np.ceil(1 / level - 1 - 1e-9))} (500 is usual)")
        rng = _rng(seed)
        weights = rng.integers(0, 2, size=(n, num_bootstrap)).astype(float) * 2.0 - 1.0
    xs, ss = x.reshape((-1, n, d)), s.reshape((-1, n, d))
    pairs = n * n if statistic == "v" else n * (n - 1)
    values, p_values, thresholds = [], [], []
    for xb, sb in zip(xs, ss):
        total, diag, quad = _kernel_sums(xb, sb, beta, c, weights)
        off = 0.0 if statistic == "v" else diag
        value = (total - off) / pairs
        values.append(value)
        if test:
            boot = (quad - off) / pairs
            p_values.append((1.0 + np.count_nonzero(boot >= value)) / (num_bootstrap + 1.0))
            thresholds.append(np.sort(boot)[::-1][threshold_rank])

    def shaped(v):
        a = np.asarray(v, dtype=float).reshape(batch)
        return a[()] if not batch else a

    ksd_squared = shaped(values)
    ksd = shaped(np.sqrt(np.maximum(values, 0.0)))
    if not test:
        return SteinDiscrepancy(_scalar(ksd), _scalar(ksd_squared), statistic, n, None, None, None, 0, None)
    threshold = shaped(thresholds)
    reject = np.asarray(values).reshape(batch) > np.asarray(thresholds).reshape(batch)
    return SteinDiscrepancy(_scalar(ksd), _scalar(ksd_squared), statistic, n, _scalar(shaped(p_values)),
                            bool(reject) if not batch else reject, _scalar(threshold), num_bootstrap, level)


def _scalar(a):
    """A 0-d array as a Python float; arrays as they are."""
    return float(a) if np.ndim(a) == 0 else a
