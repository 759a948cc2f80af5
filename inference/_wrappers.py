"""Backend-free helpers: find or rebuild a distribution wrapped in ``base_dist`` wrappers (Independent, masked,
expanded), as both backends' distributions nest them the same way."""
from __future__ import annotations

import copy
from typing import Callable

__all__ = ["find_wrapped", "map_wrapped", "handler_arguments"]


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


def handler_arguments(handler: str, fn, setting, *, setting_name: str, is_setting: Callable[[object], bool],
                      needs: str, example: str):
    """``(fn, setting)`` from the arguments of a handler ``handler(fn=None, <setting_name>=None)``, checked.

    The model comes first, as in Pyro's and NumPyro's own handlers (``handler(model, setting)``). When the first
    positional argument is a setting object (``is_setting``) it is taken as the setting: ``handler(setting)`` (the
    context-manager form) and the older ``handler(setting, model)`` both work.
    """
    if fn is not None and is_setting(fn):
        if setting is None:
            fn, setting = None, fn
        elif not is_setting(setting) and callable(setting):
            fn, setting = setting, fn
    if setting is None:
        raise TypeError(f"{handler}() needs a {setting_name}: wrap a model with {handler}(model, {example}), or "
                        f"use it as a context manager: `with {handler}({example}):`")
    if not is_setting(setting):
        raise TypeError(f"{handler}(): {setting_name} must be an object with {needs} (e.g. {example}), "
                        f"got {setting!r}")
    if fn is not None and not callable(fn):
        raise TypeError(f"{handler}(): fn must be the model to wrap (a callable) or None, got {fn!r}")
    return fn, setting
