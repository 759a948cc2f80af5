"""Registering Flax NNX modules as NumPyro param sites (shared by the ready-made models), and finding energies
whose modules were never registered (so that training would leave them untouched).

The twin of :mod:`tilted_priors.inference.pyro.modules`: Pyro's ``register_module`` puts a torch module's tensors in
the param store and trains the module in place; NumPyro keeps parameters in the ``SVI`` state, so here the module's
parameters become one pytree param site and the function returns a copy of the module that holds the site's values.
"""
from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from numpyro import handlers
from numpyro.contrib.module import nnx_module

__all__ = ["register_module", "structure_trace", "warn_unregistered_modules"]


def register_module(name: str, module: nnx.Module) -> nnx.Module:
    """Register ``module``'s parameters as the param site ``name + "$params"`` (through
    :func:`numpyro.contrib.module.nnx_module`) and return a copy of the module holding the site's values.

    Call it inside the model (or guide) and use the returned module there. Outside any handler the copy holds the
    module's own weights; under ``SVI`` it holds the values being trained (a pytree of possibly traced arrays), so
    it can also be the energy of an :class:`~tilted_priors.numpyro.EnergyTiltedNormal` as a data field and
    compiled prior chains are reused across model calls (the closure ``nnx_module`` returns would be a new static
    argument each time). The module itself keeps its initial weights (put trained values back with the models'
    ``with_params``). Non-parameter state (``nnx.Variable`` other than ``nnx.Param``) is the module's own and
    is not updated; call :func:`~numpyro.contrib.module.nnx_module` directly for modules that change such state
    in their forward pass.

    Parameters
    ----------
    name : str
        Name of the module; the param site is ``name + "$params"``.
    module : flax.nnx.Module
        The initialised module.

    Returns
    -------
    flax.nnx.Module
        A copy of ``module`` whose parameters are the param site's values.

    Raises
    ------
    TypeError
        When ``module`` is not a Flax NNX module.
    ValueError
        When the param site already holds values (a loaded checkpoint, an earlier model with the same names)
        whose structure or shapes differ from the module's.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from numpyro import handlers
    >>> def model():
    ...     net = register_module("doc_net", nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    ...     return net(jnp.ones(2))
    >>> tr = handlers.trace(handlers.seed(model, 0)).get_trace()
    >>> tr["doc_net$params"]["value"]["kernel"].shape
    (2, 3)
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"register_module: module must be a flax.nnx.Module, got {type(module).__name__} "
                        "(torch modules go to tilted_priors.inference.pyro.modules.register_module)")
    graphdef, state, rest = nnx.split(module, nnx.Param, nnx.Not(nnx.Param))
    own = nnx.to_pure_dict(state)
    params = nnx_module(name, module).args[0]
    if params is None:  # a module without parameters: nothing was registered
        return module
    mine, theirs = _flat(own), _flat(params)
    if set(mine) != set(theirs):
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        raise ValueError(f"the param site {name + '$params'!r} holds other parameters than the module's (missing "
                         f"{['.'.join(k) for k in missing]}, unexpected {['.'.join(k) for k in extra]}): give each "
                         "module its own name, or start from fresh parameters (a new SVI state) when building a "
                         "model of another architecture")
    for path, value in mine.items():
        if np.shape(value) != np.shape(theirs[path]):
            raise ValueError(f"the param site {name + '$params'!r} holds {'.'.join(path)!r} with shape "
                             f"{tuple(np.shape(theirs[path]))}, but the module's parameter has shape "
                             f"{tuple(np.shape(value))}: give each module its own name, or start from fresh "
                             "parameters (a new SVI state) when building a model of another size")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


def _flat(tree) -> dict[tuple[str, ...], object]:
    """``{path: leaf}`` of a nested dict, keys as strings (a restored checkpoint may spell list indices so)."""
    return {tuple(map(str, path)): leaf for path, leaf in traverse_util.flatten_dict(dict(tree)).items()}


class _NoChain:
    """A sampler that returns its starting points: traces for structure need no chains."""

    def run(self, rng_key, log_density, init, **kwargs):
        return init


def _fresh_param(msg):
    """``substitute_fn`` giving every param site a fresh copy of its initial value (as SVI gives the values it
    trains): a module holds arrays of a param site only when the model took them from ``numpyro.param``."""
    if msg["type"] != "param":
        return None
    init = msg["args"][0] if msg["args"] else None
    if init is None or callable(init):
        return None
    return jax.tree.map(lambda x: jnp.array(x, copy=True), init)


def _energy_module(energy) -> nnx.Module | None:
    """The NNX module behind an energy: the energy itself, or the module of a bound method (``net.energy``)."""
    if isinstance(energy, nnx.Module):
        return energy
    owner = getattr(energy, "__self__", None)
    return owner if isinstance(owner, nnx.Module) else None


def structure_trace(fn: Callable, args: tuple = (), kwargs: dict | None = None) -> dict:
    """One run of ``fn`` under ``handlers.trace``, for its structure: hidden by :func:`numpyro.handlers.block`,
    seeded with 0, with every tilted prior's sampler replaced by one that returns its starting points (no chain
    runs) and every param site given a fresh copy of its initial value (as SVI gives the values it trains).

    Examples
    --------
    >>> import numpyro, numpyro.distributions as dist
    >>> def model():
    ...     numpyro.sample("z", dist.Normal(0.0, 1.0))
    >>> list(structure_trace(model))
    ['z']
    """
    from tilted_priors.inference.numpyro.handlers import sampler  # handlers -> tilt -> this module

    kwargs = {} if kwargs is None else kwargs
    with handlers.block():
        traced = handlers.substitute(handlers.seed(sampler(fn, _NoChain()), 0), substitute_fn=_fresh_param)
        return handlers.trace(traced).get_trace(*args, **kwargs)


def warn_unregistered_modules(model: Callable, guide: Callable | None, args: tuple = (),
                              kwargs: dict | None = None, traces: list | None = None) -> list[str]:
    """Warn about tilted priors whose energy is a Flax NNX module that is not registered as a param site.

    SVI trains the model's param sites; a :class:`flax.nnx.Module` used as the energy of an
    :class:`~tilted_priors.numpyro.EnergyTilted` without :func:`register_module` (or
    :func:`numpyro.contrib.module.nnx_module`) keeps its initial weights, silently. This runs ``model`` and ``guide``
    once each under ``handlers.trace(handlers.substitute(handlers.seed(...)))``, hidden by
    :func:`numpyro.handlers.block`, with the tilted priors' samplers replaced by one that returns its starting
    points (no chain runs), and every param site given a fresh copy of its initial value, as SVI gives the values it
    trains. A registered module is the copy :func:`register_module` returns, holding those values; a module used
    as it was built holds its own arrays. So for every sample site whose distribution is, or wraps, an
    ``EnergyTilted`` whose energy is an NNX module with parameters (or a method of one), it checks by identity that
    each ``nnx.Param`` array is a leaf of some param site's value; for each site where some are not, it warns once
    with a :class:`UserWarning` naming the site and the fix.

    Meant for the training loop, after its first SVI step; it has no side effect (NumPyro's parameters live in
    the SVI state, and the randomness here comes from a fixed seed).

    Parameters
    ----------
    model, guide : callable
        The model and guide given to SVI (``guide`` may be ``None``).
    args, kwargs
        Their arguments.
    traces : list of dict, optional
        The model's and guide's traces from :func:`structure_trace`, when the caller has them (then neither runs
        again).

    Returns
    -------
    list of str
        The names of the sites it warned about (empty when every energy module is registered).

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro
    >>> from tilted_priors.numpyro import EnergyTiltedNormal, EnergyMLP
    >>> net = EnergyMLP(2, rngs=nnx.Rngs(0))
    >>> def model():
    ...     energy = register_module("energy", net)
    ...     numpyro.sample("z", EnergyTiltedNormal(energy, jnp.zeros(2), jnp.ones(2)))
    >>> warn_unregistered_modules(model, None)
    []
    """
    from tilted_priors.inference.numpyro.handlers import find_tilted  # handlers -> tilt -> this module

    if traces is None:
        traces = [structure_trace(fn, args, kwargs) for fn in (model, guide) if fn is not None]
    sites: dict[str, nnx.Module] = {}
    registered: set[int] = set()
    for trace in traces:
        for name, site in trace.items():
            if site["type"] == "param":
                registered.update(id(leaf) for leaf in jax.tree.leaves(site["value"]))
            elif site["type"] == "sample":
                tilted = find_tilted(site["fn"])
                module = None if tilted is None else _energy_module(tilted.energy)
                if module is not None and name not in sites:
                    sites[name] = module
    warned = []
    for name, module in sites.items():
        params = jax.tree.leaves(nnx.state(module, nnx.Param))
        if params and any(id(p) not in registered for p in params):
            warned.append(name)
            warnings.warn(f"the energy of site {name!r} is a Flax NNX module ({type(module).__name__}) whose "
                          "parameters are not registered as a param site, so fit will not train them; register it "
                          "in the model with energy = register_module('energy', net) (from "
                          "tilted_priors.inference.numpyro.modules, or numpyro.contrib.module.nnx_module) and use the "
                          "module it returns as the energy", UserWarning, stacklevel=2)
    return warned
