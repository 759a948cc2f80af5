r"""``log_likelihood``: the held-out log marginal likelihood of any Pyro model whose sites include energy-tilted
distributions, by importance sampling with each tilted site's :math:`\log Z` estimated separately (AIS).

.. math:: \log \hat p(x) = \log \frac1K \sum_{k=1}^K \frac{p(x, z_k)\big|_{\log Z_s = \log\hat Z_s}}{r(z_k)},
          \qquad z_k \sim r,

with :math:`r` a trained guide or a Laplace approximation at the MAP. The NumPyro twin is
:func:`tilted_priors.inference.numpyro.likelihood.log_likelihood`.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from tilted_priors._validation import check_flag
from tilted_priors.inference._likelihood import LogLikelihoodEstimate, check_options, combined_stderr
from tilted_priors.inference.pyro._log_joint import BaseDraws
from tilted_priors.inference.pyro.handlers import find_tilted, map_tilted, normalizer, sampler
from tilted_priors.pyro._distribution_checks import dtype_device
from tilted_priors.pyro.normalizers import AnnealedImportance, LogZEstimate, Unnormalized, log_mean_exp_with_error

__all__ = ["log_likelihood", "LogLikelihoodEstimate"]


class _Fixed:
    """A normalizer whose term is a fixed, already computed :math:`\\log \\hat Z` (batch-shaped)."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def term(self, dist) -> torch.Tensor:
        return self.value

    def __repr__(self) -> str:
        return f"_Fixed(shape={tuple(self.value.shape)})"


class _FixedLogZ(Messenger):
    """Give each named tilted site the normalizer :class:`_Fixed` with its own estimate."""

    def __init__(self, terms: Mapping[str, torch.Tensor]):
        super().__init__()
        self.normalizers = {name: _Fixed(value) for name, value in terms.items()}

    def _process_message(self, msg):
        fixed = self.normalizers.get(msg["name"]) if msg["type"] == "sample" else None
        if fixed is not None:
            msg["fn"] = map_tilted(msg["fn"], lambda d: d.replace(normalizer=fixed))


def _with_log_z(model: Callable, terms: Mapping[str, torch.Tensor]) -> Callable:
    def fixed_model(*args, **kwargs):
        with _FixedLogZ(terms):
            return model(*args, **kwargs)

    return fixed_model


def _sample_sites(trace: poutine.Trace) -> dict:
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def _max_plate_nesting(*traces: poutine.Trace) -> int:
    dims = [frame.dim for trace in traces for site in _sample_sites(trace).values()
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def _log_z_estimates(tilted: dict, log_z) -> dict[str, LogZEstimate]:
    """``{site: LogZEstimate}`` from an estimator (``.estimate(dist)``) or from given values per site."""
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
            if not isinstance(value, LogZEstimate):  # of the site's dtype and device
                dtype, device = dtype_device(tilted[name])
                value = torch.as_tensor(value, dtype=dtype, device=device)
                value = LogZEstimate(value, torch.zeros_like(value), torch.full_like(value, math.inf))
            out[name] = value
    else:
        if not callable(getattr(log_z, "estimate", None)):
            raise TypeError(f"log_z must be an estimator with .estimate(dist) (e.g. AnnealedImportance(500, 100)) "
                            f"or a dict {{site: log Z}}, got {log_z!r}")
        out = {name: log_z.estimate(d) for name, d in tilted.items()}
    for name, est in out.items():
        batch = tuple(tilted[name].batch_shape)
        try:
            torch.broadcast_shapes(tuple(est.log_z.shape), batch)
        except RuntimeError:
            raise ValueError(f"log_z[{name!r}] has shape {tuple(est.log_z.shape)}, which does not broadcast with "
                             f"the site's batch shape {batch}") from None
        if not bool(torch.isfinite(est.log_z).all()):
            raise ValueError(f"the estimate of log Z for the tilted site {name!r} is not finite ({est.log_z}); "
                             "give AnnealedImportance more temperatures or a kernel with a smaller step size")
    return out


def _laplace(model: Callable, args, kwargs, steps: int, lr: float):
    """An ``AutoMultivariateNormal`` at the MAP of ``model`` with the inverse Hessian of :math:`-\\log p(x, z)`."""
    guide = AutoLaplaceApproximation(model)
    elbo = Trace_ELBO()
    with poutine.trace(param_only=True) as params:
        guide(*args, **kwargs)
    leaves = [site["value"].unconstrained() for site in params.trace.nodes.values()]
    optim = torch.optim.Adam(leaves, lr=lr)
    for _ in range(steps):
        loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"proposal='laplace': -log p(x, z) became {float(loss)} while looking for the MAP; "
                             "lower laplace_lr, or pass a trained guide as proposal")
        grads = torch.autograd.grad(loss, leaves)  # only the guide's location: the model's parameters stay put
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad
        optim.step()
    try:
        return guide.laplace_approximation(*args, **kwargs)
    except (RuntimeError, ValueError) as err:  # torch.linalg.LinAlgError is a RuntimeError
        raise ValueError("proposal='laplace': the Hessian of -log p(x, z) at the end of the MAP search is not "
                         f"positive definite ({err}); the search has not converged (raise laplace_steps or "
                         "laplace_lr) or the posterior is not locally Gaussian there: pass a trained guide as "
                         "proposal") from err


