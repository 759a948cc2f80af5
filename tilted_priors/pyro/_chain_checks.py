r"""The checks around the samplers' chains (torch), used by :mod:`tilted_priors.pyro.samplers`: the arguments
(``init``), the log density of each step, the :class:`~tilted_priors.pyro.EnergyTilted` behind a log density
(whose energy's gradient must reach ``z``) and the scale of its base, and the range rule of
:mod:`tilted_priors._adapt` that finds chains that ran away.
"""
from __future__ import annotations

import math
import weakref

import torch

from tilted_priors import _adapt
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.pyro import langevin

__all__ = ["check_init", "check_finite", "tilted_of", "check_energy_reaches_z", "base_loc_scale", "range_scale",
           "range_ratio"]


def check_init(init) -> torch.Tensor:
    """``init`` as given, after checking that it is a floating tensor of shape ``(..., d)``."""
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be a torch.Tensor of shape (..., d), got {type(init).__name__}")
    if not init.is_floating_point():
        raise TypeError(f"init has {'integer' if init.dtype != torch.bool else 'boolean'} dtype {init.dtype}; "
                        "the chains move in real space: pass floats, e.g. init.float() (or init.double())")
    return init


def check_finite(name: str, state: langevin.LangevinState, step: int, step_size) -> None:
    """Raise :class:`~tilted_priors.ChainDivergenceError` (sampler ``name``, 1-based ``step``) when some chain's log
    density is not finite."""
    # One reduction and one sync per step: a sum is non-finite iff some term is (or it overflows, which
    # also means the chains have run away).
    if not math.isfinite(state.logdensity.sum().item()):
        num_bad = int((~torch.isfinite(state.logdensity)).sum())
        raise ChainDivergenceError(name, step, step_size if isinstance(step_size, str) else float(step_size),
                                   num_bad or None)


def tilted_of(log_density):
    """The :class:`~tilted_priors.pyro.EnergyTilted` whose ``annealed_log_density`` ``log_density`` is, else None.

    That function is a closure over the distribution (``lambda z: self._base_log_density(z) - beta * ...``), or
    a traced log density of one; any other callable gives ``None`` (the checks then use ``init`` alone).
    """
    from tilted_priors.pyro.distributions import EnergyTilted  # distributions imports the samplers

    log_density = getattr(log_density, "fn", log_density)  # a traced log density: the function it replays
    for cell in getattr(log_density, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, EnergyTilted):
            return value
    return None


_CHECKED: weakref.WeakSet = weakref.WeakSet()  # energies whose gradient was checked (see check_energy_reaches_z)


def check_energy_reaches_z(dist, init: torch.Tensor) -> None:
    """Warn, once per energy, when ``dist.energy`` does not depend on ``z`` through torch's graph (NumPy, detach)."""
    energy = dist.energy
    try:
        if energy in _CHECKED:
            return
        _CHECKED.add(energy)
    except TypeError:  # takes no weak reference: check every time (one energy evaluation per run)
        pass
    with torch.enable_grad():
        z = init.detach().requires_grad_(True)
        e = energy(z) if dist.context is None else dist._energy(z)
        if not isinstance(e, torch.Tensor):
            raise TypeError(langevin._not_a_tensor_message(f"the energy {langevin._describe_fn(energy)}", e,
                                                           tuple(z.shape)))
        reaches = e.requires_grad and torch.autograd.grad(e.sum(), z, allow_unused=True)[0] is not None
    if not reaches:
        langevin._warn_detached(energy, f"the energy of {type(dist).__name__}", stacklevel=5)


def base_loc_scale(dist) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and standard deviation of ``dist``'s base (detached), or ``None`` when the base has none."""
    if dist is None:
        return None
    try:
        with torch.no_grad():
            loc, scale = dist.base.mean.detach(), dist.base.stddev.detach()
    except (NotImplementedError, AttributeError):
        return None
    return loc, scale


def range_scale(init: torch.Tensor) -> torch.Tensor:
    """``1 + max|init|``: the scale of the initial positions in the range rule (see ``_adapt``)."""
    return 1.0 + init.detach().abs().amax() if init.numel() else init.new_ones(())


def range_ratio(z: torch.Tensor, origin: torch.Tensor, base) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chain, how far out ``z`` is (see ``_adapt``: ``|z - m| / s`` for a known base, else
    ``|z| / origin``, ``origin = 1 + max|z_0|``), as the largest ratio over the chains and the number of chains
    beyond :data:`~tilted_priors._adapt.RANGE_FACTOR`; both still on the device."""
    out = z.abs() / origin
    if base is not None:
        loc, scale = base
        known = torch.isfinite(loc) & torch.isfinite(scale) & (scale > 0)
        out = torch.where(known, (z - loc).abs() / torch.where(known, scale, torch.ones_like(scale)), out)
    per_chain = out.reshape(-1, z.shape[-1]).amax(-1) if z.numel() else out.new_zeros(0)
    per_chain = torch.where(torch.isnan(per_chain), torch.zeros_like(per_chain), per_chain)
    worst = per_chain.max() if per_chain.numel() else z.new_zeros(())
    return worst, (per_chain > _adapt.RANGE_FACTOR).sum()
