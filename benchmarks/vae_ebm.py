"""VAE-EBM on binarised MNIST-5k: one model, many guides, test log-likelihood with error bars, on both backends.

Each backend trains, from the same initial weights and on the same minibatches, batch 128, Adam at
``tilted_priors.models.reference.VAE_EBM_CPU``'s learning rates. The protocol (defaults): the last 500 of MNIST-5k's 4,000
training digits are a validation split; the other 3,500 are binarised 10 times by independent Bernoulli draws
(``--binarizations``; a fixed-draw stand-in for the dynamic binarisation of the VAE literature), which are the
training images; every 500 updates up to 6,000 the run's log-likelihood on the validation digits is measured, and
the best checkpoint is the one tested (early stopping, the same rule for every method). ``--valid 0
--binarizations 1 --iterations 3000`` is the earlier protocol: all 4,000 digits binarised once, the final state
tested. The runs:

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

Run: ``.venv/bin/python benchmarks/vae_ebm.py [--backend pyro|numpyro|both] [--json out.json]``;
``--budgets 100 300 1000 3000`` (with ``--valid 0 --binarizations 1``) instead gives NumPyro's SNELBO and RefinedGuide test log-likelihood after each
budget (one run per guide, continued with ``fit(..., resume=True)``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tilted_priors.models.data import load_mnist
from tilted_priors.models.reference import VAE_EBM_CPU

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


class PyroRunner:
    """One Pyro training run of ``method``: ``train(budget, out)`` continues it to ``budget`` updates in the checkpoint
    directory ``out`` (``fit(..., resume=True)``), ``evaluate(x, ...)`` gives ``vae_ebm.log_likelihood``."""

    def __init__(self, method: str, x_fit: np.ndarray, args):
        import pyro
        import torch

        import tilted_priors.inference.pyro as backend
        from tilted_priors.models.pyro import vae_ebm

        torch.set_num_threads(args.threads)
        pyro.clear_param_store()
        self.fit, self.module, self.x, self.args = backend.fit, vae_ebm, x_fit, args
        self.vae = vae_ebm.build(prior="gaussian" if method == "vae" else "ebm")
        self.guide = make_guide(method, self.vae, backend, args)

    def train(self, budget: int, out) -> None:
        self._result = self.fit(self.vae.model, self.guide, self.x, num_steps=budget, batch_size=self.args.batch_size,
                                lr=LR if self.vae.energy is not None else LR[""], betas=(0.9, 0.999),
                                seed=self.args.seed, progress=False, out=out, resume=True)

    def trained(self):
        return self.vae  # Pyro's fit trains (and on resume restores) the modules in place

    def evaluate(self, x, num_samples: int, log_z_chains: int) -> dict:
        return self.module.log_likelihood(self.trained(), x, num_samples=num_samples, log_z_chains=log_z_chains,
                                          seed=self.args.seed)


class NumPyroRunner(PyroRunner):
    """The NumPyro twin of :class:`PyroRunner` (the trained weights come back in ``FitResult.params``)."""

    def __init__(self, method: str, x_fit: np.ndarray, args):
        import tilted_priors.inference.numpyro as backend
        from tilted_priors.models.numpyro import vae_ebm

        self.fit, self.module, self.x, self.args = backend.fit, vae_ebm, x_fit, args
        self.vae = vae_ebm.build(prior="gaussian" if method == "vae" else "ebm")
        self.guide = make_guide(method, self.vae, backend, args)

    def trained(self):
        import jax.numpy as jnp

        from tilted_priors.inference.files import unflatten_state

        params = {k: jnp.asarray(v) for k, v in self._result.params.items()}
        return self.vae.with_params(unflatten_state(params, int_keys=True))


RUNNERS = {"pyro": PyroRunner, "numpyro": NumPyroRunner}


def run(backend: str, method: str, data: dict, args) -> dict:
    """Train ``method`` on ``backend`` and evaluate it on the test digits.

    With a validation split (``args.valid``), the run is evaluated on it every ``args.select_every`` updates up to
    ``args.iterations``, and the checkpoint with the best validation log-likelihood is the one tested (early
    stopping; the same rule for every method). Without one, the run's final state after ``args.iterations``."""
    runner = RUNNERS[backend](method, data["fit"], args)
    with tempfile.TemporaryDirectory() as tmp:
        last, best = Path(tmp, "last"), Path(tmp, "best")
        budgets = [args.iterations]
        if args.valid:
            budgets = list(range(args.select_every, args.iterations, args.select_every)) + [args.iterations]
        seconds, curve, best_ll, best_step = 0.0, [], -np.inf, args.iterations
        for budget in budgets:
            start = time.perf_counter()
            runner.train(budget, last)
            seconds += time.perf_counter() - start
            if args.valid:
                ll = runner.evaluate(data["valid"], args.valid_is_samples, args.valid_log_z_chains)["mean"]
                curve.append((budget, ll))
                print(f"{backend:8s} {method:10s} {budget:6d} updates: validation LL {ll:.2f}", flush=True)
                if ll > best_ll:
                    best_ll, best_step = ll, budget
                    shutil.copytree(last, best, dirs_exist_ok=True)
        if args.valid:
            runner.train(best_step, best)  # resumes at the best checkpoint: no update, its parameters back
        out = runner.evaluate(data["test"], args.is_samples, args.log_z_chains)
    return {**out, "train_seconds": seconds, "selected_step": best_step, "valid_curve": curve}


