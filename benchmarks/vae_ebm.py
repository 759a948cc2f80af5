"""VAE-EBM on binarised MNIST-5k: one model, many guides, test log-likelihood with error bars, on both backends.

Each backend trains, from the same initial weights and on the same minibatches (4,000 training digits of MNIST-5k,
binarised once with a fixed seed, batch 128, Adam at ``models.reference.VAE_EBM_CPU``'s learning rates):

- ``vae``: the plain VAE (standard Normal prior, :class:`AmortizedGuide`, the ELBO);
- ``snelbo``: the VAE-EBM, the same networks plus the 3 x 200 energy, with the prior's ``SelfNormalized``
  normalizer and the same :class:`AmortizedGuide` (the SNELBO, Senetaire et al.);
- ``refined``: the same model function with ``RefinedGuide(AmortizedGuide, steps, step_size)`` (Hoffman 2017):
  decoder and energy learn from the refined draws, the encoder from its own ELBO;
- ``short-run``: the same model function with ``ShortRunPosterior`` (LEBM's posterior chains from noise), the
  encoder unused (only with ``--short-run``).

Evaluation on the 1,000 test digits: the importance-weighted log-likelihood with the encoder as proposal
(``--is-samples`` per digit) and log Z from ``AnnealedImportance`` (``--log-z-chains`` chains x 100 temperatures),
mean and standard error (over the test digits, combined with log Z's). Because all runs share the test digits, the
differences between runs are reported as paired means with their own standard error.

Run: ``.venv/bin/python benchmarks/vae_ebm.py [--backend pyro|numpyro|both] [--iterations 3000] [--json out.json]``;
``--budgets 100 300 1000 3000`` instead gives NumPyro's SNELBO and RefinedGuide test log-likelihood after each
budget (one run per guide, continued with ``fit(..., resume=True)``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.data import load_mnist  # noqa: E402
from models.reference import VAE_EBM_CPU  # noqa: E402

LR = {"energy": VAE_EBM_CPU["lr_energy"], "": VAE_EBM_CPU["lr_other"]}


def make_guide(method: str, vae, backend, args):
    """The guide of ``method`` for ``vae`` from the ``inference.<backend>`` module ``backend``."""
    if method in ("vae", "snelbo"):
        return vae.guide()
    if method == "refined":
        if args.refine_sampler == "mala":
            return backend.RefinedGuide(vae.guide(), sampler=backend_sampler(backend, args))
        return backend.RefinedGuide(vae.guide(), args.refine_steps, args.refine_step_size)
    return backend.ShortRunPosterior(vae.model)


def backend_sampler(backend, args):
    """The refinement chain's MALA sampler (per-datum accept) from ``backend``'s ``tilted_priors`` twin (NumPyro's
    loop fully unrolled, as RefinedGuide's default ULA chain is)."""
    name = backend.__name__.rsplit(".", 1)[-1]
    mala = importlib.import_module(f"tilted_priors.{name}").MALA
    unroll = {"unroll": True} if name == "numpyro" else {}
    return mala(args.refine_steps, args.refine_step_size, **unroll)


def run_pyro(method: str, x_train, x_test, args) -> dict:
    import pyro
    import torch

    import inference.pyro as backend
    from models.pyro import vae_ebm

    torch.set_num_threads(args.threads)
    pyro.clear_param_store()
    vae = vae_ebm.build(prior="gaussian" if method == "vae" else "ebm")
    guide = make_guide(method, vae, backend, args)
    start = time.perf_counter()
    backend.fit(vae.model, guide, x_train, num_steps=args.iterations, batch_size=args.batch_size,
                lr=LR if vae.energy is not None else LR[""], betas=(0.9, 0.999), seed=args.seed, progress=False)
    seconds = time.perf_counter() - start
    out = vae_ebm.log_likelihood(vae, x_test, num_samples=args.is_samples, log_z_chains=args.log_z_chains,
                                 seed=args.seed)
    return {**out, "train_seconds": seconds}


def run_numpyro(method: str, x_train, x_test, args) -> dict:
    import jax.numpy as jnp

    import inference.numpyro as backend
    from inference.files import unflatten_state
    from models.numpyro import vae_ebm

    vae = vae_ebm.build(prior="gaussian" if method == "vae" else "ebm")
    guide = make_guide(method, vae, backend, args)
    start = time.perf_counter()
    result = backend.fit(vae.model, guide, x_train, num_steps=args.iterations, batch_size=args.batch_size,
                         lr=LR if vae.energy is not None else LR[""], betas=(0.9, 0.999), seed=args.seed, progress=False)
    seconds = time.perf_counter() - start
    nested = unflatten_state({k: jnp.asarray(v) for k, v in result.params.items()}, int_keys=True)
    vae = vae.with_params(nested)
    out = vae_ebm.log_likelihood(vae, x_test, num_samples=args.is_samples, log_z_chains=args.log_z_chains,
                                 seed=args.seed)
    return {**out, "train_seconds": seconds}


def budget_curve(x_train, x_test, args) -> dict:
    """NumPyro: the SNELBO and RefinedGuide VAE-EBMs evaluated after each budget in ``args.budgets`` (one training
    run per guide, continued by ``fit(..., resume=True)``); ``{(method, budget): per-datum test LL}``."""
    import tempfile

    import jax.numpy as jnp

    import inference.numpyro as backend
    from inference.files import unflatten_state
    from models.numpyro import vae_ebm

    curve = {}
    for method in ("snelbo", "refined"):
        vae = vae_ebm.build()
        guide = make_guide(method, vae, backend, args)
        with tempfile.TemporaryDirectory() as out:
            for budget in sorted(args.budgets):
                result = backend.fit(vae.model, guide, x_train, num_steps=budget, batch_size=args.batch_size,
                                     lr=LR, betas=(0.9, 0.999), seed=args.seed, progress=False, out=out, resume=True)
                params = unflatten_state({k: jnp.asarray(v) for k, v in result.params.items()}, int_keys=True)
                curve[(method, budget)] = vae_ebm.log_likelihood(
                    vae.with_params(params), x_test, num_samples=args.is_samples, log_z_chains=args.log_z_chains,
                    seed=args.seed)["per_datum"]
                print(f"{method:8s} {budget:6d} iterations: test LL {curve[(method, budget)].mean():.2f}", flush=True)
    return curve


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of b - a over the test digits and its standard error."""
    d = np.asarray(b) - np.asarray(a)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="both", choices=["pyro", "numpyro", "both"])
    parser.add_argument("--iterations", type=int, default=VAE_EBM_CPU["iterations"])
    parser.add_argument("--batch-size", type=int, default=VAE_EBM_CPU["batch_size"])
    parser.add_argument("--refine-steps", type=int, default=5)
    parser.add_argument("--refine-step-size", type=float, default=0.3)
    parser.add_argument("--refine-sampler", default="ula", choices=["ula", "mala"],
                        help="RefinedGuide's chain: ULA, or MALA with a per-datum accept step")
    parser.add_argument("--methods", nargs="*", choices=["vae", "snelbo", "refined", "short-run"],
                        help="train only these (default: vae snelbo refined [short-run])")
    parser.add_argument("--short-run", action="store_true", help="also train with ShortRunPosterior")
    parser.add_argument("--is-samples", type=int, default=1000)
    parser.add_argument("--log-z-chains", type=int, default=VAE_EBM_CPU["eval_log_z_samples"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=int, nargs="*",
                        help="instead: NumPyro's SNELBO and RefinedGuide test LL after each of these budgets")
    parser.add_argument("--json")
    args = parser.parse_args()

    x_train = load_mnist("train", binarize="stochastic")
    x_test = load_mnist("test", binarize="stochastic")
    if args.budgets:
        curve = budget_curve(x_train, x_test, args)
        print("\n| iterations | SNELBO, AmortizedGuide | RefinedGuide | RefinedGuide − AmortizedGuide (paired) |")
        print("| --- | --- | --- | --- |")
        for budget in sorted(args.budgets):
            a, b = curve[("snelbo", budget)], curve[("refined", budget)]
            mean, se = paired(a, b)
            print(f"| {budget} | {a.mean():.2f} | {b.mean():.2f} | {mean:+.2f} ± {se:.2f} |")
        return
    methods = args.methods or ["vae", "snelbo", "refined"] + (["short-run"] if args.short_run else [])
    backends = ["pyro", "numpyro"] if args.backend == "both" else [args.backend]
    runners = {"pyro": run_pyro, "numpyro": run_numpyro}
    results: dict = {}
    for backend in backends:
        for method in methods:
            res = runners[backend](method, x_train, x_test, args)
            results[(backend, method)] = res
            print(f"{backend:8s} {method:10s} test LL {res['mean']:9.2f} ± {res['stderr']:.2f}  "
                  f"log Z {res['log_z']:.3f} ± {res['log_z_stderr']:.3f}  train {res['train_seconds']:.0f} s",
                  flush=True)

    print(f"\nBinarised MNIST-5k, {args.iterations} iterations of batch {args.batch_size}; test log-likelihood (nats, "
          f"1,000 test digits, {args.is_samples} importance samples from the encoder, log Z by AIS with "
          f"{args.log_z_chains} chains x 100 temperatures); RefinedGuide: {args.refine_steps} whitened "
          f"{args.refine_sampler.upper()} steps of {args.refine_step_size}.\n")
    print("| backend | model / guide | test log-likelihood | log Z | train time (s) |")
    print("| --- | --- | --- | --- | --- |")
    labels = {"vae": "VAE, AmortizedGuide (ELBO)", "snelbo": "VAE-EBM, AmortizedGuide (SNELBO)",
              "refined": "VAE-EBM, RefinedGuide", "short-run": "VAE-EBM, ShortRunPosterior"}
    for (backend, method), res in results.items():
        print(f"| {backend} | {labels[method]} | {res['mean']:.2f} ± {res['stderr']:.2f} | "
              f"{res['log_z']:.3f} ± {res['log_z_stderr']:.3f} | {res['train_seconds']:.0f} |")
    print("\n| backend | comparison | paired difference (nats) |")
    print("| --- | --- | --- |")
    for backend in backends:
        for a, b in [("vae", "snelbo"), ("snelbo", "refined"), ("snelbo", "short-run")]:
            if (backend, a) not in results or (backend, b) not in results:
                continue
            mean, se = paired(results[(backend, a)]["per_datum"], results[(backend, b)]["per_datum"])
            print(f"| {backend} | {labels[b]} − {labels[a]} | {mean:+.2f} ± {se:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {f"{b}/{m}": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
             for (b, m), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
