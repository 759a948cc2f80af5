"""Registering torch modules with Pyro's param store (shared by guides and the ready-made models)."""
from __future__ import annotations

import pyro
import torch

__all__ = ["register_module"]


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
