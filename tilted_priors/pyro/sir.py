r"""Sampling-importance-resampling (SIR) from a tilted distribution's base (torch).

For each output draw, :class:`SIR` draws :math:`K` proposals from the base :math:`q`, weights them by
:math:`w_k = e^{-E(y_k)}` (the density ratio :math:`p / q` up to :math:`Z`) and returns one of them, picked with
probability :math:`w_k / \sum_j w_j`. No step size and no chain: the draws are independent, and their law tends to
the tilted density as :math:`K` grows (it is :math:`q` at :math:`K = 1`; the bias of an expectation is
:math:`O(1/K)`).

A sampler normally exposes only ``run(log_density, init)``, which gives no access to the base. SIR implements the
optional protocol method ``sample_tilted(dist, sample_shape)``, which
:meth:`~tilted_priors.pyro.EnergyTilted.sample_with` calls when a sampler has it; so SIR works as a
distribution's ``sampler=``, inside :class:`~tilted_priors.pyro.Contrastive` and with the
:func:`~tilted_priors.inference.pyro.handlers.sampler` handler. ``run`` raises ``TypeError``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tilted_priors._sir import bad_weights_message, check_tilted, needs_base_message
from tilted_priors._validation import check_positive_int, check_sample_shape

__all__ = ["SIR", "SIRInfo"]


class SIRInfo(NamedTuple):
    r"""Per output draw: the effective sample size of its :math:`K` weights, :math:`(\sum_k w_k)^2 / \sum_k w_k^2`
    (between 1 and :math:`K`), and :math:`\log \frac1K \sum_k w_k`, an importance estimate of :math:`\log Z`."""

    ess: torch.Tensor
    log_z: torch.Tensor


class SIR:
    r"""Sampling-importance-resampling from the base: :math:`K` = ``num_proposals`` base draws per output draw,
    one kept with probability proportional to :math:`e^{-E}`.

    .. math:: y_1, \dots, y_K \sim q, \qquad z = y_k \text{ with probability } \frac{e^{-E(y_k)}}{\sum_j e^{-E(y_j)}}

    Exact as :math:`K \to \infty` (the draws are :math:`q` at :math:`K = 1`), with no step size; good when the
    tilted density is close to its base (a resampling ESS, :attr:`SIRInfo.ess`, that is a sizeable fraction of
    :math:`K`), hopeless when the energy concentrates the mass where the base rarely goes. Costs :math:`K` energy
    evaluations per draw, all in one batch. Draws are detached (no gradients).

    Parameters
    ----------
    num_proposals : int
        :math:`K`, base draws per output draw.

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), torch.zeros(2), torch.ones(2), sampler=SIR(500))
    >>> v = d.sample((2000,)).var(0)   # exact: 1/3
    >>> bool(((v - 1 / 3).abs() < 0.05).all())
    True
    """

    def __init__(self, num_proposals: int = 1000):
        self.num_proposals = check_positive_int("num_proposals", num_proposals)

    def run(self, log_density, init: torch.Tensor, *, return_info: bool = False):
        """Not available: raises ``TypeError`` (SIR needs the distribution's base; see :meth:`sample_tilted`)."""
        raise TypeError(needs_base_message("run(log_density, init)"))

    def sample_tilted(self, dist, sample_shape=torch.Size(), *, return_info: bool = False):
        """Draw ``sample_shape + batch_shape + event_shape`` samples from the tilted distribution ``dist``.

        Parameters
        ----------
        dist : EnergyTilted
            The distribution (its ``base`` and energy are used).
        sample_shape : torch.Size
            Leading shape of the draws.
        return_info : bool
            Also return a :class:`SIRInfo` (shape ``sample_shape + batch_shape``).

        Raises
        ------
        FloatingPointError
            When some draw's weights are unusable (a ``nan`` or ``-inf`` energy, or ``+inf`` at all proposals).

        Examples
        --------
        >>> import torch
        >>> from tilted_priors.pyro import EnergyTiltedNormal
        >>> d = EnergyTiltedNormal(lambda z: 0.0 * z.sum(-1), torch.zeros(3), torch.ones(3))
        >>> z, info = SIR(50).sample_tilted(d, (4,), return_info=True)   # E = 0: all weights equal
        >>> z.shape, info.ess.round()
        (torch.Size([4, 3]), tensor([50., 50., 50., 50.]))
        """
        check_tilted(dist, "SIR.sample_tilted")
        sample_shape = torch.Size(check_sample_shape(sample_shape))
        k = self.num_proposals
        with torch.no_grad():
            y = dist.base.sample(torch.Size((k,)) + sample_shape)
            log_w = -dist._energy(y)
            bad = torch.isnan(log_w).any(0) | (log_w == math.inf).any(0) | (log_w == -math.inf).all(0)
            if bool(bad.any()):
                raise FloatingPointError(bad_weights_message(int(bad.sum()), bad.numel(), k))
            index = torch.distributions.Categorical(logits=log_w.movedim(0, -1)).sample()
            z = torch.gather(y, 0, index[None, ..., None].expand((1,) + y.shape[1:]))[0]
            if not return_info:
                return z
            log_sum = torch.logsumexp(log_w, 0)
            info = SIRInfo(torch.exp(2.0 * log_sum - torch.logsumexp(2.0 * log_w, 0)), log_sum - math.log(k))
        return z, info

    def __repr__(self) -> str:
        return f"SIR(num_proposals={self.num_proposals})"
