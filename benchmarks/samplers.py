"""Speed of the prior chains: library vs a hand-written loop of the same algorithm, Pyro vs NumPyro.

Short-run Langevin (ULA) on a 16-d ``EnergyMLP`` prior (200 wide, 2 hidden layers, GELU), batch 64, 100 steps,
started from the base N(0, I). Each side of a comparison is timed alternately in the same process and the report
gives the median of per-round ratios (the machine has 2 cores; torch runs with one thread, which is stable).
Then the cost of the library's chain as batch, steps, latent size and network width change.

Run: ``.venv/bin/python benchmarks/samplers.py [--rounds 30] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax
import jax.numpy as jnp
import torch

import tilted_priors.numpyro as tn
import tilted_priors.pyro as tt
from timing import compare

STEP = 0.4


# --- Pyro ------------------------------------------------------------------------------------------------
def pyro_pair(dim=16, batch=64, steps=100, hidden=200):
    torch.manual_seed(0)
    energy = tt.EnergyMLP(dim, hidden)
    prior = tt.EnergyTiltedNormal(energy, torch.zeros(dim), torch.ones(dim),
                                  sampler=tt.ShortRunLangevin(steps, STEP))

    def library():
        return prior.sample((batch,))

    def hand():
        z = torch.randn(batch, dim)
        for _ in range(steps):
            z = z.detach().requires_grad_(True)
            lp = -energy(z) - 0.5 * (z * z).sum(-1)
            (g,) = torch.autograd.grad(lp.sum(), z)
            z = z + 0.5 * STEP * STEP * g + STEP * torch.randn_like(z)
        return z.detach()

    return library, hand


# --- NumPyro ---------------------------------------------------------------------------------------------
def numpyro_pair(dim=16, batch=64, steps=100, hidden=200):
    energy = tn.EnergyMLP(dim, hidden, rngs=0)
    prior = tn.EnergyTiltedNormal(energy, jnp.zeros(dim), jnp.ones(dim), sampler=tn.ShortRunLangevin(steps, STEP))
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 100000))

    def library():
        return prior.sample(next(keys), (batch,)).block_until_ready()

    @jax.jit
    def _hand(energy, key):
        k0, k1 = jax.random.split(key)
        grad = jax.grad(lambda z: (-energy(z) - 0.5 * (z * z).sum(-1)).sum())

        def step(z, k):
            return z + 0.5 * STEP * STEP * grad(z) + STEP * jax.random.normal(k, z.shape), None

        z, _ = jax.lax.scan(step, jax.random.normal(k0, (batch, dim)), jax.random.split(k1, steps))
        return z

    def hand():
        return _hand(energy, next(keys)).block_until_ready()

    return library, hand


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    args = parser.parse_args()
    torch.set_num_threads(1)

    pyro_lib, pyro_hand = pyro_pair()
    jax_lib, jax_hand = numpyro_pair()
    res = {
        "pyro_library_vs_hand": compare(pyro_lib, pyro_hand, args.rounds),
        "numpyro_library_vs_hand": compare(jax_lib, jax_hand, args.rounds),
        "pyro_vs_numpyro_library": compare(pyro_lib, jax_lib, args.rounds),
    }
    print(f"# Short-run Langevin prior chain: 16-d EnergyMLP, batch 64, 100 steps "
          f"(torch {torch.__version__}, jax {jax.__version__}, medians of {args.rounds} alternating rounds)\n")
    print("| comparison | first (ms) | second (ms) | median ratio |\n| --- | ---: | ---: | ---: |")
    names = {"pyro_library_vs_hand": "Pyro: library / hand-written loop",
             "numpyro_library_vs_hand": "NumPyro: library / hand-written jitted scan",
             "pyro_vs_numpyro_library": "library: Pyro / NumPyro (NumPyro speed-up)"}
    for key, r in res.items():
        print(f"| {names[key]} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | {r['ratio']:.3f} |")

    if not args.no_scaling:
        rows = []
        for dim, batch, steps, hidden in [(16, 64, 100, 200), (16, 256, 100, 200), (16, 1024, 100, 200),
                                          (16, 64, 200, 200), (16, 64, 400, 200), (64, 64, 100, 200),
                                          (128, 64, 100, 200), (16, 64, 100, 64), (16, 64, 100, 32)]:
            p, _ = pyro_pair(dim, batch, steps, hidden)
            j, _ = numpyro_pair(dim, batch, steps, hidden)
            r = compare(p, j, max(5, args.rounds // 3))
            rows.append({"dim": dim, "batch": batch, "steps": steps, "hidden": hidden, **r})
        res["scaling"] = rows
        print("\n# Cost of the library's prior chain as it grows\n")
        print("| latent d | batch | steps | hidden | Pyro (ms) | NumPyro (ms) | Pyro / NumPyro |\n"
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['dim']} | {r['batch']} | {r['steps']} | {r['hidden']} | {r['a_ms']:.1f} | {r['b_ms']:.2f} "
                  f"| {r['ratio']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
