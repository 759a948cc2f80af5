r"""Reparameterisers for models with energy-tilted priors (Pyro): a flow backbone for the latent chains.

:class:`FlowBackbone` is the neural-transport move of Nijkamp et al. (2022) as a Pyro reparameteriser. A tilted
latent site ``z`` is rewritten as a flow :math:`z = T(u)` of a new tilted site ``u`` whose base is the flow's
(a standard Normal), with exactly the same distribution of ``z``:

.. math:: p(u) = \frac{e^{-E(T(u))}\, \mathcal N(u; 0, I)}{Z}
          \quad\text{when } z \sim e^{-E(z)}\, (T_\# \mathcal N)(z) / Z,

so any sampler of the library (ULA, MALA, the :class:`~tilted_priors.inference.pyro.Langevin` kernel, a short-run guide) runs
in the flow's latent space, where the flow has made the geometry simpler, and its draws are pushed through
:math:`T`. The model is not touched::

    model_u = poutine.reparam(model, config={"z": FlowBackbone(flow)})

That is the case of a prior whose base is the flow itself; a prior over any other base (LEBM's
:class:`~tilted_priors.pyro.EnergyTiltedNormal`) is carried by the flow through the change of variables,
with the same distribution of ``z`` again (see :class:`FlowBackbone`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.reparam.reparam import Reparam
from torch.distributions import TransformedDistribution
from torch.distributions.transforms import ComposeTransform, Transform

from tilted_priors.inference._wrappers import map_wrapped
from tilted_priors.inference.pyro.handlers import find_tilted
from tilted_priors.pyro import EnergyTilted, EnergyTiltedNormal
from tilted_priors.pyro._distribution_checks import dtype_device

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


def _find_flow(base) -> Optional[TransformedDistribution]:
    """The ``TransformedDistribution`` that ``base`` is (or wraps in ``Independent`` / expanded wrappers)."""
    while base is not None and not isinstance(base, TransformedDistribution):
        base = getattr(base, "base_dist", None)
    return base


def _find_normal(d):
    while d is not None and not isinstance(d, torch.distributions.Normal):
        d = getattr(d, "base_dist", None)
    return d


def _log_abs_det(transform: Transform, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    r""":math:`\log|\det \partial T / \partial u|` per vector: shape ``u.shape[:-1]``."""
    ladj = transform.log_abs_det_jacobian(u, z)
    ladj = sum_rightmost(ladj, 1 - transform.codomain.event_dim)
    return ladj.expand(u.shape[:-1]) if ladj.shape != u.shape[:-1] else ladj


def _standard_normal_log_prob(u: torch.Tensor) -> torch.Tensor:
    return -0.5 * (u * u).sum(-1) - 0.5 * u.shape[-1] * _LOG_2PI


class _PulledBackEnergy:
    r"""Form (a): :math:`u \mapsto E(T(u))` (:math:`E(T(u), x)` with a context)."""

    def __init__(self, energy: Callable, transform: Transform):
        self.energy, self.transform = energy, transform

    def __call__(self, u: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return self.energy(self.transform(u), *context)

    def __repr__(self) -> str:
        return f"{self.energy!r} o {self.transform!r}"


class _CarriedEnergy:
    r"""Form (b): :math:`u \mapsto E(T(u)) - \log q(T(u)) - \log|\det J_T(u)| + \log \mathcal N(u; 0, I)`."""

    def __init__(self, energy: Callable, transform: Transform, base):
        self.energy, self.transform, self.base = energy, transform, base

    def __call__(self, u: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        z = self.transform(u)
        return (self.energy(z, *context) - self.base.log_prob(z) - _log_abs_det(self.transform, u, z)
                + _standard_normal_log_prob(u))

    def __repr__(self) -> str:
        return f"carried({self.energy!r}, {self.transform!r})"


class FlowBackbone(Reparam):
    r"""Reparameterise a tilted latent site through a flow :math:`z = T(u)` (neural transport; Nijkamp et al. 2022).

    Use with ``poutine.reparam(model, config={"z": FlowBackbone(T)})``. The site ``z`` must be latent, with an
    :class:`~tilted_priors.pyro.EnergyTilted` distribution (an :class:`~tilted_priors.pyro.EnergyTiltedNormal`
    included; also inside plates and ``Independent`` / masked wrappers). It becomes a new latent site
    ``f"{name}_u"`` with a tilted distribution over :math:`u` and the deterministic site ``z = T(u)`` (a
    ``Delta`` with zero log density, recorded as observed, as Pyro's ``TransformReparam`` does). The
    distribution of ``z`` is unchanged, and so is :math:`Z`:

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
    wrappers, ``normalizer`` and ``sampler``, so :class:`~tilted_priors.pyro.Contrastive`,
    :class:`~tilted_priors.pyro.SelfNormalized`, :class:`~tilted_priors.pyro.Importance`, the samplers and the
    :func:`~tilted_priors.inference.pyro.handlers.sampler` / :func:`~tilted_priors.inference.pyro.handlers.normalizer` handlers work on it
    (in (a) the importance weights are :math:`e^{-E(T(u))}` with :math:`u` from the flow's base; in (b) they are
    those of the original prior with proposal :math:`T_\#\mathcal N(0, I)`). A normalizer with a ``proposal``
    (over :math:`z`) is refused: give the ``u`` site its own with the handler.

    Parameters
    ----------
    transform : torch.distributions.transforms.Transform, optional
        :math:`T`, mapping the flow's latent :math:`u` to :math:`z`, with event dimension at most 1 and the same
        shape in and out: a ``pyro.distributions.transforms`` flow (``affine_autoregressive``, ``spline_coupling``,
        ``iterated``...), a ``ComposeTransform``, ``AffineTransform``, ``LowerCholeskyAffine``. Its parameters are
        **not** registered here: when it is an ``nn.Module`` to be trained, call ``pyro.module("flow", T)`` in the
        model (or a wrapper of it); a fixed (pre-trained) flow needs nothing. ``None``: the flow of the site's base
        (form (a) only).

    Raises
    ------
    ValueError
        When the site is observed, the transform has event dimension above 1 or changes the shape, the tilted
        distribution's event dimension is not 1, or its normalizer has a proposal.
    TypeError
        When the site's distribution is not energy-tilted, or ``transform`` is not a torch ``Transform``.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> from pyro.distributions.transforms import AffineTransform
    >>> from tilted_priors.pyro import EnergyTiltedNormal, MALA
    >>> pyro.clear_param_store()
    >>> def model():
    ...     prior = EnergyTiltedNormal(lambda z: (z ** 2).sum(-1), torch.zeros(2), torch.ones(2), sampler=MALA(20, 0.5))
    ...     with pyro.plate("chains", 5):
    ...         return pyro.sample("z", prior)
    >>> flow = AffineTransform(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0]))
    >>> tr = poutine.trace(poutine.reparam(model, config={"z": FlowBackbone(flow)})).get_trace()
    >>> tr.nodes["z_u"]["value"].shape, tr.nodes["z"]["is_observed"]
    (torch.Size([5, 2]), True)
    >>> torch.allclose(tr.nodes["z"]["value"], flow(tr.nodes["z_u"]["value"]))
    True
    """

    def __init__(self, transform: Optional[Transform] = None):
        if transform is not None and not isinstance(transform, Transform):
            raise TypeError("FlowBackbone needs a torch/Pyro Transform mapping u to z (e.g. from "
                            f"pyro.distributions.transforms), got {type(transform).__name__}")
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
                             "its own normalizer with tilted_priors.inference.pyro.handlers.normalizer(...) around the "
                             "reparameterised model")
        return tilted

    @staticmethod
    def _check_transform(name: str, transform: Transform, event_shape: torch.Size) -> None:
        if transform.domain.event_dim > 1 or transform.codomain.event_dim > 1:
            raise ValueError(f"FlowBackbone at site {name!r}: the transform must act on vectors (event dimension "
                             f"at most 1), got domain/codomain event dimensions {transform.domain.event_dim}/"
                             f"{transform.codomain.event_dim}")
        shape = torch.Size(transform.forward_shape(event_shape))
        if shape != event_shape:
            raise ValueError(f"FlowBackbone at site {name!r}: the transform must keep the event shape "
                             f"{tuple(event_shape)}, it maps it to {tuple(shape)}")

    def _u_distribution(self, name: str, tilted: EnergyTilted) -> tuple[EnergyTilted, Transform]:
        """The tilted distribution over u (same batch shape, normalizer, sampler) and the transform u -> z."""
        batch_shape, event_shape = tilted.batch_shape, tilted.event_shape
        flow = _find_flow(tilted.base)
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
        settings = dict(context=tilted.context, normalizer=tilted.normalizer, sampler=tilted.sampler,
                        validate_args=False)
        parts = _parts(transform)
        if flow is not None and len(parts) == len(flow_parts) and all(a is b for a, b in zip(parts, flow_parts)):
            # (a) the base is this flow: u ~ EnergyTilted(E o T, the flow's base)
            energy = _PulledBackEnergy(tilted.energy, transform)
            base = flow.base_dist
            if base.event_dim < 1:
                base = base.to_event(1 - base.event_dim)
            if base.event_shape != event_shape:
                raise ValueError(f"FlowBackbone at site {name!r}: the flow's base has event shape "
                                 f"{tuple(base.event_shape)}, the site {tuple(event_shape)}")
            normal = _find_normal(base)
            if normal is not None:
                shape = batch_shape + event_shape
                u_dist = EnergyTiltedNormal(energy, base.mean.expand(shape), base.stddev.expand(shape), **settings)
            else:
                u_dist = EnergyTilted(energy, base.expand(batch_shape), **settings)
        else:
            # (b) any other base q, carried by T: the change of variables
            energy = _CarriedEnergy(tilted.energy, transform, tilted.base)
            dtype, device = dtype_device(tilted)
            zeros = torch.zeros(batch_shape + event_shape, dtype=dtype, device=device)
            u_dist = EnergyTiltedNormal(energy, zeros, torch.ones_like(zeros), **settings)
        return tilted._copy_settings(u_dist), transform

    # --- the reparameteriser ---------------------------------------------------------------------------
    def apply(self, msg: dict) -> dict:
        """Replace the site by ``f"{name}_u"`` and the deterministic ``z = T(u)`` (Pyro's ``Reparam`` API)."""
        name, fn, value = msg["name"], msg["fn"], msg["value"]
        if msg["is_observed"]:
            raise ValueError(f"FlowBackbone at site {name!r}: the site is observed; FlowBackbone reparameterises "
                             "latent tilted priors only")
        tilted = self._tilted(name, fn)
        u_dist, transform = self._u_distribution(name, tilted)
        u_fn = map_wrapped(fn, EnergyTilted, lambda _: u_dist)

        u_init = None
        if value is not None:  # an initial value (e.g. from an init strategy): start u at T^{-1}(z)
            try:
                u_init = transform.inv(value)
            except NotImplementedError:
                u_init = None
        if u_init is None:
            u = pyro.sample(f"{name}_u", u_fn)
            z = transform(u)
        else:  # keep the given value itself, as TransformReparam does (so the reparam commutes with init)
            pyro.sample(f"{name}_u", u_fn, obs=u_init, infer={"is_observed": False})
            z = value
        # Simulate a pyro.deterministic() site, as TransformReparam does.
        new_fn = dist.Delta(z, event_dim=fn.event_dim).mask(False)
        return {"fn": new_fn, "value": z, "is_observed": True}
