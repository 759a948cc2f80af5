r"""The step-size machinery of the samplers' chains (torch), used by :mod:`tilted_priors.pyro.samplers`: the probe
of the gradient's Lipschitz constant and the initial step of the adaptive chain (``step_size="auto"``, the rule of
:mod:`tilted_priors._adapt`). The loops themselves are the samplers' own Python loops, one step at a time.
"""
from __future__ import annotations

import math

import torch

from tilted_priors import _adapt
from tilted_priors.pyro import langevin

__all__ = ["lipschitz", "initial_step"]


def _spread(z: torch.Tensor) -> torch.Tensor:
    """The chains' spread: root mean over dimensions of the variance over chains (0 for a single chain)."""
    flat = z.reshape(-1, z.shape[-1])
    return flat.var(0, unbiased=False).mean().sqrt() if flat.shape[0] > 1 else z.new_zeros(())


def lipschitz(log_density, state: langevin.LangevinState) -> torch.Tensor:
    r"""The largest ratio :math:`\|\nabla\log\pi(z+\delta) - \nabla\log\pi(z)\| / \|\delta\|` over the chains.

    Two power-iteration probes per chain (the second :math:`\delta` along the first gradient difference, so the
    ratio approaches the largest curvature), :math:`\|\delta\|` a hundredth of the chains' spread (see
    :mod:`tilted_priors._adapt`). Chains whose probe is not finite are left out; 0 when none is finite.
    """
    z, grad = state.position, state.logdensity_grad
    spread, rms = _spread(z), z.square().mean().sqrt()
    radius = _adapt.PROBE_RADIUS * torch.maximum(torch.where(spread > 0, spread, 1.0 + rms), 1e-3 * rms)
    delta = radius * torch.randn_like(z)
    best = z.new_zeros(())
    for _ in range(2):
        moved = z + delta
        _, new_grad = langevin.value_and_grad(log_density, moved)
        diff = new_grad - grad
        norm_diff = diff.norm(dim=-1)
        ratio = norm_diff / (moved - z).norm(dim=-1)
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))
        best = torch.maximum(best, ratio.max() if ratio.numel() else best)
        scale = radius * math.sqrt(z.shape[-1]) / norm_diff
        ok = (torch.isfinite(scale) & (norm_diff > 0)).unsqueeze(-1)
        delta = torch.where(ok, diff * scale.unsqueeze(-1), delta)
    return best


def initial_step(lipschitz: torch.Tensor, init: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log h0, log cap)`` of the adaptive chain: ``h0 = 1/sqrt(L)``, ``cap = c/sqrt(L)`` (see ``_adapt``)."""
    spread = _spread(init)
    fallback = torch.where(spread > 0, spread, torch.ones_like(spread))
    known = torch.isfinite(lipschitz) & (lipschitz > 0)
    safe = torch.where(known, lipschitz, torch.ones_like(lipschitz))
    log_h0 = torch.where(known, -0.5 * safe.log(), fallback.log())
    log_cap = torch.where(known, math.log(_adapt.STABILITY_CAP[kind]) - 0.5 * safe.log(),
                          torch.full_like(safe, math.inf))
    log_h0 = torch.minimum(log_h0, log_cap)
    return log_h0, log_cap
