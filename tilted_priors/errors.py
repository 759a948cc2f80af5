"""Errors and warnings shared by both backends."""
from __future__ import annotations

import functools
import math

from tilted_priors._adapt import RANGE_FACTOR, suggested_step_size

__all__ = ["ChainDivergenceError", "ChainRangeWarning"]


class ChainDivergenceError(FloatingPointError):
    r"""A Markov chain reached a non-finite state.

    Raised by every sampler in :mod:`tilted_priors` when the log density of some chain becomes ``nan`` or
    ``inf``. The message names the sampler, which chain it was when the caller knows (``label``: the prior's
    sampler, the posterior guide and its sites), the step at which it happened and what to change. When the
    sampler measured the gradient's Lipschitz constant :math:`\hat L` near the starting points (the largest ratio
    :math:`\|\nabla\log\pi(z+\delta) - \nabla\log\pi(z)\| / \|\delta\|` of its probes), the message gives the
    stability bound :math:`h < 2/\sqrt{\hat L}` of a Langevin step on a quadratic of that curvature and suggests
    :attr:`suggested_step_size` :math:`= \min(1/\sqrt{\hat L}, h/2)`, half the bound and at most half the step
    size that diverged.

    Parameters
    ----------
    sampler : str
        Name of the sampler that diverged.
    step : int
        1-based index of the first step whose state was non-finite (0: the initial state).
    step_size : float or "auto"
        Step size in use (the adapted one for ``step_size="auto"`` when known).
    num_bad : int, optional
        How many chains were non-finite at that step.
    label : str, optional
        Which chain it was (e.g. ``"the prior's sampler"``).
    lipschitz : float, optional
        :math:`\hat L`, the measured Lipschitz constant of the log density's gradient.
    adapted : bool
        Whether ``step_size`` was adapted (``step_size="auto"``): the advice is then to fix a smaller one.
    ratio : float, optional
        Set for chains that stayed finite but ran away (raised instead of a :class:`ChainRangeWarning` by a sampler
        built with ``strict=True``): how far out they went, in units of ``reference`` (more than :math:`10^6`; see
        :class:`ChainRangeWarning` for the rule). ``step`` is
        then the number of steps run.
    reference : str, optional
        What ``ratio`` is measured against, read after it (e.g. ``"times 1 + max|init| (= 2.9) from 0"``).

    Examples
    --------
    >>> err = ChainDivergenceError("ShortRunLangevin", step=12, step_size=0.4, num_bad=3, lipschitz=400.0)
    >>> err.step, err.suggested_step_size
    (12, 0.05)
    >>> err = ChainDivergenceError("ShortRunLangevin", 20, 3.0, 8, ratio=3e10,
    ...                            reference="times 1 + max|init| (= 2.9) from 0")
    >>> "ran away" in str(err), err.suggested_step_size
    (True, 1.5)
    """

    def __init__(self, sampler: str, step: int, step_size: float | str, num_bad: int | None = None, *,
                 label: str | None = None, lipschitz: float | None = None, adapted: bool = False,
                 ratio: float | None = None, reference: str | None = None):
        self.sampler, self.step, self.num_bad = sampler, int(step), num_bad
        self.step_size = step_size if isinstance(step_size, str) else float(step_size)
        self.label = label
        self.lipschitz = None if lipschitz is None else float(lipschitz)
        self.adapted = bool(adapted)
        self.ratio = None if ratio is None else float(ratio)
        self.reference = reference
        super().__init__(self._message())

    @property
    def suggested_step_size(self) -> float | None:
        r""":math:`\min(1/\sqrt{\hat L}, h/2)`: a step size within the measured stability bound (or ``None``)."""
        return suggested_step_size(self.lipschitz, self.step_size)

    def add_context(self, *, label: str | None = None, lipschitz: float | None = None) -> "ChainDivergenceError":
        """Add which chain it was and/or the measured Lipschitz constant, in place (for callers that re-raise it).

        A second ``label`` is appended (``"<first> in <second>"``); a known ``lipschitz`` is kept. Returns the error.

        Examples
        --------
        >>> err = ChainDivergenceError("MALA", step=3, step_size=0.5).add_context(label="the prior's sampler")
        >>> str(err).startswith("MALA (the prior's sampler)")
        True
        """
        if label:
            self.label = label if not self.label else f"{self.label} in {label}"
        if lipschitz is not None and self.lipschitz is None:
            self.lipschitz = float(lipschitz)
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        who = self.sampler if not self.label else f"{self.sampler} ({self.label})"
        if self.ratio is not None:
            return _runaway_message(who, self.step, self.ratio, self.num_bad, self.reference, self.step_size,
                                    self.adapted, self.lipschitz)
        where = "the initial state" if self.step == 0 else f"step {self.step}"
        num_bad = self.num_bad
        chains = "" if num_bad is None else f" ({num_bad} chain{'s' if num_bad != 1 else ''})"
        if self.step == 0:
            advice = "check the initial positions and that the log density is finite there"
            return f"{who}: the chain became non-finite at {where}{chains}; {advice}."
        advice = _step_size_advice(self.step_size, self.adapted, self.lipschitz)
        advice += ("; check that the energy is finite and smooth, or start the chains closer to the typical set")
        return f"{who}: the chain became non-finite at {where}{chains}; {advice}."

    def __reduce__(self):
        kwargs = {"label": self.label, "lipschitz": self.lipschitz, "adapted": self.adapted, "ratio": self.ratio,
                  "reference": self.reference}
        return (functools.partial(type(self), **kwargs), (self.sampler, self.step, self.step_size, self.num_bad))


