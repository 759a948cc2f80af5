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
:func:`jax.numpy.isfinite`, or run eagerly once to locate the problem). The error's message gives a step size
within the stability bound measured at ``init`` (see :mod:`tilted_priors._adapt`).

**Runaway chains.** Chains that stay finite but leave any reasonable range (an unstable step size that stops short
of overflowing) are measured inside the compiled chain, once, from its final positions, by the rule of
:mod:`tilted_priors._adapt`: farther than :math:`10^6` base standard deviations from the base's mean for an
:class:`~tilted_priors.numpyro.EnergyTilted`'s log density (its ``annealed_log_density``), else farther than
:math:`10^6 (1 + \max|z_0|)` from 0, :math:`z_0` = ``init``. An eager ``run`` reads the result with the
divergence check and warns with :class:`~tilted_priors.ChainRangeWarning`, or raises
:class:`~tilted_priors.ChainDivergenceError` for a sampler built with ``strict=True``; under an outer trace nothing
can be reported, as for divergences.

**Checks of the arguments.** ``init`` must be floating point (an integer array raises ``TypeError``), and
``log_density`` must be written with :mod:`jax.numpy` and return an array of the chains' shape: NumPy calls on the
traced ``z``, or a Python float / NumPy array as result, raise ``TypeError`` saying so.

**Step size.** ``step_size="auto"`` scales the step size to the target and adapts it within each ``run``: it
starts from :math:`1/\sqrt{\hat L}`, :math:`\hat L` the gradient's Lipschitz constant probed at ``init``, moves
:math:`\log h` towards a target Metropolis-Hastings acceptance during the first half of the steps (MALA accepts
with it; ULA only measures it) and keeps the last value for the second half (:mod:`tilted_priors._adapt` has the
rule). It is a second compiled chain; a fixed step size runs exactly the chain it always did.

Samplers are immutable and compare equal (and hash) by their settings, so they can sit in pytree auxiliary data
and in :func:`jax.jit` cache keys.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from tilted_priors import _adapt
from tilted_priors._compat import jax_in_transformation
from tilted_priors._persistent import PersistentBase
from tilted_priors._validation import check_flag, check_positive_int
from tilted_priors.errors import ChainDivergenceError, ChainRangeWarning
from tilted_priors.numpyro._chain_checks import (as_partial, base_loc_scale, check_init, is_array, is_array_pytree,
                                                 is_concrete, range_scale, tilted_of)
from tilted_priors.numpyro._chains import ChainResult, chain, check_unroll, lipschitz_jit, run_jit

__all__ = ["SamplerInfo", "ShortRunLangevin", "MALA", "Persistent"]

# The former names of helpers now in _chain_checks, for the modules that still import them from here
# (distributions, normalizers, inference.numpyro.guides).
_is_array, _is_array_pytree, _is_concrete = is_array, is_array_pytree, is_concrete


class SamplerInfo(NamedTuple):
    """Summary of one ``run``: mean acceptance probability per chain (1 for ULA; with ``step_size="auto"`` over the
    steps after the warm-up), the final log density and the step size used (the adapted one for ``"auto"``)."""

    acceptance_rate: jax.Array
    logdensity: jax.Array
    step_size: jax.Array | None = None


# --- the settings base, shared with normalizers.py and sir.py ----------------------------------------------
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


