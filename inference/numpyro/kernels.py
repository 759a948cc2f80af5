r"""MCMC kernels for NumPyro's own :class:`numpyro.infer.MCMC` (JAX).

:class:`Langevin` is the Metropolis-adjusted Langevin algorithm (MALA), or the unadjusted one (ULA), over all
the latent sites of a model, with its step size adapted during warm-up. HMC and NUTS are NumPyro's own: with the
tilted prior written as an ordinary sample site, ``MCMC(NUTS(model), ...)`` works unchanged; ``Langevin`` runs
the same functional core as the prior's samplers (:mod:`tilted_priors.numpyro.langevin`).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import random
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc_util import build_adaptation_schedule, dual_averaging, welford_covariance
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.mcmc import MCMCKernel
from numpyro.infer.util import ParamInfo, initialize_model
from numpyro.util import identity, is_prng_key

from tilted_priors.inference.numpyro._kernel_parts import (MAX_LOG_RATIO_ERROR, InverseMassMatrix, adapt_mass,
                                                           adapt_step_size, check_inverse_mass_matrix, check_range,
                                                           init_mass_matrix, preconditioned_proposal)
from tilted_priors.inference.numpyro.handlers import normalizer
from tilted_priors._adapt import RANGE_FACTOR
from tilted_priors._mass_matrix import check_dense_mass
from tilted_priors._validation import check_flag, check_probability, check_step_size
from tilted_priors.errors import ChainRangeWarning
from tilted_priors.numpyro import Unnormalized
from tilted_priors.numpyro import langevin

__all__ = ["Langevin", "LangevinKernelState", "LangevinAdaptState"]


class LangevinAdaptState(NamedTuple):
    """State of the warm-up adaptation: step size and mass matrix, as NumPyro's ``HMCAdaptState``.

    The first five fields are :func:`numpyro.infer.hmc_util.dual_averaging`'s state (Hoffman & Gelman 2014, on
    :math:`\\log h`), named; the others hold the mass matrix as ``HMCAdaptState`` does. ``inverse_mass_matrix``
    is :math:`M^{-1}`, a vector (diagonal) or a matrix over the flattened latents (``ravel_pytree``'s order: sites
    sorted by name), or with a structured ``dense_mass`` a dict ``{tuple of site names: block}``;
    ``mass_matrix_sqrt`` is a Cholesky factor :math:`T` of :math:`M = T T^\\top` and ``mass_matrix_sqrt_inv``
    :math:`S = T^{-1}`, so :math:`M^{-1} = S^\\top S` (for a diagonal: :math:`1/\\sqrt{m}` and
    :math:`\\sqrt{m}`).
    """

    log_step_size: jax.Array  # the current iterate x_t
    log_step_size_avg: jax.Array  # its weighted average, used after warm-up
    grad_avg: jax.Array  # running mean of (target_accept_prob - accept_prob)
    t: jax.Array  # number of updates
    prox_center: jax.Array  # log(10 h_0)
    inverse_mass_matrix: Any  # M^-1, adapted per window
    mass_matrix_sqrt: Any  # T, M = T T^T
    mass_matrix_sqrt_inv: Any  # S = T^-1, M^-1 = S^T S
    mm_state: Any  # Welford (co)variance state of the current window
    window_idx: jax.Array  # index of the current warm-up window


class LangevinKernelState(NamedTuple):
    """The state of a :class:`Langevin` chain (batched over chains with ``chain_method="vectorized"``).

    - **i** — iteration, counted from 0 at the start of warm-up (not reset after it).
    - **z** — the latent values in unconstrained space (a dict by site, or the pytree given to ``potential_fn``).
    - **potential_energy** — :math:`U(z) = -\\log\\pi(z)` (unnormalised, tilted priors without their normalizer).
    - **z_grad** — :math:`\\nabla U(z)`, same structure as ``z``.
    - **step_size** — the step size :math:`h` the next transition uses.
    - **accept_prob** — Metropolis-Hastings acceptance probability of the last proposal (for ULA: the probability
      it would have had; the proposal is kept regardless).
    - **mean_accept_prob** — mean of ``accept_prob`` over warm-up, then restarted over sampling.
    - **diverging** — whether the last proposal diverged: non-finite, or a log-ratio below :math:`-1000`.
    - **adapt_state** — a :class:`LangevinAdaptState`.
    - **rng_key** — the chain's PRNG key.
    - **range_scale** — :math:`1 + \\max|z_0|` over the flattened starting point :math:`z_0`: a state farther than
      :math:`10^6` times this from 0 has run away (the rule of :mod:`tilted_priors._adapt`).
    """

    i: jax.Array
    z: Any
    potential_energy: jax.Array
    z_grad: Any
    step_size: jax.Array
    accept_prob: jax.Array
    mean_accept_prob: jax.Array
    diverging: jax.Array
    adapt_state: LangevinAdaptState
    rng_key: jax.Array
    range_scale: jax.Array | None = None


class Langevin(MCMCKernel):
    r"""Langevin MCMC kernel: MALA (``adjusted=True``) or ULA, with step-size adaptation during warm-up.

    All latent sites are flattened (:func:`jax.flatten_util.ravel_pytree`) into one vector :math:`z` in
    unconstrained space, with target :math:`\log\pi(z) = -U(z)`, :math:`U` the model's potential energy. Each
    transition proposes, with inverse mass matrix :math:`M^{-1} = S^\top S`,

    .. math:: z' = z + \tfrac{h^2}{2}M^{-1}\nabla\log\pi(z) + h\,S^\top\xi, \qquad \xi \sim \mathcal N(0, I),

    (:math:`h` the ``step_size``, the scale of the noise, as in the prior's samplers; with :math:`M = I` it is
    :func:`tilted_priors.numpyro.langevin.proposal`) and, for MALA, keeps it with probability

    .. math:: \alpha = \min\Bigl\{1, \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)}\Bigr\},
              \qquad q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}M^{-1}\nabla\log\pi(z),\,
              h^2 M^{-1}\bigr),

    so that :math:`\pi` is exactly invariant. ULA always keeps the proposal: its stationary law differs from
    :math:`\pi` by :math:`O(h^2)`; it reports as ``accept_prob`` the :math:`\alpha` the step would have had, a
    measure of the step's discretisation error.

    **Unnormalised target.** The model runs under
    ``tilted_priors.inference.numpyro.handlers.normalizer(Unnormalized())``: every tilted prior's :math:`\log Z` term is
    switched off inside the chain (it is constant in :math:`z`, and estimating it would cost a sampler run per
    step), so ``potential_energy`` is :math:`-\log\pi` only up to a constant. Initialisation may draw from the
    tilted prior (its short-run sampler), depending on ``init_strategy``.

    **Step size.** With ``adapt_step_size`` (the default) :math:`\log h` is tuned by dual averaging (as NumPyro's
    HMC, :func:`numpyro.infer.hmc_util.dual_averaging`, over the whole warm-up, centred at :math:`\log(10 h_0)`
    for MALA as HMC, at :math:`\log h_0` for ULA, which keeps every trial move) so that
    the acceptance probability approaches ``target_accept_prob`` (0.574 is optimal for MALA in high dimension,
    Roberts & Rosenthal 1998); after warm-up the averaged step size is kept fixed. For ULA the same rule
    targets the would-be acceptance, i.e. bounds the discretisation error.

    **Mass matrix.** With ``adapt_mass_matrix`` (the default) :math:`M^{-1}` is adapted during warm-up as
    NumPyro's HMC does (:func:`numpyro.infer.hmc_util.build_adaptation_schedule`, Stan's windows): after an
    initial buffer the draws of each window of doubling length give a regularised Welford estimate of the
    posterior covariance (:func:`numpyro.infer.hmc_util.welford_covariance`), which becomes :math:`M^{-1}` for
    the next window, the step-size adaptation restarting with it; a final buffer tunes the step size alone. A
    Gaussian posterior with covariance :math:`\Sigma` and :math:`M^{-1} = \Sigma` is a standard normal in the
    preconditioned coordinates, so badly scaled or correlated latents (regression coefficients) mix as well as
    isotropic ones. The matrix is diagonal by default (``dense_mass=True``: dense; a list of tuples of site
    names: dense blocks). After warm-up it is fixed, in ``mcmc.last_state.adapt_state.inverse_mass_matrix``
    (as ``HMCAdaptState.inverse_mass_matrix``). Warm-up shorter than 20 steps has a single window and adapts no
    mass matrix.

    **Divergences.** A proposal with a non-finite position, log density or gradient, or with a log-ratio below
    :math:`-1000` (HMC's threshold), sets ``diverging``. MALA
    rejects it and stays put. ULA keeps it — the chain's values become ``inf``/``nan`` from there on, and since
    nothing can be raised inside NumPyro's compiled loop, check ``mcmc.get_extra_fields()["diverging"]`` (always
    collected, as for HMC) or lower ``step_size`` / use MALA.

    **Runaway chains.** A proposal farther than :math:`10^6 (1 + \max|z_0|)` from 0 in unconstrained space
    (:math:`z_0` the starting point, the rule of :mod:`tilted_priors._adapt`) also sets ``diverging``: an unstable
    step can run away without ever overflowing. When a chain's state gets there the kernel warns once per run
    with :class:`~tilted_priors.ChainRangeWarning`, naming the step, through a host callback
    (:func:`jax.debug.callback`) that the compiled loop only calls in that case; the check itself is one
    reduction per step on the device.

    Parameters
    ----------
    model : callable, optional
        A NumPyro model. Exactly one of ``model`` and ``potential_fn``.
    step_size : float
        Initial step size :math:`h > 0` (the final one when ``adapt_step_size=False``).
    adjusted : bool
        ``True``: MALA (Metropolis-adjusted); ``False``: ULA (unadjusted, biased).
    potential_fn : callable, optional
        :math:`U(z)`, a scalar function of a pytree of arrays; then ``MCMC.run(..., init_params=...)`` must give
        the starting point (with a leading chain dimension for ``num_chains > 1``). No normalizer is switched off
        for it.
    adapt_step_size : bool
        Adapt :math:`h` during warm-up.
    adapt_mass_matrix : bool
        Adapt :math:`M^{-1}` during warm-up (starting from ``inverse_mass_matrix``, or the identity).
    dense_mass : bool or list of tuple of str
        ``False``: diagonal :math:`M^{-1}`; ``True``: dense; ``[("a", "b"), ...]``: a dense block for each tuple of
        sites, one diagonal block for the others (as NumPyro's HMC).
    inverse_mass_matrix : array or dict, optional
        A starting (or, with ``adapt_mass_matrix=False``, fixed) :math:`M^{-1}`: a vector (diagonal) or square
        matrix over all unconstrained latent values, sites sorted by name and each flattened; or a dict
        ``{tuple of site names: matrix}`` with one entry per block.
    target_accept_prob : float
        Target of the adaptation, in :math:`(0, 1)`.
    init_strategy : callable
        Per-site initialisation (:mod:`numpyro.infer.initialization`), as for HMC.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro.infer import MCMC
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> def model(x):
    ...     prior = EnergyTiltedNormal(lambda z: 0.5 * (z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2))
    ...     z = numpyro.sample("z", prior)
    ...     numpyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)
    >>> mcmc = MCMC(Langevin(model, step_size=0.3), num_warmup=200, num_samples=300, progress_bar=False)
    >>> mcmc.run(jax.random.PRNGKey(0), jnp.ones(2), extra_fields=("accept_prob", "step_size"))
    >>> mcmc.get_samples()["z"].shape
    (300, 2)
    >>> bool(0.3 < mcmc.get_extra_fields()["accept_prob"].mean() < 0.85)
    True
    >>> mcmc.last_state.adapt_state.inverse_mass_matrix.shape   # adapted in warm-up: the posterior variances
    (2,)
    """

    sample_field = "z"

    def __init__(self, model: Callable | None = None, step_size: float = 0.1, adjusted: bool = True, *,
                 potential_fn: Callable | None = None, adapt_step_size: bool = True,
                 adapt_mass_matrix: bool = True, dense_mass: bool | list[tuple[str, ...]] = False,
                 inverse_mass_matrix: InverseMassMatrix | None = None,
                 target_accept_prob: float = 0.57, init_strategy: Callable = init_to_uniform):
        if (model is None) == (potential_fn is None):
            raise ValueError("Langevin needs exactly one of `model` or `potential_fn`"
                             + (" (got both)" if model is not None else " (got neither)"))
        if model is not None and not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if potential_fn is not None and not callable(potential_fn):
            raise TypeError(f"potential_fn must be callable, got {type(potential_fn).__name__}")
        if not callable(init_strategy):
            raise TypeError(f"init_strategy must be callable, got {type(init_strategy).__name__}")
        self._model = model
        self._potential_fn = potential_fn
        self._step_size = check_step_size(step_size)
        self._adjusted = check_flag(adjusted, "adjusted")
        self._adapt_step_size = check_flag(adapt_step_size, "adapt_step_size")
        self._target_accept_prob = check_probability(target_accept_prob, "target_accept_prob")
        self._adapt_mass_matrix = check_flag(adapt_mass_matrix, "adapt_mass_matrix")
        self._dense_mass = check_dense_mass(dense_mass)
        self._inverse_mass_matrix = check_inverse_mass_matrix(inverse_mass_matrix)
        self._init_strategy = init_strategy
        self._num_warmup = 0
        # set by init: the mass matrix's blocks (site names, positions in the flat vector; used when structured),
        # the Welford state's sizes, the warm-up windows
        self._block_index: list[tuple[tuple[str, ...], np.ndarray]] = []
        self._mm_size: Any = None
        self._schedule = np.zeros((0, 2), int)
        # set by init
        self._potential_fn_gen = None
        self._postprocess_fn = None
        self._sample_fn = None
        self._range_warned = False

    # --- MCMCKernel interface ----------------------------------------------------------------------------
    @property
    def model(self) -> Callable | None:
        """The user's model (without the normalizer switched off)."""
        return self._model

    @property
    def adjusted(self) -> bool:
        """``True`` for MALA, ``False`` for ULA."""
        return self._adjusted

    @property
    def default_fields(self) -> tuple[str, ...]:
        return ("z", "diverging")

    def get_diagnostics_str(self, state: LangevinKernelState) -> str:
        return "step size {:.2e}. acc. prob={:.2f}".format(state.step_size, state.mean_accept_prob)

    def postprocess_fn(self, model_args, model_kwargs):
        if self._postprocess_fn is None:
            return identity
        return self._postprocess_fn(*model_args, **model_kwargs)

    def _unnormalized_model(self) -> Callable:
        return normalizer(self._model, Unnormalized())

    def _init_params(self, rng_key, model_args, model_kwargs, init_params):
        """Build the potential (and postprocess) from the model; draw initial values unless given."""
        if self._model is None:
            if init_params is None:
                raise ValueError("Langevin with `potential_fn` needs `init_params` (give MCMC.run(..., "
                                 "init_params=...))")
            return init_params
        model_info = initialize_model(rng_key, self._unnormalized_model(), dynamic_args=True,
                                      init_strategy=self._init_strategy, model_args=model_args,
                                      model_kwargs=model_kwargs)
        self._potential_fn_gen = model_info.potential_fn
        self._postprocess_fn = model_info.postprocess_fn
        if init_params is None:
            init_params = model_info.param_info
        return init_params.z if isinstance(init_params, ParamInfo) else init_params

    @property
    def _preconditioned(self) -> bool:
        """Whether the proposal uses a mass matrix (adapted, or given as ``inverse_mass_matrix``)."""
        return self._adapt_mass_matrix or self._inverse_mass_matrix is not None

    @property
    def _structured(self) -> bool:
        """Whether the mass matrix is a dict of blocks (``dense_mass`` a list of tuples of site names)."""
        return isinstance(self._dense_mass, list)

    def _get_potential_fn(self, model_args, model_kwargs) -> Callable:
        if self._potential_fn_gen is None:
            return self._potential_fn
        return self._potential_fn_gen(*model_args, **(model_kwargs or {}))

    def init(self, rng_key, num_warmup, init_params=None, model_args=(), model_kwargs=None) -> LangevinKernelState:
        model_kwargs = {} if model_kwargs is None else model_kwargs
        self._num_warmup = int(num_warmup)
        vectorized = not is_prng_key(rng_key)  # a batch of keys: chain_method="vectorized"
        if vectorized:
            rng_key, key_init = jnp.swapaxes(jax.vmap(random.split)(rng_key), 0, 1)
        else:
            rng_key, key_init = random.split(rng_key)
        init_params = self._init_params(key_init, model_args, model_kwargs, init_params)
        potential_fn = self._get_potential_fn(model_args, model_kwargs)
        self._schedule = np.asarray(build_adaptation_schedule(self._num_warmup), dtype=int).reshape(-1, 2)

        def init_one(z, key):
            flat, unravel = ravel_pytree(z)
            state = langevin.init(flat, lambda x: -potential_fn(unravel(x)))
            dtype = jnp.result_type(flat.dtype, jnp.float32)  # float64 under jax_enable_x64
            step_size = jnp.asarray(self._step_size, dtype)
            ss_init, _ = dual_averaging()
            mm_init, _, _ = welford_covariance(diagonal=not self._dense_mass)
            factors, self._block_index, self._mm_size = init_mass_matrix(z, dtype, self._dense_mass,
                                                                          self._inverse_mass_matrix)
            # Centred at log(10 h0) for MALA, as HMC; at log(h0) for ULA, which keeps every trial move.
            adapt_state = LangevinAdaptState(*ss_init(jnp.log((10.0 if self._adjusted else 1.0) * step_size)),
                                             *factors, mm_init(self._mm_size), jnp.array(0))
            zero = jnp.zeros((), dtype)
            range_scale = (1.0 + jnp.max(jnp.abs(flat), initial=0.0)).astype(dtype)
            return LangevinKernelState(jnp.array(0), z, -state.logdensity, unravel(-state.logdensity_grad),
                                       step_size, zero, zero, jnp.zeros((), bool), adapt_state, key, range_scale)

        self._sample_fn = self._sample_one
        self._range_warned = False
        if vectorized:
            return jax.vmap(init_one)(init_params, rng_key)
        return init_one(init_params, rng_key)

    def sample(self, state: LangevinKernelState, model_args, model_kwargs) -> LangevinKernelState:
        """One Langevin transition (all chains at once when ``state`` is batched, i.e. vectorized chains)."""
        if jnp.ndim(state.i) > 0:
            new = jax.vmap(self._sample_one, in_axes=(0, None, None))(state, model_args, model_kwargs)
        else:
            new = self._sample_one(state, model_args, model_kwargs)
        if new.range_scale is not None:
            check_range(new, self._report_range)  # calls _report_range when some chain's state is out of range
        return new

    def _report_range(self, step, worst, num_out, step_size, range_scale) -> None:
        """Host side of the range check: warn once per run."""
        if self._range_warned:
            return
        self._range_warned = True
        reference = f"times 1 + max|z_0| (= {float(range_scale):.3g}) from 0 in unconstrained space"
        name = f"Langevin ({'MALA' if self._adjusted else 'ULA'})"
        warnings.warn(ChainRangeWarning(name, int(step), float(worst), int(num_out), step_size=float(step_size),
                                        reference=reference, kernel=True), stacklevel=2)

    # --- one chain -----------------------------------------------------------------------------------------
    def _sample_one(self, state: LangevinKernelState, model_args, model_kwargs) -> LangevinKernelState:
        potential_fn = self._get_potential_fn(model_args, model_kwargs)
        flat, unravel = ravel_pytree(state.z)
        grad_flat, _ = ravel_pytree(state.z_grad)

        def log_density(x):
            return -potential_fn(unravel(x))

        current = langevin.LangevinState(flat, -state.potential_energy, -grad_flat)
        h = state.step_size
        rng_key, key_step = random.split(state.rng_key)
        # The steps of langevin.mala_step, kept apart to see the proposal (divergence) and, for ULA, its ratio.
        key_proposal, key_accept = random.split(key_step)
        if self._preconditioned:
            adapt = state.adapt_state
            factors = (adapt.inverse_mass_matrix, adapt.mass_matrix_sqrt, adapt.mass_matrix_sqrt_inv)
            new, log_ratio = preconditioned_proposal(key_proposal, current, log_density, h, factors,
                                                     self._block_index if self._structured else None)
        else:
            new = langevin.proposal(key_proposal, current, log_density, h)
            log_ratio = langevin.log_acceptance_ratio(current, new, h)
        # Non-finite, or a log-ratio below -1000 (the threshold HMC puts on its energy error; Pyro's kernel too),
        # or out of range (finite but run away: see tilted_priors._adapt).
        diverging = ~(jnp.isfinite(new.logdensity) & jnp.all(jnp.isfinite(new.position))
                      & jnp.all(jnp.isfinite(new.logdensity_grad)) & (log_ratio >= -MAX_LOG_RATIO_ERROR))
        if state.range_scale is not None:
            diverging = diverging | (jnp.max(jnp.abs(new.position), initial=0.0) > RANGE_FACTOR * state.range_scale)
        if self._adjusted:
            nxt, info = langevin.metropolis_accept(key_accept, current, new, log_ratio)
            accept_prob = info.acceptance_rate
        else:
            nxt = new
            accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accept_prob = accept_prob.astype(state.accept_prob.dtype)

        i = state.i
        warming = i < self._num_warmup
        step_size, adapt_state = h, state.adapt_state
        if self._adapt_step_size:
            adapt_state, step_size = adapt_step_size(i, adapt_state, accept_prob, h,
                                                     target_accept_prob=self._target_accept_prob,
                                                     num_warmup=self._num_warmup)
        if self._adapt_mass_matrix:
            sample = unravel(nxt.position) if self._structured else nxt.position
            prox_factor = (10.0 if self._adjusted else 1.0) if self._adapt_step_size else None
            updated = adapt_mass(i, adapt_state, sample, step_size, schedule=self._schedule,
                                 dense_mass=self._dense_mass, mm_size=self._mm_size, prox_factor=prox_factor)
            adapt_state = jax.tree.map(lambda a, b: jnp.where(warming, a, b), updated, adapt_state)

        itr = i + 1
        n = jnp.where(warming, itr, itr - self._num_warmup)
        mean_accept_prob = state.mean_accept_prob + (accept_prob - state.mean_accept_prob) / n
        return LangevinKernelState(itr, unravel(nxt.position), -nxt.logdensity, unravel(-nxt.logdensity_grad),
                                   step_size, accept_prob, mean_accept_prob, diverging, adapt_state, rng_key,
                                   state.range_scale)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_sample_fn"] = None
        return state

    def __repr__(self) -> str:
        return (f"Langevin({'MALA' if self._adjusted else 'ULA'}, step_size={self._step_size:g}, "
                f"adapt_step_size={self._adapt_step_size}, adapt_mass_matrix={self._adapt_mass_matrix}, "
                f"dense_mass={self._dense_mass}, target_accept_prob={self._target_accept_prob:g})")
