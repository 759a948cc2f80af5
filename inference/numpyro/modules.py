"""Registering Flax NNX modules as NumPyro param sites (shared by the ready-made models).

The twin of :mod:`tilted_priors.inference.pyro.modules`: Pyro's ``register_module`` puts a torch module's tensors in
the param store and trains the module in place; NumPyro keeps parameters in the ``SVI`` state, so here the module's
parameters become one pytree param site and the function returns a copy of the module that holds the site's values.
"""
from __future__ import annotations

import numpy as np
from flax import nnx, traverse_util
from numpyro.contrib.module import nnx_module

__all__ = ["register_module"]


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
