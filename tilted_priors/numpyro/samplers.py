r"""Samplers that draw from a log density given starting points, batched over chains (JAX).

Each sampler runs a fixed number of steps of the functional core in :mod:`tilted_priors.numpyro.langevin`:

- :class:`ShortRunLangevin` — unadjusted Langevin (ULA), LEBM's short-run sampler,
- :class:`MALA` — Metropolis-adjusted Langevin, exact for its target and reports acceptance,
- :class:`Persistent` — wraps either and continues from where the last call stopped.

``run(rng_key, log_density, init)`` takes ``log_density`` mapping ``(..., d) -> (...)`` (it need not be
normalised) and ``init`` of shape ``(..., d)`` (one chain per leading index) and returns samples of the same
shape, with no gradient to ``init`` or to the log density's parameters (``stop_gradient``).

**Compilation.** The chain is a :func:`jax.lax.scan` inside one module-level :func:`jax.jit`-ed runner that takes
the log density as a pytree argument, so repeated calls with the same log density do not recompile:

- a :class:`jax.tree_util.Partial` (``Partial(fn, params)``) or any pytree-registered callable whose leaves are
  arrays (a Flax NNX module, an :class:`~tilted_priors.numpyro.EnergyTilted`'s
  :meth:`~tilted_priors.numpyro.EnergyTilted.annealed_log_density`) passes its arrays as dynamic arguments: new
  parameter values reuse the compiled chain;
- a plain Python function is a static argument, compared by identity: calling again with the *same* function
  object reuses the compiled chain, a fresh ``lambda`` (or closure) on every call recompiles every call.

Under an outer transformation (inside the user's :func:`jax.jit`, a NumPyro ``SVI`` update or ``MCMC``) the scan
is traced inline into the caller's program instead.

**Divergence.** A chain whose log density becomes non-finite raises :class:`~tilted_priors.ChainDivergenceError`
(naming the first such step, 1-based, 0 for the initial state, and how many chains) when ``run`` is called
eagerly. The compiled loop checks the initial and the final states only — a nan position stays nan and MALA
rejects non-finite proposals, so a divergence persists to the end — and when one is found the same chain (same
keys) is run again tracking every step to name the first bad one; this keeps the loop as fast as a hand-written
one. (A ULA chain whose log density is ``-inf`` at some step but whose gradient stays finite, and which then
returns to finite values, is therefore not reported.) Under an outer trace the values are not known yet and
nothing can be raised: the non-finite values propagate to the caller (check the result with
:func:`jax.numpy.isfinite`, or run eagerly once to locate the problem).

Samplers are immutable and compare equal (and hash) by their settings, so they can sit in pytree auxiliary data
and in :func:`jax.jit` cache keys.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import Partial

from tilted_priors._compat import jax_in_transformation
from tilted_priors._persistent import PersistentBase
from tilted_priors._validation import check_positive_int, check_step_size
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.numpyro import langevin

__all__ = ["SamplerInfo", "ShortRunLangevin", "MALA", "Persistent"]


class SamplerInfo(NamedTuple):
    """Summary of one ``run``: mean acceptance probability per chain (1 for ULA) and the final log density."""

    acceptance_rate: jax.Array
    logdensity: jax.Array


# --- helpers shared with normalizers.py and distributions.py ----------------------------------------------
class _Frozen:
    """Immutable settings object: equal and hashed by ``_key()`` (safe as pytree aux data / jit cache key)."""

    __slots__ = ()

    def _key(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one instead of setting {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__, self._key()))


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_array_pytree(obj) -> bool:
    """Whether ``obj`` is a pytree (not a bare leaf) all of whose leaves are arrays."""
    leaves = jax.tree_util.tree_leaves(obj)
    if len(leaves) == 1 and leaves[0] is obj:
        return False
    return all(_is_array(leaf) for leaf in leaves)


def _call(fn, z):
    return fn(z)


def _as_partial(log_density) -> Partial:
    """Wrap a log density as a :class:`~jax.tree_util.Partial`: arrays dynamic, functions static (by identity)."""
    if isinstance(log_density, Partial):
        return log_density
    if not callable(log_density):
        raise TypeError(f"log_density must be a callable (..., d) -> (...), got {type(log_density).__name__}")
    if _is_array_pytree(log_density) and jax.tree_util.tree_leaves(log_density):
        return Partial(_call, log_density)
    return Partial(log_density)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class _ChainResult(NamedTuple):
    position: jax.Array
    acceptance_rate: jax.Array
    logdensity: jax.Array
    bad_step: jax.Array  # first 1-based step with a non-finite chain, 0 for the initial state, -1 for none
    num_bad: jax.Array  # chains non-finite at that step


def _first_bad(first, logdensity, step):
    """Per chain: the first step at which its log density was non-finite (-1 while it has not been)."""
    return jnp.where((first < 0) & ~jnp.isfinite(logdensity), step, first)


def _chain(kind: str, steps: int, step_size: float, noise: bool, unroll: int, track: bool, rng_key, log_density,
           init) -> _ChainResult:
    """``steps`` Langevin steps as one :func:`jax.lax.scan`.

    With ``track`` each chain carries the first step at which its log density was non-finite (elementwise, so it
    fuses with the step); the first step over all chains and the number of chains non-finite at it are read off
    after the loop. Without it (the fast path, a few percent quicker) only the initial and the final states are
    checked — non-finite states persist under Langevin dynamics (a nan position stays nan; MALA rejects
    non-finite proposals) — and ``bad_step`` is ``steps`` when the final state is non-finite; the caller then
    re-runs with ``track`` (the same keys give the same chain) to name the step.
    """
    log_density = jax.tree_util.tree_map(lax.stop_gradient, log_density)
    state = langevin.init(init, log_density)
    first = _first_bad(jnp.full(state.logdensity.shape, -1, jnp.int32), state.logdensity, 0)
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

    keys = jax.random.split(rng_key, steps)
    idx = jnp.arange(1, steps + 1, dtype=jnp.int32)
    acceptance = jnp.zeros_like(state.logdensity) if adjusted else None
    carry = (state, acceptance, first if track else None)
    (state, acceptance, tracked), _ = lax.scan(body, carry, (keys, idx), unroll=unroll)
    logdensity = state.logdensity
    if adjusted:
        acceptance = acceptance / steps
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
    return _ChainResult(state.position, acceptance, logdensity, bad_step, num_bad)


#: The one compiled runner shared by all samplers; settings are static, the log density a pytree argument.
_run_jit = jax.jit(_chain, static_argnums=(0, 1, 2, 3, 4, 5))


class _Langevin(_Frozen):
    """Shared run loop of the Langevin samplers; subclasses set ``_kind``."""

    __slots__ = ("steps", "step_size", "unroll")
    _kind = "ula"

    def __init__(self, steps: int, step_size: float, unroll: int | bool = 1):
        object.__setattr__(self, "steps", check_positive_int("steps", steps))
        object.__setattr__(self, "step_size", check_step_size(step_size))
        if unroll is True:
            unroll = self.steps
        elif unroll is False:
            unroll = 1
        object.__setattr__(self, "unroll", min(check_positive_int("unroll", unroll), self.steps))

    @property
    def _noise(self) -> bool:
        return True

    def _key(self) -> tuple:
        return (self.steps, self.step_size, self._noise, self.unroll)

    def _chain(self, rng_key, log_density, init) -> _ChainResult:
        """Run the chain inline (for use inside another traced loop, e.g. annealed importance sampling)."""
        return _chain(self._kind, self.steps, self.step_size, self._noise, self.unroll, True, rng_key,
                      _as_partial(log_density), jnp.asarray(init))

    def run(self, rng_key, log_density: Callable[[jax.Array], jax.Array], init, *, return_info: bool = False):
        """Run ``steps`` steps from ``init``; return the final positions (and a :class:`SamplerInfo`).

        Parameters
        ----------
        rng_key : jax.Array
            A PRNG key (``jax.random.PRNGKey`` or ``jax.random.key``); split into one key per step.
        log_density : callable
            ``(..., d) -> (...)``, unnormalised log density of each chain. Pass a
            :class:`jax.tree_util.Partial` or a pytree (e.g. an NNX module) to reuse the compiled chain across
            parameter values (see the module's notes on compilation).
        init : array_like
            Starting positions ``(..., d)``.
        return_info : bool
            Also return a :class:`SamplerInfo`.

        Raises
        ------
        ChainDivergenceError
            When some chain's log density became non-finite (eager calls only; under an outer trace the
            non-finite values are returned).
        """
        if rng_key is None:
            if self._noise:
                raise ValueError(f"{type(self).__name__}.run needs an rng_key, e.g. jax.random.PRNGKey(0)")
            rng_key = jax.random.PRNGKey(0)  # unused: no noise
        try:
            init = jnp.asarray(init)
        except TypeError as e:
            raise TypeError(f"init must be an array of shape (..., d), got {type(init).__name__}") from e
        if init.ndim < 1:
            raise ValueError("init must have shape (..., d), got a scalar")
        log_density = _as_partial(log_density)
        settings = (self._kind, self.steps, self.step_size, self._noise, self.unroll)
        if jax_in_transformation(rng_key, log_density, init):
            res = _chain(*settings, False, rng_key, log_density, init)  # nothing can be raised under a trace
        else:
            res = _run_jit(*settings, False, rng_key, log_density, init)
            if int(res.bad_step) >= 0:  # re-run the same chain tracking every step, to name the first bad one
                tracked = _run_jit(*settings, True, rng_key, log_density, init)
                if int(tracked.bad_step) >= 0:
                    res = tracked
                raise ChainDivergenceError(type(self).__name__, int(res.bad_step), self.step_size,
                                           int(res.num_bad))
        if return_info:
            return res.position, SamplerInfo(res.acceptance_rate, res.logdensity)
        return res.position

    def __reduce__(self):
        return (functools.partial(type(self), unroll=self.unroll), (self.steps, self.step_size))

    def _unroll_repr(self) -> str:
        return "" if self.unroll == 1 else f", unroll={self.unroll}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, step_size={self.step_size:g}{self._unroll_repr()})"


class ShortRunLangevin(_Langevin):
    r"""Short-run unadjusted Langevin dynamics (ULA), as in LEBM (Pang et al. 2020).

    .. math:: z_{k+1} = z_k + \tfrac{h^2}{2} \nabla_z \log \pi(z_k) + h\, \xi_k, \qquad \xi_k \sim \mathcal N(0, I)

    for ``steps`` steps with ``step_size`` :math:`h`. Not Metropolis-corrected: its samples follow a law that
    differs from :math:`\pi` by :math:`O(h^2)` even after many steps, and a short run is not convergent at all —
    it is a learned generator (see :mod:`tilted_priors.inference.diagnostics`). LEBM uses 60 x 0.4 for the prior and
    20 x 0.1 for the posterior. ``log_density`` need not be normalised. One compiled
    :func:`jax.lax.scan`; see the module notes on compilation and divergence.

    Parameters
    ----------
    steps : int
        Number of Langevin steps.
    step_size : float
        :math:`h > 0`, the noise scale; the drift is :math:`h^2 / 2` times the gradient.
    noise : bool
        ``False`` drops the noise term (gradient ascent on :math:`\log\pi`).
    unroll : int or bool
        JAX only: steps per iteration of the compiled loop (``True``: all). On CPU, XLA runs convolutions inside
        a rolled loop several times slower; fully unrolling a short chain through a convolutional generator is
        4-5x faster (and compiles no slower), while for small MLP energies it only lengthens compilation.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> z = ShortRunLangevin(60, 0.4).run(jax.random.PRNGKey(0), f, jnp.zeros((100, 2)))
    >>> z.shape
    (100, 2)
    """

    __slots__ = ("noise",)
    _kind = "ula"

    def __init__(self, steps: int = 60, step_size: float = 0.4, noise: bool = True, *, unroll: int | bool = 1):
        super().__init__(steps, step_size, unroll)
        object.__setattr__(self, "noise", bool(noise))

    @property
    def _noise(self) -> bool:
        return self.noise

    def __reduce__(self):
        return (functools.partial(ShortRunLangevin, unroll=self.unroll), (self.steps, self.step_size, self.noise))

    def __repr__(self) -> str:
        return (f"ShortRunLangevin(steps={self.steps}, step_size={self.step_size:g}, noise={self.noise}"
                f"{self._unroll_repr()})")


class MALA(_Langevin):
    r"""Metropolis-adjusted Langevin algorithm: the Langevin proposal plus an accept/reject step.

    .. math:: \alpha = \min\Bigl\{1, \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)}\Bigr\},
              \qquad q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}\nabla\log\pi(z),\, h^2 I\bigr)

    Leaves :math:`\pi` exactly invariant, so long runs converge to it. ``run(..., return_info=True)`` returns
    the mean acceptance probability per chain (aim for about 0.5–0.8 by tuning ``step_size``).
    ``log_density`` need not be normalised. One compiled :func:`jax.lax.scan`; see the module notes.

    Parameters
    ----------
    steps : int
        Number of MALA steps.
    step_size : float
        :math:`h > 0`, the proposal's noise scale.
    unroll : int or bool
        JAX only: steps per iteration of the compiled loop (see :class:`ShortRunLangevin`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> z, info = MALA(200, 0.8).run(jax.random.PRNGKey(0), f, jnp.zeros((50, 2)), return_info=True)
    >>> bool(0.0 < info.acceptance_rate.mean() < 1.0)
    True
    """

    __slots__ = ()
    _kind = "mala"

    def __init__(self, steps: int = 1000, step_size: float = 0.1, *, unroll: int | bool = 1):
        super().__init__(steps, step_size, unroll)


class Persistent(PersistentBase):
    """Keep the chains' state between calls: each ``run`` continues where the previous one stopped.

    The first call (or a call whose ``init`` has another shape, or after :meth:`reset`) starts from ``init``;
    later calls ignore ``init`` and continue from the stored positions (persistent contrastive divergence).

    Only concrete results are stored. Inside a traced function (the user's :func:`jax.jit`, a NumPyro ``SVI``
    update, ``MCMC``) the result is a tracer and is **not** stored, and stored chains enter the traced program
    as constants fixed when it was compiled; so within a jitted training step the chains do not persist. Keep
    persistent chains in the training state instead (the inference package does this for SVI).
    Unlike the other samplers a ``Persistent`` is mutable and compares equal only to itself.

    Parameters
    ----------
    sampler : ShortRunLangevin or MALA
        The sampler that moves the chains at each call.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> s = Persistent(ShortRunLangevin(10, 0.1))
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> a = s.run(jax.random.PRNGKey(0), f, jnp.zeros((8, 2)))
    >>> b = s.run(jax.random.PRNGKey(1), f, jnp.zeros((8, 2)))
    >>> bool((s.state == b).all())
    True
    """

    def _chain(self, rng_key, log_density, init) -> _ChainResult:
        return self.sampler._chain(rng_key, log_density, init)

    def run(self, rng_key, log_density, init, *, return_info: bool = False):
        """Continue the stored chains (or start them at ``init``) for ``sampler.steps`` steps."""
        init = jnp.asarray(init)
        out = self.sampler.run(rng_key, log_density, self._start(init).astype(init.dtype), return_info=return_info)
        position = out[0] if return_info else out
        if _is_concrete(position):
            self.state = position
        return out