class _Langevin(_Frozen):
    """Shared run loop of the Langevin samplers; subclasses set ``_kind``."""

    __slots__ = ("steps", "step_size", "target_accept", "unroll", "strict")
    _kind = "ula"

    def __init__(self, steps: int, step_size: float | str, unroll: int | bool | str = 1,
                 target_accept: float | None = None, strict: bool = False):
        object.__setattr__(self, "strict", check_flag(strict, "strict"))
        object.__setattr__(self, "steps", check_positive_int("steps", steps))
        object.__setattr__(self, "step_size", _adapt.check_step_size_or_auto(step_size))
        object.__setattr__(self, "target_accept", _adapt.check_target_accept(target_accept, self.step_size,
                                                                             self._kind))
        object.__setattr__(self, "unroll", check_unroll(unroll, self.steps))

    @property
    def _noise(self) -> bool:
        return True

    def _key(self) -> tuple:
        return (self.steps, self.step_size, self.target_accept, self._noise, self.unroll, self.strict)

    @property
    def _step_setting(self):
        """The static step-size argument of :func:`_chain`: the float, or ``("auto", target_accept)``."""
        return (_adapt.AUTO, self.target_accept) if self.step_size == _adapt.AUTO else self.step_size

    def _chain(self, rng_key, log_density, init) -> ChainResult:
        """Run the chain inline (for use inside another traced loop, e.g. annealed importance sampling)."""
        return chain(self._kind, self.steps, self._step_setting, self._noise, self.unroll, True, rng_key,
                     as_partial(log_density), jnp.asarray(init))

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
            Also return a :class:`SamplerInfo` (with the adapted step size for ``step_size="auto"``).

        Raises
        ------
        ChainDivergenceError
            When some chain's log density became non-finite (eager calls only; under an outer trace the
            non-finite values are returned). Its message gives a step size within the stability bound measured
            at ``init``. With ``strict=True`` also when the chains ran away (see below).
        TypeError
            When ``init`` is not a floating array, or ``log_density`` calls NumPy on ``z`` or returns a Python
            number or NumPy array.
        ValueError
            When ``log_density`` returns an array of another shape than ``init.shape[:-1]``.

        Warns
        -----
        ChainRangeWarning
            When the final positions are out of range (the rule of :mod:`tilted_priors._adapt`, measured once
            inside the compiled chain) and ``strict`` is ``False``; eager calls only.
        """
        return self._run(rng_key, log_density, init, return_info)

    def _run(self, rng_key, log_density, init, return_info: bool, origin=None):
        """``run``, with the scale ``origin`` of the range rule (``1 + max|z_0|``) given by a ``Persistent``."""
        if rng_key is None:
            if self._noise:
                raise ValueError(f"{type(self).__name__}.run needs an rng_key, e.g. jax.random.PRNGKey(0)")
            rng_key = jax.random.PRNGKey(0)  # unused: no noise
        init = check_init(init)
        log_density = as_partial(log_density)
        settings = (self._kind, self.steps, self._step_setting, self._noise, self.unroll)
        if jax_in_transformation(rng_key, log_density, init, origin):
            res = chain(*settings, False, rng_key, log_density, init, origin)  # nothing can be raised under a trace
        else:
            res = run_jit(*settings, False, rng_key, log_density, init, origin)
            bad_step, ratio, num_out = jax.device_get((res.bad_step, res.range_ratio, res.range_num))
            if int(bad_step) >= 0:  # re-run the same chain tracking every step, to name the first bad one
                tracked = run_jit(*settings, True, rng_key, log_density, init, origin)
                if int(tracked.bad_step) >= 0:
                    res = tracked
                raise self._divergence(res, rng_key, log_density, init)
            if float(ratio) > _adapt.RANGE_FACTOR:
                self._runaway(float(ratio), int(num_out), res, rng_key, log_density, init, origin)
        if return_info:
            return res.position, SamplerInfo(res.acceptance_rate, res.logdensity, res.step_size)
        return res.position

    def _runaway(self, ratio: float, num_out: int, res: ChainResult, rng_key, log_density, init, origin) -> None:
        """Warn (``strict``: raise) about chains that ran away: finite, but out of range."""
        adapted = self.step_size == _adapt.AUTO
        name = type(self).__name__ + (" (step_size='auto')" if adapted else "")
        if base_loc_scale(tilted_of(log_density)) is not None:
            reference = "base standard deviations from the base's mean"
        else:
            scale = float(range_scale(init) if origin is None else origin)
            reference = f"times 1 + max|init| (= {scale:.3g}) from 0"
        lipschitz = float(lipschitz_jit(jax.random.fold_in(rng_key, 1), log_density, init))
        h = float(res.step_size)
        if self.strict:
            raise ChainDivergenceError(name, self.steps, h, num_out, lipschitz=lipschitz, adapted=adapted,
                                       ratio=ratio, reference=reference)
        warnings.warn(ChainRangeWarning(name, self.steps, ratio, num_out, step_size=h, reference=reference,
                                        lipschitz=lipschitz, adapted=adapted), stacklevel=4)

    def _divergence(self, res: ChainResult, rng_key, log_density, init) -> ChainDivergenceError:
        """The error for a diverged chain, with the Lipschitz constant measured at ``init`` (see ``_adapt``)."""
        step, adapted = int(res.bad_step), self.step_size == _adapt.AUTO
        lipschitz = float(lipschitz_jit(jax.random.fold_in(rng_key, 1), log_density, init)) if step > 0 else None
        name = type(self).__name__ + (" (step_size='auto')" if adapted else "")
        return ChainDivergenceError(name, step, float(res.step_size), int(res.num_bad), lipschitz=lipschitz,
                                    adapted=adapted)

    def __reduce__(self):
        return (functools.partial(type(self), unroll=self.unroll, **self._target_kwargs()),
                (self.steps, self.step_size))

    def _target_kwargs(self) -> dict:
        """``target_accept`` as a keyword when it is not the default of ``"auto"`` (and ``strict`` when set)."""
        kwargs = {"strict": True} if self.strict else {}
        if self.step_size == _adapt.AUTO and self.target_accept != _adapt.TARGET_ACCEPT[self._kind]:
            kwargs["target_accept"] = self.target_accept
        return kwargs

    def _extra_repr(self) -> str:
        extra = "".join(f", {k}={v:g}" for k, v in self._target_kwargs().items() if k != "strict")
        return (extra + ("" if self.unroll == 1 else f", unroll={self.unroll!r}")
                + (", strict=True" if self.strict else ""))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.steps}, step_size={_adapt.format_step_size(self.step_size)}"
                f"{self._extra_repr()})")


class ShortRunLangevin(_Langevin):
    r"""Short-run unadjusted Langevin dynamics (ULA), as in LEBM (Pang et al. 2020).

    .. math:: z_{k+1} = z_k + \tfrac{h^2}{2} \nabla_z \log \pi(z_k) + h\, \xi_k, \qquad \xi_k \sim \mathcal N(0, I)

    for ``steps`` steps with ``step_size`` :math:`h`. Not Metropolis-corrected: its samples follow a law that
    differs from :math:`\pi` by :math:`O(h^2)` even after many steps, and a short run is not convergent at all —
    it is a learned generator (see :mod:`tilted_priors.inference.diagnostics`). LEBM uses 60 x 0.4 for the prior and
    20 x 0.1 for the posterior. ``log_density`` need not be normalised. One compiled
    :func:`jax.lax.scan`; see the module notes on compilation and divergence.

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
    unroll : int, bool or "auto"
        JAX only: steps per iteration of the compiled loop (``True``: all; default 1, a rolled loop). XLA on CPU
        runs convolutions inside a rolled loop several times slower: fully unrolling a short chain through a
        convolutional generator is 4-5x faster, while for MLPs it only lengthens compilation (an LEBM update of
        a factor model: 2.8 s to compile with a 20-step posterior chain unrolled, 1.6 s rolled, same speed).
        ``"auto"`` unrolls fully when the log density calls a convolution and rolls the loop otherwise (the
        default of the posterior guides' chains).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> z = ShortRunLangevin(60, 0.4).run(jax.random.PRNGKey(0), f, jnp.zeros((100, 2)))
    >>> z.shape
    (100, 2)
    >>> z, info = ShortRunLangevin(60, "auto").run(jax.random.PRNGKey(0), lambda z: f(z / 0.01), z,
    ...                                            return_info=True)
    >>> bool(0.003 < info.step_size < 0.01)   # scaled to the target's sd 0.01
    True
    """

    __slots__ = ("noise",)
    _kind = "ula"

    def __init__(self, steps: int = 60, step_size: float | str = 0.4, noise: bool = True, *,
                 target_accept: float | None = None, strict: bool = False, unroll: int | bool | str = 1):
        super().__init__(steps, step_size, unroll, target_accept, strict)
        if not noise and self.step_size == _adapt.AUTO:
            raise ValueError("step_size='auto' adapts to the acceptance of noisy Langevin moves; with noise=False "
                             "(gradient ascent) give a fixed step_size")
        object.__setattr__(self, "noise", check_flag(noise, "noise"))

    @property
    def _noise(self) -> bool:
        return self.noise

    def __reduce__(self):
        return (functools.partial(ShortRunLangevin, unroll=self.unroll, **self._target_kwargs()),
                (self.steps, self.step_size, self.noise))

    def __repr__(self) -> str:
        return (f"ShortRunLangevin(steps={self.steps}, step_size={_adapt.format_step_size(self.step_size)}, "
                f"noise={self.noise}{self._extra_repr()})")


class MALA(_Langevin):
    r"""Metropolis-adjusted Langevin algorithm: the Langevin proposal plus an accept/reject step.

    .. math:: \alpha = \min\Bigl\{1, \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)}\Bigr\},
              \qquad q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}\nabla\log\pi(z),\, h^2 I\bigr)

    Leaves :math:`\pi` exactly invariant, so long runs converge to it. ``run(..., return_info=True)`` returns
    the mean acceptance probability per chain (aim for about 0.5–0.8 by tuning ``step_size``, or let
    ``step_size="auto"`` do it). ``log_density`` need not be normalised. One compiled :func:`jax.lax.scan`; see the
    module notes.

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
    unroll : int, bool or "auto"
        JAX only: steps per iteration of the compiled loop (see :class:`ShortRunLangevin`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
    >>> z, info = MALA(200, 0.8).run(jax.random.PRNGKey(0), f, jnp.zeros((50, 2)), return_info=True)
    >>> bool(0.0 < info.acceptance_rate.mean() < 1.0)
    True
    >>> z, info = MALA(200, "auto").run(jax.random.PRNGKey(0), lambda z: f(z / 5.0), z, return_info=True)
    >>> bool(0.45 < info.acceptance_rate.mean() < 0.7)
    True
    """

    __slots__ = ()
    _kind = "mala"

    def __init__(self, steps: int = 1000, step_size: float | str = 0.1, *, target_accept: float | None = None,
                 strict: bool = False, unroll: int | bool = 1):
        super().__init__(steps, step_size, unroll, target_accept, strict)


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

    def _chain(self, rng_key, log_density, init) -> ChainResult:
        return self.sampler._chain(rng_key, log_density, init)

    def run(self, rng_key, log_density, init, *, return_info: bool = False):
        """Continue the stored chains (or start them at ``init``) for ``sampler.steps`` steps.

        The range check of the wrapped sampler (see the module notes) measures against the ``init`` of the call
        that started the chains, so chains that drift away over many calls are reported too.
        """
        init = check_init(init)
        start = self._start(init)
        if start is init or getattr(self, "_origin", None) is None:
            origin = range_scale(init)
            self._origin = origin if is_concrete(origin) else None
        else:
            origin = self._origin
        if isinstance(self.sampler, _Langevin):
            out = self.sampler._run(rng_key, log_density, start.astype(init.dtype), return_info, origin)
        else:
            out = self.sampler.run(rng_key, log_density, start.astype(init.dtype), return_info=return_info)
        position = out[0] if return_info else out
        if is_concrete(position):
            self.state = position
        return out

    def reset(self) -> None:
        """Forget the stored chains (and the scale of their first starting points); the next call starts from its
        ``init``."""
        super().reset()
        self._origin = None
