"""The argument checks and helpers of :mod:`tilted_priors.pyro.distributions` (torch / Pyro).

The energy and the base (with the context broadcast to the base's rows), ``loc`` and ``scale`` of the Normal base
(tensors, broadcast together and with the context), the call of the energy (the context broadcast to ``z``, a
wrong signature, a dtype mismatch or a wrong output explained), and the declaration of a normalizer's learned
parameters.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch.distributions.utils import broadcast_all

from tilted_priors._validation import (check_loc_scale_shapes, context_batch_shape, describe, energy_output_error,
                                       energy_signature_error)
from tilted_priors.pyro.energies import _dtype_error

__all__ = ["check_energy_base", "as_loc_scale", "call_energy", "register_normalizer", "reference_tensor",
           "dtype_device"]


def _as_context(context) -> torch.Tensor:
    """``context`` as a floating tensor with at least one dimension (the features), or a clear error."""
    if not isinstance(context, torch.Tensor):
        try:
            context = torch.as_tensor(context)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"context must be a tensor of shape batch_shape + (c,), got {type(context).__name__}"
                            ) from err
    if not torch.is_floating_point(context):
        context = context.to(torch.get_default_dtype())
    if context.dim() < 1:
        raise ValueError("context must have at least one dimension, the last holding the c covariates of a row "
                         "(shape batch_shape + (c,)); for one covariate per row pass x[..., None]")
    return context


def _as_param(name: str, value) -> torch.Tensor | float:
    """``loc`` / ``scale`` as given (a tensor or a number), a list or array converted; a clear error otherwise."""
    if isinstance(value, (torch.Tensor, int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{name} must be a tensor of shape batch_shape + (d,) (or a number), got {describe(value)}")
    try:
        return torch.as_tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor of shape batch_shape + (d,) (or a number), got "
                        f"{describe(value)}") from err


def check_energy_base(energy, base, context):
    """``(base, context)`` for :class:`~tilted_priors.pyro.EnergyTilted`: ``energy`` and ``base`` checked, the
    context (when not ``None``) as a floating tensor and the base expanded to its rows; else a clear error.

    Raises
    ------
    TypeError
        When ``energy`` is not callable, ``base`` is not a torch distribution or ``context`` is not a tensor.
    ValueError
        When ``base`` has not event shape ``(d,)``, ``context`` has no dimension or does not broadcast with the
        base's batch shape.
    """
    if not callable(energy):
        raise TypeError(f"energy must be callable (..., d) -> (...), got {type(energy).__name__}")
    if not isinstance(base, torch.distributions.Distribution):
        raise TypeError(f"base must be a torch/Pyro Distribution, e.g. dist.Normal(loc, scale).to_event(1), got "
                        f"{describe(base)} ({type(base).__name__})")
    if len(base.event_shape) != 1:
        raise ValueError(f"base must have event shape (d,), got {tuple(base.event_shape)}; "
                         "declare the last dimension as the event with .to_event(1)")
    if context is not None:
        context = _as_context(context)
        batch_shape = torch.Size(context_batch_shape(tuple(base.batch_shape), tuple(context.shape)))
        if batch_shape != base.batch_shape:
            base = base.expand(batch_shape)
    return base, context


def as_loc_scale(loc, scale, context):
    """``(loc, scale, context)`` for :class:`~tilted_priors.pyro.EnergyTiltedNormal`: ``loc`` and ``scale`` as
    tensors broadcast together (at least one dimension, the event) and, with a ``context`` (returned as a floating
    tensor), expanded to its rows; else a clear error.

    Raises
    ------
    TypeError
        When ``loc``, ``scale`` or ``context`` is not a tensor (or a number).
    ValueError
        When the shapes do not broadcast or ``loc`` and ``scale`` have no dimension.
    """
    loc, scale = _as_param("loc", loc), _as_param("scale", scale)
    check_loc_scale_shapes(getattr(loc, "shape", ()), getattr(scale, "shape", ()))
    loc, scale = broadcast_all(loc, scale)
    if loc.dim() < 1:
        raise ValueError("loc and scale must have at least one dimension: the last one is the event (d,); "
                         "for a d-dimensional prior pass tensors of shape (d,)")
    if context is not None:
        context = _as_context(context)
        batch_shape = torch.Size(context_batch_shape(tuple(loc.shape[:-1]), tuple(context.shape)))
        loc, scale = loc.expand(batch_shape + loc.shape[-1:]), scale.expand(batch_shape + loc.shape[-1:])
    return loc, scale, context


def call_energy(energy, z: torch.Tensor, context) -> torch.Tensor:
    """:math:`E(z)`, or :math:`E(z, x)` with the context broadcast to ``z``'s leading shape; a wrong signature
    (``energy(z, x)`` without a context, or the reverse), torch's dtype errors or an output that is not a tensor
    of shape ``z.shape[:-1]`` are explained."""
    expanded = None
    try:
        if context is None:
            e = energy(z)
        else:
            shape = torch.Size(context_batch_shape(tuple(z.shape[:-1]), tuple(context.shape), what="z"))
            z = z.expand(shape + z.shape[-1:])
            expanded = context.expand(shape + context.shape[-1:])
            e = energy(z, expanded)
    except (RuntimeError, TypeError) as err:  # explain a wrong signature, or torch's dtype errors
        error = (energy_signature_error(energy, context is not None) if isinstance(err, TypeError)
                 else _dtype_error(energy, z=z, context=expanded))
        if error is None:
            raise
        raise error from err
    if not isinstance(e, torch.Tensor) or e.shape != z.shape[:-1]:
        raise energy_output_error("energy", tuple(z.shape), tuple(e.shape) if isinstance(e, torch.Tensor) else e,
                                  expected="a torch tensor")
    return e


def register_normalizer(normalizer, dist) -> None:
    """Declare the normalizer's learned params now, while the model runs (``register_params``, given ``dist`` when
    it takes an argument): Pyro's ELBOs differentiate only when the model's trace holds a param site."""
    register = getattr(normalizer, "register_params", None)
    if not callable(register):
        return
    func = getattr(register, "__func__", None)  # a method: its signature is looked up once per function
    takes_dist = _method_takes_argument(func) if func is not None else _takes_argument(register)
    register(dist) if takes_dist else register()


def _takes_argument(fn) -> bool:
    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=256)
def _method_takes_argument(func) -> bool:
    """Whether the method ``func`` (``self`` aside) takes an argument. Cached: the chains of a model re-run it, and
    so rebuild its distributions, at every step, and ``inspect.signature`` is slow."""
    try:
        return len(inspect.signature(func).parameters) > 1
    except (TypeError, ValueError):
        return False


def _floating_attribute(obj) -> torch.Tensor | None:
    """The first floating tensor among ``obj``'s attributes (a distribution's parameters), else ``None``."""
    try:
        values = vars(obj).values()
    except TypeError:  # no __dict__
        return None
    return next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


def reference_tensor(dist) -> torch.Tensor | None:
    """The tensor whose dtype and device the tensors made for the tilted distribution ``dist`` follow: its ``loc``
    (:class:`~tilted_priors.pyro.EnergyTiltedNormal`), else a parameter of its base (through ``Independent``,
    expanded and transformed distributions: what the draws take), else a parameter or buffer of its energy (a torch
    module), else its context; ``None`` when there is none (``dist`` is ``None``, or none of these holds a tensor).

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(2, dtype=torch.float64), torch.ones(2))
    >>> reference_tensor(d).dtype
    torch.float64
    """
    if dist is None:
        return None
    loc = getattr(dist, "loc", None)
    if isinstance(loc, torch.Tensor) and loc.is_floating_point():
        return loc
    base = getattr(dist, "base", None)
    while base is not None:
        found = _floating_attribute(base)
        if found is not None:
            return found
        base = getattr(base, "base_dist", None)
    energy = getattr(dist, "energy", None)
    if isinstance(energy, torch.nn.Module):
        for t in list(energy.parameters()) + list(energy.buffers()):
            if t.is_floating_point():
                return t
    context = getattr(dist, "context", None)
    return context if isinstance(context, torch.Tensor) else None


def dtype_device(dist) -> tuple[torch.dtype, torch.device | None]:
    """``(dtype, device)`` of :func:`reference_tensor` of ``dist``; torch's default dtype and device (``None``) when it
    has none.

    Examples
    --------
    >>> dtype_device(None) == (torch.get_default_dtype(), None)
    True
    """
    ref = reference_tensor(dist)
    return (torch.get_default_dtype(), None) if ref is None else (ref.dtype, ref.device)
