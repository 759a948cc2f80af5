"""Post-hoc tilting of a trained VAE's prior on binarised MNIST-5k (the "post-hoc" experiment of SNL; NCP-VAE).

1. **VAE.** The shipped VAE of ``tilted_priors.models.<backend>.vae_ebm`` with its standard Normal prior
   (``build(prior="gaussian")``: 16 latents, MLP encoder and decoder 512-256) is trained with the ELBO on MNIST-5k's
   4,000 training digits, each binarised ``--binarizations`` times by independent Bernoulli draws, for
   ``--iterations`` updates (batch 128, Adam 1e-3). Then it is frozen.
2. **Post-hoc tilt.** For each objective (``nce``, ``snl``), ``posthoc_tilt`` draws one latent per training image
   from the frozen encoder (the aggregate posterior) and fits an energy ``EnergyMLP(16, 200, 3)`` so that
   ``exp(-E(z)) N(z; 0, I) / Z`` matches it (``--energy-steps`` Adam steps of 3e-4, batch 256; NCE against the
   prior with 10 noise draws per datum, or SNL with 256 prior draws per step). ``log Z`` of the tilt by AIS
   (``--log-z-chains`` chains x 100 temperatures).
3. **Test.** The 1,000 test digits (binarised once): importance-weighted log-likelihood per digit with the encoder
   as proposal (``--is-samples`` draws) and the tilt's ``log Z`` from step 2, before (the VAE) and after (the tilted
   VAE). Pyro: the library's ``log_likelihood(model, x_i, proposal=guide, log_z={"z": ...})``, one call per digit.
   NumPyro: ``vae_ebm.log_likelihood`` on the tilted ``VAEModel`` (the same estimator, batched: NumPyro's
   ``log_likelihood`` compiles once per call, too slow for a call per digit). Means ± standard errors over the
   digits (with log Z's added in quadrature); differences are paired over the same digits.

Run: ``.venv/bin/python benchmarks/posthoc.py [--backend pyro|numpyro] [--quick] [--json out.json]``. ``--quick``
(300 updates, 300 energy steps, 200 test digits, 200 importance samples) checks that everything runs in about a
minute.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from tilted_priors.models.data import load_mnist


def load_data(args) -> tuple[np.ndarray, np.ndarray]:
    """Training images (the 4,000 training digits binarised ``args.binarizations`` times) and test digits."""
    grey = load_mnist("train", scale="unit")
    rng = np.random.default_rng([args.seed, 1])
    x_train = np.concatenate([(rng.random(grey.shape) < grey).astype(np.float32) for _ in range(args.binarizations)])
    x_test = load_mnist("test", binarize="stochastic")[:args.test_digits]
    return x_train, x_test


def summary(per_datum: np.ndarray) -> tuple[float, float]:
    return float(per_datum.mean()), float(per_datum.std(ddof=1) / math.sqrt(per_datum.size))


def run_pyro(x_train, x_test, args) -> dict:
    import pyro
    import torch

    from tilted_priors.inference.pyro import fit, log_likelihood, posthoc_tilt
    from tilted_priors.models.pyro import vae_ebm
    from tilted_priors.pyro import AnnealedImportance, EnergyMLP

    torch.set_num_threads(args.threads)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = vae_ebm.build(prior="gaussian", seed=args.seed)
    guide = vae.guide()
    start = time.perf_counter()
    fit(vae.model, guide, x_train, num_steps=args.iterations, batch_size=128, lr=1e-3, betas=(0.9, 0.999),
        seed=args.seed, progress=False)
    out = {"train_seconds": time.perf_counter() - start}
    print(f"pyro: VAE trained ({args.iterations} updates, {out['train_seconds']:.0f} s)", flush=True)

    def per_digit(model, log_z=None) -> np.ndarray:
        pyro.set_rng_seed(args.seed + 1)
        kwargs = {} if log_z is None else {"log_z": log_z}
        return np.array([log_likelihood(model, torch.as_tensor(x_test[i:i + 1]), proposal=guide,
                                        num_samples=args.is_samples, **kwargs).log_likelihood
                         for i in range(len(x_test))])

    start = time.perf_counter()
    out["vae"] = {"per_datum": per_digit(vae.model)}
    out["vae"]["eval_seconds"] = time.perf_counter() - start
    for objective in args.objectives:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        result = posthoc_tilt(vae.model, guide, x_train, EnergyMLP(16, 200, 3), objective=objective,
                              num_steps=args.energy_steps, lr=3e-4, batch_size=256, seed=args.seed,
                              log_z=AnnealedImportance(args.log_z_chains, 100))
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        per_datum = per_digit(result.model, {"z": result.log_z})
        out[objective] = {"per_datum": per_datum, "fit_seconds": seconds, "eval_seconds": time.perf_counter() - start,
                          "log_z": float(result.log_z.log_z), "log_z_stderr": float(result.log_z.stderr),
                          "learned_log_z": result.learned_log_z}
        print(f"pyro: {objective} tilt fitted ({seconds:.0f} s), test LL {per_datum.mean():.2f}", flush=True)
    return out


def run_numpyro(x_train, x_test, args) -> dict:
    import jax.numpy as jnp

    from tilted_priors.inference.files import unflatten_state
    from tilted_priors.inference.numpyro import fit, posthoc_tilt
    from tilted_priors.models.numpyro import vae_ebm
    from tilted_priors.numpyro import AnnealedImportance, EnergyMLP

    vae = vae_ebm.build(prior="gaussian", seed=args.seed)
    start = time.perf_counter()
    trained = fit(vae.model, vae.guide(), x_train, num_steps=args.iterations, batch_size=128, lr=1e-3,
                  betas=(0.9, 0.999), seed=args.seed, progress=False)
    out = {"train_seconds": time.perf_counter() - start}
    print(f"numpyro: VAE trained ({args.iterations} updates, {out['train_seconds']:.0f} s)", flush=True)
    frozen = vae.with_params(unflatten_state({k: jnp.asarray(v) for k, v in trained.params.items()}, int_keys=True))

    def per_digit(model_vae) -> dict:
        return vae_ebm.log_likelihood(model_vae, x_test, num_samples=args.is_samples, seed=args.seed + 1,
                                      log_z_chains=args.log_z_chains)

    start = time.perf_counter()
    out["vae"] = {"per_datum": per_digit(frozen)["per_datum"]}
    out["vae"]["eval_seconds"] = time.perf_counter() - start
    for objective in args.objectives:
        start = time.perf_counter()
        result = posthoc_tilt(trained.model, trained.guide, x_train, EnergyMLP(16, 200, 3), objective=objective,
                              num_steps=args.energy_steps, lr=3e-4, batch_size=256, seed=args.seed,
                              log_z=AnnealedImportance(args.log_z_chains, 100))
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        # the tilted VAE as a VAEModel with the post-hoc energy: vae_ebm.log_likelihood estimates its own log Z by AIS
        evaluated = per_digit(dataclasses.replace(frozen, prior_kind="ebm", energy=result.energy))
        per_datum = evaluated["per_datum"]
        out[objective] = {"per_datum": per_datum, "fit_seconds": seconds, "eval_seconds": time.perf_counter() - start,
                          "log_z": evaluated["log_z"], "log_z_stderr": evaluated["log_z_stderr"],
                          "learned_log_z": result.learned_log_z, "posthoc_log_z": float(result.log_z.log_z)}
        print(f"numpyro: {objective} tilt fitted ({seconds:.0f} s), test LL {per_datum.mean():.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="pyro", choices=["pyro", "numpyro"])
    parser.add_argument("--quick", action="store_true", help="a short run that checks everything works")
    parser.add_argument("--iterations", type=int, default=3000, help="VAE updates")
    parser.add_argument("--binarizations", type=int, default=10)
    parser.add_argument("--energy-steps", type=int, default=3000)
    parser.add_argument("--objectives", nargs="*", default=["nce", "snl"], choices=["nce", "snl"])
    parser.add_argument("--test-digits", type=int, default=1000)
    parser.add_argument("--is-samples", type=int, default=1000)
    parser.add_argument("--log-z-chains", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.energy_steps, args.test_digits = 300, 300, 200
        args.is_samples, args.log_z_chains = 200, 500
    start = time.perf_counter()
    x_train, x_test = load_data(args)
    res = (run_pyro if args.backend == "pyro" else run_numpyro)(x_train, x_test, args)
    total = time.perf_counter() - start

    print(f"\nBinarised MNIST-5k, {args.backend}: VAE (Gaussian prior) trained {args.iterations} updates on "
          f"{x_train.shape[0]} images ({args.binarizations} binarisations of 4,000 digits); post-hoc energy "
          f"EnergyMLP(16, 200, 3), {args.energy_steps} steps; test log-likelihood on {len(x_test)} test digits "
          f"({args.is_samples} importance samples from the encoder, log Z by AIS with {args.log_z_chains} chains x 100 "
          f"temperatures); seed {args.seed}; {total:.0f} s in all.\n")
    print("| prior | test log-likelihood | paired gain over the VAE | log Z (AIS) | learned log Z | fit (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    mean, se = summary(res["vae"]["per_datum"])
    print(f"| N(0, I) (the VAE) | {mean:.2f} ± {se:.2f} | | | | {res['train_seconds']:.0f} |")
    labels = {"nce": "tilted post hoc, NCE", "snl": "tilted post hoc, SNL"}
    for objective in args.objectives:
        r = res[objective]
        mean, se = summary(r["per_datum"])
        gain, gain_se = summary(r["per_datum"] - res["vae"]["per_datum"])
        # log Z's error is shared by every digit: added in quadrature to both
        se, gain_se = math.hypot(se, r["log_z_stderr"]), math.hypot(gain_se, r["log_z_stderr"])
        print(f"| {labels[objective]} | {mean:.2f} ± {se:.2f} | **{gain:+.2f} ± {gain_se:.2f}** | "
              f"{r['log_z']:.3f} ± {r['log_z_stderr']:.3f} | {r['learned_log_z']:.3f} | {r['fit_seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "seconds": total,
             "results": {k: ({kk: (vv.tolist() if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()}
                             if isinstance(v, dict) else v) for k, v in res.items()}}, indent=1))


if __name__ == "__main__":
    main()
