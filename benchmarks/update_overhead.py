"""Whole LEBM training updates on small user models: the library against the same algorithm written by hand.

One update is what a user's training loop runs: the backend's own ``SVI`` step with :class:`ShortRunPosterior`
as the guide (posterior Langevin, 20 steps of 0.1) and an :class:`EnergyTiltedNormal` prior whose default
``Contrastive`` normalizer draws the negative samples (prior Langevin, 60 steps of 0.4, fixed step sizes so that
both sides run the same algorithm), one Adam step. The hand-written side is that algorithm in plain torch / JAX
with the same networks and data. Models:

* ``factor``: the README's factor model on the wine data (178 x 13, standardised): 2 factors, a linear loading,
  Normal noise 0.3, an ``EnergyMLP(2, hidden=32)``;
* ``digits``: scikit-learn's 8 x 8 digits (1,797 x 64, scaled to [0, 1]), batches of 100: 16 latents, an MLP
  generator 16-128-64 (sigmoid output), Normal noise 0.3, LEBM's ``EnergyMLP(16)`` (16-200-200-1);
* ``svhn`` (Pyro): Pang et al.'s SVHN networks (32 x 32 x 3, 100 latents, generator ngf=64, energy 100-200-200-1)
  against their training loop as published (prior and posterior Langevin as two functions; the posterior's
  generator and energy gradients taken separately; two Adam optimisers), batches of ``--svhn-batch`` random
  images (the arithmetic does not depend on the pixels).

For NumPyro the first update's compile time (``jax.jit(svi.update)``'s first call, and ``svi.init``) is reported
too. Timings alternate library and hand-written calls in one process (``timing.compare``: the median of per-round
ratios).

Run: ``.venv/bin/python benchmarks/update_overhead.py [--rounds 20] [--models factor digits svhn] [--json out]``
(``--quick``: a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hand_lebm import numpyro_update, pyro_update  # noqa: E402
from timing import compare, timed  # noqa: E402

import numpy as np  # noqa: E402

POST, PRIOR, SD = (20, 0.1), (60, 0.4), 0.3


def tabular(name: str) -> np.ndarray:
    from sklearn.datasets import load_digits, load_wine

    if name == "factor":
        x = load_wine().data
        return ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    rng = np.random.default_rng(0)
    x = load_digits().data.astype(np.float32) / 16.0
    return x[rng.choice(len(x), 100, replace=False)]


# --- Pyro -------------------------------------------------------------------------------------------------------
def pyro_pair(model_name: str, x: np.ndarray):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from tilted_priors.inference.pyro import ShortRunPosterior, register_module
    from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal, ShortRunLangevin

    xt = torch.as_tensor(x)
    d = 2 if model_name == "factor" else 16

    def networks():
        torch.manual_seed(0)
        if model_name == "factor":
            return EnergyMLP(d, hidden=32), torch.nn.Linear(d, x.shape[1])
        return EnergyMLP(d), torch.nn.Sequential(torch.nn.Linear(d, 128), torch.nn.GELU(),
                                                 torch.nn.Linear(128, x.shape[1]), torch.nn.Sigmoid())

    energy, decoder = networks()
    prior_sampler = ShortRunLangevin(*PRIOR)

    def model(x):
        E, G = register_module("energy", energy), register_module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", EnergyTiltedNormal(E, torch.zeros(d), torch.ones(d), sampler=prior_sampler))
            pyro.sample("x", dist.Normal(G(z), SD).to_event(1), obs=x)

    pyro.clear_param_store()
    svi = SVI(model, ShortRunPosterior(model, *POST), pyro.optim.Adam({"lr": 1e-4}), Trace_ELBO())

    def library():
        svi.step(xt)

    E, G = networks()
    hand = pyro_update(E, G, xt, d, SD, POST, PRIOR, torch.optim.Adam(list(E.parameters()) + list(G.parameters()),
                                                                      lr=1e-4))
    return library, hand


def svhn_pair(batch: int):
    """The library's SVHN LEBM (``models.pyro.lebm.build``) against Pang et al.'s training loop, same networks."""
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from tilted_priors.inference.pyro import ShortRunPosterior
    from tilted_priors.models.pyro.lebm import build

    nz, sigma = 100, SD
    x = torch.rand(batch, 32, 32, 3) * 2 - 1
    lvm = build((32, 32, 3), nz, ngf=64, seed=0)
    pyro.clear_param_store()
    optim = pyro.optim.Adam({"lr": 2e-5, "betas": (0.5, 0.999)})
    svi = SVI(lvm.model, ShortRunPosterior(lvm.model, *POST), optim, Trace_ELBO())

    def library():
        svi.step(x)

    paper = build((32, 32, 3), nz, ngf=64, seed=0)
    netG, netE = paper.generator, paper.energy
    optG = torch.optim.Adam(netG.parameters(), lr=2e-5, betas=(0.5, 0.999))
    optE = torch.optim.Adam(netE.parameters(), lr=2e-5, betas=(0.5, 0.999))
    mse = torch.nn.MSELoss(reduction="sum")

    def prior_z(z):  # the paper's sample_langevin_prior_z: e_l_steps=60, e_l_step_size=0.4, e_prior_sig=1
        z = z.clone().detach().requires_grad_(True)
        steps, s = PRIOR
        for _ in range(steps):
            grad = torch.autograd.grad(netE(z).sum(), z)[0]
            z.data = z.data - 0.5 * s * s * (grad + z.data)
            z.data += s * torch.randn_like(z).data
        return z.detach()

    def post_z(z):  # sample_langevin_post_z: g_l_steps=20, g_l_step_size=0.1, g_llhd_sigma=0.3
        z = z.clone().detach().requires_grad_(True)
        steps, s = POST
        for _ in range(steps):
            grad_g = torch.autograd.grad(mse(netG(z), x) / (2.0 * sigma * sigma), z)[0]
            grad_e = torch.autograd.grad(netE(z).sum(), z)[0]
            z.data = z.data - 0.5 * s * s * (grad_g + grad_e + z.data)
            z.data += s * torch.randn_like(z).data
        return z.detach()

    def hand():
        z_g = post_z(torch.randn(batch, nz))
        z_e = prior_z(torch.randn(batch, nz))
        optG.zero_grad()
        (mse(netG(z_g), x) / batch).backward()
        optG.step()
        optE.zero_grad()
        (netE(z_g).mean() - netE(z_e).mean()).backward()
        optE.step()

    return library, hand


# --- NumPyro ----------------------------------------------------------------------------------------------------
def numpyro_pair(model_name: str, x: np.ndarray):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from flax import nnx
    from numpyro.infer import SVI, Trace_ELBO

    from tilted_priors.inference.numpyro import ShortRunPosterior, register_module
    from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal, ShortRunLangevin

    xj = jnp.asarray(x)
    d = 2 if model_name == "factor" else 16

    class MLPDecoder(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.out = nnx.Linear(d, 128, rngs=rngs), nnx.Linear(128, x.shape[1], rngs=rngs)

        def __call__(self, z):
            return jax.nn.sigmoid(self.out(jax.nn.gelu(self.hidden(z), approximate=False)))

    def networks():
        if model_name == "factor":
            return EnergyMLP(d, hidden=32, rngs=0), nnx.Linear(d, x.shape[1], rngs=nnx.Rngs(0))
        return EnergyMLP(d, rngs=0), MLPDecoder(nnx.Rngs(0))

    energy, decoder = networks()
    prior_sampler = ShortRunLangevin(*PRIOR)

    def model(x):
        E, G = register_module("energy", energy), register_module("decoder", decoder)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", EnergyTiltedNormal(E, jnp.zeros(d), jnp.ones(d), sampler=prior_sampler))
            numpyro.sample("x", dist.Normal(G(z), SD).to_event(1), obs=x)

    svi = SVI(model, ShortRunPosterior(model, *POST), optax.adam(1e-4), Trace_ELBO())
    compile_s = {}
    t0 = time.perf_counter()
    state = [svi.init(jax.random.PRNGKey(0), xj)]
    compile_s["init"] = time.perf_counter() - t0
    update = jax.jit(svi.update)

    def library():
        state[0], loss = update(state[0], xj)
        loss.block_until_ready()

    compile_s["first_update"] = timed(library)

    E, G = networks()
    hand = numpyro_update(E, G, xj, d, SD, POST, PRIOR, optax.adam(1e-4))
    compile_s["hand_first_update"] = timed(hand)
    return library, hand, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["factor", "digits", "svhn"],
                        choices=["factor", "digits", "svhn"])
    parser.add_argument("--backends", nargs="+", default=["pyro", "numpyro"], choices=["pyro", "numpyro"])
    parser.add_argument("--svhn-batch", type=int, default=16)
    parser.add_argument("--svhn-rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, SVHN batch 2 and 1 round")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.svhn_batch, args.svhn_rounds = 2, 2, 1
    import torch

    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        for backend in args.backends:
            if name == "svhn" and backend != "pyro":
                continue
            row = {"model": name, "backend": backend}
            if name == "svhn":
                row.update(compare(*svhn_pair(args.svhn_batch), args.svhn_rounds))
            elif backend == "pyro":
                row.update(compare(*pyro_pair(name, tabular(name)), args.rounds))
            else:
                library, hand, compile_s = numpyro_pair(name, tabular(name))
                row.update(compare(library, hand, args.rounds), compile=compile_s)
            rows.append(row)
            print(row, flush=True)
    print(f"\n# One LEBM update, library / hand-written (same algorithm; medians of {args.rounds} alternating "
          f"rounds, SVHN {args.svhn_rounds} rounds of batch {args.svhn_batch}; OMP threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')})\n")
    print("| model | backend | library (ms) | hand-written (ms) | library / hand | NumPyro compile: init + first "
          "update (s) | hand-written's compile (s) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        c = r.get("compile")
        comp = "" if c is None else f"{c['init']:.1f} + {c['first_update']:.1f}"
        hand_c = "" if c is None else f"{c['hand_first_update']:.1f}"
        print(f"| {r['model']} | {r['backend']} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | {r['ratio']:.3f} | {comp} | "
              f"{hand_c} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
