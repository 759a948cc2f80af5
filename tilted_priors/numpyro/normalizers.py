r"""Normalizers: what :meth:`~tilted_priors.numpyro.EnergyTilted.log_prob` subtracts for :math:`\log Z` (JAX / NumPyro).

For a tilted density :math:`p(z) = e^{-E(z)} q(z) / Z` with base :math:`q`,

.. math:: \log p(z) = \underbrace{-E(z) + \log q(z)}_{\text{log\_tilted}} - \text{term},

and each normalizer decides what ``term`` is. Its meaning (and so the meaning of ``log_prob``) is stated on each
class. ``term(dist, rng_key)`` returns an array broadcastable to the distribution's batch shape; the distribution
computes it at most once per instance (:meth:`~tilted_priors.numpyro.EnergyTilted.log_normalizer`, which also
finds the key). :class:`Importance` and :class:`AnnealedImportance` also give :meth:`~Importance.estimate`, a
:class:`LogZEstimate` with its standard error; these estimators of :math:`\log Z` for evaluation are written in
the private module ``tilted_priors.numpyro._log_z`` and imported from here. Normalizers are immutable and compare
equal (and hash) by their settings, so they can sit in pytree auxiliary data and :func:`jax.jit` cache keys.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpyro
from jax import lax
from jax.scipy.special import logsumexp

from tilted_priors._rng_keys import require_key
from tilted_priors._validation import check_finite_number, check_name, check_positive_int, check_protocol, check_snl_b
from tilted_priors.numpyro._log_z import (AnnealedImportance, Importance, LogZEstimate, check_proposal,
                                          importance_log_weights, log_mean_exp_with_error, per_element)
from tilted_priors.numpyro.samplers import _Frozen

__all__ = ["LogZEstimate", "log_mean_exp_with_error", "Contrastive", "SelfNormalized", "Importance",
           "AnnealedImportance", "Unnormalized", "LearnedLogZ"]


class Contrastive(_Frozen):
    r"""Maximum-likelihood learning signal from prior samples (LEBM): value 0, gradient :math:`\nabla\log Z`.

    .. math:: \text{term} = \overline{\ell(z^-)} - \operatorname{stopgrad}\bigl(\overline{\ell(z^-)}\bigr),
              \qquad \ell = -E + \log q,\ z^- = \operatorname{stopgrad}(\text{sampler draws})

    so that :math:`\nabla_\theta \log p(x) = -\nabla_\theta E(x) + \mathbb E_{p}[\nabla_\theta E(z)]`
    (for the energy's parameters; the base's parameters get the matching term). ``log_prob`` values are
    **unnormalised** (the term is 0); only their gradients are those of the normalised density, exactly so when
    the sampler is exact. JAX cannot tell whether a gradient will be taken, so the chains always run when the
    term is computed with a key (unlike torch's lazy term); use :class:`Unnormalized` where no gradient is needed.
    Inside MCMC over the latents (``NUTS(model)``: NumPyro evaluates the model unseeded, under the potential's
    ``substitute``) the term is constant in the latents and is 0 with no chains run, so ``NUTS`` works on the
    model as written at no extra cost.

    Parameters
    ----------
    sampler : sampler, optional
        Draws the negative samples; the distribution's own sampler when ``None``.
    num_samples : int, optional
        Chains per batch element, averaged; ``None`` runs one chain per batch element (LEBM's setting: one prior
        sample per datum when the prior sits in a data plate).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal, EnergyMLP
    >>> d = EnergyTiltedNormal(EnergyMLP(2, 8), jnp.zeros(2), jnp.ones(2), normalizer=Contrastive(num_samples=16))
    >>> float(d.log_normalizer(jax.random.PRNGKey(0)))
    0.0
    """

    __slots__ = ("sampler", "num_samples")

    def __init__(self, sampler=None, num_samples: int | None = None):
        object.__setattr__(self, "sampler", check_protocol(sampler, "sampler", "run", "MALA(100, 0.1)",
                                                           optional=True))
        object.__setattr__(self, "num_samples",
                           None if num_samples is None else check_positive_int("num_samples", num_samples))

    def _key(self) -> tuple:
        return (self.sampler, self.num_samples)

    def __reduce__(self):
        return (Contrastive, (self.sampler, self.num_samples))

    def term(self, dist, rng_key):
        """The term for ``dist`` (value 0, gradient :math:`\\mathbb E_p[\\nabla\\ell]`), with ``rng_key`` for the chains."""
        rng_key = require_key(rng_key, "Contrastive")
        shape = () if self.num_samples is None else (self.num_samples,)
        z = lax.stop_gradient(dist.sample_with(rng_key, self.sampler or dist.sampler, shape))
        lt = dist.log_tilted(z)
        if self.num_samples is not None:
            lt = jnp.mean(lt, 0)
        return lt - lax.stop_gradient(lt)

    def __repr__(self) -> str:
        return f"Contrastive(sampler={self.sampler!r}, num_samples={self.num_samples})"


def _register_nnx(name: str, module):
    """``module``'s parameters as the param site ``name + "$params"``; a copy of the module holding its values.

    (:func:`tilted_priors.inference.numpyro.register_module` without its checks: this package does not import
    :mod:`tilted_priors.inference`.)
    """
    from flax import nnx
    from numpyro.contrib.module import nnx_module

    graphdef, state, rest = nnx.split(module, nnx.Param, nnx.Not(nnx.Param))
    params = nnx_module(name, module).args[0]
    if params is None:
        return module
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


_PER_ROW_HELP = ("a per-row b belongs to fixed rows, the same contexts in the same order at every step (SVI on a "
                 "fixed batch; fit shuffles the rows), so for minibatches or changing rows use an amortised "
                 "b(context)")


class SelfNormalized(_Frozen):
    r"""Self-normalised bound (SNL / SNELBO, Senetaire et al.): a learned :math:`b` with

    .. math:: \text{term} = b + e^{-b}\hat Z - 1 \;\ge\; \log Z, \qquad
              \hat Z = \frac1n \sum_{i=1}^n \frac{e^{-E(z_i)} q(z_i)}{r(z_i)},\ z_i \sim r,

    from :math:`\log u \le u - 1`, tight at :math:`b = \log Z`; :math:`\hat Z` is unbiased, so ``log_prob`` is an
    unbiased estimate of a **lower bound** of the normalised log density, and maximising it over :math:`b` drives
    :math:`b \to \log Z`. No MCMC. The bound holds row by row (per batch element), so :math:`b` may be one scalar
    (the NumPyro param ``name``, initialised at ``init``), one value per row (``b="per_row"``), or amortised,
    :math:`b(x)` of the distribution's context :math:`x` (``b=`` a module or function): for a conditional density
    whose :math:`\log Z(x)` varies with :math:`x`, a scalar :math:`b` is tight for no row but on average. The
    params are declared when the distribution is built (:meth:`register_params`), so inside a model they are
    sites of the model's trace that ``SVI`` learns; outside any handler :math:`b` is ``init`` (or the module's
    own weights; substitute learned values with ``numpyro.handlers.substitute``).

    Parameters
    ----------
    num_samples : int
        Draws from the proposal **per row** (batch element), when the distribution has a ``context`` or ``b`` is
        not the shared scalar. With no context and the scalar ``b`` (the default) the rows are exchangeable and
        the draws are pooled: ``num_samples`` in all, shared out over the batch (at least one per row); when the
        rows share one base (a prior expanded over a plate) the summed bound equals that of the pooled estimate.
    proposal : numpyro.distributions.Distribution, optional
        :math:`r`; the base :math:`q` when ``None`` (then the weights are :math:`e^{-E(z_i)}`). Reparameterised
        draws (``rsample``) are used when available. A distribution over the same vectors as the tilted
        distribution: event shape ``(d,)`` (``dist.Normal(loc, scale).to_event(1)``), batch shape broadcasting to
        its batch shape; checked when first used (``ValueError``).
    name : str
        Name of the param :math:`b` (of the module's param site ``name$params`` for an amortised ``b``); give
        each tilted prior in a model its own.
    init : float
        Starting value of :math:`b` (of each row's with ``"per_row"``; unused with an amortised ``b``).
    b : None, "per_row" or callable
        ``None``: one scalar param. ``"per_row"``: a param of the distribution's batch shape, one :math:`b` per
        row, for fixed rows (the same contexts in the same order at every step, as in SVI on a fixed batch;
        ``fit`` shuffles the rows, so with it, or with minibatches, use an amortised :math:`b`). A callable: the
        amortised :math:`b(x)`, mapping the context ``batch_shape + (c,)`` to ``batch_shape`` (a trailing
        dimension of size 1 is dropped), e.g. ``flax.nnx.Linear(c, 1, rngs=nnx.Rngs(0))``; a Flax NNX module's
        parameters become the param site ``name$params`` (as
        :func:`~tilted_priors.inference.numpyro.register_module` does), so SVI trains it with the model. Needs the
        distribution's ``context``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: 0.0 * z.sum(-1), jnp.zeros(2), jnp.ones(2),
    ...                        normalizer=SelfNormalized(100, name="doc_b"))
    >>> float(d.log_normalizer(jax.random.PRNGKey(0)))  # b = 0 and Z = 1: the bound is tight
    0.0

    An amortised :math:`b(x)` for a conditional density (here :math:`\log Z(x) = x^2 / 2`):

    >>> from flax import nnx
    >>> x = jnp.linspace(-1, 1, 4)[:, None]
    >>> snl = SelfNormalized(64, name="doc_bx", b=nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
    >>> d = EnergyTiltedNormal(lambda z, x: (z * x).sum(-1), jnp.zeros(1), jnp.ones(1), context=x,
    ...                        normalizer=snl)
    >>> snl.b_value(d).shape, d.log_normalizer(jax.random.PRNGKey(0)).shape
    ((4,), (4,))
    """

    __slots__ = ("num_samples", "proposal", "name", "init", "b")

    def __init__(self, num_samples: int, proposal=None, name: str = "snl_b", init: float = 0.0, b=None):
        object.__setattr__(self, "num_samples", check_positive_int("num_samples", num_samples))
        object.__setattr__(self, "proposal", check_proposal(proposal))
        object.__setattr__(self, "name", check_name(name, "name"))
        object.__setattr__(self, "init", check_finite_number(init, "init"))
        object.__setattr__(self, "b", check_snl_b(b))

    def _key(self) -> tuple:
        return (self.num_samples, self.proposal, self.name, self.init, self.b)

    def __reduce__(self):
        return (SelfNormalized, (self.num_samples, self.proposal, self.name, self.init, self.b))

    def _pooled(self, dist) -> bool:
        return self.b is None and dist.__dict__.get("context") is None

    def log_z_hat(self, dist, rng_key):
        r""":math:`\log \hat Z` per batch element (a biased-low estimate of :math:`\log Z`)."""
        rng_key = require_key(rng_key, "SelfNormalized")
        n = per_element(self.num_samples, dist.batch_shape) if self._pooled(dist) else self.num_samples
        log_w = importance_log_weights(dist, rng_key, n, self.proposal)
        return logsumexp(log_w, 0) - math.log(log_w.shape[0])

    def register_params(self, dist=None) -> dict:
        """Declare :math:`b`'s params (``numpyro.param``); returns ``{name: b}`` (the registered module for an
        amortised :math:`b`, nothing for a plain function).

        The distribution calls this when it is built (``dist`` is the distribution), i.e. while the model runs,
        so that :math:`b` is part of the model's trace (and learned by ``SVI``) even though NumPyro evaluates
        ``log_prob`` after the model has run. Outside any handler it returns ``init`` (the module's own weights).
        """
        if self.b is None:
            return {self.name: numpyro.param(self.name, jnp.asarray(self.init))}
        if isinstance(self.b, str):  # "per_row"
            if dist is None:
                raise ValueError("SelfNormalized(b='per_row').register_params needs the distribution (its batch "
                                 "shape is the shape of b)")
            batch_shape = tuple(dist.batch_shape)
            b = numpyro.param(self.name, jnp.full(batch_shape, self.init))
            if jnp.shape(b) != batch_shape:
                raise ValueError(f"SelfNormalized(b='per_row'): the param {self.name!r} has shape "
                                 f"{tuple(jnp.shape(b))}, the distribution's batch shape is {batch_shape}: "
                                 f"{_PER_ROW_HELP}, or a new name / a fresh SVI state")
            return {self.name: b}
        from flax import nnx

        if isinstance(self.b, nnx.Module):
            return {self.name: _register_nnx(self.name, self.b)}
        return {}

    def b_value(self, dist):
        r"""The learned :math:`b` for ``dist`` (as registered when it was built): a scalar, or of the batch shape
        (``"per_row"``, amortised), where it estimates :math:`\log Z` row by row once trained."""
        registered = dist.__dict__.get("_normalizer_params") if dist is not None else None
        b = registered.get(self.name) if isinstance(registered, dict) else None
        if b is None:
            b = self.register_params(dist).get(self.name, self.b)
        if self.b is None or isinstance(self.b, str):
            return b
        context = dist.__dict__.get("context")
        if context is None:
            raise ValueError(f"SelfNormalized(b={self.b!r}) computes b from the distribution's context, but the "
                             "distribution has none: build it with context=..., or use b=None or b='per_row'")
        batch_shape = tuple(dist.batch_shape)
        value = b(jnp.broadcast_to(context, batch_shape + tuple(jnp.shape(context)[-1:])))
        if jnp.shape(value) == batch_shape + (1,):
            value = value[..., 0]
        if jnp.shape(value) != batch_shape:
            raise ValueError(f"SelfNormalized: the amortised b maps the context {batch_shape} + (c,) to shape "
                             f"{tuple(jnp.shape(value))}; it must give the batch shape {batch_shape} (or "
                             f"{batch_shape + (1,)})")
        return value

    def term(self, dist, rng_key):
        """The bound :math:`b + e^{-b}\\hat Z - 1`, with :math:`b` as registered when ``dist`` was built."""
        b = self.b_value(dist)
        return b + jnp.exp(self.log_z_hat(dist, rng_key) - b) - 1.0

    def __repr__(self) -> str:
        b = "" if self.b is None else f", b={self.b if isinstance(self.b, str) else type(self.b).__name__!r}"
        return f"SelfNormalized(num_samples={self.num_samples}, name={self.name!r}{b})"


class Unnormalized(_Frozen):
    r"""No normalizer: term 0, ``log_prob`` is the **unnormalised** :math:`-E(z) + \log q(z)`.

    Right inside MCMC over the latents, where :math:`\log Z` is constant; wrong for learning the energy (its
    gradient misses :math:`\nabla\log Z`). Needs no key.

    Examples
    --------
    >>> float(Unnormalized().term(None))
    0.0
    """

    __slots__ = ()

    def _key(self) -> tuple:
        return ()

    def __reduce__(self):
        return (Unnormalized, ())

    def term(self, dist, rng_key=None):
        """Zero."""
        return jnp.zeros(())

    def __repr__(self) -> str:
        return "Unnormalized()"


class LearnedLogZ(_Frozen):
    r"""A learned constant for :math:`\log Z`: term :math:`c`, the NumPyro param ``name``, what
    :class:`~tilted_priors.inference.numpyro.NoiseContrastive` trains.

    .. math:: \log p(x) = -E(x) + \log q(x) - c

    Noise-contrastive estimation (Gutmann & Hyvärinen 2010) treats :math:`c` as one more parameter of the model,
    learned with the energy; at its optimum :math:`c = \log Z`, so ``log_prob`` is then an **estimate** of the
    normalised log density that costs no sampling. Only NCE gives :math:`c` a learning signal: under a likelihood
    objective (``Trace_ELBO``) the gradient of ``log_prob`` in :math:`c` is always :math:`-1` and :math:`c` runs off
    (use :class:`Contrastive` or :class:`SelfNormalized` there). Check a trained :math:`c` against
    :class:`Importance` or :class:`AnnealedImportance`. As for :class:`SelfNormalized`, :math:`c` is declared
    (``numpyro.param``) when the distribution is built, so inside a model it is a site that ``SVI`` learns; outside
    any handler it is ``init``. Needs no key.

    Parameters
    ----------
    name : str
        Name of the param :math:`c`; give each tilted distribution in a model its own.
    init : float
        Starting value of :math:`c`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(1), jnp.ones(1),
    ...                        normalizer=LearnedLogZ("doc_c", init=-0.549))
    >>> round(float(d.log_normalizer()), 3)   # c, here set at log Z = -log(3) / 2
    -0.549
    """

    __slots__ = ("name", "init")

    def __init__(self, name: str = "log_z", init: float = 0.0):
        object.__setattr__(self, "name", check_name(name, "name"))
        object.__setattr__(self, "init", check_finite_number(init, "init"))

    def _key(self) -> tuple:
        return (self.name, self.init)

    def __reduce__(self):
        return (LearnedLogZ, (self.name, self.init))

    def register_params(self, dist=None) -> dict:
        """Declare :math:`c` with ``numpyro.param`` (initialised at ``init``, in the floating dtype of ``dist``'s
        ``loc`` when it has one); returns ``{name: c}``.

        The distribution calls this when it is built, so that :math:`c` is part of the model's trace.
        """
        loc = getattr(dist, "loc", None)
        dtype = loc.dtype if loc is not None and jnp.issubdtype(jnp.result_type(loc), jnp.floating) else None
        return {self.name: numpyro.param(self.name, jnp.asarray(self.init, dtype=dtype))}

    def term(self, dist, rng_key=None):
        """:math:`c` as registered when ``dist`` was built (a scalar, the same for every batch element)."""
        registered = dist.__dict__.get("_normalizer_params") if dist is not None else None
        c = registered.get(self.name) if isinstance(registered, dict) else None
        return self.register_params(dist)[self.name] if c is None else c

    def __repr__(self) -> str:
        return f"LearnedLogZ(name={self.name!r})"
