r"""The checks around the samplers' chains (JAX), used by :mod:`tilted_priors.numpyro.samplers` and its compiled
chains (``_chains``): the arguments (``init``; the log density as a :class:`~jax.tree_util.Partial`, arrays
dynamic), whether values are arrays or tracers, the :class:`~tilted_priors.numpyro.EnergyTilted` behind a log
density and the scale of its base, and the range rule of :mod:`tilted_priors._adapt` that finds chains that ran
away.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import Partial

from tilted_priors import _adapt

__all__ = ["is_array", "is_array_pytree", "is_concrete", "as_partial", "check_init", "tilted_of", "base_loc_scale",
           "range_scale", "range_ratio"]


def is_array(x) -> bool:
    """Whether ``x`` is a JAX or NumPy array (or a NumPy scalar)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def is_array_pytree(obj) -> bool:
    """Whether ``obj`` is a pytree (not a bare leaf) all of whose leaves are arrays."""
    leaves = jax.tree_util.tree_leaves(obj)
    if len(leaves) == 1 and leaves[0] is obj:
        return False
    return all(is_array(leaf) for leaf in leaves)


def is_concrete(x) -> bool:
    """Whether ``x`` has a value now (it is not a tracer of an outer transformation)."""
    return not isinstance(x, jax.core.Tracer)


def _call(fn, z):  # the name is read by langevin._numpy_message, which unwraps it
    return fn(z)


def as_partial(log_density) -> Partial:
    """Wrap a log density as a :class:`~jax.tree_util.Partial`: arrays dynamic, functions static (by identity)."""
    if isinstance(log_density, Partial):
        return log_density
    if not callable(log_density):
        raise TypeError(f"log_density must be a callable (..., d) -> (...), got {type(log_density).__name__}")
    if is_array_pytree(log_density) and jax.tree_util.tree_leaves(log_density):
        return Partial(_call, log_density)
    return Partial(log_density)


def check_init(init) -> jax.Array:
    """``init`` as an array of shape ``(..., d)`` and a floating dtype, or a clear error."""
    try:
        init = jnp.asarray(init)
    except TypeError as e:
        raise TypeError(f"init must be an array of shape (..., d), got {type(init).__name__}") from e
    if init.ndim < 1:
        raise ValueError("init must have shape (..., d), got a scalar")
    if not jnp.issubdtype(init.dtype, jnp.floating):
        kind = "boolean" if init.dtype == jnp.bool_ else "integer"
        raise TypeError(f"init has {kind} dtype {init.dtype}; the chains move in real space: pass floats, e.g. "
                        "init.astype(jnp.float32) (or jnp.asarray(init, float))")
    return init


def tilted_of(log_density):
    """The :class:`~tilted_priors.numpyro.EnergyTilted` whose ``annealed_log_density`` ``log_density`` is, else
    ``None`` (that function is a :class:`~jax.tree_util.Partial` of the distribution's chain view)."""
    from tilted_priors.numpyro.distributions import EnergyTilted  # distributions imports the samplers

    args = getattr(log_density, "args", None) if isinstance(log_density, Partial) else None
    return args[0] if args and isinstance(args[0], EnergyTilted) else None


def base_loc_scale(dist) -> tuple[jax.Array, jax.Array] | None:
    """The mean and standard deviation of ``dist``'s base (no gradient), or ``None`` (no ``dist``, or its base has
    none)."""
    if dist is None:
        return None
    try:
        return lax.stop_gradient(dist.base.mean), lax.stop_gradient(jnp.sqrt(dist.base.variance))
    except (NotImplementedError, AttributeError):
        return None


def range_scale(init) -> jax.Array:
    """``1 + max|init|``: the scale of the initial positions in the range rule (see ``_adapt``)."""
    init = lax.stop_gradient(init)
    return 1.0 + jnp.max(jnp.abs(init), initial=0.0)


def range_ratio(z, origin, base) -> tuple[jax.Array, jax.Array]:
    """How far out ``z`` is (the rule of ``_adapt``: ``|z - m| / s`` for a known ``base`` ``(m, s)``, else
    ``|z| / origin``, ``origin = 1 + max|z_0|``): the largest ratio over the chains and the number of chains beyond
    :data:`~tilted_priors._adapt.RANGE_FACTOR`."""
    out = jnp.abs(z) / origin
    if base is not None:
        loc, scale = base
        known = jnp.isfinite(loc) & jnp.isfinite(scale) & (scale > 0)
        out = jnp.where(known, jnp.abs(z - loc) / jnp.where(known, scale, 1.0), out)
    per_chain = jnp.max(out.reshape(-1, z.shape[-1]), axis=-1, initial=0.0)
    per_chain = jnp.where(jnp.isnan(per_chain), 0.0, per_chain)
    return jnp.max(per_chain, initial=0.0), jnp.sum(per_chain > _adapt.RANGE_FACTOR).astype(jnp.int32)
