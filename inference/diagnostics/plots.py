"""PNG figures for the short-run versus long-run report: energy trajectories, marginals, rank and trace plots, the
kernel Stein discrepancy and the coupling bound against the number of steps.

Energy trajectories and marginal histograms are drawn with matplotlib's object API (no global state, no display
needed); rank and trace plots are ArviZ's own (``az.plot_rank``, ``az.plot_trace``; ArviZ 0.2x or 1.x).
Every function writes one PNG and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from tilted_priors._extras import import_dependency
from tilted_priors.inference.diagnostics._arviz import arviz_major, arviz_module
from tilted_priors.inference.diagnostics.arrays import _numeric
from tilted_priors.inference.diagnostics.data import to_inference_data

__all__ = ["plot_energy_trajectories", "plot_marginals", "plot_rank_short_long", "plot_trace", "plot_ksd_paths",
           "plot_coupling_bound"]

_WHAT = "tilted_priors.inference.diagnostics.plots"


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 3.5)):
    Figure = import_dependency("matplotlib.figure", _WHAT).Figure
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _labelled(value, name: str, what: str) -> dict:
    """``value`` as a non-empty dict ``{label: ...}``, or a ``TypeError`` / ``ValueError`` naming ``name``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict {{label: {what}}} (one entry per run, e.g. {{'short': ..., "
                        f"'long': ...}}), got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} is empty: give at least one {{label: {what}}}")
    return dict(value)


def _points(x, name: str) -> np.ndarray:
    """``x`` as a float array ``(n, d)`` (``(n,)`` taken as ``d = 1``), or an error naming ``name``."""
    x = _numeric(x, name, "(n, d)")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d) (n points in d dimensions), got shape {x.shape}")
    return x


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_energy_trajectories(runs: dict[str, tuple[np.ndarray, np.ndarray]], path, max_chains: int = 20) -> Path:
    """Energy :math:`-\\log\\pi(z)` (unnormalised) along each run: the median over chains, the 10-90% band and a
    few chains; one panel per run. ``runs`` maps a label to ``(steps (draw,), log densities (chain, draw))``.

    Examples
    --------
    >>> import tempfile, os
    >>> lp = -np.abs(np.random.default_rng(0).normal(size=(10, 5)))
    >>> p = plot_energy_trajectories({"short": (np.arange(5), lp)}, os.path.join(tempfile.mkdtemp(), "e.png"))
    >>> p.name
    'e.png'
    """
    runs = _labelled(runs, "runs", "(steps (draw,), log densities (chain, draw))")
    checked = {}
    for label, run in runs.items():
        if not isinstance(run, (tuple, list)) or len(run) != 2:
            raise TypeError(f"runs[{label!r}] must be a pair (steps (draw,), log densities (chain, draw)), got "
                            f"{type(run).__name__}")
        steps, lp = _numeric(run[0], f"runs[{label!r}][0]", "(draw,)"), _numeric(run[1], f"runs[{label!r}][1]",
                                                                                  "(chain, draw)")
        if lp.ndim != 2 or steps.shape != lp.shape[1:]:
            raise ValueError(f"runs[{label!r}] must be (steps (draw,), log densities (chain, draw)) with the same "
                             f"number of draws, got shapes {steps.shape} and {lp.shape}")
        checked[label] = (steps, lp)
    fig, axes = _figure(1, len(checked))
    for ax, (label, (steps, lp)) in zip(axes[0], checked.items()):
        energy = -np.asarray(lp)
        ax.plot(steps, energy[:max_chains].T, color="0.6", lw=0.5, alpha=0.6)
        lo, mid, hi = np.quantile(energy, [0.1, 0.5, 0.9], axis=0)
        ax.fill_between(steps, lo, hi, color="C0", alpha=0.25, label="10-90%")
        ax.plot(steps, mid, color="C0", lw=2, label="median")
        ax.set(title=f"{label}: {energy.shape[0]} chains", xlabel="step", ylabel="energy (unnormalised)")
        ax.legend(loc="upper right")
    return _save(fig, path)


def plot_marginals(samples: dict[str, np.ndarray], path, max_dims: int = 8, bins: int = 40) -> Path:
    """Histograms of each dimension's marginal, one colour per sample; ``samples`` maps a label to ``(n, d)``.

    Examples
    --------
    >>> import tempfile, os
    >>> rng = np.random.default_rng(0)
    >>> s = {"short": rng.normal(size=(100, 2)), "long": rng.normal(size=(100, 2))}
    >>> plot_marginals(s, os.path.join(tempfile.mkdtemp(), "m.png")).suffix
    '.png'
    """
    samples = {label: _points(s, f"samples[{label!r}]")
               for label, s in _labelled(samples, "samples", "(n, d)").items()}
    dims = {s.shape[1] for s in samples.values()}
    if len(dims) > 1:
        raise ValueError(f"the samples must have the same dimension d, got {sorted(dims)}")
    first = next(iter(samples.values()))
    d = min(first.shape[-1], max_dims)
    ncols = min(d, 4)
    nrows = -(-d // ncols)
    fig, axes = _figure(nrows, ncols, size=(3.2, 2.6))
    for j, ax in enumerate(axes.ravel()):
        if j >= d:
            ax.set_axis_off()
            continue
        values = [np.asarray(s)[:, j] for s in samples.values()]
        edges = np.histogram_bin_edges(np.concatenate(values), bins=bins)
        for label, v in zip(samples, values):
            ax.hist(v, bins=edges, density=True, histtype="step", lw=1.5, label=label)
        ax.set_title(f"latent {j}")
    axes.ravel()[0].legend(loc="upper right", fontsize="small")
    return _save(fig, path)


def _arviz_plot(name: str, data, path, **kwargs) -> Path:
    """Run ``az.<name>`` and save its figure (an axes array in ArviZ 0.x, a PlotCollection in 1.x)."""
    plt = import_dependency("matplotlib.pyplot", _WHAT)  # first: a missing matplotlib is named as such
    az = arviz_module()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if arviz_major() >= 1:
        plot = getattr(az, name)(data, backend="matplotlib", **kwargs)
        plot.savefig(path)
        plt.close("all")
        return path
    axes = getattr(az, name)(data, **kwargs)
    fig = np.ravel(axes)[0].get_figure()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rank_short_long(short: np.ndarray, long: np.ndarray, path, max_dims: int = 8) -> Path:
    """ArviZ rank plot of the short-run and the long-run final states as two "chains" of one variable.

    Under the same law the ranks of both are uniform (flat histograms); a short run that has not reached the
    long run's law shows sloped or U-shaped histograms. ``short`` and ``long`` are ``(n, d)`` with equal ``n``.
    """
    short, long = _points(short, "short"), _points(long, "long")
    if short.shape[1] != long.shape[1]:
        raise ValueError(f"short and long must have the same dimension d, got shapes {short.shape} and {long.shape}")
    n = min(len(short), len(long))
    pooled = np.stack([np.asarray(short)[:n, :max_dims], np.asarray(long)[:n, :max_dims]])
    return _arviz_plot("plot_rank", to_inference_data(pooled, coords={"chain": ["short", "long"]}), path)


def plot_trace(chains: np.ndarray, path, max_chains: int = 8, max_dims: int = 4) -> Path:
    """ArviZ trace plot of a few chains ``(chain, draw, d)`` (their first ``max_dims`` dimensions)."""
    chains = _numeric(chains, "chains", "(chain, draw, d)")
    if chains.ndim != 3:
        raise ValueError(f"chains must have shape (chain, draw, d), got shape {chains.shape}"
                         + ("; for one variable pass chains[..., None]" if chains.ndim == 2 else ""))
    chains = chains[:max_chains, :, :max_dims]
    return _arviz_plot("plot_trace", to_inference_data(chains), path)


def plot_ksd_paths(runs: dict[str, tuple[np.ndarray, np.ndarray]], path) -> Path:
    """The kernel Stein discrepancy of each run's states against the number of steps (log-log axes where
    positive). ``runs`` maps a label to ``(steps (draw,), ksd (draw,))``."""
    runs = _labelled(runs, "runs", "(steps, ksd)")
    fig, axes = _figure()
    ax = axes[0, 0]
    for label, (steps, ksd) in runs.items():
        steps, ksd = np.asarray(steps, dtype=float), np.asarray(ksd, dtype=float)
        if steps.shape != ksd.shape or steps.ndim != 1:
            raise ValueError(f"runs[{label!r}] must be (steps, ksd), two arrays of shape (draw,), got "
                             f"{steps.shape} and {ksd.shape}")
        ax.plot(np.maximum(steps, 0.5), ksd, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps (0 plotted at 0.5)")
    ax.set_ylabel("kernel Stein discrepancy")
    ax.legend()
    return _save(fig, path)


def plot_coupling_bound(bound, path) -> Path:
    """The L-lag coupling bound on the total-variation distance to the stationary law against the number of
    steps, with a band of two Monte Carlo standard errors. ``bound`` is a ``CouplingBound``."""
    steps = np.asarray(bound.steps, dtype=float)
    tv, se = np.asarray(bound.tv_bound, dtype=float), np.asarray(bound.tv_stderr, dtype=float)
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot(steps, np.minimum(tv, 1.0), label=f"TV bound (lag {bound.lag}, {bound.num_pairs} pairs)")
    ax.fill_between(steps, np.clip(tv - 2 * se, 0, 1), np.clip(tv + 2 * se, 0, 1), alpha=0.3)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("steps")
    ax.set_ylabel("total variation to the stationary law (upper bound)")
    ax.legend()
    return _save(fig, path)

