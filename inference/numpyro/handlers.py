"""Effect handlers that change how the tilted priors of a model are sampled and normalised (NumPyro).

The same handlers as :mod:`inference.pyro.handlers`: each swaps a setting of every
:class:`~tilted_priors.numpyro.EnergyTilted` sample site it sees (also inside ``Independent`` / masked wrappers
and plates) without touching the model. Use them as context managers or wrap a model with ``fn=``::

    with sampler(MALA(2000, 0.05)):      # the same program's prior draws become long-run
        trace = handlers.trace(handlers.seed(model, 0)).get_trace(x)

    long_run_model = sampler(MALA(2000, 0.05), fn=model)
"""
from __future__ import annotations

from typing import Callable

from numpyro.primitives import Messenger

from inference._wrappers import find_wrapped, map_wrapped
from tilted_priors.numpyro import EnergyTilted

__all__ = ["sampler", "normalizer", "map_tilted", "find_tilted"]


def find_tilted(fn) -> EnergyTilted | None:
    """The :class:`EnergyTilted` inside ``fn`` (itself, or inside ``base_dist`` wrappers), else ``None``."""
    return find_wrapped(fn, EnergyTilted)


def map_tilted(fn, f: Callable[[EnergyTilted], EnergyTilted]):
    """Apply ``f`` to the tilted distribution inside ``fn``, rebuilding the wrappers around it.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal, Unnormalized
    >>> d = EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros((3, 2)), jnp.ones((3, 2))).to_event(1)
    >>> type(map_tilted(d, lambda t: t.replace(normalizer=Unnormalized())).base_dist.normalizer).__name__
    'Unnormalized'
    """
    return map_wrapped(fn, EnergyTilted, f)


class _Swap(Messenger):
    def __init__(self, fn=None, **changes):
        super().__init__(fn)
        self.changes = changes

    def process_message(self, msg):
        if msg["type"] == "sample":
            msg["fn"] = map_tilted(msg["fn"], lambda d: d.replace(**self.changes))


class sampler(_Swap):
    """Draw every tilted prior of the model with ``sampler_`` instead of its own sampler.

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro
    >>> from numpyro import handlers
    >>> from tilted_priors.numpyro import EnergyTiltedNormal, MALA
    >>> model = lambda: numpyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(2), jnp.ones(2)))
    >>> with sampler(MALA(50, 0.5)):
    ...     tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    >>> tr["z"]["fn"].sampler
    MALA(steps=50, step_size=0.5)
    """

    def __init__(self, sampler_, fn: Callable | None = None):
        if not callable(getattr(sampler_, "run", None)):
            raise TypeError(f"sampler needs an object with .run(rng_key, log_density, init), got {sampler_!r}")
        super().__init__(fn, sampler=sampler_)


class normalizer(_Swap):
    """Give every tilted prior of the model the normalizer ``normalizer_`` (what its ``log_prob`` subtracts).

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro
    >>> from numpyro import handlers
    >>> from tilted_priors.numpyro import EnergyTiltedNormal, Unnormalized
    >>> model = lambda: numpyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(2), jnp.ones(2)))
    >>> with normalizer(Unnormalized()):
    ...     tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    >>> tr["z"]["fn"].normalizer
    Unnormalized()
    """

    def __init__(self, normalizer_, fn: Callable | None = None):
        if not callable(getattr(normalizer_, "term", None)):
            raise TypeError(f"normalizer needs an object with .term(dist, rng_key), got {normalizer_!r}")
        super().__init__(fn, normalizer=normalizer_)
