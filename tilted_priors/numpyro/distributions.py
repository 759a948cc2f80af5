r"""Energy-tilted distributions for NumPyro.

.. math:: p(z) = \frac{e^{-E(z)}\, q(z)}{Z}, \qquad Z = \mathbb E_{q}\bigl[e^{-E(z)}\bigr],

with :math:`q` a base distribution over vectors (event shape ``(d,)``) and :math:`E` an energy mapping
``(..., d) -> (...)``. :class:`EnergyTiltedNormal` is the case :math:`q = \mathcal N(\text{loc}, \text{scale}^2)`.
With ``context=x`` the density is conditional, :math:`p(z \mid x) \propto e^{-E(z, x)} q(z)`, one row per batch
element.

The distributions are pytrees (NumPyro's ``pytree_data_fields`` / ``pytree_aux_fields``), so they pass through
:func:`jax.jit`, :func:`jax.vmap` and NumPyro's inference. The energy is a data field (its arrays are dynamic)
when it is a pytree whose leaves are all arrays — a Flax NNX module, a :class:`jax.tree_util.Partial` of a
function and its parameters — and auxiliary (static, compared by identity) otherwise, e.g. a plain function.
The context is a data field. The normalizer and the sampler are auxiliary and compare by their settings. Pass the
energy as a pytree to reuse compiled chains across distribution instances (see
:mod:`tilted_priors.numpyro.samplers`).
"""
from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.tree_util import Partial
from numpyro.distributions import Distribution, Normal, constraints

from tilted_priors._compat import jax_in_transformation
from tilted_priors._loc_scale import missing_energy_message
from tilted_priors._rng_keys import check_key, in_mcmc_potential, seed_key
from tilted_priors._validation import check_protocol, check_sample_shape
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.numpyro._distribution_checks import (as_loc_scale, call_energy, check_energy_base,
                                                        register_normalizer)
from tilted_priors.numpyro.normalizers import Contrastive
from tilted_priors.numpyro.samplers import ShortRunLangevin, _is_array_pytree, _is_concrete

__all__ = ["EnergyTilted", "EnergyTiltedNormal"]


def _annealed_log_density(dist: "EnergyTilted", beta, z):
    """:math:`-\\beta E(z) + \\log q(z)` (up to a constant); module-level so that jit caches hit."""
    return dist._base_log_density(z) - beta * dist._energy(z)


