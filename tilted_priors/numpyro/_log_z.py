r"""Estimators of :math:`\log Z` for evaluation (JAX / NumPyro): :class:`Importance`, :class:`AnnealedImportance`
and the :class:`LogZEstimate` they return, with the importance weights and proposal checks that
:class:`~tilted_priors.numpyro.normalizers.SelfNormalized` shares.

Import the normalizers and :class:`LogZEstimate` from :mod:`tilted_priors.numpyro.normalizers` (or
:mod:`tilted_priors.numpyro`), which re-exports them; this module holds their code.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp

from tilted_priors._compat import jax_in_transformation
from tilted_priors._rng_keys import require_key
from tilted_priors._sir import check_tilted
from tilted_priors._validation import check_positive_int, check_proposal_shapes, describe
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.numpyro.samplers import MALA, _Frozen, _is_concrete
from tilted_priors.schedules import annealing_betas

__all__ = ["LogZEstimate", "log_mean_exp_with_error", "Importance", "AnnealedImportance", "check_proposal",
           "per_element", "importance_log_weights"]


class LogZEstimate(NamedTuple):
    r"""An estimate of :math:`\log Z` (batch-shaped), its delta-method standard error and the weights' ESS."""

    log_z: jax.Array
    stderr: jax.Array
    ess: jax.Array


def log_mean_exp_with_error(log_w) -> LogZEstimate:
    r""":math:`\log \frac1N\sum_i e^{\ell_i}` over axis 0, with standard error :math:`\mathrm{sd}(w)/(\sqrt N \bar w)`.

    The effective sample size is :math:`(\sum_i w_i)^2 / \sum_i w_i^2`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> est = log_mean_exp_with_error(jnp.zeros(10))
    >>> float(est.log_z), float(est.stderr), float(est.ess)
    (0.0, 0.0, 10.0)
    """
    log_w = jnp.asarray(log_w)
    n = log_w.shape[0]
    log_z = logsumexp(log_w, 0) - math.log(n)
    w = jnp.exp(log_w - lax.stop_gradient(jnp.max(log_w, 0)))
    mean = jnp.mean(w, 0)
    stderr = jnp.std(w, 0, ddof=1) / (math.sqrt(n) * mean) if n > 1 else jnp.full_like(mean, jnp.inf)
    ess = jnp.sum(w, 0) ** 2 / jnp.sum(w * w, 0)
    return LogZEstimate(log_z, stderr, ess)


def check_proposal(proposal):
    """``proposal`` if it is ``None`` or a NumPyro distribution, else a ``TypeError`` (its shapes are checked
    against the tilted distribution's at first use, :func:`importance_log_weights`)."""
    from numpyro.distributions import Distribution

    if proposal is None or isinstance(proposal, Distribution):
        return proposal
    raise TypeError(f"proposal must be a NumPyro distribution over the tilted distribution's vectors z, e.g. "
                    f"dist.Normal(loc, scale).to_event(1), or None (the base); got {describe(proposal)} "
                    f"({type(proposal).__name__})")


def _batch_numel(batch_shape) -> int:
    return int(math.prod(batch_shape))


def per_element(num_samples: int, batch_shape) -> int:
    """Draws per batch element when ``num_samples`` draws in all are shared out over ``batch_shape`` (at least one)."""
    return max(1, math.ceil(num_samples / max(1, _batch_numel(batch_shape))))


def _draw(distribution, rng_key, n: int):
    """``n`` draws, reparameterised when the distribution can."""
    if distribution.has_rsample:
        return distribution.rsample(rng_key, (n,))
    return distribution.sample(rng_key, (n,))


def importance_log_weights(dist, rng_key, n: int, proposal):
    """Log weights :math:`e^{-E(z)} q(z) / r(z)` of ``n`` draws per batch element from ``r`` (the base if None)."""
    if proposal is None:
        return -dist._energy(_draw(dist.base, rng_key, n))
    check_proposal_shapes(tuple(proposal.batch_shape), tuple(proposal.event_shape), tuple(dist.batch_shape),
                          tuple(dist.event_shape))
    z = _draw(proposal, rng_key, n)
    return dist.log_tilted(z) - proposal.log_prob(z)


