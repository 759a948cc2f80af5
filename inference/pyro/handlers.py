"""Effect handlers that change how the tilted priors of a model are sampled and normalised (Pyro).

Each handler swaps a setting of every :class:`~tilted_priors.pyro.EnergyTilted` sample site it sees (also inside
``Independent`` / masked wrappers and plates) without touching the model. Like Pyro's own handlers
(``poutine.scale(fn=None, scale=...)``) they take the model first and work as wrappers or context managers::

    long_run_model = sampler(model, MALA(2000, 0.05))   # the same program's prior draws become long-run

    with sampler(MALA(2000, 0.05)):      # the same, for everything run inside the block
        trace = poutine.trace(model).get_trace(x)

    with normalizer(Unnormalized()):     # log_prob without the log Z term (inside MCMC over latents)
        ...

When the first argument is a sampler (normalizer) object rather than a model it is taken as the setting, so
``sampler(MALA(2000, 0.05))`` is the context manager (also a decorator: ``sampler(MALA(2000, 0.05))(model)``).

Inference code (e.g. :class:`~tilted_priors.inference.pyro.ShortRunPosterior`) switches the normalizer off with the same
mechanism.
"""
from __future__ import annotations

from typing import Callable

from pyro.poutine.messenger import Messenger

from tilted_priors.inference._wrappers import find_wrapped, handler_arguments, map_wrapped
from tilted_priors.pyro import EnergyTilted
from tilted_priors.inference.pyro.tilt import tilt

__all__ = ["tilt", "sampler", "normalizer", "map_tilted", "find_tilted"]


def find_tilted(fn) -> EnergyTilted | None:
    """The :class:`EnergyTilted` inside ``fn`` (itself, or inside ``base_dist`` wrappers), else ``None``."""
    return find_wrapped(fn, EnergyTilted)


def map_tilted(fn, f: Callable[[EnergyTilted], EnergyTilted]):
    """Apply ``f`` to the tilted distribution inside ``fn``, rebuilding the wrappers around it.

    Returns ``fn`` itself when it holds no tilted distribution.

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyTiltedNormal, Unnormalized
    >>> d = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(3, 2), torch.ones(3, 2)).to_event(1)
    >>> type(map_tilted(d, lambda t: t.replace(normalizer=Unnormalized())).base_dist.normalizer).__name__
    'Unnormalized'
    """
    return map_wrapped(fn, EnergyTilted, f)


class _Swap(Messenger):
    def __init__(self, fn, **changes):
        super().__init__()
        self.fn = fn
        self.changes = changes

    def __call__(self, *args, **kwargs):
        if self.fn is None:  # decorator form: handler(setting)(model)
            return super().__call__(*args, **kwargs)
        with self:
            return self.fn(*args, **kwargs)

    def _process_message(self, msg):
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
        The model to wrap; ``None`` for a context manager (or decorator).
    sampler : object with ``.run(log_density, init)``
        E.g. :class:`~tilted_priors.pyro.MALA`. Given alone as the first argument (``sampler(MALA(...))``) it is
        taken as the setting.

    Raises
    ------
    TypeError
        When no sampler is given, or it has no ``.run``, or ``fn`` is not callable.

    Examples
    --------
    >>> import torch, pyro
    >>> from tilted_priors.pyro import EnergyTiltedNormal, MALA
    >>> model = lambda: pyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(2), torch.ones(2)))
    >>> with sampler(MALA(50, 0.5)):
    ...     tr = pyro.poutine.trace(model).get_trace()
    >>> tr.nodes["z"]["fn"].sampler
    MALA(steps=50, step_size=0.5)
    >>> pyro.poutine.trace(sampler(model, MALA(20, 0.5))).get_trace().nodes["z"]["fn"].sampler
    MALA(steps=20, step_size=0.5)
    """

    def __init__(self, fn: Callable | None = None, sampler=None):
        fn, sampler = handler_arguments("sampler", fn, sampler, setting_name="sampler", is_setting=_is_sampler,
                                        needs=".run(log_density, init)", example="MALA(1000, 0.1)")
        super().__init__(fn, sampler=sampler)


class normalizer(_Swap):
    """Give every tilted prior of the model the normalizer ``normalizer`` (what its ``log_prob`` subtracts).

    Parameters
    ----------
    fn : callable, optional
        The model to wrap; ``None`` for a context manager (or decorator).
    normalizer : object with ``.term(dist)``
        E.g. :class:`~tilted_priors.pyro.Unnormalized`. Given alone as the first argument
        (``normalizer(Unnormalized())``) it is taken as the setting.

    Raises
    ------
    TypeError
        When no normalizer is given, or it has no ``.term``, or ``fn`` is not callable.

    Examples
    --------
    >>> import torch, pyro
    >>> from tilted_priors.pyro import EnergyTiltedNormal, Unnormalized
    >>> model = lambda: pyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(2), torch.ones(2)))
    >>> with normalizer(Unnormalized()):
    ...     tr = pyro.poutine.trace(model).get_trace()
    >>> tr.nodes["z"]["fn"].normalizer
    Unnormalized()
    >>> pyro.poutine.trace(normalizer(model, Unnormalized())).get_trace().nodes["z"]["fn"].normalizer
    Unnormalized()
    """

    def __init__(self, fn: Callable | None = None, normalizer=None):
        fn, normalizer = handler_arguments("normalizer", fn, normalizer, setting_name="normalizer",
                                           is_setting=_is_normalizer, needs=".term(dist)", example="Unnormalized()")
        super().__init__(fn, normalizer=normalizer)
