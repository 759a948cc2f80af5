r"""Samplers that draw from a log density given starting points, batched over chains (torch).

Each sampler runs a fixed number of steps of the functional core in :mod:`tilted_priors.pyro.langevin`:

- :class:`ShortRunLangevin` — unadjusted Langevin (ULA), LEBM's short-run sampler,
- :class:`MALA` — Metropolis-adjusted Langevin, exact for its target and reports acceptance,
- :class:`Persistent` — wraps either and continues from where the last call stopped.

``run(log_density, init)`` takes ``log_density`` mapping ``(..., d) -> (...)`` (it need not be normalised) and
``init`` of shape ``(..., d)`` (one chain per leading index) and returns samples of the same shape, detached.
A chain whose log density becomes non-finite raises :class:`~tilted_priors.ChainDivergenceError`.
Randomness comes from torch's global generator (``pyro.set_rng_seed``).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from tilted_priors._persistent import PersistentBase
from tilted_priors._validation import check_positive_int, check_step_size
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.pyro import langevin

__all__ = ["SamplerInfo", "ShortRunLangevin", "MALA", "Persistent"]


class SamplerInfo(NamedTuple):
    """Summary of one ``run``: mean acceptance probability per chain (1 for ULA) and the final log density."""

    acceptance_rate: torch.Tensor
    logdensity: torch.Tensor


def _check_finite(name: str, state: langevin.LangevinState, step: int, step_size: float) -> None:
    # One reduction and one sync per step: a sum is non-finite iff some term is (or it overflows, which
    # also means the chains have run away).
    if not math.isfinite(state.logdensity.sum().item()):
        num_bad = int((~torch.isfinite(state.logdensity)).sum())
        raise ChainDivergenceError(name, step, step_size, num_bad or None)


class _Langevin:
    """Shared run loop of the Langevin samplers; subclasses define one ``_step``."""

    _adjusted = True  # Metropolis-adjusted: every step needs the log density of its proposal
    noise = True

    def __init__(self, steps: int, step_size: float):
        self.steps = check_positive_int("steps", steps)
        self.step_size = check_step_size(step_size)

    def _step(self, state: langevin.LangevinState, log_density):  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, log_density: Callable[[torch.Tensor], torch.Tensor], init: torch.Tensor, *,
            return_info: bool = False):
        """Run ``steps`` steps from ``init``; return the final positions (and a :class:`SamplerInfo`)."""
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"init must be a torch.Tensor of shape (..., d), got {type(init).__name__}")
        name = type(self).__name__
        state = langevin.init(init, log_density)
        _check_finite(name, state, 0, self.step_size)
        acceptance = 0.0
        last = self.steps if (return_info or self._adjusted) else self.steps - 1
        for i in range(last):
            state, info = self._step(state, log_density)
            _check_finite(name, state, i + 1, self.step_size)
            if return_info:
                acceptance = acceptance + info.acceptance_rate
        if last < self.steps:
            # The last unadjusted step only moves: its log density and gradient would go unused (as in a
            # hand-written loop), so only the position is checked.
            position = langevin.move(None, state, self.step_size, self.noise)
            if not math.isfinite(position.sum().item()):
                raise ChainDivergenceError(name, self.steps, self.step_size,
                                           int((~torch.isfinite(position)).any(-1).sum()) or None)
            return position
        if return_info:
            rate = torch.as_tensor(acceptance / self.steps, dtype=state.logdensity.dtype).expand_as(state.logdensity)
            return state.position, SamplerInfo(rate, state.logdensity)
        return state.position

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, step_size={self.step_size:g})"


class ShortRunLangevin(_Langevin):
    r"""Short-run unadjusted Langevin dynamics (ULA), as in LEBM (Pang et al. 2020).

    .. math:: z_{k+1} = z_k + \tfrac{h^2}{2} \nabla_z \log \pi(z_k) + h\, \xi_k, \qquad \xi_k \sim \mathcal N(0, I)

    for ``steps`` steps with ``step_size`` :math:`h`. Not Metropolis-corrected: its samples follow a law that
    differs from :math:`\pi` by :math:`O(h^2)` even after many steps, and a short run is not convergent at all —
    it is a learned generator (see :mod:`tilted_priors.inference.diagnostics`). LEBM uses 60 x 0.4 for the prior and
    20 x 0.1 for the posterior. ``log_density`` need not be normalised.

    Parameters
    ----------
    steps : int
        Number of Langevin steps.
    step_size : float
        :math:`h > 0`, the noise scale; the drift is :math:`h^2 / 2` times the gradient.
    noise : bool
        ``False`` drops the noise term (gradient ascent on :math:`\log\pi`).

    Examples
    --------
    >>> import torch
    >>> z = ShortRunLangevin(60, 0.4).run(lambda z: -0.5 * (z ** 2).sum(-1), torch.zeros(100, 2))
    >>> z.shape
    torch.Size([100, 2])
    """

    _adjusted = False

    def __init__(self, steps: int = 60, step_size: float = 0.4, noise: bool = True):
        super().__init__(steps, step_size)
        self.noise = bool(noise)

    def _step(self, state, log_density):
        return langevin.ula_step(None, state, log_density, self.step_size, self.noise)

    def __repr__(self) -> str:
        return f"ShortRunLangevin(steps={self.steps}, step_size={self.step_size:g}, noise={self.noise})"


class MALA(_Langevin):
    r"""Metropolis-adjusted Langevin algorithm: the Langevin proposal plus an accept/reject step.

    .. math:: \alpha = \min\Bigl\{1, \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)}\Bigr\},
              \qquad q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}\nabla\log\pi(z),\, h^2 I\bigr)

    Leaves :math:`\pi` exactly invariant, so long runs converge to it. ``run(..., return_info=True)`` returns
    the mean acceptance probability per chain (aim for about 0.5–0.8 by tuning ``step_size``).
    ``log_density`` need not be normalised.

    Examples
    --------
    >>> import torch
    >>> z, info = MALA(200, 0.8).run(lambda z: -0.5 * (z ** 2).sum(-1), torch.zeros(50, 2), return_info=True)
    >>> bool(0.0 < info.acceptance_rate.mean() < 1.0)
    True
    """

    def __init__(self, steps: int = 1000, step_size: float = 0.1):
        super().__init__(steps, step_size)

    def _step(self, state, log_density):
        return langevin.mala_step(None, state, log_density, self.step_size)


class Persistent(PersistentBase):
    """Keep the chains' state between calls: each ``run`` continues where the previous one stopped.

    The first call (or a call whose ``init`` has another shape, or after :meth:`reset`) starts from ``init``;
    later calls ignore ``init`` and continue from the stored positions (persistent contrastive divergence).

    Parameters
    ----------
    sampler : ShortRunLangevin or MALA
        The sampler that moves the chains at each call.

    Examples
    --------
    >>> import torch
    >>> s = Persistent(ShortRunLangevin(10, 0.1))
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> a = s.run(f, torch.zeros(8, 2)); b = s.run(f, torch.zeros(8, 2))
    >>> bool((s.state == b).all())
    True
    """

    def run(self, log_density, init: torch.Tensor, *, return_info: bool = False):
        """Continue the stored chains (or start them at ``init``) for ``sampler.steps`` steps."""
        out = self.sampler.run(log_density, self._start(init).to(init), return_info=return_info)
        self.state = (out[0] if return_info else out).detach().clone()
        return out
