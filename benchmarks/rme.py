"""RME (recursive mixture encoders, Kim and Pavlovic 2020) on binarised MNIST-5k: test log-likelihood with error bars.

All runs share the decoder's initial weights, the minibatches and the number of decoder updates, batch 128, Adam at
``--lr``:

- ``vae``: the single-encoder VAE (:class:`AmortizedGuide`, the ELBO);
- ``mixture``: the non-recursive mixture encoder with the same ``M`` (``RecursiveMixtureELBO(recursive=False)``: all
  components, the weights and the decoder on the mixture's ELBO from the start);
- ``rme``: RME grown stage by stage (``--first-steps`` updates for stage 1, which is the VAE, then ``--steps`` per
  new component; ``--warm-start`` starts each new component from the last one's weights); it is evaluated after
  each stage, which gives RME with ``M = 1..M``. By default the decoder trains in every stage on ELBO(Q_m) and the
  baselines get as many updates as RME in all; with ``--freeze-decoder`` the stages after the first train only the
  encoders and weights, and the baselines get stage 1's updates (so every decoder gets the same number);
- ``--barriers``: RME with other barriers ``C`` (the ablation).

Evaluation on the 1,000 test digits: importance sampling with the trained guide as proposal (``--is-samples`` per
digit; the mixture for ``mixture`` and ``rme``), mean and standard error; differences are paired over the digits.
For the mixtures, also the mean mixture weights on the test digits and the mean pairwise KL between components
(Monte Carlo, ``KL(q_j || q_k)`` averaged over the digits) to show that components did not collapse.

Run: ``.venv/bin/python benchmarks/rme.py [--backend pyro|numpyro] [--components 5] [--steps 600] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tilted_priors.models.data import load_mnist
from tilted_priors.models.reference import RME


def paired(a, b) -> tuple[float, float]:
    """Mean of b - a over the test digits and its standard error."""
    d = np.asarray(b) - np.asarray(a)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def pairwise_kl(locs: np.ndarray, scales: np.ndarray) -> float:
    """Mean over digits and ordered pairs j != k of the closed-form KL(q_j || q_k) between diagonal Normals;
    ``locs``, ``scales``: ``(N, M, d)``."""
    m = locs.shape[1]
    if m < 2:
        return float("nan")
    lj, lk = locs[:, :, None], locs[:, None]
    sj, sk = scales[:, :, None], scales[:, None]
    kl = (np.log(sk / sj) + (sj ** 2 + (lj - lk) ** 2) / (2 * sk ** 2) - 0.5).sum(-1)  # (N, M, M)
    return float(kl[:, ~np.eye(m, dtype=bool)].mean())


def summarize_mixture(out: dict, locs: np.ndarray, scales: np.ndarray, weights: np.ndarray) -> dict:
    """The log-likelihood result with the mean weights and the mean pairwise KL between components."""
    return {**out, "weights": weights.mean(0).tolist(), "pairwise_kl": pairwise_kl(locs, scales)}


class Runner:
    """What both backends' runners share: the three ways to train, through the backend's ``fit``."""

    def fit_vae(self, model, data, steps):
        return self.fit(model, data, steps, model.vae.guide())

    def fit_mixture(self, model, data, steps):
        return self.fit(model, data, steps, model.guide, self.backend.RecursiveMixtureELBO(recursive=False))

    def fit_stage(self, model, data, steps, freeze_model=False):
        """Train the guide's current stage (``num_active`` set by the caller); ``freeze_model``: the decoder at
        learning rate 0."""
        return self.fit(model, data, steps, model.guide, self.backend.RecursiveMixtureELBO(),
                        lr=frozen_model_lr(self.args) if freeze_model else None)


class PyroRunner(Runner):
    """Build, train and evaluate with Pyro (the param store holds the weights: the model is trained in place)."""

    def __init__(self, args):
        import pyro
        import torch

        import tilted_priors.inference.pyro as backend
        from tilted_priors.models.pyro import rme, vae_ebm
        torch.set_num_threads(args.threads)
        self.pyro, self.torch, self.backend, self.rme, self.vae_ebm, self.args = pyro, torch, backend, rme, vae_ebm, args

    def build(self, components: int, barrier: float):
        self.pyro.clear_param_store()
        return self.rme.build(components, barrier=barrier)

    def fit(self, model, data, steps, guide, loss=None, lr=None):
        """Train; returns the trained model."""
        self.backend.fit(model.model, guide, data, num_steps=steps, loss=loss, **fit_kwargs(self.args, lr))
        return model

    def warm_start(self, model, m: int):
        """Component ``m`` (1-based) starts from the weights component ``m - 1`` ended with."""
        with self.torch.no_grad():
            for new, old in zip(model.encoders[m - 1].parameters(), model.encoders[m - 2].parameters()):
                new.copy_(old)

    def evaluate(self, model, x, mixture: bool) -> dict:
        kwargs = dict(num_samples=self.args.is_samples, seed=self.args.seed)
        if not mixture:
            return self.vae_ebm.log_likelihood(model.vae, x, **kwargs)
        out = self.rme.log_likelihood(model, x, **kwargs)
        with self.torch.no_grad():
            xt = self.torch.as_tensor(x)
            pairs = [enc(xt) for enc in model.encoders[:model.guide.num_active]]
            weights = model.guide.log_weights(xt).exp().numpy()
        return summarize_mixture(out, np.stack([p[0].numpy() for p in pairs], 1),
                                 np.stack([p[1].numpy() for p in pairs], 1), weights)


class NumPyroRunner(Runner):
    """Build, train and evaluate with NumPyro: each stage starts from the parameters the previous one ended with,
    and the trained model is ``with_params`` of them."""

    def __init__(self, args):
        import jax

        import tilted_priors.inference.numpyro as backend
        from tilted_priors.models.numpyro import rme, vae_ebm
        self.jax, self.backend, self.rme, self.vae_ebm, self.args = jax, backend, rme, vae_ebm, args
        self.params: dict[int, dict] = {}  # id(trained model) -> its parameters (flat)

    def build(self, components: int, barrier: float):
        return self.rme.build(components, barrier=barrier, seed=self.args.seed)

    def fit(self, model, data, steps, guide, loss=None, lr=None):
        result = self.backend.fit(model.model, guide, data, num_steps=steps, loss=loss,
                                  init_params=self.params.get(id(model)), **fit_kwargs(self.args, lr))
        trained = model.with_params(result.params)
        self.params[id(trained)] = result.params
        return trained

    def warm_start(self, model, m: int):
        """Component ``m`` (1-based) starts from the weights component ``m - 1`` ended with."""
        params = self.params[id(model)]
        old, new = f"rme.component{m - 2}$params", f"rme.component{m - 1}$params"
        params.update({new + k[len(old):]: v for k, v in params.items() if k.startswith(old + "/")})

    def evaluate(self, model, x, mixture: bool) -> dict:
        kwargs = dict(num_samples=self.args.is_samples, seed=self.args.seed)
        if not mixture:
            return self.vae_ebm.log_likelihood(model.vae, x, **kwargs)
        out = self.rme.log_likelihood(model, x, **kwargs)
        pairs = [enc(x) for enc in model.encoders[:model.guide.num_active]]
        weights = np.exp(np.asarray(model.proposal(x).mixing_distribution.logits))
        return summarize_mixture(out, np.stack([np.asarray(p[0]) for p in pairs], 1),
                                 np.stack([np.asarray(p[1]) for p in pairs], 1), weights / weights.sum(-1, keepdims=True))


def fit_kwargs(args, lr=None) -> dict:
    return dict(batch_size=args.batch_size, lr=args.lr if lr is None else lr, betas=(0.9, 0.999), seed=args.seed,
                progress=False)


def frozen_model_lr(args) -> dict:
    """Learning rates by parameter-name prefix that keep the decoder (the model of the Gaussian prior) where it is."""
    return {"decoder": 0.0, "": args.lr}


RUNNERS = {"pyro": PyroRunner, "numpyro": NumPyroRunner}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="pyro", choices=sorted(RUNNERS))
    parser.add_argument("--components", type=int, default=RME["num_components"])
    parser.add_argument("--steps", type=int, default=RME["steps_per_component"], help="updates per component")
    parser.add_argument("--first-steps", type=int, help="updates of RME's first stage (the VAE); default --steps")
    parser.add_argument("--warm-start", action="store_true", help="start each new component from the previous one")
    parser.add_argument("--freeze-decoder", action="store_true",
                        help="RME's stages after the first train the encoders and weights only")
    parser.add_argument("--methods", nargs="*", default=["vae", "mixture", "rme"], choices=["vae", "mixture", "rme"])
    parser.add_argument("--batch-size", type=int, default=RME["batch_size"])
    parser.add_argument("--lr", type=float, default=RME["lr"])
    parser.add_argument("--barrier", type=float, default=RME["barrier"])
    parser.add_argument("--barriers", type=float, nargs="*", default=[], help="ablation: RME with these C too")
    parser.add_argument("--is-samples", type=int, default=RME["eval_importance_samples"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    x_train = load_mnist("train", binarize="stochastic")
    x_test = load_mnist("test", binarize="stochastic")
    runner = RUNNERS[args.backend](args)
    M = args.components
    steps = [args.steps if args.first_steps is None else args.first_steps] + [args.steps] * (M - 1)
    # every model's decoder gets the same number of updates: all of them, or stage 1's when RME's later stages
    # train only its encoders and weights
    total = steps[0] if args.freeze_decoder else sum(steps)
    results: dict[str, dict] = {}

    def record(label, model, mixture, seconds):
        res = runner.evaluate(model, x_test, mixture)
        results[label] = {**res, "train_seconds": seconds}
        extra = (f"  weights {np.round(res['weights'], 2).tolist()}  pairwise KL {res['pairwise_kl']:.1f}"
                 if mixture else "")
        print(f"{label:22s} test LL {res['mean']:8.2f} ± {res['stderr']:.2f}  train {seconds:5.0f} s{extra}",
              flush=True)

    if "vae" in args.methods:
        start = time.perf_counter()
        vae = runner.fit_vae(runner.build(1, args.barrier), x_train, total)
        record("VAE", vae, False, time.perf_counter() - start)

    if "mixture" in args.methods:
        start = time.perf_counter()
        mix = runner.fit_mixture(runner.build(M, args.barrier), x_train, total)
        record(f"mixture, M = {M}", mix, True, time.perf_counter() - start)

    for barrier in ([args.barrier] + [c for c in args.barriers if c != args.barrier]) * ("rme" in args.methods):
        model = runner.build(M, barrier)
        seconds = 0.0
        for m in range(1, M + 1):
            model.guide.num_active = m
            if args.warm_start and m > 1:
                runner.warm_start(model, m)
            start = time.perf_counter()
            model = runner.fit_stage(model, x_train, steps[m - 1], args.freeze_decoder and m > 1)
            seconds += time.perf_counter() - start
            if barrier == args.barrier or m == M:
                record(f"RME, M = {m}, C = {barrier:g}", model, True, seconds)

    print(f"\nBinarised MNIST-5k, {args.backend}; {total} updates of batch {args.batch_size} for the VAE and the "
          f"mixture (RME: {steps} per stage{', each new component started from the last' if args.warm_start else ''}"
          f"{', decoder frozen after stage 1' if args.freeze_decoder else ''}); "
          f"test log-likelihood (nats, 1,000 test digits, {args.is_samples} "
          "importance samples from the trained guide).\n")
    print("| model | test log-likelihood | − VAE (paired) | mean weights | pairwise KL | train (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = results["VAE"]["per_datum"] if "VAE" in results else None
    for label, res in results.items():
        diff = "" if base is None or label == "VAE" else "{:+.2f} ± {:.2f}".format(*paired(base, res["per_datum"]))
        weights = " ".join(f"{w:.2f}" for w in res.get("weights", []))
        kl = "" if "pairwise_kl" not in res or np.isnan(res["pairwise_kl"]) else f"{res['pairwise_kl']:.1f}"
        print(f"| {label} | {res['mean']:.2f} ± {res['stderr']:.2f} | {diff} | {weights} | {kl} | "
              f"{res['train_seconds']:.0f} |")
    best, mixture = f"RME, M = {M}, C = {args.barrier:g}", f"mixture, M = {M}"
    if best in results and mixture in results:
        mean, se = paired(results[mixture]["per_datum"], results[best]["per_datum"])
        print(f"\nRME (M = {M}) − non-recursive mixture (M = {M}), paired: {mean:+.2f} ± {se:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: {n: (v.tolist() if isinstance(v, np.ndarray) else v) for n, v in r.items()}
             for k, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
