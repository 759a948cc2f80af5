"""The state around Pyro's ``fit`` (:mod:`tilted_priors.inference.pyro.train`): its Adam with per-prefix rates and
the schedule (and the gradients summed over processes when data-parallel), the extra state of guides and models,
the random state, and the translation of Pyro's validation errors into the divergence guard's signal."""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import pyro
import torch
from pyro.optim import PyroOptim

from tilted_priors.inference._plan import TrainingPlan
from tilted_priors.inference.files import flatten_state, unflatten_state
from tilted_priors.inference.pyro._distributed import ProcessGroup

__all__ = ["FitAdam", "module_extra_state", "load_extra_state", "rng_state", "set_rng_state",
           "nonfinite_as_floating_point_error", "as_numpy", "derived_seed"]


class FitAdam(PyroOptim):
    """``torch.optim.Adam`` per parameter (Pyro's usual scheme) whose learning rate is set before every update
    from the parameter's prefix group and the step (so the schedule is a function of the step counter alone and
    survives a resume exactly), with optional clipping of the global gradient norm."""

    def __init__(self, plan: TrainingPlan, group: ProcessGroup | None = None):
        self.plan, self.group = plan, group
        self.step_index = 0
        self.grad_norm: torch.Tensor | None = None  # global norm of the last update's gradients, before clipping
        super().__init__(torch.optim.Adam, self._args)

    def _args(self, module_name, param_name):  # replaced by _get_optim_args; kept for PyroOptim's checks
        return {}

    def _get_optim_args(self, param):
        return {"lr": self._lr(param), "betas": self.plan.betas}

    def _lr(self, param) -> float:
        name = pyro.get_param_store().param_name(param)
        return self.plan.lr.rate(name) * self.plan.decay_factor(self.step_index)

    def __call__(self, params, *args, **kwargs) -> None:
        store = pyro.get_param_store()
        params = sorted(params, key=store.param_name)  # a fixed order: the global norm sums in it
        if self.group is not None:  # data parallel: the sum of every process's gradients, the same everywhere
            self.group.all_reduce_grads(params)
        if self.plan.clip_norm is not None:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.plan.clip_norm)
        else:
            norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
            self.grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
        for p in params:
            optimizer = self.optim_objs.get(p)
            if optimizer is None:
                optimizer = self.optim_objs[p] = self._get_optim(p)
                self.grad_clip[p] = None
                waiting = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
                if waiting is not None:
                    optimizer.load_state_dict(waiting)
            lr = self._lr(p)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step(*args, **kwargs)

    def full_state(self) -> dict:
        return {**self._state_waiting_to_be_consumed, **self.get_state()}


def module_extra_state(obj) -> dict | None:
    """State that ``obj`` reports beyond the param store: ``state_dict()`` if it has one (buffers only for a
    torch module, whose parameters are already in the param store)."""
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        return None
    state = obj.state_dict()
    if isinstance(obj, torch.nn.Module):
        params = {name for name, _ in obj.named_parameters()}
        params |= {name for name, _ in obj.named_parameters(remove_duplicate=False)}
        state = {k: v for k, v in state.items() if k not in params}
    flat = flatten_state(state)
    out = {}
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
        elif isinstance(value, np.ndarray) or np.isscalar(value):
            out[key] = torch.as_tensor(np.asarray(value)).clone()
        else:
            raise TypeError(f"{type(obj).__name__}.state_dict() must hold arrays only, got {key!r}: "
                            f"{type(value).__name__}")
    return out


def load_extra_state(obj, state: dict) -> None:
    nested = unflatten_state(state)
    if isinstance(obj, torch.nn.Module):
        obj.load_state_dict(nested, strict=False)
    else:
        obj.load_state_dict(nested)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


@contextmanager
def nonfinite_as_floating_point_error(training: bool = False):
    """Pyro's distribution validation is how non-finite numbers usually surface in a Pyro model: turn its
    ``ValueError`` about nan/inf values into a ``FloatingPointError`` (the divergence guard's signal). While
    ``training`` (after the set-up run succeeded), any parameter a distribution refuses (e.g. a scale that
    underflowed to 0) means the parameters drifted out of range: also a ``FloatingPointError``."""
    try:
        yield
    except ValueError as err:
        message = str(err)
        if "found invalid values" in message and ("nan" in message or "inf" in message):
            raise FloatingPointError("non-finite values reached a distribution: " + message.splitlines()[0]) \
                from err
        if training and "found invalid values" in message:
            raise FloatingPointError("a distribution received values outside its support (the parameters drifted "
                                     "out of range): " + message.splitlines()[0].rstrip(":")) from err
        raise


def as_numpy(value) -> np.ndarray | None:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else None


def derived_seed(seed: int, *more: int) -> int:
    return int(np.random.SeedSequence([seed, 1, *more]).generate_state(1)[0])
