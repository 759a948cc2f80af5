r"""L-lag coupling bounds for the Langevin samplers (torch): how many steps does a chain need?

:func:`coupling_bound` runs pairs of coupled chains of a :class:`~tilted_priors.pyro.MALA` or
:class:`~tilted_priors.pyro.ShortRunLangevin` and returns a
:class:`~tilted_priors.inference.diagnostics.CouplingBound`: upper bounds on the total variation (and
1-Wasserstein) distance between the chain's law after :math:`t` steps and its stationary law, for every
:math:`t` up to the budget (Biswas, Jacob and Vanetti 2019; the formulas and the treatment of pairs that did not
meet are in :mod:`tilted_priors.inference.diagnostics.coupling`).

**The coupled kernel and what is bounded** (the distance to the target for MALA, to ULA's own biased
stationary law for ``ShortRunLangevin``): see :mod:`tilted_priors.inference.diagnostics.coupling`.

**Cost.** Up to ``num_pairs * (2 * max_steps - lag)`` evaluations of the log density and its gradient, batched
over the pairs (one batch per chain and step), and ``num_pairs * (max_steps + 1)`` stored distances; the loop
stops as soon as every pair has met. Randomness comes from torch's global generator (``pyro.set_rng_seed``), as
for the samplers.
"""
from __future__ import annotations

from typing import Callable

import torch

from tilted_priors.errors import ChainDivergenceError
from tilted_priors.inference.diagnostics.coupling import (CouplingBound, _check_budget, _check_drawn, _pairs_from,
                                                          _sampler_settings)
from tilted_priors.pyro import langevin
from tilted_priors.pyro._chain_checks import check_init
from tilted_priors.pyro.samplers import MALA, ShortRunLangevin

__all__ = ["coupling_bound", "CouplingBound"]


