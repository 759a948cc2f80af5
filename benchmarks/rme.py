"""RME (recursive mixture encoders, Kim and Pavlovic 2020) on binarised MNIST-5k: test log-likelihood with error bars.

All runs share the decoder's initial weights, the minibatches and the total number of updates
(``--steps`` per component x ``--components``), batch 128, Adam at ``--lr``:

- ``vae``: the single-encoder VAE (:class:`AmortizedGuide`, the ELBO);
- ``mixture``: the non-recursive mixture encoder with the same ``M`` (``RecursiveMixtureELBO(recursive=False)``: all
  components, the weights and the decoder on the mixture's ELBO from the start);
- ``rme``: RME grown by ``fit_recursive``; it is evaluated after each stage, which gives RME with ``M = 1..M``;
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
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.data import load_mnist  # noqa: E402
from models.reference import RME  # noqa: E402


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


class PyroRunner:
    """Build, train and evaluate with Pyro (the param store holds the weights: the model is trained in place)."""

    def __init__(self, args):
        import pyro
        import torch

        import inference.pyro as backend
        from models.pyro import rme, vae_ebm
        torch.set_num_threads(args.threads)
        self.pyro, self.torch, self.backend, self.rme, self.vae_ebm, self.args = pyro, torch, backend, rme, vae_ebm, args

    def build(self, components: int, barrier: float):
        self.pyro.clear_param_store()
        return self.rme.build(components, barrier=barrier)

    def fit(self, model, data, steps, guide, loss=None):
        """Train; returns the trained model."""
        self.backend.fit(model.model, guide, data, num_steps=steps, loss=loss, **fit_kwargs(self.args))
        return model

    def fit_vae(self, model, data, steps):
        return self.fit(model, data, steps, model.vae.guide())

    def fit_mixture(self, model, data, steps):
        return self.fit(model, data, steps, model.guide, self.backend.RecursiveMixtureELBO(recursive=False))

    def fit_stage(self, model, data, steps):
        """Train the guide's current stage (``num_active`` set by the caller)."""
        return self.fit(model, data, steps, model.guide, self.backend.RecursiveMixtureELBO())

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


class NumPyroRunner:
    """Build, train and evaluate with NumPyro: each stage starts from the parameters the previous one ended with,
    and the trained model is ``with_params`` of them."""

    def __init__(self, args):
        import jax

        import inference.numpyro as backend
        from models.numpyro import rme, vae_ebm
        self.jax, self.backend, self.rme, self.vae_ebm, self.args = jax, backend, rme, vae_ebm, args
        self.params: dict[int, dict] = {}  # id(trained model) -> its parameters (flat)

    def build(self, components: int, barrier: float):
        return self.rme.build(components, barrier=barrier, seed=self.args.seed)

    def fit(self, model, data, steps, guide, loss=None):
        result = self.backend.fit(model.model, guide, data, num_steps=steps, loss=loss,
                                  init_params=self.params.get(id(model)), **fit_kwargs(self.args))
        trained = model.with_params(result.params)
        self.params[id(trained)] = result.params
        return trained

    def fit_vae(self, model, data, steps):
        return self.fit(model, data, steps, model.vae.guide())

    def fit_mixture(self, model, data, steps):
        return self.fit(model, data, steps, model.guide, self.backend.RecursiveMixtureELBO(recursive=False))

    def fit_stage(self, model, data, steps):
        """Train the guide's current stage (``num_active`` set by the caller)."""
        return self.fit(model, data, steps, model.guide, self.backend.RecursiveMixtureELBO())

    def evaluate(self, model, x, mixture: bool) -> dict:
        kwargs = dict(num_samples=self.args.is_samples, seed=self.args.seed)
        if not mixture:
            return self.vae_ebm.log_likelihood(model.vae, x, **kwargs)
        out = self.rme.log_likelihood(model, x, **kwargs)
        pairs = [enc(x) for enc in model.encoders[:model.guide.num_active]]
        weights = np.exp(np.asarray(model.proposal(x).mixing_distribution.logits))
        return summarize_mixture(out, np.stack([np.asarray(p[0]) for p in pairs], 1),
                                 np.stack([np.asarray(p[1]) for p in pairs], 1), weights / weights.sum(-1, keepdims=True))


def fit_kwargs(args) -> dict:
    return dict(batch_size=args.batch_size, lr=args.lr, betas=(0.9, 0.999), seed=args.seed, progress=False)


RUNNERS = {"pyro": PyroRunner, "numpyro": NumPyroRunner}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="pyro", choices=sorted(RUNNERS))
    parser.add_argument("--components", type=int, default=RME["num_components"])
    parser.add_argument("--steps", type=int, default=RME["steps_per_component"], help="updates per component")
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
    M, total = args.components, args.components * args.steps
    results: dict[str, dict] = {}

    def record(label, model, mixture, seconds):
        res = runner.evaluate(model, x_test, mixture)
        results[label] = {**res, "train_seconds": seconds}
        extra = (f"  weights {np.round(res['weights'], 2).tolist()}  pairwise KL {res['pairwise_kl']:.1f}"
                 if mixture else "")
        print(f"{label:22s} test LL {res['mean']:8.2f} ± {res['stderr']:.2f}  train {seconds:5.0f} s{extra}",
              flush=True)

    start = time.perf_counter()
    vae = runner.build(1, args.barrier)
    vae = runner.fit_vae(vae, x_train, total)
    record("VAE", vae, False, time.perf_counter() - start)

    start = time.perf_counter()
    mix = runner.build(M, args.barrier)
    mix = runner.fit_mixture(mix, x_train, total)
    record(f"mixture, M = {M}", mix, True, time.perf_counter() - start)

    for barrier in [args.barrier] + [c for c in args.barriers if c != args.barrier]:
        model = runner.build(M, barrier)
        seconds = 0.0
        for m in range(1, M + 1):
            model.guide.num_active = m
            start = time.perf_counter()
            model = runner.fit_stage(model, x_train, args.steps)
            seconds += time.perf_counter() - start
            if barrier == args.barrier or m == M:
                record(f"RME, M = {m}, C = {barrier:g}", model, True, seconds)

    print(f"\nBinarised MNIST-5k, {args.backend}; {total} updates of batch {args.batch_size} for every model "
          f"(RME: {args.steps} per component); test log-likelihood (nats, 1,000 test digits, {args.is_samples} "
          "importance samples from the trained guide).\n")
    print("| model | test log-likelihood | − VAE (paired) | mean weights | pairwise KL | train (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = results["VAE"]["per_datum"]
    for label, res in results.items():
        diff = "" if label == "VAE" else "{:+.2f} ± {:.2f}".format(*paired(base, res["per_datum"]))
        weights = " ".join(f"{w:.2f}" for w in res.get("weights", []))
        kl = "" if "pairwise_kl" not in res or np.isnan(res["pairwise_kl"]) else f"{res['pairwise_kl']:.1f}"
        print(f"| {label} | {res['mean']:.2f} ± {res['stderr']:.2f} | {diff} | {weights} | {kl} | "
              f"{res['train_seconds']:.0f} |")
    best = f"RME, M = {M}, C = {args.barrier:g}"
    mean, se = paired(results[f"mixture, M = {M}"]["per_datum"], results[best]["per_datum"])
    print(f"\nRME (M = {M}) − non-recursive mixture (M = {M}), paired: {mean:+.2f} ± {se:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: {n: (v.tolist() if isinstance(v, np.ndarray) else v) for n, v in r.items()}
             for k, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
