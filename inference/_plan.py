"""Backend-free arguments of ``fit``: the checks of its data and settings, the minibatch order, learning rates by
parameter-name prefix and their schedule (:class:`TrainingPlan`, built by :func:`make_plan`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from tilted_priors._validation import check_flag, check_nonnegative_int
from tilted_priors.inference._health import TrainingHealth, health_settings

__all__ = ["LearningRates", "TrainingPlan", "make_plan", "batch_order", "stage_settings", "check_data",
           "no_latents_error"]


class LearningRates:
    """Learning rates by parameter-name prefix: the longest matching prefix wins, ``""`` is the default.

    Parameters
    ----------
    lr : float or dict of str to float
        One rate for all parameters (positive), or rates per name prefix (non-negative, not all zero; a rate
        of 0 freezes the group).

    Examples
    --------
    >>> rates = LearningRates({"energy": 2e-5, "": 1e-4})
    >>> rates.label("energy$$$net.0.weight"), rates.rate("generator$params")
    ('energy', 0.0001)
    """

    def __init__(self, lr):
        if isinstance(lr, Mapping):
            if not lr:
                raise ValueError("lr: the dict of learning rates is empty; give at least a default entry ''")
            rates = {}
            for prefix, value in lr.items():
                if not isinstance(prefix, str):
                    raise TypeError(f"lr: keys must be parameter-name prefixes (str), got {prefix!r}")
                rates[prefix] = _check_rate(value, f"lr[{prefix!r}]", allow_zero=True)
            if not any(v > 0 for v in rates.values()):
                raise ValueError(f"lr: every learning rate is 0, nothing would be trained: {dict(lr)!r}")
            self.rates = rates
            self.grouped = True
        else:
            self.rates = {"": _check_rate(lr, "lr", allow_zero=False)}
            self.grouped = False
        # longest prefix first, so the first match is the longest one
        self._order = sorted(self.rates, key=len, reverse=True)

    def label(self, name: str) -> str:
        """The prefix (group label) that governs parameter ``name``; ``ValueError`` if none matches."""
        for prefix in self._order:
            if name.startswith(prefix):
                return prefix
        raise ValueError(f"lr: parameter {name!r} matches none of the prefixes {sorted(self.rates)!r}; add a "
                         "default entry '' (e.g. lr={..., '': 1e-4})")

    def rate(self, name: str) -> float:
        """Base learning rate (before decay) of parameter ``name``."""
        return self.rates[self.label(name)]

    def check_names(self, names) -> None:
        """Raise ``ValueError`` if a prefix matches no parameter or a parameter matches no prefix."""
        names = sorted(set(names))
        used = {self.label(name) for name in names}
        unused = [p for p in self.rates if p and p not in used and not any(n.startswith(p) for n in names)]
        if unused:
            raise ValueError(f"lr: the prefix(es) {unused!r} match no parameter of the model or guide; its "
                             f"parameters are {names!r}")

    def to_json(self):
        return dict(self.rates) if self.grouped else self.rates[""]

    def __repr__(self) -> str:
        return f"LearningRates({self.to_json()!r})"


def _check_rate(value, name: str, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0 \
            or (value == 0 and not allow_zero):
        kind = "a finite non-negative number" if allow_zero else "a finite positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def stage_settings(steps_per_component, num_components: int, fit_kwargs: dict) -> list[tuple[int, dict]]:
    """``(num_steps, fit keywords)`` of each stage of ``fit_recursive``: ``steps_per_component`` is one number or
    one per component, and so may ``fit_kwargs["lr"]`` be (a list or tuple: one rate or prefix dict per stage).

    Examples
    --------
    >>> stage_settings([20, 5], 2, {"lr": [1e-3, {"decoder": 0.0, "": 1e-3}], "seed": 1})[1]
    (5, {'seed': 1, 'lr': {'decoder': 0.0, '': 0.001}})
    """
    def per_stage(name, value):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * num_components
        if len(values) != num_components:
            raise ValueError(f"{name} must be a single value or a list of {num_components}, one per component; "
                             f"got {len(values)}")
        return values

    steps = [_check_int("steps_per_component", s) for s in per_stage("steps_per_component", steps_per_component)]
    kwargs = {k: v for k, v in fit_kwargs.items() if k != "lr"}
    rates = per_stage("lr", fit_kwargs["lr"]) if "lr" in fit_kwargs else [None] * num_components
    return [(n, kwargs if lr is None else {**kwargs, "lr": lr}) for n, lr in zip(steps, rates)]


def batch_order(seed: int, epoch: int, num_data: int, batch_size: int) -> np.ndarray:
    """Data indices of the minibatches of one epoch, shape ``(num_data // batch_size, batch_size)``.

    A permutation drawn from ``(seed, epoch)`` alone, so a resumed run sees the same batches; the last
    incomplete batch is dropped.

    Examples
    --------
    >>> order = batch_order(0, 0, 10, 3)
    >>> order.shape, len(set(order.ravel()))
    ((3, 3), 9)
    >>> bool((order == batch_order(0, 0, 10, 3)).all()), bool((order == batch_order(0, 1, 10, 3)).all())
    (True, False)
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    steps = num_data // batch_size
    return rng.permutation(num_data)[: steps * batch_size].reshape(steps, batch_size)

def _check_array(data, what: str) -> np.ndarray:
    """One data array, checked (real, finite, with a leading data dimension) and cast to float."""
    try:
        array = np.asarray(data)
    except Exception as err:  # e.g. a tensor that requires grad
        raise TypeError(f"{what} must be a numpy array of shape (N, ...), got {type(data).__name__}: {err}") from err
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) \
            or np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"{what} must be a real numeric array of shape (N, ...), got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{what} must have a leading data dimension (N, ...), got a scalar")
    if array.shape[0] == 0:
        raise ValueError(f"{what} is empty (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(f"{what} holds {bad} non-finite value(s) (nan or inf); clean or impute them first")
    return array


def check_data(data) -> tuple[tuple[np.ndarray, ...], tuple[str, ...] | None]:
    """The arrays of ``fit``'s ``data`` and their names: ``((array,), None)`` for one array, ``(arrays, None)``
    for a tuple (passed positionally), ``(arrays, names)`` for a dict (passed by name). Each array is checked
    (real, finite, cast to float) and all must share their first (data) dimension.

    Examples
    --------
    >>> arrays, names = check_data({"x": np.zeros((4, 2)), "y": np.ones(4)})
    >>> [a.shape for a in arrays], names
    ([(4, 2), (4,)], ('x', 'y'))
    """
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("data is an empty dict; give the arrays by name, e.g. data={'x': x, 'y': y}")
        names = tuple(data)
        for name in names:
            if not isinstance(name, str) or not name.isidentifier():
                raise TypeError(f"data: the keys of a dict of arrays are the keyword names the model and guide "
                                f"are called with, so they must be identifiers (str); got {name!r}")
        arrays = tuple(_check_array(data[name], f"data[{name!r}]") for name in names)
        labels = [f"data[{name!r}]" for name in names]
    elif isinstance(data, tuple):
        if not data:
            raise ValueError("data is an empty tuple; give one array, a tuple (x, y) or a dict {'x': x, 'y': y}")
        names = None
        arrays = tuple(_check_array(a, f"data[{i}]") for i, a in enumerate(data))
        labels = [f"data[{i}]" for i in range(len(data))]
    else:
        if isinstance(data, list) and data and all(hasattr(a, "shape") for a in data):
            raise TypeError("data is a list of arrays: pass a tuple (x, y) to give the model several arrays "
                            "(model(x_batch, y_batch)), or np.stack them into one array")
        return (_check_array(data, "data"),), None
    lengths = [a.shape[0] for a in arrays]
    if len(set(lengths)) > 1:
        listed = ", ".join(f"{label} has {n}" for label, n in zip(labels, lengths))
        raise ValueError(f"the data arrays must share their first dimension (one entry per datum, batched "
                         f"together): {listed}")
    return arrays, names


def no_latents_error(latents: Sequence[str]) -> ValueError:
    """The error for ``guide=None`` on a model with latent sample sites."""
    return ValueError(f"guide=None fits models whose sample sites are all observed (or absent), but the model has "
                      f"latent site(s) {sorted(latents)!r}: give a guide for them (e.g. an AutoNormal, or "
                      "ShortRunPosterior for tilted latents)")


@dataclass
class TrainingPlan:
    """Checked arguments of ``fit`` and what follows from them (built by :func:`make_plan`).

    ``arrays`` are the data arrays (one, or those of a tuple or dict), ``names`` the dict's keys (``None`` for
    one array or a tuple): :meth:`call` turns a batch of each into the model's arguments.
    """

    arrays: tuple
    names: tuple | None
    structured: bool
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    lr: LearningRates
    betas: tuple
    lr_decay: float
    clip_norm: float | None
    seed: int
    out: Path | None
    checkpoint_every: int | None
    resume: bool
    progress: bool
    pass_index: bool
    callback: Callable | None
    loss_name: str
    backend: str
    checkpoint_name: str
    health: TrainingHealth | None = None
    keep_checkpoints: int = 3
    _order: tuple = field(default=(None, None), repr=False)

    @property
    def num_data(self) -> int:
        return self.arrays[0].shape[0]

    def call(self, batch: Sequence) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the model and guide from a batch of each array (in the order of ``arrays``)."""
        if self.names is not None:
            return (), dict(zip(self.names, batch))
        return tuple(batch), {}

    def data_shape(self):
        """The data's shape as the checkpoints record it: a list; a list of lists (tuple); a dict of lists."""
        if self.names is not None:
            return {name: list(a.shape) for name, a in zip(self.names, self.arrays)}
        if self.structured:
            return [list(a.shape) for a in self.arrays]
        return list(self.arrays[0].shape)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out is None else self.out / self.checkpoint_name

    def indices(self, step: int) -> np.ndarray:
        """Data indices of update ``step`` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, batch_order(self.seed, epoch, self.num_data, self.batch_size))
        return self._order[1][pos]

    def decay_factor(self, step: int) -> float:
        """``lr_decay ** epoch`` for update ``step`` (0-based): the staircase exponential schedule."""
        return self.lr_decay ** (step // self.steps_per_epoch)

    def lr_record(self, step: int):
        f = self.decay_factor(step)
        if self.lr.grouped:
            return {prefix: rate * f for prefix, rate in self.lr.rates.items()}
        return self.lr.rates[""] * f

    def config(self) -> dict:
        return {"backend": self.backend, "seed": self.seed, "batch_size": self.batch_size,
                "num_data": self.num_data, "data_shape": self.data_shape(),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "lr": self.lr.to_json(), "betas": list(self.betas), "lr_decay": self.lr_decay,
                "clip_norm": self.clip_norm, "loss": self.loss_name, "pass_index": self.pass_index,
                "checkpoint_every": self.checkpoint_every}


def make_plan(data, *, epochs, num_steps, batch_size, lr, betas, lr_decay, clip_norm, seed, out,
              checkpoint_every, resume, progress, pass_index, callback, loss_name: str, backend: str,
              checkpoint_name: str, health=True, keep_checkpoints: int = 3) -> TrainingPlan:
    """Check the arguments of ``fit`` (clear ``ValueError``/``TypeError`` messages) and build the plan."""
    arrays, names = check_data(data)
    resume, progress, pass_index = (check_flag(v, n) for v, n in ((resume, "resume"), (progress, "progress"),
                                                                   (pass_index, "pass_index")))
    if pass_index and names is not None and "index" in names:
        raise ValueError("data has an array named 'index', which pass_index=True also passes (the batch's data "
                         "indices): rename the array")
    num_data = arrays[0].shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > num_data:
        raise ValueError(f"batch_size={batch_size} is larger than the data set (N={num_data}); batches are "
                         "full (the last incomplete one is dropped), so use batch_size <= N")
    batch_size = int(batch_size)
    steps_per_epoch = num_data // batch_size
    if (epochs is None) == (num_steps is None):
        raise ValueError("give exactly one of epochs= and num_steps= (got "
                         f"epochs={epochs!r}, num_steps={num_steps!r})")
    if epochs is not None:
        total = _check_int("epochs", epochs) * steps_per_epoch
    else:
        total = _check_int("num_steps", num_steps)
    rates = LearningRates(lr)
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
    lr_decay = _check_rate(lr_decay, "lr_decay", allow_zero=False)
    if clip_norm is not None:
        clip_norm = _check_rate(clip_norm, "clip_norm", allow_zero=False)
    check_nonnegative_int("seed", seed)
    if checkpoint_every is not None:
        checkpoint_every = _check_int("checkpoint_every", checkpoint_every)
        if out is None:
            raise ValueError("checkpoint_every needs out= (the directory the checkpoints go to)")
    if resume and out is None:
        raise ValueError("resume=True needs out= (the directory that holds the checkpoint)")
    health = health_settings(health)
    keep_checkpoints = _check_int("keep_checkpoints", keep_checkpoints)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}")
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"out={str(out)!r} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
    return TrainingPlan(arrays, names, isinstance(data, (tuple, Mapping)), batch_size, steps_per_epoch, total,
                        rates, (b1, b2), lr_decay, clip_norm, int(seed), out, checkpoint_every, resume,
                        progress, pass_index, callback, loss_name, backend, checkpoint_name, health,
                        keep_checkpoints)
