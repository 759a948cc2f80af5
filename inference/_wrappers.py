"""Backend-free helpers: find or rebuild a distribution wrapped in ``base_dist`` wrappers (Independent, masked,
expanded), as both backends' distributions nest them the same way."""
from __future__ import annotations

import copy
import warnings
from typing import Callable

__all__ = ["find_wrapped", "map_wrapped", "handler_arguments", "tilt_arguments", "energy_call_error",
           "warn_missing_sites"]


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
    if isinstance(setting, type):
        raise TypeError(f"{handler}(): {setting_name} must be an instance, got the class {setting.__name__}: "
                        f"instantiate it, e.g. {example}")
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
    if sites is not None and not isinstance(sites, str) and not hasattr(sites, "__iter__"):
        raise TypeError(f"tilt(): sites must be a site name or a sequence of site names (e.g. 'z' or ['z1', "
                        f"'z2']), got {sites!r}")
    names = (sites,) if isinstance(sites, str) else tuple(sites) if sites is not None else ()
    if not names or not all(isinstance(s, str) for s in names):
        raise TypeError(f"tilt(): sites must be a site name or a sequence of site names, got {sites!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"tilt(): sites has repeated names: {list(names)}")
    if len(names) > 1 and fn is None:
        raise TypeError("tilt(): a joint tilt of several sites re-runs the model: wrap it, tilt(model, energy, sites), "
                        "rather than using a context manager")
    for what, obj, attr, example in (("normalizer", normalizer, "term", "Contrastive()"),
                                     ("sampler", sampler, "run", "MALA(100, 0.1)")):
        if isinstance(obj, type):
            raise TypeError(f"tilt(): {what} must be an instance, got the class {obj.__name__}: instantiate it, "
                            f"e.g. {example}")
        if obj is not None and not callable(getattr(obj, attr, None)):
            raise TypeError(f"tilt(): {what} must have a .{attr}() method, got {obj!r}")
    if name is not None and not (isinstance(name, str) and name):
        raise TypeError(f"tilt(): name must be a non-empty string (the energy network's module name), got {name!r}")
    return names


def energy_call_error(err: Exception, values: dict) -> Exception:
    """``err`` (a ``KeyError`` or ``TypeError`` raised by ``tilt``'s energy) again, of the same type, with what
    the energy was given: a dict ``{site: value}``, not an array, and which sites it holds.

    Examples
    --------
    >>> print(energy_call_error(KeyError("w"), {"z": None}).args[0])
    tilt(): the energy raised KeyError: 'w'. It is called with one dict {site: value} holding the sites ['z'] ...
    """
    names = sorted(values)
    message = (f"tilt(): the energy raised {type(err).__name__}: {err}. It is called with one dict {{site: value}} "
               f"holding the sites {names} (e.g. lambda v: (v[{names[0]!r}] ** 2).sum(-1)); a network (a module) "
               "instead gets the sites' values concatenated") if names else str(err)
    try:
        return type(err)(message)
    except TypeError:  # an exception type that takes other arguments: keep it as it was
        return err


def warn_missing_sites(sites: tuple[str, ...], seen) -> bool:
    """Warn (``UserWarning``) when a run of the model tilted by ``tilt(..., sites)`` had no sample site of some of
    these names (a misspelt name leaves the model untilted, silently otherwise); returns whether it warned.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_missing_sites(("w",), {"z": 0.0})
    True
    >>> print(caught[0].message)
    tilt(): the model ran without the sample site(s) ['w'], which were not tilted: check the names given in ...
    """
    missing = [s for s in sites if s not in seen]
    if missing:
        warnings.warn(f"tilt(): the model ran without the sample site(s) {missing}, which were not tilted: check "
                      f"the names given in sites= (the model's sample sites: {sorted(seen)})", UserWarning,
                      stacklevel=3)
    return bool(missing)
