r"""The compiled chains of the samplers (JAX): the Langevin steps of :mod:`tilted_priors.numpyro.samplers` as
:func:`jax.lax.scan` loops, with a fixed step size or adapted (``step_size="auto"``, the rule of
:mod:`tilted_priors._adapt`), their result (acceptance, the first non-finite step, the range of the final
positions), the probe of the gradient's Lipschitz constant and the adaptive chain's initial step, and the
module-level :func:`jax.jit` runners that all samplers share (see the samplers' notes on compilation and
divergence).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tilted_priors import _adapt
from tilted_priors._validation import check_positive_int
from tilted_priors.numpyro import langevin
from tilted_priors.numpyro._chain_checks import base_loc_scale, range_ratio, range_scale, tilted_of

__all__ = ["ChainResult", "chain", "check_unroll", "lipschitz", "initial_step", "run_jit", "lipschitz_jit"]

# Primitives after which a rolled loop is slow on XLA's CPU backend (see check_unroll).
_UNROLL_PRIMITIVES = frozenset({"conv_general_dilated"})


class ChainResult(NamedTuple):
    """The result of :func:`chain`: final positions, acceptance, log density, the first non-finite step and the
    range of the final positions (see :func:`~tilted_priors.numpyro._chain_checks.range_ratio`)."""

    position: jax.Array
    acceptance_rate: jax.Array
    logdensity: jax.Array
    bad_step: jax.Array  # first 1-based step with a non-finite chain, 0 for the initial state, -1 for none
    num_bad: jax.Array  # chains non-finite at that step
    step_size: jax.Array  # the step size of the last steps (the adapted one for "auto")
    range_ratio: jax.Array | None = None  # how far out the farthest final position is (see range_ratio)
    range_num: jax.Array | None = None  # chains beyond _adapt.RANGE_FACTOR of it


def check_unroll(unroll, steps: int) -> int | str:
    """The ``unroll`` setting of a sampler of ``steps`` steps: ``True`` -> ``steps``, ``False`` -> 1, an int in
    ``[1, steps]`` (larger ones are cut to ``steps``) or ``"auto"`` (resolved per log density by
    :func:`_resolve_unroll`)."""
    if isinstance(unroll, str):
        if unroll != "auto":
            raise ValueError(f"unroll must be an int, True, False or 'auto', got {unroll!r}")
        return unroll
    if unroll is True:
        return steps
    if unroll is False:
        return 1
    return min(check_positive_int("unroll", unroll), steps)


def _calls(jaxpr, names: frozenset) -> bool:
    """Whether ``jaxpr`` (or any jaxpr nested in its equations' parameters) has an equation of a primitive in
    ``names``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(inner, "eqns") and _calls(inner, names):
                    return True
    return False


def _resolve_unroll(unroll, steps: int, log_density, init) -> int:
    """``unroll="auto"``: all ``steps`` when the log density calls a convolution (XLA's CPU backend runs it several
    times slower inside a rolled loop), else 1 (an unrolled loop only lengthens compilation)."""
    if unroll != "auto":
        return unroll
    spec = jax.ShapeDtypeStruct(init.shape, init.dtype)
    jaxpr = jax.make_jaxpr(lambda f, z: f(z))(log_density, spec).jaxpr
    return steps if _calls(jaxpr, _UNROLL_PRIMITIVES) else 1


def _first_bad(first, logdensity, step):
    """Per chain: the first step at which its log density was non-finite (-1 while it has not been)."""
    return jnp.where((first < 0) & ~jnp.isfinite(logdensity), step, first)


def chain(kind: str, steps: int, step_size, noise: bool, unroll: int, track: bool, rng_key, log_density,
          init, origin=None) -> ChainResult:
    """``steps`` Langevin steps as one :func:`jax.lax.scan`, with the range of the final positions measured
    (``origin``: the ``1 + max|z_0|`` of the range rule, default from ``init``; see
    :func:`~tilted_priors.numpyro._chain_checks.range_ratio`).

    ``step_size`` is a float, or ``("auto", target_accept)`` for the adaptive chain (:func:`_adaptive_chain`).
    With ``track`` each chain carries the first step at which its log density was non-finite (elementwise, so it
    fuses with the step); the first step over all chains and the number of chains non-finite at it are read off
    after the loop. Without it (the fast path, a few percent quicker) only the initial and the final states are
    checked — non-finite states persist under Langevin dynamics (a nan position stays nan; MALA rejects
    non-finite proposals) — and ``bad_step`` is ``steps`` when the final state is non-finite; the caller then
    re-runs with ``track`` (the same keys give the same chain) to name the step.
    """
    init = jnp.asarray(init)
    unroll = _resolve_unroll(unroll, steps, log_density, init)
    if isinstance(step_size, tuple):
        res = _adaptive_chain(kind, steps, step_size[1], noise, unroll, track, rng_key, log_density, init)
    else:
        log_density = jax.tree_util.tree_map(lax.stop_gradient, log_density)
        state = langevin.init(init, log_density)
        first = _first_bad(jnp.full(state.logdensity.shape, -1, jnp.int32), state.logdensity, 0)
        keys = jax.random.split(rng_key, steps)
        idx = jnp.arange(1, steps + 1, dtype=jnp.int32)
        state, acceptance, tracked = _fixed_steps(kind, step_size, noise, unroll, track, log_density, state, first,
                                                  keys, idx)
        res = _finish(kind, steps, steps, step_size, track, log_density, state, acceptance, tracked, first)
    origin = range_scale(init) if origin is None else jnp.asarray(origin, init.dtype)
    stopped = jax.tree_util.tree_map(lax.stop_gradient, log_density)
    ratio, num = range_ratio(res.position, origin, base_loc_scale(tilted_of(stopped)))
    return res._replace(range_ratio=ratio, range_num=num)


def _fixed_steps(kind, step_size, noise, unroll, track, log_density, state, first, keys, idx):
    """Langevin steps of a fixed ``step_size`` (a float, or a traced scalar after adaptation), one per key."""
    adjusted = kind == "mala"

    def body(carry, xs):
        state, acceptance, first = carry  # acceptance / first are None when not needed (nothing extra carried)
        key, i = xs
        if adjusted:
            state, info = langevin.mala_step(key, state, log_density, step_size)
            acceptance = acceptance + info.acceptance_rate
        else:
            state, _ = langevin.ula_step(key, state, log_density, step_size, noise)
        if track:
            first = _first_bad(first, state.logdensity, i)
        return (state, acceptance, first), None

    acceptance = jnp.zeros_like(state.logdensity) if adjusted else None
    carry = (state, acceptance, first if track else None)
    (state, acceptance, tracked), _ = lax.scan(body, carry, (keys, idx), unroll=min(unroll, keys.shape[0]))
    return state, acceptance, tracked


def _finish(kind, steps, num_fixed, step_size, track, log_density, state, acceptance, tracked, first):
    """The chain's result: acceptance averaged over the ``num_fixed`` fixed steps, the first non-finite step."""
    logdensity = state.logdensity
    if kind == "mala":
        acceptance = acceptance / num_fixed
    else:
        acceptance = jnp.ones_like(logdensity)
        if not track:
            # ULA steps use only the gradient: evaluating the final log density once here lets XLA drop the
            # per-step values from the loop (a few percent of the step's cost, as a hand-written loop does).
            logdensity = lax.stop_gradient(log_density(state.position))
    first = tracked if track else _first_bad(first, logdensity, steps)
    diverged = first >= 0
    bad_step = jnp.min(jnp.where(diverged, first, steps + 1), initial=steps + 1)
    num_bad = jnp.sum(diverged & (first == bad_step)).astype(jnp.int32)
    bad_step = jnp.where(bad_step > steps, -1, bad_step).astype(jnp.int32)
    return ChainResult(state.position, acceptance, logdensity, bad_step, num_bad,
                       jnp.asarray(step_size, logdensity.dtype))


def lipschitz(rng_key, log_density, state: langevin.LangevinState) -> jax.Array:
    r"""The largest ratio :math:`\|\nabla\log\pi(z+\delta) - \nabla\log\pi(z)\| / \|\delta\|` over the chains.

    Two power-iteration probes per chain (the second :math:`\delta` along the first gradient difference, so the
    ratio approaches the largest curvature), :math:`\|\delta\|` a hundredth of the chains' spread (see
    :mod:`tilted_priors._adapt`). Chains whose probe is not finite are left out; 0 when none is finite.
    """
    z, grad = state.position, state.logdensity_grad
    d = z.shape[-1]
    flat = z.reshape(-1, d)
    spread = jnp.sqrt(jnp.mean(jnp.var(flat, 0))) if flat.shape[0] > 1 else jnp.zeros((), z.dtype)
    rms = jnp.sqrt(jnp.mean(z * z))
    radius = _adapt.PROBE_RADIUS * jnp.maximum(jnp.where(spread > 0, spread, 1.0 + rms), 1e-3 * rms)
    delta = radius * jax.random.normal(rng_key, z.shape, z.dtype)
    best = jnp.zeros((), z.dtype)
    for _ in range(2):
        moved = z + delta
        _, new_grad = langevin.value_and_grad(log_density, moved)
        diff = new_grad - grad
        norm_diff = jnp.linalg.norm(diff, axis=-1)
        ratio = norm_diff / jnp.linalg.norm(moved - z, axis=-1)
        best = jnp.maximum(best, jnp.max(jnp.where(jnp.isfinite(ratio), ratio, 0.0), initial=0.0))
        scale = radius * jnp.sqrt(jnp.asarray(d, z.dtype)) / norm_diff
        delta = jnp.where((jnp.isfinite(scale) & (norm_diff > 0))[..., None], diff * scale[..., None], delta)
    return best


def initial_step(lipschitz, init, kind: str):
    """``(log h0, log cap)`` of the adaptive chain: ``h0 = 1/sqrt(L)``, ``cap = c/sqrt(L)`` (see ``_adapt``)."""
    flat = init.reshape(-1, init.shape[-1])
    spread = jnp.sqrt(jnp.mean(jnp.var(flat, 0))) if flat.shape[0] > 1 else jnp.zeros((), init.dtype)
    fallback = jnp.where(spread > 0, spread, 1.0)
    known = jnp.isfinite(lipschitz) & (lipschitz > 0)
    safe = jnp.where(known, lipschitz, 1.0)
    log_h0 = jnp.where(known, -0.5 * jnp.log(safe), jnp.log(fallback))
    log_cap = jnp.where(known, jnp.log(_adapt.STABILITY_CAP[kind]) - 0.5 * jnp.log(safe), jnp.inf)
    log_h0 = jnp.minimum(log_h0, log_cap)
    return log_h0.astype(init.dtype), log_cap.astype(init.dtype)


def _adaptive_chain(kind: str, steps: int, target: float, noise: bool, unroll: int, track: bool, rng_key,
                    log_density, init) -> ChainResult:
    """The chain of ``step_size="auto"`` (see :mod:`tilted_priors._adapt`): a probe of the curvature, a warm-up
    scan adapting ``log h`` towards the acceptance ``target``, then :func:`_fixed_steps` with the last ``h``."""
    log_density = jax.tree_util.tree_map(lax.stop_gradient, log_density)
    state = langevin.init(init, log_density)
    first = _first_bad(jnp.full(state.logdensity.shape, -1, jnp.int32), state.logdensity, 0)
    keys = jax.random.split(rng_key, steps + 1)
    log_h, log_cap = initial_step(lipschitz(keys[0], log_density, state), state.position, kind)
    warm = _adapt.warmup_steps(steps)

    def body(carry, xs):
        state, log_h, first = carry
        key, i = xs
        h = jnp.exp(log_h)
        key_proposal, key_accept = jax.random.split(key)
        new = langevin.proposal(key_proposal, state, log_density, h, noise)
        log_ratio = langevin.log_acceptance_ratio(state, new, h)
        # Metropolis-adjusted for both kinds: while h is still being found, a move that the MH test rejects (a far
        # start in a flat region probes a small curvature and takes a huge step) is not kept.
        state, info = langevin.metropolis_accept(key_accept, state, new, log_ratio)
        accept = info.acceptance_rate
        mean = jnp.mean(accept)
        error = jnp.where(mean > target, (mean - target) / (1.0 - target), (mean - target) / target)
        log_h = jnp.minimum(log_h + error / jnp.sqrt(i.astype(log_h.dtype)), log_cap)
        if track:
            first = _first_bad(first, state.logdensity, i)
        return (state, log_h, first), None

    if warm:
        idx = jnp.arange(1, warm + 1, dtype=jnp.int32)
        (state, log_h, first), _ = lax.scan(body, (state, log_h, first), (keys[1:warm + 1], idx),
                                            unroll=min(unroll, warm))
    # The curvature where the warm-up has brought the chains (near the typical set) caps h again: a probe at
    # far starting points can see much less curvature than the chains meet later.
    _, log_cap_end = initial_step(lipschitz(jax.random.fold_in(keys[0], 1), log_density, state), state.position,
                                  kind)
    h = jnp.exp(jnp.minimum(log_h, log_cap_end))
    idx = jnp.arange(warm + 1, steps + 1, dtype=jnp.int32)
    state, acceptance, tracked = _fixed_steps(kind, h, noise, unroll, track, log_density, state, first,
                                              keys[warm + 1:], idx)
    return _finish(kind, steps, steps - warm, h, track, log_density, state, acceptance, tracked, first)


def _lipschitz_at(rng_key, log_density, init) -> jax.Array:
    """:func:`lipschitz` at the starting points ``init`` (for the divergence message)."""
    log_density = jax.tree_util.tree_map(lax.stop_gradient, log_density)
    return lipschitz(rng_key, log_density, langevin.init(init, log_density))


#: The one compiled runner shared by all samplers; settings are static, the log density a pytree argument.
run_jit = jax.jit(chain, static_argnums=(0, 1, 2, 3, 4, 5))
lipschitz_jit = jax.jit(_lipschitz_at)
