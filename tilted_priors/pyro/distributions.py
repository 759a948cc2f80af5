r"""Energy-tilted distributions for Pyro.

.. math:: p(z) = \frac{e^{-E(z)}\, q(z)}{Z}, \qquad Z = \mathbb E_{q}\bigl[e^{-E(z)}\bigr],

with :math:`q` a base distribution over vectors (event shape ``(d,)``) and :math:`E` an energy mapping
``(..., d) -> (...)``. :class:`EnergyTiltedNormal` is the case :math:`q = \mathcal N(\text{loc}, \text{scale}^2)`.
With ``context=x`` the density is conditional, :math:`p(z \mid x) \propto e^{-E(z, x)} q(z)`, one row per batch
element.
"""
from __future__ import annotations

import copy
import math
import weakref

import torch
from pyro.distributions import Normal, TorchDistribution, constraints

from tilted_priors._loc_scale import missing_energy_message
from tilted_priors._validation import check_protocol, check_sample_shape
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.pyro._distribution_checks import as_loc_scale, call_energy, check_energy_base, register_normalizer
from tilted_priors.pyro._tracing import GraphCache
from tilted_priors.pyro.normalizers import Contrastive
from tilted_priors.pyro.samplers import ShortRunLangevin

__all__ = ["EnergyTilted", "EnergyTiltedNormal"]


