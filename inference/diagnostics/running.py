r"""Running the samplers of either backend for the diagnostics: trajectories recorded along a run, and the
scores :math:`\nabla\log\pi` of the states they reach (for the kernel Stein discrepancy), with the backend's own
arrays and autodiff. A sampler's backend is read from its module (``tilted_priors.pyro`` / ``tilted_priors.numpyro``);
anything else with ``steps`` and ``run(log_density, init)`` runs on numpy arrays.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np

from tilted_priors._validation import check_positive_int
from tilted_priors.inference.diagnostics.arrays import to_numpy

__all__ = ["trajectory", "sampler_backend", "with_steps", "scores_along"]


def with_steps(sampler, steps: int):
    """A copy of ``sampler`` that runs ``steps`` steps (the samplers are immutable settings objects)."""
    new = copy.copy(sampler)
    object.__setattr__(new, "steps", steps)
    if isinstance(getattr(new, "unroll", None), int):
        object.__setattr__(new, "unroll", min(new.unroll, steps))
    return new


def sampler_backend(sampler, name: str = "sampler") -> str:
    module = type(sampler).__module__
    if type(sampler).__name__ == "Persistent":
        raise TypeError("short_vs_long runs fresh chains from the given starts: pass the sampler a Persistent "
                        "wraps (its .sampler), not the Persistent itself")
    if isinstance(sampler, type) or not hasattr(sampler, "run") or not hasattr(sampler, "steps"):
        raise TypeError(f"{name} must be a sampler instance with .steps and .run(...) (e.g. MALA(400, 0.8)), got "
                        f"{sampler!r}")
    for name in ("numpyro", "pyro"):
        if f".{name}." in f".{module}.":
            return name
    return "numpy"


def trajectory(sampler, log_density, starts, num_draws: int = 20, seed: int = 0):
    """Run ``sampler`` from ``starts`` ``(chain, d)``, recording ``num_draws`` states along the way.

    The run is cut into ``num_draws`` segments of (nearly) equal length, each a run of the same sampler with
    fewer steps continuing from the last state — for a Markov chain the same process as one long run.
    ``sampler`` is a sampler of either backend (``tilted_priors.pyro`` / ``.numpyro``; its log density and
    arrays are that backend's, randomness from ``seed``) or any object with ``steps`` and
    ``run(log_density, init)`` on numpy arrays.

    Returns
    -------
    steps : ndarray (draw,)
        The step of each recorded state (0 for the start).
    positions : ndarray (chain, draw, d)
    log_densities : ndarray (chain, draw)
        ``log_density`` at each recorded state (unnormalised as given).
    """
    num_draws = check_positive_int("num_draws", num_draws)
    backend = sampler_backend(sampler)
    if not callable(log_density):
        raise TypeError(f"log_density must be a function (..., d) -> (...) on the sampler's arrays, got "
                        f"{type(log_density).__name__}")
    bounds = np.unique(np.linspace(0, sampler.steps, min(num_draws, sampler.steps) + 1).round().astype(int))
    lengths = np.diff(bounds)
    rng = contextlib.nullcontext()
    if backend == "pyro":
        import torch

        x = torch.as_tensor(np.asarray(starts), dtype=torch.get_default_dtype())
        rng = torch.random.fork_rng()  # seeded inside, the global generator left as it was
        run = lambda s, z: s.run(log_density, z)  # noqa: E731
    elif backend == "numpyro":
        import jax
        import jax.numpy as jnp

        def segment_keys(key=jax.random.PRNGKey(seed)):
            while True:
                key, sub = jax.random.split(key)
                yield sub

        x, keys = jnp.asarray(np.asarray(starts)), segment_keys()
        run = lambda s, z: s.run(next(keys), log_density, z)  # noqa: E731
    else:
        x = np.asarray(starts, dtype=float)
        run = lambda s, z: s.run(log_density, z)  # noqa: E731

    def record(z):
        positions.append(np.array(to_numpy(z)))  # a copy: a numpy sampler may move its state in place
        lps.append(to_numpy(log_density(z)))

    positions, lps = [], []
    with rng:
        if backend == "pyro":
            torch.manual_seed(seed)
        record(x)
        for m in lengths:
            x = run(with_steps(sampler, int(m)), x)
            record(x)
    return bounds, np.stack(positions, axis=1), np.stack(lps, axis=1)


def scores_along(backend: str, log_density, positions: np.ndarray, score=None) -> np.ndarray | None:
    r"""The scores :math:`\nabla\log\pi` at ``positions`` ``(..., d)``: from ``score`` (a function on numpy arrays)
    when given, else by the backend's autodiff of ``log_density`` (``stein_scores``); ``None`` for numpy samplers
    without ``score``."""
    positions = np.asarray(positions)
    if score is not None:
        out = np.asarray(score(positions), dtype=float)
        if out.shape != positions.shape:
            raise ValueError(f"score must map points (..., d) to scores of the same shape, got {out.shape} for "
                             f"{positions.shape}")
        return out
    if backend == "pyro":
        import torch

        from tilted_priors.inference.pyro.stein import stein_scores

        return stein_scores(log_density, torch.as_tensor(positions, dtype=torch.get_default_dtype()))
    if backend == "numpyro":
        from tilted_priors.inference.numpyro.stein import stein_scores

        return stein_scores(log_density, positions)
    return None
