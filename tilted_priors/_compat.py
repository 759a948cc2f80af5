"""The one place where tilted-priors reaches into the private APIs of its backends.

Each function imports its backend when called, so this module imports neither torch nor JAX: the Pyro side calls
only the Pyro functions and the NumPyro side only the NumPyro ones. When a backend release moves one of these,
this is the file to change (and each has a fallback that keeps the behaviour correct, if slower).
"""
from __future__ import annotations

__all__ = ["numpyro_handler_stack", "jax_in_transformation", "pyro_am_i_wrapped", "pyro_isolated", "distribution_mask"]


def numpyro_handler_stack() -> list:
    """NumPyro's active effect handlers, innermost last (``numpyro.primitives._PYRO_STACK``).

    Examples
    --------
    >>> from numpyro import handlers
    >>> with handlers.seed(rng_seed=0):
    ...     len(numpyro_handler_stack())
    1
    """
    from numpyro import primitives

    return primitives._PYRO_STACK


def jax_in_transformation(*trees) -> bool:
    """True under an outer JAX transformation (jit, grad, vmap, scan), or when any leaf of ``trees`` is a tracer.

    Uses JAX's private ``trace_state_clean``; where a JAX release has moved it, falls back to looking for tracers
    among the leaves of ``trees``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> jax_in_transformation(jnp.zeros(2)), bool(jax.jit(lambda x: jax_in_transformation(x))(1.0))
    (False, True)
    """
    import jax

    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # pragma: no cover - the private API moved
        return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))
    return not trace_state_clean()


def pyro_am_i_wrapped() -> bool:
    """True when a Pyro effect handler (a trace, an SVI step) is active (``pyro.poutine.runtime.am_i_wrapped``).

    Examples
    --------
    >>> import pyro.poutine as poutine
    >>> with poutine.trace():
    ...     pyro_am_i_wrapped()
    True
    """
    from pyro.poutine.runtime import am_i_wrapped

    return am_i_wrapped()


class pyro_isolated:
    """Context manager: run Pyro code as if no handler and no plate were active, then restore them.

    Used to run a model again from inside one of its own sample statements (the joint tilts of
    :mod:`tilted_priors.inference.pyro.tilt`): Pyro refuses a plate whose name is already active. Swaps out
    ``pyro.poutine.runtime._PYRO_STACK`` and the plate-dimension allocator's stack.

    Examples
    --------
    >>> import pyro
    >>> with pyro.plate("p", 3):
    ...     with pyro_isolated():
    ...         with pyro.plate("p", 2):
    ...             pyro.sample("x", pyro.distributions.Normal(0.0, 1.0)).shape
    torch.Size([2])
    """

    def __enter__(self):
        from pyro.poutine import runtime

        self._saved = (list(runtime._PYRO_STACK), list(runtime._DIM_ALLOCATOR._stack))
        runtime._PYRO_STACK[:] = []
        runtime._DIM_ALLOCATOR._stack[:] = []
        return self

    def __exit__(self, *exc):
        from pyro.poutine import runtime

        runtime._PYRO_STACK[:], runtime._DIM_ALLOCATOR._stack[:] = self._saved
        return False


def distribution_mask(fn):
    """The mask of a Pyro or NumPyro ``MaskedDistribution`` (``d.mask(m)``): a boolean array or a Python bool.

    Both backends keep it in the private attribute ``_mask``; ``True`` (nothing masked) where it is missing.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> distribution_mask(dist.Normal(torch.zeros(2), 1.0).mask(torch.tensor([True, False])))
    tensor([ True, False])
    """
    return getattr(fn, "_mask", True)
