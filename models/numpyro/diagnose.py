"""The NumPyro side of ``python -m tilted_priors diagnose``: MALA's acceptance for the step search, the prior
sampler's coupling bound, posterior chains and the posterior's scores.

See :mod:`tilted_priors.models.diagnose` for what the report compares.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

from tilted_priors.inference.diagnostics import CouplingBound
from tilted_priors.inference.numpyro import Langevin, ShortRunPosterior, coupling_bound, stein_scores
from tilted_priors.inference.numpyro.handlers import normalizer
from tilted_priors.numpyro import MALA, Unnormalized

__all__ = ["mala_acceptance", "prior_coupling", "posterior_draws", "posterior_scores", "MALA"]


def mala_acceptance(log_density, starts: np.ndarray, step_size: float, steps: int = 100, seed: int = 0) -> float:
    """Mean acceptance probability of ``steps`` MALA steps of size ``step_size`` from ``starts``."""
    _, info = MALA(steps, step_size).run(jax.random.PRNGKey(seed), log_density, jnp.asarray(starts),
                                         return_info=True)
    return float(info.acceptance_rate.mean())


def prior_coupling(sampler, log_density, starts: np.ndarray, *, lag: int, max_steps: int,
                   seed: int = 0) -> CouplingBound:
    """The L-lag coupling bound of ``sampler`` (a ``Persistent``'s inner sampler) from the points ``starts``."""
    return coupling_bound(jax.random.PRNGKey(seed), getattr(sampler, "sampler", sampler), log_density,
                          jnp.asarray(starts), lag=lag, max_steps=max_steps)


def posterior_scores(lvm, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    r"""The posterior scores :math:`\nabla_z \log p(z \mid x_k)` at draws ``z`` ``(..., K, d)`` of the images
    ``x`` ``(K, H, W, C)``: the gradient of :math:`\log \mathcal N(x_k; g(z), \sigma^2) - E(z) + \log
    \mathcal N(z; 0, I)` (unnormalised; the prior's :math:`\log Z` is constant in :math:`z`)."""
    images = jnp.asarray(x)
    prior = lvm.prior(())
    prior_lp = getattr(prior, "log_tilted", prior.log_prob)

    def log_density(zz):
        mean = lvm.decode(zz.reshape(-1, zz.shape[-1])).reshape(zz.shape[:-1] + images.shape[1:])
        return dist.Normal(mean, lvm.likelihood_sd).to_event(3).log_prob(images) + prior_lp(zz)

    return stein_scores(log_density, jnp.asarray(z, dtype=images.dtype))


def posterior_draws(lvm, x: np.ndarray, *, short_chains: int, steps: int, step_size: float, num_chains: int,
                    num_warmup: int, num_samples: int, max_tree_depth: int, seed: int = 0,
                    on_method: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Posterior draws of ``z`` for the images ``x`` ``(K, H, W, C)`` by three methods, ``(chain, draw, K, d)``:
    the short-run guide (``short_chains`` independent chains, one draw each), MALA and NUTS (the backend's own
    ``MCMC``, ``num_chains`` chains each, without NumPyro's progress bar). ``on_method(name)``, when given, is
    called before each method runs (for a progress bar)."""
    announce = on_method if on_method is not None else (lambda name: None)
    k_guide, k_mala, k_nuts = jax.random.split(jax.random.PRNGKey(seed), 3)
    guide = ShortRunPosterior(lvm.model, steps=steps, step_size=step_size)
    images = jnp.asarray(x)
    k, d = images.shape[0], lvm.latent_dim
    announce("short-run guide")
    z = handlers.seed(guide, k_guide)(jnp.tile(images, (short_chains, 1, 1, 1)))["z"]
    draws = {"short-run guide": np.asarray(z).reshape(short_chains, 1, k, d)}
    kernels = {"MALA": (Langevin(lvm.model, step_size=0.05), k_mala),
               # Without its normalizer term (constant in z; the contrastive one would draw prior samples).
               "NUTS": (NUTS(normalizer(lvm.model, Unnormalized()), max_tree_depth=max_tree_depth), k_nuts)}
    for name, (kernel, key) in kernels.items():
        announce(name)
        mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                    chain_method="sequential", progress_bar=False)
        mcmc.run(key, images)
        draws[name] = np.asarray(mcmc.get_samples(group_by_chain=True)["z"])
    return draws
