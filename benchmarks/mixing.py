"""Do latent-space chains mix where data-space Langevin does not? (Nijkamp et al. 2022's claim, issue 7 item 4.)

A multimodal target in 2-D, sampled two ways at the same number of gradient evaluations (MALA, one gradient per
step, many parallel chains):

- **latent**: chains in the flow's latent space on :math:`\\log p(u) = -E(T(u)) + \\log\\mathcal N(u; 0, I)`, from
  :math:`u_0 \\sim \\mathcal N(0, I)`, draws pushed through :math:`T`;
- **data**: chains in data space on :math:`-E(x) + \\log q_T(x)`, from :math:`x_0 = T(u_0)`, the flow's samples
  (``--data-init normal``: from :math:`\\mathcal N(0, I)` in x).

Targets (NumPyro backend, :mod:`tilted_priors.models.numpyro.ntebm`):

- ``exact``: the ring of 8 Gaussians. A flow (``FLOW``: 24 affine IAF layers, MADE width 32, 6000 Adam steps with
  warm-up and cosine decay, 20000 points) is fit to ring samples by maximum likelihood, its held-out NLL printed
  beside the true density's; then the energy is set to
  :math:`E(x) = \\log q_T(x) - \\log p_{\\text{ring}}(x)`, so :math:`e^{-E} q_T = p_{\\text{ring}}` exactly and the
  mode weights are known (1/8 each). Then the data-space target is :math:`\\log p_{\\text{ring}}(x)` and the latent
  one :math:`\\log p_{\\text{ring}}(T(u)) + \\log|\\det \\partial T/\\partial u|` (the same densities, written without
  the flow's inverse).
- ``trained``: an NT-EBM trained on ring data (:func:`~tilted_priors.models.numpyro.ntebm.fit_flow`, then
  :func:`~tilted_priors.models.numpyro.ntebm.fit_energy`); the reference mode weights are the data's (1/8), approximately.

``--backend pyro`` (target ``exact``; ``trained`` also runs, with :func:`tilted_priors.models.pyro.ntebm.fit_energy`, but takes
minutes more): the same ring, chains, step-size rule, diagnostics, table and picture, with Pyro's rational-quadratic
spline flow (``PYRO_FLOW``: 5 ``spline_autoregressive`` layers with 16 bins on [-5.5, 5.5], MADE width 64,
reversals between layers, 1500 Adam steps with warm-up and cosine decay on the same 20000 ring samples) and the
latent density taken from the site ``x ~ EnergyTilted(E, q_T)`` reparameterised with
:class:`~tilted_priors.inference.pyro.FlowBackbone` (checked against :math:`\\log p_{\\text{ring}}(T(u)) + \\log|\\det|`); chains
are the MALA step of :mod:`tilted_priors.pyro.langevin`, pilots ``tilted_priors.pyro.MALA(...).run``.

Step sizes are tuned per space by short pilot runs: the grid value whose mean acceptance is closest to 0.574.
Diagnostics over the last half of each chain: split rank R-hat (max over x coordinates and over the 8 mode
indicators), nested R-hat (chains grouped in super-chains of ``--superchain`` consecutive chains), bulk ESS, the
number of modes the pooled draws visit, the mean number of modes one chain visits, and the largest deviation of
the pooled mode frequencies from 1/8. A draw's mode is its nearest centre.

Run: ``.venv/bin/python benchmarks/mixing.py [--chains 64] [--steps 2000] [--targets exact,trained] [--out DIR]
[--figure benchmarks/figures/mixing_ring.png]``; the README's Pyro run: ``.venv/bin/python benchmarks/mixing.py
--backend pyro --flow-steps 3000 --steps 4000 --figure benchmarks/figures/mixing_ring_pyro.png``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from functools import partial

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from tilted_priors.inference.diagnostics import ess, nested_rhat, rhat
from tilted_priors.models.data import toy_mixture, toy_mixture_centres
from tilted_priors.models.numpyro import ntebm
from tilted_priors.numpyro import langevin

OPTIMAL_ACCEPTANCE = 0.574
#: the flow backbone of this benchmark (a deeper, narrower IAF than ``ntebm.REFERENCE``, fit longer on more data)
FLOW = {"flow_layers": 24, "flow_hidden": 32, "flow_steps": 6000, "flow_lr": 2e-3, "flow_data": 20000}
#: the Pyro backend's flow: 5 rational-quadratic spline autoregressive layers (16 bins on [-5.5, 5.5], MADE
#: width 64, reversals between layers), fit by maximum likelihood with warm-up and cosine decay on the same data
PYRO_FLOW = {"flow_layers": 5, "flow_hidden": 64, "flow_bins": 16, "flow_bound": 5.5, "flow_steps": 1500,
             "flow_lr": 3e-3, "flow_data": 20000}
STEP_GRID = (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2)


# --- targets ---------------------------------------------------------------------------------------------
def ring_log_density(x, centres, sd):
    d2 = jnp.sum((x[..., None, :] - centres) ** 2, -1)
    return logsumexp(-0.5 * d2 / sd ** 2, -1) - jnp.log(centres.shape[0]) - jnp.log(2 * jnp.pi * sd ** 2)


def exact_target(model, centres, sd):
    """(latent log density, data log density, push-forward) for E = log q_T - log p_ring."""
    t = model.transform()

    def latent(u):
        x, inter = t.call_with_intermediates(u)
        return ring_log_density(x, centres, sd) + t.log_abs_det_jacobian(u, x, intermediates=inter)

    return latent, partial(ring_log_density, centres=centres, sd=sd), lambda u: t(u)


def trained_target(model):
    t, q, energy = model.transform(), model.flow_dist(), model.energy
    return (ntebm.latent_log_density(model), lambda x: -energy(x) + q.log_prob(x), lambda u: t(u))


# --- chains ----------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("log_density", "push", "steps"))
def run_chain(key, init, step_size, log_density, push, steps):
    """MALA for ``steps`` steps from ``init`` (chains, d); returns pushed positions (chains, steps, d), acceptance."""
    state = langevin.init(init, log_density)

    def body(state, k):
        state, info = langevin.mala_step(k, state, log_density, step_size)
        return state, (push(state.position), info.acceptance_rate)

    _, (xs, acc) = jax.lax.scan(body, state, jax.random.split(key, steps))
    return jnp.swapaxes(xs, 0, 1), acc.mean()


def tune(key, init, log_density, push, pilot_steps):
    best, best_gap, table = None, np.inf, []
    for h in STEP_GRID:
        _, acc = run_chain(key, init, h, log_density, push, pilot_steps)
        acc = float(acc)
        table.append((h, acc))
        if abs(acc - OPTIMAL_ACCEPTANCE) < best_gap:
            best, best_gap = h, abs(acc - OPTIMAL_ACCEPTANCE)
    return best, table


# --- diagnostics -----------------------------------------------------------------------------------------
def diagnose(draws: np.ndarray, centres: np.ndarray, superchain: int) -> dict:
    """draws: (chains, draws, 2), the last half of the chains."""
    m = draws.shape[0]
    modes = np.argmin(((draws[..., None, :] - centres) ** 2).sum(-1), -1)           # (chains, draws)
    onehot = (modes[..., None] == np.arange(len(centres))).astype(float)             # (chains, draws, K)
    ids = np.arange(m) // superchain
    with np.errstate(invalid="ignore", divide="ignore"):
        r_x, r_mode = rhat(draws), rhat(onehot)
        nr_x, nr_mode = nested_rhat(draws, ids), nested_rhat(onehot, ids)
        e_x, e_mode = ess(draws), ess(onehot)
    freq = onehot.reshape(-1, len(centres)).mean(0)
    # a constant indicator (a mode no chain or every draw visits) has no R-hat: it is left out (nanmax)
    return {
        "rhat_x": float(np.max(r_x)), "rhat_mode": float(np.nanmax(r_mode)),
        "nrhat_x": float(np.max(nr_x)), "nrhat_mode": float(np.nanmax(nr_mode)),
        "ess_x": float(np.min(e_x)), "ess_mode": float(np.nanmin(e_mode)),
        "modes": int((freq > 0).sum()),
        "modes_per_chain": float(np.mean([len(np.unique(c)) for c in modes])),
        "max_dev": float(np.max(np.abs(freq - 1.0 / len(centres)))),
        "freq": freq,
    }


def compare(name, key, latent_ld, data_ld, push, args, centres, data_init_x):
    k_init, k_lat, k_dat, k_tune = jax.random.split(key, 4)
    u0 = jax.random.normal(k_init, (args.chains, 2))
    x0 = push(u0) if args.data_init == "pushforward" else u0
    ident = lambda x: x  # noqa: E731
    h_lat, t_lat = tune(k_tune, u0, latent_ld, push, args.pilot)
    h_dat, t_dat = tune(k_tune, x0, data_ld, ident, args.pilot)
    out = {}
    for side, ld, init, h, psh, k in (("latent", latent_ld, u0, h_lat, push, k_lat),
                                      ("data", data_ld, x0, h_dat, ident, k_dat)):
        t0 = time.perf_counter()
        xs, acc = run_chain(k, init, h, ld, psh, args.steps)
        xs = np.asarray(jax.block_until_ready(xs), dtype=np.float64)
        wall = time.perf_counter() - t0
        res = diagnose(xs[:, args.steps // 2:], centres, args.superchain)
        res.update(step_size=h, acceptance=float(acc), wall=wall, trace=xs)
        out[side] = res
    out["tuning"] = {"latent": t_lat, "data": t_dat}
    return out


# --- output ----------------------------------------------------------------------------------------------
def _r(v: float) -> str:
    """R-hat for the table: a chain-constant indicator with different values across chains gives W = 0, R-hat inf."""
    return f"{v:.3f}" if np.isfinite(v) and v < 100 else "inf (stuck)"


def table(results: dict, args) -> str:
    head = ("| target | space | step size | accept | R-hat x | nested R-hat x | R-hat mode | nested R-hat mode | "
            "ESS x (min) | ESS mode (min) | modes visited | modes / chain | max dev. from 1/8 |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for target, res in results.items():
        for side in ("latent", "data"):
            r = res[side]
            lines.append(f"| {target} | {side} | {r['step_size']:g} | {r['acceptance']:.2f} | {_r(r['rhat_x'])} | "
                         f"{_r(r['nrhat_x'])} | {_r(r['rhat_mode'])} | {_r(r['nrhat_mode'])} | {r['ess_x']:.0f} | "
                         f"{r['ess_mode']:.0f} | {r['modes']}/8 | {r['modes_per_chain']:.2f} | "
                         f"{r['max_dev']:.3f} |")
    return "\n".join(lines)


def plot(results: dict, centres, sd, out_dir: str, args) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.linspace(-4.5, 4.5, 200)
    xx = np.stack(np.meshgrid(g, g), -1)
    dens = np.exp(np.asarray(ring_log_density(jnp.asarray(xx), jnp.asarray(centres), sd)))
    paths = []
    for target, res in results.items():
        fig, ax = plt.subplots(2, 2, figsize=(11, 9))
        for j, side in enumerate(("latent", "data")):
            r = res[side]
            draws = r["trace"][:, args.steps // 2:].reshape(-1, 2)
            sub = draws[np.random.default_rng(0).choice(len(draws), min(4000, len(draws)), replace=False)]
            a = ax[0, j]
            a.contour(g, g, dens, levels=8, colors="0.6", linewidths=0.7)
            a.scatter(sub[:, 0], sub[:, 1], s=2, alpha=0.35, color="C0" if side == "latent" else "C3")
            a.set_title(f"{target}: {side} chains (R-hat {r['rhat_x']:.2f}, {r['modes']}/8 modes)")
            a.set_aspect("equal"); a.set_xlim(-4.5, 4.5); a.set_ylim(-4.5, 4.5)
            a = ax[1, j]
            angle = np.arctan2(r["trace"][..., 1], r["trace"][..., 0])
            for c in range(min(6, angle.shape[0])):
                a.plot(angle[c], lw=0.6)
            a.set_xlabel("step (= gradient evaluations)"); a.set_ylabel("angle of x")
            a.set_title(f"{side}: traces of 6 chains (MALA, h={r['step_size']:g})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"mixing_{target}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["numpyro", "pyro"], default="numpyro",
                   help="numpyro: affine IAF; pyro: rational-quadratic spline autoregressive flow")
    p.add_argument("--targets", default=None, help="default: exact,trained (numpyro), exact (pyro)")
    p.add_argument("--chains", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000, help="MALA steps = gradient evaluations per chain")
    p.add_argument("--pilot", type=int, default=200, help="steps of each tuning run")
    p.add_argument("--superchain", type=int, default=4, help="chains per super-chain for nested R-hat")
    p.add_argument("--radius", type=float, default=3.0)
    p.add_argument("--sd", type=float, default=0.25)
    # flow settings default to FLOW (numpyro) or PYRO_FLOW (pyro)
    p.add_argument("--flow-layers", type=int, default=None, help="IAF layers")
    p.add_argument("--flow-hidden", type=int, default=None, help="MADE width")
    p.add_argument("--flow-steps", type=int, default=None, help="Adam steps of the flow's ML fit")
    p.add_argument("--flow-lr", type=float, default=None, help="peak rate (warm-up + cosine decay)")
    p.add_argument("--flow-data", type=int, default=None, help="ring samples the flow is fit to")
    p.add_argument("--flow-bins", type=int, default=PYRO_FLOW["flow_bins"], help="spline bins (pyro)")
    p.add_argument("--flow-bound", type=float, default=PYRO_FLOW["flow_bound"], help="spline interval (pyro)")
    p.add_argument("--energy-steps", type=int, default=300)
    p.add_argument("--data-init", choices=["pushforward", "normal"], default="pushforward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the pictures (default: a new temp folder)")
    p.add_argument("--figure", default=None, help="also save the exact target's picture here (e.g. "
                   "benchmarks/figures/mixing_ring.png)")
    args = p.parse_args(argv)
    defaults = PYRO_FLOW if args.backend == "pyro" else FLOW
    for k in ("flow_layers", "flow_hidden", "flow_steps", "flow_lr", "flow_data"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    if args.targets is None:
        args.targets = "exact" if args.backend == "pyro" else "exact,trained"
    if args.backend == "pyro":
        return pyro_main(args)
    t_start = time.perf_counter()
    out_dir = args.out or tempfile.mkdtemp(prefix="mixing-")
    os.makedirs(out_dir, exist_ok=True)

    centres_np = toy_mixture_centres("ring", modes=8, radius=args.radius)
    centres = jnp.asarray(centres_np, jnp.float32)
    data = toy_mixture(args.flow_data, "ring", seed=args.seed, radius=args.radius, sd=args.sd).astype(np.float32)
    held_out = toy_mixture(20000, "ring", seed=args.seed + 10_000, radius=args.radius, sd=args.sd)
    t0 = time.perf_counter()
    model = ntebm.build(2, flow_layers=args.flow_layers, flow_hidden=args.flow_hidden,
                        **{k: ntebm.REFERENCE[k] for k in ("energy_hidden", "energy_depth")}, seed=args.seed)
    # maximum likelihood on ring samples only (nothing from the chains feeds back into the flow)
    nll = ntebm.fit_flow(model, data, args.flow_steps, batch_size=256, lr=args.flow_lr, seed=args.seed,
                         schedule="cosine")
    test_nll = -float(jnp.mean(model.flow_dist().log_prob(jnp.asarray(held_out, jnp.float32))))
    ref_nll = -float(np.mean(toy_mixture_log_density_np(held_out, args)))
    print(f"flow fit ({args.flow_layers} IAF layers, MADE width {args.flow_hidden}, {args.flow_steps} steps, "
          f"{args.flow_data} points): train NLL {np.mean(nll[:20]):.3f} -> {np.mean(nll[-200:]):.3f}; held-out NLL "
          f"{test_nll:.3f} nats vs {ref_nll:.3f} for the true density (gap {test_nll - ref_nll:.3f}), "
          f"{time.perf_counter() - t0:.0f} s")

    key = jax.random.PRNGKey(args.seed)
    results = {}
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for i, target in enumerate(targets):
        t1 = time.perf_counter()
        if target == "exact":
            lat, dat, push = exact_target(model, centres, args.sd)
        elif target == "trained":
            hist = ntebm.fit_energy(model, data, args.energy_steps, chain_steps=ntebm.REFERENCE["chain_steps"],
                                    step_size=ntebm.REFERENCE["step_size"], lr=ntebm.REFERENCE["energy_lr"],
                                    reg=0.01, seed=args.seed)
            print(f"energy fit: contrastive loss {np.mean(hist[:10]):.3f} -> {np.mean(hist[-10:]):.3f}")
            lat, dat, push = trained_target(model)
        else:
            raise SystemExit(f"unknown target {target!r}")
        results[target] = compare(target, jax.random.fold_in(key, i), lat, dat, push, args, centres_np, None)
        print(f"{target}: {time.perf_counter() - t1:.0f} s; tuning (step, acceptance): "
              + "; ".join(f"{s}: " + ", ".join(f"{h:g}:{a:.2f}" for h, a in results[target]['tuning'][s])
                          for s in ("latent", "data")))
        for side in ("latent", "data"):
            print(f"  {side} mode frequencies: {np.round(results[target][side]['freq'], 3).tolist()}, "
                  f"chain wall time {results[target][side]['wall']:.1f} s")

    _report(results, centres_np, out_dir, args, t_start)


def _report(results, centres_np, out_dir, args, t_start):
    print(f"\n[{args.backend}] {args.chains} chains x {args.steps} MALA steps (= gradient evaluations) per space; "
          f"diagnostics over the last {args.steps - args.steps // 2} draws; nested R-hat with super-chains of "
          f"{args.superchain}; ring radius {args.radius}, sd {args.sd}; data chains start from "
          f"{'the flow samples T(u0)' if args.data_init == 'pushforward' else 'N(0, I)'}.\n")
    print(table(results, args))
    for path in plot(results, centres_np, args.sd, out_dir, args):
        print(f"picture: {path}")
        if args.figure and path.endswith("mixing_exact.png"):
            os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
            shutil.copyfile(path, args.figure)
            print(f"picture: {args.figure}")
    print(f"total {time.perf_counter() - t_start:.0f} s")


# --- Pyro backend ----------------------------------------------------------------------------------------
# The same ring, chains, step-size rule, diagnostics, table and picture; the flow is Pyro's rational-quadratic
# spline autoregressive flow (in 2-D both of its directions are cheap: T(u) is one MADE pass per layer, T^{-1}(x)
# two), and the latent chains' density is the reparameterised site's, from FlowBackbone.
def pyro_build(args):
    """An ``tilted_priors.models.pyro.ntebm.NTEBM`` whose flow is ``flow_layers`` spline autoregressive layers with reversals."""
    import pyro.distributions.transforms as T
    import torch
    from torch import nn

    from tilted_priors.models.pyro import ntebm as ntebm_pyro
    from tilted_priors.pyro import EnergyMLP

    torch.manual_seed(args.seed)
    transforms = []
    for i in range(args.flow_layers):
        if i:
            transforms.append(T.Permute(torch.tensor([1, 0])))
        transforms.append(T.spline_autoregressive(2, hidden_dims=[args.flow_hidden] * 2, count_bins=args.flow_bins,
                                                  bound=args.flow_bound))
    energy = EnergyMLP(2, ntebm_pyro.REFERENCE["energy_hidden"], ntebm_pyro.REFERENCE["energy_depth"])
    return ntebm_pyro.NTEBM(2, transforms, energy, nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)]))


def pyro_fit_flow(model, data, args):
    """Maximum likelihood on ring samples only: Adam, 200 warm-up steps then cosine decay, minibatches of 256."""
    import math

    import torch

    opt = torch.optim.Adam(model.flow.parameters(), lr=args.flow_lr)
    n = args.flow_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, n) / n)))
    g = torch.Generator().manual_seed(args.seed)
    hist = []
    for _ in range(args.flow_steps):
        loss = -model.flow_dist().log_prob(data[torch.randint(0, data.shape[0], (256,), generator=g)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist.append(float(loss.detach()))
    for p_ in model.flow.parameters():
        p_.requires_grad_(False)
    return hist


def pyro_ring_log_density(x, centres, sd):
    import math

    import torch
    d2 = ((x[..., None, :] - centres) ** 2).sum(-1)
    return torch.logsumexp(-0.5 * d2 / sd ** 2, -1) - math.log(centres.shape[0]) - math.log(2 * math.pi * sd ** 2)


def pyro_backbone_log_density(model, energy, n):
    """The log density of ``x_u``: ``x ~ EnergyTilted(energy, q_T)`` reparameterised with ``FlowBackbone()``."""
    import pyro
    from pyro import poutine

    from tilted_priors.inference.pyro.reparam import FlowBackbone
    from tilted_priors.pyro import EnergyTilted, MALA, Unnormalized

    def program():
        with pyro.plate("chains", n):
            return pyro.sample("x", EnergyTilted(energy, model.flow_dist(), normalizer=Unnormalized(),
                                                 sampler=MALA(1, 0.1)))

    tr = poutine.trace(poutine.reparam(program, config={"x": FlowBackbone()})).get_trace()
    return tr.nodes["x_u"]["fn"].log_prob


def pyro_targets(target, model, centres, sd, n):
    """(latent log density, data log density); latent through FlowBackbone, checked against the direct formula."""
    import torch

    t, q = model.transform(), model.flow_dist()
    ring = lambda x: pyro_ring_log_density(x, centres, sd)  # noqa: E731
    if target == "exact":
        energy = lambda x: q.log_prob(x) - ring(x)  # noqa: E731   E = log q_T - log p_ring
        data_ld = ring
    else:
        energy = model.energy
        data_ld = lambda x: -model.energy(x) + q.log_prob(x)  # noqa: E731
    latent_ld = pyro_backbone_log_density(model, energy, n)
    with torch.no_grad():  # check: log p(u) = log p_x(T(u)) + log|det dT/du| (-E + log q_T for the data one)
        u = torch.randn(n, 2)
        x = t(u)
        direct = data_ld(x) + t.log_abs_det_jacobian(u, x)
        gap = (latent_ld(u) - direct).abs().max().item()
    if target == "exact" and gap > 1e-3:
        raise AssertionError(f"FlowBackbone density differs from log p_ring(T(u)) + log|det|: {gap}")
    return latent_ld, data_ld


def pyro_run_chain(init, step_size, log_density, steps):
    """MALA (the core step of tilted_priors.pyro.MALA, one gradient per step); positions (chains, steps, d)."""
    import torch

    from tilted_priors.pyro import langevin as pl

    state = pl.init(init, log_density)
    trace = torch.empty((steps,) + tuple(init.shape))
    acc = 0.0
    for i in range(steps):
        state, info = pl.mala_step(None, state, log_density, step_size)
        trace[i] = state.position
        acc += float(info.acceptance_rate.mean())
    return trace.transpose(0, 1), acc / steps


def pyro_tune(seed, init, log_density, pilot_steps):
    """The same rule: the grid value whose pilot (``MALA(pilot, h).run``) acceptance is closest to 0.574."""
    import pyro

    from tilted_priors.errors import ChainDivergenceError
    from tilted_priors.pyro import MALA

    best, best_gap, table_ = None, np.inf, []
    for h in STEP_GRID:
        pyro.set_rng_seed(seed)
        try:
            _, info = MALA(pilot_steps, h).run(log_density, init, return_info=True)
            acc = float(info.acceptance_rate.mean())
        except ChainDivergenceError:
            acc = 0.0
        table_.append((h, acc))
        if abs(acc - OPTIMAL_ACCEPTANCE) < best_gap:
            best, best_gap = h, abs(acc - OPTIMAL_ACCEPTANCE)
    return best, table_


def pyro_compare(seed, model, latent_ld, data_ld, args, centres_np):
    import pyro
    import torch

    pyro.set_rng_seed(seed)
    u0 = torch.randn(args.chains, 2)
    with torch.no_grad():
        x0 = model.transform()(u0) if args.data_init == "pushforward" else u0.clone()
    h_lat, t_lat = pyro_tune(seed + 1, u0, latent_ld, args.pilot)
    h_dat, t_dat = pyro_tune(seed + 1, x0, data_ld, args.pilot)
    out = {}
    for j, (side, ld, init, h) in enumerate((("latent", latent_ld, u0, h_lat), ("data", data_ld, x0, h_dat))):
        pyro.set_rng_seed(seed + 2 + j)
        t0 = time.perf_counter()
        trace, acc = pyro_run_chain(init, h, ld, args.steps)
        if side == "latent":
            with torch.no_grad():
                trace = model.transform()(trace.reshape(-1, 2)).reshape(trace.shape)
        xs = trace.detach().numpy().astype(np.float64)
        wall = time.perf_counter() - t0
        res = diagnose(xs[:, args.steps // 2:], centres_np, args.superchain)
        res.update(step_size=h, acceptance=acc, wall=wall, trace=xs)
        out[side] = res
    out["tuning"] = {"latent": t_lat, "data": t_dat}
    return out


def pyro_main(args):
    import pyro
    import torch

    from tilted_priors.models.pyro import ntebm as ntebm_pyro

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out_dir = args.out or tempfile.mkdtemp(prefix="mixing-")
    os.makedirs(out_dir, exist_ok=True)
    centres_np = toy_mixture_centres("ring", modes=8, radius=args.radius)
    centres = torch.tensor(centres_np, dtype=torch.float32)
    data = torch.tensor(toy_mixture(args.flow_data, "ring", seed=args.seed, radius=args.radius, sd=args.sd),
                        dtype=torch.float32)
    held_out = toy_mixture(20000, "ring", seed=args.seed + 10_000, radius=args.radius, sd=args.sd)
    t0 = time.perf_counter()
    pyro.clear_param_store()
    model = pyro_build(args)
    # maximum likelihood on ring samples only (nothing from the chains feeds back into the flow)
    nll = pyro_fit_flow(model, data, args)
    with torch.no_grad():
        test_nll = -float(model.flow_dist().log_prob(torch.tensor(held_out, dtype=torch.float32)).mean())
    ref_nll = -float(np.mean(toy_mixture_log_density_np(held_out, args)))
    print(f"flow fit (Pyro: {args.flow_layers} spline autoregressive layers, {args.flow_bins} bins on "
          f"[-{args.flow_bound:g}, {args.flow_bound:g}], MADE width {args.flow_hidden}, {args.flow_steps} steps, "
          f"{args.flow_data} points): train NLL {np.mean(nll[:20]):.3f} -> {np.mean(nll[-200:]):.3f}; held-out NLL "
          f"{test_nll:.3f} nats vs {ref_nll:.3f} for the true density (gap {test_nll - ref_nll:.3f}), "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    results = {}
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for i, target in enumerate(targets):
        t1 = time.perf_counter()
        if target == "trained":
            for p_ in model.energy.parameters():
                p_.requires_grad_(True)
            hist = ntebm_pyro.fit_energy(model, data, args.energy_steps,
                                         chain_steps=ntebm_pyro.REFERENCE["chain_steps"],
                                         step_size=ntebm_pyro.REFERENCE["step_size"],
                                         lr=ntebm_pyro.REFERENCE["energy_lr"], reg=0.01, seed=args.seed)
            for p_ in model.energy.parameters():
                p_.requires_grad_(False)
            print(f"energy fit: contrastive loss {np.mean(hist[:10]):.3f} -> {np.mean(hist[-10:]):.3f}")
        elif target != "exact":
            raise SystemExit(f"unknown target {target!r}")
        lat, dat = pyro_targets(target, model, centres, args.sd, args.chains)
        results[target] = pyro_compare(args.seed + 100 * i, model, lat, dat, args, centres_np)
        print(f"{target}: {time.perf_counter() - t1:.0f} s; tuning (step, acceptance): "
              + "; ".join(f"{s}: " + ", ".join(f"{h:g}:{a:.2f}" for h, a in results[target]['tuning'][s])
                          for s in ("latent", "data")))
        for side in ("latent", "data"):
            print(f"  {side} mode frequencies: {np.round(results[target][side]['freq'], 3).tolist()}, "
                  f"chain wall time {results[target][side]['wall']:.1f} s", flush=True)
    _report(results, centres_np, out_dir, args, t_start)


def toy_mixture_log_density_np(x, args):
    from tilted_priors.models.data import toy_mixture_log_density
    return toy_mixture_log_density(x, "ring", radius=args.radius, sd=args.sd)


if __name__ == "__main__":
    main()
