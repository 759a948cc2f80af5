r"""``python -m tilted_priors diagnose RUN_DIR``: are a trained model's short-run chains telling the truth?

Two questions, answered for the run's own backend and written next to the run, to ``RUN_DIR-diagnostics/``
(``diagnostics.md``, ``diagnostics.json`` and PNG figures; the run folder itself is left untouched):

1. **Prior.** The trained tilted prior's own short-run sampler (LEBM: 60 x 0.4 ULA) against a long MALA run
   (``long_steps``, step size searched for an acceptance of at least 0.5) from the same N(0, I) starts:
   :func:`tilted_priors.inference.diagnostics.short_vs_long` (moments, energy, energy distance, R-hat, nested
   R-hat; energy trajectories, marginals, rank and trace plots), the kernel Stein discrepancy of both runs
   against the tilted prior itself (no long run needed), and the L-lag coupling bound of the short-run sampler:
   an upper bound on the total variation between its law after :math:`t` steps and its own stationary law, with
   the steps that bring it under 0.1. Skipped for a Normal prior (``abp`` runs).
2. **Posterior.** For ``num_images`` test images: the short-run posterior guide that training used (20 x 0.1
   from noise, ``short_chains`` independent chains), long-run MALA (:class:`tilted_priors.inference.pyro.Langevin`,
   step size adapted in warm-up) and NUTS, both through the backend's own ``MCMC``. NUTS is the reference: for
   each image and method the table gives the largest difference of posterior means in units of NUTS's posterior
   sd, the median ratio of posterior sds, R-hat and bulk ESS of the MCMC chains, and the energy-distance p-value
   against NUTS's draws (MCMC draws thinned to about one per effective sample, so that the test's independence
   assumption roughly holds). Every method's draws also get their kernel Stein discrepancy against the posterior
   itself (scores of the unnormalised log joint in :math:`z`) with its test, on the same thinned draws: it needs
   no reference, so it also judges NUTS.

After each table, ``diagnostics.md`` says how to read it: what each column measures, which direction is good and
the thresholds (and why R-hat and nested R-hat of short chains have floors above 1).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tilted_priors.inference.diagnostics import energy_distance, short_vs_long, stein_discrepancy, summary
from tilted_priors.inference.diagnostics.plots import plot_marginals, plot_trace
from tilted_priors.inference.diagnostics.report import markdown_table
from tilted_priors.inference.files import atomic_write, usual_mode
from tilted_priors.models import runs
from tilted_priors.models.diagnose_guide import posterior_guide, prior_guide

__all__ = ["diagnose"]


def _stride(draws: np.ndarray, ess_bulk: np.ndarray | None = None) -> int:
    """The thinning stride of draws ``(chain, draw, d)`` that keeps about one draw per effective sample
    (``ess_bulk``: their bulk ESS, when already computed)."""
    if draws.shape[1] < 4:
        return 1
    ess = summary(draws).ess_bulk if ess_bulk is None else ess_bulk
    return max(1, int(round(draws.shape[0] * draws.shape[1] / float(np.min(ess)))))


def _thinned(draws: np.ndarray, stride: int | None = None) -> np.ndarray:
    """Draws ``(chain, draw, d)`` flattened to ``(n, d)``, every ``stride``-th draw (default :func:`_stride`)."""
    stride = _stride(draws) if stride is None else stride
    return draws[:, ::stride].reshape(-1, draws.shape[-1])


def _mala_step_size(backend, log_density, starts: np.ndarray, seed: int,
                    candidates=(1.0, 0.5, 0.25, 0.12, 0.06, 0.03, 0.015)) -> float:
    """The largest step size among ``candidates`` whose MALA acceptance over 100 steps is at least 0.5."""
    for h in candidates:
        if backend.mala_acceptance(log_density, starts, h, seed=seed) >= 0.5:
            return h
    return candidates[-1]


def _posterior_rows(draws: dict[str, np.ndarray], scores: dict[str, np.ndarray], seed: int) -> list[dict]:
    rows = []
    num_images = next(iter(draws.values())).shape[2]
    for i in range(num_images):
        ref = draws["NUTS"][:, :, i]
        ref_flat = ref.reshape(-1, ref.shape[-1])
        ref_mean, ref_sd = ref_flat.mean(0), ref_flat.std(0, ddof=1)
        ref_thinned = _thinned(ref)
        for name, all_draws in draws.items():
            d = all_draws[:, :, i]
            flat = d.reshape(-1, d.shape[-1])
            row = {"image": i, "method": name, "draws": flat.shape[0],
                   "max mean diff / NUTS sd": float(np.max(np.abs(flat.mean(0) - ref_mean) / ref_sd)),
                   "median sd / NUTS sd": float(np.median(flat.std(0, ddof=1) / ref_sd))}
            ess = None
            if d.shape[1] >= 4:
                s = summary(d)
                ess = s.ess_bulk
                row.update({"max R-hat": float(s.rhat.max()), "min ESS bulk": float(s.ess_bulk.min())})
            stride = _stride(d, ess)
            ksd = stein_discrepancy(_thinned(d, stride), _thinned(scores[name][:, :, i], stride), test=True,
                                    seed=seed)
            row.update({"KSD": float(ksd.ksd), "KSD p": float(ksd.p_value)})
            if name != "NUTS":
                row["p vs NUTS"] = energy_distance(_thinned(d, stride), ref_thinned, num_permutations=100,
                                                   seed=seed).p_value
            rows.append(row)
    return rows


def _coupling_json(bound, steps: int) -> dict:
    """The coupling bound's summary for ``diagnostics.json``: the TV bound (with its standard error) after the
    short run's ``steps`` and at twice as many, the steps for a bound of 0.1, the pairs that never met (with
    any, the bounds are infinite and written as ``null``)."""
    def number(v) -> float | None:
        return float(v) if np.isfinite(v) else None

    at = [t for t in (steps, 2 * steps) if t <= bound.max_steps]
    return {"lag": bound.lag, "num_pairs": bound.num_pairs, "num_unmet": bound.num_unmet,
            "max_steps": bound.max_steps, "steps_for_tv_0.1": bound.steps_for(0.1),
            "tv_bound": {str(t): number(bound.tv_bound[t]) for t in at},
            "tv_stderr": {str(t): number(bound.tv_stderr[t]) for t in at}}


def _default_out(run_dir: str | os.PathLike) -> Path:
    """``RUN-diagnostics`` next to the run folder ``RUN`` (not inside it).

    Examples
    --------
    >>> _default_out("runs/lebm-1").as_posix()
    'runs/lebm-1-diagnostics'
    """
    run = Path(run_dir)
    if run.name in ("", ".", ".."):  # "." or "..": name the folder after the run folder itself
        run = run.resolve()
    return run.parent / (run.name + "-diagnostics")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist, deepest first (what ``mkdir(parents=True)`` makes)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _publish(tmp: Path, out: Path) -> None:
    """Move the files of the finished report from the temporary folder ``tmp`` into ``out``: ``tmp`` itself is
    renamed to ``out`` when ``out`` does not exist yet, else each file replaces its namesake in ``out`` (the other
    files of ``out`` are kept)."""
    if not out.exists():
        os.chmod(tmp, usual_mode(folder=True))  # mkdtemp makes it 0700; a new folder gets the usual permissions
        try:
            os.rename(tmp, out)
            return
        except OSError:  # created in the meantime: move the files one by one
            pass
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)


def _finite(value) -> float | None:
    """``value`` as a float, ``None`` when missing or not finite (JSON has no NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None


def _summary(out: Path, files: list[str], prior: dict | None, rows: list[dict]) -> dict:
    """The key results for a command line (``result["summary"]``), JSON-serialisable."""
    posterior: dict[str, dict] = {}
    for row in rows:
        method = posterior.setdefault(row["method"], {"max_mean_diff_in_nuts_sd": None, "min_ksd_p": None})
        for key, column, pick in (("max_mean_diff_in_nuts_sd", "max mean diff / NUTS sd", max),
                                  ("min_ksd_p", "KSD p", min)):
            value = _finite(row.get(column))
            if value is not None:
                method[key] = value if method[key] is None else pick(method[key], value)
    if prior is not None:
        coupling = prior.get("coupling_bound")
        prior = {"differs": bool(prior["differs"]),
                 "energy_distance_p": _finite(prior["energy_distance"]["p_value"]),
                 "coupling_steps_tv_0.1": None if coupling is None else coupling["steps_for_tv_0.1"]}
    return {"out": str(out), "files": files, "prior": prior, "posterior": posterior}


def diagnose(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None, num_starts: int = 100,
             chains_per_start: int = 4, long_steps: int = 2000, num_images: int = 4, short_chains: int = 200,
             num_chains: int = 2, num_warmup: int = 200, num_samples: int = 200, max_tree_depth: int = 6,
             coupling_steps: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Write the short-run versus long-run diagnostics of a trained run (see the module docstring).

    Parameters
    ----------
    run_dir : path
        A run folder written by ``tilted-priors train`` (it is only read).
    out : path, optional
        The folder for the report: ``diagnostics.md``, ``diagnostics.json`` and the PNG figures. Default: a folder
        next to the run, ``Path(run_dir).parent / (Path(run_dir).name + "-diagnostics")``. It is created when
        missing; the files of an earlier report there are replaced, other files kept. The report is written into
        a temporary sibling folder and moved into ``out`` only when complete, so a diagnose that fails leaves
        ``out`` as it was (and no folder at all when ``out`` did not exist).
    num_starts, chains_per_start : int
        Prior: N(0, I) starts, and chains run from each (the super-chains of nested R-hat).
    long_steps : int
        Prior: steps of the long MALA run.
    num_images, short_chains : int
        Posterior: test images, and independent chains of the short-run guide for each.
    num_chains, num_warmup, num_samples, max_tree_depth : int
        Posterior: chains, warm-up draws and draws of MALA and NUTS; NUTS's maximum tree depth.
    coupling_steps : int, optional
        Prior: the budget of the coupling bound, ``num_starts`` pairs of chains from the same N(0, I) starts with
        a lag of the short run's length (default ten times that length); 0 skips it.
    seed : int
        Seed of the starts and of every sampler.
    progress : bool
        Show a progress bar over the stages on stderr (the backends' own MCMC bars stay off); ``False``: print
        nothing.

    Returns
    -------
    dict
        The numbers of ``diagnostics.json``: ``"run"``, ``"method"``, ``"backend"``, ``"prior"`` (LEBM runs),
        ``"posterior"`` (the table's rows) and ``"summary"``, the key results in a few lines: ``"out"`` (the
        report's folder), ``"files"`` (the names written there), ``"prior"`` (``None`` for a Normal prior, else
        ``"differs"``: whether the short run's final states differ from the long run's, ``"energy_distance_p"``
        and ``"coupling_steps_tv_0.1"``: the steps for a coupling bound under 0.1, ``None`` when skipped or not
        reached within the budget) and ``"posterior"``: for each method, ``"max_mean_diff_in_nuts_sd"`` (the
        largest over the images) and ``"min_ksd_p"`` (the smallest KSD p-value; ``None`` where not finite).
    """
    lvm, config, _ = runs.load(run_dir)
    backend = importlib.import_module(f"tilted_priors.models.{config['backend']}.diagnose")
    out = _default_out(run_dir) if out is None else Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the report's folder {out} is a file: give another folder for the report")
    lebm = config["method"] == "lebm"
    with_coupling = lebm and (coupling_steps is None or coupling_steps > 0)
    total = (2 + with_coupling if lebm else 0) + 5  # the stages of the progress bar
    made = _missing_folders(out.parent)
    tmp = None
    bar = tqdm(total=total, disable=not progress, file=sys.stderr, unit="stage", desc="diagnose")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        result = _diagnose(lvm, config, backend, run_dir, out, tmp, bar, num_starts=num_starts,
                           chains_per_start=chains_per_start, long_steps=long_steps, num_images=num_images,
                           short_chains=short_chains, num_chains=num_chains, num_warmup=num_warmup,
                           num_samples=num_samples, max_tree_depth=max_tree_depth, coupling_steps=coupling_steps,
                           seed=seed)
        _publish(tmp, out)
        bar.set_description("diagnose: done", refresh=False)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # the parents this call created, now empty again
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        bar.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _diagnose(lvm, config: dict, backend, run_dir, out: Path, tmp: Path, bar, *, num_starts: int,
              chains_per_start: int, long_steps: int, num_images: int, short_chains: int, num_chains: int,
              num_warmup: int, num_samples: int, max_tree_depth: int, coupling_steps: int | None, seed: int) -> dict:
    """:func:`diagnose`'s work: the report written into the folder ``tmp`` (to be moved to ``out``), the stages
    shown on ``bar``."""
    d = config["latent_dim"]
    md = [f"# Diagnostics of `{Path(run_dir).name}` ({config['method']}, {config['backend']})", ""]
    result: dict = {"run": str(run_dir), "method": config["method"], "backend": config["backend"]}

    md += ["## Prior: short run vs long run", ""]
    if config["method"] == "lebm":
        prior = lvm.prior(())
        log_density = prior.annealed_log_density(1.0)  # -E(z) + log N(z), unnormalised
        starts = np.random.default_rng(seed).normal(size=(num_starts, d)).astype(np.float32)
        with runs.progress_stage(bar, "prior: MALA step size"):
            step = _mala_step_size(backend, log_density, starts, seed)
        short = prior.sampler
        lag = int(getattr(short, "sampler", short).steps)
        budget = 10 * lag if coupling_steps is None else coupling_steps
        coupling = None
        if coupling_steps is None or coupling_steps > 0:
            with runs.progress_stage(bar, "prior: coupling bound"):
                coupling = backend.prior_coupling(short, log_density, starts, lag=lag, max_steps=budget,
                                                  seed=seed) if budget > lag else None
        with runs.progress_stage(bar, "prior: short vs long run"):
            report = short_vs_long(short, backend.MALA(long_steps, step), log_density, starts,
                                   chains_per_start=chains_per_start, seed=seed, out=tmp, prefix="prior",
                                   coupling=coupling)
        md += [f"Short: the prior's own sampler, {short!r}. Long: MALA, {long_steps} steps of size {step:g}. "
               f"{num_starts} N(0, I) starts x {chains_per_start} chains.", "", report.to_markdown(), ""]
        md += prior_guide(report, coupling, num_starts, chains_per_start) + [""]
        md += [f"![{p.stem}]({p.name})" for p in report.figures] + [""]
        result["prior"] = {"table": report.table(), "differs": report.differs,
                           "energy_distance": report.distance._asdict(), "mala_step_size": step,
                           "nested_rhat_baseline": report.nested_rhat_baseline}
        if report.ksd_short is not None:  # the kernel Stein discrepancy of both runs' final states, with its test
            result["prior"]["kernel_stein_discrepancy"] = {"short": report.ksd_short._asdict(),
                                                           "long": report.ksd_long._asdict()}
        if coupling is not None:
            result["prior"]["coupling_bound"] = _coupling_json(coupling, lag)
    else:
        md += ["The prior is a standard Normal: sampled exactly, nothing to diagnose.", ""]

    _, test = runs._load_data(config["data"], config["seed"])
    images = test.x[:num_images]
    methods: list[str] = []

    def next_method(name: str) -> None:  # one stage per method, shown while it runs
        if methods:
            bar.update()
        methods.append(name)
        bar.set_description(f"posterior: {name}")

    draws = backend.posterior_draws(lvm, images, short_chains=short_chains, steps=config["posterior_steps"],
                                    step_size=config["posterior_step_size"], num_chains=num_chains,
                                    num_warmup=num_warmup, num_samples=num_samples,
                                    max_tree_depth=max_tree_depth, seed=seed, on_method=next_method)
    bar.update(3 - max(len(methods) - 1, 0))  # the rest of the posterior's three stages
    with runs.progress_stage(bar, "posterior: Stein discrepancies and tests"):
        scores = {name: backend.posterior_scores(lvm, images, v) for name, v in draws.items()}
        rows = _posterior_rows(draws, scores, seed)
    with runs.progress_stage(bar, "figures and report"):
        figures = []
        for i in range(len(images)):
            figures.append(plot_marginals({name: v[:, :, i].reshape(-1, d) for name, v in draws.items()},
                                          tmp / f"posterior_{i}_marginals.png"))
            figures.append(plot_trace(draws["NUTS"][:, :, i], tmp / f"posterior_{i}_nuts_trace.png"))
        md += ["## Posterior: short-run guide vs long-run MALA vs NUTS", "",
               f"{len(images)} test images; short-run guide {config['posterior_steps']} x "
               f"{config['posterior_step_size']:g} from noise ({short_chains} chains); MALA and NUTS: {num_chains} "
               f"chains x {num_samples} draws after {num_warmup} warm-up. NUTS is the reference for the mean, sd "
               "and energy-distance columns (p vs NUTS); the kernel Stein discrepancy (KSD) needs no reference, so "
               "it judges NUTS too.", "",
               markdown_table(rows), ""]
        md += posterior_guide(d, short_chains, num_chains, num_samples) + [""]
        md += [f"![{p.stem}]({p.name})" for p in figures] + [""]
        result["posterior"] = rows
        files = sorted({p.name for p in tmp.iterdir()} | {"diagnostics.md", "diagnostics.json"})
        result["summary"] = _summary(out, files, result.get("prior"), rows)
        atomic_write(tmp / "diagnostics.md", lambda f: f.write("\n".join(md).encode()))
        text = json.dumps(result, indent=2, default=float)
        atomic_write(tmp / "diagnostics.json", lambda f: f.write(text.encode()))
    return result
