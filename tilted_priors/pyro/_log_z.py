r"""Estimators of :math:`\log Z` for evaluation (torch / Pyro): :class:`Importance`, :class:`AnnealedImportance`
and the :class:`LogZEstimate` they return, with the importance weights and proposal checks that
:class:`~tilted_priors.pyro.normalizers.SelfNormalized` shares.

Import the normalizers and :class:`LogZEstimate` from :mod:`tilted_priors.pyro.normalizers` (or
:mod:`tilted_priors.pyro`), which re-exports them; this module holds their code.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tilted_priors._sir import check_tilted
from tilted_priors._validation import check_positive_int, check_proposal_shapes, check_protocol, describe
from tilted_priors.pyro.samplers import MALA
from tilted_priors.schedules import annealing_betas

__all__ = ["LogZEstimate", "log_mean_exp_with_error", "Importance", "AnnealedImportance", "check_proposal",
           "per_element", "importance_log_weights"]


class LogZEstimate(NamedTuple):
    r"""An estimate of :math:`\log Z` (batch-shaped), its delta-method standard error and the weights' ESS."""

    log_z: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor


def log_mean_exp_with_error(log_w: torch.Tensor) -> LogZEstimate:
    r""":math:`\log \frac1N\sum_i e^{\ell_i}` over dim 0, with standard error :math:`\mathrm{sd}(w)/(\sqrt N \bar w)`.

    Examples
    --------
    >>> est = log_mean_exp_with_error(torch.zeros(10))
    >>> float(est.log_z), float(est.stderr), float(est.ess)
    (0.0, 0.0, 10.0)
    """
    n = log_w.shape[0]
    log_z = torch.logsumexp(log_w, 0) - math.log(n)
    w = torch.exp(log_w - log_w.max(0).values)
    mean = w.mean(0)
    stderr = w.std(0, correction=1) / (math.sqrt(n) * mean) if n > 1 else torch.full_like(mean, math.inf)
    ess = w.sum(0) ** 2 / (w * w).sum(0)
    return LogZEstimate(log_z, stderr, ess)


def check_proposal(proposal):
    """``proposal`` if it is ``None`` or a torch distribution, else a ``TypeError`` (its shapes are checked
    against the tilted distribution's at first use, :func:`importance_log_weights`)."""
    if proposal is None or isinstance(proposal, torch.distributions.Distribution):
        return proposal
    raise TypeError(f"proposal must be a torch/Pyro distribution over the tilted distribution's vectors z, e.g. "
                    f"dist.Normal(loc, scale).to_event(1), or None (the base); got {describe(proposal)} "
                    f"({type(proposal).__name__})")


def per_element(num_samples: int, batch_shape: torch.Size) -> int:
    """Draws per batch element when ``num_samples`` draws in all are shared out over ``batch_shape`` (at least one)."""
    return max(1, math.ceil(num_samples / max(1, batch_shape.numel())))


def importance_log_weights(dist, n: int, proposal) -> torch.Tensor:
    """Log weights :math:`e^{-E(z)} q(z) / r(z)` of ``n`` draws per batch element from ``r`` (the base if None)."""
    if proposal is None:
        z = dist.base.rsample((n,)) if dist.base.has_rsample else dist.base.sample((n,))
        return -dist._energy(z)
    check_proposal_shapes(tuple(proposal.batch_shape), tuple(proposal.event_shape), tuple(dist.batch_shape),
                          tuple(dist.event_shape))
    z = proposal.rsample((n,)) if proposal.has_rsample else proposal.sample((n,))
    return dist.log_tilted(z) - proposal.log_prob(z)


