"""What differs between ArviZ 0.2x and 1.x, in one place (imported lazily: ArviZ is slow to import)."""
from __future__ import annotations

import functools

from tilted_priors._extras import import_dependency

__all__ = ["arviz_module", "arviz_major", "from_dict"]


@functools.lru_cache(maxsize=None)
def arviz_module():
    """The ``arviz`` module; an ``ImportError`` naming what is missing when it cannot be imported (ArviZ, or a
    package ArviZ imports, such as matplotlib)."""
    return import_dependency("arviz", "tilted_priors.inference.diagnostics")


def arviz_major() -> int:
    """ArviZ's major version: 0 (InferenceData) or 1 (xarray DataTree)."""
    return int(arviz_module().__version__.split(".")[0])


def from_dict(groups: dict, dims: dict | None = None, coords: dict | None = None):
    """``az.from_dict`` for either version: ``groups`` maps a group name (``posterior``, ``sample_stats``) to
    ``{variable: array (chain, draw, ...)}``; returns an InferenceData (0.x) or a DataTree (1.x)."""
    az = arviz_module()
    groups = {k: v for k, v in groups.items() if v}
    if arviz_major() >= 1:
        return az.from_dict(groups, dims=dims, coords=coords)
    return az.from_dict(**groups, dims=dims, coords=coords)
