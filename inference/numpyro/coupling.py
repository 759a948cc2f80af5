r"""L-lag coupling bounds for the Langevin samplers (JAX): how many steps does a chain need?

:func:`coupling_bound` runs pairs of coupled chains of a :class:`~tilted_priors.numpyro.MALA` or
:class:`~tilted_priors.numpyro.ShortRunLangevin` and returns a
:class:`~tilted_priors.inference.diagnostics.CouplingBound`: upper bounds on the total variation (and
1-Wasserstein) distance between the chain's law after :math:`t` steps and its stationary law, for every
:math:`t` up to the budget (Biswas, Jacob and Vanetti 2019; the formulas and the treatment of pairs that did not
meet are in :mod:`tilted_priors.inference.diagnostics.coupling`).

**The coupled kernel and what is bounded** (the distance to the target for MALA, to ULA's own biased
stationary law for ``ShortRunLangevin``): see :mod:`tilted_priors.inference.diagnostics.coupling`.

**Cost.** Up to ``num_pairs * (2 * max_steps - lag)`` evaluations of the log density and its gradient, batched
over the pairs, and ``num_pairs * (max_steps + 1)`` stored distances. The chains are one compiled program (a
:func:`jax.lax.scan` for the lag, then a :func:`jax.lax.while_loop` that stops as soon as every pair has met; no
transfer to the host inside the loop); each call compiles it (the log density is passed as in
:mod:`tilted_priors.numpyro.samplers`: a :class:`jax.tree_util.Partial` or an array pytree reuses the compiled
program across parameter values). Each step's key is ``fold_in(key, step)``, so the draws do not depend on when
the loop stops.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tilted_priors.errors import ChainDivergenceError
from tilted_priors.inference.diagnostics.coupling import (CouplingBound, _check_budget, _check_drawn, _pairs_from,
                                                          _sampler_settings)
from tilted_priors.numpyro import langevin
from tilted_priors.numpyro._chain_checks import as_partial, check_init, is_array
from tilted_priors.numpyro.samplers import MALA, ShortRunLangevin

__all__ = ["coupling_bound", "CouplingBound"]


def _reflection_maximal(rng_key: jax.Array, mean_x: jax.Array, mean_y: jax.Array,
                        step_size: float) -> tuple[jax.Array, jax.Array]:
    r"""A draw of the reflection-maximal coupling of :math:`\mathcal N(\mu_x, h^2 I)` and
    :math:`\mathcal N(\mu_y, h^2 I)`, batched over the leading dimensions; equal rows are the same values."""
    h = step_size
    key_normal, key_uniform = jax.random.split(rng_key)
    zeta = (mean_x - mean_y) / h
    xi = jax.random.normal(key_normal, mean_x.shape, mean_x.dtype)
    u = jax.random.uniform(key_uniform, mean_x.shape[:-1], mean_x.dtype)
    shifted = xi + zeta
    log_ratio = 0.5 * (jnp.sum(xi * xi, -1) - jnp.sum(shifted * shifted, -1))  # log phi(xi + zeta) - log phi(xi)
    meet = jnp.log(u) <= log_ratio
    norm = jnp.linalg.norm(zeta, axis=-1, keepdims=True)
    e = jnp.where(norm > 0, zeta / jnp.where(norm > 0, norm, 1.0), 0.0)
    reflected = xi - 2.0 * jnp.sum(e * xi, -1, keepdims=True) * e
    new_x = mean_x + h * xi
    return new_x, jnp.where(meet[..., None], new_x, mean_y + h * reflected)


def _evaluated(position: jax.Array, logdensity_fn) -> langevin.LangevinState:
    return langevin.LangevinState(position, *langevin.value_and_grad(logdensity_fn, position))


def _select(mask: jax.Array, a: langevin.LangevinState, b: langevin.LangevinState) -> langevin.LangevinState:
    """Per chain: ``a`` where ``mask``, else ``b``."""
    return langevin.LangevinState(jnp.where(mask[..., None], a.position, b.position),
                                  jnp.where(mask, a.logdensity, b.logdensity),
                                  jnp.where(mask[..., None], a.logdensity_grad, b.logdensity_grad))


def _coupled_step(rng_key: jax.Array, x: langevin.LangevinState, y: langevin.LangevinState, logdensity_fn,
                  step_size: float, kind: str) -> tuple[langevin.LangevinState, langevin.LangevinState]:
    """One step of the coupled kernel on the pairs ``(x, y)``: reflection-maximal proposals, and for ``kind="mala"``
    a common uniform in the accept step. Each of ``x``, ``y`` moves by the sampler's own kernel."""
    h = step_size
    key_proposal, key_accept = jax.random.split(rng_key)
    mean_x = x.position + (0.5 * h * h) * x.logdensity_grad  # as langevin.move computes it
    mean_y = y.position + (0.5 * h * h) * y.logdensity_grad
    prop_x, prop_y = _reflection_maximal(key_proposal, mean_x, mean_y, h)
    new_x, new_y = _evaluated(prop_x, logdensity_fn), _evaluated(prop_y, logdensity_fn)
    if kind == "ula":
        return new_x, new_y
    log_x = langevin.log_acceptance_ratio(x, new_x, h)
    log_y = langevin.log_acceptance_ratio(y, new_y, h)
    u = jax.random.uniform(key_accept, log_x.shape, log_x.dtype)
    accept_x = u < jnp.exp(jnp.minimum(log_x, 0.0))  # as langevin.metropolis_accept decides, with one u for both
    accept_y = u < jnp.exp(jnp.minimum(log_y, 0.0))
    return _select(accept_x, new_x, x), _select(accept_y, new_y, y)


