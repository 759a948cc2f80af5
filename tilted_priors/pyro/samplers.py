r"""Samplers that draw from a log density given starting points, batched over chains (torch).

Each sampler runs a fixed number of steps of the functional core in :mod:`tilted_priors.pyro.langevin`:

- :class:`ShortRunLangevin` — unadjusted Langevin (ULA), LEBM's short-run sampler,
- :class:`MALA` — Metropolis-adjusted Langevin, exact for its target and reports acceptance,
- :class:`Persistent` — wraps either and continues from where the last call stopped.

``run(log_density, init)`` takes ``log_density`` mapping ``(..., d) -> (...)`` (it need not be normalised) and
``init`` of shape ``(..., d)`` (one chain per leading index) and returns samples of the same shape, detached.
A chain whose log density becomes non-finite raises :class:`~tilted_priors.ChainDivergenceError`, whose message
gives a step size within the stability bound measured at ``init`` (see :mod:`tilted_priors._adapt`).
Randomness comes from torch's global generator (``pyro.set_rng_seed``).

**Runaway chains.** Chains that stay finite but leave any reasonable range (an unstable step size that stops short
of overflowing) are found once per ``run``, from the final positions, by the rule of :mod:`tilted_priors._adapt`:
farther than :math:`10^6` base standard deviations from the base's mean for an
:class:`~tilted_priors.pyro.EnergyTilted`'s log density (its ``annealed_log_density``), else farther than
:math:`10^6 (1 + \max|z_0|)` from 0, :math:`z_0` = ``init``. They warn with :class:`~tilted_priors.ChainRangeWarning`,
or raise :class:`~tilted_priors.ChainDivergenceError` for a sampler built with ``strict=True``.

**Checks of the arguments.** ``init`` must be a floating tensor (an integer one raises ``TypeError``), and
``log_density`` must return a tensor of the chains' shape (a Python float or NumPy array raises ``TypeError``).
The first time a sampler runs on an :class:`~tilted_priors.pyro.EnergyTilted`'s log density it checks that the
energy's gradient reaches ``z`` (an energy computed with NumPy or ``.detach()`` adds nothing to the chains'
drift) and warns once per energy with a :class:`UserWarning` when it does not.

**Step size.** ``step_size="auto"`` scales the step size to the target and adapts it within each ``run``: it
starts from :math:`1/\sqrt{\hat L}`, :math:`\hat L` the gradient's Lipschitz constant probed at ``init``, moves
:math:`\log h` towards a target Metropolis-Hastings acceptance during the first half of the steps (MALA accepts
with it; ULA only measures it) and keeps the last value for the second half (:mod:`tilted_priors._adapt` has the
rule). A fixed step size runs exactly the loop it always did.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch

from tilted_priors import _adapt
from tilted_priors._persistent import PersistentBase
from tilted_priors._validation import check_flag, check_positive_int
from tilted_priors.errors import ChainDivergenceError, ChainRangeWarning
from tilted_priors.pyro import langevin
from tilted_priors.pyro._chain_checks import (base_loc_scale, check_energy_reaches_z, check_finite, check_init,
                                              range_ratio, range_scale, tilted_of)
from tilted_priors.pyro._chains import initial_step, lipschitz

__all__ = ["SamplerInfo", "ShortRunLangevin", "MALA", "Persistent"]


class SamplerInfo(NamedTuple):
    """Summary of one ``run``: mean acceptance probability per chain (1 for ULA; with ``step_size="auto"`` over the
    steps after the warm-up), the final log density and the step size used (the adapted one for ``"auto"``)."""

    acceptance_rate: torch.Tensor
    logdensity: torch.Tensor
    step_size: torch.Tensor | None = None


class _Langevin:
    """Shared run loop of the Langevin samplers; subclasses define one ``_step``."""

    _adjusted = True  # Metropolis-adjusted: every step needs the log density of its proposal
    _kind = "mala"
    noise = True

    def __init__(self, steps: int, step_size: float | str, target_accept: float | None = None,
                 strict: bool = False):
        self.steps = check_positive_int("steps", steps)
        self.step_size = _adapt.check_step_size_or_auto(step_size)
        self.target_accept = _adapt.check_target_accept(target_accept, self.step_size, self._kind)
        self.strict = check_flag(strict, "strict")

    def _step(self, state: langevin.LangevinState, log_density, step_size):  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, log_density: Callable[[torch.Tensor], torch.Tensor], init: torch.Tensor, *,
            return_info: bool = False):
        """Run ``steps`` steps from ``init``; return the final positions (and a :class:`SamplerInfo`, with the
        adapted step size for ``step_size="auto"``).

        Parameters
        ----------
        log_density : callable
            ``(..., d) -> (...)``, the unnormalised log density of each chain, written with torch operations.
        init : torch.Tensor
            Starting positions ``(..., d)``, floating point.
        return_info : bool
            Also return a :class:`SamplerInfo`.

        Raises
        ------
        ChainDivergenceError
            When some chain's log density becomes non-finite (its message gives a step size within the stability
            bound measured at ``init``), or, with ``strict=True``, when the chains ran away (see below).
        TypeError
            When ``init`` is not a floating tensor, or ``log_density`` returns no tensor.
        ValueError
            When ``log_density`` returns a tensor of another shape than ``init.shape[:-1]``.

        Warns
        -----
        ChainRangeWarning
            When the final positions are out of range (the rule of :mod:`tilted_priors._adapt`; checked once, after
            the last step) and ``strict`` is ``False``.
        UserWarning
            Once per energy, when ``log_density`` is an :class:`~tilted_priors.pyro.EnergyTilted`'s whose energy
            does not depend on ``z`` through torch operations.
        """
        return self._run(log_density, init, return_info)

    def _run(self, log_density, init, return_info: bool, origin: torch.Tensor | None = None):
        """``run``, with the scale ``origin`` of the range rule (``1 + max|z_0|``) given by a ``Persistent``."""
        init = check_init(init)
        dist = tilted_of(log_density)
        if dist is not None:
            check_energy_reaches_z(dist, init)
        adapted = self.step_size == _adapt.AUTO
        name = type(self).__name__ + (" (step_size='auto')" if adapted else "")
        state = langevin.init(init, log_density)
        check_finite(name, state, 0, self.step_size)
        start = state
        try:
            if adapted:
                state, step_size, first = self._warm_up(state, log_density)
            else:
                step_size, first = self.step_size, 0
            out = self._run_fixed(name, state, log_density, step_size, first, return_info)
            self._check_range(name, out[0] if return_info else out, range_scale(init) if origin is None else origin,
                              base_loc_scale(dist), step_size, adapted, log_density, start)
            return out
        except ChainDivergenceError as err:
            if err.step > 0:
                err.adapted = adapted
                err.add_context(lipschitz=float(lipschitz(log_density, start)))
            raise

    def _check_range(self, name: str, position: torch.Tensor, origin: torch.Tensor, base, step_size,
                     adapted: bool, log_density, start: langevin.LangevinState) -> None:
        """Warn (``strict``: raise) when the final ``position`` is out of range: one reduction, one read."""
        worst, num_bad = range_ratio(position, origin.to(position), base)
        worst, num_bad = torch.stack([worst, num_bad.to(worst.dtype)]).tolist()
        if not worst > _adapt.RANGE_FACTOR:
            return
        if base is not None:
            reference = "base standard deviations from the base's mean"
        else:
            reference = f"times 1 + max|init| (= {float(origin):.3g}) from 0"
        h = float(step_size)
        if self.strict:
            raise ChainDivergenceError(name, self.steps, h, int(num_bad), adapted=adapted, ratio=worst,
                                       reference=reference)
        warnings.warn(ChainRangeWarning(name, self.steps, worst, int(num_bad), step_size=h, reference=reference,
                                        lipschitz=float(lipschitz(log_density, start)), adapted=adapted),
                      stacklevel=4)

    def _warm_up(self, state: langevin.LangevinState, log_density):
        """The adaptive first half of an ``"auto"`` run: ``(state, step size, steps done)``."""
        log_h, log_cap = initial_step(lipschitz(log_density, state), state.position, self._kind)
        target = self.target_accept
        warm = _adapt.warmup_steps(self.steps)
        for t in range(1, warm + 1):
            h = log_h.exp()
            new = langevin.proposal(None, state, log_density, h, self.noise)
            log_ratio = langevin.log_acceptance_ratio(state, new, h)
            # Metropolis-adjusted for both kinds: while h is still being found, a move that the MH test rejects (a
            # far start in a flat region probes a small curvature and takes a huge step) is not kept.
            state, info = langevin.metropolis_accept(None, state, new, log_ratio)
            accept = info.acceptance_rate
            mean = accept.mean()
            error = torch.where(mean > target, (mean - target) / (1.0 - target), (mean - target) / target)
            log_h = torch.minimum(log_h + error / math.sqrt(t), log_cap)
        # The curvature where the warm-up has brought the chains (near the typical set) caps h again: a probe at
        # far starting points can see much less curvature than the chains meet later.
        _, log_cap_end = initial_step(lipschitz(log_density, state), state.position, self._kind)
        return state, torch.minimum(log_h, log_cap_end).exp(), warm

    def _run_fixed(self, name: str, state: langevin.LangevinState, log_density, step_size, first: int,
                   return_info: bool):
        """Steps ``first + 1 .. steps`` with a fixed ``step_size``; the result of ``run``."""
        acceptance = 0.0
        full = return_info or self._adjusted  # every step evaluated and reported (else the last one only moves)
        last = self.steps if full else self.steps - 1
        for i in range(first, last):
            if full:
                state, info = self._step(state, log_density, step_size)
                if return_info:
                    acceptance = acceptance + info.acceptance_rate
            else:  # an unadjusted step keeps its proposal: no step information is built
                state = langevin.proposal(None, state, log_density, step_size, self.noise)
            check_finite(name, state, i + 1, step_size)
        if last < self.steps:
            # The last unadjusted step only moves: its log density and gradient would go unused (as in a
            # hand-written loop), so only the position is checked.
            position = langevin.move(None, state, step_size, self.noise)
            if not math.isfinite(position.sum().item()):
                raise ChainDivergenceError(name, self.steps, float(step_size),
                                           int((~torch.isfinite(position)).any(-1).sum()) or None)
            return position
        if return_info:
            dtype, device = state.logdensity.dtype, state.logdensity.device
            rate = torch.as_tensor(acceptance / (self.steps - first), dtype=dtype, device=device)
            return state.position, SamplerInfo(rate.expand_as(state.logdensity), state.logdensity,
                                               torch.as_tensor(step_size, dtype=dtype, device=device))
        return state.position

    def _extra_repr(self) -> str:
        """``target_accept`` when it is not the default of ``"auto"``, and ``strict=True``."""
        extra = ""
        if self.step_size == _adapt.AUTO and self.target_accept != _adapt.TARGET_ACCEPT[self._kind]:
            extra += f", target_accept={self.target_accept:g}"
        return extra + (", strict=True" if self.strict else "")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.steps}, step_size={_adapt.format_step_size(self.step_size)}"
                f"{self._extra_repr()})")


class ShortRunLangevin(_Langevin):
    r"""Short-run unadjusted Langevin dynamics (ULA), as in LEBM (Pang et al. 2020).

    .. math:: z_{k+1} = z_k + \tfrac{h^2}{2} \nabla_z \log \pi(z_k) + h\, \xi_k, \qquad \xi_k \sim \mathcal N(0, I)

    for ``steps`` steps with ``step_size`` :math:`h`. Not Metropolis-corrected: its samples follow a law that
    differs from :math:`\pi` by :math:`O(h^2)` even after many steps, and a short run is not convergent at all —
    it is a learned generator (see :mod:`tilted_priors.inference.diagnostics`). LEBM uses 60 x 0.4 for the prior and
    20 x 0.1 for the posterior. ``log_density`` need not be normalised.

    ``step_size="auto"`` scales :math:`h` to the target in each run: :math:`h_0 \propto 1/\sqrt{\hat L}` from the
    gradient's Lipschitz constant :math:`\hat L` probed at ``init``, then during the first half of the steps
    :math:`\log h` moves (Robbins-Monro) towards a Metropolis-Hastings acceptance of ``target_accept`` (0.95),
    which ULA only measures (its moves are all kept, but non-finite ones during the warm-up), never beyond
    :math:`0.8/\sqrt{\hat L}`; the second half runs with the last :math:`h` (``SamplerInfo.step_size``). See
    :mod:`tilted_priors._adapt`; the fixed-step chain is unchanged.

    Parameters
    ----------
    steps : int
        Number of Langevin steps.
    step_size : float or "auto"
        :math:`h > 0`, the noise scale; the drift is :math:`h^2 / 2` times the gradient. ``"auto"``: adapted in
        each run (see above).
    noise : bool
        ``False`` drops the noise term (gradient ascent on :math:`\log\pi`); needs a fixed ``step_size``.
    target_accept : float, optional
        The acceptance ``"auto"`` aims for (default 0.95); only with ``step_size="auto"``.
    strict : bool
        Raise :class:`~tilted_priors.ChainDivergenceError` for chains that ran away (finite but out of range,
        see the module notes) instead of warning with :class:`~tilted_priors.ChainRangeWarning`.

    Examples
    --------
    >>> import torch
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> z = ShortRunLangevin(60, 0.4).run(f, torch.zeros(100, 2))
    >>> z.shape
    torch.Size([100, 2])
    >>> z, info = ShortRunLangevin(60, "auto").run(lambda z: f(z / 0.01), z, return_info=True)
    >>> bool(0.003 < info.step_size < 0.01)   # scaled to the target's sd 0.01
    True
    """

    _adjusted = False
    _kind = "ula"

    def __init__(self, steps: int = 60, step_size: float | str = 0.4, noise: bool = True, *,
                 target_accept: float | None = None, strict: bool = False):
        super().__init__(steps, step_size, target_accept, strict)
        if not noise and self.step_size == _adapt.AUTO:
            raise ValueError("step_size='auto' adapts to the acceptance of noisy Langevin moves; with noise=False "
                             "(gradient ascent) give a fixed step_size")
        self.noise = check_flag(noise, "noise")

    def _step(self, state, log_density, step_size):
        return langevin.ula_step(None, state, log_density, step_size, self.noise)

    def __repr__(self) -> str:
        return (f"ShortRunLangevin(steps={self.steps}, step_size={_adapt.format_step_size(self.step_size)}, "
                f"noise={self.noise}{self._extra_repr()})")


class MALA(_Langevin):
    r"""Metropolis-adjusted Langevin algorithm: the Langevin proposal plus an accept/reject step.

    .. math:: \alpha = \min\Bigl\{1, \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)}\Bigr\},
              \qquad q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}\nabla\log\pi(z),\, h^2 I\bigr)

    Leaves :math:`\pi` exactly invariant, so long runs converge to it. ``run(..., return_info=True)`` returns
    the mean acceptance probability per chain (aim for about 0.5–0.8 by tuning ``step_size``, or let
    ``step_size="auto"`` do it). ``log_density`` need not be normalised.

    ``step_size="auto"`` scales :math:`h` to the target in each run: :math:`h_0 \propto 1/\sqrt{\hat L}` from the
    gradient's Lipschitz constant :math:`\hat L` probed at ``init``, then during the first half of the steps
    :math:`\log h` moves (Robbins-Monro) towards an acceptance of ``target_accept`` (0.574, optimal for MALA in
    high dimension), never beyond :math:`2.5/\sqrt{\hat L}`; the second half runs with the last :math:`h`, and
    ``SamplerInfo`` reports it and the acceptance over that half. The warm-up half is adaptive, hence not a Markov
    chain: start the draws you keep after it. See :mod:`tilted_priors._adapt`.

    Parameters
    ----------
    steps : int
        Number of MALA steps.
    step_size : float or "auto"
        :math:`h > 0`, the proposal's noise scale; ``"auto"``: adapted in each run (see above).
    target_accept : float, optional
        The acceptance ``"auto"`` aims for (default 0.574); only with ``step_size="auto"``.
    strict : bool
        Raise :class:`~tilted_priors.ChainDivergenceError` for chains that ran away instead of warning (as for
        :class:`ShortRunLangevin`).

    Examples
    --------
    >>> import torch
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> z, info = MALA(200, 0.8).run(f, torch.zeros(50, 2), return_info=True)
    >>> bool(0.0 < info.acceptance_rate.mean() < 1.0)
    True
    >>> z, info = MALA(200, "auto").run(lambda z: f(z / 5.0), z, return_info=True)
    >>> bool(0.45 < info.acceptance_rate.mean() < 0.7)
    True
    """

    def __init__(self, steps: int = 1000, step_size: float | str = 0.1, *, target_accept: float | None = None,
                 strict: bool = False):
        super().__init__(steps, step_size, target_accept, strict)

    def _step(self, state, log_density, step_size):
        return langevin.mala_step(None, state, log_density, step_size)


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
        """Continue the stored chains (or start them at ``init``) for ``sampler.steps`` steps.

        The range check of the wrapped sampler (see the module notes) measures against the ``init`` of the call
        that started the chains, so chains that drift away over many calls are reported too.
        """
        start = self._start(check_init(init))
        if start is init or getattr(self, "_origin", None) is None:
            self._origin = range_scale(init)
        if isinstance(self.sampler, _Langevin):
            out = self.sampler._run(log_density, start.to(init), return_info, self._origin)
        else:
            out = self.sampler.run(log_density, start.to(init), return_info=return_info)
        self.state = (out[0] if return_info else out).detach().clone()
        return out

    def reset(self) -> None:
        """Forget the stored chains (and the scale of their first starting points); the next call starts from its
        ``init``."""
        super().reset()
        self._origin = None
