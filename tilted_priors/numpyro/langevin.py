r"""The functional core of the Langevin samplers (JAX).

Written as BlackJAX writes kernels: :func:`init` builds a :class:`LangevinState` that caches the log density and
its gradient, and a step maps ``(rng_key, state, logdensity_fn, step_size)`` to ``(state, info)``. Both steps
make the same proposal (:func:`proposal`),

.. math:: z' = z + \tfrac{h^2}{2} \nabla \log \pi(z) + h\, \xi, \qquad \xi \sim \mathcal N(0, I),

:func:`ula_step` keeps it (unadjusted Langevin, biased by :math:`O(h^2)`), :func:`mala_step` accepts it with the
Metropolis-Hastings probability (exact stationary law :math:`\pi`); its two halves, :func:`log_acceptance_ratio`
and :func:`metropolis_accept`, are public for callers that need the proposal itself. :math:`h` is the
``step_size``, the scale of the noise, as in LEBM (Pang et al. 2020). All arrays are batched over chains:
positions ``(..., d)``, log densities ``(...)``; chains never interact. Every function is pure, so it runs under
:func:`jax.jit`, :func:`jax.vmap` and inside :func:`jax.lax.scan`. ``logdensity_fn`` need not be normalised. As
in the torch core, the state carries no gradient to the log density's parameters or to the starting point (both
are ``stop_gradient``-ed).
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tilted_priors._validation import check_energy_shape

__all__ = ["LangevinState", "LangevinInfo", "init", "proposal", "move", "ula_step", "mala_step", "value_and_grad",
           "log_acceptance_ratio", "metropolis_accept"]

LogDensityFn = Callable[[jax.Array], jax.Array]


class LangevinState(NamedTuple):
    """Position of every chain with its (unnormalised) log density and the gradient there."""

    position: jax.Array  # (..., d)
    logdensity: jax.Array  # (...)
    logdensity_grad: jax.Array  # (..., d)


class LangevinInfo(NamedTuple):
    """What one step did, per chain: the acceptance probability and whether the proposal was kept."""

    acceptance_rate: jax.Array  # (...)
    is_accepted: jax.Array  # (...) bool


def value_and_grad(logdensity_fn: LogDensityFn, position: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log density of each chain and its gradient w.r.t. the position, both ``stop_gradient``-ed.

    One reverse pass: :func:`jax.value_and_grad` of the log density summed over the chains (chains are
    independent, so the gradient of the sum is the per-chain gradient).

    Raises
    ------
    TypeError
        When ``logdensity_fn`` returns a Python number or a NumPy array (it cannot depend on ``z``), or calls NumPy
        on ``z`` (JAX traces it: write it with :mod:`jax.numpy`).
    ValueError
        When it returns an array of another shape than the chains' ``(...)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> lp, g = value_and_grad(lambda z: -0.5 * (z ** 2).sum(-1), jnp.ones((3, 2)))
    >>> g.tolist()
    [[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]]
    """
    position = jnp.asarray(position)

    def total(z):
        try:
            lp = logdensity_fn(z)
        except jax.errors.TracerArrayConversionError as err:
            raise TypeError(_numpy_message(logdensity_fn, err)) from err
        if isinstance(lp, (int, float, np.ndarray, np.generic)):
            raise TypeError(_not_an_array_message(lp, tuple(z.shape)))
        if jnp.shape(lp) != z.shape[:-1]:
            check_energy_shape("the log density", tuple(z.shape), tuple(jnp.shape(lp)))
        return jnp.sum(lp), lp

    (_, lp), grad = jax.value_and_grad(total, has_aux=True)(lax.stop_gradient(position))
    return lax.stop_gradient(lp), lax.stop_gradient(grad)


def _not_an_array_message(value, shape: tuple) -> str:
    kind = "a Python float" if isinstance(value, float) else f"a {type(value).__module__}.{type(value).__qualname__}"
    return (f"log_density must return an array of shape {shape[:-1]} (one value per chain: it maps (..., d) to "
            f"(...)), got {kind}: build it with jax.numpy operations on z (e.g. -0.5 * (z ** 2).sum(-1)), not with "
            "Python or NumPy numbers, so that its gradient reaches z")


