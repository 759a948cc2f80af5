r"""MCMC kernels for Pyro's own :class:`pyro.infer.MCMC` on models with energy-tilted priors.

:class:`Langevin` is the Metropolis-adjusted (MALA) or unadjusted (ULA) Langevin kernel built on the functional
core :mod:`tilted_priors.pyro.langevin`. HMC and NUTS are Pyro's own (``pyro.infer.NUTS(model)`` works on the same
models unchanged); so do ``az.from_pyro`` and ``MCMC.summary`` / ``MCMC.diagnostics``.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections import OrderedDict
from typing import Callable

import pyro
import torch
from pyro.infer.autoguide import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.infer.mcmc.util import initialize_model
from pyro.util import optional

from tilted_priors.inference.pyro._kernel_parts import (MAX_LOG_RATIO_ERROR, InverseMassMatrix, LangevinWarmupAdapter,
                                                        check_inverse_mass_matrix, mass_matrix_factors,
                                                        preconditioned_proposal)
from tilted_priors.inference.pyro.handlers import normalizer
from tilted_priors._mass_matrix import check_dense_mass, check_mass_matrix_shapes, mass_matrix_blocks
from tilted_priors._validation import check_flag, check_probability, check_step_size
from tilted_priors._adapt import RANGE_FACTOR
from tilted_priors.errors import ChainDivergenceError, ChainRangeWarning
from tilted_priors.pyro import Unnormalized, langevin
from tilted_priors.pyro._tracing import GraphCache

__all__ = ["Langevin"]

Params = dict[str, torch.Tensor]


class Langevin(MCMCKernel):
    r"""Langevin MCMC kernel for :class:`pyro.infer.MCMC`: MALA, or ULA with ``adjusted=False``.

    All unconstrained latent sites form one vector :math:`z` (in the order of the model's trace) and the chain runs
    on :math:`\log\pi(z) = -U(z)`, with :math:`U` the potential energy of the model (Pyro's ``potential_fn``).
    Every step makes the preconditioned Langevin proposal with step size :math:`h` and inverse mass matrix
    :math:`M^{-1}`

    .. math:: z' = z + \tfrac{h^2}{2} M^{-1} \nabla \log \pi(z) + h\, M^{-1/2} \xi, \qquad \xi \sim \mathcal N(0, I),

    (:math:`M^{-1/2}` the Cholesky factor of :math:`M^{-1}`) which MALA accepts with the Metropolis-Hastings
    probability

    .. math:: \alpha = \min\Bigl\{1, \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)}\Bigr\}, \qquad
              q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}M^{-1}\nabla\log\pi(z),\, h^2 M^{-1}\bigr),

    leaving the posterior exactly invariant; ULA keeps every proposal (its law is biased by :math:`O(h^2)`) and
    reports :math:`\alpha` as the acceptance probability the step would have had, a measure of its discretisation
    error. With :math:`M = I` (``adapt_mass_matrix=False`` and no ``inverse_mass_matrix``) the proposal,
    :math:`\alpha` and the accept step are those of :mod:`tilted_priors.pyro.langevin`.

    The log density is **unnormalised**: the model runs under
    :func:`~tilted_priors.inference.pyro.handlers.normalizer` with :class:`~tilted_priors.pyro.Unnormalized`, so every tilted
    prior contributes :math:`-E(z) + \log q(z)` without its (constant) :math:`\log Z` term, which would otherwise
    be recomputed at every step. Initialisation (``init_strategy``) may draw from the priors with their samplers.

    During warm-up the step size is adapted by dual averaging (Hoffman & Gelman 2014, as in Pyro's HMC) so that
    the mean of :math:`\alpha` approaches ``target_accept_prob``; after warm-up it is fixed to
    :math:`\exp` of the averaged log step size. MALA's scheme is centred at :math:`\log(10 h_0)` as HMC's; ULA's at
    :math:`\log h_0` (an unadjusted chain keeps every move, so trial step sizes far above :math:`h_0` are not
    free). The default target 0.57 is the optimal MALA acceptance rate (Roberts & Rosenthal 1998).

    **Mass matrix.** With ``adapt_mass_matrix`` (the default) :math:`M^{-1}` is adapted during warm-up as Pyro's
    HMC does (:class:`pyro.infer.mcmc.adaptation.WarmupAdapter`, Stan's windows): after an initial buffer the
    draws of each window of doubling length give a regularised Welford estimate of the posterior covariance
    (:mod:`pyro.ops.welford`), which becomes :math:`M^{-1}` for the next window, the step-size adaptation
    restarting with it; a final buffer tunes the step size alone. A Gaussian posterior with covariance
    :math:`\Sigma` and :math:`M^{-1} = \Sigma` is a standard normal in the preconditioned coordinates, so
    badly scaled or correlated latents (regression coefficients) mix as well as isotropic ones. The matrix is
    diagonal by default (``dense_mass=True``: dense; a list of tuples of site names: dense blocks, as HMC's
    ``full_mass``). After warm-up it is fixed, in :attr:`inverse_mass_matrix`. Warm-up shorter than 20 steps
    has a single window and adapts no mass matrix.

    A MALA proposal with a non-finite log density (or a log-ratio below :math:`-1000`, HMC's threshold) is
    rejected and counted in ``diagnostics()["divergences"]`` (indices of post-warm-up draws, read by
    ``az.from_pyro`` as ``diverging``). An unadjusted chain cannot reject: when its state becomes non-finite the
    kernel raises :class:`~tilted_priors.ChainDivergenceError` naming the step.

    **Compiled potential.** Each step evaluates :math:`U` and its gradient, which runs the model's Python (Pyro's
    effect handlers, distributions built, transforms). With ``compile_potential=True`` (the default) the first
    step of a run traces them into a graph of torch operations (as :class:`ShortRunPosterior` does, see its notes)
    and the later steps replay it: the same draws (to rounding where a transposed convolution becomes a matrix
    product), without the model's Python. The graph's value is checked against the eager potential at the first
    step; a potential that cannot be traced (Python that reads tensor values) or is random runs eagerly.

    **Runaway chains.** A chain that stays finite but leaves any reasonable range (an unstable step size that stops
    short of overflowing) warns once per run with :class:`~tilted_priors.ChainRangeWarning`, naming the first step
    at which the state was farther than :math:`10^6 (1 + \max|z_0|)` from 0 in unconstrained space (:math:`z_0`
    the starting point; the rule of :mod:`tilted_priors._adapt`). The check is read with the step's acceptance
    ratio, which every step reads anyway: no extra synchronisation.

    Parameters
    ----------
    model : callable, optional
        A Pyro model whose latent sites are continuous (constrained sites are moved to the real line by
        ``transforms``). Exactly one of ``model`` and ``potential_fn`` is given.
    step_size : float
        :math:`h_0 > 0`, the noise scale of the first step (the drift is :math:`h^2 / 2` times the gradient).
    adjusted : bool
        ``True``: MALA (exact); ``False``: ULA.
    potential_fn : callable, optional
        :math:`U`, mapping a dict of unconstrained tensors to a scalar; then the chains start at ``initial_params``
        (given to ``MCMC`` or set on the kernel).
    adapt_step_size : bool
        Adapt :math:`h` during warm-up.
    adapt_mass_matrix : bool
        Adapt :math:`M^{-1}` during warm-up (starting from ``inverse_mass_matrix``, or the identity).
    dense_mass : bool or list of tuple of str
        ``False``: diagonal :math:`M^{-1}`; ``True``: dense; ``[("a", "b"), ...]``: a dense block for each tuple of
        sites, one diagonal block for the others (Pyro's HMC calls this ``full_mass``).
    inverse_mass_matrix : tensor or dict, optional
        A starting (or, with ``adapt_mass_matrix=False``, fixed) :math:`M^{-1}`: a vector (diagonal) or square
        matrix over all unconstrained latent values, sites sorted by name and each flattened; or a dict
        ``{tuple of site names: matrix}`` with one entry per block, as :attr:`inverse_mass_matrix` returns.
    target_accept_prob : float
        In :math:`(0, 1)`; the adaptation's target for the mean acceptance probability.
    transforms : dict, optional
        Site name to transform into unconstrained space (default: from each site's support), as in HMC.
    max_plate_nesting, jit_compile, jit_options, ignore_jit_warnings, init_strategy
        As in :class:`pyro.infer.HMC` (passed to :func:`pyro.infer.mcmc.util.initialize_model`).
    min_stepsize, max_stepsize : float
        Bounds on the adapted step size.
    compile_potential : bool
        Replay a traced graph of :math:`U` and its gradient at every step (see above; ignored with
        ``jit_compile=True``, Pyro's own compilation). ``False`` runs the model at every step.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import MCMC
    >>> from tilted_priors.pyro import EnergyTiltedNormal, ShortRunLangevin
    >>> def model(x):
    ...     prior = EnergyTiltedNormal(lambda z: 0.1 * (z ** 4).sum(-1), torch.zeros(2), torch.ones(2),
    ...                                sampler=ShortRunLangevin(10, 0.2))
    ...     z = pyro.sample("z", prior)
    ...     pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)
    >>> kernel = Langevin(model, step_size=0.3)
    >>> mcmc = MCMC(kernel, num_samples=50, warmup_steps=50, disable_progbar=True)
    >>> mcmc.run(torch.tensor([1.0, -0.5]))
    >>> mcmc.get_samples()["z"].shape
    torch.Size([50, 2])
    >>> sorted(mcmc.diagnostics()["acceptance rate"])
    ['chain 0']
    >>> kernel.inverse_mass_matrix["z",].shape   # adapted in warm-up: the posterior variances
    torch.Size([2])
    """

    def __init__(self, model: Callable | None = None, step_size: float = 0.1, adjusted: bool = True, *,
                 potential_fn: Callable[[Params], torch.Tensor] | None = None, adapt_step_size: bool = True,
                 adapt_mass_matrix: bool = True, dense_mass: bool | list[tuple[str, ...]] = False,
                 inverse_mass_matrix: InverseMassMatrix | None = None,
                 target_accept_prob: float = 0.57, transforms: dict | None = None,
                 max_plate_nesting: int | None = None, jit_compile: bool = False, jit_options: dict | None = None,
                 ignore_jit_warnings: bool = False, init_strategy: Callable = init_to_uniform,
                 min_stepsize: float = 1e-10, max_stepsize: float = 1e10, compile_potential: bool = True):
        if (model is None) == (potential_fn is None):
            raise ValueError("Langevin needs exactly one of `model` (a Pyro model) or `potential_fn` (a function "
                             "of a dict of unconstrained tensors returning the potential energy)")
        for name, fn in (("model", model), ("potential_fn", potential_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self._init_step_size = check_step_size(step_size)
        self._min_stepsize = check_step_size(min_stepsize, "min_stepsize")
        self._max_stepsize = check_step_size(max_stepsize, "max_stepsize")
        if self._min_stepsize > self._max_stepsize:
            raise ValueError(f"min_stepsize ({min_stepsize!r}) must not exceed max_stepsize ({max_stepsize!r})")
        self.model = model
        self.potential_fn = potential_fn
        self.transforms = transforms
        self.adjusted = check_flag(adjusted, "adjusted")
        self.adapt_step_size = check_flag(adapt_step_size, "adapt_step_size")
        self.target_accept_prob = check_probability(target_accept_prob, "target_accept_prob")
        self.adapt_mass_matrix = check_flag(adapt_mass_matrix, "adapt_mass_matrix")
        self.compile_potential = check_flag(compile_potential, "compile_potential")
        self.dense_mass = check_dense_mass(dense_mass)
        self._given_inverse_mass_matrix = check_inverse_mass_matrix(inverse_mass_matrix)
        self._max_plate_nesting = max_plate_nesting
        self._jit_compile = jit_compile
        self._jit_options = jit_options
        self._ignore_jit_warnings = ignore_jit_warnings
        self._init_strategy = init_strategy
        self._step_size = self._init_step_size
        self._initial_params: Params | None = None
        # Centred at log(10 h) for MALA, as HMC; at log(h) for ULA, which keeps every trial move.
        self._adapter = LangevinWarmupAdapter(10.0 if self.adjusted else 1.0, step_size=self._init_step_size,
                                              adapt_step_size=self.adapt_step_size,
                                              target_accept_prob=self.target_accept_prob,
                                              adapt_mass_matrix=self.adapt_mass_matrix, dense_mass=self.dense_mass)
        self._reset()
        super().__init__()

    # --- state of one run ----------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._t = 0
        self._warmup_steps = 0
        self._accept_cnt = 0
        self._mean_accept_prob = 0.0
        self._divergences: list[int] = []
        self._state: langevin.LangevinState | None = None
        # log pi of the flat position: the eager potential, or a TracedLogDensity of it (set by _start)
        self._log_density: Callable[[torch.Tensor], torch.Tensor] = self._eager_log_density
        self._origin: torch.Tensor | None = None  # 1 + max|z_0|, the scale of the range rule
        self._range_warned = False
        self._names: list[str] = []
        self._shapes: list[torch.Size] = []
        self._sizes: list[int] = []
        self._initial_params = None
        # The mass matrix by block: positions in the flat vector, and (M^-1, its Cholesky factor L, L^-1).
        self._block_index: list[torch.Tensor] = []
        self._factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def name(self) -> str:
        return f"Langevin ({'MALA' if self.adjusted else 'ULA'})"

    @property
    def step_size(self) -> float:
        """The step size in use (adapted during warm-up, fixed after)."""
        return self._step_size

    @property
    def inverse_mass_matrix(self) -> dict[tuple[str, ...], torch.Tensor]:
        """:math:`M^{-1}` in use, as Pyro's ``HMC.inverse_mass_matrix``: ``{tuple of site names: tensor}``, a
        vector for a diagonal block, a matrix for a dense one (sites in the order named, each flattened). Adapted
        during warm-up, fixed after; empty before the kernel is set up."""
        return self._adapter.mass_matrix_adapter.inverse_mass_matrix

    @property
    def mass_matrix_adapter(self):
        """Pyro's :class:`~pyro.infer.mcmc.adaptation.BlockMassMatrix` holding :math:`M^{-1}` (as HMC's)."""
        return self._adapter.mass_matrix_adapter

    @property
    def initial_params(self) -> Params | None:
        """Unconstrained starting values per site (set by ``MCMC(initial_params=...)`` or by ``setup``)."""
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: Params | None) -> None:
        self._initial_params = params

    # --- the flat position -----------------------------------------------------------------------------------
    def _unflatten(self, flat: torch.Tensor) -> Params:
        return {n: v.reshape(s) for n, v, s in zip(self._names, flat.split(self._sizes), self._shapes)}

    def _flatten(self, params: Params) -> torch.Tensor:
        return torch.cat([params[n].detach().reshape(-1) for n in self._names])

    def _eager_log_density(self, flat: torch.Tensor) -> torch.Tensor:
        return -self.potential_fn(self._unflatten(flat))

    def _start(self, params: Params) -> None:
        self._names = list(params)
        self._shapes = [params[n].shape for n in self._names]
        self._sizes = [params[n].numel() for n in self._names]
        if not self._names:
            self._state = None
            return
        self._log_density = self._eager_log_density
        if self.compile_potential and not self._jit_compile:  # a graph for this run, checked at its first step
            key = (tuple(self._names), tuple(tuple(s) for s in self._shapes))
            self._log_density = GraphCache(trace_first=True).log_density(self._eager_log_density, static=key)
        self._state = langevin.init(self._flatten(params), self._log_density)
        self._check_finite(self._state, 0)
        self._origin = 1.0 + self._state.position.abs().amax()
        self._range_warned = False

    def _check_finite(self, state: langevin.LangevinState, step: int) -> None:
        # One reduction and one sync: the sum is non-finite iff some term is (or the chain ran away).
        total = state.logdensity + state.position.sum() + state.logdensity_grad.sum()
        if not math.isfinite(total.item()):
            raise ChainDivergenceError(self.name, step, self._step_size)

    # --- MCMCKernel ------------------------------------------------------------------------------------------
    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        """Initialise the model (potential, transforms, starting point) and the step-size adaptation."""
        self._t, self._accept_cnt, self._mean_accept_prob, self._divergences = 0, 0, 0.0, []
        self._warmup_steps = int(warmup_steps)
        if self.model is not None:
            init_params, potential_fn, transforms, _ = initialize_model(
                normalizer(self.model, Unnormalized()), args, kwargs, transforms=self.transforms,
                max_plate_nesting=self._max_plate_nesting, jit_compile=self._jit_compile,
                jit_options=self._jit_options, skip_jit_warnings=self._ignore_jit_warnings,
                init_strategy=self._init_strategy, initial_params=self._initial_params)
            self.potential_fn, self.transforms, self._initial_params = potential_fn, transforms, init_params
        elif self._initial_params is None:
            raise ValueError("Langevin(potential_fn=...) needs starting values: pass initial_params to MCMC (a "
                             "dict of unconstrained tensors, with a leading dimension of num_chains when "
                             "num_chains > 1) or set kernel.initial_params")
        self._step_size = self._init_step_size
        self._start(self._initial_params)
        self._setup_adapter()

    def _setup_adapter(self) -> None:
        """Configure the warm-up adapter for the sites of the chain: blocks, starting mass matrix, step size."""
        blocks = mass_matrix_blocks(self.dense_mass, dict(zip(self._names, self._sizes)))
        # The adapter's tensors follow the chain's position (torch's defaults when no site moves).
        like = self._state.position if self._state is not None else None
        dtype, device = (torch.get_default_dtype(), None) if like is None else (like.dtype, like.device)
        self._adapter.configure(self._warmup_steps, initial_step_size=self._init_step_size,
                                mass_matrix_shape=OrderedDict((b, (k, k) if dense else (k,)) for b, dense, k in blocks),
                                options={"dtype": dtype, "device": device})
        given = self._given_inverse_mass_matrix
        if given is not None and blocks:
            check_mass_matrix_shapes({b: m.shape for b, m in given.items()} if isinstance(given, dict)
                                     else given.shape, blocks)
            given = given if isinstance(given, dict) else {blocks[0][0]: given}
            self._adapter.mass_matrix_adapter.inverse_mass_matrix = {
                b: (torch.diag(given[b]) if dense and given[b].dim() == 1 else given[b]).to(like)
                for b, dense, _ in blocks}
        if self.adapt_step_size:
            self._adapter.reset_step_size_adaptation()
        offsets = dict(zip(self._names, itertools.accumulate([0] + self._sizes)))
        sizes = dict(zip(self._names, self._sizes))
        self._block_index = [torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n], device=device) for n in b])
                             for b, _, _ in blocks]
        self._factors = []
        self._update_factors()

    def _update_factors(self) -> None:
        """Factor M^-1 by block (once per mass-matrix window): M^-1 = L L^T, L^-1."""
        matrices = list(self.inverse_mass_matrix.values())
        if len(matrices) == len(self._factors) and all(m is f[0] for m, f in zip(matrices, self._factors)):
            return
        self._factors = [mass_matrix_factors(m) for m in matrices]

    def sample(self, params: Params) -> Params:
        """One Langevin step from ``params`` (the kernel's cached state when it has one)."""
        if self._state is None and self._names != list(params):
            self._start(params)
            self._setup_adapter()
        if self._state is None:  # no latent site: nothing moves
            self._record(1.0, True, 0.0, {})
            return dict(params)
        state, h, t = self._state, self._step_size, self._t
        with optional(pyro.validation_enabled(False), t < self._warmup_steps):
            if self._preconditioned:
                new, log_ratio = preconditioned_proposal(state, self._log_density, h, self._factors,
                                                         self._block_index)
            elif self.adjusted:
                new = langevin.proposal(None, state, self._log_density, h)
                log_ratio = langevin.log_acceptance_ratio(state, new, h)
            else:
                new, _ = langevin.ula_step(None, state, self._log_density, h)
            if self.adjusted:
                self._state, info = langevin.metropolis_accept(None, state, new, log_ratio)
                accepted = bool(info.is_accepted)
            else:
                self._check_finite(new, t + 1)
                if not self._preconditioned:
                    log_ratio = langevin.log_acceptance_ratio(state, new, h)
                self._state, accepted = new, True
        log_ratio = self._read(log_ratio, t + 1)
        params = self._unflatten(self._state.position)
        self._record(math.exp(min(log_ratio, 0.0)), accepted, log_ratio, params)
        return params

    def _read(self, log_ratio: torch.Tensor, step: int) -> float:
        """The step's log-ratio as a float, read together with the range check of the new state (one transfer);
        warns with :class:`~tilted_priors.ChainRangeWarning` the first time the state is out of range."""
        if self._range_warned or self._origin is None:
            return float(log_ratio)
        position = self._state.position
        worst = position.abs().amax() / self._origin.to(position)
        log_ratio, worst = torch.stack([log_ratio.reshape(()).to(position.dtype), worst]).tolist()
        if worst > RANGE_FACTOR:
            self._range_warned = True
            reference = f"times 1 + max|z_0| (= {float(self._origin):.3g}) from 0 in unconstrained space"
            warning = ChainRangeWarning(self.name, step, worst, 1, step_size=self._step_size, reference=reference,
                                        kernel=True)
            warnings.warn(warning, stacklevel=3)
        return log_ratio

    @property
    def _preconditioned(self) -> bool:
        """Whether the proposal uses a mass matrix (adapted, or given as ``inverse_mass_matrix``)."""
        return self.adapt_mass_matrix or self._given_inverse_mass_matrix is not None

    def _record(self, accept_prob: float, accepted: bool, log_ratio: float, params: Params) -> None:
        """Bookkeeping after step ``self._t`` (now at ``params``): adaptation in warm-up, acceptance and
        divergences after."""
        warmup = self._warmup_steps
        if self._t >= warmup and not log_ratio >= -MAX_LOG_RATIO_ERROR:
            self._divergences.append(self._t - warmup)
        self._t += 1
        if self._t <= warmup:
            n = self._t
            # Pyro's HMC schedule: step size every step (its average from the last one on), M^-1 per window.
            # A host scalar: Pyro's adapter only reads it back with .item().
            self._adapter.step(self._t - 1, params, torch.tensor(accept_prob, dtype=torch.float64, device="cpu"))
            if self.adapt_step_size:
                self._step_size = self._clamp(self._adapter.step_size)
            if self.adapt_mass_matrix:
                self._update_factors()
        else:
            n = self._t - warmup
            self._accept_cnt += int(accepted)
        self._mean_accept_prob += (accept_prob - self._mean_accept_prob) / n

    def _clamp(self, step_size: float) -> float:
        return min(max(step_size, self._min_stepsize), self._max_stepsize)

    def logging(self) -> OrderedDict:
        """Step size and running mean acceptance probability (restarted after warm-up), as strings."""
        return OrderedDict([("step size", f"{self._step_size:.2e}"), ("acc. prob", f"{self._mean_accept_prob:.3f}")])

    def diagnostics(self) -> dict:
        """After sampling: ``divergences`` (post-warm-up indices), ``acceptance rate`` (fraction of proposals
        kept: 1 for ULA), ``mean accept prob`` (mean Metropolis-Hastings probability) and ``step size``."""
        n = self._t - self._warmup_steps
        return {"divergences": list(self._divergences),
                "acceptance rate": self._accept_cnt / n if n > 0 else float("nan"),
                "mean accept prob": self._mean_accept_prob if n > 0 else float("nan"),
                "step size": self._step_size}

    def cleanup(self) -> None:
        """Forget the run (chain state, starting values, counters); safe to call more than once."""
        self._reset()

    def __repr__(self) -> str:
        return (f"Langevin(step_size={self._init_step_size:g}, adjusted={self.adjusted}, "
                f"adapt_step_size={self.adapt_step_size}, adapt_mass_matrix={self.adapt_mass_matrix}, "
                f"dense_mass={self.dense_mass}, target_accept_prob={self.target_accept_prob:g})")
