r"""Noise-contrastive estimation (Gutmann & Hyvärinen 2010) of energy-tilted densities at observed sites (NumPyro).

:class:`NoiseContrastive` is a loss for NumPyro's ``SVI`` (and :func:`~tilted_priors.inference.numpyro.fit`) that
learns an energy-tilted *density of the data*, ``numpyro.sample("x", EnergyTilted(...), obs=x)``, by classifying
the data against draws from a known noise distribution: no MCMC and no estimate of :math:`Z`, which is learned as
a constant :math:`c` instead (:class:`~tilted_priors.numpyro.LearnedLogZ`). It is the baseline that SNL
(Senetaire et al.) is compared with, next to :class:`~tilted_priors.numpyro.SelfNormalized`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from numpyro import handlers
from numpyro.distributions import Distribution
from numpyro.infer.elbo import ELBO
from numpyro.infer.util import log_density

from tilted_priors._validation import check_positive_int
from tilted_priors.inference._nce import datum_layers, no_site_message, normalizer_message
from tilted_priors.inference.numpyro.handlers import find_tilted
from tilted_priors.numpyro import LearnedLogZ, Unnormalized

__all__ = ["NoiseContrastive"]


def _reduce_to_data(value, layers: list):
    """Apply the wrappers' ``layers`` to per-factor log ratios ``value``: ``(per-datum log ratio, datum mask)``."""
    mask = None
    for kind, arg in layers:
        if kind == "mask":
            m = jnp.asarray(arg, dtype=bool)
            mask = m if mask is None else mask & m
        elif kind == "event" and arg > 0:
            if mask is not None:  # masked factors leave the datum's product
                value = jnp.where(mask, value, 0.0)
                mask = jnp.broadcast_to(mask, value.shape).reshape(value.shape[:-arg] + (-1,)).any(-1)
            value = jnp.sum(value, axis=tuple(range(-arg, 0)))
    return value, mask


def _site_log_prob(site: dict):
    """A sample site's log density, scaled and summed, as ``numpyro.infer.util.log_density`` counts it."""
    value, intermediates = site["value"], site["intermediates"]
    log_prob = site["fn"].log_prob(value, intermediates) if intermediates else site["fn"].log_prob(value)
    if site["scale"] is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