class Importance:
    r"""Importance-sampling estimate of :math:`\log Z` from the base (evaluation).

    .. math:: \text{term} = \log \frac1n \sum_{i=1}^n e^{-E(z_i)}, \qquad z_i \sim q,

    with ``num_samples`` draws per row (batch element), so a conditional density (``context``) gets its
    :math:`\log Z(x)` row by row. ``log_prob`` is then an **estimate** of the normalised log
    density (consistent; :math:`\log\hat Z` is biased low by about :math:`\mathrm{se}^2/2`, so ``log_prob`` is
    biased high by that). Gradients flow through the estimate. :meth:`estimate` adds the standard error.

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), torch.zeros(1), torch.ones(1))
    >>> est = Importance(20000).estimate(d)   # exact: -log(3) / 2 = -0.549
    >>> abs(float(est.log_z) + 0.549) < 4 * float(est.stderr)
    True
    """

    def __init__(self, num_samples: int, proposal=None):
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.proposal = check_proposal(proposal)

    def estimate(self, dist) -> LogZEstimate:
        """:math:`\\log\\hat Z` per batch element with its standard error and ESS."""
        check_tilted(dist, "Importance.estimate")
        return log_mean_exp_with_error(importance_log_weights(dist, self.num_samples, self.proposal))

    def term(self, dist) -> torch.Tensor:
        return self.estimate(dist).log_z

    def __repr__(self) -> str:
        return f"Importance(num_samples={self.num_samples})"


class AnnealedImportance:
    r"""Annealed importance sampling (Neal 2001) of :math:`\log Z`, from the base to the tilted prior (evaluation).

    Along :math:`\pi_t \propto e^{-\beta_t E} q` (:func:`~tilted_priors.annealing_betas`), with
    :math:`z_0 \sim q` and :math:`z_t` moved by ``kernel`` targeting :math:`\pi_t`,

    .. math:: \log w = \sum_{t=1}^{T} -(\beta_t - \beta_{t-1})\, E(z_{t-1}), \qquad
              \text{term} = \log \frac1N \sum_{j=1}^N w_j .

    :math:`\mathbb E[w] = Z` exactly when ``kernel`` leaves each :math:`\pi_t` invariant (MALA does; ULA does
    not), so ``log_prob`` is an **estimate** of the normalised log density, :math:`\log\hat Z` biased low (so
    ``log_prob`` high) by about half its variance. Detached: no gradients. :meth:`estimate` gives the standard
    error (delta method over the chains' weights) and the weights' ESS.

    Parameters
    ----------
    num_chains : int
        Independent annealing chains per row (batch element): a conditional density (``context``) gets its
        :math:`\log Z(x)` row by row.
    num_steps : int
        Number of temperatures :math:`T`.
    kernel : sampler, optional
        Run at each temperature; default ``MALA(steps=2, step_size=0.5)``.
    schedule : {"sigmoid", "linear"}
        Spacing of :math:`\beta`.

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), torch.zeros(1), torch.ones(1))
    >>> est = AnnealedImportance(500, 50).estimate(d)   # exact: -0.549
    >>> abs(float(est.log_z) + 0.549) < 4 * float(est.stderr)
    True
    """

    def __init__(self, num_chains: int, num_steps: int, kernel=None, schedule: str = "sigmoid"):
        self.num_chains = check_positive_int("num_chains", num_chains)
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.kernel = MALA(steps=2, step_size=0.5) if kernel is None else check_protocol(
            kernel, "kernel", "run", "MALA(steps=2, step_size=0.5)")
        self.betas = annealing_betas(self.num_steps, schedule).tolist()

    def estimate(self, dist) -> LogZEstimate:
        """:math:`\\log\\hat Z` per batch element with its standard error and the weights' ESS."""
        check_tilted(dist, "AnnealedImportance.estimate")
        with torch.no_grad():
            z = dist.base.sample((self.num_chains,))
            log_w = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
            for t in range(1, len(self.betas)):
                log_w = log_w - (self.betas[t] - self.betas[t - 1]) * dist._energy(z)
                if t < len(self.betas) - 1:
                    z = self.kernel.run(dist.annealed_log_density(self.betas[t]), z)
        return log_mean_exp_with_error(log_w)

    def term(self, dist) -> torch.Tensor:
        return self.estimate(dist).log_z

    def __repr__(self) -> str:
        return f"AnnealedImportance(num_chains={self.num_chains}, num_steps={self.num_steps}, kernel={self.kernel!r})"