def log_likelihood(model: Callable, *args, proposal: Callable | str = "laplace", num_samples: int = 1000,
                   log_z=None, laplace_steps: int = 500, laplace_lr: float = 0.05, vectorize: bool = True,
                   **kwargs) -> LogLikelihoodEstimate:
    r"""Estimate the log marginal likelihood :math:`\log p(x)` of a Pyro model with energy-tilted sites.

    .. math:: \log \hat p(x) = \log \frac1K \sum_{k=1}^K \frac{\hat p(x, z_k)}{r(z_k)}, \qquad z_k \sim r,

    where :math:`\hat p(x, z)` is the joint density of one call ``model(*args, **kwargs)`` (every site: latent
    and observed) in which each energy-tilted site :math:`s` (an :class:`~tilted_priors.pyro.EnergyTilted`,
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
        The Pyro model, called as ``model(*args, **kwargs)`` with the held-out data as its observations; its
        parameters are the param store's (e.g. right after :func:`~tilted_priors.inference.pyro.fit`, or after
        ``FitResult.restore()``), and they are not changed.
    *args, **kwargs
        The model's arguments (keyword arguments that are not options below go to the model and the proposal).
    proposal : callable or "laplace"
        :math:`r`: a trained guide with a density (an autoguide, an
        :class:`~tilted_priors.inference.pyro.AmortizedGuide`, ...; not an MCMC guide such as
        :class:`~tilted_priors.inference.pyro.ShortRunPosterior`), called with the model's arguments, which must
        sample every latent site of the model; or ``"laplace"``: Pyro's ``AutoLaplaceApproximation`` fitted by
        ``laplace_steps`` Adam steps (rate ``laplace_lr``) on :math:`-\log p(x, z)` over the latents alone, then a
        multivariate normal with the inverse Hessian there (in the latents' unconstrained space).
    num_samples : int
        :math:`K`, draws from the proposal.
    log_z : estimator or dict, optional
        How each tilted site's :math:`\log Z` is estimated: an object with ``.estimate(dist)`` returning a
        :class:`~tilted_priors.pyro.LogZEstimate` (default ``AnnealedImportance(500, 100)``), or a dict
        ``{site: log Z}`` of known values (numbers or tensors of the site's batch shape, error 0) or
        ``LogZEstimate`` objects (e.g. computed once and reused).
    laplace_steps, laplace_lr : int, float
        Of the MAP search when ``proposal="laplace"``.
    vectorize : bool
        Draw the ``num_samples`` particles at once in an outer ``pyro.plate`` (Pyro's
        ``vectorized_importance_weights``; the model and guide must broadcast over a batch dimension on the left,
        as for ``Trace_ELBO(vectorize_particles=True)``), or else one after the other.

    Returns
    -------
    LogLikelihoodEstimate
        ``log_likelihood``, ``stderr``, ``ess`` (of the importance weights), ``log_z`` (``{site: LogZEstimate}``)
        and ``log_weights``.

    Raises
    ------
    ValueError, TypeError
        For a proposal that is neither ``"laplace"`` nor a guide, a guide without a density or that misses a
        latent site, a non-finite log Z estimate, a ``log_z`` dict that does not match the tilted sites, a Laplace
        fit whose Hessian is not positive definite, or non-finite weights.

    Notes
    -----
    Each :math:`\log \hat Z_s` is computed once, from the site's distribution in one run of the model: its energy
    and base may depend on parameters and on the model's arguments (data, context), not on other latent
    variables. The importance sampling is over all latents of one call at once; for many i.i.d. data points with
    their own latents the weights degenerate as the data grow, so evaluate one datum (or a few) per call and sum.
    Everything runs in a copy of the param store, so nothing the proposal creates is left behind.

    Examples
    --------
    A tilted prior whose :math:`Z` is known (:math:`\log Z` is passed here; by default AIS estimates it):

    >>> import math, torch, pyro, pyro.distributions as dist
    >>> from tilted_priors.pyro import EnergyTiltedNormal
    >>> def model(x):   # z ~ exp(-|z|^2 / 2) N(0, I) / Z = N(0, I / 2) with Z = 1/2; x ~ N(z, I)
    ...     z = pyro.sample("z", EnergyTiltedNormal(lambda z: 0.5 * (z ** 2).sum(-1), torch.zeros(2), torch.ones(2)))
    ...     pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    >>> est = log_likelihood(model, torch.zeros(2), log_z={"z": math.log(0.5)}, num_samples=200, laplace_steps=100,
    ...                      laplace_lr=0.1)
    >>> exact = float(dist.Normal(0.0, 1.5 ** 0.5).log_prob(torch.zeros(2)).sum())   # x ~ N(0, 1.5 I)
    >>> abs(est.log_likelihood - exact) < 4 * est.stderr + 1e-3, est.ess > 190
    (True, True)
    """
    vectorize = check_flag(vectorize, "vectorize")
    num_samples, laplace_steps, laplace_lr = check_options(proposal, num_samples, laplace_steps, laplace_lr)
    log_z = AnnealedImportance(500, 100) if log_z is None else log_z
    store = pyro.get_param_store()
    with store.scope(store.get_state()):
        look = sampler(normalizer(model, Unnormalized()), BaseDraws())
        trace = poutine.trace(look).get_trace(*args, **kwargs)
        sites = _sample_sites(trace)
        tilted = {name: d for name, site in sites.items() if (d := find_tilted(site["fn"])) is not None}
        latent = [name for name, site in sites.items() if not site["is_observed"]]
        estimates = _log_z_estimates(tilted, log_z)
        fixed_model = _with_log_z(model, {name: est.log_z.detach() for name, est in estimates.items()})
        if not latent:  # nothing to integrate: the joint is the likelihood
            with torch.no_grad():
                value = poutine.trace(fixed_model).get_trace(*args, **kwargs).log_prob_sum()
            log_w = value.reshape(1).to(torch.float64)
            is_stderr, ess = 0.0, math.inf
        else:
            guide = _laplace(fixed_model, args, kwargs, laplace_steps, laplace_lr) if isinstance(proposal, str) \
                else proposal
            log_w = _log_weights(fixed_model, guide, args, kwargs, num_samples, vectorize, trace, latent)
            summary = log_mean_exp_with_error(log_w)
            is_stderr, ess = float(summary.stderr), float(summary.ess)
    if not bool(torch.isfinite(log_w).all()):
        raise ValueError(f"{int((~torch.isfinite(log_w)).sum())} of {log_w.numel()} log importance weights are not "
                         "finite: the proposal puts mass where the model has none (or the model is not finite "
                         "there); use a wider proposal")
    value = float(torch.logsumexp(log_w, 0) - math.log(log_w.numel()))
    stderr = combined_stderr(is_stderr, [est.stderr.detach().cpu().numpy() for est in estimates.values()])
    return LogLikelihoodEstimate(value, stderr, ess, estimates, log_w.cpu().numpy().astype(np.float64))


def _log_weights(model: Callable, guide: Callable, args, kwargs, num_samples: int, vectorize: bool,
                 model_trace: poutine.Trace, latent: list[str]) -> torch.Tensor:
    """``(num_samples,)`` log weights :math:`\\log \\hat p(x, z_k) - \\log r(z_k)` (float64), after checking that
    the guide samples every latent site."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        drawn = {n for n, s in _sample_sites(guide_trace).items() if not s["is_observed"]}
        missing = [name for name in latent if name not in drawn]
        if missing:
            raise ValueError(f"the proposal does not sample the latent site(s) {missing} of the model; a proposal "
                             f"must cover every latent site (it samples {sorted(drawn)})")
        if vectorize:
            log_w, _, _ = vectorized_importance_weights(
                model, guide, *args, num_samples=num_samples, normalized=False,
                max_plate_nesting=_max_plate_nesting(model_trace, guide_trace), **kwargs)
            log_w = log_w.reshape(-1).expand(num_samples)
        else:
            weights = []
            for _ in range(num_samples):
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                model_run = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
                weights.append(model_run.log_prob_sum() - guide_trace.log_prob_sum())
            log_w = torch.stack(weights)
    return log_w.detach().to(torch.float64)
