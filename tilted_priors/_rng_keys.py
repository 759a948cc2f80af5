"""The PRNG keys of the NumPyro backend: their checks, and where a distribution finds one when given none.

Pyro draws from torch's global generator and has no keys, so these helpers have no Pyro twin and live here, out
of the mirrored backend packages. Like :mod:`tilted_priors._compat`, this module imports no backend: NumPyro only
inside the functions that need it.
"""
from __future__ import annotations

from tilted_priors._compat import numpyro_handler_stack
from tilted_priors._validation import describe

__all__ = ["check_key", "require_key", "seed_key", "in_mcmc_potential"]

_KEY_HELP = ("pass one to log_normalizer(rng_key), give rng_key=... when building the distribution, or "
             "evaluate it inside a seeded model (numpyro.handlers.seed); where only gradients in the latents are "
             "needed, use the normalizer Unnormalized()")


def check_key(rng_key, name: str = "rng_key"):
    """``rng_key`` if it looks like a PRNG key (an array, a tracer, a typed key), else a ``TypeError`` naming
    ``name``: a seed given where a key belongs (``0`` for ``jax.random.PRNGKey(0)``) fails deep in JAX otherwise.

    Examples
    --------
    >>> check_key(3)
    Traceback (most recent call last):
    ...
    TypeError: rng_key must be a PRNG key such as jax.random.PRNGKey(0), got 3 (int): make one from ...
    """
    if hasattr(rng_key, "shape") and hasattr(rng_key, "dtype"):
        return rng_key
    raise TypeError(f"{name} must be a PRNG key such as jax.random.PRNGKey(0), got {describe(rng_key)} "
                    f"({type(rng_key).__name__}): make one from a seed with jax.random.PRNGKey(seed)")


def require_key(rng_key, who: str):
    """``rng_key`` checked (:func:`check_key`), or a ``ValueError`` saying how to give one to ``who``, a
    normalizer that draws random samples, when it is ``None``."""
    if rng_key is None:
        raise ValueError(f"{who} draws random samples and needs a PRNG key: {_KEY_HELP}")
    return check_key(rng_key, "rng_key")


def seed_key():
    """A key from ``numpyro.prng_key()`` when a ``numpyro.handlers.seed`` is active, else ``None``."""
    import numpyro
    from numpyro.handlers import seed

    if any(isinstance(handler, seed) for handler in numpyro_handler_stack()):
        return numpyro.prng_key()
    return None


def in_mcmc_potential() -> bool:
    """Whether the model runs inside NumPyro MCMC's potential function: unseeded, under a ``substitute`` with a
    ``substitute_fn`` (``numpyro.infer.util.potential_energy``), where the latents are given and only gradients
    in them are taken."""
    from numpyro.handlers import seed, substitute

    stack = numpyro_handler_stack()
    return (any(isinstance(h, substitute) and h.substitute_fn is not None for h in stack)
            and not any(isinstance(h, seed) for h in stack))
