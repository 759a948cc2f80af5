r"""The parts of the Langevin MCMC kernel (torch), used by :mod:`tilted_priors.inference.pyro.kernels`: the checks of
a given inverse mass matrix, Pyro's warm-up adapter with the kernel's restart of the step-size scheme, the mass
matrix's factors, and the preconditioned proposal.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from pyro.infer.mcmc.adaptation import WarmupAdapter

from tilted_priors.pyro import langevin

__all__ = ["MAX_LOG_RATIO_ERROR", "InverseMassMatrix", "LangevinWarmupAdapter", "check_inverse_mass_matrix",
           "mass_matrix_factors", "preconditioned_proposal"]

#: A step whose Metropolis-Hastings log-ratio is below minus this (or non-finite) is a divergence: the same
#: threshold as Pyro's HMC puts on the energy error (``HMC._max_sliced_energy``).
MAX_LOG_RATIO_ERROR = 1000.0

#: :math:`M^{-1}` as given: one tensor, or a dict ``{tuple of site names: block}``.
InverseMassMatrix = torch.Tensor | dict[tuple[str, ...], torch.Tensor]


class LangevinWarmupAdapter(WarmupAdapter):
    r"""Pyro's windowed warm-up adapter (HMC's), with the step-size scheme restarted at ``log(prox_factor * h)``.

    HMC restarts dual averaging at :math:`\log(10 h)` after each mass-matrix window; MALA does the same, ULA
    (which keeps every trial move) at :math:`\log h`.
    """

    def __init__(self, prox_factor: float, **kwargs):
        super().__init__(**kwargs)
        self._prox_factor = prox_factor

    def reset_step_size_adaptation(self, z: dict[str, torch.Tensor] | None = None) -> None:
        self._step_size_adapt_scheme.prox_center = math.log(self._prox_factor * self.step_size)
        self._step_size_adapt_scheme.reset()


def check_inverse_mass_matrix(value) -> InverseMassMatrix | None:
    """``inverse_mass_matrix`` as tensors (one, or a dict by block of site names), each positive definite."""
    if value is None:
        return None
    if isinstance(value, dict):
        bad = [k for k in value if not (isinstance(k, tuple) and k and all(isinstance(n, str) for n in k))]
        if bad:
            raise ValueError(f"inverse_mass_matrix as a dict must be keyed by tuples of site names (as "
                             f"kernel.inverse_mass_matrix), got the keys {bad}")
        return {k: _check_matrix(v, f"inverse_mass_matrix[{k!r}]") for k, v in value.items()}
    return _check_matrix(value, "inverse_mass_matrix")


def _check_matrix(value, name: str) -> torch.Tensor:
    m = torch.as_tensor(value).detach()
    if not m.is_floating_point():
        m = m.to(torch.get_default_dtype())
    if m.dim() not in (1, 2) or m.dim() == 2 and m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a vector (a diagonal) or a square matrix, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} has non-finite entries")
    if m.dim() == 1 and not bool((m > 0).all()):
        raise ValueError(f"{name} is a diagonal with entries <= 0: an inverse mass matrix is positive definite")
    if m.dim() == 2 and not (torch.allclose(m, m.T) and int(torch.linalg.cholesky_ex(m).info) == 0):
        raise ValueError(f"{name} must be symmetric positive definite (a covariance of the unconstrained latents)")
    return m


def mass_matrix_factors(inverse_mass_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M^-1, L, L^-1)`` for one block: ``M^-1 = L L^T``, ``L`` its Cholesky factor (for a diagonal, the square
    root and its reciprocal)."""
    m = inverse_mass_matrix
    if m.dim() == 1:
        sqrt = m.sqrt()
        return m, sqrt, sqrt.reciprocal()
    chol = torch.linalg.cholesky(m)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return m, chol, torch.linalg.solve_triangular(chol, eye, upper=False)


def _precondition(x: torch.Tensor, which: int, factors: list, block_index: list[torch.Tensor]) -> torch.Tensor:
    """``x`` (flat) times M^-1 (``which=0``), L (1) or L^-1 (2), block by block."""
    out = torch.empty_like(x)
    for index, block in zip(block_index, factors):
        m = block[which]
        out[index] = m * x[index] if m.dim() == 1 else m @ x[index]
    return out


def preconditioned_proposal(current: langevin.LangevinState, log_density: Callable, h: float, factors: list,
                            block_index: list[torch.Tensor]) -> tuple[langevin.LangevinState, torch.Tensor]:
    """The proposal z + (h^2/2) M^-1 grad + h L xi, evaluated, with its Metropolis-Hastings log-ratio.

    ``factors`` holds :func:`mass_matrix_factors` of each block, ``block_index`` the blocks' positions in the flat
    vector.
    """
    def mean(s: langevin.LangevinState) -> torch.Tensor:
        return s.position + (0.5 * h * h) * _precondition(s.logdensity_grad, 0, factors, block_index)

    def log_q(to: torch.Tensor, frm: langevin.LangevinState) -> torch.Tensor:  # up to a shared constant
        diff = _precondition(to - mean(frm), 2, factors, block_index)
        return -(diff * diff).sum(-1) / (2.0 * h * h)

    z = current.position
    noise = torch.randn(z.shape, dtype=z.dtype, device=z.device)
    moved = mean(current) + h * _precondition(noise, 1, factors, block_index)
    new = langevin.LangevinState(moved, *langevin.value_and_grad(log_density, moved))
    log_ratio = new.logdensity - current.logdensity + log_q(z, new) - log_q(moved, current)
    valid = torch.isfinite(new.logdensity) & ~torch.isnan(log_ratio)
    return new, torch.where(valid, log_ratio, -torch.inf)  # reject nan and +-inf, as langevin's ratio
