"""The argument checks and helpers of :mod:`tilted_priors.numpyro.distributions` (JAX / NumPyro).

The energy and the base (with the context broadcast to the base's rows), ``loc`` and ``scale`` of the Normal base
(floating arrays, broadcast together and with the context), the call of the energy (the context broadcast to
``z``, a wrong signature or output explained), and the declaration of a normalizer's learned parameters.
"""
from __future__ import annotations

import inspect

import jax.numpy as jnp
from numpyro.distributions import Distribution

from tilted_priors._validation import (check_loc_scale_shapes, context_batch_shape, describe, energy_output_error,
                                       energy_signature_error)

__all__ = ["check_energy_base", "as_loc_scale", "call_energy", "register_normalizer"]


def _float_array(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _as_param(name: str, value):
    """``loc`` / ``scale`` as a floating array, or a ``TypeError`` naming the argument."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be an array of shape batch_shape + (d,) (or a number), got {describe(value)}")
    try:
        return _float_array(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array of shape batch_shape + (d,) (or a number), got "
                        f"{describe(value)} ({type(value).__name__})") from err


def _as_context(context):
    """``context`` as a floating array with at least one dimension (the features), or a clear error."""
    try:
        context = _float_array(context)
    except TypeError as err:
        raise TypeError(f"context must be an array of shape batch_shape + (c,), got {type(context).__name__}"
                        ) from err
    if context.ndim < 1:
        raise ValueError("context must have at least one dimension, the last holding the c covariates of a row "
                         "(shape batch_shape + (c,)); for one covariate per row pass x[..., None]")
    return context


def check_energy_base(energy, base, context):
    """``(base, context)`` for :class:`~tilted_priors.numpyro.EnergyTilted`: ``energy`` and ``base`` checked, the
    context (when not ``None``) as a floating array and the base expanded to its rows; else a clear error.

    Raises
    ------
    TypeError
        When ``energy`` is not callable, ``base`` is not a NumPyro distribution or ``context`` is not an array.
    ValueError
        When ``base`` has not event shape ``(d,)``, ``context`` has no dimension or does not broadcast with the
        base's batch shape.
    """
    if not callable(energy):
        raise TypeError(f"energy must be callable (..., d) -> (...), got {type(energy).__name__}")
    if not isinstance(base, Distribution):
        raise TypeError(f"base must be a NumPyro Distribution, e.g. dist.Normal(loc, scale).to_event(1), got "
                        f"{describe(base)} ({type(base).__name__})")
    if len(base.event_shape) != 1:
        raise ValueError(f"base must have event shape (d,), got {tuple(base.event_shape)}; "
                         "declare the last dimension as the event with .to_event(1)")
    if context is not None:
        context = _as_context(context)
        batch_shape = context_batch_shape(tuple(base.batch_shape), tuple(context.shape))
        if batch_shape != tuple(base.batch_shape):
            base = base.expand(batch_shape)
    return base, context


def as_loc_scale(loc, scale, context):
    """``(loc, scale, context)`` for :class:`~tilted_priors.numpyro.EnergyTiltedNormal`: ``loc`` and ``scale`` as
    floating arrays broadcast together (at least one dimension, the event) and, with a ``context`` (returned as a
    floating array), with its rows; else a clear error.

    Raises
    ------
    TypeError
        When ``loc``, ``scale`` or ``context`` is not an array (or a number).
    ValueError
        When the shapes do not broadcast or ``loc`` and ``scale`` have no dimension.
    """
    loc, scale = _as_param("loc", loc), _as_param("scale", scale)
    check_loc_scale_shapes(jnp.shape(loc), jnp.shape(scale))
    loc, scale = jnp.broadcast_arrays(loc, scale)
    if loc.ndim < 1:
        raise ValueError("loc and scale must have at least one dimension: the last one is the event (d,); "
                         "for a d-dimensional prior pass arrays of shape (d,)")
    if context is not None:
        context = _as_context(context)
        shape = context_batch_shape(tuple(loc.shape[:-1]), tuple(context.shape)) + tuple(loc.shape[-1:])
        loc, scale = jnp.broadcast_to(loc, shape), jnp.broadcast_to(scale, shape)
    return loc, scale, context


def call_energy(energy, z, context):
    """:math:`E(z)`, or :math:`E(z, x)` with the context broadcast to ``z``'s leading shape; a wrong signature
    (``energy(z, x)`` without a context, or the reverse) or an output that is not an array of shape
    ``z.shape[:-1]`` is explained."""
    try:
        if context is None:
            e = energy(z)
        else:
            shape = context_batch_shape(tuple(jnp.shape(z)[:-1]), tuple(jnp.shape(context)), what="z")
            z = jnp.broadcast_to(z, shape + tuple(jnp.shape(z)[-1:]))
            e = energy(z, jnp.broadcast_to(context, shape + tuple(jnp.shape(context)[-1:])))
    except TypeError as err:  # explain a wrong signature (energy(z, x) without context, or the reverse)
        error = energy_signature_error(energy, context is not None)
        if error is None:
            raise
        raise error from err
    try:
        shape = jnp.shape(e)
    except TypeError:  # not an array (None, a string): say so rather than fail later
        raise energy_output_error("energy", tuple(jnp.shape(z)), e, expected="an array") from None
    if shape != jnp.shape(z)[:-1]:
        raise energy_output_error("energy", tuple(jnp.shape(z)), tuple(shape))
    return e


def register_normalizer(normalizer, dist):
    """Declare the normalizer's learned params (``register_params``, given ``dist`` when it takes an argument)."""
    register = getattr(normalizer, "register_params", None)
    if not callable(register):
        return None
    try:
        takes_dist = len(inspect.signature(register).parameters) > 0
    except (TypeError, ValueError):
        takes_dist = False
    return register(dist) if takes_dist else register()
