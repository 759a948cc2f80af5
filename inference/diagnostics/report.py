r"""Short-run versus long-run: is a short chain telling the truth about its target?

A short-run sampler (LEBM's 60 Langevin steps) is a learned generator, not a convergent chain: its draws follow
some law :math:`q_K` that need not be the target :math:`\pi`. :func:`short_vs_long` runs the same starting
points for :math:`K` steps and for :math:`L \gg K` steps (a long, ideally exact chain such as MALA) and compares
the final states: per-dimension means and standard deviations, the energy :math:`-\log\pi` (unnormalised), the
energy distance between the two samples with a permutation p-value, R-hat of each run, R-hat between the two
samples, and nested R-hat over super-chains of chains that share a start (Margossian et al. 2022: whether the
chains have forgotten where they started). With the scores :math:`\nabla\log\pi` of the states (the backends'
autodiff gives them), it adds the kernel Stein discrepancy of each run's states along the way and of the final
states with its test (:mod:`~tilted_priors.inference.diagnostics.stein`): how far each run is from :math:`\pi`
itself, which needs no reference run. :func:`compare_chains` is the same comparison on arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilted_priors._validation import check_flag, check_positive_int, check_probability
from tilted_priors.inference.diagnostics.arrays import (EnergyDistance, _numeric, as_chains, energy_distance,
                                                       nested_rhat, rhat)
from tilted_priors.inference.diagnostics.running import sampler_backend, scores_along, trajectory
from tilted_priors.inference.diagnostics.stein import SteinDiscrepancy, stein_discrepancy

__all__ = ["ShortVsLong", "compare_chains", "short_vs_long", "markdown_table"]


@dataclass(frozen=True)
class ShortVsLong:
    """The short-run versus long-run comparison (see :func:`short_vs_long`).

    Attributes
    ----------
    short, long : ndarray
        Trajectories ``(chain, draw, d)`` (draw 0 is the start, the last draw the final state).
    short_lp, long_lp : ndarray or None
        Unnormalised log densities ``(chain, draw)`` along them.
    short_steps, long_steps : ndarray
        The step at which each draw was recorded.
    superchain_ids : ndarray or None
        Chains that share a start share an id.
    distance : EnergyDistance
        Energy distance between the final states, with its permutation p-value.
    rhat_between : ndarray
        Per dimension, rank R-hat of the two final samples as two "chains" (about 1 under the same law).
    rhat_short, rhat_long : ndarray
        Per dimension, rank-normalised split R-hat over the second half of each run's trajectories.
    nested_rhat_short, nested_rhat_long : ndarray or None
        Per dimension, nested R-hat of each run's final states, super-chains by start.
    alpha : float
        Level of the verdict :attr:`differs`.
    figures : list of Path
        PNG files written.
    ksd_short, ksd_long : SteinDiscrepancy or None
        Kernel Stein discrepancy of each run's final states, with the bootstrap test at level ``alpha``
        (``None`` without scores).
    ksd_short_path, ksd_long_path : ndarray or None
        The KSD (V-statistic) of each run's states at every recorded draw ``(draw,)``: the discrepancy against the
        number of steps.
    coupling : CouplingBound or None
        The L-lag coupling bound on the total-variation distance of the short-run sampler's law to its own
        stationary law, against the number of steps (``None`` when not computed).
    """

    short: np.ndarray
    long: np.ndarray
    short_lp: np.ndarray | None
    long_lp: np.ndarray | None
    short_steps: np.ndarray
    long_steps: np.ndarray
    superchain_ids: np.ndarray | None
    distance: EnergyDistance
    rhat_between: np.ndarray
    rhat_short: np.ndarray
    rhat_long: np.ndarray
    nested_rhat_short: np.ndarray | None
    nested_rhat_long: np.ndarray | None
    alpha: float = 0.01
    figures: list = field(default_factory=list)
    ksd_short: SteinDiscrepancy | None = None
    ksd_long: SteinDiscrepancy | None = None
    ksd_short_path: np.ndarray | None = None
    ksd_long_path: np.ndarray | None = None
    coupling: object = None

    @property
    def differs(self) -> bool:
        """Whether the short run's final states differ from the long run's at level ``alpha`` (energy distance)."""
        return self.distance.p_value < self.alpha

    @property
    def nested_rhat_baseline(self) -> float | None:
        r"""Nested R-hat that chains which have forgotten their starts would give: the final states are one draw
        per chain, so :math:`\hat B_\nu \approx \sigma^2 / M` and :math:`\hat W_\nu \approx \sigma^2`, giving
        :math:`\sqrt{1 + 1/M}` for :math:`M` chains per start (not 1; compare the nested R-hats with this)."""
        if self.superchain_ids is None:
            return None
        per = np.bincount(np.unique(self.superchain_ids, return_inverse=True)[1])[0]
        return float(np.sqrt(1.0 + 1.0 / per))

    def table(self) -> list[dict]:
        """One row per latent dimension (then one for the energy): means, sds, the mean difference in standard
        errors (chains treated as independent) and the R-hats."""
        a, b = self.short[:, -1], self.long[:, -1]
        rows = []

        def row(name, x, y, extra):
            se = np.sqrt(x.var(ddof=1) / x.size + y.var(ddof=1) / y.size)
            z = (x.mean() - y.mean()) / se if se > 0 else 0.0
            rows.append({"quantity": name, "mean short": x.mean(), "mean long": y.mean(), "z": z,
                         "sd short": x.std(ddof=1), "sd long": y.std(ddof=1), **extra})

        for j in range(a.shape[-1]):
            extra = {"R-hat between": self.rhat_between[j], "R-hat short": self.rhat_short[j],
                     "R-hat long": self.rhat_long[j]}
            if self.nested_rhat_short is not None:
                extra.update({"nR-hat short": self.nested_rhat_short[j], "nR-hat long": self.nested_rhat_long[j]})
            row(f"latent {j}", a[:, j], b[:, j], extra)
        if self.short_lp is not None and self.long_lp is not None:
            row("energy", -self.short_lp[:, -1], -self.long_lp[:, -1], {})
        return rows

    def to_markdown(self) -> str:
        """The table and the verdict as Markdown."""
        lines = [markdown_table(self.table())]
        d = self.distance
        verdict = "**differ**" if self.differs else "do not differ detectably"
        lines += ["", f"Short run ({int(self.short_steps[-1])} steps) vs long run ({int(self.long_steps[-1])} "
                  f"steps), {self.short.shape[0]} chains: energy distance {d.statistic:.4g}, permutation p-value "
                  f"{d.p_value:.3g} ({d.num_permutations} permutations); at level {self.alpha:g} the final "
                  f"states {verdict}."]
        if self.nested_rhat_baseline is not None:
            lines.append(f"Nested R-hat (nR-hat) groups the chains by start; chains that have forgotten their "
                         f"start give about {self.nested_rhat_baseline:.3f} here (sqrt(1 + 1/M), M chains per "
                         "start); larger values mean the final states still depend on where the chains began.")
        if self.ksd_short is not None and self.ksd_long is not None:
            def verdict(r):
                return (f"{r.ksd:.4g} (bootstrap p-value {r.p_value:.3g}: "
                        f"{'not from the target' if r.reject else 'consistent with the target'})")
            lines.append(f"Kernel Stein discrepancy of the final states against the target itself (IMQ kernel, "
                         f"{self.ksd_short.n} chains, level {self.alpha:g}): short run {verdict(self.ksd_short)}, "
                         f"long run {verdict(self.ksd_long)}. It needs no reference run: a long run that is itself "
                         "stuck shows a large KSD too.")
        if self.coupling is not None:
            lines.append(coupling_sentence(self.coupling, int(self.short_steps[-1])))
        return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """Rows ``{column: value}`` as a Markdown table (columns in order of appearance; floats to 3 decimals,
    missing cells empty).

    Examples
    --------
    >>> print(markdown_table([{"a": 1, "b": 0.5}, {"a": 2}]))
    | a | b |
    |---|---|
    | 1 | 0.500 |
    | 2 |  |
    """
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v) for v in (r.get(c, "") for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_chains(short, long, *, short_lp=None, long_lp=None, short_steps=None, long_steps=None,
                   superchain_ids=None, alpha: float = 0.01, num_permutations: int = 200, seed: int = 0,
                   short_scores=None, long_scores=None, coupling=None) -> ShortVsLong:
    r"""Compare short-run and long-run trajectories ``(chain, draw, d)`` of the same chains (array layer).

    See :func:`short_vs_long`, which runs the samplers and calls this. Both runs need the same number of chains
    (the same starts); ``superchain_ids`` groups chains that share a start (for nested R-hat; each group needs
    at least two chains). ``short_scores`` and ``long_scores``, the scores :math:`\nabla\log\pi` at every state
    ``(chain, draw, d)``, add the kernel Stein discrepancies; ``coupling`` (a ``CouplingBound``) is kept for the
    report.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> r = compare_chains(rng.normal(size=(200, 5, 2)), rng.normal(size=(200, 5, 2)))
    >>> r.differs
    False
    """
    alpha = check_probability(alpha, "alpha")
    check_positive_int("num_permutations", num_permutations)  # the verdict is a permutation test
    short = as_chains(short, name="short", min_draws=1)
    long = as_chains(long, name="long", min_draws=1)
    if short.ndim != 3 or long.ndim != 3 or short.shape[0] != long.shape[0] or short.shape[2] != long.shape[2]:
        raise ValueError(f"short and long must be (chain, draw, d) with the same chains and d, got {short.shape} "
                         f"and {long.shape}")
    if short.shape[0] < 4:
        raise ValueError(f"compare at least 4 chains, got {short.shape[0]}")
    lps = []
    for n, lp, x in (("short_lp", short_lp, short), ("long_lp", long_lp, long)):
        if lp is not None:
            lp = as_chains(_numeric(lp, n, "(chain, draw)")[..., None], name=n)[..., 0]
            if lp.shape != x.shape[:2]:
                raise ValueError(f"{n} must have shape (chain, draw) = {x.shape[:2]}, one log density per state of "
                                 f"{n[:-3]}, got shape {lp.shape}")
        lps.append(lp)
    for n, steps, x in (("short_steps", short_steps, short), ("long_steps", long_steps, long)):
        if steps is not None and np.shape(steps) != x.shape[1:2]:
            raise ValueError(f"{n} must have shape (draw,) = {x.shape[1:2]}, the step of each recorded state, got "
                             f"shape {np.shape(steps)}")
    rng = np.random.default_rng(seed)
    a, b = short[:, -1], long[:, -1]
    # Two "chains" (short, long) whose draws are the chains' final states, in random order so that chains
    # sharing a start do not fall in one split half.
    order = rng.permutation(a.shape[0])
    between = rhat(np.stack([a[order], b[order]]))
    nested = (None, None)
    if superchain_ids is not None:
        nested = tuple(nested_rhat(x[:, -1:], superchain_ids) for x in (short, long))

    def second_half(x):
        half = x[:, x.shape[1] // 2:]
        return rhat(half) if half.shape[1] >= 4 else np.full(x.shape[2], np.nan)

    ksd = _stein(short, long, short_scores, long_scores, alpha, seed)
    return ShortVsLong(
        **ksd, coupling=coupling, short=short, long=long, short_lp=lps[0], long_lp=lps[1],
        short_steps=np.arange(short.shape[1]) if short_steps is None else np.asarray(short_steps),
        long_steps=np.arange(long.shape[1]) if long_steps is None else np.asarray(long_steps),
        superchain_ids=None if superchain_ids is None else np.asarray(superchain_ids),
        distance=energy_distance(a, b, num_permutations=num_permutations, seed=seed),
        rhat_between=between, rhat_short=second_half(short), rhat_long=second_half(long),
        nested_rhat_short=nested[0], nested_rhat_long=nested[1], alpha=alpha)


def _stein(short: np.ndarray, long: np.ndarray, short_scores, long_scores, alpha: float, seed: int) -> dict:
    """The Stein fields of :class:`ShortVsLong` (all ``None`` without both runs' scores)."""
    if short_scores is None or long_scores is None:
        return {}
    out = {}
    for name, x, sc in (("short", short, short_scores), ("long", long, long_scores)):
        sc = _numeric(sc, f"{name}_scores", "(chain, draw, d)")
        if sc.shape != x.shape:
            raise ValueError(f"{name}_scores must have the shape of {name}, (chain, draw, d) = {x.shape}, one score "
                             f"per state, got {sc.shape}")
        path = np.moveaxis(x, 1, 0), np.moveaxis(sc, 1, 0)  # (draw, chain, d): one sample per recorded draw
        out[f"ksd_{name}_path"] = np.asarray(stein_discrepancy(*path).ksd)
        out[f"ksd_{name}"] = stein_discrepancy(x[:, -1], sc[:, -1], test=True, level=alpha, seed=seed)
    return out


def coupling_sentence(bound, steps: int) -> str:
    """One sentence of the report on a ``CouplingBound``: the TV bound after ``steps`` steps and the steps that
    bring it under 0.1."""
    at = np.searchsorted(bound.steps, steps)
    tv = float(bound.tv_bound[min(at, len(bound.tv_bound) - 1)])
    need = bound.steps_for(0.1)
    needed = f"{need} steps bring it under 0.1" if need is not None else "no step within the budget brings it " \
        "under 0.1"
    return (f"Coupling bound ({bound.num_pairs} pairs of coupled chains, lag {bound.lag}): after {steps} steps the "
            f"short-run sampler's law is within total variation {tv:.3g} of its own stationary law; {needed}.")


def short_vs_long(sampler_short, sampler_long, log_density, starts, *, chains_per_start: int = 4,
                  num_draws: int = 20, alpha: float = 0.01, seed: int = 0, out=None,
                  prefix: str = "short_vs_long", stein: bool = True, score=None,
                  coupling=None) -> ShortVsLong:
    r"""Run the same starts for :math:`K` steps (``sampler_short``) and :math:`L \gg K` (``sampler_long``) and
    compare what they reach.

    Each start is replicated ``chains_per_start`` times (a super-chain, for nested R-hat); both samplers run
    every chain from its start, recording ``num_draws`` states (:func:`trajectory`). The final states are
    compared by :func:`compare_chains`: per-dimension means and sds, the (unnormalised) energy
    :math:`-\log\pi`, the energy distance with a permutation p-value (the verdict
    :attr:`ShortVsLong.differs` at level ``alpha``), R-hat and nested R-hat. The long run is only a reference
    when it has converged: check ``rhat_long`` (near 1) and use an exact sampler (MALA) for it. With ``stein``
    (default), the kernel Stein discrepancy of both runs against :math:`\pi` itself, along the runs and for the
    final states with its test, which does not trust the long run. With ``coupling``, the L-lag coupling bound
    of the short-run sampler.

    Parameters
    ----------
    sampler_short, sampler_long : sampler
        Samplers of one backend (``ShortRunLangevin``, ``MALA``), or numpy samplers (see :func:`trajectory`).
    log_density : callable
        ``(..., d) -> (...)`` on that backend's arrays; need not be normalised.
    starts : array_like
        Starting points ``(n, d)``.
    chains_per_start : int
        Chains per start (at least 2 for nested R-hat).
    num_draws : int
        States recorded along each run (for trajectories, trace plots and R-hat).
    out : path, optional
        A directory: write ``<prefix>_energy.png``, ``_marginals.png``, ``_rank.png``, ``_trace.png`` there (and
        ``_ksd.png``, ``_coupling.png`` with those diagnostics).
    stein : bool
        Compute the kernel Stein discrepancies (the scores by the backend's autodiff of ``log_density``; for
        numpy samplers give ``score``).
    score : callable, optional
        ``score(z)``: :math:`\nabla\log\pi` at numpy points ``(..., d)`` (numpy samplers only need it).
    coupling : CouplingBound, optional
        A coupling bound of ``sampler_short`` computed beforehand (``coupling_bound`` of the sampler's backend),
        shown in the report and plotted.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import MALA, ShortRunLangevin
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> starts = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (50, 2))
    >>> r = short_vs_long(ShortRunLangevin(5, 0.05), MALA(400, 0.8), f, starts)
    >>> r.differs
    True
    """
    chains_per_start = check_positive_int("chains_per_start", chains_per_start)
    starts_np = _numeric(starts, "starts", "(n, d)")
    if starts_np.ndim != 2:
        raise ValueError(f"starts must have shape (n, d), got {starts_np.shape}")
    if not np.isfinite(starts_np).all():
        raise ValueError("starts hold non-finite values")
    backends = {sampler_backend(sampler_short, "sampler_short"), sampler_backend(sampler_long, "sampler_long")}
    if len(backends) > 1:
        raise TypeError(f"both samplers must come from one backend, got {sorted(backends)}")
    stein = check_flag(stein, "stein")
    if not callable(log_density):
        raise TypeError(f"log_density must be a function (..., d) -> (...) on the samplers' arrays, got "
                        f"{type(log_density).__name__}")
    init = np.repeat(starts_np, chains_per_start, axis=0)
    ids = np.repeat(np.arange(starts_np.shape[0]), chains_per_start) if chains_per_start > 1 else None
    s_steps, short, s_lp = trajectory(sampler_short, log_density, init, num_draws, seed)
    l_steps, long, l_lp = trajectory(sampler_long, log_density, init, num_draws, seed + 1)
    scores = (None, None)
    if stein:
        backend = next(iter(backends))
        scores = tuple(scores_along(backend, log_density, x, score) for x in (short, long))
    report = compare_chains(short, long, short_lp=s_lp, long_lp=l_lp, short_steps=s_steps, long_steps=l_steps,
                            superchain_ids=ids, alpha=alpha, seed=seed, short_scores=scores[0],
                            long_scores=scores[1], coupling=coupling)
    if out is not None:
        from tilted_priors.inference.diagnostics import plots

        out = Path(out)
        report.figures.extend([
            plots.plot_energy_trajectories({f"short ({s_steps[-1]} steps)": (s_steps, s_lp),
                                            f"long ({l_steps[-1]} steps)": (l_steps, l_lp)},
                                           out / f"{prefix}_energy.png"),
            plots.plot_marginals({"short": short[:, -1], "long": long[:, -1]}, out / f"{prefix}_marginals.png"),
            plots.plot_rank_short_long(short[:, -1], long[:, -1], out / f"{prefix}_rank.png"),
            # one chain from each of up to 8 starts spread over them (the first chains would share a start)
            plots.plot_trace(long[_spread(starts_np.shape[0], 8) * chains_per_start], out / f"{prefix}_trace.png"),
        ])
        if report.ksd_short_path is not None:
            report.figures.append(plots.plot_ksd_paths({"short": (s_steps, report.ksd_short_path),
                                                        "long": (l_steps, report.ksd_long_path)},
                                                       out / f"{prefix}_ksd.png"))
        if coupling is not None:
            report.figures.append(plots.plot_coupling_bound(coupling, out / f"{prefix}_coupling.png"))
    return report


def _spread(n: int, k: int) -> np.ndarray:
    """Up to ``k`` distinct indices spread evenly over ``0 .. n - 1``, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))
