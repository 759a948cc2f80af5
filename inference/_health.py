"""Training health, backend-free: the checks ``fit`` runs after every update beyond "is it finite".

:class:`TrainingHealth` holds the settings (``fit(..., health=...)``); :class:`HealthMonitor` applies them to the
stream of losses, gradient norms and parameter fingerprints that a backend reports, and returns the reason when
training went wrong (``fit`` raises :class:`~tilted_priors.inference.pyro.TrainingDiverged` with it).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

__all__ = ["TrainingHealth", "HealthMonitor", "health_settings"]


@dataclass(frozen=True)
class TrainingHealth:
    r"""What ``fit`` treats as a training gone wrong, besides non-finite losses, parameters and optimizer state.

    With :math:`m` the median and :math:`s` the median absolute deviation of the last ``window`` finite values
    (from the second update on, so the first update's loss is the first reference):

    - **loss jump**: :math:`|\ell_t - m| > \text{loss\_jump} \cdot \max(|m|, s, 1)`: the loss moved by orders of
      magnitude against its running scale (a runaway, e.g. a learning rate far too large, or a normalizer whose
      estimate of :math:`\log Z` collapsed);
    - **loss growth**, after ``min_history`` updates: :math:`|\ell_t| > \text{loss\_growth} \cdot \max(|m_0|, 1)`,
      with :math:`m_0` the median of the first ``min_history`` losses of this run (or of this resumed part): a loss
      that drifts to absurd values step by step, too slowly for the jump check (the classic case: an energy that
      runs to :math:`-\infty` where the prior's negative samples do not reach, pulling the loss with it);
    - **gradient jump**, after ``min_history`` updates: the global gradient norm (before clipping) exceeds
      ``grad_jump`` times its running median; skipped when ``fit`` clips gradients (``clip_norm``), which is the
      remedy for rare large gradients;
    - **stalled parameters**: no parameter with a positive learning rate changed over ``stall_steps`` updates
      (e.g. optimizer moments that became infinite, or a loss that does not depend on the parameters).

    Any of these stops training with ``TrainingDiverged`` naming the step, the quantity and what to change; the
    diverged state is not checkpointed. Give ``None`` to switch one check off, or ``fit(..., health=False)`` to
    keep only the non-finite checks.

    Parameters
    ----------
    loss_jump : float or None
        Factor of the loss-jump check (default ``1e3``: three orders of magnitude).
    loss_growth : float or None
        Factor of the loss-growth check (default ``1e4``).
    grad_jump : float or None
        Factor of the gradient-norm check (default ``1e3``).
    window : int
        Number of recent updates that set the running scale.
    min_history : int
        Updates before the gradient-norm check starts.
    stall_steps : int or None
        Updates over which some trainable parameter must change.

    Examples
    --------
    >>> TrainingHealth(loss_jump=1e4).loss_jump, TrainingHealth().stall_steps
    (10000.0, 100)
    """

    loss_jump: float | None = 1e3
    loss_growth: float | None = 1e4
    grad_jump: float | None = 1e3
    window: int = 50
    min_history: int = 10
    stall_steps: int | None = 100

    def __post_init__(self):
        for name in ("loss_jump", "loss_growth", "grad_jump"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 1:
                    raise ValueError(f"TrainingHealth: {name} must be a finite number > 1 (a factor) or None to "
                                     f"switch the check off, got {value!r}")
                object.__setattr__(self, name, float(value))
        for name, low in (("window", 2), ("min_history", 1), ("stall_steps", 1)):
            value = getattr(self, name)
            if value is None and name == "stall_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise ValueError(f"TrainingHealth: {name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))


def health_settings(health) -> TrainingHealth | None:
    """``fit``'s ``health`` argument as settings: ``True`` the defaults, ``False``/``None`` no extra checks."""
    if health is True:
        return TrainingHealth()
    if health is False or health is None:
        return None
    if isinstance(health, TrainingHealth):
        return health
    raise TypeError(f"health must be True, False or a TrainingHealth(...), got {health!r}")


_FIX_LR = "lower the learning rate (or that of the group that diverged) or set clip_norm"


class HealthMonitor:
    """Applies :class:`TrainingHealth` to one training; each ``check_*`` returns ``None`` or the reason (a str).

    Examples
    --------
    >>> monitor = HealthMonitor(TrainingHealth(), clipped=False)
    >>> [monitor.check_step(loss, 1.0) for loss in (10.0, 9.0, 8.5, 8.0)]
    [None, None, None, None]
    >>> monitor.check_step(-4e6, 1.0)[:43]
    'the loss jumped to -4e+06 against a running'

    A loss that drifts away step by step passes the jump check and is caught by the growth check:

    >>> monitor = HealthMonitor(TrainingHealth(), clipped=False)
    >>> reasons = [monitor.check_step(1000.0 - 10.0 * k ** 3, 1.0) for k in range(60)]
    >>> step = next(k for k, r in enumerate(reasons) if r)
    >>> step, reasons[step][:28]
    (39, 'the loss grew to -5.922e+05,')
    """

    def __init__(self, settings: TrainingHealth | None, *, clipped: bool):
        self.settings = settings
        self.clipped = clipped
        size = settings.window if settings is not None else 1
        self.losses: deque = deque(maxlen=size)
        self.first_losses: list[float] = []
        self.norms: deque = deque(maxlen=size)
        self.fingerprint = None
        self.fingerprint_step = None

    def check_step(self, loss: float, grad_norm: float | None) -> str | None:
        """Check one update's loss and global gradient norm (``None`` when the backend does not report it)."""
        s = self.settings
        if s is None:
            return None
        reason = None
        if s.loss_jump is not None and self.losses:
            history = np.asarray(self.losses)
            m = float(np.median(history))
            scale = max(abs(m), float(np.median(np.abs(history - m))), 1.0)
            if abs(loss - m) > s.loss_jump * scale:
                reason = (f"the loss jumped to {loss:.4g} against a running median of {m:.4g} over the last "
                          f"{len(history)} updates (more than {s.loss_jump:g} times its scale {scale:.3g}): the "
                          f"training is running away; {_FIX_LR}, or check the normalizer (Importance and "
                          "AnnealedImportance are meant for evaluation)")
        if reason is None and s.loss_growth is not None and len(self.first_losses) >= s.min_history:
            start = max(abs(float(np.median(self.first_losses))), 1.0)
            if abs(loss) > s.loss_growth * start:
                reason = (f"the loss grew to {loss:.4g}, more than {s.loss_growth:g} times its scale at the start of "
                          f"training ({start:.3g}), step by step: the training is running away (for an energy-based "
                          "model, typically an energy that falls without bound where the prior's sampler does not "
                          f"reach); {_FIX_LR}, or give the prior's sampler more or larger steps")
        if reason is None and grad_norm is not None and math.isfinite(grad_norm) and s.grad_jump is not None \
                and not self.clipped and len(self.norms) >= s.min_history:
            m = float(np.median(np.asarray(self.norms)))
            if m > 0 and grad_norm > s.grad_jump * m:
                reason = (f"the gradient norm jumped to {grad_norm:.4g}, more than {s.grad_jump:g} times its running "
                          f"median {m:.3g}; {_FIX_LR} (e.g. clip_norm={max(10 * m, 1e-3):.3g})")
        self.losses.append(float(loss))
        if len(self.first_losses) < s.min_history and math.isfinite(loss):
            self.first_losses.append(float(loss))
        if grad_norm is not None and math.isfinite(grad_norm):
            self.norms.append(float(grad_norm))
        return reason

    def wants_fingerprint(self, step: int) -> bool:
        """Whether the stall check needs the trainable parameters' fingerprint after update ``step`` (1-based)."""
        s = self.settings
        return s is not None and s.stall_steps is not None and step % s.stall_steps == 0

    def check_fingerprint(self, step: int, fingerprint) -> str | None:
        """Compare the fingerprint of the trainable parameters with the one ``stall_steps`` updates earlier."""
        previous, previous_step = self.fingerprint, self.fingerprint_step
        self.fingerprint, self.fingerprint_step = fingerprint, step
        if previous is None or fingerprint is None or previous != fingerprint:
            return None
        return (f"no trainable parameter changed from step {previous_step} to step {step}: the optimizer's state "
                "may be non-finite or saturated, or the loss may not depend on the parameters (check that the "
                "networks are registered with pyro.module / nnx_module and used in the loss); resume from an earlier "
                "checkpoint or train afresh")