class Importance(_Frozen):
    r"""Importance-sampling estimate of :math:`\log Z` from the base (evaluation).

    .. math:: \text{term} = \log \frac1n \sum_{i=1}^n e^{-E(z_i)}, \qquad z_i \sim q,

    with ``num_samples`` draws per row (batch element; a conditional density, with ``context``, gets its
    :math:`\log Z(x)` row by row) (from ``proposal`` :math:`r` with weights
    :math:`e^{-E} q / r` when given). ``log_prob`` is then an **estimate** of the normalised log density
    (consistent; :math:`\log\hat Z` is biased low by about :math:`\mathrm{se}^2/2`, so ``log_prob`` is biased high
    by that). Gradients flow through the estimate (reparameterised draws). :meth:`estimate` adds the standard
    error.

    Parameters
    ----------
    num_samples : int
        Draws per row (batch element).
    proposal : numpyro.distributions.Distribution, optional
        :math:`r`; the base when ``None``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(1), jnp.ones(1))
    >>> est = Importance(20000).estimate(d, jax.random.PRNGKey(0))   # exact: -log(3) / 2 = -0.549
    >>> abs(float(est.log_z) + 0.549) < 4 * float(est.stderr)
    True
    """

    __slots__ = ("num_samples", "proposal")

    def __init__(self, num_samples: int, proposal=None):
        object.__setattr__(self, "num_samples", check_positive_int("num_samples", num_samples))
        object.__setattr__(self, "proposal", check_proposal(proposal))

    def _key(self) -> tuple:
        return (self.num_samples, self.proposal)

    def __reduce__(self):
        return (Importance, (self.num_samples, self.proposal))

    def estimate(self, dist, rng_key) -> LogZEstimate:
        """:math:`\\log\\hat Z` per batch element with its standard error and ESS."""
        check_tilted(dist, "Importance.estimate")
        rng_key = require_key(rng_key, "Importance")
        return log_mean_exp_with_error(importance_log_weights(dist, rng_key, self.num_samples, self.proposal))

    def term(self, dist, rng_key):
        """:math:`\\log \\hat Z` per batch element."""
        return self.estimate(dist, rng_key).log_z

    def __repr__(self) -> str:
        return f"Importance(num_samples={self.num_samples})"


def _ais_log_weights(normalizer: "AnnealedImportance", dist, rng_key):
    """AIS log weights ``(num_chains, *batch)`` and the first divergent step (-1 for none) with its count."""
    dist = jax.tree_util.tree_map(lax.stop_gradient, dist)
    kernel = normalizer.kernel
    betas = jnp.asarray(normalizer.betas)
    key0, key_chain = jax.random.split(rng_key)
    z = dist.base.sample(key0, (normalizer.num_chains,))
    log_w = jnp.zeros(z.shape[:-1], z.dtype)
    steps = getattr(kernel, "steps", 1)
    bad_step = jnp.asarray(-1, jnp.int32)
    num_bad = jnp.asarray(0, jnp.int32)
    if len(normalizer.betas) > 2:
        def body(carry, xs):
            z, log_w, bad_step, num_bad = carry
            b_prev, b, key, t = xs
            log_w = log_w - (b - b_prev) * dist._energy(z)
            res = kernel._chain(key, dist.annealed_log_density(b), z)
            first = (bad_step < 0) & (res.bad_step >= 0)
            bad_step = jnp.where(first, (t - 1) * steps + jnp.maximum(res.bad_step, 0), bad_step)
            return (res.position, log_w, bad_step, jnp.where(first, res.num_bad, num_bad)), None

        num_moves = len(normalizer.betas) - 2
        keys = jax.random.split(key_chain, num_moves)
        ts = jnp.arange(1, num_moves + 1, dtype=jnp.int32)
        (z, log_w, bad_step, num_bad), _ = lax.scan(body, (z, log_w, bad_step, num_bad),
                                                    (betas[:-2], betas[1:-1], keys, ts))
    log_w = log_w - (betas[-1] - betas[-2]) * dist._energy(z)
    return log_w, bad_step, num_bad


_ais_jit = jax.jit(_ais_log_weights, static_argnums=0)


