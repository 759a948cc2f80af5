"""Backend-free helpers: find or rebuild a distribution wrapped in ``base_dist`` wrappers (Independent, masked,
expanded), as both backends' distributions nest them the same way."""
from __future__ import annotations

import copy
from typing import Callable

__all__ = ["find_wrapped", "map_wrapped", "handler_arguments", "tilt_arguments"]


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


def tilt_arguments(fn, energy, sites, normalizer, sampler, name=None) -> tuple[str, ...]:
    """The site names of ``tilt(fn, energy, sites, normalizer=..., sampler=..., name=...)``, after checking every
    argument."""
    if fn is not None and not callable(fn):
        raise TypeError(f"tilt(): fn must be the model (a callable) or None, got {fn!r}")
    if not callable(energy):
        raise TypeError("tilt(): energy must be a callable taking {site: value} and returning one energy per draw, "
                        f"e.g. lambda v: (v['w'] ** 2 - 1) ** 2; got {energy!r}")
    names = (sites,) if isinstance(sites, str) else tuple(sites) if sites is not None else ()
    if not names or not all(isinstance(s, str) for s in names):
        raise TypeError(f"tilt(): sites must be a site name or a sequence of site names, got {sites!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"tilt(): sites has repeated names: {list(names)}")
    if len(names) > 1 and fn is None:
        raise TypeError("tilt(): a joint tilt of several sites re-runs the model: wrap it, tilt(model, energy, sites), "
                        "rather than using a context manager")
    for what, obj, attr in (("normalizer", normalizer, "term"), ("sampler", sampler, "run")):
        if obj is not None and not callable(getattr(obj, attr, None)):
            raise TypeError(f"tilt(): {what} must have a .{attr}() method, got {obj!r}")
    if name is not None and not (isinstance(name, str) and name):
        raise TypeError(f"tilt(): name must be a non-empty string (the energy network's module name), got {name!r}")
    return names