class EnergyTilted(Distribution):
    r"""Exponential tilting of a base distribution by an energy.

    .. math:: \log p(z) = -E(z) + \log q(z) - \log Z

    ``log_prob`` subtracts the ``normalizer``'s term for :math:`\log Z` (computed at most once per instance, see
    :meth:`log_normalizer`), so whether it is normalised depends on the normalizer: unnormalised with
    :class:`~tilted_priors.numpyro.Contrastive` (the default, whose gradient is still that of the normalised
    density) and :class:`~tilted_priors.numpyro.Unnormalized`, a lower bound with
    :class:`~tilted_priors.numpyro.SelfNormalized`, an estimate with :class:`~tilted_priors.numpyro.Importance`
    and :class:`~tilted_priors.numpyro.AnnealedImportance`. ``sample(rng_key, sample_shape)`` draws base samples
    and moves them with ``sampler`` (default ``ShortRunLangevin(60, "auto")``); the draws are not reparameterised
    (``has_rsample = False``).

    **Conditional densities.** With ``context`` (covariates :math:`x`, shape ``batch_shape + (c,)``), the
    distribution is :math:`p(z \mid x) = e^{-E(z, x)} q(z) / Z(x)`, one context row per batch element, and the
    energy is called as ``energy(z, context)``: ``z`` of shape ``(..., d)`` (leading dimensions added by
    ``sample_shape``, chains and the normalizers' draws) and the context broadcast for you to ``(..., c)``. The
    batch shape is that of the base broadcast with ``context.shape[:-1]`` (the base is expanded to it), and the
    normalizers estimate :math:`\log Z(x)` per row. The context is a pytree data field (traced, so compiled
    chains are reused across contexts of the same shape). Without ``context`` the energy is called as
    ``energy(z)``.

    Most normalizers are random and need a PRNG key. :meth:`log_normalizer` takes, in this order, the key passed
    to it, the ``rng_key`` given here, or a key from ``numpyro.prng_key()``. A distribution built inside a seeded
    model (``numpyro.handlers.seed``, as in ``SVI`` and ``MCMC`` set-up) with no ``rng_key`` draws one from the
    seed at construction, so ``log_prob`` works also when NumPyro evaluates it after the model has run. For the
    same reason a normalizer's learned parameters (the :math:`b` of
    :class:`~tilted_priors.numpyro.SelfNormalized`) are declared with ``numpyro.param`` at construction.

    Parameters
    ----------
    energy : callable
        :math:`E`, mapping ``(..., d) -> (...)``: a :class:`~tilted_priors.numpyro.EnergyMLP` (any Flax NNX
        module), a :class:`jax.tree_util.Partial` of a function and its parameters, or a plain function; with
        ``context``, ``(..., d), (..., c) -> (...)`` (e.g. ``EnergyMLP(d, context_dim=c)``).
    base : numpyro.distributions.Distribution
        :math:`q`, with event shape ``(d,)`` (e.g. ``Normal(0, 1).expand([d]).to_event(1)``, a flow's
        ``TransformedDistribution``). Its batch shape is the distribution's batch shape.
    context : array_like, optional
        Covariates :math:`x` the energy is conditioned on, shape ``batch_shape + (c,)`` or broadcastable with it
        (at least one dimension: the last holds the ``c`` features; use ``x[..., None]`` for one covariate).
    normalizer : normalizer, optional
        What ``log_prob`` subtracts for :math:`\log Z`; default :class:`~tilted_priors.numpyro.Contrastive`.
    sampler : sampler, optional
        Draws from the tilted density; default ``ShortRunLangevin(60, "auto")`` (its step size scaled to
        the tilted density in each draw; LEBM's prior chain is ``ShortRunLangevin(60, 0.4)``).
    rng_key : jax.Array, optional
        Key for the normalizer's random draws (see above).
    validate_args : bool, optional
        Check parameters and ``log_prob`` values (NumPyro's default when ``None``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro.distributions as dist
    >>> from tilted_priors.numpyro import EnergyMLP
    >>> d = EnergyTilted(EnergyMLP(2, 16), dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    >>> d.sample(jax.random.PRNGKey(0), (5,)).shape
    (5, 2)

    A conditional density, one row per context:

    >>> x = jnp.linspace(-1, 1, 3)[:, None]                       # 3 rows, c = 1
    >>> d = EnergyTilted(lambda z, x: (z * x).sum(-1), dist.Normal(jnp.zeros(2), 1.0).to_event(1), context=x)
    >>> d.batch_shape, d.sample(jax.random.PRNGKey(0), (5,)).shape
    ((3,), (5, 3, 2))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False
    reparametrized_params: list = []
    pytree_data_fields = ("_energy_data", "base", "context", "_rng_key", "_normalizer_params")
    pytree_aux_fields = ("_energy_static", "normalizer", "sampler")

    def __init__(self, energy, base, *, context=None, normalizer=None, sampler=None, rng_key=None,
                 validate_args=None):
        base, context = check_energy_base(energy, base, context)
        self.context = context
        if _is_array_pytree(energy) and jax.tree_util.tree_leaves(energy):
            self._energy_data, self._energy_static = energy, None
        else:
            self._energy_data, self._energy_static = None, energy
        self.base = base
        self.normalizer = Contrastive() if normalizer is None else normalizer
        self.sampler = ShortRunLangevin(60, "auto") if sampler is None else sampler
        check_protocol(self.normalizer, "normalizer", "term", "Contrastive() or Unnormalized()")
        check_protocol(self.sampler, "sampler", "run", "ShortRunLangevin(60, 'auto') or MALA(100, 0.1)")
        self._rng_key = seed_key() if rng_key is None else check_key(rng_key, "rng_key")
        self._in_potential = self._rng_key is None and in_mcmc_potential()
        self._log_normalizer = None
        self._created_in_trace = jax_in_transformation()
        super().__init__(tuple(base.batch_shape), tuple(base.event_shape), validate_args=validate_args)
        self._normalizer_params = register_normalizer(self.normalizer, self)

    @classmethod
    def tree_unflatten(cls, aux_data, params):
        d = super().tree_unflatten(aux_data, params)
        d._log_normalizer = None
        d._created_in_trace = jax_in_transformation()
        return d

    @property
    def energy(self):
        """The energy :math:`E`, as given."""
        data = self.__dict__.get("_energy_data")
        return data if data is not None else self.__dict__.get("_energy_static")

    @property
    def rng_key(self):
        """The key used for the normalizer when :meth:`log_normalizer` gets none (may be ``None``)."""
        return self.__dict__.get("_rng_key")

    # --- densities -------------------------------------------------------------------------------------
    def _energy(self, z):
        """:math:`E(z)`, or :math:`E(z, x)` with the context broadcast to ``z``'s leading shape."""
        return call_energy(self.energy, z, self.__dict__.get("context"))

    def _base_log_density(self, z):
        """The base's log density up to a constant, with no gradient to its parameters (for chains)."""
        return self.base.log_prob(z)

    def log_tilted(self, z):
        r"""Unnormalised log density :math:`-E(z) + \log q(z)`, differentiable in ``z`` and all parameters.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from tilted_priors.numpyro import EnergyTiltedNormal
        >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(1), jnp.ones(1))
        >>> round(float(d.log_tilted(jnp.zeros(1))), 4)   # -E(0) + log N(0; 0, 1)
        -0.9189
        """
        return -self._energy(z) + self.base.log_prob(z)

    def annealed_log_density(self, beta: float = 1.0):
        r"""The function :math:`z \mapsto -\beta E(z) + \log q(z)` (unnormalised), what the chains run on.

        Returned as a :class:`jax.tree_util.Partial` of a module-level function, the distribution's energy,
        base and context and :math:`\beta`: a pytree whose arrays (energy parameters, base parameters, context,
        :math:`\beta`) are
        dynamic, so a sampler's compiled chain is reused across calls, across :math:`\beta` and across
        distributions with the same energy structure and shapes (whatever their normalizer, sampler or key).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from tilted_priors.numpyro import EnergyTiltedNormal
        >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(1), jnp.ones(1))
        >>> float(d.annealed_log_density(0.5)(jnp.ones(1)))   # -0.5 * 1 - 1 / 2
        -1.0
        """
        return Partial(_annealed_log_density, self._chain_view(), beta)

    def _chain_view(self) -> "EnergyTilted":
        """A copy holding only what the chains need (energy, base, context, shapes): its pytree structure does not
        depend on the normalizer, the sampler, the key or the validation setting, so compiled chains are shared."""
        view = object.__new__(type(self))
        fields = type(self).gather_pytree_data_fields() + type(self).gather_pytree_aux_fields()
        view.__dict__.update({name: self.__dict__.get(name) for name in fields})
        view.__dict__.update(_rng_key=None, _normalizer_params=None, normalizer=None, sampler=None,
                             _validate_args=False, _log_normalizer=None, _created_in_trace=True)
        return view

    def log_normalizer(self, rng_key=None):
        """The normalizer's term for :math:`\\log Z`, computed once per instance (see the normalizer's doc).

        The key is ``rng_key`` if given, else the distribution's ``rng_key``, else ``numpyro.prng_key()`` inside a
        seeded model; a normalizer that needs one and finds none raises ``ValueError``. A distribution built inside
        MCMC's potential function (unseeded, as ``NUTS(model)`` evaluates the model) returns 0 without a key: there
        the term is constant in the latents, so NUTS runs on the model as written and no chains run per gradient.
        Values computed under a trace are cached only on distributions that live in that trace (no tracer leaks).

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> from tilted_priors.numpyro import Importance
        >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(1), jnp.ones(1),
        ...                        normalizer=Importance(1000), rng_key=jax.random.PRNGKey(0))
        >>> d.log_normalizer() is d.log_normalizer()
        True
        """
        cached = self.__dict__.get("_log_normalizer")
        if cached is not None:
            return cached
        key = check_key(rng_key, "rng_key") if rng_key is not None else self.rng_key
        if key is None and self.__dict__.get("_in_potential", False):
            return jnp.zeros(())  # inside MCMC's potential the term is constant in the latents: nothing to run
        if key is None:
            key = seed_key()
        term = self.normalizer.term(self, key)
        if _is_concrete(term) or self.__dict__.get("_created_in_trace", True):
            self._log_normalizer = term
        return term

    def _check_value_shape(self, value) -> None:
        shape = jnp.shape(value)
        d = self.event_shape[0]
        if shape[-1:] != (d,):
            raise ValueError(f"{type(self).__name__}.log_prob expects values of shape (..., {d}) (event shape "
                             f"({d},)), got shape {tuple(shape)}")

    def _validate_sample(self, value):
        self._check_value_shape(value)
        try:
            jnp.broadcast_shapes(jnp.shape(value)[:-1], tuple(self.batch_shape))
        except ValueError:
            raise ValueError(f"{type(self).__name__}.log_prob: the value's batch shape {jnp.shape(value)[:-1]} "
                             f"does not broadcast with the distribution's batch shape {tuple(self.batch_shape)}"
                             ) from None
        mask = self.support(value)
        if _is_concrete(mask) and not bool(jnp.all(mask)):
            raise ValueError(f"{type(self).__name__}.log_prob got non-finite values (nan or inf): the support is "
                             "real vectors")
        return mask

    def log_prob(self, value):
        """:math:`-E(z) + \\log q(z)` minus the normalizer's term (normalised or not: see the normalizer)."""
        self._check_value_shape(value)
        if self._validate_args:
            self._validate_sample(value)
        return self.log_tilted(value) - self.log_normalizer()

    # --- sampling --------------------------------------------------------------------------------------
    def sample_with(self, rng_key, sampler, sample_shape=()):
        """Draw base samples of shape ``sample_shape + batch_shape + event_shape`` and run ``sampler`` on them.

        A sampler with a ``sample_tilted(rng_key, dist, sample_shape)`` method (one that needs the distribution
        itself, e.g. :class:`~tilted_priors.numpyro.SIR`, which draws from the base) is handed the distribution
        instead. ``sample_shape`` is a shape such as ``(100,)``; an int ``n`` is taken as ``(n,)``.

        Raises
        ------
        TypeError
            When ``rng_key`` is not a PRNG key, ``sample_shape`` is not a shape (a float, a string) or ``sampler``
            has no ``.run``.
        ValueError
            When ``rng_key`` is ``None`` or ``sample_shape`` holds a negative size.

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> from tilted_priors.numpyro import EnergyTiltedNormal, MALA
        >>> d = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(3), jnp.ones(3))
        >>> d.sample_with(jax.random.PRNGKey(0), MALA(50, 0.5), (10,)).shape
        (10, 3)
        """
        if rng_key is None:
            raise ValueError(f"{type(self).__name__}.sample needs a PRNG key, e.g. jax.random.PRNGKey(0) "
                             "(inside a model, numpyro.sample provides it under numpyro.handlers.seed)")
        check_key(rng_key, "rng_key")
        sample_shape = check_sample_shape(sample_shape)
        check_protocol(sampler, "sampler", "run", "MALA(100, 0.1)")
        sample_tilted = getattr(sampler, "sample_tilted", None)
        if callable(sample_tilted):  # a sampler that needs the distribution itself (its base), e.g. SIR
            return sample_tilted(rng_key, self, sample_shape)
        key_init, key_chain = jax.random.split(rng_key)
        init = lax.stop_gradient(self.base.sample(key_init, sample_shape))
        try:
            return sampler.run(key_chain, self.annealed_log_density(1.0), init)
        except ChainDivergenceError as err:  # say which chain it was
            raise err.add_context(label=f"the sampler of the prior {type(self).__name__}")

    def sample(self, key, sample_shape=()):
        """Draw ``sample_shape + batch_shape + event_shape`` samples with the distribution's sampler (see
        :meth:`sample_with`; an int ``n`` is taken as ``(n,)``)."""
        return self.sample_with(key, self.sampler, sample_shape)

    def rsample(self, rng_key, sample_shape=()):
        """Not available: the draws are not reparameterised (``has_rsample = False``); raises
        ``NotImplementedError`` (after checking ``sample_shape``)."""
        check_sample_shape(sample_shape)
        raise NotImplementedError(f"{type(self).__name__} has no reparameterised draws (has_rsample = False): the "
                                  "sampler's chains are not differentiated through. Use .sample(key, sample_shape); "
                                  "for gradients of an expectation use a normalizer's learning signal")

    # --- shapes ----------------------------------------------------------------------------------------
    def replace(self, *, normalizer=None, sampler=None) -> "EnergyTilted":
        """A copy with another normalizer and/or sampler (what the effect handlers of
        :mod:`tilted_priors.inference` use).

        A new normalizer's learned parameters are declared (``numpyro.param``) as at construction.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from tilted_priors.numpyro import EnergyTiltedNormal, Unnormalized
        >>> d = EnergyTiltedNormal(lambda z: z.sum(-1), jnp.zeros(2), jnp.ones(2))
        >>> type(d.replace(normalizer=Unnormalized()).normalizer).__name__
        'Unnormalized'
        """
        new = copy.copy(self)
        if normalizer is not None:
            new.normalizer = normalizer
            new._normalizer_params = register_normalizer(normalizer, new)
        if sampler is not None:
            new.sampler = sampler
        new._log_normalizer = None
        return new

    def _copy_settings(self, new: "EnergyTilted") -> "EnergyTilted":
        new._validate_args = self._validate_args
        return new

    def expand(self, batch_shape):
        """The same tilted distribution with batch shape ``batch_shape`` (keeps the concrete type)."""
        batch_shape = tuple(batch_shape)
        if batch_shape == tuple(self.batch_shape):
            return self
        new = EnergyTilted(self.energy, self.base.expand(batch_shape), context=self.context,
                           normalizer=self.normalizer, sampler=self.sampler, rng_key=self.rng_key,
                           validate_args=False)
        return self._copy_settings(new)

    @property
    def mean(self):
        raise NotImplementedError("an energy-tilted distribution has no closed-form mean; "
                                  "estimate it from d.sample(rng_key, (n,)).mean(0)")

    @property
    def variance(self):
        raise NotImplementedError("an energy-tilted distribution has no closed-form variance; "
                                  "estimate it from d.sample(rng_key, (n,)).var(0)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)}, "
                f"normalizer={self.normalizer!r}, sampler={self.sampler!r})")


