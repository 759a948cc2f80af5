r"""MCMC kernels for Pyro's own :class:`pyro.infer.MCMC` on models with energy-tilted priors.

:class:`Langevin` is the Metropolis-adjusted (MALA) or unadjusted (ULA) Langevin kernel built on the functional
core :mod:`tilted_priors.pyro.langevin`. HMC and NUTS are Pyro's own (``pyro.infer.NUTS(model)`` works on the same
models unchanged); so do ``az.from_pyro`` and ``MCMC.summary`` / ``MCMC.diagnostics``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import pyro
import torch
from pyro.infer.autoguide import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.dual_averaging import DualAveraging
from pyro.util import optional

from tilted_priors.inference.pyro.handlers import normalizer
from tilted_priors._validation import check_probability, check_step_size
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.pyro import Unnormalized, langevin

__all__ = ["Langevin"]

Params = dict[str, torch.Tensor]

#: A step whose Metropolis-Hastings log-ratio is below minus this (or non-finite) is a divergence: the same
#: threshold as Pyro's HMC puts on the energy error (``HMC._max_sliced_energy``).
_MAX_LOG_RATIO_ERROR = 1000.0


class Langevin(MCMCKernel):
    r"""Langevin MCMC kernel for :class:`pyro.infer.MCMC`: MALA, or ULA with ``adjusted=False``.

    All unconstrained latent sites form one vector :math:`z` (in the order of the model's trace) and the chain runs
    on :math:`\log\pi(z) = -U(z)`, with :math:`U` the potential energy of the model (Pyro's ``potential_fn``).
    Every step makes the Langevin proposal with step size :math:`h`

    .. math:: z' = z + \tfrac{h^2}{2} \nabla \log \pi(z) + h\, \xi, \qquad \xi \sim \mathcal N(0, I),

    which MALA accepts with the Metropolis-Hastings probability

    .. math:: \alpha = \min\Bigl\{1, \frac{\pi(z')\, q(z \mid z')}{\pi(z)\, q(z' \mid z)}\Bigr\}, \qquad
              q(z' \mid z) = \mathcal N\bigl(z';\, z + \tfrac{h^2}{2}\nabla\log\pi(z),\, h^2 I\bigr),

    leaving the posterior exactly invariant; ULA keeps every proposal (its law is biased by :math:`O(h^2)`) and
    reports :math:`\alpha` as the acceptance probability the step would have had, a measure of its discretisation
    error. The proposal, :math:`\alpha` and the accept step are those of :mod:`tilted_priors.pyro.langevin`.

    The log density is **unnormalised**: the model runs under
    :func:`~tilted_priors.inference.pyro.handlers.normalizer` with :class:`~tilted_priors.pyro.Unnormalized`, so every tilted
    prior contributes :math:`-E(z) + \log q(z)` without its (constant) :math:`\log Z` term, which would otherwise
    be recomputed at every step. Initialisation (``init_strategy``) may draw from the priors with their samplers.

    During warm-up the step size is adapted by dual averaging (Hoffman & Gelman 2014, as in Pyro's HMC) so that
    the mean of :math:`\alpha` approaches ``target_accept_prob``; after warm-up it is fixed to
    :math:`\exp` of the averaged log step size. MALA's scheme is centred at :math:`\log(10 h_0)` as HMC's; ULA's at
    :math:`\log h_0` (an unadjusted chain keeps every move, so trial step sizes far above :math:`h_0` are not
    free). The default target 0.57 is the optimal MALA acceptance rate (Roberts & Rosenthal 1998).

    A MALA proposal with a non-finite log density (or a log-ratio below :math:`-1000`, HMC's threshold) is
    rejected and counted in ``diagnostics()["divergences"]`` (indices of post-warm-up draws, read by
    ``az.from_pyro`` as ``diverging``). An unadjusted chain cannot reject: when its state becomes non-finite the
    kernel raises :class:`~tilted_priors.ChainDivergenceError` naming the step.

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
    target_accept_prob : float
        In :math:`(0, 1)`; the adaptation's target for the mean acceptance probability.
    transforms : dict, optional
        Site name to transform into unconstrained space (default: from each site's support), as in HMC.
    max_plate_nesting, jit_compile, jit_options, ignore_jit_warnings, init_strategy
        As in :class:`pyro.infer.HMC` (passed to :func:`pyro.infer.mcmc.util.initialize_model`).
    min_stepsize, max_stepsize : float
        Bounds on the adapted step size.

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
    >>> mcmc = MCMC(Langevin(model, step_size=0.3), num_samples=50, warmup_steps=50, disable_progbar=True)
    >>> mcmc.run(torch.tensor([1.0, -0.5]))
    >>> mcmc.get_samples()["z"].shape
    torch.Size([50, 2])
    >>> sorted(mcmc.diagnostics()["acceptance rate"])
    ['chain 0']
    """

    def __init__(self, model: Callable | None = None, step_size: float = 0.1, adjusted: bool = True, *,
                 potential_fn: Callable[[Params], torch.Tensor] | None = None, adapt_step_size: bool = True,
                 target_accept_prob: float = 0.57, transforms: dict | None = None,
                 max_plate_nesting: int | None = None, jit_compile: bool = False, jit_options: dict | None = None,
                 ignore_jit_warnings: bool = False, init_strategy: Callable = init_to_uniform,
                 min_stepsize: float = 1e-10, max_stepsize: float = 1e10):
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
        self.adjusted = bool(adjusted)
        self.adapt_step_size = bool(adapt_step_size)
        self.target_accept_prob = check_probability(target_accept_prob, "target_accept_prob")
        self._max_plate_nesting = max_plate_nesting
        self._jit_compile = jit_compile
        self._jit_options = jit_options
        self._ignore_jit_warnings = ignore_jit_warnings
        self._init_strategy = init_strategy
        self._step_size = self._init_step_size
        self._initial_params: Params | None = None
        self._dual_averaging = DualAveraging()
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
        self._names: list[str] = []
        self._shapes: list[torch.Size] = []
        self._sizes: list[int] = []
        self._initial_params = None

    @property
    def name(self) -> str:
        return f"Langevin ({'MALA' if self.adjusted else 'ULA'})"

    @property
    def step_size(self) -> float:
        """The step size in use (adapted during warm-up, fixed after)."""
        return self._step_size

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
        if not self._names:
            return torch.zeros(0)
        return torch.cat([params[n].detach().reshape(-1) for n in self._names])

    def _log_density(self, flat: torch.Tensor) -> torch.Tensor:
        return -self.potential_fn(self._unflatten(flat))

    def _start(self, params: Params) -> None:
        self._names = list(params)
        self._shapes = [params[n].shape for n in self._names]
        self._sizes = [params[n].numel() for n in self._names]
        if not self._names:
            self._state = None
            return
        self._state = langevin.init(self._flatten(params), self._log_density)
        self._check_finite(self._state, 0)

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
        if self.adapt_step_size:
            self._dual_averaging.prox_center = math.log((10.0 if self.adjusted else 1.0) * self._step_size)
            self._dual_averaging.reset()
        self._start(self._initial_params)

    def sample(self, params: Params) -> Params:
        """One Langevin step from ``params`` (the kernel's cached state when it has one)."""
        if self._state is None and self._names != list(params):
            self._start(params)
        if self._state is None:  # no latent site: nothing moves
            self._record(1.0, True, 0.0)
            return dict(params)
        state, h, t = self._state, self._step_size, self._t
        with optional(pyro.validation_enabled(False), t < self._warmup_steps):
            if self.adjusted:
                new = langevin.proposal(None, state, self._log_density, h)
                log_ratio = langevin.log_acceptance_ratio(state, new, h)
                self._state, info = langevin.metropolis_accept(None, state, new, log_ratio)
                accepted = bool(info.is_accepted)
            else:
                new, _ = langevin.ula_step(None, state, self._log_density, h)
                self._check_finite(new, t + 1)
                log_ratio = langevin.log_acceptance_ratio(state, new, h)
                self._state, accepted = new, True
        log_ratio = float(log_ratio)
        self._record(math.exp(min(log_ratio, 0.0)), accepted, log_ratio)
        return self._unflatten(self._state.position)

    def _record(self, accept_prob: float, accepted: bool, log_ratio: float) -> None:
        """Bookkeeping after step ``self._t``: adaptation in warm-up, acceptance and divergences after."""
        warmup = self._warmup_steps
        if self._t >= warmup and not log_ratio >= -_MAX_LOG_RATIO_ERROR:
            self._divergences.append(self._t - warmup)
        self._t += 1
        if self._t <= warmup:
            n = self._t
            if self.adapt_step_size:
                self._dual_averaging.step(self.target_accept_prob - accept_prob)
                log_step, log_step_avg = self._dual_averaging.get_state()
                self._step_size = self._clamp(math.exp(log_step_avg if self._t == warmup else log_step))
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
                f"adapt_step_size={self.adapt_step_size}, target_accept_prob={self.target_accept_prob:g})")
