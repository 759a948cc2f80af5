"""Chains as ArviZ data: the InferenceData layer of :mod:`tilted_priors.inference.diagnostics` (ArviZ 0.2x and 1.x).

:func:`to_inference_data` turns what users have — an array of draws, a dict of them, or the backend's own
``MCMC`` object (Pyro or NumPyro) — into ArviZ's container: an ``InferenceData`` under ArviZ 0.2x, an
``xarray.DataTree`` under ArviZ 1.x (the same groups, variables and dims in both). Everything ArviZ does then
applies: ``az.summary``, ``az.plot_rank``, ``az.plot_trace`` and the rest.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tilted_priors.inference.diagnostics._arviz import from_dict
from tilted_priors.inference.diagnostics.arrays import _numeric, as_chains, to_numpy

__all__ = ["to_inference_data", "draws_of"]

#: NumPyro extra fields and the names ArviZ's conventions give them in ``sample_stats``.
_STATS = {"accept_prob": "acceptance_rate", "diverging": "diverging", "step_size": "step_size",
          "num_steps": "n_steps", "potential_energy": "lp"}


def draws_of(obj, var_name: str = "z") -> dict[str, np.ndarray]:
    """The draws in ``obj`` as ``{variable: numpy array (chain, draw, ...)}``.

    ``obj``: an array ``(chain, draw, *dims)`` (named ``var_name``), a mapping of such arrays, or a Pyro /
    NumPyro ``MCMC`` object after ``run`` (its draws grouped by chain).

    Examples
    --------
    >>> sorted(draws_of({"a": np.zeros((2, 10)), "b": np.zeros((2, 10, 3))}))
    ['a', 'b']
    """
    if not isinstance(var_name, str) or not var_name:
        raise TypeError(f"var_name must be a non-empty string (the variable's name), got {var_name!r}")
    if hasattr(obj, "get_samples"):  # pyro.infer.MCMC / numpyro.infer.MCMC
        obj = obj.get_samples(group_by_chain=True)
    if isinstance(obj, Mapping):
        draws = {str(k): _numeric(v, f"draws of {str(k)!r}", "(chain, draw, *dims)", None)
                 for k, v in obj.items()}
    else:
        draws = {var_name: _numeric(obj, "obj", "(chain, draw, *dims), a mapping of such arrays, or an MCMC", None)}
    if not draws:
        raise ValueError("no draws: the mapping is empty")
    shapes = {k: v.shape[:2] for k, v in draws.items()}
    for k, v in draws.items():
        if v.ndim < 2:
            raise ValueError(f"draws of {k!r} must have shape (chain, draw, *dims), got {v.shape}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"every variable needs the same (chain, draw) shape, got {shapes}")
    return draws


def _default_dims(draws: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Name each variable's last axis ``latent`` (``<name>_latent`` when several variables have axes)."""
    with_axes = [k for k, v in draws.items() if v.ndim > 2]
    dims = {}
    for k in with_axes:
        extra = draws[k].ndim - 2
        last = "latent" if len(with_axes) == 1 else f"{k}_latent"
        dims[k] = [f"{k}_dim_{i}" for i in range(extra - 1)] + [last]
    return dims


def _sample_stats(obj, chain_draw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-draw statistics of an ``MCMC`` under ArviZ's names: NumPyro's collected extra fields, or Pyro's
    divergent draws (``diagnostics()["divergences"]``, post-warm-up indices per chain) as ``diverging``, of shape
    ``chain_draw``."""
    get = getattr(obj, "get_extra_fields", None)
    if get is None:
        return _pyro_diverging(obj, chain_draw)
    stats = {}
    for name, value in get(group_by_chain=True).items():
        if name in _STATS:
            value = to_numpy(value)
            stats[_STATS[name]] = -value if name == "potential_energy" else value
    return stats


def _pyro_diverging(obj, chain_draw: tuple[int, int]) -> dict[str, np.ndarray]:
    """``{"diverging": (chain, draw) bool}`` of a Pyro ``MCMC`` whose kernel counts divergences, else ``{}``."""
    if not hasattr(obj, "diagnostics") or not hasattr(obj, "get_samples"):
        return {}
    divergences = obj.diagnostics().get("divergences")
    if not divergences:
        return {}
    diverging = np.zeros(chain_draw, bool)
    for key, index in divergences.items():  # "chain 0", "chain 1", ...: by number, so that "chain 10" follows 9
        diverging[int(str(key).split()[-1]), np.asarray(index, dtype=int)] = True
    return {"diverging": diverging}


def to_inference_data(obj, *, var_name: str = "z", sample_stats: Mapping[str, Any] | None = None,
                      dims: Mapping[str, list[str]] | None = None, coords: Mapping[str, Any] | None = None):
    """ArviZ data from draws: an ``InferenceData`` (ArviZ 0.2x) or a ``DataTree`` (ArviZ 1.x).

    Parameters
    ----------
    obj : array_like, mapping or MCMC
        Draws ``(chain, draw, *dims)`` of one variable (named ``var_name``), a mapping ``{name: draws}``, or a
        Pyro / NumPyro ``MCMC`` after ``run``. NumPyro's collected extra fields go to ``sample_stats`` under
        ArviZ's names (``accept_prob`` -> ``acceptance_rate``, ``potential_energy`` -> ``lp``, its negative,
        an unnormalised log density; ``diverging``, ``step_size``); Pyro's divergent draws (its kernels'
        ``diagnostics()["divergences"]``: NUTS, HMC, :class:`tilted_priors.inference.pyro.Langevin`) to ``diverging``.
    var_name : str
        Name of the variable when ``obj`` is one array.
    sample_stats : mapping, optional
        Extra per-draw statistics ``{name: (chain, draw)}``, e.g. ``{"lp": log_densities}``.
    dims, coords : mapping, optional
        As in ``az.from_dict``. By default the last axis of a variable is ``latent`` (``<name>_latent`` when
        several variables have axes) and any earlier extra axes ``<name>_dim_<i>``.

    Examples
    --------
    >>> data = to_inference_data(np.random.default_rng(0).normal(size=(4, 100, 3)))
    >>> dict(data.posterior.sizes)
    {'chain': 4, 'draw': 100, 'latent': 3}
    """
    for what, value in (("sample_stats", sample_stats), ("dims", dims), ("coords", coords)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{what} must be a mapping (a dict) or None, got {type(value).__name__}")
    draws = draws_of(obj, var_name)
    chain_draw = next(iter(draws.values())).shape[:2]
    stats = _sample_stats(obj, chain_draw)
    for name, value in (sample_stats or {}).items():
        value = _numeric(value, f"sample_stats[{name!r}]", f"{chain_draw} + ...", None)
        if value.shape[:2] != chain_draw:
            raise ValueError(f"sample_stats[{name!r}] must have shape {chain_draw} + ..., got {value.shape}")
        stats[name] = value
    for name, value in draws.items():
        as_chains(value, name=name)  # finite: a nan posterior would make every diagnostic meaningless
    all_dims = _default_dims(draws)
    all_dims.update(dims or {})
    return from_dict({"posterior": draws, "sample_stats": stats}, dims=all_dims, coords=dict(coords or {}))
