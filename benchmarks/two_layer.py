"""A two-layer generator on MNIST-5k with a joint energy-based prior over both layers (Cui et al. 2023, at CPU scale).

One NumPyro program, written with ordinary Gaussian priors,

    z2 ~ N(0, I_4),   z1 | z2 ~ N(A z2 + a, I_8),   x | z1 ~ N(G(z1), 0.3^2 I_784)   (one per digit, in a plate),

is learned three ways without editing it, by the ``tilt`` effect handler:

- ``gaussian``: the model as written;
- ``independent``: each layer tilted by its own energy, ``tilt(tilt(model, E1, "z1"), E2, "z2")``;
- ``joint``: one energy over both layers, ``tilt(model, E, ["z2", "z1"])`` (the joint latent-space EBM prior).

All three are trained the same way (LEBM): posterior draws by ``ShortRunPosterior`` (short-run Langevin, step size
``"auto"``) and the energies' maximum-likelihood gradient from the default ``Contrastive`` normalizer's prior
chains, with ``fit`` (Adam, energies at ``--lr-energy``, the rest at ``--lr``), from the same initial weights and
minibatches. On held-out digits the script reports: the posterior reconstruction error; how well the prior matches
the aggregate posterior in latent space (energy distance between prior draws of ``(z2, z1)`` and posterior draws
on the test digits, smaller is better: what an energy-based prior is for); and the energy distance between
generated and test images (pixel space). Energy distances use ``tilted_priors.inference.diagnostics``.

Run: ``.venv/bin/python benchmarks/two_layer.py`` (``--quick`` for a smoke run of seconds).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from flax import nnx  # noqa: E402
from numpyro import handlers  # noqa: E402

from tilted_priors.inference.diagnostics import energy_distance  # noqa: E402
from tilted_priors.inference.numpyro import ShortRunPosterior, fit, register_module  # noqa: E402
from tilted_priors.inference.numpyro.handlers import tilt  # noqa: E402
from tilted_priors.models.data import load_mnist  # noqa: E402
from tilted_priors.numpyro import EnergyMLP  # noqa: E402

D2, D1, NOISE = 4, 8, 0.3


class Generator(nnx.Module):
    """z1 (8) -> 256 -> 784 pixels in [-1, 1]."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(D1, 256, rngs=rngs)
        self.out = nnx.Linear(256, 784, rngs=rngs)

    def __call__(self, z):
        return jnp.tanh(self.out(jax.nn.gelu(self.hidden(z))))


def make_model(seed: int):
    layer = nnx.Linear(D2, D1, rngs=nnx.Rngs(seed))
    generator = Generator(nnx.Rngs(seed + 1))

    def model(x=None, num_data=None):
        A, G = register_module("layer", layer), register_module("generator", generator)
        with numpyro.plate("data", x.shape[0] if x is not None else num_data):
            z2 = numpyro.sample("z2", dist.Normal(0.0, 1.0).expand([D2]).to_event(1))
            z1 = numpyro.sample("z1", dist.Normal(A(z2), 1.0).to_event(1))
            numpyro.sample("x", dist.Normal(G(z1), NOISE).to_event(1), obs=x)

    return model


def tilted(kind: str, model, seed: int, hidden: int):
    if kind == "gaussian":
        return model
    if kind == "independent":
        inner = tilt(model, EnergyMLP(D1, hidden, rngs=nnx.Rngs(seed + 2)), "z1")
        return tilt(inner, EnergyMLP(D2, hidden, rngs=nnx.Rngs(seed + 3)), "z2")
    return tilt(model, EnergyMLP(D2 + D1, hidden, rngs=nnx.Rngs(seed + 2)), ["z2", "z1"])


def evaluate(result, x_test: np.ndarray, key, num_prior: int) -> dict:
    k_post, k_prior = jax.random.split(key)
    x = jnp.asarray(x_test)
    post = handlers.trace(handlers.seed(result.guide, k_post)).get_trace(x)
    z_post = np.concatenate([np.asarray(post["z2"]["value"]), np.asarray(post["z1"]["value"])], -1)
    prior = handlers.trace(handlers.seed(result.model, k_prior)).get_trace(num_data=num_prior)
    z_prior = np.concatenate([np.asarray(prior["z2"]["value"]), np.asarray(prior["z1"]["value"])], -1)
    generated = np.asarray(prior["x"]["fn"].mean)
    recon = handlers.trace(handlers.condition(handlers.seed(result.model, k_post),
                                              data={"z1": post["z1"]["value"], "z2": post["z2"]["value"]}))
    recon_mean = np.asarray(recon.get_trace(x)["x"]["fn"].mean)
    return {"recon_mse": float(np.mean((recon_mean - x_test) ** 2)),
            "latent_ed": energy_distance(z_prior, z_post, num_permutations=0, max_points=1000).statistic,
            "pixel_ed": energy_distance(generated, x_test, num_permutations=0, max_points=500).statistic}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-energy", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--posterior-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=["gaussian", "independent", "joint"])
    p.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.num_train, args.num_test, args.epochs, args.hidden, args.posterior_steps = 100, 50, 1, 16, 3
    x_train = load_mnist("train").reshape(-1, 784)[:args.num_train]
    x_test = load_mnist("test").reshape(-1, 784)[:args.num_test]
    print(f"MNIST-5k: {len(x_train)} training / {len(x_test)} test digits in [-1, 1]; {args.epochs} epochs, batch "
          f"{args.batch_size}, Adam lr {args.lr} (energies {args.lr_energy}), posterior {args.posterior_steps} "
          f"steps 'auto', prior chains: the default ShortRunLangevin(60, 'auto'); jax {jax.__version__}, "
          f"numpyro {numpyro.__version__}, seed {args.seed}\n")
    rows = []
    for kind in args.kinds:
        model = tilted(kind, make_model(args.seed), args.seed, args.hidden)
        guide = ShortRunPosterior(model, steps=args.posterior_steps)
        start = time.perf_counter()
        result = fit(model, guide, x_train, epochs=args.epochs, batch_size=min(args.batch_size, len(x_train)),
                     lr=args.lr if kind == "gaussian" else {"energy": args.lr_energy, "": args.lr}, seed=args.seed,
                     progress=False)
        seconds = time.perf_counter() - start
        metrics = evaluate(result, x_test, jax.random.PRNGKey(args.seed + 10), num_prior=len(x_test))
        rows.append((kind, seconds, float(np.mean(result.losses[-10:])), metrics))
        print(f"  {kind}: {seconds:.0f} s", flush=True)
    print("\n| prior | train (s) | final loss | recon. MSE | latent energy distance (prior vs posterior) "
          "| pixel energy distance (samples vs test) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, seconds, loss, m in rows:
        print(f"| {kind} | {seconds:.0f} | {loss:.1f} | {m['recon_mse']:.4f} | {m['latent_ed']:.4f} | "
              f"{m['pixel_ed']:.3f} |")


if __name__ == "__main__":
    main()