class EnergyTilted(TorchDistribution):
    r"""Exponential tilting of a base distribution by an energy.

    .. math:: \log p(z) = -E(z) + \log q(z) - \log Z

    ``log_prob`` subtracts the ``normalizer``'s term for :math:`\log Z` (computed at most once per instance, see
    :meth:`log_normalizer`), so whether it is normalised depends on the normalizer: unnormalised with
    :class:`~tilted_priors.pyro.Contrastive` (the default, whose gradient is still that of the normalised density)
    and :class:`~tilted_priors.pyro.Unnormalized`, a lower bound with :class:`~tilted_priors.pyro.SelfNormalized`,
    an estimate with :class:`~tilted_priors.pyro.Importance` and :class:`~tilted_priors.pyro.AnnealedImportance`.
    ``sample`` draws base samples and moves them with ``sampler`` (default ``ShortRunLangevin(60, "auto")``); the
    draws are not reparameterised (``has_rsample = False``). A normalizer's learned parameters (the :math:`b` of
    :class:`~tilted_priors.pyro.SelfNormalized`) are declared (``pyro.param``) when the distribution is built, so
    that inside a model they are param sites of its trace, which Pyro's ELBOs need to differentiate.

    **Conditional densities.** With ``context`` (covariates :math:`x`, shape ``batch_shape + (c,)``), the
    distribution is :math:`p(z \mid x) = e^{-E(z, x)} q(z) / Z(x)`, one context row per batch element, and the
    energy is called as ``energy(z, context)``: ``z`` of shape ``(..., d)`` (leading dimensions added by
    ``sample_shape``, chains and the normalizers' draws) and the context broadcast for you to ``(..., c)``. The
    batch shape is that of the base broadcast with ``context.shape[:-1]`` (the base is expanded to it), and the
    normalizers estimate :math:`\log Z(x)` per row. Without ``context`` the energy is called as ``energy(z)``.

    Parameters
    ----------
    energy : callable
        :math:`E`, mapping ``(..., d) -> (...)`` (e.g. :class:`~tilted_priors.pyro.EnergyMLP`), or with
        ``context`` ``(..., d), (..., c) -> (...)`` (e.g. ``EnergyMLP(d, context_dim=c)``). Modules inside a
        distribution are trained by SVI only when the model registers them with ``pyro.module``.
    base : torch.distributions.Distribution
        :math:`q`, with event shape ``(d,)`` (e.g. ``Normal(0, 1).expand([d]).to_event(1)``, a flow's
        ``TransformedDistribution``). Its batch shape is the distribution's batch shape.
    context : torch.Tensor, optional
        Covariates :math:`x` the energy is conditioned on, shape ``batch_shape + (c,)`` or broadcastable with it
        (at least one dimension: the last holds the ``c`` features; use ``x[..., None]`` for one covariate).
    normalizer : normalizer, optional
        What ``log_prob`` subtracts for :math:`\log Z`; default :class:`~tilted_priors.pyro.Contrastive`.
    sampler : sampler, optional
        Draws from the tilted density; default ``ShortRunLangevin(60, "auto")`` (its step size scaled to
        the tilted density in each draw; LEBM's prior chain is ``ShortRunLangevin(60, 0.4)``).

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> from tilted_priors.pyro import EnergyMLP
    >>> d = EnergyTilted(EnergyMLP(2, 16), dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> d.sample((5,)).shape
    torch.Size([5, 2])

    A conditional density, one row per context:

    >>> x = torch.linspace(-1, 1, 3)[:, None]                       # 3 rows, c = 1
    >>> d = EnergyTilted(lambda z, x: (z * x).sum(-1), dist.Normal(torch.zeros(2), 1.0).to_event(1), context=x)
    >>> d.batch_shape, d.sample((5,)).shape
    (torch.Size([3]), torch.Size([5, 3, 2]))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, energy, base, *, context=None, normalizer=None, sampler=None, validate_args=None):
        base, context = check_energy_base(energy, base, context)
        self.context = context
        self.energy = energy
        self.base = base
        self.normalizer = Contrastive() if normalizer is None else normalizer
        self.sampler = ShortRunLangevin(60, "auto") if sampler is None else sampler
        check_protocol(self.normalizer, "normalizer", "term", "Contrastive() or Unnormalized()")
        check_protocol(self.sampler, "sampler", "run", "ShortRunLangevin(60, 'auto') or MALA(100, 0.1)")
        self._log_normalizer: torch.Tensor | None = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)
        register_normalizer(self.normalizer, self)

    # --- densities -------------------------------------------------------------------------------------
    def _energy(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`E(z)`, or :math:`E(z, x)` with the context broadcast to ``z``'s leading shape."""
        return call_energy(self.energy, z, self.context)

    def _base_log_density(self, z: torch.Tensor) -> torch.Tensor:
        """The base's log density up to a constant, with no gradient to its parameters (for chains)."""
        return self.base.log_prob(z)

    def log_tilted(self, z: torch.Tensor) -> torch.Tensor:
        r"""Unnormalised log density :math:`-E(z) + \log q(z)`, differentiable in ``z`` and all parameters."""
        return -self._energy(z) + self.base.log_prob(z)

    def annealed_log_density(self, beta: float = 1.0):
        r"""The function :math:`z \mapsto -\beta E(z) + \log q(z)` (unnormalised), what the chains run on."""
        if beta == 1.0:
            return lambda z: self._base_log_density(z) - self._energy(z)
        return lambda z: self._base_log_density(z) - beta * self._energy(z)

    def log_normalizer(self) -> torch.Tensor:
        """The normalizer's term for :math:`\\log Z`, computed once per instance (see the normalizer's doc)."""
        if self._log_normalizer is None:
            self._log_normalizer = self.normalizer.term(self)
        return self._log_normalizer

    def replace(self, *, normalizer=None, sampler=None) -> "EnergyTilted":
        """A copy with another normalizer and/or sampler (what the effect handlers of
        :mod:`tilted_priors.inference` use).

        A new normalizer's learned parameters are declared (``pyro.param``) as at construction.

        Examples
        --------
        >>> import torch
        >>> from tilted_priors.pyro import EnergyTiltedNormal, Unnormalized
        >>> d = EnergyTiltedNormal(lambda z: z.sum(-1), torch.zeros(2), torch.ones(2))
        >>> type(d.replace(normalizer=Unnormalized()).normalizer).__name__
        'Unnormalized'
        """
        new = copy.copy(self)
        new.normalizer = self.normalizer if normalizer is None else normalizer
        new.sampler = self.sampler if sampler is None else sampler
        new._log_normalizer = None
        if normalizer is not None:
            register_normalizer(normalizer, new)
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """:math:`-E(z) + \\log q(z)` minus the normalizer's term (normalised or not: see the normalizer)."""
        if self._validate_args:
            self._validate_sample(value)
        return self.log_tilted(value) - self.log_normalizer()

    # --- sampling --------------------------------------------------------------------------------------
    def sample_with(self, sampler, sample_shape=torch.Size()) -> torch.Tensor:
        """Draw base samples of shape ``sample_shape + batch_shape + event_shape`` and run ``sampler`` on them.

        A sampler with a ``sample_tilted(dist, sample_shape)`` method (one that needs the distribution itself, e.g.
        :class:`~tilted_priors.pyro.SIR`, which draws from the base) is handed the distribution instead.
        ``sample_shape`` is a shape such as ``(100,)``; an int ``n`` is taken as ``(n,)``.

        Raises
        ------
        TypeError
            When ``sample_shape`` is not a shape (a float, a string) or ``sampler`` has no ``.run``.
        ValueError
            When ``sample_shape`` holds a negative size.
        """
        sample_shape = torch.Size(check_sample_shape(sample_shape))
        check_protocol(sampler, "sampler", "run", "MALA(100, 0.1)")
        sample_tilted = getattr(sampler, "sample_tilted", None)
        if callable(sample_tilted):
            return sample_tilted(self, torch.Size(sample_shape))
        with torch.no_grad():
            init = self.base.sample(torch.Size(sample_shape))
        try:
            return sampler.run(self.annealed_log_density(1.0), init)
        except ChainDivergenceError as err:  # say which chain it was
            raise err.add_context(label=f"the sampler of the prior {type(self).__name__}")

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draw ``sample_shape + batch_shape + event_shape`` samples with the distribution's sampler (see
        :meth:`sample_with`; an int ``n`` is taken as ``(n,)``)."""
        return self.sample_with(self.sampler, sample_shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Not available: the draws are not reparameterised (``has_rsample = False``); raises
        ``NotImplementedError`` (after checking ``sample_shape``)."""
        check_sample_shape(sample_shape)
        raise NotImplementedError(f"{type(self).__name__} has no reparameterised draws (has_rsample = False): the "
                                  "sampler's chains are not differentiated through. Use .sample(sample_shape); "
                                  "for gradients of an expectation use a normalizer's learning signal")

    # --- shapes ----------------------------------------------------------------------------------------
    def _copy_settings(self, new: "EnergyTilted") -> "EnergyTilted":
        new._validate_args = self._validate_args
        return new

    def expand(self, batch_shape, _instance=None):
        new = EnergyTilted(self.energy, self.base.expand(torch.Size(batch_shape)), context=self.context,
                           normalizer=self.normalizer, sampler=self.sampler, validate_args=False)
        return self._copy_settings(new)

    @property
    def mean(self):
        raise NotImplementedError("an energy-tilted distribution has no closed-form mean; "
                                  "estimate it from d.sample((n,)).mean(0)")

    @property
    def variance(self):
        raise NotImplementedError("an energy-tilted distribution has no closed-form variance; "
                                  "estimate it from d.sample((n,)).var(0)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)}, "
                f"normalizer={self.normalizer!r}, sampler={self.sampler!r})")