class AnnealedImportance(_Frozen):
    r"""Annealed importance sampling (Neal 2001) of :math:`\log Z`, from the base to the tilted prior (evaluation).

    Along :math:`\pi_t \propto e^{-\beta_t E} q` (:func:`~tilted_priors.annealing_betas`), with
    :math:`z_0 \sim q` and :math:`z_t` moved by ``kernel`` targeting :math:`\pi_t`,

    .. math:: \log w = \sum_{t=1}^{T} -(\beta_t - \beta_{t-1})\, E(z_{t-1}), \qquad
              \text{term} = \log \frac1N \sum_{j=1}^N w_j .

    :math:`\mathbb E[w] = Z` exactly when ``kernel`` leaves each :math:`\pi_t` invariant (MALA does; ULA does
    not), so ``log_prob`` is an **estimate** of the normalised log density, :math:`\log\hat Z` biased low (so
    ``log_prob`` high) by about half its variance. No gradients (``stop_gradient``). :meth:`estimate` gives the
    standard error (delta method over the chains' weights) and the weights' ESS. The temperatures are one
    compiled :func:`jax.lax.scan` whose body runs the kernel's chain; a kernel whose chain diverges raises
    :class:`~tilted_priors.ChainDivergenceError` (eagerly; under an outer trace the estimate is non-finite).

    Parameters
    ----------
    num_chains : int
        Independent annealing chains per row (batch element): a conditional density (``context``) gets its
        :math:`\log Z(x)` row by row.
    num_steps : int
        Number of temperatures :math:`T`.
    kernel : ShortRunLangevin or MALA, optional
        Run at each temperature; default ``MALA(steps=2, step_size=0.5)``.
    schedule : {"sigmoid", "linear"}
        Spacing of :math:`\beta`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(1), jnp.ones(1))
    >>> est = AnnealedImportance(500, 50).estimate(d, jax.random.PRNGKey(0))   # exact: -0.549
    >>> abs(float(est.log_z) + 0.549) < 4 * float(est.stderr)
    True
    """

    __slots__ = ("num_chains", "num_steps", "kernel", "schedule", "betas")

    def __init__(self, num_chains: int, num_steps: int, kernel=None, schedule: str = "sigmoid"):
        object.__setattr__(self, "num_chains", check_positive_int("num_chains", num_chains))
        object.__setattr__(self, "num_steps", check_positive_int("num_steps", num_steps))
        kernel = MALA(steps=2, step_size=0.5) if kernel is None else kernel
        if isinstance(kernel, type) or not callable(getattr(kernel, "_chain", None)):
            raise TypeError(f"kernel must be a ShortRunLangevin or MALA sampler instance, e.g. MALA(steps=2, "
                            f"step_size=0.5), got {describe(kernel)}")
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "betas", tuple(annealing_betas(self.num_steps, schedule).tolist()))

    def _key(self) -> tuple:
        return (self.num_chains, self.num_steps, self.kernel, self.schedule)

    def __reduce__(self):
        return (AnnealedImportance, (self.num_chains, self.num_steps, self.kernel, self.schedule))

    def estimate(self, dist, rng_key) -> LogZEstimate:
        """:math:`\\log\\hat Z` per batch element with its standard error and the weights' ESS."""
        check_tilted(dist, "AnnealedImportance.estimate")
        rng_key = require_key(rng_key, "AnnealedImportance")
        if jax_in_transformation(dist, rng_key):
            log_w, bad_step, num_bad = _ais_log_weights(self, dist, rng_key)
        else:
            log_w, bad_step, num_bad = _ais_jit(self, dist, rng_key)
        if _is_concrete(bad_step) and int(bad_step) >= 0:
            raise ChainDivergenceError(f"AnnealedImportance({type(self.kernel).__name__})", int(bad_step),
                                       self.kernel.step_size, int(num_bad))
        return log_mean_exp_with_error(log_w)

    def term(self, dist, rng_key):
        """:math:`\\log \\hat Z` per batch element (no gradient)."""
        return self.estimate(dist, rng_key).log_z

    def __repr__(self) -> str:
        return f"AnnealedImportance(num_chains={self.num_chains}, num_steps={self.num_steps}, kernel={self.kernel!r})"
