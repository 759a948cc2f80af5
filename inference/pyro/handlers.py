"""Effect handlers that change how the tilted priors of a model are sampled and normalised (Pyro).

Each handler swaps a setting of every :class:`~tilted_priors.pyro.EnergyTilted` sample site it sees (also inside
``Independent`` / masked wrappers and plates) without touching the model::

    with sampler(MALA(2000, 0.05)):      # the same program's prior draws become long-run
        trace = poutine.trace(model).get_trace(x)

    with normalizer(Unnormalized()):     # log_prob without the log Z term (inside MCMC over latents)
        ...

Inference code (e.g. :class:`~inference.pyro.ShortRunPosterior`) switches the normalizer off with the same
mechanism.
"""
from __future__ import annotations

from typing import Callable

from pyro.poutine.messenger import Messenger

from inference._wrappers import find_wrapped, map_wrapped
from tilted_priors.pyro import EnergyTilted

__all__ = ["sampler", "normalizer", "map_tilted", "find_tilted"]


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
    def __init__(self, **changes):
        super().__init__()
        self.changes = changes

    def _process_message(self, msg):
        if msg["type"] == "sample":
            msg["fn"] = map_tilted(msg["fn"], lambda d: d.replace(**self.changes))


class sampler(_Swap):
    """Draw every tilted prior of the model with ``sampler_`` instead of its own sampler.

    Examples
    --------
    >>> import torch, pyro
    >>> from tilted_priors.pyro import EnergyTiltedNormal, MALA
    >>> model = lambda: pyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(2), torch.ones(2)))
    >>> with sampler(MALA(50, 0.5)):
    ...     tr = pyro.poutine.trace(model).get_trace()
    >>> tr.nodes["z"]["fn"].sampler
    MALA(steps=50, step_size=0.5)
    """

    def __init__(self, sampler_):
        if not callable(getattr(sampler_, "run", None)):
            raise TypeError(f"sampler needs an object with .run(log_density, init), got {sampler_!r}")
        super().__init__(sampler=sampler_)


class normalizer(_Swap):
    """Give every tilted prior of the model the normalizer ``normalizer_`` (what its ``log_prob`` subtracts).

    Examples
    --------
    >>> import torch, pyro
    >>> from tilted_priors.pyro import EnergyTiltedNormal, Unnormalized
    >>> model = lambda: pyro.sample("z", EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(2), torch.ones(2)))
    >>> with normalizer(Unnormalized()):
    ...     tr = pyro.poutine.trace(model).get_trace()
    >>> tr.nodes["z"]["fn"].normalizer
    Unnormalized()
    """

    def __init__(self, normalizer_):
        if not callable(getattr(normalizer_, "term", None)):
            raise TypeError(f"normalizer needs an object with .term(dist), got {normalizer_!r}")
        super().__init__(normalizer=normalizer_)
