r"""L-lag coupling bounds on the distance of a Markov chain's law after :math:`t` steps from its stationary law.

The array layer of the coupling diagnostics (Biswas, Jacob and Vanetti 2019, "Estimating convergence of Markov
chains with L-lag couplings", NeurIPS): numpy in, numpy out, no torch and no JAX. The coupled chains themselves run
in :func:`tilted_priors.inference.pyro.coupling.coupling_bound` /
:func:`tilted_priors.inference.numpyro.coupling.coupling_bound`, which return the :class:`CouplingBound` built here.

**The bound.** Two chains with the same kernel :math:`P` start from the same initial law, :math:`X_0, Y_0 \sim
\pi_0`; :math:`X` runs :math:`L` steps alone (the lag), then the pair :math:`(X_s, Y_{s-L})` moves by a coupling of
:math:`P` with itself under which the chains can meet exactly and stay together once met. With the meeting time
:math:`\tau = \inf\{s \ge L : X_s = Y_{s-L}\}`, the law :math:`\pi_t` of the chain after :math:`t` steps and its
stationary law :math:`\pi` satisfy

.. math:: d_{TV}(\pi_t, \pi) \le \mathbb E\Bigl[\max\Bigl(0, \Bigl\lceil \frac{\tau - L - t}{L} \Bigr\rceil
          \Bigr)\Bigr],
          \qquad
          d_{W_1}(\pi_t, \pi) \le \mathbb E\Bigl[\sum_{j=1}^{\lceil (\tau - L - t)/L \rceil}
          \bigl\|X_{t + jL} - Y_{t + (j-1)L}\bigr\|\Bigr],

both estimated by their means over independent pairs, with Monte Carlo standard errors (sample standard deviation
over :math:`\sqrt{\text{pairs}}`). The estimate is unbiased for an upper bound: it can be above 1 (a TV distance
never is), and the bound holds for the expectation, so read it with its standard error. It decreases in :math:`t`
and reaches 0 at :math:`t = \max\tau - L`. A larger lag gives a tighter bound for large :math:`t` (at the cost of
longer runs); a lag about the number of steps one means to run is a good start.

**The coupled kernel.** The Langevin samplers of both backends (``MALA``, ``ShortRunLangevin``) propose :math:`z'
\sim \mathcal N(\mu(z), h^2 I)`, :math:`\mu(z) = z + \tfrac{h^2}{2}\nabla\log\pi(z)`. The two chains' proposals are
drawn from the reflection-maximal coupling of :math:`\mathcal N(\mu(x), h^2 I)` and :math:`\mathcal N(\mu(y), h^2
I)` (Bou-Rabee, Eberle and Zimmer 2020; Jacob, O'Leary and Atchadé 2020, section 4.1): with :math:`\zeta = (\mu(x) -
\mu(y))/h`, :math:`e = \zeta / \|\zeta\|`, draw :math:`\xi \sim \mathcal N(0, I)` and :math:`U \sim \mathcal U(0,
1)`; :math:`x' = \mu(x) + h\xi`, and :math:`y' = x'` (the very same numbers) when :math:`U \varphi(\xi) \le
\varphi(\xi + \zeta)`, else :math:`y' = \mu(y) + h(\xi - 2 (e^\top \xi) e)`. Each chain keeps its own law; the
proposals coincide with the largest probability any coupling allows. MALA then accepts both proposals with one
common uniform, so that two equal proposals are accepted or rejected together. Once a pair has met (:math:`X_s =
Y_{s-L}`, bit for bit) it stays together: the follower is set to the leader from then on.

**What is bounded.** For MALA, the distance to the target :math:`\pi` (its stationary law). For
``ShortRunLangevin`` (ULA) the distance to ULA's *own* stationary law, which differs from :math:`\pi` by
:math:`O(h^2)`: the bound says how long the chain takes to forget its start, not how biased it is (compare with
MALA, or :func:`~tilted_priors.inference.diagnostics.short_vs_long`, for that).

**Unmet pairs.** A pair that has not met within the budget (``max_steps`` steps of the leading chain) has the
meeting time ``numpy.inf``. Its term in the expectation is then unknown and unbounded for every :math:`t`, so
with any unmet pair the bounds are ``inf`` at every step (``tv_stderr`` and ``w1_stderr`` ``nan``) and
:meth:`CouplingBound.steps_for` returns ``None``: the estimate is never made optimistic by dropping or truncating
the pairs that did not meet. Run longer (``max_steps``), or with a larger ``lag``. (The trivial bound
:math:`d_{TV} \le 1` always holds.)
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

from tilted_priors._validation import check_positive_int

__all__ = ["CouplingBound", "tv_bound_from_meeting_times", "w1_bound_from_distances", "steps_for"]


# --- checks -----------------------------------------------------------------------------------------------
def _check_lag(lag) -> int:
    if isinstance(lag, bool) or not isinstance(lag, Integral) or lag < 1:
        raise ValueError(f"lag must be a positive integer (the number of steps the leading chain X runs ahead of Y), "
                         f"got {lag!r}")
    return int(lag)


def _meeting_times(meeting_times, lag: int, max_steps: int | None = None) -> np.ndarray:
    """``meeting_times`` as a float array ``(num_pairs,)``, checked: integers ``>= lag`` (at most ``max_steps``),
    or ``inf`` for a pair that did not meet."""
    if hasattr(meeting_times, "detach"):  # a torch tensor
        meeting_times = meeting_times.detach().cpu().numpy()
    if isinstance(meeting_times, (str, bytes)) or meeting_times is None or hasattr(meeting_times, "keys"):
        raise TypeError(f"meeting_times must be an array of numbers of shape (num_pairs,), got "
                        f"{type(meeting_times).__name__}")
    try:
        tau = np.asarray(meeting_times, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"meeting_times must be an array of numbers of shape (num_pairs,), got "
                        f"{type(meeting_times).__name__}: {err}") from None
    if tau.ndim != 1:
        raise ValueError(f"meeting_times must have shape (num_pairs,), one meeting time per pair of chains, got "
                         f"shape {tau.shape}")
    if tau.size < 2:
        raise ValueError(f"meeting_times needs at least 2 pairs of chains (for a standard error), got {tau.size}")
    if np.isnan(tau).any() or (tau == -np.inf).any():
        raise ValueError("meeting_times holds nan or -inf; a pair that did not meet has the meeting time inf")
    finite = tau[np.isfinite(tau)]
    if (finite != np.round(finite)).any():
        raise ValueError(f"meeting_times must be whole numbers of steps (or inf for a pair that did not meet), got "
                         f"{finite[finite != np.round(finite)][0]!r}")
    if finite.size and finite.min() < lag:
        raise ValueError(f"meeting times count the steps of the leading chain X and are at least the lag {lag} (the "
                         f"chains are compared from X_lag = Y_0 on), got {finite.min():g}")
    if max_steps is not None and finite.size and finite.max() > max_steps:
        raise ValueError(f"meeting time {finite.max():g} exceeds max_steps={max_steps}: a pair that did not meet "
                         "within the budget has the meeting time inf")
    return tau


def _steps(steps) -> np.ndarray:
    """``steps`` as an int array of steps ``t >= 0``: an int ``T`` is the grid ``0..T``."""
    if isinstance(steps, Integral) and not isinstance(steps, bool):
        if steps < 0:
            raise ValueError(f"steps must be an integer >= 0 (the grid 0..steps) or an array of them, got {steps!r}")
        return np.arange(int(steps) + 1)
    message = f"steps must be an integer >= 0 (the grid 0..steps) or a 1-d array of integers >= 0, got {steps!r}"
    try:
        t = np.asarray(steps, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if t.ndim != 1 or not np.isfinite(t).all() or (t != np.round(t)).any() or (t < 0).any():
        raise ValueError(message)
    return t.astype(np.int64)


def _mean_stderr(terms: np.ndarray, unmet: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean over pairs (axis 0) and its standard error; ``inf`` / ``nan`` everywhere when some pair did not meet."""
    if unmet:
        shape = terms.shape[1:]
        return np.full(shape, np.inf), np.full(shape, np.nan)
    n = terms.shape[0]
    return terms.mean(axis=0), terms.std(axis=0, ddof=1) / np.sqrt(n)


