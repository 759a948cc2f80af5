"""Effect handlers that change how the tilted priors of a model are sampled and normalised (NumPyro).

The same handlers as :mod:`tilted_priors.inference.pyro.handlers`: each swaps a setting of every
:class:`~tilted_priors.numpyro.EnergyTilted` sample site it sees (also inside ``Independent`` / masked wrappers
and plates) without touching the model. Like NumPyro's own handlers (``handlers.scale(fn=None, scale=...)``) they take
the model first and work as wrappers or context managers::

    long_run_model = sampler(model, MALA(2000, 0.05))   # the same program's prior draws become long-run

    with sampler(MALA(2000, 0.05)):      # the same, for everything run inside the block
        trace = handlers.trace(handlers.seed(model, 0)).get_trace(x)

When the first argument is a sampler (normalizer) object rather than a model it is taken as the setting, so
``sampler(MALA(2000, 0.05))`` is the context manager.
"""
from __future__ import annotations

from typing import Callable

from numpyro.primitives import Messenger

from tilted_priors.inference._wrappers import find_wrapped, handler_arguments, map_wrapped
from tilted_priors.numpyro import EnergyTilted
from tilted_priors.inference.numpyro.tilt import tilt

__all__ = ["tilt", "sampler", "normalizer", "map_tilted", "find_tilted"]


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


def _is_sampler(obj) -> bool:
    return callable(getattr(obj, "run", None))


def _is_normalizer(obj) -> bool:
    return callable(getattr(obj, "term", None))


class sampler(_Swap):
    """Draw every tilted prior of the model with ``sampler`` instead of its own sampler.

    Parameters
    ----------
    fn : callable, optional
        The model to wrap; ``None`` for a context manager.
    sampler : object with ``.run(rng_key, log_density, init)``
        E.g. :class:`~tilted_priors.numpyro.MALA`. Given alone as the first argument (``sampler(MALA(...))``) it
        is taken as the setting.

    Raises
    ------
    TypeError
        When no sampler is given, or it has no ``.run``, or ``fn`` is not callable.

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
    >>> handlers.trace(handlers.seed(sampler(model, MALA(20, 0.5)), 0)).get_trace()["z"]["fn"].sampler
    MALA(steps=20, step_size=0.5)
    """

    def __init__(self, fn: Callable | None = None, sampler=None):
        fn, sampler = handler_arguments("sampler", fn, sampler, setting_name="sampler", is_setting=_is_sampler,
                                        needs=".run(rng_key, log_density, init)", example="MALA(1000, 0.1)")
        super().__init__(fn, sampler=sampler)


class normalizer(_Swap):
    """Give every tilted prior of the model the normalizer ``normalizer`` (what its ``log_prob`` subtracts).

    Parameters
    ----------
    fn : callable, optional
        The model to wrap; ``None`` for a context manager.
    normalizer : object with ``.term(dist, rng_key)``
        E.g. :class:`~tilted_priors.numpyro.Unnormalized`. Given alone as the first argument
        (``normalizer(Unnormalized())``) it is taken as the setting.

    Raises
    ------
    TypeError
        When no normalizer is given, or it has no ``.term``, or ``fn`` is not callable.

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
    >>> handlers.trace(handlers.seed(normalizer(model, Unnormalized()), 0)).get_trace()["z"]["fn"].normalizer
    Unnormalized()
    """

    def __init__(self, fn: Callable | None = None, normalizer=None):
        fn, normalizer = handler_arguments("normalizer", fn, normalizer, setting_name="normalizer",
                                           is_setting=_is_normalizer, needs=".term(dist, rng_key)",
                                           example="Unnormalized()")
        super().__init__(fn, normalizer=normalizer)