class EnergyTiltedNormal(EnergyTilted):
    r"""A Normal prior tilted by an energy: LEBM's latent prior (Pang et al. 2020).

    .. math:: p(z) = \frac{1}{Z} \exp(-E(z))\, \mathcal N(z;\, \text{loc}, \operatorname{diag}(\text{scale}^2))

    ``loc`` and ``scale`` broadcast; their last dimension is the event (``event_shape == (d,)``), the rest the
    batch shape. Whether ``log_prob`` is normalised depends on the normalizer, as for :class:`EnergyTilted`
    (default :class:`~tilted_priors.numpyro.Contrastive`: unnormalised values, maximum-likelihood gradients).
    The chains run on :math:`-E(z) - \tfrac12\|(z - \text{loc}) / \text{scale}\|^2`, the Gaussian term without
    its constants.

    Parameters
    ----------
    energy : callable
        :math:`E`, mapping ``(..., d) -> (...)``, or ``(..., d), (..., c) -> (...)`` with ``context``.
    loc, scale : array_like
        Mean and standard deviation of the base, at least one dimension; ``scale > 0``.
    context : array_like, optional
        Covariates of shape ``batch_shape + (c,)``: a conditional density, as for :class:`EnergyTilted`
        (``loc`` and ``scale`` broadcast with ``context.shape[:-1]``).
    normalizer, sampler, rng_key, validate_args
        As for :class:`EnergyTilted`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from tilted_priors.numpyro import EnergyMLP, Unnormalized
    >>> d = EnergyTiltedNormal(EnergyMLP(16), jnp.zeros(16), jnp.ones(16), normalizer=Unnormalized())
    >>> z = d.sample(jax.random.PRNGKey(0), (64,))
    >>> d.log_prob(z).shape
    (64,)
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    pytree_data_fields = ("loc", "scale")

    def __new__(cls, *args, **kwargs):
        # LocScaleReparam rebuilds the site's distribution as type(fn)(loc=..., scale=...), with no energy: say
        # what to use instead of failing on a missing argument (copy and pickle call __new__ with no arguments).
        if not args and "energy" not in kwargs and ("loc" in kwargs or "scale" in kwargs):
            raise TypeError(missing_energy_message(cls.__name__, "numpyro"))
        return super().__new__(cls)

    def __init__(self, energy, loc, scale, *, context=None, normalizer=None, sampler=None, rng_key=None,
                 validate_args=None):
        loc, scale, context = as_loc_scale(loc, scale, context)
        validate = type(self)._validate_args if validate_args is None else validate_args
        if validate:
            if _is_concrete(scale) and not bool(jnp.all(scale > 0)):
                raise ValueError(f"{type(self).__name__}: scale must be positive everywhere, got min "
                                 f"{float(jnp.min(scale)):g}")
            if _is_concrete(loc) and not bool(jnp.all(jnp.isfinite(loc))):
                raise ValueError(f"{type(self).__name__}: loc must be finite, got nan or inf")
        self.loc, self.scale = loc, scale
        base = Normal(loc, scale, validate_args=False).to_event(1)
        super().__init__(energy, base, context=context, normalizer=normalizer, sampler=sampler, rng_key=rng_key,
                         validate_args=validate_args)

    def _base_log_density(self, z):
        u = (z - lax.stop_gradient(self.loc)) / lax.stop_gradient(self.scale)
        return -0.5 * jnp.sum(u * u, -1)

    def log_tilted(self, z):
        u = (z - self.loc) / self.scale
        d = jnp.shape(z)[-1]
        return (-self._energy(z) - 0.5 * jnp.sum(u * u, -1) - jnp.sum(jnp.log(self.scale), -1)
                - 0.5 * d * math.log(2 * math.pi))

    def expand(self, batch_shape):
        batch_shape = tuple(batch_shape)
        if batch_shape == tuple(self.batch_shape):
            return self
        shape = batch_shape + tuple(self.event_shape)
        new = EnergyTiltedNormal(self.energy, jnp.broadcast_to(self.loc, shape), jnp.broadcast_to(self.scale, shape),
                                 context=self.context, normalizer=self.normalizer, sampler=self.sampler,
                                 rng_key=self.rng_key, validate_args=False)
        return self._copy_settings(new)
