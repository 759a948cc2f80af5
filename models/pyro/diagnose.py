"""The Pyro side of ``python -m tilted_priors diagnose``: MALA's acceptance for the step search, the prior
sampler's coupling bound, posterior chains and the posterior's scores.

See :mod:`tilted_priors.models.diagnose` for what the report compares.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from tilted_priors.inference.diagnostics import CouplingBound
from tilted_priors.inference.pyro import Langevin, ShortRunPosterior, coupling_bound, stein_scores
from tilted_priors.inference.pyro.handlers import normalizer
from tilted_priors.pyro import MALA, Unnormalized

__all__ = ["mala_acceptance", "prior_coupling", "posterior_draws", "posterior_scores", "MALA"]


def mala_acceptance(log_density, starts: np.ndarray, step_size: float, steps: int = 100, seed: int = 0) -> float:
    """Mean acceptance probability of ``steps`` MALA steps of size ``step_size`` from ``starts``."""
    pyro.set_rng_seed(seed)
    x = torch.as_tensor(starts, dtype=torch.get_default_dtype())
    _, info = MALA(steps, step_size).run(log_density, x, return_info=True)
    return float(info.acceptance_rate.mean())


def prior_coupling(sampler, log_density, starts: np.ndarray, *, lag: int, max_steps: int,
                   seed: int = 0) -> CouplingBound:
    """The L-lag coupling bound of ``sampler`` (a ``Persistent``'s inner sampler) from the points ``starts``."""
    pyro.set_rng_seed(seed)
    x = torch.as_tensor(starts, dtype=torch.get_default_dtype())
    return coupling_bound(getattr(sampler, "sampler", sampler), log_density, x, lag=lag, max_steps=max_steps)


def posterior_scores(lvm, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    r"""The posterior scores :math:`\nabla_z \log p(z \mid x_k)` at draws ``z`` ``(..., K, d)`` of the images
    ``x`` ``(K, H, W, C)``: the gradient of :math:`\log \mathcal N(x_k; g(z), \sigma^2) - E(z) + \log
    \mathcal N(z; 0, I)` (unnormalised; the prior's :math:`\log Z` is constant in :math:`z`)."""
    images = torch.as_tensor(x, dtype=torch.get_default_dtype())
    prior = lvm.prior(())
    prior_lp = getattr(prior, "log_tilted", prior.log_prob)

    def log_density(zz):
        mean = lvm.decode(zz.reshape(-1, zz.shape[-1])).reshape(*zz.shape[:-1], *images.shape[1:])
        return dist.Normal(mean, lvm.likelihood_sd).to_event(3).log_prob(images) + prior_lp(zz)

    return stein_scores(log_density, torch.as_tensor(z, dtype=images.dtype))


def posterior_draws(lvm, x: np.ndarray, *, short_chains: int, steps: int, step_size: float, num_chains: int,
                    num_warmup: int, num_samples: int, max_tree_depth: int, seed: int = 0,
                    on_method: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Posterior draws of ``z`` for the images ``x`` ``(K, H, W, C)`` by three methods, ``(chain, draw, K, d)``:
    the short-run guide (``short_chains`` independent chains, one draw each), MALA and NUTS (the backend's own
    ``MCMC``, ``num_chains`` chains each, run one after another, without Pyro's progress bar). ``on_method(name)``,
    when given, is called before each method runs (for a progress bar)."""
    announce = on_method if on_method is not None else (lambda name: None)
    pyro.set_rng_seed(seed)
    images = torch.as_tensor(x, dtype=torch.get_default_dtype())
    k, d = images.shape[0], lvm.latent_dim
    guide = ShortRunPosterior(lvm.model, steps=steps, step_size=step_size)
    announce("short-run guide")
    z = guide(images.repeat(short_chains, 1, 1, 1))["z"].detach()
    draws = {"short-run guide": z.numpy().reshape(short_chains, 1, k, d)}
    kernels = {"MALA": lambda: Langevin(lvm.model, step_size=0.05),
               # Without its normalizer term: the contrastive term would draw prior samples at every gradient.
               "NUTS": lambda: NUTS(normalizer(lvm.model, Unnormalized()), max_tree_depth=max_tree_depth)}
    for name, kernel in kernels.items():
        announce(name)
        chains = []
        for _ in range(num_chains):  # in this process, with a fresh kernel each (Pyro's kernels keep their set-up)
            mcmc = MCMC(kernel(), num_samples=num_samples, warmup_steps=num_warmup, num_chains=1,
                        disable_progbar=True)
            mcmc.run(images)
            chains.append(mcmc.get_samples()["z"].detach().numpy())
        draws[name] = np.stack(chains)
    return draws