class NoiseContrastive(ELBO):
    r"""Noise-contrastive estimation of the energy-tilted distributions at the *observed* sites of a model.

    For an observed site ``x`` with tilted distribution :math:`e^{-E(x)} q(x) / Z`, the model's log density is
    taken to be

    .. math:: \ell(x) = -E(x) + \log q(x) - c,

    with :math:`c` a learned scalar, the param of the site's :class:`~tilted_priors.numpyro.LearnedLogZ`
    normalizer (``normalizer=LearnedLogZ(name)``, declared when the distribution is built, so ``SVI.init`` finds
    it; or :class:`~tilted_priors.numpyro.Unnormalized` for :math:`c = 0`, when the energy has its own free
    constant). With noise :math:`r` (the base :math:`q` by default) and :math:`\nu` = ``num_noise`` noise draws
    per datum, each datum contributes the log-likelihood of logistic regression between data and noise,

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
    noise : numpyro.distributions.Distribution, optional
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
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    >>> from numpyro.infer import SVI
    >>> from tilted_priors.numpyro import EnergyTilted, LearnedLogZ
    >>> def model(x):
    ...     w = numpyro.param("w", jnp.zeros(1))
    ...     tilted = EnergyTilted(lambda v: (w * v).sum(-1), dist.Normal(jnp.zeros(1), 1.0).to_event(1),
    ...                           normalizer=LearnedLogZ("c"))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("x", tilted, obs=x)
    >>> svi = SVI(model, lambda x: None, optax.adam(0.01), NoiseContrastive(num_noise=5))
    >>> x = jax.random.normal(jax.random.PRNGKey(1), (100, 1)) + 1.0
    >>> state = svi.init(jax.random.PRNGKey(0), x)
    >>> state, loss = svi.update(state, x)   # w = c = 0: the model is the noise
    >>> round(float(loss) / 100, 4), round(math.log(6) + 5 * math.log(6 / 5), 4)
    (2.7034, 2.7034)
    """

    def __init__(self, num_noise: int = 1, noise=None):
        super().__init__(num_particles=1)
        self.num_noise = check_positive_int("num_noise", num_noise)
        if noise is not None:
            if not isinstance(noise, Distribution):
                raise TypeError(f"noise must be a NumPyro Distribution over (d,) vectors, got {type(noise).__name__}")
            if len(noise.event_shape) != 1:
                raise ValueError(f"noise must have event shape (d,), got {tuple(noise.event_shape)}; declare the "
                                 "last dimension as the event with .to_event(1)")
        self.noise = noise

    def __repr__(self) -> str:
        return f"NoiseContrastive(num_noise={self.num_noise}, noise={self.noise!r})"

    def loss_with_mutable_state(self, rng_key, param_map: dict, model: Callable, guide: Callable, *args: Any,
                                **kwargs: Any) -> dict:
        """``{"loss": ..., "mutable_state": ...}`` for one draw of the guide and the noise (see above)."""
        model_key, guide_key, noise_key = jax.random.split(rng_key, 3)
        params = dict(param_map)
        guide_log_density, guide_trace = log_density(handlers.seed(guide, guide_key), args, kwargs, param_map)
        mutable = {name: site["value"] for name, site in guide_trace.items() if site["type"] == "mutable"}
        params.update(mutable)
        seeded_model = handlers.replay(handlers.seed(model, model_key), guide_trace)
        model_trace = handlers.trace(handlers.substitute(seeded_model, data=params)).get_trace(*args, **kwargs)
        mutable.update({name: site["value"] for name, site in model_trace.items() if site["type"] == "mutable"})
        contrastive = {}
        for name, site in model_trace.items():
            if site["type"] == "sample" and site["is_observed"]:
                tilted = find_tilted(site["fn"])
                if tilted is not None:
                    contrastive[name] = tilted
        if not contrastive:
            raise ValueError(no_site_message([n for n, s in model_trace.items() if s["type"] == "sample"]))
        objective = -guide_log_density
        for i, (name, tilted) in enumerate(contrastive.items()):
            objective = objective + self._site_objective(jax.random.fold_in(noise_key, i), name,
                                                         model_trace[name], tilted)
        for name, site in model_trace.items():
            if site["type"] == "sample" and name not in contrastive:
                objective = objective + _site_log_prob(site)
        return {"loss": -objective, "mutable_state": mutable or None}

    def _site_objective(self, rng_key, name: str, site: dict, tilted):
        """:math:`\\sum_i J(x_i)` at one observed tilted site, with its plates' scale and mask."""
        if not isinstance(tilted.normalizer, (LearnedLogZ, Unnormalized)):
            raise TypeError(normalizer_message(name, tilted.normalizer, "numpyro"))
        layers = datum_layers(site["fn"], tilted, name)
        x = site["value"]
        c = tilted.log_normalizer(rng_key)
        noise = tilted.base if self.noise is None else self.noise
        shape = tuple(jnp.shape(x)[:-1])
        if tuple(noise.batch_shape) != shape:
            try:
                noise = noise.expand(shape)
            except ValueError as err:
                raise ValueError(f"NoiseContrastive at site {name!r}: the noise's batch shape "
                                 f"{tuple(noise.batch_shape)} does not broadcast to the data's {shape}") from err
        y = lax.stop_gradient(noise.sample(rng_key, (self.num_noise,)))
        if jnp.shape(y)[-1] != jnp.shape(x)[-1]:
            raise ValueError(f"NoiseContrastive at site {name!r}: the noise draws have dimension {jnp.shape(y)[-1]}, "
                             f"the data {jnp.shape(x)[-1]}")

        def logit(v):
            if self.noise is None:  # r = q: the base cancels
                ratio = -tilted._energy(v) - c
            else:
                ratio = tilted.log_tilted(v) - c - noise.log_prob(v)
            ratio, mask = _reduce_to_data(ratio, layers)
            return ratio - math.log(self.num_noise), mask

        g_data, mask = logit(x)
        g_noise, _ = logit(y)
        j = jax.nn.log_sigmoid(g_data) + jnp.sum(jax.nn.log_sigmoid(-g_noise), 0)
        if mask is not None:
            j = jnp.where(mask, j, 0.0)
        if site["scale"] is not None:
            j = site["scale"] * j
        return jnp.sum(j)
