"""Data-parallel training throughput against the number of processes (Pyro, ``torchrun``) and devices (NumPyro,
``fit(..., devices=N)``): LEBM on MNIST-sized images (28 x 28, the project's MNIST generator, ``ngf`` 16, a 16-d
latent, 20 posterior and 60 prior Langevin steps per update), one global minibatch of 64 split over the workers.

Each configuration runs in fresh processes: Pyro under ``python -m torch.distributed.run --nproc_per_node N`` (gloo on
CPU), NumPyro in one process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N virtual CPU devices).
Every worker is pinned to one thread, so N workers use N cores. The first ``--warmup`` updates (compilation, caches)
are not timed; the report gives updates per second over the next ``--steps`` and the speed-up over one worker. On a
machine with fewer idle cores than workers the speed-up is bounded by the cores, not by the library.

Run: ``.venv/bin/python benchmarks/scale_out.py [--workers 1 2] [--backends pyro numpyro] [--steps 20]
[--json out.json]`` (about a minute per configuration on two cores; ``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 64


def _data() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, size=(4 * BATCH, 28, 28, 1)).astype(np.float32)


def worker(backend: str, steps: int, warmup: int, devices: int) -> None:
    """Train for ``warmup + steps`` updates and print ``{"seconds": ..., "steps": ...}`` (rank 0 only)."""
    times: list[float] = []

    def callback(record):
        times.append(time.perf_counter())

    kw = dict(num_steps=warmup + steps, batch_size=BATCH, lr={"energy": 2e-5, "": 1e-4}, progress=False,
              callback=callback)
    if backend == "pyro":
        import torch

        from tilted_priors.inference.pyro import ShortRunPosterior, fit
        from tilted_priors.models.pyro.lebm import build

        torch.set_num_threads(1)
        lvm = build((28, 28, 1), 16, ngf=16)
        fit(lvm.model, ShortRunPosterior(lvm.model, steps=20, step_size=0.1), _data(), **kw)
        rank = int(os.environ.get("RANK", "0"))
    else:
        from tilted_priors.inference.numpyro import ShortRunPosterior, fit
        from tilted_priors.models.numpyro.lebm import build

        lvm = build((28, 28, 1), 16, ngf=16)
        fit(lvm.model, ShortRunPosterior(lvm.model, steps=20, step_size=0.1), _data(),
            devices=devices if devices > 1 else None, **kw)
        rank = 0
    if rank == 0:
        print(json.dumps({"seconds": times[-1] - times[warmup - 1], "steps": steps}))


def run(backend: str, n: int, steps: int, warmup: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve()), "--worker", backend, "--steps", str(steps), "--warmup", str(warmup),
          "--devices", str(n)]
    if backend == "pyro":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] \
            if n > 1 else [sys.executable]
    else:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n} --xla_cpu_multi_thread_eigen=false"
        launcher = [sys.executable]
    done = subprocess.run(launcher + me, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{backend} with {n} worker(s) failed:\n{done.stderr[-3000:]}")
    line = [s for s in done.stdout.splitlines() if s.startswith("{")][-1]
    out = json.loads(line)
    out["updates_per_second"] = out["steps"] / out["seconds"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", default=["pyro", "numpyro"], choices=["pyro", "numpyro"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 timed updates after 1 (a smoke run)")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.devices)
        return {}
    if args.quick:
        args.steps, args.warmup = 2, 1
    results = {}
    print(f"| backend | workers | updates / s | speed-up |\n|---|---|---|---|")
    for backend in args.backends:
        base = None
        for n in args.workers:
            r = run(backend, n, args.steps, args.warmup)
            base = base or r["updates_per_second"]
            r["speedup"] = r["updates_per_second"] / base
            results[f"{backend}-{n}"] = r
            print(f"| {backend} | {n} | {r['updates_per_second']:.2f} | {r['speedup']:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