def _reflection_maximal(rng_key: torch.Generator | None, mean_x: torch.Tensor, mean_y: torch.Tensor,
                        step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A draw of the reflection-maximal coupling of :math:`\mathcal N(\mu_x, h^2 I)` and
    :math:`\mathcal N(\mu_y, h^2 I)`, batched over the leading dimensions; equal rows are the same tensor values."""
    h = step_size
    zeta = (mean_x - mean_y) / h
    xi = torch.randn(mean_x.shape, generator=rng_key, dtype=mean_x.dtype, device=mean_x.device)
    u = torch.rand(mean_x.shape[:-1], generator=rng_key, dtype=mean_x.dtype, device=mean_x.device)
    shifted = xi + zeta
    log_ratio = 0.5 * ((xi * xi).sum(-1) - (shifted * shifted).sum(-1))  # log phi(xi + zeta) - log phi(xi)
    meet = torch.log(u) <= log_ratio
    norm = zeta.norm(dim=-1, keepdim=True)
    e = torch.where(norm > 0, zeta / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(zeta))
    reflected = xi - 2.0 * (e * xi).sum(-1, keepdim=True) * e
    new_x = mean_x + h * xi
    return new_x, torch.where(meet.unsqueeze(-1), new_x, mean_y + h * reflected)


def _evaluated(position: torch.Tensor, logdensity_fn) -> langevin.LangevinState:
    return langevin.LangevinState(position, *langevin.value_and_grad(logdensity_fn, position))


def _select(mask: torch.Tensor, a: langevin.LangevinState, b: langevin.LangevinState) -> langevin.LangevinState:
    """Per chain: ``a`` where ``mask``, else ``b``."""
    return langevin.LangevinState(torch.where(mask.unsqueeze(-1), a.position, b.position),
                                  torch.where(mask, a.logdensity, b.logdensity),
                                  torch.where(mask.unsqueeze(-1), a.logdensity_grad, b.logdensity_grad))


def _coupled_step(rng_key: torch.Generator | None, x: langevin.LangevinState, y: langevin.LangevinState,
                  logdensity_fn, step_size: float, kind: str) -> tuple[langevin.LangevinState, langevin.LangevinState]:
    """One step of the coupled kernel on the pairs ``(x, y)``: reflection-maximal proposals, and for ``kind="mala"``
    a common uniform in the accept step. Each of ``x``, ``y`` moves by the sampler's own kernel."""
    h = step_size
    mean_x = x.position + (0.5 * h * h) * x.logdensity_grad  # as langevin.move computes it
    mean_y = y.position + (0.5 * h * h) * y.logdensity_grad
    prop_x, prop_y = _reflection_maximal(rng_key, mean_x, mean_y, h)
    new_x, new_y = _evaluated(prop_x, logdensity_fn), _evaluated(prop_y, logdensity_fn)
    if kind == "ula":
        return new_x, new_y
    log_x = langevin.log_acceptance_ratio(x, new_x, h)
    log_y = langevin.log_acceptance_ratio(y, new_y, h)
    u = torch.rand(log_x.shape, generator=rng_key, dtype=log_x.dtype, device=log_x.device)
    accept_x = u < log_x.clamp(max=0.0).exp()  # as langevin.metropolis_accept decides, with one u for both
    accept_y = u < log_y.clamp(max=0.0).exp()
    return _select(accept_x, new_x, x), _select(accept_y, new_y, y)


def _starts(init, num_pairs: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting points ``(X_0, Y_0)``, each ``(num_pairs, d)``."""
    if isinstance(init, torch.Tensor):
        check_init(init)
        n = _pairs_from(tuple(init.shape), num_pairs, "init")
        x0 = init.detach().expand(n, init.shape[-1]).clone()
        return x0, x0.clone()
    if hasattr(init, "sample"):
        if num_pairs is None:
            raise ValueError("init is a distribution: give num_pairs, the number of pairs of chains to draw")
        x0, y0 = init.sample((num_pairs,)), init.sample((num_pairs,))
        what = f"init.sample(({num_pairs},))"
    elif callable(init):
        if num_pairs is None:
            raise ValueError("init is a function init(n) -> (n, d): give num_pairs, the number of pairs of chains")
        x0, y0 = init(num_pairs), init(num_pairs)
        what = f"init({num_pairs})"
    else:
        raise TypeError("init must be a starting point (d,) or one per pair (num_pairs, d) as a torch.Tensor, a "
                        "distribution with .sample(sample_shape), or a function init(n) -> (n, d), got "
                        f"{type(init).__name__}")
    for z in (x0, y0):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{what} must return a torch.Tensor of shape ({num_pairs}, d), got {type(z).__name__}")
        check_init(z)
        _check_drawn(tuple(z.shape), num_pairs, what)
    return x0.detach(), y0.detach()


def coupling_bound(sampler, log_density: Callable[[torch.Tensor], torch.Tensor], init, *, lag: int,
                   num_pairs: int | None = None, max_steps: int) -> CouplingBound:
    r"""Upper bounds on :math:`d_{TV}(\pi_t, \pi)` and :math:`d_{W_1}(\pi_t, \pi)` for ``t = 0..max_steps``,
    from ``num_pairs`` pairs of ``lag``-lagged coupled chains of ``sampler``.

    :math:`\pi_t` is the law of ``sampler``'s chain after :math:`t` steps from ``init``, :math:`\pi` its
    stationary law (the target for MALA, ULA's own biased limit for ``ShortRunLangevin``). For each pair,
    :math:`X_0` and :math:`Y_0` are drawn from ``init``; :math:`X` runs ``lag`` steps of ``sampler`` alone, then
    :math:`(X_s, Y_{s-L})` move by the coupled kernel (see the module notes) until they meet, :math:`\tau =
    \min\{s \ge L : X_s = Y_{s-L}\}`, or :math:`X` has run ``max_steps`` steps. Then

    .. math:: d_{TV}(\pi_t, \pi) \le \mathbb E\Bigl[\max\Bigl(0, \Bigl\lceil \frac{\tau - L - t}{L} \Bigr\rceil
              \Bigr)\Bigr],

    estimated by the mean over the pairs (with its standard error). A pair that did not meet has
    :math:`\tau = \infty` and makes the bounds ``inf`` at every step: raise ``max_steps``.

    Parameters
    ----------
    sampler : MALA or ShortRunLangevin
        The kernel, with its fixed ``step_size`` (and ``noise=True`` for ULA); ``sampler.steps`` is not used.
        ``step_size="auto"`` raises ``ValueError``: it adapts within each run, so pass the numeric step size (for
        example the adapted one, ``SamplerInfo.step_size`` of a run with ``return_info=True``).
    log_density : callable
        ``(num_pairs, d) -> (num_pairs,)``, the unnormalised log density, written with torch operations.
    init : torch.Tensor, distribution or callable
        The initial law :math:`\pi_0`:

        - a tensor ``(d,)``: every chain starts at this point (:math:`\pi_0 = \delta_{x_0}`); needs ``num_pairs``;
        - a tensor ``(num_pairs, d)``: both chains of pair ``i`` start at ``init[i]``; the bound is then the
          average over the starts of the bound from each start, which bounds the distance from the mixture of
          the starts too;
        - a distribution with ``.sample(sample_shape)`` (e.g. the base ``Normal(0, 1).expand([d]).to_event(1)``,
          LEBM's starts), or a function ``init(n) -> (n, d)``: :math:`X_0` and :math:`Y_0` are independent draws;
          needs ``num_pairs``.
    lag : int
        :math:`L \ge 1`. A larger lag gives a tighter bound at large :math:`t` and needs a larger ``max_steps``;
        about the number of steps one means to run is a good start.
    num_pairs : int, optional
        The number of pairs (at least 2); taken from ``init`` when it is ``(num_pairs, d)``.
    max_steps : int
        The budget: the most steps the leading chain runs (more than ``lag``); the bounds are given for
        ``t = 0..max_steps``.

    Returns
    -------
    CouplingBound
        ``steps``, ``tv_bound``, ``tv_stderr``, ``w1_bound``, ``w1_stderr``, ``meeting_times`` (``inf``: unmet),
        ``num_unmet``, ...; ``.steps_for(tv)`` gives the fewest steps whose bound is at most ``tv``.

    Raises
    ------
    TypeError
        For a sampler that is not a ``MALA`` or a ``ShortRunLangevin`` (a ``Persistent``: pass its ``.sampler``), or
        an ``init`` of another kind.
    ValueError
        For ``step_size="auto"``, ``noise=False``, a ``max_steps`` not above ``lag``, fewer than 2 pairs, or
        starting points of the wrong shape.
    ChainDivergenceError
        When a chain's log density becomes non-finite (a step size beyond the stability bound).

    Examples
    --------
    MALA with step 0.5 on :math:`\mathcal N(0, 1)`, from the point 3 (the exact distances are 0.30 after 10 steps
    and 0.07 after 20):

    >>> import pyro, torch
    >>> from tilted_priors.pyro import MALA
    >>> pyro.set_rng_seed(0)
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> b = coupling_bound(MALA(100, 0.5), f, torch.tensor([3.0]), lag=20, num_pairs=500, max_steps=300)
    >>> b.num_unmet, bool(0.25 < b.tv_bound[10] < 0.5), 15 < b.steps_for(0.1) < 40
    (0, True, True)
    """
    kind, h = _sampler_settings(sampler, MALA, ShortRunLangevin)
    lag, num_pairs, max_steps = _check_budget(lag, num_pairs, max_steps)
    x0, y0 = _starts(init, num_pairs)
    n = x0.shape[0]
    name = f"coupling_bound({type(sampler).__name__})"
    step = (lambda state: langevin.mala_step(None, state, log_density, h)) if kind == "mala" else \
        (lambda state: langevin.ula_step(None, state, log_density, h))

    def check(states, s: int, met=None) -> bool:
        """Raise when a chain is non-finite at step ``s``; return whether every pair has met (one sync)."""
        finite = torch.stack([torch.isfinite(st.logdensity).all() for st in states]).all()
        flags = torch.stack([finite, met.all() if met is not None else finite]).tolist()
        if not flags[0]:
            num_bad = int(sum((~torch.isfinite(st.logdensity)).sum() for st in states))
            raise ChainDivergenceError(name, s, h, num_bad)
        return bool(flags[1])

    with torch.no_grad():
        x, y = langevin.init(x0, log_density), langevin.init(y0, log_density)
        check((x, y), 0)
        for s in range(1, lag + 1):
            x, _ = step(x)
            check((x,), s)
        distances = torch.zeros(n, max_steps + 1, dtype=x.position.dtype, device=x.position.device)
        met = (x.position == y.position).all(-1)
        y = _select(met, x, y)
        tau = torch.where(met, lag, -1)
        distances[:, lag] = (x.position - y.position).norm(dim=-1)
        s = lag
        while s < max_steps and not check((x, y), s, met):
            x, y = _coupled_step(None, x, y, log_density, h, kind)
            s += 1
            y = _select(met, x, y)  # a pair that met stays together, bit for bit
            now = (x.position == y.position).all(-1)
            y = _select(now, x, y)  # the newly met: the same log density and gradient too
            tau = torch.where(now & ~met, s, tau)
            met = now
            distances[:, s] = (x.position - y.position).norm(dim=-1)
        check((x, y), s)
    tau = tau.to(torch.float64).cpu().numpy()
    tau[tau < 0] = float("inf")
    return CouplingBound.from_meeting_times(tau, lag, max_steps, distances=distances.cpu().numpy())
