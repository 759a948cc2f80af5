r"""The functional core of the Langevin samplers (torch).

Written as BlackJAX writes kernels: :func:`init` builds a :class:`LangevinState` that caches the log density and
its gradient, and a step maps ``(rng_key, state, logdensity_fn, step_size)`` to ``(state, info)``. Both steps make
the same proposal (:func:`proposal`),

.. math:: z' = z + \tfrac{h^2}{2} \nabla \log \pi(z) + h\, \xi, \qquad \xi \sim \mathcal N(0, I),

:func:`ula_step` keeps it (unadjusted Langevin, biased by :math:`O(h^2)`), :func:`mala_step` accepts it with the
Metropolis-Hastings probability (exact stationary law :math:`\pi`); its pieces, :func:`log_acceptance_ratio` and
:func:`metropolis_accept`, are public for callers that need the proposal or the ratio (an MCMC kernel counting
divergences, an unadjusted chain measuring its discretisation error). :math:`h` is the ``step_size``, the scale of
the noise, as in LEBM (Pang et al. 2020). All arrays are batched over chains: positions ``(..., d)``, log densities
``(...)``; chains never interact. ``rng_key`` (named as in the JAX core) is a :class:`torch.Generator` or ``None``
(torch's global generator, seeded by ``pyro.set_rng_seed``). ``logdensity_fn`` need not be normalised.
"""
from __future__ import annotations

import os
import warnings
import weakref
from typing import Callable, NamedTuple

import torch

from tilted_priors._validation import check_energy_shape

__all__ = ["LangevinState", "LangevinInfo", "init", "proposal", "move", "ula_step", "mala_step", "value_and_grad",
           "log_acceptance_ratio", "metropolis_accept"]

LogDensityFn = Callable[[torch.Tensor], torch.Tensor]


class LangevinState(NamedTuple):
    """Position of every chain with its (unnormalised) log density and the gradient there."""

    position: torch.Tensor  # (..., d)
    logdensity: torch.Tensor  # (...)
    logdensity_grad: torch.Tensor  # (..., d)


class LangevinInfo(NamedTuple):
    """What one step did, per chain: the acceptance probability and whether the proposal was kept.

    Both have the chains' shape ``(...)`` (ULA keeps every proposal: ones and ``True``), as in the JAX core.
    """

    acceptance_rate: torch.Tensor  # (...)
    is_accepted: torch.Tensor  # (...) bool