class ChainRangeWarning(UserWarning):
    r"""Markov chains stayed finite but ran far out of any reasonable range ("ran away").

    An unstable Langevin step (a step size beyond the stability bound :math:`2/\sqrt L`) multiplies the distance to
    the mode at every step; the chains can end at :math:`10^{10}` (or :math:`10^{100}` in float64) without ever
    becoming ``inf``, so no :class:`ChainDivergenceError` is raised, and the draws are finite but meaningless.
    Every sampler of :mod:`tilted_priors` (``ShortRunLangevin``, ``MALA``, ``Persistent``) checks its final
    positions once per ``run`` against this rule (``tilted_priors._adapt.RANGE_FACTOR``: more than
    :math:`10^6` standard deviations of the tilted distribution's base from its mean, or else more than
    :math:`10^6 (1 + \max|z_0|)` from 0, :math:`z_0` the initial positions) and warns with this class; a sampler
    built with ``strict=True`` raises :class:`ChainDivergenceError` instead. The Langevin MCMC kernels of
    :mod:`tilted_priors.inference` warn with it too. The message names the sampler, the number of steps, how far the
    chains went and what to change (a smaller ``step_size``, ``step_size="auto"``, ``MALA`` instead of ULA).

    Parameters
    ----------
    sampler : str
        Name of the sampler.
    step : int
        The number of steps after which the chains were found out of range (the step itself when known).
    ratio : float
        How far out the farthest chain went, in units of ``reference``.
    num_bad : int, optional
        How many chains were out of range.
    step_size : float or "auto", optional
        The step size in use.
    reference : str, optional
        What ``ratio`` is measured against, read after it (e.g. ``"times 1 + max|init| (= 2.9) from 0"`` or
        ``"base standard deviations from the base's mean"``).
    label : str, optional
        Which chain it was (e.g. ``"the prior's sampler"``).
    lipschitz : float, optional
        The gradient's Lipschitz constant measured near the starting points (gives a stable step size).
    adapted : bool
        Whether ``step_size`` was adapted (``step_size="auto"``).
    kernel : bool
        Whether the chain is an MCMC kernel's (``Langevin``): the advice is then ``adjusted=True`` rather than
        ``MALA`` or ``step_size="auto"``.

    Examples
    --------
    >>> w = ChainRangeWarning("ShortRunLangevin", 20, 3.2e10, 8, step_size=3.0,
    ...                       reference="base standard deviations from the base's mean")
    >>> isinstance(w, UserWarning), w.ratio
    (True, 32000000000.0)
    >>> print(str(w)[:105])
    ShortRunLangevin: the chains ran away: after 20 steps 8 chains were 3.2e+10 base standard deviations from
    """

    def __init__(self, sampler: str, step: int, ratio: float, num_bad: int | None = None, *,
                 step_size: float | str | None = None, reference: str | None = None, label: str | None = None,
                 lipschitz: float | None = None, adapted: bool = False, kernel: bool = False):
        self.sampler, self.step, self.ratio, self.num_bad = sampler, int(step), float(ratio), num_bad
        self.step_size = step_size if step_size is None or isinstance(step_size, str) else float(step_size)
        self.reference, self.label, self.adapted = reference, label, bool(adapted)
        self.lipschitz = None if lipschitz is None else float(lipschitz)
        self.kernel = bool(kernel)
        who = sampler if not label else f"{sampler} ({label})"
        super().__init__(_runaway_message(who, self.step, self.ratio, num_bad, reference, self.step_size,
                                          self.adapted, self.lipschitz, self.kernel))

    def __reduce__(self):
        kwargs = {"step_size": self.step_size, "reference": self.reference, "label": self.label,
                  "lipschitz": self.lipschitz, "adapted": self.adapted, "kernel": self.kernel}
        return (functools.partial(type(self), **kwargs), (self.sampler, self.step, self.ratio, self.num_bad))


