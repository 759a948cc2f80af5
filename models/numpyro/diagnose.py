"""The NumPyro side of ``python -m models diagnose``: prior log density, MALA step search, posterior chains.

See :mod:`models.diagnose` for what the report compares.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

from inference.numpyro import Langevin, ShortRunPosterior
from inference.numpyro.handlers import normalizer
from tilted_priors.numpyro import MALA, ShortRunLangevin, Unnormalized

__all__ = ["prior_log_density", "prior_sampler", "tune_mala", "posterior_draws", "MALA", "ShortRunLangevin"]


def prior_log_density(lvm):
    """The trained prior's unnormalised log density :math:`-E(z) + \\log\\mathcal N(z)` (a pytree callable)."""
    return lvm.prior(()).annealed_log_density(1.0)


def prior_sampler(lvm):
    """The sampler the trained prior draws with (LEBM's 60 x 0.4 unless the model set another)."""
    return lvm.prior(()).sampler


def tune_mala(log_density, starts: np.ndarray, seed: int = 0, steps: int = 100,
              candidates=(1.0, 0.5, 0.25, 0.12, 0.06, 0.03, 0.015)) -> float:
    """The largest MALA step size among ``candidates`` whose mean acceptance over ``steps`` steps is >= 0.5."""
    key = jax.random.PRNGKey(seed)
    x = jnp.asarray(starts)
    for h in candidates:
        key, sub = jax.random.split(key)
        _, info = MALA(steps, h).run(sub, log_density, x, return_info=True)
        if float(info.acceptance_rate.mean()) >= 0.5:
            return h
    return candidates[-1]


def posterior_draws(lvm, x: np.ndarray, *, short_chains: int, steps: int, step_size: float, num_chains: int,
                    num_warmup: int, num_samples: int, max_tree_depth: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Posterior draws of ``z`` for the images ``x`` ``(K, H, W, C)`` by three methods, ``(chain, draw, K, d)``:
    the short-run guide (``short_chains`` independent chains, one draw each), MALA and NUTS (the backend's own
    ``MCMC``, ``num_chains`` chains each)."""
    k_guide, k_mala, k_nuts = jax.random.split(jax.random.PRNGKey(seed), 3)
    guide = ShortRunPosterior(lvm.model, steps=steps, step_size=step_size)
    images = jnp.asarray(x)
    k, d = images.shape[0], lvm.latent_dim
    z = handlers.seed(guide, k_guide)(jnp.tile(images, (short_chains, 1, 1, 1)))["z"]
    draws = {"short-run guide": np.asarray(z).reshape(short_chains, 1, k, d)}
    kernels = {"MALA": (Langevin(lvm.model, step_size=0.05), k_mala),
               # Without its normalizer term (constant in z; the contrastive one would draw prior samples).
               "NUTS": (NUTS(normalizer(Unnormalized(), lvm.model), max_tree_depth=max_tree_depth), k_nuts)}
    for name, (kernel, key) in kernels.items():
        mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                    chain_method="sequential", progress_bar=False)
        mcmc.run(key, images)
        draws[name] = np.asarray(mcmc.get_samples(group_by_chain=True)["z"])
    return draws
