"""Speed of Pyro's Langevin MCMC kernel: its compiled potential against the model run at every step and against a
hand-written MALA loop of the same algorithm.

The model is a user's regression with a double-well prior: scikit-learn's diabetes data (442 x 10, standardised),
coefficients ``b`` under an ``EnergyTiltedNormal`` whose energy is :math:`\\sum_j (b_j^2 - 1)^2`, a ``HalfNormal(1)``
noise scale ``s`` (moved to the real line by its log, as Pyro's ``MCMC`` does). Each round runs ``MCMC`` with
``Langevin(model, step_size=0.01, adapt_step_size=False, adapt_mass_matrix=False)`` for ``--steps`` draws (plain
MALA with a fixed step, so that the hand-written loop runs the same algorithm: the unconstrained log joint with the
log-Jacobian of ``s``, its gradient by autograd, the proposal and the Metropolis-Hastings test). The library with
``compile_potential=True`` (the default) and with ``False`` are each timed against the hand-written loop,
alternating in one process (``timing.compare``: medians of per-round ratios); one compute thread.

Run: ``.venv/bin/python benchmarks/mcmc_kernel.py [--rounds 10] [--steps 300] [--json out.json]`` (``--quick``: a
smoke run).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare  # noqa: E402

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402

from tilted_priors.inference.pyro import Langevin  # noqa: E402
from tilted_priors.pyro import EnergyTiltedNormal, ShortRunLangevin  # noqa: E402

STEP = 0.01


def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_diabetes(return_X_y=True)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)


def double_well(b: torch.Tensor) -> torch.Tensor:
    return ((b ** 2 - 1.0) ** 2).sum(-1)


def model(x: torch.Tensor, y: torch.Tensor) -> None:
    d = x.shape[1]
    b = pyro.sample("b", EnergyTiltedNormal(double_well, torch.zeros(d), torch.ones(d),
                                             sampler=ShortRunLangevin(10, 0.1)))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ b, s), obs=y)


def library(x, y, steps: int, compile_potential: bool):
    def run():
        kernel = Langevin(model, step_size=STEP, adapt_step_size=False, adapt_mass_matrix=False,
                          compile_potential=compile_potential)
        MCMC(kernel, num_samples=steps, warmup_steps=0, disable_progbar=True).run(x, y)
    return run


def hand(x, y, steps: int):
    """MALA on u = (b, log s): log N(b; 0, I) - E(b) + log HalfNormal(s) + log s + sum log N(y; x b, s)."""
    d = x.shape[1]

    def log_density(u: torch.Tensor) -> torch.Tensor:
        b, log_s = u[:d], u[d]
        s = log_s.exp()
        prior = -0.5 * (b ** 2).sum() - double_well(b)
        noise = -0.5 * s ** 2 + log_s  # HalfNormal(1) up to a constant, and the Jacobian of s = exp(log s)
        resid = y - x @ b
        return prior + noise - 0.5 * (resid ** 2).sum() / s ** 2 - y.shape[0] * log_s

    def value_and_grad(u):
        u = u.detach().requires_grad_(True)
        lp = log_density(u)
        (g,) = torch.autograd.grad(lp, u)
        return lp.detach(), g

    def run():
        u = torch.zeros(d + 1)
        lp, g = value_and_grad(u)
        for _ in range(steps):
            mean = u + 0.5 * STEP ** 2 * g
            new = mean + STEP * torch.randn_like(u)
            lp_new, g_new = value_and_grad(new)
            back = new + 0.5 * STEP ** 2 * g_new
            log_ratio = (lp_new - lp - ((u - back) ** 2).sum() / (2 * STEP ** 2)
                         + ((new - mean) ** 2).sum() / (2 * STEP ** 2))
            if math.log(float(torch.rand(()))) < float(log_ratio):
                u, lp, g = new, lp_new, g_new
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 20 steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 20
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    x, y = data()
    rows = []
    for compile_potential in (True, False):
        result = compare(library(x, y, args.steps, compile_potential), hand(x, y, args.steps), args.rounds)
        rows.append({"compile_potential": compile_potential, "library_ms_per_step": result["a_ms"] / args.steps,
                     "hand_ms_per_step": result["b_ms"] / args.steps, "ratio": result["ratio"]})
    print(f"Langevin kernel (MALA, fixed step) on the diabetes regression with a double-well prior, {args.steps} "
          f"steps per run, {args.rounds} rounds, one thread\n")
    print("| compile_potential | library (ms / step) | hand-written (ms / step) | library / hand |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['compile_potential']} | {r['library_ms_per_step']:.3f} | {r['hand_ms_per_step']:.3f} | "
              f"{r['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
