r"""Backend-free schedules: inverse temperatures for annealed importance sampling."""
from __future__ import annotations

import numpy as np

__all__ = ["annealing_betas"]


def annealing_betas(num_steps: int, kind: str = "sigmoid", scale: float = 4.0) -> np.ndarray:
    r"""Inverse temperatures :math:`0 = \beta_0 < \beta_1 < \dots < \beta_T = 1` for annealing.

    The path between a base density :math:`q` and the tilted density :math:`e^{-E} q / Z` is geometric,

    .. math:: \pi_t(z) \propto e^{-\beta_t E(z)}\, q(z).

    ``kind="linear"`` spaces :math:`\beta` evenly; ``kind="sigmoid"`` (Grosse et al. 2015) uses
    :math:`\sigma(s(2t/T - 1))` rescaled to :math:`[0, 1]`, denser at both ends, where the log weights change fastest.

    Parameters
    ----------
    num_steps : int
        Number of annealing steps :math:`T \ge 1`.
    kind : {"sigmoid", "linear"}
        Spacing of the temperatures.
    scale : float
        Steepness :math:`s` of the sigmoid schedule.

    Returns
    -------
    numpy.ndarray
        ``num_steps + 1`` increasing values, first 0 and last 1 (float64).

    Examples
    --------
    >>> annealing_betas(4, kind="linear")
    array([0.  , 0.25, 0.5 , 0.75, 1.  ])
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    t = np.linspace(0.0, 1.0, int(num_steps) + 1)
    if kind == "linear":
        return t
    if kind == "sigmoid":
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        s = 1.0 / (1.0 + np.exp(-scale * (2.0 * t - 1.0)))
        return (s - s[0]) / (s[-1] - s[0])
    raise ValueError(f"kind must be 'sigmoid' or 'linear', got {kind!r}")