_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # energy -> the graphs of its chains


def _graph_cache(energy) -> GraphCache | None:
    """The graphs of the chains' log densities for ``energy`` (None for an energy without weak references)."""
    try:
        cache = _GRAPHS.get(energy)
        if cache is None:
            cache = _GRAPHS[energy] = GraphCache()
        return cache
    except TypeError:
        return None


class EnergyTiltedNormal(EnergyTilted):
    r"""A Normal prior tilted by an energy: LEBM's latent prior (Pang et al. 2020).

    .. math:: p(z) = \frac{1}{Z} \exp(-E(z))\, \mathcal N(z;\, \text{loc}, \operatorname{diag}(\text{scale}^2))

    ``loc`` and ``scale`` broadcast; their last dimension is the event (``event_shape == (d,)``), the rest the
    batch shape. Whether ``log_prob`` is normalised depends on the normalizer, as for :class:`EnergyTilted`
    (default :class:`~tilted_priors.pyro.Contrastive`: unnormalised values, maximum-likelihood gradients).

    Parameters
    ----------
    energy : callable
        :math:`E`, mapping ``(..., d) -> (...)``, or ``(..., d), (..., c) -> (...)`` with ``context``.
    loc, scale : torch.Tensor
        Mean and standard deviation of the base, at least one dimension; ``scale > 0``.
    context : torch.Tensor, optional
        Covariates of shape ``batch_shape + (c,)``: a conditional density, as for :class:`EnergyTilted`
        (``loc`` and ``scale`` broadcast with ``context.shape[:-1]``).
    normalizer, sampler
        As for :class:`EnergyTilted`.

    Examples
    --------
    >>> import torch
    >>> from tilted_priors.pyro import EnergyMLP, Unnormalized
    >>> d = EnergyTiltedNormal(EnergyMLP(16), torch.zeros(16), torch.ones(16), normalizer=Unnormalized())
    >>> z = d.sample((64,))
    >>> d.log_prob(z).shape
    torch.Size([64])
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}

    def __new__(cls, *args, **kwargs):
        # LocScaleReparam rebuilds the site's distribution as type(fn)(loc=..., scale=...), with no energy: say
        # what to use instead of failing on a missing argument (copy and pickle call __new__ with no arguments).
        if not args and "energy" not in kwargs and ("loc" in kwargs or "scale" in kwargs):
            raise TypeError(missing_energy_message(cls.__name__, "pyro"))
        return super().__new__(cls)

    def __init__(self, energy, loc, scale, *, context=None, normalizer=None, sampler=None, validate_args=None):
        loc, scale, context = as_loc_scale(loc, scale, context)
        self.loc, self.scale = loc, scale
        base = Normal(loc, scale, validate_args=False).to_event(1)
        # Chains need the Gaussian term only up to a constant and without parameter gradients.
        self._loc_c = loc.detach()
        self._inv_scale_c = scale.detach().reciprocal()
        self._standard: bool | None = None  # whether the base is N(0, I): read on the first chain step
        super().__init__(energy, base, context=context, normalizer=normalizer, sampler=sampler,
                         validate_args=validate_args)

    def _base_log_density(self, z: torch.Tensor) -> torch.Tensor:
        if self._standard is None:
            self._standard = bool((self._loc_c == 0).all() and (self._inv_scale_c == 1).all())
        u = z if self._standard else (z - self._loc_c) * self._inv_scale_c
        return -0.5 * (u * u).sum(-1)

    def annealed_log_density(self, beta: float = 1.0):
        r"""The function :math:`z \mapsto -\beta E(z) + \log q(z)` (unnormalised), what the chains run on.

        Its value and gradient replay a graph of torch operations traced once per shapes and shared by every
        prior with this energy: the chains' steps run none of the energy's Python. In-place parameter updates are
        seen, and the graph is checked against the eager function at the start of each chain (traced again when a
        parameter was replaced); an energy that cannot be traced (Python that reads tensor values, randomness) runs
        eagerly. The first chain for given shapes runs eagerly; the graph is traced at the second.
        """
        cache = _graph_cache(self.energy)
        if cache is None:
            return super().annealed_log_density(beta)

        def log_density(z, loc, inv_scale, context, beta):
            u = (z - loc) * inv_scale
            return -0.5 * (u * u).sum(-1) - beta * call_energy(self.energy, z, context)

        inputs = (self._loc_c, self._inv_scale_c, self.context, torch.as_tensor(beta, dtype=self._loc_c.dtype))
        return cache.log_density(log_density, inputs)

    def log_tilted(self, z: torch.Tensor) -> torch.Tensor:
        u = (z - self.loc) / self.scale
        d = z.shape[-1]
        return -self._energy(z) - 0.5 * (u * u).sum(-1) - self.scale.log().sum(-1) - 0.5 * d * math.log(2 * math.pi)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.event_shape
        if self.context is not None:  # the context's shape takes part: rebuild with its checks
            new = EnergyTiltedNormal(self.energy, self.loc.expand(shape), self.scale.expand(shape),
                                     context=self.context, normalizer=self.normalizer, sampler=self.sampler,
                                     validate_args=False)
            return self._copy_settings(new)
        # A copy with expanded views (a data plate expands the prior at every model run, so at every chain step);
        # loc.expand raises for a batch shape that does not broadcast, as the constructor did.
        new = copy.copy(self)
        new.loc, new.scale = self.loc.expand(shape), self.scale.expand(shape)
        new._loc_c, new._inv_scale_c = self._loc_c.expand(shape), self._inv_scale_c.expand(shape)
        new.base = self.base.expand(batch_shape)
        new._batch_shape = batch_shape
        new._log_normalizer = None
        register_normalizer(new.normalizer, new)
        return new
