r"""Noise-contrastive estimation (Gutmann & Hyvärinen 2010) of energy-tilted densities at observed sites (Pyro).

:class:`NoiseContrastive` is a loss for Pyro's ``SVI`` (and :func:`~tilted_priors.inference.pyro.fit`) that
learns an energy-tilted *density of the data*, ``pyro.sample("x", EnergyTilted(...), obs=x)``, by classifying the
data against draws from a known noise distribution: no MCMC and no estimate of :math:`Z`, which is learned as a
constant :math:`c` instead (:class:`~tilted_priors.pyro.LearnedLogZ`). It is the baseline that SNL (Senetaire et
al.) is compared with, next to :class:`~tilted_priors.pyro.SelfNormalized`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer import ELBO

from tilted_priors._validation import check_positive_int
from tilted_priors.inference._nce import datum_layers, no_site_message, normalizer_message
from tilted_priors.inference.pyro.handlers import find_tilted
from tilted_priors.pyro import LearnedLogZ, Unnormalized

__all__ = ["NoiseContrastive"]


def _reduce_to_data(value: torch.Tensor, layers: list):
    """Apply the wrappers' ``layers`` to per-factor log ratios ``value``: ``(per-datum log ratio, datum mask)``."""
    mask = None
    for kind, arg in layers:
        if kind == "mask":
            m = torch.as_tensor(arg, dtype=torch.bool, device=value.device)
            mask = m if mask is None else mask & m
        elif kind == "event" and arg > 0:
            if mask is not None:  # masked factors leave the datum's product
                value = torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))
                mask = torch.broadcast_to(mask, value.shape).flatten(-arg).any(-1)
            value = sum_rightmost(value, arg)
    return value, mask


