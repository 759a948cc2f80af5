"""Backend-free helpers: find or rebuild a distribution wrapped in ``base_dist`` wrappers (Independent, masked,
expanded), as both backends' distributions nest them the same way."""
from __future__ import annotations

import copy
from typing import Callable

__all__ = ["find_wrapped", "map_wrapped"]


def find_wrapped(fn, cls: type):
    """The instance of ``cls`` inside ``fn`` (``fn`` itself or through ``base_dist`` wrappers), else ``None``."""
    while fn is not None and not isinstance(fn, cls):
        fn = getattr(fn, "base_dist", None)
    return fn


def map_wrapped(fn, cls: type, f: Callable):
    """Apply ``f`` to the instance of ``cls`` inside ``fn``, copying the wrappers around it; ``fn`` if none."""
    if isinstance(fn, cls):
        return f(fn)
    inner = getattr(fn, "base_dist", None)
    if inner is None:
        return fn
    mapped = map_wrapped(inner, cls, f)
    if mapped is inner:
        return fn
    new = copy.copy(fn)
    new.base_dist = mapped
    return new
