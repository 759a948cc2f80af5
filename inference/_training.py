"""Backend-free parts of ``fit`` (the training loop of :mod:`tilted_priors.inference.pyro.train` and
:mod:`tilted_priors.inference.numpyro.train`): the loop itself, its health checks, the divergence error, the
checkpoints (kept, verified, locked) and the metrics history. The arguments are checked in
:mod:`tilted_priors.inference._plan`.

A backend plugs into :func:`run_training` through a small object (see :class:`TrainerBackend`) that builds the
backend's own ``SVI``, takes one step, and reads and writes its checkpoint format. Everything else — when to
checkpoint, what the history holds, how divergence is reported, the progress bar — is written once here.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from tilted_priors.inference._health import HealthMonitor
from tilted_priors.inference._plan import TrainingPlan
from tilted_priors.inference.checkpoints import CheckpointError, iter_candidates, keep_backup
from tilted_priors.inference.files import atomic_write, run_lock

__all__ = ["TrainingDiverged", "FitResult", "StepReport", "TrainerBackend", "write_history", "run_training",
           "CHECKPOINT_FIX", "warn_evaluation_normalizers"]

HISTORY_FILE = "history.json"
# Settings a resumed run must share with the run that wrote the checkpoint (they fix the minibatch order).
_RESUME_KEYS = ("seed", "batch_size", "num_data", "data_shape")
#: What to do about a checkpoint that cannot be used.
CHECKPOINT_FIX = ("Resume from an earlier checkpoint of the run (fit keeps the last few as checkpoint-<step> beside "
                  "it, and resume=True falls back to them), or start afresh with resume=False")


class TrainingDiverged(FloatingPointError):
    """Training stopped because it went wrong: a non-finite loss, parameters or optimizer state, a sampler that
    diverged, or a failed health check (a loss or gradient norm that jumped by orders of magnitude against its
    running scale, parameters that stopped changing; see :class:`~tilted_priors.inference.pyro.TrainingHealth`).

    Raised by ``fit`` on both backends. The state that diverged is not written anywhere: the last good
    checkpoint on disk (if any) is untouched, so ``fit(..., resume=True)`` continues from it once the cause
    is fixed (usually a lower learning rate, or a smaller sampler step size).

    Parameters
    ----------
    step : int
        1-based index of the update that diverged.
    epoch : int
        1-based epoch of that update.
    reason : str
        What was seen, naming the quantity (the loss, the gradient norm, the parameters, the optimizer state, or
        a sampler's message) and what to change.
    checkpoint : str or None
        Path of the last good checkpoint.
    checkpoint_step : int or None
        Number of updates in that checkpoint.

    Examples
    --------
    >>> err = TrainingDiverged(12, 1, "the loss was nan", "run/checkpoint.pt", 10)
    >>> isinstance(err, FloatingPointError), err.step, err.checkpoint
    (True, 12, 'run/checkpoint.pt')
    """

    def __init__(self, step: int, epoch: int, reason: str, checkpoint: str | None = None,
                 checkpoint_step: int | None = None):
        self.step, self.epoch, self.reason = int(step), int(epoch), str(reason)
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        if checkpoint is None:
            where = ("no checkpoint was written (pass out= and checkpoint_every= to keep one, then resume "
                     "with resume=True)")
        else:
            where = (f"the last good checkpoint is {checkpoint} (step {checkpoint_step}); continue from it "
                     "with fit(..., resume=True)")
        super().__init__(
            f"training diverged at step {step} (epoch {epoch}): {reason}. The diverged state was not saved; "
            f"{where}. Lower the learning rate (or the rate of the group that diverged), set clip_norm, or "
            "lower the step size of the Langevin/MALA sampler in the prior or the guide; health=TrainingHealth(...) "
            "tunes the checks.")

    def __reduce__(self):
        return (type(self), (self.step, self.epoch, self.reason, self.checkpoint, self.checkpoint_step))


@dataclass(eq=False)
class FitResult:
    """What ``fit`` returns.

    Attributes
    ----------
    history : list of dict
        One record per update: ``step`` (1-based), ``epoch`` (1-based), ``loss``, ``lr`` (a float, or a dict
        prefix -> rate when ``lr`` was given per prefix) and ``seconds`` (wall time since training began,
        summed over resumed runs).
    losses : numpy.ndarray
        The losses of ``history``, shape ``(steps,)``.
    params : dict of str to numpy.ndarray
        Final parameters in constrained space. Pyro: param-store names. NumPyro: site names, with the leaves
        of a pytree parameter (a Flax/NNX module) named ``site/key/...``.
    state : object
        NumPyro: the final ``SVIState`` (feed it to ``svi.get_params`` or further ``svi.update``). Pyro: ``None``
        (the parameters live in Pyro's param store).
    checkpoint : str or None
        Path of the final checkpoint, or ``None`` when ``out`` was not given.
    steps : int
        Number of updates done in total (including those before a resume).
    model : callable
        The trained model, ready for ``Predictive(result.model, ...)`` or ``log_likelihood(result.model, ...)``.
        NumPyro: ``numpyro.handlers.substitute(model, data=...)`` with the trained parameters (nested as the
        param sites hold them, as ``svi.get_params`` gives them) and the mutable state. Pyro: the model itself,
        whose parameters are the param store's (and those of the torch modules it registers): the trained ones
        until something else changes the store; :meth:`restore` puts them back.
    guide : callable or None
        The trained guide, likewise (``None`` when ``fit`` was given none).

    Examples
    --------
    >>> result = FitResult([], np.zeros(0), {"loc": np.ones(())}, None, None, 0)
    >>> result.model is None, result.restore()
    (True, None)
    """

    history: list = field(repr=False)
    losses: np.ndarray = field(repr=False)
    params: dict = field(repr=False)
    state: Any = field(repr=False)
    checkpoint: str | None
    steps: int
    model: Any = field(default=None, repr=False)
    guide: Any = field(default=None, repr=False)

    def restore(self) -> None:
        """Put ``params`` back where :attr:`model` and :attr:`guide` read them.

        Pyro: writes them into Pyro's global param store (in place, so the torch modules that share the stored
        tensors get them too), e.g. after ``pyro.clear_param_store()`` or after training another model with the
        same parameter names. NumPyro: nothing to do (the parameters travel with :attr:`model` and
        :attr:`guide`).
        """


def warn_evaluation_normalizers(found: dict) -> None:
    """Warn that the tilted sites ``found`` (site -> normalizer class name) train with a normalizer meant for
    evaluation (``Importance``, ``AnnealedImportance``)."""
    if found:
        listed = ", ".join(f"{site!r} ({name})" for site, name in sorted(found.items()))
        warnings.warn(f"fit: the tilted site(s) {listed} use a normalizer meant for evaluation: its estimate of log Z "
                      "from a finite number of draws is biased and its gradient noisy, so training with it can run "
                      "away. Train with Contrastive (the default), SelfNormalized or NoiseContrastive, and estimate "
                      "log Z with Importance or AnnealedImportance afterwards (handlers.normalizer).", UserWarning,
                      stacklevel=4)


def write_history(path, history: list, config: dict) -> None:
    """Write ``{"config": ..., "history": [...]}`` as JSON, atomically."""
    text = json.dumps({"config": config, "history": history}, indent=1, allow_nan=True)
    atomic_write(path, lambda f: f.write(text.encode()))

class StepReport(NamedTuple):
    """What a backend reports after one update: the loss, the global gradient norm before clipping (``None`` if
    unknown), and whether the parameters and the optimizer state are finite."""

    loss: float
    grad_norm: float | None
    params_finite: bool
    state_finite: bool


class TrainerBackend(Protocol):
    """What a backend supplies to :func:`run_training`."""

    def read(self, path: Path) -> tuple[Any, dict]:
        """Load and verify a checkpoint (:class:`CheckpointError` if it cannot be used): ``(payload, meta)`` with
        meta keys ``step``, ``history``, ``elapsed``, ``config``."""

    def setup(self, indices: np.ndarray, payload: Any) -> list[str]:
        """Build SVI and the parameters (fresh from the seed, or from ``payload``); return parameter names."""

    def step(self, step: int, indices: np.ndarray) -> StepReport:
        """One update (``step`` 0-based); may raise FloatingPointError. A backend may keep the state from before
        the update when the report is not finite."""

    def fingerprint(self) -> str:
        """A hash of the values of the parameters whose learning rate is positive."""

    def save(self, f, meta: dict) -> None:
        """Write the current state, ``meta`` and their manifest to the binary file object ``f``."""

    def result(self) -> tuple[dict, Any]:
        """``(params as numpy, backend state or None)``."""

    # Optional, for several processes: ``is_writer`` (bool, default True: this process writes checkpoints and the
    # history and holds the run folder's lock) and ``prepare_save()`` (called by every process before a
    # checkpoint is written by the writer).


def _latest_checkpoint(path: Path, backend: TrainerBackend):
    """``(path, payload, meta)`` of the newest checkpoint of the run that can be used, or ``None`` when there is
    none; a damaged newest one is passed over with a warning, and when none can be used the error lists why."""
    errors = []
    for _, candidate in iter_candidates(path):
        if not candidate.exists():
            continue
        try:
            payload, meta = backend.read(candidate)
        except CheckpointError as err:
            errors.append(err)
            continue
        if errors:
            warnings.warn(f"resuming from {candidate} (step {meta['step']}): the newer checkpoint(s) cannot be used: "
                          + "; ".join(f"{e.path}: {e.problem}" for e in errors), stacklevel=4)
        return candidate, payload, meta
    if errors:
        raise CheckpointError(path, "no checkpoint of this run can be used: " + "; ".join(
            f"{Path(e.path).name}: {e.problem}" for e in errors),
            "Start afresh with resume=False (the damaged files are then replaced)")
    return None


def run_training(plan: TrainingPlan, backend: TrainerBackend) -> FitResult:
    """The loop shared by both backends: resume, steps, health checks, checkpoints, history, progress.

    With ``out``, the run folder is locked for the whole training (a second writer gets
    :class:`~tilted_priors.inference.files.RunFolderLocked`) and the temporary files of interrupted writes are
    removed.
    """
    if plan.out is None or not getattr(backend, "is_writer", True):  # of several processes, the writer locks
        return _run(plan, backend)
    with run_lock(plan.out):
        return _run(plan, backend)


def _run(plan: TrainingPlan, backend: TrainerBackend) -> FitResult:
    from tqdm import tqdm

    ckpt = plan.checkpoint_path
    config = plan.config()
    start, history, elapsed, payload = 0, [], 0.0, None
    if ckpt is not None:
        others = sorted(p.name for p in plan.out.glob("checkpoint*") if p.suffix in (".pt", ".npz")
                        and p.suffix != ckpt.suffix)
        if others:
            raise CheckpointError(plan.out, f"it holds another backend's checkpoint(s) ({', '.join(others)}), and this "
                                            f"run uses {plan.backend}", "Give another out= folder (one run per "
                                            "folder), or train with the backend that wrote them")
    good_ckpt = good_step = None
    own = False  # whether the folder's checkpoints are this run's (else the first write removes them)
    ckpt_step = None  # the step that ckpt holds, when it is this run's and can be used
    if ckpt is not None and plan.resume:
        found = _latest_checkpoint(ckpt, backend)
        if found is not None:
            path, payload, meta = found
            _check_resume(meta.get("config", {}), config, path)
            start, history, elapsed = int(meta["step"]), list(meta["history"])[: int(meta["step"])], \
                float(meta["elapsed"])
            if start > plan.total_steps:
                raise ValueError(f"the checkpoint {path} is at step {start}, beyond the {plan.total_steps} steps "
                                 "asked for; ask for at least as many (epochs/num_steps count from the start)")
            good_ckpt, good_step, own = str(path), start, True
            ckpt_step = start if path == ckpt else None
    elif ckpt is not None and ckpt.exists():
        warnings.warn(f"{ckpt} exists and will be overwritten by this run; pass resume=True to continue it",
                      stacklevel=3)
    try:
        names = backend.setup(plan.indices(start), payload)
    except TrainingDiverged:
        raise
    except FloatingPointError as err:
        raise TrainingDiverged(start + 1, start // plan.steps_per_epoch + 1,
                               f"while setting up (running the model and guide once): {type(err).__name__}: {err}",
                               good_ckpt, good_step) from err
    if not names:
        raise ValueError("the model and guide declare no parameters (no param or module sites, e.g. a "
                         "SelfNormalized b or a registered energy network): fit has nothing to train")
    plan.lr.check_names(names)
    monitor = HealthMonitor(plan.health, clipped=plan.clip_norm is not None)

    def checkpoint(step: int) -> None:
        nonlocal good_ckpt, good_step, own, ckpt_step
        meta = {"step": step, "epoch": step // plan.steps_per_epoch,
                "elapsed": elapsed + (time.perf_counter() - t0), "history": history, "config": config}
        prepare = getattr(backend, "prepare_save", None)
        if prepare is not None:  # with several processes: a collective step, taken by all of them
            prepare()
        if getattr(backend, "is_writer", True):
            if ckpt_step is not None and ckpt_step != step:
                keep_backup(ckpt, ckpt_step, plan.keep_checkpoints)  # the previous checkpoint stays, as ckpt-<step>
            atomic_write(ckpt, lambda f: backend.save(f, meta))
            if not own:  # a new run: the folder's old checkpoints were another run's
                keep_backup(ckpt, 0, 0)
            write_history(plan.out / HISTORY_FILE, history, config)
        good_ckpt, good_step, own, ckpt_step = str(ckpt), step, True, step

    t0 = time.perf_counter()
    step = start
    bar = tqdm(total=plan.total_steps, initial=start, disable=not plan.progress, unit="step",
               dynamic_ncols=True, desc=f"fit ({plan.backend})")

    def diverged(reason: str) -> TrainingDiverged:
        return TrainingDiverged(step + 1, step // plan.steps_per_epoch + 1, reason, good_ckpt, good_step)

    try:
        while step < plan.total_steps:
            epoch = step // plan.steps_per_epoch + 1
            try:
                report = backend.step(step, plan.indices(step))
            except TrainingDiverged:
                raise
            except FloatingPointError as err:
                raise diverged(f"{type(err).__name__}: {err}") from err
            loss = float(report.loss)
            if not math.isfinite(loss):
                raise diverged(f"the loss was {loss}")
            if not report.params_finite:
                raise diverged("some parameters became non-finite after the update")
            if not report.state_finite:
                raise diverged("the optimizer's state (Adam's moments) became non-finite after the update")
            reason = monitor.check_step(loss, report.grad_norm)
            if reason is None and monitor.wants_fingerprint(step + 1):
                reason = monitor.check_fingerprint(step + 1, backend.fingerprint())
            if reason is not None:
                raise diverged(reason)
            step += 1
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": plan.lr_record(step - 1),
                      "seconds": elapsed + (time.perf_counter() - t0)}
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            stop = bool(plan.callback(dict(record))) if plan.callback is not None else False
            if ckpt is not None and plan.checkpoint_every and step % plan.checkpoint_every == 0 \
                    and step < plan.total_steps and not stop:
                checkpoint(step)
            if stop:
                break
    finally:
        bar.close()
    if ckpt is not None and (step > start or payload is None or good_ckpt != str(ckpt)):
        checkpoint(step)
    params, state = backend.result()
    return FitResult(history=history, losses=np.array([r["loss"] for r in history], dtype=np.float64),
                     params=params, state=state, checkpoint=None if ckpt is None else str(ckpt), steps=step)


def _check_resume(saved: dict, now: dict, path: Path) -> None:
    if saved.get("backend", now["backend"]) != now["backend"]:
        raise CheckpointError(path, f"it was written by the {saved['backend']} backend, not {now['backend']}",
                              f"Resume with the {saved['backend']} backend, or give another out= folder")
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"cannot resume from {path}: the minibatch order would differ ({'; '.join(diff)}); "
                         "use the same data, batch_size and seed, or resume=False to start afresh")