def value_and_grad(logdensity_fn: LogDensityFn, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log density of each chain and its gradient w.r.t. the position, both detached.

    A log density that does not depend on ``z`` through torch operations (computed with NumPy, or ``.detach()``-ed)
    gets a zero gradient, and a :class:`UserWarning` says so, once per function (its chains would be a random walk).
    A log density with a ``replay(position)`` method (a traced one, as the posterior guides build) gives both from
    it when it returns them.

    Raises
    ------
    TypeError
        When ``logdensity_fn`` returns something else than a tensor (a Python float, a NumPy array).
    ValueError
        When it returns a tensor of another shape than the chains' ``(...)``.

    Examples
    --------
    >>> lp, g = value_and_grad(lambda z: -0.5 * (z ** 2).sum(-1), torch.ones(3, 2))
    >>> g.tolist()
    [[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]]
    """
    replay = getattr(logdensity_fn, "replay", None)
    if replay is not None:
        replayed = replay(position)
        if replayed is not None:
            return replayed
    with torch.enable_grad():
        z = position.detach().requires_grad_(True)
        lp = logdensity_fn(z)
        if not isinstance(lp, torch.Tensor):
            raise TypeError(_not_a_tensor_message("log_density", lp, tuple(z.shape)))
        if lp.shape != z.shape[:-1]:
            check_energy_shape("the log density", tuple(z.shape), tuple(lp.shape))
        grad = torch.autograd.grad(lp.sum(), z, allow_unused=True)[0] if lp.requires_grad else None
        if grad is None:  # a Python attribute: no synchronisation
            _warn_detached(logdensity_fn, "the log density")
            grad = torch.zeros_like(z)
    return lp.detach(), grad


def _not_a_tensor_message(what: str, value, shape: tuple) -> str:
    """The error for a function of ``z`` (shape ``shape``) that returned ``value``, not a tensor."""
    kind = "a Python float" if isinstance(value, float) else f"a {type(value).__module__}.{type(value).__qualname__}"
    return (f"{what} must return a tensor of shape {shape[:-1]} (one value per chain: it maps (..., d) to (...)), got "
            f"{kind}: build it with torch operations on z (e.g. -0.5 * (z ** 2).sum(-1)), not with Python or NumPy "
            "numbers, so that its gradient reaches z")


_WARNED: weakref.WeakSet = weakref.WeakSet()  # functions already reported by _warn_detached
_WARNED_IDS: set[int] = set()  # the same for objects that take no weak reference


def _warn_detached(fn, what: str = "the energy", stacklevel: int = 4) -> None:
    """Warn, once per ``fn``, that ``fn``'s output does not reach ``z`` through torch's graph."""
    try:
        if fn in _WARNED:
            return
        _WARNED.add(fn)
    except TypeError:  # not weakly referenceable
        if id(fn) in _WARNED_IDS:
            return
        _WARNED_IDS.add(id(fn))
    warnings.warn(f"{what} {_describe_fn(fn)} does not depend on z through torch operations (e.g. it is computed "
                  "with NumPy or .detach()); write it with torch functions. Its gradient is taken as zero, so it "
                  "adds nothing to the chains' drift.", UserWarning, stacklevel=stacklevel)


def _describe_fn(fn) -> str:
    """A short name for a user's function or module: ``EnergyMLP``, ``'energy' (defined at model.py:12)``."""
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    name = getattr(fn, "__name__", None)
    if not name:
        return type(fn).__name__
    code = getattr(fn, "__code__", None)
    where = f" (defined at {os.path.basename(code.co_filename)}:{code.co_firstlineno})" if code is not None else ""
    return f"{name!r}{where}"


def init(position: torch.Tensor, logdensity_fn: LogDensityFn) -> LangevinState:
    """Start chains at ``position`` (shape ``(..., d)``).

    Examples
    --------
    >>> state = init(torch.zeros(4, 2), lambda z: -0.5 * (z ** 2).sum(-1))
    >>> state.logdensity.shape
    torch.Size([4])
    """
    if position.dim() < 1:
        raise ValueError("positions must have shape (..., d), got a scalar")
    logdensity, grad = value_and_grad(logdensity_fn, position)
    return LangevinState(position.detach(), logdensity, grad)


def proposal(rng_key: torch.Generator | None, state: LangevinState, logdensity_fn: LogDensityFn,
             step_size: float, noise: bool = True) -> LangevinState:
    r"""The Langevin proposal :math:`z + \tfrac{h^2}{2}\nabla\log\pi(z) + h\xi`, evaluated (log density, gradient).

    With ``noise=False`` it is a gradient-ascent step on :math:`\log \pi`.
    """
    moved = move(rng_key, state, step_size, noise)
    logdensity, grad = value_and_grad(logdensity_fn, moved)
    return LangevinState(moved, logdensity, grad)


def move(rng_key: torch.Generator | None, state: LangevinState, step_size: float, noise: bool = True) -> torch.Tensor:
    r"""The proposed position :math:`z + \tfrac{h^2}{2}\nabla\log\pi(z) + h\xi` alone, not evaluated.

    What the last step of an unadjusted chain needs: nothing uses the log density there.

    Examples
    --------
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> move(None, init(torch.ones(2, 3), f), 1.0, noise=False).tolist()   # z + (1/2) * (-z)
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """
    z = state.position
    moved = z + (0.5 * step_size * step_size) * state.logdensity_grad
    if noise:
        moved = moved + step_size * torch.randn(z.shape, generator=rng_key, dtype=z.dtype, device=z.device)
    return moved


def ula_step(rng_key: torch.Generator | None, state: LangevinState, logdensity_fn: LogDensityFn,
             step_size: float, noise: bool = True) -> tuple[LangevinState, LangevinInfo]:
    """One unadjusted Langevin step: the proposal, always kept.

    Examples
    --------
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state, info = ula_step(None, init(torch.zeros(5, 2), f), f, 0.1)
    >>> bool(info.is_accepted.all())
    True
    """
    new = proposal(rng_key, state, logdensity_fn, step_size, noise)
    return new, LangevinInfo(torch.ones_like(new.logdensity), torch.ones_like(new.logdensity, dtype=torch.bool))


def _log_q(to: torch.Tensor, frm: LangevinState, step_size: float) -> torch.Tensor:
    """Log density (up to a constant shared by both directions) of proposing ``to`` from ``frm``."""
    diff = to - frm.position - (0.5 * step_size * step_size) * frm.logdensity_grad
    return -(diff * diff).sum(-1) / (2.0 * step_size * step_size)


def log_acceptance_ratio(state: LangevinState, new: LangevinState, step_size: float) -> torch.Tensor:
    r"""Metropolis-Hastings log-ratio of moving from ``state`` to the Langevin proposal ``new``, per chain.

    .. math:: \log \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)},
              \qquad q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}\nabla\log\pi(z),\, h^2 I\bigr)

    :func:`mala_step` accepts with probability :math:`\min(1, e^{\text{ratio}})`; for an unadjusted chain the
    same number measures the discretisation error of the step. A proposal with a non-finite log density, or a
    ratio that is ``nan`` (e.g. a non-finite gradient there), gets :math:`-\infty` (always rejected).

    Examples
    --------
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state = init(torch.zeros(2), f)
    >>> float(log_acceptance_ratio(state, state, 0.5))  # staying put: pi and q are symmetric
    0.0
    """
    log_ratio = (new.logdensity - state.logdensity
                 + _log_q(state.position, new, step_size) - _log_q(new.position, state, step_size))
    valid = torch.isfinite(new.logdensity) & ~torch.isnan(log_ratio)
    return torch.where(valid, log_ratio, -torch.inf)  # reject nan and +-inf


def metropolis_accept(rng_key: torch.Generator | None, state: LangevinState, new: LangevinState,
                      log_ratio: torch.Tensor) -> tuple[LangevinState, LangevinInfo]:
    r"""Keep ``new`` with probability :math:`\min(1, e^{\text{log\_ratio}})` per chain, else ``state``.

    The accept step of :func:`mala_step`, for callers that need the proposal or the ratio themselves (e.g. an
    MCMC kernel that counts divergent proposals).

    Examples
    --------
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state, new = init(torch.zeros(3, 2), f), init(torch.ones(3, 2), f)
    >>> kept, info = metropolis_accept(None, state, new, torch.full((3,), -torch.inf))
    >>> bool((kept.position == 0).all()), info.acceptance_rate.tolist()
    (True, [0.0, 0.0, 0.0])
    """
    acceptance = log_ratio.clamp(max=0.0).exp()
    u = torch.rand(acceptance.shape, generator=rng_key, dtype=acceptance.dtype, device=acceptance.device)
    accept = u < acceptance
    keep = accept.unsqueeze(-1)
    merged = LangevinState(torch.where(keep, new.position, state.position),
                           torch.where(accept, new.logdensity, state.logdensity),
                           torch.where(keep, new.logdensity_grad, state.logdensity_grad))
    return merged, LangevinInfo(acceptance, accept)


def mala_step(rng_key: torch.Generator | None, state: LangevinState, logdensity_fn: LogDensityFn,
              step_size: float) -> tuple[LangevinState, LangevinInfo]:
    r"""One Metropolis-adjusted Langevin step.

    Accepts the proposal :math:`z'` with probability
    :math:`\min\{1, \pi(z') q(z \mid z') / (\pi(z) q(z' \mid z))\}` (:func:`log_acceptance_ratio`,
    :func:`metropolis_accept`); a proposal with a non-finite log density is rejected.

    Examples
    --------
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state, info = mala_step(None, init(torch.zeros(5, 2), f), f, 0.5)
    >>> info.acceptance_rate.shape
    torch.Size([5])
    """
    new = proposal(rng_key, state, logdensity_fn, step_size)
    return metropolis_accept(rng_key, state, new, log_acceptance_ratio(state, new, step_size))