def budget_curve(data: dict, args) -> dict:
    """NumPyro: the SNELBO and RefinedGuide VAE-EBMs evaluated on the test digits after each budget in
    ``args.budgets`` (one training run per guide, continued by ``fit(..., resume=True)``);
    ``{(method, budget): per-datum test LL}``."""
    curve = {}
    for method in ("snelbo", "refined"):
        runner = NumPyroRunner(method, data["fit"], args)
        with tempfile.TemporaryDirectory() as out:
            for budget in sorted(args.budgets):
                runner.train(budget, out)
                curve[(method, budget)] = runner.evaluate(data["test"], args.is_samples, args.log_z_chains)["per_datum"]
                print(f"{method:8s} {budget:6d} iterations: test LL {curve[(method, budget)].mean():.2f}", flush=True)
    return curve


def load_data(args) -> dict:
    """Binarised MNIST-5k: ``fit`` (the training digits less the last ``args.valid``, each binarised
    ``args.binarizations`` times by independent Bernoulli draws), ``valid`` and ``test`` (binarised once)."""
    x_train = load_mnist("train", binarize="stochastic")
    if not 0 <= args.valid < x_train.shape[0]:
        raise SystemExit(f"--valid must leave some training digits: 0 <= valid < {x_train.shape[0]}")
    if args.binarizations < 1 or args.select_every < 1:
        raise SystemExit("--binarizations and --select-every must be at least 1")
    n_fit = x_train.shape[0] - args.valid
    x_fit = x_train[:n_fit]
    if args.binarizations > 1:
        grey = load_mnist("train", scale="unit")[:n_fit]
        rng = np.random.default_rng([args.seed, 1])
        x_fit = np.concatenate([(rng.random(grey.shape) < grey).astype(np.float32)
                                for _ in range(args.binarizations)])
    return {"fit": x_fit, "valid": x_train[n_fit:], "test": load_mnist("test", binarize="stochastic")}


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of b - a over the test digits and its standard error."""
    d = np.asarray(b) - np.asarray(a)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="both", choices=["pyro", "numpyro", "both"])
    parser.add_argument("--iterations", type=int, default=6000,
                        help="updates (with --valid: the most, the checkpoint being chosen on the validation digits)")
    parser.add_argument("--valid", type=int, default=500,
                        help="training digits held out for early stopping (0: no selection, test the last state)")
    parser.add_argument("--select-every", type=int, default=500, help="updates between validation evaluations")
    parser.add_argument("--binarizations", type=int, default=10,
                        help="independent Bernoulli binarisations of each training digit (1: the fixed one)")
    parser.add_argument("--valid-is-samples", type=int, default=100)
    parser.add_argument("--valid-log-z-chains", type=int, default=2000)
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

    data = load_data(args)
    if args.budgets:
        curve = budget_curve(data, args)
        print("\n| iterations | SNELBO, AmortizedGuide | RefinedGuide | RefinedGuide − AmortizedGuide (paired) |")
        print("| --- | --- | --- | --- |")
        for budget in sorted(args.budgets):
            a, b = curve[("snelbo", budget)], curve[("refined", budget)]
            mean, se = paired(a, b)
            print(f"| {budget} | {a.mean():.2f} | {b.mean():.2f} | {mean:+.2f} ± {se:.2f} |")
        return
    methods = args.methods or ["vae", "snelbo", "refined"] + (["short-run"] if args.short_run else [])
    backends = ["pyro", "numpyro"] if args.backend == "both" else [args.backend]
    results: dict = {}
    for backend in backends:
        for method in methods:
            res = run(backend, method, data, args)
            results[(backend, method)] = res
            print(f"{backend:8s} {method:10s} test LL {res['mean']:9.2f} ± {res['stderr']:.2f}  "
                  f"log Z {res['log_z']:.3f} ± {res['log_z_stderr']:.3f}  train {res['train_seconds']:.0f} s  "
                  f"(step {res['selected_step']})",
                  flush=True)

    selection = (f"the checkpoint (every {args.select_every}, up to {args.iterations} updates) with the best "
                 f"validation LL on {args.valid} held-out training digits ({args.valid_is_samples} importance "
                 f"samples, {args.valid_log_z_chains} AIS chains)" if args.valid else f"{args.iterations} updates")
    print(f"\nBinarised MNIST-5k, {data['fit'].shape[0]} training images ({args.binarizations} binarisation(s) of "
          f"{data['fit'].shape[0] // args.binarizations} digits), batch {args.batch_size}, {selection}; test "
          f"log-likelihood (nats, 1,000 test digits, {args.is_samples} importance samples from the encoder, log Z by AIS with "
          f"{args.log_z_chains} chains x 100 temperatures); RefinedGuide: {args.refine_steps} whitened "
          f"{args.refine_sampler.upper()} steps of {args.refine_step_size}.\n")
    print("| backend | model / guide | updates | test log-likelihood | log Z | train time (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    labels = {"vae": "VAE, AmortizedGuide (ELBO)", "snelbo": "VAE-EBM, AmortizedGuide (SNELBO)",
              "refined": "VAE-EBM, RefinedGuide", "short-run": "VAE-EBM, ShortRunPosterior"}
    for (backend, method), res in results.items():
        print(f"| {backend} | {labels[method]} | {res['selected_step']} | {res['mean']:.2f} ± {res['stderr']:.2f} | "
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