def _numpy_message(logdensity_fn, err: Exception) -> str:
    """The error for a log density (or the energy inside it) that calls NumPy on JAX's traced arrays."""
    args = getattr(logdensity_fn, "args", ())
    energy = getattr(args[0], "energy", None) if args else None  # an EnergyTilted's annealed_log_density
    if energy is not None and callable(energy):
        what = f"the energy {_describe_fn(energy)}"
    else:
        fn = getattr(logdensity_fn, "func", logdensity_fn)  # a jax.tree_util.Partial wraps the user's function
        if args and getattr(fn, "__name__", "") == "_call":  # _chain_checks.as_partial's wrapper of a pytree callable
            fn = args[0]
        what = f"the log density {_describe_fn(fn)}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{what} must be written with jax.numpy, not NumPy: JAX calls it on traced arrays (to differentiate "
            f"and compile it), which NumPy cannot convert ({first}); replace np.<function> by jnp.<function> "
            "(import jax.numpy as jnp)")


def _describe_fn(fn) -> str:
    """A short name for a user's function or module: ``EnergyMLP``, ``'energy' (defined at model.py:12)``."""
    name = getattr(fn, "__name__", None)
    code = getattr(fn, "__code__", None)
    if not name or code is None:
        return type(fn).__name__
    return f"{name!r} (defined at {os.path.basename(code.co_filename)}:{code.co_firstlineno})"


def init(position: jax.Array, logdensity_fn: LogDensityFn) -> LangevinState:
    """Start chains at ``position`` (shape ``(..., d)``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> state = init(jnp.zeros((4, 2)), lambda z: -0.5 * (z ** 2).sum(-1))
    >>> state.logdensity.shape
    (4,)
    """
    position = jnp.asarray(position)
    if position.ndim < 1:
        raise ValueError("positions must have shape (..., d), got a scalar")
    logdensity, grad = value_and_grad(logdensity_fn, position)
    return LangevinState(lax.stop_gradient(position), logdensity, grad)


def proposal(rng_key: jax.Array, state: LangevinState, logdensity_fn: LogDensityFn, step_size: float,
             noise: bool = True) -> LangevinState:
    r"""The Langevin proposal :math:`z + \tfrac{h^2}{2}\nabla\log\pi(z) + h\xi`, evaluated (log density, gradient).

    With ``noise=False`` it is a gradient-ascent step on :math:`\log \pi` (``rng_key`` is then unused).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> new = proposal(None, init(jnp.ones((2, 3)), f), f, 1.0, noise=False)
    >>> new.position.tolist()   # z + (1/2) * (-z)
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """
    moved = move(rng_key, state, step_size, noise)
    logdensity, grad = value_and_grad(logdensity_fn, moved)
    return LangevinState(moved, logdensity, grad)


def move(rng_key: jax.Array, state: LangevinState, step_size: float, noise: bool = True) -> jax.Array:
    r"""The proposed position :math:`z + \tfrac{h^2}{2}\nabla\log\pi(z) + h\xi` alone, not evaluated.

    What the last step of an unadjusted chain needs: nothing uses the log density there. With ``noise=False``
    ``rng_key`` is unused.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> move(None, init(jnp.ones((2, 3)), f), 1.0, noise=False).tolist()   # z + (1/2) * (-z)
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """
    z = state.position
    moved = z + (0.5 * step_size * step_size) * state.logdensity_grad
    if noise:
        moved = moved + step_size * jax.random.normal(rng_key, z.shape, z.dtype)
    return moved


def ula_step(rng_key: jax.Array, state: LangevinState, logdensity_fn: LogDensityFn, step_size: float,
             noise: bool = True) -> tuple[LangevinState, LangevinInfo]:
    """One unadjusted Langevin step: the proposal, always kept.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state, info = ula_step(jax.random.PRNGKey(0), init(jnp.zeros((5, 2)), f), f, 0.1)
    >>> bool(info.is_accepted.all())
    True
    """
    new = proposal(rng_key, state, logdensity_fn, step_size, noise)
    ones = jnp.ones_like(new.logdensity)
    return new, LangevinInfo(ones, jnp.ones(ones.shape, bool))


