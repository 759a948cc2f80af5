"""Command line: ``tilted-priors train|sample|evaluate|diagnose|demo|prior-demo`` (also ``python -m tilted_priors``).

- ``train METHOD --backend {pyro,numpyro} --data mnist|PATH --epochs N --out DIR``: train (``lebm``, or ``abp``
  with a Normal prior), then evaluate; ``--resume`` continues an interrupted run exactly.
- ``sample DIR --n 64``: draw images from a trained run's prior into a PNG grid.
- ``evaluate DIR``: recompute the run's samples, reconstructions and ``metrics.json``.
- ``diagnose DIR``: prior chains short vs long, posterior chains (short-run guide vs MALA vs NUTS) for a few
  test images; writes ``diagnostics.md``, ``diagnostics.json`` and PNGs (see :mod:`tilted_priors.models.diagnose`).
- ``demo``: ``make demo``'s job: LEBM on the embedded MNIST-5k for a few minutes, on the faster backend.
- ``prior-demo``: sample a 2-D tilted prior with a known answer (an 8-mode ring, ``log Z = 0``).
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilted-priors", description="Train, sample, evaluate and diagnose the ready tilted-prior models")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model (then evaluate it)")
    tr.add_argument("method", choices=["lebm", "abp"])
    tr.add_argument("--backend", choices=["pyro", "numpyro"],
                    help="default: numpyro (with --resume: the run's)")
    tr.add_argument("--data", help="'mnist' (embedded MNIST-5k, the default) or a .npz / .npy / IDX file")
    length = tr.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=_positive(int))
    length.add_argument("--steps", type=_positive(int))
    tr.add_argument("--out", required=True)
    tr.add_argument("--batch-size", type=_positive(int), help="default: 100 (with --resume: the run's)")
    tr.add_argument("--latent-dim", type=_positive(int), help="default: 16 (with --resume: the run's)")
    tr.add_argument("--ngf", type=_positive(int), help="generator width; default: 32 (with --resume: the run's)")
    tr.add_argument("--lr-energy", type=_positive(float), help="default: the paper's 2e-5 (with --resume: the run's)")
    tr.add_argument("--lr-generator", type=_positive(float),
                    help="default: the paper's 1e-4 (with --resume: the run's)")
    tr.add_argument("--seed", type=_nonnegative_int, help="default: 0 (with --resume: the run's)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint, with its settings")
    tr.add_argument("--devices", type=_positive(int), default=None,
                    help="NumPyro: train data-parallel on the first N of jax.devices() (default: one device). Pyro: "
                         "run this command under `torchrun --nproc_per_node N -m tilted_priors train ...` instead")
    tr.add_argument("--checkpoint-every", type=_positive(int), default=200,
                    help="write a checkpoint every N updates (default: 200; the last 3 are kept)")
    tr.add_argument("--no-eval", action="store_true")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="draw images from a trained run")
    sa.add_argument("run_dir")
    sa.add_argument("--n", type=_positive(int), default=64)
    sa.add_argument("--out")
    sa.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("evaluate", help="samples, reconstructions and metrics of a trained run")
    ev.add_argument("run_dir")

    dg = sub.add_parser("diagnose", help="short-run vs long-run chains of a trained run (diagnostics.md)")
    dg.add_argument("run_dir")
    dg.add_argument("--out", help="directory for the report (default: the run directory)")
    dg.add_argument("--starts", type=_positive(int), default=100, help="prior chain starts")
    dg.add_argument("--chains-per-start", type=_positive(int), default=4)
    dg.add_argument("--long-steps", type=_positive(int), default=2000, help="steps of the long prior MALA run")
    dg.add_argument("--images", type=_positive(int), default=4, help="test images for the posterior chains")
    dg.add_argument("--short-chains", type=_positive(int), default=200, help="short-run guide chains per image")
    dg.add_argument("--chains", type=_positive(int), default=2, help="MALA and NUTS chains")
    dg.add_argument("--warmup", type=_positive(int), default=200)
    dg.add_argument("--samples", type=_positive(int), default=200)
    dg.add_argument("--max-tree-depth", type=_positive(int), default=6)
    dg.add_argument("--coupling-steps", type=int, default=None,
                    help="budget of the prior sampler's coupling bound (default: 10 x its steps; 0 skips it)")
    dg.add_argument("--seed", type=int, default=0)

    de = sub.add_parser("demo", help="LEBM on MNIST-5k for a few minutes (make demo)")
    de.add_argument("--out", default="demo-output")
    de.add_argument("--epochs", type=_positive(int), default=DEMO["epochs"])

    pd = sub.add_parser("prior-demo", help="sample a 2-D tilted prior with a known answer and plot it")
    pd.add_argument("--out", default="demo-output")
    pd.add_argument("--num", type=_positive(int), default=2000)
    pd.add_argument("--seed", type=int, default=0)

    for p in (tr, sa, ev, dg, de, pd):
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except _USER_ERRORS as err:
        if args.debug:
            raise
        print(f"tilted-priors {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "prior-demo":
        from tilted_priors.models.demo import run_demo

        print(json.dumps(run_demo(args.out, num=args.num, seed=args.seed), indent=2))
        return 0

    from tilted_priors.models import runs

    if args.command == "train":
        result = runs.train(args.method, backend=args.backend, data=args.data, out=args.out, epochs=args.epochs,
                            num_steps=args.steps, batch_size=args.batch_size, latent_dim=args.latent_dim,
                            ngf=args.ngf, lr_energy=args.lr_energy, lr_generator=args.lr_generator, seed=args.seed,
                            resume=args.resume, progress=not args.quiet, evaluate_after=not args.no_eval,
                            checkpoint_every=args.checkpoint_every, devices=args.devices)
    elif args.command == "sample":
        result = {"wrote": str(runs.sample(args.run_dir, args.n, out=args.out, seed=args.seed))}
    elif args.command == "evaluate":
        result = runs.evaluate(args.run_dir)
    elif args.command == "diagnose":
        from tilted_priors.models.diagnose import diagnose

        result = diagnose(args.run_dir, out=args.out, num_starts=args.starts, chains_per_start=args.chains_per_start,
                          long_steps=args.long_steps, num_images=args.images, short_chains=args.short_chains,
                          num_chains=args.chains, num_warmup=args.warmup, num_samples=args.samples,
                          max_tree_depth=args.max_tree_depth, coupling_steps=args.coupling_steps, seed=args.seed)
    else:  # demo
        settings = {k: v for k, v in DEMO.items() if k not in ("method", "epochs")}
        result = runs.train(DEMO["method"], out=args.out, epochs=args.epochs, ll_size=100, **settings)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
