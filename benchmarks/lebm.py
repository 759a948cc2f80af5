"""LEBM training: the library against a hand-written loop, and LEBM against its Gaussian-prior baseline.

1. One training iteration (20 posterior steps x 0.1, 60 prior steps x 0.4, one Adam step) on MNIST batches of
   100, the MNIST generator (``ngf``) and LEBM's 16-200-200-1 energy: the library (``SVI`` with
   :class:`ShortRunPosterior` and the tilted prior's contrastive normalizer) against the same algorithm written by
   hand with the same networks, on each backend; alternating rounds, medians of per-round ratios. The hand-written
   NumPyro loop is one jitted function with the same loop unrolling as the library (full for the posterior chain,
   rolled for the prior chain).
2. Equal budget: LEBM and the same generator with a Normal prior (alternating back-propagation, ``abp``) trained
   for the same number of steps; Fréchet distance (lower is better) and importance-sampled test log-likelihood
   (higher is better), from :func:`tilted_priors.models.runs.train`.

Run: ``.venv/bin/python benchmarks/lebm.py [--rounds 10] [--budget 400] [--skip-budget] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hand_lebm import numpyro_update, pyro_update  # noqa: E402
from samplers import compare  # noqa: E402  (the same alternating timing as the sampler benchmark)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from tilted_priors.models.data import load_mnist  # noqa: E402

B, D, SD, POST, PRIOR = 100, 16, 0.3, (20, 0.1), (60, 0.4)


def pyro_pair(x: np.ndarray, ngf: int):
    from pyro.infer import SVI, Trace_ELBO

    from tilted_priors.inference.pyro import ShortRunPosterior
    from tilted_priors.models.pyro.lebm import build

    xt = torch.as_tensor(x)
    lvm = build((28, 28, 1), D, ngf=ngf, seed=0)
    pyro.clear_param_store()
    svi = SVI(lvm.model, ShortRunPosterior(lvm.model, *POST), pyro.optim.Adam({"lr": 1e-4, "betas": (0.5, 0.999)}),
              Trace_ELBO())

    def library():
        svi.step(xt)

    fresh = build((28, 28, 1), D, ngf=ngf, seed=0)
    E, G = fresh.energy, fresh.generator
    optimizer = torch.optim.Adam(list(E.parameters()) + list(G.parameters()), lr=1e-4, betas=(0.5, 0.999))
    hand = pyro_update(E, G, xt, D, SD, POST, PRIOR, optimizer)
    return library, hand


def numpyro_pair(x: np.ndarray, ngf: int):
    from numpyro.infer import SVI, Trace_ELBO

    from tilted_priors.inference.numpyro import ShortRunPosterior
    from tilted_priors.models.numpyro.lebm import build

    xj = jnp.asarray(x)
    lvm = build((28, 28, 1), D, ngf=ngf, seed=0)
    svi = SVI(lvm.model, ShortRunPosterior(lvm.model, *POST), optax.adam(1e-4, b1=0.5), Trace_ELBO())
    state = [svi.init(jax.random.PRNGKey(0), xj)]
    update = jax.jit(svi.update)

    def library():
        state[0], loss = update(state[0], xj)
        loss.block_until_ready()

    # The same loop unrolling as the library: full for the (convolutional) posterior chain, rolled for the prior.
    hand = numpyro_update(lvm.energy, lvm.generator, xj, D, SD, POST, PRIOR, optax.adam(1e-4, b1=0.5),
                          unroll=(True, 1))
    return library, hand


def budget(steps: int, backend: str) -> dict:
    from tilted_priors.models import runs

    out = {}
    for method in ("lebm", "abp"):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            m = runs.train(method, backend=backend, out=d, num_steps=steps, ngf=16, lr_energy=1e-4,
                           lr_generator=1e-3, progress=False, eval_size=500)
            out[method] = {"frechet_distance": m.get("frechet_distance"),
                           "test_log_likelihood": m["test_log_likelihood"]["mean"],
                           "test_log_likelihood_stderr": m["test_log_likelihood"]["stderr"],
                           "per_datum": m["test_log_likelihood_per_datum"],
                           "log_z": m["log_z"], "mse": m["mse"], "seconds": time.perf_counter() - t}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--budget", type=int, default=400, help="training steps for each model in part 2")
    parser.add_argument("--backend", default="numpyro", help="backend for part 2")
    parser.add_argument("--skip-budget", action="store_true")
    parser.add_argument("--skip-iteration", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = load_mnist("train")[:B]
    res = {}
    if not args.skip_iteration:
        res["pyro"] = compare(*pyro_pair(x, args.ngf), args.rounds)
        res["numpyro"] = compare(*numpyro_pair(x, args.ngf), args.rounds)
        print_iteration(res, args)
    if not args.skip_budget:
        res["budget"] = budget(args.budget, args.backend)
        print_budget(res["budget"], args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))


def print_iteration(res: dict, args) -> None:
    print(f"# One LEBM training iteration (batch {B}, MNIST generator ngf={args.ngf}, posterior 20 x 0.1, "
          f"prior 60 x 0.4; medians of {args.rounds} alternating rounds)\n")
    print("| backend | library (s) | hand-written (s) | library / hand |\n| --- | ---: | ---: | ---: |")
    for name, r in res.items():
        print(f"| {name} | {r['a_ms'] / 1e3:.3f} | {r['b_ms'] / 1e3:.3f} | {r['ratio']:.3f} |")


def print_budget(budget_res: dict, args) -> None:
    print(f"\n# LEBM vs Gaussian prior (ABP) at equal budget: {args.budget} steps each, {args.backend}\n")
    print("| prior | Fréchet distance (lower better) | test log-likelihood, nats (higher better) | "
          "recon. MSE | train+eval (s) |\n| --- | ---: | ---: | ---: | ---: |")
    for method, m in budget_res.items():
        fd = "n/a" if m["frechet_distance"] is None else f"{m['frechet_distance']:.2f}"
        print(f"| {method} | {fd} | {m['test_log_likelihood']:.1f} ± {m['test_log_likelihood_stderr']:.1f} | "
              f"{m['mse']:.4f} | {m['seconds']:.0f} |")
    diff = np.asarray(budget_res["lebm"]["per_datum"]) - np.asarray(budget_res["abp"]["per_datum"])
    print(f"\nPaired over the same {len(diff)} test images: LEBM - ABP = {diff.mean():.1f} ± "
          f"{diff.std(ddof=1) / np.sqrt(len(diff)):.1f} nats per image (mean ± its standard error); "
          f"LEBM higher on {np.mean(diff > 0):.0%} of them. (± in the table: standard error over images.)")


if __name__ == "__main__":
    main()
