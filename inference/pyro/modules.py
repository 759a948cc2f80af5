"""Registering torch modules with Pyro's param store (shared by guides and the ready-made models), and finding
energies whose modules were never registered (so that training would leave them untouched)."""
from __future__ import annotations

import warnings
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.util import get_rng_state, set_rng_state

__all__ = ["register_module", "structure_trace", "warn_unregistered_modules"]


def register_module(name: str, module: torch.nn.Module) -> torch.nn.Module:
    """``pyro.module(name, module, update_module_params=True)``, after checking that the param store's entries
    under ``name`` (if any) have the module's shapes.

    The param store is the source of truth: on first use it adopts the module's tensors (so SVI trains the module in
    place); when it already holds ``name``'s parameters (a loaded checkpoint, or an earlier model with the same
    names) the module takes those, so training resumes instead of silently updating tensors the model never uses.

    Examples
    --------
    >>> pyro.clear_param_store()
    >>> _ = register_module("doc_net", torch.nn.Linear(2, 3))
    >>> "doc_net$$$weight" in pyro.get_param_store()
    True
    """
    store = pyro.get_param_store()
    for param_name, value in module.named_parameters():
        full = f"{name}$$${param_name}"
        if full in store and tuple(store[full].shape) != tuple(value.shape):
            raise ValueError(f"the param store holds {full!r} with shape {tuple(store[full].shape)}, but the "
                             f"module's parameter has shape {tuple(value.shape)}: give each module its own name, or "
                             "call pyro.clear_param_store() before building a model of another size")
    return pyro.module(name, module, update_module_params=True)


class _NoChain:
    """A sampler that returns its starting points: traces for structure need no chains."""

    def run(self, log_density, init, **kwargs):
        return init


def _energy_module(energy) -> torch.nn.Module | None:
    """The torch module behind an energy: the energy itself, or the module of a bound method (``net.energy``)."""
    if isinstance(energy, torch.nn.Module):
        return energy
    owner = getattr(energy, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def structure_trace(fn: Callable, args: tuple = (), kwargs: dict | None = None) -> poutine.Trace:
    """One run of ``fn`` under :func:`pyro.poutine.trace`, for its structure: inside :func:`pyro.poutine.block`,
    with every tilted prior's sampler replaced by one that returns its starting points (no chain runs), and the
    random state restored afterwards. Params the run creates stay in the param store.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> [name for name in structure_trace(model).nodes if name.startswith("z")]
    ['z']
    """
    from tilted_priors.inference.pyro.handlers import sampler  # handlers -> tilt -> this module

    kwargs = {} if kwargs is None else kwargs
    rng_state = get_rng_state()
    try:
        with poutine.block(), sampler(_NoChain()):
            return poutine.trace(fn).get_trace(*args, **kwargs)
    finally:
        set_rng_state(rng_state)


def warn_unregistered_modules(model: Callable, guide: Callable | None, args: tuple = (),
                              kwargs: dict | None = None, traces: list | None = None) -> list[str]:
    """Warn about tilted priors whose energy is a torch module that is not registered with ``pyro.module``.

    SVI trains what is in Pyro's param store; a module used as the energy of an
    :class:`~tilted_priors.pyro.EnergyTilted` without ``pyro.module("energy", net)`` (or
    :func:`register_module`) in the model is never updated, silently. This runs ``model`` and ``guide`` once each
    under :func:`pyro.poutine.trace` (inside :func:`pyro.poutine.block`, with the tilted priors' samplers replaced
    by one that returns its starting points, so no chain runs, and with the random state restored afterwards),
    finds every sample site whose distribution is, or wraps, an ``EnergyTilted`` whose energy is a
    :class:`torch.nn.Module` with parameters (or a method of one), and checks by identity that each parameter is
    a tensor of :func:`pyro.get_param_store`. For each site where some are not, it warns once with a
    :class:`UserWarning` naming the site and the fix.

    Meant for the training loop, after its first SVI step (the param store then holds everything the model and
    guide register). Called before, running the model here registers its modules as a first step would.

    Parameters
    ----------
    model, guide : callable
        The model and guide given to SVI (``guide`` may be ``None``).
    args, kwargs
        Their arguments.
    traces : list of pyro.poutine.Trace, optional
        The model's and guide's traces from :func:`structure_trace`, when the caller has them (then neither runs
        again).

    Returns
    -------
    list of str
        The names of the sites it warned about (empty when every energy module is registered).

    Examples
    --------
    >>> import torch, pyro
    >>> from tilted_priors.pyro import EnergyTiltedNormal, EnergyMLP
    >>> pyro.clear_param_store()
    >>> net = EnergyMLP(2)
    >>> def model():
    ...     pyro.module("energy", net)
    ...     pyro.sample("z", EnergyTiltedNormal(net, torch.zeros(2), torch.ones(2)))
    >>> warn_unregistered_modules(model, None)
    []
    """
    from tilted_priors.inference.pyro.handlers import find_tilted  # handlers -> tilt -> this module

    if traces is None:
        traces = [structure_trace(fn, args, kwargs) for fn in (model, guide) if fn is not None]
    sites: dict[str, torch.nn.Module] = {}
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            tilted = find_tilted(site["fn"])
            module = None if tilted is None else _energy_module(tilted.energy)
            if module is not None and name not in sites:
                sites[name] = module
    stored = {id(t) for _, t in pyro.get_param_store().named_parameters()}
    warned = []
    for name, module in sites.items():
        params = list(module.parameters())
        if params and any(id(p) not in stored for p in params):
            warned.append(name)
            warnings.warn(f"the energy of site {name!r} is a torch module ({type(module).__name__}) whose parameters "
                          "are not registered with pyro.module(...), so fit will not train them; call "
                          "pyro.module('energy', net) in the model (before the pyro.sample statement, with the "
                          "module used as the energy)", UserWarning, stacklevel=2)
    return warned
