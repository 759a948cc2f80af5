"""Errors shared by both backends."""
from __future__ import annotations

__all__ = ["ChainDivergenceError"]


class ChainDivergenceError(FloatingPointError):
    """A Markov chain reached a non-finite state.

    Raised by every sampler in :mod:`tilted_priors` when the log density of some chain becomes ``nan`` or
    ``inf``. The message names the sampler, the step at which it happened and what to change.

    Parameters
    ----------
    sampler : str
        Name of the sampler that diverged.
    step : int
        1-based index of the first step whose state was non-finite (0: the initial state).
    step_size : float
        Step size in use.
    num_bad : int, optional
        How many chains were non-finite at that step.

    Examples
    --------
    >>> err = ChainDivergenceError("ShortRunLangevin", step=12, step_size=0.4, num_bad=3)
    >>> err.step
    12
    """

    def __init__(self, sampler: str, step: int, step_size: float, num_bad: int | None = None):
        self.sampler, self.step, self.step_size, self.num_bad = sampler, int(step), float(step_size), num_bad
        where = "the initial state" if step == 0 else f"step {step}"
        chains = "" if num_bad is None else f" ({num_bad} chain{'s' if num_bad != 1 else ''})"
        if step == 0:
            advice = "check the initial positions and that the log density is finite there"
        else:
            advice = (f"use a smaller step size than {step_size:g} (try {step_size / 2:g}), check that the "
                      "energy is finite and smooth, or start the chains closer to the typical set")
        super().__init__(f"{sampler}: the chain became non-finite at {where}{chains}; {advice}.")

    def __reduce__(self):
        return (type(self), (self.sampler, self.step, self.step_size, self.num_bad))