# --- the bounds ---------------------------------------------------------------------------------------------
def _tv_terms(tau: np.ndarray, lag: int, t: np.ndarray) -> np.ndarray:
    r"""Per pair and step: :math:`\max(0, \lceil (\tau - L - t) / L \rceil)` for met pairs, ``(pairs, steps)``."""
    finite = np.where(np.isfinite(tau), tau, 0).astype(np.int64)
    c = finite[:, None] - lag - t[None, :]
    return np.maximum(0, -((-c) // lag)).astype(float)  # integer ceiling: no rounding at the multiples of L


def tv_bound_from_meeting_times(meeting_times, lag: int, steps) -> tuple[np.ndarray, np.ndarray]:
    r"""The L-lag upper bound on :math:`d_{TV}(\pi_t, \pi)` at each step ``t``, and its Monte Carlo standard error.

    .. math:: d_{TV}(\pi_t, \pi) \le \mathbb E\Bigl[\max\Bigl(0, \Bigl\lceil \frac{\tau - L - t}{L}
              \Bigr\rceil\Bigr)\Bigr] \approx \frac1n \sum_{i=1}^n \max\Bigl(0, \Bigl\lceil
              \frac{\tau_i - L - t}{L} \Bigr\rceil\Bigr)

    (Biswas, Jacob and Vanetti 2019), :math:`\tau_i` the meeting time of pair :math:`i`, :math:`L` the lag; the
    standard error is the sample standard deviation of the terms over :math:`\sqrt n`.

    Parameters
    ----------
    meeting_times : array_like
        Shape ``(num_pairs,)``: :math:`\tau_i = \min\{s \ge L : X_s = Y_{s-L}\}`, a whole number of steps of the
        leading chain, or ``inf`` for a pair that did not meet. At least 2 pairs.
    lag : int
        :math:`L \ge 1`, the number of steps :math:`X` ran ahead of :math:`Y`.
    steps : int or array_like of int
        The steps :math:`t \ge 0` at which to bound; an int ``T`` means ``0, 1, ..., T``.

    Returns
    -------
    tv_bound, tv_stderr : numpy.ndarray
        The estimated bound at each step and its standard error, shaped as the steps. With any unmet pair the bound
        is ``inf`` and the error ``nan`` at every step (see the module notes: never an optimistic bound).

    Raises
    ------
    ValueError
        For meeting times that are not whole numbers :math:`\ge L` (or ``inf``), fewer than 2 pairs, a lag that is
        not a positive integer, or negative steps.
    TypeError
        For meeting times that are not numbers.

    Examples
    --------
    Three pairs met at steps 3, 5 and 8 with lag 2; at :math:`t = 0` the terms are
    :math:`\lceil 1/2 \rceil = 1`, :math:`\lceil 3/2 \rceil = 2` and :math:`\lceil 6/2 \rceil = 3`:

    >>> bound, stderr = tv_bound_from_meeting_times([3, 5, 8], lag=2, steps=6)
    >>> bound.round(3).tolist()
    [2.0, 1.333, 1.0, 0.667, 0.333, 0.333, 0.0]
    >>> round(float(stderr[0]), 4)   # sd of (1, 2, 3) over sqrt(3)
    0.5774
    >>> tv_bound_from_meeting_times([3, float("inf")], lag=2, steps=[0, 10])[0].tolist()   # a pair did not meet
    [inf, inf]
    """
    lag = _check_lag(lag)
    tau = _meeting_times(meeting_times, lag)
    t = _steps(steps)
    return _mean_stderr(_tv_terms(tau, lag, t), bool(np.isinf(tau).any()))


def w1_bound_from_distances(distances, meeting_times, lag: int, steps) -> tuple[np.ndarray, np.ndarray]:
    r"""The L-lag upper bound on the 1-Wasserstein distance :math:`d_{W_1}(\pi_t, \pi)`, and its standard error.

    .. math:: d_{W_1}(\pi_t, \pi) \le \mathbb E\Bigl[\sum_{j \ge 1,\ t + jL < \tau} D_{t + jL}\Bigr],
              \qquad D_s = \|X_s - Y_{s-L}\|,

    estimated by the mean over pairs (Biswas, Jacob and Vanetti 2019); :math:`D_s = 0` from the meeting on.

    Parameters
    ----------
    distances : array_like
        Shape ``(num_pairs, S + 1)``: ``distances[i, s]`` is :math:`\|X_s - Y_{s-L}\|` of pair ``i`` for
        :math:`L \le s < \tau_i` (entries before ``lag`` and from the meeting time on are ignored). :math:`S` is
        the budget ``max_steps``.
    meeting_times : array_like
        Shape ``(num_pairs,)``, as for :func:`tv_bound_from_meeting_times` (at most :math:`S`, or ``inf``).
    lag : int
        :math:`L \ge 1`.
    steps : int or array_like of int
        The steps :math:`t \ge 0` at which to bound; an int ``T`` means ``0, 1, ..., T``.

    Returns
    -------
    w1_bound, w1_stderr : numpy.ndarray
        Shaped as the steps; ``inf`` and ``nan`` at every step when some pair did not meet.

    Examples
    --------
    One pair met at step 4 with lag 1 after the distances 3, 2, 1 at steps 1, 2, 3; another met at step 1:

    >>> d = [[0.0, 3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    >>> w1_bound_from_distances(d, [4, 1], lag=1, steps=4)[0].tolist()   # (D_{t+1} + D_{t+2} + ...) / 2
    [3.0, 1.5, 0.5, 0.0, 0.0]
    """
    lag = _check_lag(lag)
    tau = _meeting_times(meeting_times, lag)
    t = _steps(steps)
    if hasattr(distances, "detach"):
        distances = distances.detach().cpu().numpy()
    try:
        dist = np.asarray(distances, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"distances must be an array of numbers of shape (num_pairs, max_steps + 1), got "
                        f"{type(distances).__name__}: {err}") from None
    if dist.ndim != 2 or dist.shape[0] != tau.size:
        raise ValueError(f"distances must have shape (num_pairs, max_steps + 1) = ({tau.size}, ...), one row per "
                         f"pair of meeting_times, got shape {dist.shape}")
    last = dist.shape[1] - 1
    _meeting_times(tau, lag, last)
    unmet = bool(np.isinf(tau).any())
    if unmet:
        return _mean_stderr(np.zeros((tau.size, t.size)), True)
    s = np.arange(last + 1)
    live = (s[None, :] >= lag) & (s[None, :] < tau[:, None])
    d = np.where(live, dist, 0.0)
    if not np.isfinite(d).all():
        raise ValueError("distances holds non-finite values before the meeting times (a diverged chain)")
    # R[:, t] = sum_{j >= 1} d[:, t + jL]: a reversed cumulative sum within each residue class of s modulo L.
    k = -(-(last + 1) // lag)
    padded = np.zeros((tau.size, k * lag))
    padded[:, :last + 1] = d
    tails = np.cumsum(padded.reshape(tau.size, k, lag)[:, ::-1], axis=1)[:, ::-1].reshape(tau.size, k * lag)
    ahead = t + lag
    terms = np.where(ahead[None, :] <= last, tails[:, np.minimum(ahead, k * lag - 1)], 0.0)
    return _mean_stderr(terms, False)


def _steps_for(steps: np.ndarray, bound: np.ndarray, stderr: np.ndarray, tv, num_stderr) -> int | None:
    if isinstance(tv, bool) or not isinstance(tv, Real) or not 0.0 < float(tv) <= 1.0:
        raise ValueError(f"tv must be a number in (0, 1], the total variation distance to reach, got {tv!r}")
    if isinstance(num_stderr, bool) or not isinstance(num_stderr, Real) or not float(num_stderr) >= 0.0:
        raise ValueError(f"num_stderr must be a number >= 0 (standard errors added to the bound), got {num_stderr!r}")
    upper = bound + (float(num_stderr) * stderr if num_stderr else 0.0)
    ok = upper <= float(tv)  # inf and nan are never ok
    if not ok.any():
        return None
    failing = np.nonzero(~ok)[0]
    first = 0 if failing.size == 0 else int(failing[-1]) + 1  # from here on the bound stays below tv
    return None if first >= steps.size else int(steps[first])


# --- shared by the two backends' coupling_bound -----------------------------------------------------------------
def _sampler_settings(sampler, mala: type, ula: type) -> tuple[str, float]:
    """``("mala" | "ula", step size)`` of a backend's ``MALA`` / ``ShortRunLangevin``, or a clear error."""
    if not isinstance(sampler, (mala, ula)):
        inner = getattr(sampler, "sampler", None)
        hint = (f"; pass the sampler it wraps ({type(sampler).__name__}.sampler): the coupling starts its own chains"
                if isinstance(inner, (mala, ula)) else "")
        raise TypeError(f"sampler must be a MALA or a ShortRunLangevin (the kernels coupling_bound can couple), got "
                        f"{type(sampler).__name__}{hint}")
    name = type(sampler).__name__
    if isinstance(sampler.step_size, str):
        raise ValueError(f"coupling_bound needs {name}'s step size as a number: step_size='auto' adapts within each "
                         "run, so it is not one Markov kernel to couple. Pass the numeric step, e.g. the adapted "
                         f"one: _, info = sampler.run(..., return_info=True); {name}(steps, float(info.step_size))")
    if isinstance(sampler, ula) and not getattr(sampler, "noise", True):
        raise ValueError("ShortRunLangevin(noise=False) is gradient ascent: two deterministic chains from different "
                         "points never meet, so there is nothing to couple; use noise=True")
    return ("mala" if isinstance(sampler, mala) else "ula"), float(sampler.step_size)


def _check_budget(lag, num_pairs, max_steps) -> tuple[int, int | None, int]:
    """``lag``, ``num_pairs`` (``None`` allowed: taken from ``init``) and ``max_steps``, checked."""
    lag = _check_lag(lag)
    max_steps = check_positive_int("max_steps", max_steps)
    if max_steps <= lag:
        raise ValueError(f"max_steps must exceed lag (the leading chain runs lag={lag} steps before the pairs are "
                         f"coupled, and the budget bounds its steps), got max_steps={max_steps}")
    if num_pairs is not None:
        num_pairs = check_positive_int("num_pairs", num_pairs)
        if num_pairs < 2:
            raise ValueError(f"num_pairs must be at least 2 (for a standard error), got {num_pairs}")
    return lag, num_pairs, max_steps


def _pairs_from(shape: tuple, num_pairs: int | None, what: str) -> int:
    """The number of pairs for starting points of ``shape``: ``(d,)`` needs ``num_pairs``, ``(n, d)`` fixes it."""
    if len(shape) == 1:
        if num_pairs is None:
            raise ValueError(f"{what} of shape {shape} is one starting point for every pair: give num_pairs")
        return num_pairs
    if len(shape) == 2:
        if num_pairs is not None and num_pairs != shape[0]:
            raise ValueError(f"{what} of shape {shape} gives a starting point for each of {shape[0]} pairs, but "
                             f"num_pairs={num_pairs}")
        if shape[0] < 2:
            raise ValueError(f"{what} of shape {shape} holds {shape[0]} pair(s): at least 2 are needed (for a "
                             "standard error)")
        return shape[0]
    raise ValueError(f"{what} must be one starting point (d,) or one per pair (num_pairs, d), got shape {shape}")


def _check_drawn(shape: tuple, n: int, what: str) -> None:
    if len(shape) != 2 or shape[0] != n:
        raise ValueError(f"{what} must give num_pairs={n} starting points of shape ({n}, d), got shape {shape}")


class CouplingBound(NamedTuple):
    r"""Upper bounds on the distance of the chain's law after :math:`t` steps from its stationary law.

    Returned by ``coupling_bound`` (:mod:`tilted_priors.inference.pyro.coupling`,
    :mod:`tilted_priors.inference.numpyro.coupling`) or built from meeting times by :meth:`from_meeting_times`.
    All bounds are estimates (means over the pairs of chains) of upper bounds, with their standard errors; see
    :mod:`tilted_priors.inference.diagnostics.coupling` for the formulas and the unmet pairs.

    Attributes
    ----------
    steps : numpy.ndarray
        The grid of steps :math:`t = 0, 1, \dots, \text{max\_steps}`.
    tv_bound, tv_stderr : numpy.ndarray
        The bound on :math:`d_{TV}(\pi_t, \pi)` at each step and its Monte Carlo standard error (``inf`` and
        ``nan`` everywhere when some pair did not meet).
    meeting_times : numpy.ndarray
        :math:`\tau_i` per pair (float; ``inf`` for a pair that did not meet within ``max_steps``).
    lag : int
        :math:`L`.
    num_pairs : int
        The number of pairs of chains.
    num_unmet : int
        How many pairs did not meet within ``max_steps`` (with any, the bounds are ``inf``).
    max_steps : int
        The budget: the most steps the leading chain ran.
    w1_bound, w1_stderr : numpy.ndarray or None
        The bound on the 1-Wasserstein distance (Euclidean) and its standard error, when the distances between
        the chains were recorded (both backends record them).
    """

    steps: np.ndarray
    tv_bound: np.ndarray
    tv_stderr: np.ndarray
    meeting_times: np.ndarray
    lag: int
    num_pairs: int
    num_unmet: int
    max_steps: int
    w1_bound: np.ndarray | None = None
    w1_stderr: np.ndarray | None = None

    @classmethod
    def from_meeting_times(cls, meeting_times, lag: int, max_steps: int, distances=None) -> "CouplingBound":
        r"""The bounds at the steps ``0..max_steps`` from the meeting times (and the distances, for :math:`W_1`).

        Parameters
        ----------
        meeting_times : array_like
            ``(num_pairs,)``: whole numbers in ``[lag, max_steps]``, or ``inf`` for a pair that did not meet.
        lag : int
            :math:`L \ge 1`.
        max_steps : int
            The budget, more than ``lag``.
        distances : array_like, optional
            ``(num_pairs, max_steps + 1)``, :math:`\|X_s - Y_{s-L}\|` (see :func:`w1_bound_from_distances`).

        Examples
        --------
        >>> b = CouplingBound.from_meeting_times([3, 5, 8], lag=2, max_steps=10)
        >>> b.tv_bound[:3].round(3).tolist(), b.steps_for(0.5), b.num_unmet
        ([2.0, 1.333, 1.0], 4, 0)
        """
        lag = _check_lag(lag)
        max_steps = check_positive_int("max_steps", max_steps)
        if max_steps <= lag:
            raise ValueError(f"max_steps must exceed lag (the leading chain runs lag={lag} steps before the pairs "
                             f"are coupled), got max_steps={max_steps}")
        tau = _meeting_times(meeting_times, lag, max_steps)
        steps = np.arange(max_steps + 1)
        tv, tv_se = tv_bound_from_meeting_times(tau, lag, steps)
        w1 = w1_se = None
        if distances is not None:
            w1, w1_se = w1_bound_from_distances(distances, tau, lag, steps)
        return cls(steps, tv, tv_se, tau, lag, int(tau.size), int(np.isinf(tau).sum()), max_steps, w1, w1_se)

    def steps_for(self, tv: float, num_stderr: float = 0.0) -> int | None:
        r"""The fewest steps :math:`t` after which the TV bound is at most ``tv`` (``None``: not within the grid).

        The smallest :math:`t` from which on ``tv_bound + num_stderr * tv_stderr <= tv``; ``None`` when no such
        step is in ``0..max_steps`` or some pair did not meet. ``num_stderr=2`` asks the bound to hold with a
        margin of two standard errors.
        """
        return _steps_for(self.steps, self.tv_bound, self.tv_stderr, tv, num_stderr)

    def __repr__(self) -> str:
        met = self.meeting_times[np.isfinite(self.meeting_times)]
        times = f", meeting times {int(met.min())}..{int(met.max())}" if met.size else ""
        return (f"CouplingBound(lag={self.lag}, num_pairs={self.num_pairs}, num_unmet={self.num_unmet}, "
                f"max_steps={self.max_steps}{times})")


def steps_for(bound: CouplingBound, tv: float, num_stderr: float = 0.0) -> int | None:
    r"""The fewest steps after which ``bound``'s TV bound is at most ``tv``: :meth:`CouplingBound.steps_for`.

    Examples
    --------
    >>> b = CouplingBound.from_meeting_times([3, 5, 8], lag=2, max_steps=10)
    >>> steps_for(b, 0.5), steps_for(b, 0.1), steps_for(b, 0.5, num_stderr=2)
    (4, 6, 6)
    """
    if not isinstance(bound, CouplingBound):
        raise TypeError(f"bound must be a CouplingBound (from coupling_bound), got {type(bound).__name__}")
    return bound.steps_for(tv, num_stderr)
