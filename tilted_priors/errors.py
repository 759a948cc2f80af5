"""Errors shared by both backends."""
from __future__ import annotations

import functools
import math

from tilted_priors._adapt import suggested_step_size

__all__ = ["ChainDivergenceError"]


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

    Examples
    --------
    >>> err = ChainDivergenceError("ShortRunLangevin", step=12, step_size=0.4, num_bad=3, lipschitz=400.0)
    >>> err.step, err.suggested_step_size
    (12, 0.05)
    """

    def __init__(self, sampler: str, step: int, step_size: float | str, num_bad: int | None = None, *,
                 label: str | None = None, lipschitz: float | None = None, adapted: bool = False):
        self.sampler, self.step, self.num_bad = sampler, int(step), num_bad
        self.step_size = step_size if isinstance(step_size, str) else float(step_size)
        self.label = label
        self.lipschitz = None if lipschitz is None else float(lipschitz)
        self.adapted = bool(adapted)
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
        where = "the initial state" if self.step == 0 else f"step {self.step}"
        num_bad = self.num_bad
        chains = "" if num_bad is None else f" ({num_bad} chain{'s' if num_bad != 1 else ''})"
        if self.step == 0:
            advice = "check the initial positions and that the log density is finite there"
            return f"{who}: the chain became non-finite at {where}{chains}; {advice}."
        h, lip = self.step_size, self.lipschitz
        if isinstance(h, str):
            advice = "use a smaller step size (a fixed one)"
        elif self.adapted:
            advice = f"use a smaller step size than the adapted {h:g} (a fixed one)"
        else:
            advice = f"use a smaller step size than {h:g}"
        if lip is not None and math.isfinite(lip) and lip > 0:
            advice += (f": the gradient's Lipschitz constant measured near the starting points is L = {lip:.3g} (the "
                       "largest ratio of gradient to position differences), and a Langevin step is stable only for "
                       f"step_size < 2/sqrt(L) = {2 / math.sqrt(lip):.3g}")
        suggestion = self.suggested_step_size
        if suggestion is not None:
            advice += f"; try step_size={suggestion:.3g}"
            if not self.adapted and not isinstance(h, str):
                advice += " or step_size='auto'"
        advice += ("; check that the energy is finite and smooth, or start the chains closer to the typical set")
        return f"{who}: the chain became non-finite at {where}{chains}; {advice}."

    def __reduce__(self):
        kwargs = {"label": self.label, "lipschitz": self.lipschitz, "adapted": self.adapted}
        return (functools.partial(type(self), **kwargs), (self.sampler, self.step, self.step_size, self.num_bad))