def _log_q(to: jax.Array, frm: LangevinState, step_size: float) -> jax.Array:
    """Log density (up to a constant shared by both directions) of proposing ``to`` from ``frm``."""
    diff = to - frm.position - (0.5 * step_size * step_size) * frm.logdensity_grad
    return -jnp.sum(diff * diff, -1) / (2.0 * step_size * step_size)


def log_acceptance_ratio(state: LangevinState, new: LangevinState, step_size: float) -> jax.Array:
    r"""Metropolis-Hastings log-ratio of moving from ``state`` to the Langevin proposal ``new``, per chain.

    .. math:: \log \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)},
              \qquad q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}\nabla\log\pi(z),\, h^2 I\bigr)

    :func:`mala_step` accepts with probability :math:`\min(1, e^{\text{ratio}})`; for an unadjusted chain the
    same number measures the discretisation error of the step. A proposal with a non-finite log density, or a
    ratio that is ``nan`` (e.g. a non-finite gradient there), gets :math:`-\infty` (always rejected).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state = init(jnp.zeros(2), f)
    >>> float(log_acceptance_ratio(state, state, 0.5))  # staying put: pi and q are symmetric
    0.0
    """
    log_ratio = (new.logdensity - state.logdensity
                 + _log_q(state.position, new, step_size) - _log_q(new.position, state, step_size))
    valid = jnp.isfinite(new.logdensity) & ~jnp.isnan(log_ratio)
    return jnp.where(valid, log_ratio, -jnp.inf)  # reject nan and +-inf


def metropolis_accept(rng_key: jax.Array, state: LangevinState, new: LangevinState,
                      log_ratio: jax.Array) -> tuple[LangevinState, LangevinInfo]:
    r"""Keep ``new`` with probability :math:`\min(1, e^{\text{log\_ratio}})` per chain, else ``state``.

    The accept step of :func:`mala_step`, for callers that need the proposal or the ratio themselves (e.g. an
    MCMC kernel that counts divergent proposals). ``rng_key`` draws the uniform variates.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state, new = init(jnp.zeros((3, 2)), f), init(jnp.ones((3, 2)), f)
    >>> kept, info = metropolis_accept(jax.random.PRNGKey(0), state, new, jnp.full((3,), -jnp.inf))
    >>> bool((kept.position == 0).all()), info.acceptance_rate.tolist()
    (True, [0.0, 0.0, 0.0])
    """
    acceptance = jnp.exp(jnp.minimum(log_ratio, 0.0))
    u = jax.random.uniform(rng_key, acceptance.shape, acceptance.dtype)
    accept = u < acceptance
    keep = accept[..., None]
    merged = LangevinState(jnp.where(keep, new.position, state.position),
                           jnp.where(accept, new.logdensity, state.logdensity),
                           jnp.where(keep, new.logdensity_grad, state.logdensity_grad))
    return merged, LangevinInfo(acceptance, accept)


def mala_step(rng_key: jax.Array, state: LangevinState, logdensity_fn: LogDensityFn,
              step_size: float) -> tuple[LangevinState, LangevinInfo]:
    r"""One Metropolis-adjusted Langevin step.

    Accepts the proposal :math:`z'` with probability
    :math:`\min\{1, \pi(z') q(z \mid z') / (\pi(z) q(z' \mid z))\}` (:func:`log_acceptance_ratio`,
    :func:`metropolis_accept`); a proposal with a non-finite log density is rejected. ``rng_key`` is split into
    the proposal's key and the accept/reject key.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> state, info = mala_step(jax.random.PRNGKey(0), init(jnp.zeros((5, 2)), f), f, 0.5)
    >>> info.acceptance_rate.shape
    (5,)
    """
    key_proposal, key_accept = jax.random.split(rng_key)
    new = proposal(key_proposal, state, logdensity_fn, step_size)
    return metropolis_accept(key_accept, state, new, log_acceptance_ratio(state, new, step_size))
