r"""``log_likelihood``: the held-out log marginal likelihood of any NumPyro model whose sites include
energy-tilted distributions, by importance sampling with each tilted site's :math:`\log Z` estimated separately
(AIS).

.. math:: \log \hat p(x) = \log \frac1K \sum_{k=1}^K \frac{p(x, z_k)\big|_{\log Z_s = \log\hat Z_s}}{r(z_k)},
          \qquad z_k \sim r,

with :math:`r` a trained guide or a Laplace approximation at the MAP. The Pyro twin is
:func:`tilted_priors.inference.pyro.likelihood.log_likelihood`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from jax.flatten_util import ravel_pytree
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

from tilted_priors._validation import check_flag
from tilted_priors.inference._likelihood import LogLikelihoodEstimate, check_options, combined_stderr
from tilted_priors.inference.numpyro._log_joint import BaseDraws
from tilted_priors.inference.numpyro.handlers import find_tilted, map_tilted, normalizer, sampler
from tilted_priors.numpyro.normalizers import AnnealedImportance, LogZEstimate, Unnormalized, log_mean_exp_with_error

__all__ = ["log_likelihood", "LogLikelihoodEstimate"]


class _Fixed:
    """A normalizer whose term is a fixed, already computed :math:`\\log \\hat Z` (batch-shaped). Compared by
    identity (it sits in the distributions' pytree auxiliary data)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def term(self, dist, rng_key=None):
        return self.value

    def __repr__(self) -> str:
        return f"_Fixed(shape={tuple(jnp.shape(self.value))})"


class _FixedLogZ(Messenger):
    """Give each named tilted site the normalizer :class:`_Fixed` with its own estimate."""

    def __init__(self, terms: Mapping):
        super().__init__()
        self.normalizers = {name: _Fixed(value) for name, value in terms.items()}

    def process_message(self, msg):
        fixed = self.normalizers.get(msg["name"]) if msg["type"] == "sample" else None
        if fixed is not None:
            msg["fn"] = map_tilted(msg["fn"], lambda d: d.replace(normalizer=fixed))


def _with_log_z(model: Callable, terms: Mapping) -> Callable:
    def fixed_model(*args, **kwargs):
        with _FixedLogZ(terms):
            return model(*args, **kwargs)

    return fixed_model


def _sample_sites(trace: Mapping) -> dict:
    return {name: site for name, site in trace.items() if site["type"] == "sample"}


def _log_z_estimates(tilted: dict, log_z, rng_key) -> dict[str, LogZEstimate]:
    """``{site: LogZEstimate}`` from an estimator (``.estimate(dist, rng_key)``) or from given values per site."""
    if isinstance(log_z, Mapping):
        unknown = sorted(set(log_z) - set(tilted))
        missing = sorted(set(tilted) - set(log_z))
        if unknown or missing:
            raise ValueError(f"log_z: the model's energy-tilted sites are {sorted(tilted)}; the dict "
                             + (f"names no such site(s) {unknown}" if unknown else f"misses {missing}")
                             + " (give one value or LogZEstimate per tilted site, or an estimator such as "
                             "AnnealedImportance(500, 100))")
        out = {}
        for name, value in log_z.items():
            if not isinstance(value, LogZEstimate):
                value = jnp.asarray(value, dtype=jnp.result_type(float))
                value = LogZEstimate(value, jnp.zeros_like(value), jnp.full_like(value, jnp.inf))
            out[name] = value
    else:
        if not callable(getattr(log_z, "estimate", None)):
            raise TypeError(f"log_z must be an estimator with .estimate(dist, rng_key) (e.g. "
                            f"AnnealedImportance(500, 100)) or a dict {{site: log Z}}, got {log_z!r}")
        keys = jax.random.split(rng_key, max(1, len(tilted)))
        out = {name: log_z.estimate(d, key) for (name, d), key in zip(tilted.items(), keys)}
    for name, est in out.items():
        batch = tuple(tilted[name].batch_shape)
        try:
            jnp.broadcast_shapes(tuple(jnp.shape(est.log_z)), batch)
        except ValueError:
            raise ValueError(f"log_z[{name!r}] has shape {tuple(jnp.shape(est.log_z))}, which does not broadcast "
                             f"with the site's batch shape {batch}") from None
        if not bool(jnp.all(jnp.isfinite(est.log_z))):
            raise ValueError(f"the estimate of log Z for the tilted site {name!r} is not finite ({est.log_z}); "
                             "give AnnealedImportance more temperatures or a kernel with a smaller step size")
    return out


def _laplace(model: Callable, args, kwargs, trace: Mapping, latent: list[str], steps: int, lr: float, rng_key):
    r"""The Laplace approximation of the posterior in the latents' unconstrained space :math:`u`: ``(proposal,
    log_joint)``, a ``MultivariateNormal`` at the MAP of :math:`\log p(x, T(u)) + \log|J_T(u)|` (found by
    ``steps`` Adam steps from the draw in ``trace``) with the inverse of its negated Hessian, and that function."""
    transforms = {}
    for name in latent:
        try:
            transforms[name] = biject_to(trace[name]["fn"].support)
        except NotImplementedError:
            raise ValueError(f"proposal='laplace' needs continuous latents, but site {name!r} has support "
                             f"{trace[name]['fn'].support}; pass a guide as proposal") from None
    start, unravel = ravel_pytree({name: transforms[name].inv(trace[name]["value"]) for name in latent})

    def log_joint(u):
        unconstrained = unravel(u)
        values = {name: transforms[name](unconstrained[name]) for name in latent}
        log_p, _ = log_density(handlers.substitute(handlers.seed(model, rng_key), data=values), args, kwargs, {})
        log_jacobian = sum(jnp.sum(transforms[name].log_abs_det_jacobian(unconstrained[name], values[name]))
                           for name in latent)
        return log_p + log_jacobian

    adam = optax.adam(lr)

    @jax.jit
    def fit(u):
        def step(carry, _):
            u, state = carry
            value, grad = jax.value_and_grad(lambda v: -log_joint(v))(u)
            update, state = adam.update(grad, state)
            return (optax.apply_updates(u, update), state), value

        (u, _), losses = jax.lax.scan(step, (u, adam.init(u)), None, length=steps)
        return u, -jax.hessian(log_joint)(u), losses

    loc, precision, losses = fit(start)
    if not bool(jnp.all(jnp.isfinite(losses))):
        raise ValueError("proposal='laplace': -log p(x, z) became non-finite while looking for the MAP; lower "
                         "laplace_lr, or pass a trained guide as proposal")
    scale_tril = jnp.linalg.cholesky(jnp.linalg.inv(0.5 * (precision + precision.T)))
    if not bool(jnp.all(jnp.isfinite(scale_tril)) and jnp.all(jnp.diagonal(scale_tril) > 0)):
        raise ValueError("proposal='laplace': the Hessian of -log p(x, z) at the end of the MAP search is not "
                         "positive definite; the search has not converged (raise laplace_steps or laplace_lr) or "
                         "the posterior is not locally Gaussian there: pass a trained guide as proposal")
    return dist.MultivariateNormal(loc, scale_tril=scale_tril), log_joint


def log_likelihood(model: Callable, *args, proposal: Callable | str = "laplace", num_samples: int = 1000,
                   log_z=None, laplace_steps: int = 500, laplace_lr: float = 0.05, vectorize: bool = True,
                   rng_key=None, **kwargs) -> LogLikelihoodEstimate:
    r"""Estimate the log marginal likelihood :math:`\log p(x)` of a NumPyro model with energy-tilted sites.

    .. math:: \log \hat p(x) = \log \frac1K \sum_{k=1}^K \frac{\hat p(x, z_k)}{r(z_k)}, \qquad z_k \sim r,

    where :math:`\hat p(x, z)` is the joint density of one call ``model(*args, **kwargs)`` (every site: latent
    and observed) in which each energy-tilted site :math:`s` (an :class:`~tilted_priors.numpyro.EnergyTilted`,
    also inside ``Independent`` / masked wrappers and plates) has its own :math:`\log Z_s` replaced by an estimate
    :math:`\log \hat Z_s`, made once before the importance sampling, per batch element (per context row for a
    conditional energy) and with its own standard error. For an **observed** tilted site (an energy-based model
    of the data) this is its normalised density :math:`-E(x) + \log q(x) - \log \hat Z`: the result is then
    the (estimated) log-likelihood under the normalised data model, not an unnormalised score.

    It is an **estimate**, not a bound: by Jensen's inequality the importance-sampling part is a stochastic
    lower bound in expectation, :math:`\mathbb E[\log \hat p(x)] \le \log p(x)` (tight as :math:`K` grows or
    :math:`r` nears the posterior), while each :math:`\log \hat Z_s` is itself biased low by about half its
    variance, which pushes the estimate up by as much. ``stderr`` adds both sources in quadrature: the
    delta-method error of the weights' mean, :math:`\mathrm{sd}(w) / (\sqrt K \bar w)`, and every
    :math:`\log \hat Z_s` element's error.

    Parameters
    ----------
    model : callable
        The NumPyro model, called as ``model(*args, **kwargs)`` with the held-out data as its observations. Its
        parameters are what its ``numpyro.param`` sites return: pass the trained model, e.g. ``FitResult.model``
        (the model with the trained parameters substituted); they are not changed.
    *args, **kwargs
        The model's arguments (keyword arguments that are not options below go to the model and the proposal).
    proposal : callable or "laplace"
        :math:`r`: a trained guide with a density, its parameters substituted (``FitResult.guide``; an autoguide,
        an :class:`~tilted_priors.inference.numpyro.AmortizedGuide`, ...; not an MCMC guide such as
        :class:`~tilted_priors.inference.numpyro.ShortRunPosterior`), called with the model's arguments, which
        must sample every latent site of the model; or ``"laplace"``: a multivariate normal in the latents'
        unconstrained space :math:`u` (:func:`numpyro.distributions.transforms.biject_to` of each support) at the
        MAP of :math:`\log p(x, T(u)) + \log |J_T(u)|`, found by ``laplace_steps`` Adam steps (rate
        ``laplace_lr``, one compiled :func:`jax.lax.scan`) from a prior draw, with the inverse of the negated
        Hessian there as covariance (what NumPyro's ``AutoLaplaceApproximation`` computes); the weights are then
        taken in :math:`u` (Jacobian included), which is the same estimate.
    num_samples : int
        :math:`K`, draws from the proposal.
    log_z : estimator or dict, optional
        How each tilted site's :math:`\log Z` is estimated: an object with ``.estimate(dist, rng_key)`` returning a
        :class:`~tilted_priors.numpyro.LogZEstimate` (default ``AnnealedImportance(500, 100)``), or a dict
        ``{site: log Z}`` of known values (numbers or arrays of the site's batch shape, error 0) or
        ``LogZEstimate`` objects (e.g. computed once and reused).
    laplace_steps, laplace_lr : int, float
        Of the MAP search when ``proposal="laplace"``.
    vectorize : bool
        Compute the ``num_samples`` weights at once, one compiled :func:`jax.vmap` over the draws, or else one
        after the other in a compiled loop (:func:`jax.lax.map`: less memory). Either way the model and the
        proposal must be traceable by JAX.
    rng_key : jax.Array
        Key for the log Z estimates, the MAP search and the draws (required).

    Returns
    -------
    LogLikelihoodEstimate
        ``log_likelihood``, ``stderr``, ``ess`` (of the importance weights), ``log_z`` (``{site: LogZEstimate}``)
        and ``log_weights``.

    Raises
    ------
    ValueError, TypeError
        For a missing ``rng_key``, a proposal that is neither ``"laplace"`` nor a guide, a guide without a density
        or that misses a latent site, a non-finite log Z estimate, a ``log_z`` dict that does not match the tilted
        sites, a Laplace fit whose Hessian is not positive definite, or non-finite weights.

    Notes
    -----
    Each :math:`\log \hat Z_s` is computed once, from the site's distribution in one run of the model: its energy
    and base may depend on parameters and on the model's arguments (data, context), not on other latent
    variables. The importance sampling is over all latents of one call at once; for many i.i.d. data points with
    their own latents the weights degenerate as the data grow, so evaluate one datum (or a few) per call and sum.

    Examples
    --------
    A tilted prior whose :math:`Z` is known (:math:`\log Z` is passed here; by default AIS estimates it):

    >>> import math, jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> def model(x):   # z ~ exp(-|z|^2 / 2) N(0, I) / Z = N(0, I / 2) with Z = 1/2; x ~ N(z, I)
    ...     z = numpyro.sample("z", EnergyTiltedNormal(lambda z: 0.5 * (z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2)))
    ...     numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    >>> est = log_likelihood(model, jnp.zeros(2), log_z={"z": math.log(0.5)}, num_samples=200, laplace_steps=100,
    ...                      laplace_lr=0.1, rng_key=jax.random.PRNGKey(0))
    >>> exact = float(dist.Normal(0.0, 1.5 ** 0.5).log_prob(jnp.zeros(2)).sum())   # x ~ N(0, 1.5 I)
    >>> abs(est.log_likelihood - exact) < 4 * est.stderr + 1e-3, est.ess > 190
    (True, True)
    """
    vectorize = check_flag(vectorize, "vectorize")
    num_samples, laplace_steps, laplace_lr = check_options(proposal, num_samples, laplace_steps, laplace_lr)
    if rng_key is None:
        raise ValueError("log_likelihood draws random samples and needs a PRNG key: pass "
                         "rng_key=jax.random.PRNGKey(0)")
    log_z = AnnealedImportance(500, 100) if log_z is None else log_z
    key_trace, key_log_z, key_laplace, key_draws = jax.random.split(rng_key, 4)
    look = sampler(normalizer(model, Unnormalized()), BaseDraws())  # tilted sites: base draws
    trace = handlers.trace(handlers.seed(look, key_trace)).get_trace(*args, **kwargs)
    sites = _sample_sites(trace)
    tilted = {name: d for name, site in sites.items() if (d := find_tilted(site["fn"])) is not None}
    latent = [name for name, site in sites.items() if not site["is_observed"]]
    estimates = _log_z_estimates(tilted, log_z, key_log_z)
    fixed_model = _with_log_z(model, {name: jax.lax.stop_gradient(est.log_z) for name, est in estimates.items()})
    if not latent:  # nothing to integrate: the joint is the likelihood
        value, _ = log_density(handlers.seed(fixed_model, key_draws), args, kwargs, {})
        log_w = np.asarray(value, dtype=np.float64).reshape(1)
        is_stderr, ess = 0.0, math.inf
    else:
        if isinstance(proposal, str):
            gaussian, log_joint = _laplace(fixed_model, args, kwargs, trace, latent, laplace_steps, laplace_lr,
                                           key_laplace)
            u = gaussian.sample(key_draws, (num_samples,))
            log_joints = jax.jit(jax.vmap(log_joint))(u) if vectorize else jax.lax.map(log_joint, u)
            log_w = np.asarray(log_joints - gaussian.log_prob(u), dtype=np.float64)
        else:
            log_w = _log_weights(fixed_model, proposal, args, kwargs, num_samples, vectorize, key_draws, latent)
        summary = log_mean_exp_with_error(log_w)
        is_stderr, ess = float(summary.stderr), float(summary.ess)
    if not np.isfinite(log_w).all():
        raise ValueError(f"{int((~np.isfinite(log_w)).sum())} of {log_w.size} log importance weights are not "
                         "finite: the proposal puts mass where the model has none (or the model is not finite "
                         "there); use a wider proposal")
    value = float(logsumexp(log_w) - math.log(log_w.size))
    stderr = combined_stderr(is_stderr, [np.asarray(est.stderr) for est in estimates.values()])
    return LogLikelihoodEstimate(value, stderr, ess, estimates, log_w)


def _log_weights(model: Callable, guide: Callable, args, kwargs, num_samples: int, vectorize: bool, rng_key,
                 latent: list[str]) -> np.ndarray:
    """``(num_samples,)`` log weights :math:`\\log \\hat p(x, z_k) - \\log r(z_k)` (float64), after checking that
    the guide samples every latent site."""
    key_check, key_draws = jax.random.split(rng_key)
    # One call outside any transformation: sets up an autoguide's structure and shows which sites it samples.
    guide_trace = handlers.trace(handlers.seed(guide, key_check)).get_trace(*args, **kwargs)
    drawn = {n for n, s in _sample_sites(guide_trace).items() if not s["is_observed"]}
    missing = [name for name in latent if name not in drawn]
    if missing:
        raise ValueError(f"the proposal does not sample the latent site(s) {missing} of the model; a proposal must "
                         f"cover every latent site (it samples {sorted(drawn)})")

    def one(key):
        key_guide, key_model = jax.random.split(key)
        guide_log_density, drawn_trace = log_density(handlers.seed(guide, key_guide), args, kwargs, {})
        replayed = handlers.replay(handlers.seed(model, key_model), drawn_trace)
        model_log_density, _ = log_density(replayed, args, kwargs, {})
        return model_log_density - guide_log_density

    keys = jax.random.split(key_draws, num_samples)
    log_w = jax.jit(jax.vmap(one))(keys) if vectorize else jax.lax.map(one, keys)
    return np.asarray(jax.lax.stop_gradient(log_w), dtype=np.float64)
