r"""Backend-free parts of ``log_likelihood`` (:mod:`tilted_priors.inference.pyro.likelihood` and
:mod:`tilted_priors.inference.numpyro.likelihood`): the result, the checks of its options and the error budget.

The estimate is

.. math:: \log \hat p(x) = \log \frac1K \sum_{k=1}^K \frac{\hat p(x, z_k)}{r(z_k)}, \qquad z_k \sim r,

where :math:`\hat p(x, z)` is the model's joint density with each energy-tilted site's :math:`\log Z` replaced by
its own estimate :math:`\log \hat Z_s` (a constant). Its standard error adds, in quadrature, the delta-method error
of the importance-sampling mean, :math:`\mathrm{sd}(w) / (\sqrt K\, \bar w)`, and the standard error of every
:math:`\log \hat Z_s` element that enters the joint (:math:`\partial \log \hat p(x) / \partial \log \hat Z_s = -1`).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable, NamedTuple

import numpy as np

__all__ = ["LogLikelihoodEstimate", "check_options", "combined_stderr", "DENSITY_FREE_GUIDES"]

#: Guides whose draws come from MCMC: they have no density to divide by, so they cannot be proposals.
DENSITY_FREE_GUIDES = ("ShortRunPosterior", "RefinedGuide")


class LogLikelihoodEstimate(NamedTuple):
    r"""What ``log_likelihood`` returns: an estimate of :math:`\log p(x)` with its error budget.

    Attributes
    ----------
    log_likelihood : float
        :math:`\log \hat p(x)` (nats) for everything the model observes in the call.
    stderr : float
        Its standard error: the importance weights' delta-method error and every :math:`\log \hat Z` element's
        standard error, added in quadrature.
    ess : float
        Effective sample size of the importance weights, :math:`(\sum_k w_k)^2 / \sum_k w_k^2` (out of
        ``num_samples``; ``inf`` for a model without latent sites, where no sampling is needed).
    log_z : dict of str to LogZEstimate
        Per energy-tilted site (latent or observed), the estimate of :math:`\log Z` that was substituted: the
        backend's ``LogZEstimate`` (``log_z``, ``stderr``, ``ess``), shaped as the site's batch shape (one value per
        batch element, e.g. per context row of a conditional energy).
    log_weights : numpy.ndarray
        The ``num_samples`` log importance weights :math:`\log \hat p(x, z_k) - \log r(z_k)` (float64).

    Examples
    --------
    >>> est = LogLikelihoodEstimate(-3.2, 0.05, 812.0, {}, np.zeros(3))
    >>> est.log_likelihood, est.stderr
    (-3.2, 0.05)
    """

    log_likelihood: float
    stderr: float
    ess: float
    log_z: dict
    log_weights: np.ndarray


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_options(proposal, num_samples, laplace_steps, laplace_lr) -> tuple[int, int, float]:
    """Check the options of ``log_likelihood`` (the proposal's kind, the counts, the Laplace fit's rate).

    Examples
    --------
    >>> check_options("laplace", 1000, 300, 0.05)
    (1000, 300, 0.05)
    """
    if isinstance(proposal, str):
        if proposal != "laplace":
            raise ValueError(f"proposal must be 'laplace' or a trained guide (a callable), got {proposal!r}")
    elif not callable(proposal):
        raise TypeError(f"proposal must be 'laplace' or a trained guide (a callable such as an autoguide or an "
                        f"AmortizedGuide), got {type(proposal).__name__}")
    elif type(proposal).__name__ in DENSITY_FREE_GUIDES:
        raise ValueError(f"proposal={type(proposal).__name__}(...): its draws come from MCMC chains and have no "
                         "density r(z) to weight by; pass a guide with a density (an autoguide, an AmortizedGuide) "
                         "or proposal='laplace'")
    num_samples = _positive_int("num_samples", num_samples)
    laplace_steps = _positive_int("laplace_steps", laplace_steps)
    if isinstance(laplace_lr, bool) or not isinstance(laplace_lr, Real) or not math.isfinite(laplace_lr) \
            or laplace_lr <= 0:
        raise ValueError(f"laplace_lr must be a finite positive number, got {laplace_lr!r}")
    return num_samples, laplace_steps, float(laplace_lr)


def combined_stderr(is_stderr: float, log_z_stderrs: Iterable[Any]) -> float:
    r""":math:`\sqrt{\mathrm{se}_{IS}^2 + \sum_s \sum_i \mathrm{se}(\log \hat Z_{s,i})^2}`.

    Examples
    --------
    >>> round(combined_stderr(0.3, [np.array([0.4]), np.zeros(2)]), 12)
    0.5
    """
    total = float(is_stderr) ** 2
    for se in log_z_stderrs:
        total += float(np.sum(np.square(np.asarray(se, dtype=np.float64))))
    return math.sqrt(total)