class NoiseContrastive(ELBO):
    r"""Noise-contrastive estimation of the energy-tilted distributions at the *observed* sites of a model.

    For an observed site ``x`` with tilted distribution :math:`e^{-E(x)} q(x) / Z`, the model's log density is
    taken to be

    .. math:: \ell(x) = -E(x) + \log q(x) - c,

    with :math:`c` a learned scalar, the param of the site's :class:`~tilted_priors.pyro.LearnedLogZ` normalizer
    (``normalizer=LearnedLogZ(name)``; or :class:`~tilted_priors.pyro.Unnormalized` for :math:`c = 0`, when the
    energy has its own free constant). With noise :math:`r` (the base :math:`q` by default) and :math:`\nu` =
    ``num_noise`` noise draws per datum, each datum contributes the log-likelihood of logistic regression between
    data and noise,

    .. math:: J(x) = \log\sigma\bigl(G(x)\bigr) + \sum_{j=1}^{\nu} \log\sigma\bigl(-G(y_j)\bigr), \qquad
              G(v) = \ell(v) - \log\bigl(\nu\, r(v)\bigr), \quad y_j \sim r,

    which is maximised, for infinitely many data, at the data's own density, with :math:`c = \log Z` (the model
    then normalises itself). With :math:`r = q` the base cancels: :math:`G = -E - c - \log\nu`, and the base's own
    parameters get no gradient (give a fixed ``noise`` to learn them). A datum is one element of the site's batch
    shape (plates; ``to_event`` makes the product over the reinterpreted dimensions one datum); plate scaling and
    masks apply to :math:`J`.

    The loss traces the guide and the model (replayed on the guide, as ``Trace_ELBO`` does) and replaces the
    log-likelihood of each observed tilted site by :math:`J`; every other site counts as in the ELBO, so latent
    variables with a guide are allowed (a latent tilted prior keeps its own normalizer):

    .. math:: \text{loss} = -\sum_{\text{data}} J(x_i) \;-\; \Bigl(\sum_{\text{other model sites}} \log p
              \;-\; \sum_{\text{guide sites}} \log q_\phi\Bigr).

    **What the value means.** :math:`-\sum J` is the cross-entropy of classifying the data against the noise; it
    is positive, and a model that cannot tell data from noise scores
    :math:`\log(1 + \nu) + \nu \log(1 + 1/\nu)` per datum (:math:`2 \log 2` for :math:`\nu = 1`): the gap below
    that is what has been learned. It is not a log-likelihood. **Evaluating the trained model:** with
    ``LearnedLogZ`` the site's ``log_prob`` is :math:`\ell`, an estimate of the normalised log density (good where
    NCE has converged); for a check, swap the normalizer for an estimate of :math:`\log Z`,
    ``handlers.normalizer(model, Importance(10_000))`` (small :math:`d`) or ``AnnealedImportance(...)``, and
    compare its :math:`\log\hat Z` with the learned :math:`c`.

    Parameters
    ----------
    num_noise : int
        :math:`\nu`, noise draws per datum (more: a more efficient estimator, close to maximum likelihood for
        large :math:`\nu`).
    noise : pyro.distributions.Distribution, optional
        :math:`r`, with event shape ``(d,)`` and a batch shape that broadcasts with the data's; the base of each
        site's tilted distribution when ``None``. Its draws are not differentiated.

    Raises
    ------
    ValueError
        When the model has no observed tilted site.
    TypeError
        When an observed tilted site's normalizer is not ``LearnedLogZ`` / ``Unnormalized``, or its
        distribution is wrapped in something other than ``to_event`` / ``mask`` / ``expand``.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI
    >>> from tilted_priors.pyro import EnergyTilted, LearnedLogZ
    >>> pyro.clear_param_store()
    >>> def model(x):
    ...     w = pyro.param("w", torch.zeros(1))
    ...     tilted = EnergyTilted(lambda v: (w * v).sum(-1), dist.Normal(torch.zeros(1), 1.0).to_event(1),
    ...                           normalizer=LearnedLogZ("c"))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("x", tilted, obs=x)
    >>> svi = SVI(model, lambda x: None, pyro.optim.Adam({"lr": 0.01}), NoiseContrastive(num_noise=5))
    >>> loss = svi.step(torch.randn(100, 1) + 1.0)   # w = c = 0: the model is the noise
    >>> round(loss / 100, 4), round(math.log(6) + 5 * math.log(6 / 5), 4)
    (2.7034, 2.7034)
    """

    def __init__(self, num_noise: int = 1, noise=None):
        super().__init__()
        self.num_noise = check_positive_int("num_noise", num_noise)
        if noise is not None:
            if not isinstance(noise, torch.distributions.Distribution):
                raise TypeError("noise must be a torch/Pyro Distribution over (d,) vectors, got "
                                f"{type(noise).__name__}")
            if len(noise.event_shape) != 1:
                raise ValueError(f"noise must have event shape (d,), got {tuple(noise.event_shape)}; declare the "
                                 "last dimension as the event with .to_event(1)")
        self.noise = noise

    def __repr__(self) -> str:
        return f"NoiseContrastive(num_noise={self.num_noise}, noise={self.noise!r})"

    # --- Pyro's loss protocol --------------------------------------------------------------------------
    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss (see above) as a float, with no gradients."""
        with torch.no_grad():
            return float(self._loss(model, guide, args, kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The loss as a float, after back-propagating it into the parameters (what ``SVI.step`` calls)."""
        loss = self._loss(model, guide, args, kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())

    # --- the objective ---------------------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        """The model's and the guide's traces, the model replayed on the guide's draws (as ``Trace_ELBO``)."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    def _loss(self, model, guide, args, kwargs) -> torch.Tensor:
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        contrastive = {}
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                tilted = find_tilted(site["fn"])
                if tilted is not None:
                    contrastive[name] = tilted
        if not contrastive:
            raise ValueError(no_site_message([n for n, s in model_trace.nodes.items() if s["type"] == "sample"]))
        objective = sum(self._site_objective(name, model_trace.nodes[name], tilted)
                        for name, tilted in contrastive.items())
        model_trace.compute_log_prob(site_filter=lambda name, site: name not in contrastive)
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and name not in contrastive:
                objective = objective + site["log_prob_sum"]
        guide_trace.compute_log_prob()
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not site["is_observed"]:
                objective = objective - site["log_prob_sum"]
        return -objective

    def _site_objective(self, name: str, site: dict, tilted) -> torch.Tensor:
        """:math:`\\sum_i J(x_i)` at one observed tilted site, with its plates' scale and mask."""
        if not isinstance(tilted.normalizer, (LearnedLogZ, Unnormalized)):
            raise TypeError(normalizer_message(name, tilted.normalizer, "pyro"))
        layers = datum_layers(site["fn"], tilted, name)
        x = site["value"]
        c = tilted.log_normalizer()
        noise = tilted.base if self.noise is None else self.noise
        shape = x.shape[:-1]
        if noise.batch_shape != shape:
            try:
                noise = noise.expand(shape)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"NoiseContrastive at site {name!r}: the noise's batch shape "
                                 f"{tuple(noise.batch_shape)} does not broadcast to the data's {tuple(shape)}") from err
        with torch.no_grad():
            y = noise.sample((self.num_noise,))
        if y.shape[-1] != x.shape[-1]:
            raise ValueError(f"NoiseContrastive at site {name!r}: the noise draws have dimension {y.shape[-1]}, the "
                             f"data {x.shape[-1]}")

        def logit(v):
            if self.noise is None:  # r = q: the base cancels
                ratio = -tilted._energy(v) - c
            else:
                ratio = tilted.log_tilted(v) - c - noise.log_prob(v)
            ratio, mask = _reduce_to_data(ratio, layers)
            return ratio - math.log(self.num_noise), mask

        g_data, mask = logit(x)
        g_noise, _ = logit(y)
        j = torch.nn.functional.logsigmoid(g_data) + torch.nn.functional.logsigmoid(-g_noise).sum(0)
        if mask is not None:
            j = torch.where(mask, j, torch.zeros((), dtype=j.dtype, device=j.device))
        if site["mask"] is not None:
            j = torch.where(torch.as_tensor(site["mask"], dtype=torch.bool, device=j.device), j,
                            torch.zeros((), dtype=j.dtype, device=j.device))
        return (site["scale"] * j).sum()