def _step_size_advice(h, adapted: bool, lip: float | None, auto: bool = True) -> str:
    """"use a smaller step size than h ...", with the stability bound of a measured Lipschitz constant (and
    ``step_size='auto'`` where ``auto``)."""
    if h is None or isinstance(h, str):
        advice = "use a smaller step size (a fixed one)"
    elif adapted:
        advice = f"use a smaller step size than the adapted {h:g} (a fixed one)"
    else:
        advice = f"use a smaller step size than {h:g}"
    if lip is not None and math.isfinite(lip) and lip > 0:
        advice += (f": the gradient's Lipschitz constant measured near the starting points is L = {lip:.3g} (the "
                   "largest ratio of gradient to position differences), and a Langevin step is stable only for "
                   f"step_size < 2/sqrt(L) = {2 / math.sqrt(lip):.3g}")
    suggestion = suggested_step_size(lip, "auto" if h is None else h)
    if suggestion is not None:
        advice += f"; try step_size={suggestion:.3g}"
        if auto and not adapted and h is not None and not isinstance(h, str):
            advice += " or step_size='auto'"
    elif auto and not adapted and h is not None and not isinstance(h, str):
        advice += ", or step_size='auto'"
    return advice


def _runaway_message(who: str, step: int, ratio: float, num_bad: int | None, reference: str | None, step_size,
                     adapted: bool, lipschitz: float | None, kernel: bool = False) -> str:
    """The message of a :class:`ChainRangeWarning` (and of the ``strict`` :class:`ChainDivergenceError`)."""
    chains = "the chains" if num_bad is None else f"{num_bad} chain{'s' if num_bad != 1 else ''}"
    verb = "was" if num_bad == 1 else "were"
    unit = f" {reference}" if reference else " times the reference scale"
    advice = _step_size_advice(step_size, adapted, lipschitz, auto=not kernel)
    if kernel and "ULA" in who:
        advice += ", or adjusted=True (MALA, whose Metropolis test rejects such moves)"
    elif who.startswith("ShortRunLangevin"):
        advice += ", or MALA instead of unadjusted Langevin (its Metropolis test rejects such moves)"
    return (f"{who}: the chains ran away: after {step} step{'s' if step != 1 else ''} {chains} {verb} {ratio:.3g}"
            f"{unit}, beyond the {RANGE_FACTOR:g} that any reasonable target allows: the draws are finite "
            f"but meaningless. To fix it, {advice}; also check that the log density is bounded above (an energy "
            "that decreases without bound lets every sampler run away).")
