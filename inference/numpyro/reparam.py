r"""Reparameterisers for models with energy-tilted priors (NumPyro): a flow backbone for the latent chains.

The same reparameteriser as :mod:`tilted_priors.inference.pyro.reparam`. :class:`FlowBackbone` is the neural-transport move of
Nijkamp et al. (2022) as a NumPyro reparameteriser. A tilted latent site ``z`` is rewritten as a flow
:math:`z = T(u)` of a new tilted site ``u`` whose base is the flow's (a standard Normal), with exactly the same
distribution of ``z``:

.. math:: p(u) = \frac{e^{-E(T(u))}\, \mathcal N(u; 0, I)}{Z}
          \quad\text{when } z \sim e^{-E(z)}\, (T_\# \mathcal N)(z) / Z,

so any sampler of the library (ULA, MALA, the :class:`~tilted_priors.inference.numpyro.Langevin` kernel, a short-run guide)
runs in the flow's latent space and its draws are pushed through :math:`T`. The model is not touched::

    model_u = numpyro.handlers.reparam(model, config={"z": FlowBackbone(flow)})

That is the case of a prior whose base is the flow itself; a prior over any other base (LEBM's
:class:`~tilted_priors.numpyro.EnergyTiltedNormal`) is carried by the flow through the change of variables,
with the same distribution of ``z`` again (see :class:`FlowBackbone`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.tree_util import Partial
from numpyro.distributions import TransformedDistribution
from numpyro.distributions.transforms import ComposeTransform, Transform
from numpyro.distributions.util import sum_rightmost
from numpyro.infer.reparam import Reparam

from tilted_priors.inference._wrappers import map_wrapped
from tilted_priors.inference.numpyro.handlers import find_tilted
from tilted_priors.numpyro import EnergyTilted, EnergyTiltedNormal

__all__ = ["FlowBackbone"]

_LOG_2PI = math.log(2.0 * math.pi)


def _parts(transform) -> list:
    """The elementary transforms of ``transform`` (a transform or a list), compositions flattened, in order."""
    if isinstance(transform, (list, tuple)):
        return [p for t in transform for p in _parts(t)]
    if isinstance(transform, ComposeTransform):
        return _parts(list(transform.parts))
    return [transform]


def _compose(transforms: list) -> Transform:
    return transforms[0] if len(transforms) == 1 else ComposeTransform(list(transforms))


def _find(d, cls):
    """The ``cls`` instance that ``d`` is or wraps (through ``base_dist`` of Independent / expanded wrappers)."""
    while d is not None and not isinstance(d, cls):
        d = getattr(d, "base_dist", None)
    return d


def _log_abs_det(transform: Transform, u, z, intermediates=None):
    r""":math:`\log|\det \partial T / \partial u|` per vector: shape ``u.shape[:-1]``."""
    ladj = transform.log_abs_det_jacobian(u, z, intermediates=intermediates)
    ladj = sum_rightmost(ladj, 1 - transform.codomain.event_dim)
    return jnp.broadcast_to(ladj, jnp.shape(u)[:-1])


def _pulled_back_energy(energy: Callable, transform: Transform, u, *context):
    r"""Form (a): :math:`E(T(u))` (:math:`E(T(u), x)` with a context; module-level, so that compiled chains are
    reused)."""
    return energy(transform(u), *context)


def _carried_energy(energy: Callable, transform: Transform, base, u, *context):
    r"""Form (b): :math:`E(T(u)) - \log q(T(u)) - \log|\det J_T(u)| + \log \mathcal N(u; 0, I)`."""
    z, intermediates = transform.call_with_intermediates(u)
    log_normal = -0.5 * jnp.sum(u * u, -1) - 0.5 * jnp.shape(u)[-1] * _LOG_2PI
    return energy(z, *context) - base.log_prob(z) - _log_abs_det(transform, u, z, intermediates) + log_normal


class FlowBackbone(Reparam):
    r"""Reparameterise a tilted latent site through a flow :math:`z = T(u)` (neural transport; Nijkamp et al. 2022).

    Use with ``numpyro.handlers.reparam(model, config={"z": FlowBackbone(T)})``. The site ``z`` must be latent,
    with an :class:`~tilted_priors.numpyro.EnergyTilted` distribution (an
    :class:`~tilted_priors.numpyro.EnergyTiltedNormal` included; also inside plates and ``Independent`` / masked
    wrappers). It becomes a new latent site ``f"{name}_u"`` with a tilted distribution over :math:`u` and the
    deterministic site ``z = T(u)`` (as NumPyro's ``TransformReparam``). The distribution of ``z`` is unchanged,
    and so is :math:`Z`:

    (a) **Base is the flow.** ``EnergyTilted(E, TransformedDistribution(N(0, I), T))``, the flow of ``transform``
        (the same transform objects, or ``transform=None``): the Jacobian cancels,

        .. math:: u \sim \frac{e^{-E(T(u))}\, \mathcal N(u; 0, I)}{Z}
                  \qquad (\texttt{EnergyTilted}(E \circ T,\ \mathcal N(0, I))),

        with the flow's own base distribution in place of :math:`\mathcal N(0, I)`.

    (b) **Any other base** :math:`q` (``EnergyTiltedNormal(E, loc, scale)``'s Normal, or a flow other than
        :math:`T`), carried by the flow :math:`T`: the change of variables gives the energy

        .. math:: E_u(u) = E(T(u)) - \log q(T(u)) - \log\bigl|\det \tfrac{\partial T}{\partial u}(u)\bigr|
                           + \log \mathcal N(u; 0, I),

        so that :math:`e^{-E_u(u)}\mathcal N(u; 0, I)/Z = p_z(T(u))\,|\det \partial T/\partial u|`, i.e. the
        push-forward of :math:`u \sim` ``EnergyTiltedNormal(E_u, 0, 1)`` through :math:`T` is the original prior.
        :math:`T` must be a bijection of :math:`\mathbb R^d` with a log-Jacobian.

    In both cases :math:`\log p_u(u) = \log p_z(T(u)) + \log|\det \partial T / \partial u(u)|`, the base over
    :math:`u` is the standard Normal (the flow's base in (a)), and the new site keeps the original's batch shape,
    wrappers, ``normalizer``, ``sampler`` and ``rng_key``, so :class:`~tilted_priors.numpyro.Contrastive`,
    :class:`~tilted_priors.numpyro.SelfNormalized`, :class:`~tilted_priors.numpyro.Importance`, the samplers and
    the :func:`~tilted_priors.inference.numpyro.handlers.sampler` / :func:`~tilted_priors.inference.numpyro.handlers.normalizer` handlers work
    on it. A normalizer with a ``proposal`` (over :math:`z`) is refused: give the ``u`` site its own with the
    handler. The new energy is a :class:`jax.tree_util.Partial` of a module-level function, the energy and the
    transform (and the base), so compiled chains are reused when these are pytrees of arrays.

    Parameters
    ----------
    transform : numpyro.distributions.transforms.Transform, optional
        :math:`T`, mapping the flow's latent :math:`u` to :math:`z`, with event dimension at most 1 and the same
        shape in and out: ``InverseAutoregressiveTransform`` / ``BlockNeuralAutoregressiveTransform`` from
        :mod:`numpyro.distributions.flows` (with a network from :mod:`numpyro.nn`), ``AffineTransform``,
        ``LowerCholeskyAffine``, ``ComposeTransform``. A flow whose parameters are learned inside the model
        (``numpyro.module``) is built by the model: put it in the site's base and pass ``transform=None``
        (form (a)). Only the forward map and (form (b)) its log-Jacobian are used, never the inverse, so
        ``BlockNeuralAutoregressiveTransform`` works too.
        ``None``: the flow of the site's base (form (a) only).

    Raises
    ------
    ValueError
        When the site is observed, the transform has event dimension above 1 or changes the shape, the tilted
        distribution's event dimension is not 1, or its normalizer has a proposal.
    TypeError
        When the site's distribution is not energy-tilted, or ``transform`` is not a NumPyro ``Transform``.

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro
    >>> from numpyro import handlers
    >>> from numpyro.distributions.transforms import AffineTransform
    >>> from tilted_priors.numpyro import EnergyTiltedNormal, MALA
    >>> def model():
    ...     prior = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2), sampler=MALA(20, 0.5))
    ...     with numpyro.plate("chains", 5):
    ...         return numpyro.sample("z", prior)
    >>> flow = AffineTransform(jnp.array([1.0, -1.0]), jnp.array([0.5, 2.0]))
    >>> tr = handlers.trace(handlers.seed(handlers.reparam(model, config={"z": FlowBackbone(flow)}), 0)).get_trace()
    >>> tr["z_u"]["value"].shape, tr["z"]["type"]
    ((5, 2), 'deterministic')
    >>> bool(jnp.allclose(tr["z"]["value"], flow(tr["z_u"]["value"])))
    True
    """

    def __init__(self, transform: Optional[Transform] = None):
        if transform is not None and not isinstance(transform, Transform):
            raise TypeError("FlowBackbone needs a NumPyro Transform mapping u to z (e.g. from "
                            f"numpyro.distributions.flows), got {type(transform).__name__}")
        self.transform = transform

    def __repr__(self) -> str:
        return f"FlowBackbone({self.transform!r})"

    # --- building the u site ---------------------------------------------------------------------------
    def _tilted(self, name: str, fn) -> EnergyTilted:
        tilted = find_tilted(fn)
        if tilted is None:
            raise TypeError(f"FlowBackbone at site {name!r}: the site's distribution must be an EnergyTilted or "
                            f"EnergyTiltedNormal (possibly in plates or Independent/masked wrappers), got "
                            f"{type(fn).__name__}")
        if len(tilted.event_shape) != 1:
            raise ValueError(f"FlowBackbone at site {name!r}: the tilted distribution must have event dimension 1 "
                             f"(event shape (d,)), got event shape {tuple(tilted.event_shape)}")
        normalizer = tilted.normalizer
        if getattr(normalizer, "proposal", None) is not None:
            raise ValueError(f"FlowBackbone at site {name!r}: the normalizer {normalizer!r} has a proposal over z, "
                             "which does not carry over to the flow's latent u; give the reparameterised site "
                             "its own normalizer with tilted_priors.inference.numpyro.handlers.normalizer(...) around the "
                             "reparameterised model")
        return tilted

    @staticmethod
    def _check_transform(name: str, transform: Transform, event_shape: tuple) -> None:
        if transform.domain.event_dim > 1 or transform.codomain.event_dim > 1:
            raise ValueError(f"FlowBackbone at site {name!r}: the transform must act on vectors (event dimension "
                             f"at most 1), got domain/codomain event dimensions {transform.domain.event_dim}/"
                             f"{transform.codomain.event_dim}")
        shape = tuple(transform.forward_shape(event_shape))
        if shape != event_shape:
            raise ValueError(f"FlowBackbone at site {name!r}: the transform must keep the event shape "
                             f"{event_shape}, it maps it to {shape}")

    def _u_distribution(self, name: str, tilted: EnergyTilted) -> tuple[EnergyTilted, Transform]:
        """The tilted distribution over u (same batch shape, normalizer, sampler, key) and the transform u -> z."""
        batch_shape, event_shape = tuple(tilted.batch_shape), tuple(tilted.event_shape)
        flow = _find(tilted.base, TransformedDistribution)
        flow_parts = _parts(flow.transforms) if flow is not None else None
        if self.transform is None:
            if flow is None:
                raise ValueError(f"FlowBackbone() at site {name!r} has no transform and the site's base "
                                 f"{type(tilted.base).__name__} is not a flow (TransformedDistribution): pass the "
                                 "flow's transform, FlowBackbone(T)")
            transform = _compose(flow_parts)
        else:
            transform = self.transform
        self._check_transform(name, transform, event_shape)
        settings = dict(context=tilted.__dict__.get("context"), normalizer=tilted.normalizer,
                        sampler=tilted.sampler, rng_key=tilted.rng_key, validate_args=False)
        parts = _parts(transform)
        if flow is not None and len(parts) == len(flow_parts) and all(a is b for a, b in zip(parts, flow_parts)):
            # (a) the base is this flow: u ~ EnergyTilted(E o T, the flow's base)
            energy = Partial(_pulled_back_energy, tilted.energy, transform)
            base = flow.base_dist
            if base.event_dim < 1:
                base = base.to_event(1 - base.event_dim)
            if tuple(base.event_shape) != event_shape:
                raise ValueError(f"FlowBackbone at site {name!r}: the flow's base has event shape "
                                 f"{tuple(base.event_shape)}, the site {event_shape}")
            shape = batch_shape + event_shape
            if _find(base, dist.Normal) is not None:
                loc = jnp.broadcast_to(base.mean, shape)
                scale = jnp.broadcast_to(jnp.sqrt(base.variance), shape)
                u_dist = EnergyTiltedNormal(energy, loc, scale, **settings)
            else:
                u_dist = EnergyTilted(energy, base.expand(batch_shape), **settings)
        else:
            # (b) any other base q, carried by T: the change of variables
            energy = Partial(_carried_energy, tilted.energy, transform, tilted.base)
            loc = tilted.__dict__.get("loc")
            dtype = jnp.result_type(loc) if loc is not None else jnp.result_type(float)
            zeros = jnp.zeros(batch_shape + event_shape, dtype)
            u_dist = EnergyTiltedNormal(energy, zeros, jnp.ones_like(zeros), **settings)
        return tilted._copy_settings(u_dist), transform

    # --- the reparameteriser ---------------------------------------------------------------------------
    def __call__(self, name: str, fn, obs):
        """Replace the site by ``f"{name}_u"`` and the deterministic ``z = T(u)`` (NumPyro's ``Reparam`` API)."""
        if obs is not None:
            raise ValueError(f"FlowBackbone at site {name!r}: the site is observed (it has a value); FlowBackbone "
                             "reparameterises latent tilted priors only")
        tilted = self._tilted(name, fn)
        u_dist, transform = self._u_distribution(name, tilted)
        u = numpyro.sample(f"{name}_u", map_wrapped(fn, EnergyTilted, lambda _: u_dist))
        # Simulate a numpyro.deterministic() site, as TransformReparam does.
        return None, transform(u)