def _first_bad(bad, states, step):
    """The first step at which some chain's log density was non-finite (-1 while none was)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(st.logdensity)) for st in states]))
    return jnp.where((bad < 0) & ~finite, step, bad)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _coupled_chains(kind: str, step_size: float, lag: int, max_steps: int, rng_key, log_density, x0, y0):
    """``(meeting times (-1: unmet), distances (n, max_steps + 1), first non-finite step (-1: none))``."""
    log_density = jax.tree_util.tree_map(lax.stop_gradient, log_density)
    key_lag, key_coupled = jax.random.split(rng_key)
    x, y = langevin.init(x0, log_density), langevin.init(y0, log_density)
    bad = _first_bad(jnp.int32(-1), (x, y), 0)

    def lone(carry, inputs):
        x, bad = carry
        key, s = inputs
        if kind == "mala":
            x, _ = langevin.mala_step(key, x, log_density, step_size)
        else:
            x, _ = langevin.ula_step(key, x, log_density, step_size)
        return (x, _first_bad(bad, (x,), s)), None

    (x, bad), _ = lax.scan(lone, (x, bad), (jax.random.split(key_lag, lag), jnp.arange(1, lag + 1, dtype=jnp.int32)))
    n = x0.shape[0]
    met = jnp.all(x.position == y.position, -1)
    y = _select(met, x, y)
    tau = jnp.where(met, lag, -1).astype(jnp.int32)
    distances = jnp.zeros((n, max_steps + 1), x.position.dtype)
    distances = distances.at[:, lag].set(jnp.linalg.norm(x.position - y.position, axis=-1))

    def cond(carry):
        s, _, _, met, _, _, bad = carry
        return (s < max_steps) & ~jnp.all(met) & (bad < 0)

    def body(carry):
        s, x, y, met, tau, distances, bad = carry
        x, y = _coupled_step(jax.random.fold_in(key_coupled, s), x, y, log_density, step_size, kind)
        s = s + 1
        y = _select(met, x, y)  # a pair that met stays together, bit for bit
        now = jnp.all(x.position == y.position, -1)
        y = _select(now, x, y)  # the newly met: the same log density and gradient too
        tau = jnp.where(now & ~met, s, tau)
        distances = distances.at[:, s].set(jnp.linalg.norm(x.position - y.position, axis=-1))
        return s, x, y, now, tau, distances, _first_bad(bad, (x, y), s)

    carry = (jnp.int32(lag), x, y, met, tau, distances, bad)
    _, _, _, _, tau, distances, bad = lax.while_loop(cond, body, carry)
    return tau, distances, bad


def _starts(rng_key, init, num_pairs: int | None) -> tuple[jax.Array, jax.Array]:
    """The starting points ``(X_0, Y_0)``, each ``(num_pairs, d)``."""
    if is_array(init) or isinstance(init, (list, tuple, float, int)):
        init = check_init(init)
        n = _pairs_from(tuple(init.shape), num_pairs, "init")
        x0 = jnp.broadcast_to(init, (n, init.shape[-1]))
        return x0, x0
    key_x, key_y = jax.random.split(rng_key)
    if hasattr(init, "sample"):
        if num_pairs is None:
            raise ValueError("init is a distribution: give num_pairs, the number of pairs of chains to draw")
        x0, y0 = init.sample(key_x, (num_pairs,)), init.sample(key_y, (num_pairs,))
        what = f"init.sample(rng_key, ({num_pairs},))"
    elif callable(init):
        if num_pairs is None:
            raise ValueError("init is a function init(rng_key, n) -> (n, d): give num_pairs, the number of pairs of "
                             "chains")
        x0, y0 = init(key_x, num_pairs), init(key_y, num_pairs)
        what = f"init(rng_key, {num_pairs})"
    else:
        raise TypeError("init must be a starting point (d,) or one per pair (num_pairs, d) as an array, a "
                        "distribution with .sample(rng_key, sample_shape), or a function init(rng_key, n) -> (n, d), "
                        f"got {type(init).__name__}")
    x0, y0 = check_init(x0), check_init(y0)
    for z in (x0, y0):
        _check_drawn(tuple(z.shape), num_pairs, what)
    return x0, y0


def coupling_bound(rng_key, sampler, log_density: Callable[[jax.Array], jax.Array], init, *, lag: int,
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
    rng_key : jax.Array
        A PRNG key (``jax.random.PRNGKey`` or ``jax.random.key``).
    sampler : MALA or ShortRunLangevin
        The kernel, with its fixed ``step_size`` (and ``noise=True`` for ULA); ``sampler.steps`` and ``unroll`` are
        not used. ``step_size="auto"`` raises ``ValueError``: it adapts within each run, so pass the numeric step
        size (for example the adapted one, ``SamplerInfo.step_size`` of a run with ``return_info=True``).
    log_density : callable
        ``(num_pairs, d) -> (num_pairs,)``, the unnormalised log density, written with :mod:`jax.numpy`.
    init : array, distribution or callable
        The initial law :math:`\pi_0`:

        - an array ``(d,)``: every chain starts at this point (:math:`\pi_0 = \delta_{x_0}`); needs ``num_pairs``;
        - an array ``(num_pairs, d)``: both chains of pair ``i`` start at ``init[i]``; the bound is then the
          average over the starts of the bound from each start, which bounds the distance from the mixture of
          the starts too;
        - a distribution with ``.sample(rng_key, sample_shape)`` (e.g. the base
          ``Normal(0, 1).expand([d]).to_event(1)``, LEBM's starts), or a function ``init(rng_key, n) -> (n, d)``:
          :math:`X_0` and :math:`Y_0` are independent draws; needs ``num_pairs``.
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
        For a missing ``rng_key``, ``step_size="auto"``, ``noise=False``, a ``max_steps`` not above ``lag``,
        fewer than 2 pairs, or starting points of the wrong shape.
    ChainDivergenceError
        When a chain's log density becomes non-finite (a step size beyond the stability bound).

    Examples
    --------
    MALA with step 0.5 on :math:`\mathcal N(0, 1)`, from the point 3 (the exact distances are 0.30 after 10 steps
    and 0.07 after 20):

    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import MALA
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> b = coupling_bound(jax.random.PRNGKey(0), MALA(100, 0.5), f, jnp.array([3.0]), lag=20, num_pairs=500,
    ...                    max_steps=300)
    >>> b.num_unmet, bool(0.25 < b.tv_bound[10] < 0.5), 15 < b.steps_for(0.1) < 40
    (0, True, True)
    """
    kind, h = _sampler_settings(sampler, MALA, ShortRunLangevin)
    lag, num_pairs, max_steps = _check_budget(lag, num_pairs, max_steps)
    if rng_key is None:
        raise ValueError("coupling_bound needs an rng_key, e.g. jax.random.PRNGKey(0)")
    key_init, key_run = jax.random.split(rng_key)
    x0, y0 = _starts(key_init, init, num_pairs)
    tau, distances, bad = jax.device_get(_coupled_chains(kind, h, lag, max_steps, key_run, as_partial(log_density),
                                                         x0, y0))
    if int(bad) >= 0:
        raise ChainDivergenceError(f"coupling_bound({type(sampler).__name__})", int(bad), h)
    tau = np.asarray(tau, dtype=float)
    tau[tau < 0] = np.inf
    return CouplingBound.from_meeting_times(tau, lag, max_steps, distances=np.asarray(distances, dtype=float))
