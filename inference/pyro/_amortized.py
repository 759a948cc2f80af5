"""The amortised guide: a diagonal-Gaussian encoder at each latent site of a Pyro model (Pyro).

:class:`AmortizedGuide` (exported by :mod:`tilted_priors.inference.pyro.guides`) and what the mixture guides share
with it: the model's latent sites as :class:`Site`, its plates made once per call (:func:`make_plates`), and the
subsample's rows of a full-size tensor (:func:`select`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import is_validation_enabled, site_is_subsample

from tilted_priors.inference.pyro._log_joint import BaseDraws, is_real
from tilted_priors.inference.pyro.handlers import normalizer, sampler
from tilted_priors.inference.pyro.modules import register_module
from tilted_priors._validation import check_encoder_sites, check_site_names
from tilted_priors.pyro import Unnormalized

__all__ = ["AmortizedGuide", "Site", "make_plates", "select", "LocScale", "EncoderOutput"]

LocScale = tuple[torch.Tensor, torch.Tensor]
EncoderOutput = Union[LocScale, dict[str, LocScale]]

_MAX_STRUCTURES = 8  # model structures cached per guide (one per distinct argument shapes)


class _GivenSubsamples(Messenger):
    """Note the plates whose subsample indices the model passes itself (``pyro.plate(name, n, subsample=idx)``)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def _process_message(self, msg):
        if msg["type"] == "sample" and site_is_subsample(msg) and msg["value"] is not None:
            self.names.add(msg["name"])


@dataclass(frozen=True)
class Site:
    """What the guide needs of one latent site of the model."""

    shape: torch.Size                        # of its value: batch shape (plates included) + event shape
    event_dim: int
    frames: tuple[CondIndepStackFrame, ...]  # its vectorized plates
    support: constraints.Constraint
    dtype: torch.dtype                       # of its value: what the guide's own tensors (mixing weights) take
    device: torch.device


@dataclass(frozen=True)
class _Structure:
    """The model's latent sites (program order), their vectorized plates, and the subsample indices that the model
    passes to plates itself (those change from call to call, so such a structure is not cached)."""

    sites: dict[str, Site]
    plates: dict[str, CondIndepStackFrame]
    given: dict[str, torch.Tensor]


def _model_structure(model: Callable, args, kwargs) -> _Structure:
    """Trace ``model`` cheaply: tilted sites take a draw from their base (no prior chain), normalizers are off."""
    given = _GivenSubsamples()
    cheap = sampler(normalizer(given(model), Unnormalized()), BaseDraws())
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(cheap).get_trace(*args, **kwargs)
    sites, plates = {}, {}
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or node["is_observed"] or site_is_subsample(node):
            continue
        frames = []
        for frame in node["cond_indep_stack"]:
            if frame.vectorized:
                frames.append(frame)
                plates[frame.name] = frame
            elif frame.full_size is not None and frame.size != frame.full_size:
                raise NotImplementedError(f"AmortizedGuide: site {name!r} is in the subsampled sequential plate "
                                          f"{frame.name!r}; use a vectorized plate (with pyro.plate(...):)")
        value = node["value"]
        sites[name] = Site(value.shape, node["fn"].event_dim, tuple(frames), node["fn"].support, value.dtype,
                            value.device)
    if not sites:
        raise ValueError("AmortizedGuide found no latent sample site in the model")
    return _Structure(sites, plates, {n: trace.nodes[n]["value"] for n in given.names if n in plates})


def _structure_key(args, kwargs):
    """The arguments' shapes (tensors, arrays) and values (plain Python scalars), the model's structure being assumed
    to depend on nothing else; ``None`` when an argument is of another kind (the model is then traced every call)."""

    def key(obj):
        if torch.is_tensor(obj):
            return ("tensor", tuple(obj.shape), obj.dtype, str(obj.device))
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return (type(obj).__name__, obj)
        if isinstance(obj, (tuple, list)):
            return (type(obj).__name__,) + tuple(key(o) for o in obj)
        if isinstance(obj, dict):
            return ("dict",) + tuple((k, key(v)) for k, v in sorted(obj.items()))
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            return ("array", tuple(obj.shape), str(obj.dtype))
        raise TypeError(type(obj).__name__)

    try:
        return key(args), key(kwargs)
    except TypeError:
        return None


def make_plates(structure: _Structure) -> dict[str, pyro.plate]:
    """The model's plates, made once per call: subsample indices are the model's own when it passes them, else
    drawn here (``Trace_ELBO`` replays them into the model), as Pyro's AutoGuides do."""
    plates = {}
    for name, frame in structure.plates.items():
        full = frame.full_size or frame.size
        if name in structure.given:
            plates[name] = pyro.plate(name, full, subsample=structure.given[name], dim=frame.dim)
        elif frame.size != full:
            plates[name] = pyro.plate(name, full, subsample_size=frame.size, dim=frame.dim)
        else:
            plates[name] = pyro.plate(name, full, dim=frame.dim)
    return plates


def select(t: torch.Tensor, site: Site, plates: dict) -> torch.Tensor:
    """The subsample's rows of ``t`` along each subsampled plate where ``t`` holds all ``full_size`` rows."""
    for frame in site.frames:
        full = frame.full_size or frame.size
        axis = frame.dim - site.event_dim
        if torch.is_tensor(t) and frame.size != full and t.dim() >= -axis and t.shape[axis] == full:
            t = t.index_select(t.dim() + axis, plates[frame.name].indices.to(t.device))
    return t


class AmortizedGuide:
    r"""Diagonal-Gaussian amortised guide (a VAE encoder) for the latent sites of a Pyro model.

    At each covered site it samples, reparameterised and inside the plates the model puts the site in,

    .. math:: q_\phi(z \mid x) = \mathcal N\bigl(z;\ \mu_\phi(x), \operatorname{diag}\sigma_\phi(x)^2\bigr),
              \qquad z = \mu_\phi(x) + \sigma_\phi(x) \odot \varepsilon,\ \varepsilon \sim \mathcal N(0, I),

    with :math:`(\mu_\phi, \sigma_\phi)` = ``encoder(*args, **kwargs)``, so that ``Trace_ELBO`` gives low-variance
    (pathwise) gradients of the ELBO, plates' subsampling scales included. For a prior
    :math:`p(z) = e^{-E(z)} \mathcal N(z; m, s^2) / Z` with the :class:`~tilted_priors.pyro.SelfNormalized`
    normalizer, the objective is the SNELBO (Senetaire et al.): per datum

    .. math:: \log p(x) \ge \mathbb E_{q_\phi(z \mid x)}\bigl[\log p(x \mid z) - E(z) + \log \mathcal N(z; m, s^2)
              - \log q_\phi(z \mid x)\bigr] - \bigl(b + e^{-b} \hat Z - 1\bigr),

    the ELBO with :math:`\log Z` replaced by its upper bound :math:`b + e^{-b}\hat Z - 1` (:math:`\hat Z` unbiased,
    tight at :math:`b = \log Z`), so one SVI step trains the encoder, the decoder, the energy and :math:`b` at once,
    with no MCMC.

    The covered sites' shapes, event dimensions, plates and supports come from a trace of the model made cheaply
    (tilted sites take a draw from their base instead of running the prior's sampler, normalizers off) and cached
    per argument shapes: the model's structure must depend only on the shapes of its tensor arguments and on the
    values of its plain (``int``, ``float``, ``str``, ``None``) ones. Along a subsampled plate the guide draws the
    subsample indices (``Trace_ELBO`` replays them into the model), unless the model passes its own
    (``pyro.plate(name, n, subsample=index)``; the model is then traced on every call to read them). Scales other
    than plates' (``poutine.scale``) are not copied: wrap the guide in the same handler.

    Parameters
    ----------
    model : callable
        The Pyro model; the guide is called with the model's arguments.
    encoder : callable
        Called with the model's arguments; returns ``(loc, scale)`` for one site or ``{site: (loc, scale)}``, each
        of the shape of the site's value (batch shape, plates included, then event shape; along a subsampled plate
        it may instead give all ``full_size`` rows, of which the guide takes the subsample's). ``scale`` must be
        positive (e.g. ``softplus`` of a network output). A :class:`torch.nn.Module` is registered with
        ``pyro.module(name, encoder, update_module_params=True)`` on every call, so ``SVI`` trains it.
    sites : str or sequence of str, optional
        The latent sites covered; default the keys of the encoder's dict, or the model's single latent site. The
        model may have no other latent site.
    name : str
        The encoder's name in the param store; give each encoder its own.

    Raises
    ------
    ValueError
        On a call, when loc or scale has the wrong shape, scale is not positive and finite or loc not finite (these
        value checks run while ``pyro.enable_validation`` is on, Pyro's default), a covered site is not a latent
        site of the model, a latent site is not covered, or a covered site is not real-valued.
    TypeError
        When the encoder returns something other than ``(loc, scale)`` pairs of tensors.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from tilted_priors.pyro import EnergyTiltedNormal, EnergyMLP, SelfNormalized
    >>> pyro.clear_param_store()
    >>> energy = EnergyMLP(2, 16)
    >>> def model(x):
    ...     pyro.module("energy", energy)
    ...     with pyro.plate("data", x.shape[0]):
    ...         prior = EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2), normalizer=SelfNormalized(64))
    ...         z = pyro.sample("z", prior)
    ...         pyro.sample("x", dist.Normal(z, 0.3).to_event(1), obs=x)
    >>> class Encoder(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(2, 4)
    ...     def forward(self, x):
    ...         loc, raw = self.net(x).chunk(2, dim=-1)
    ...         return loc, torch.nn.functional.softplus(raw) + 1e-4
    >>> guide = AmortizedGuide(model, Encoder())
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    >>> loss = svi.step(torch.randn(8, 2))
    >>> "snl_b" in pyro.get_param_store(), "encoder$$$net.weight" in pyro.get_param_store()
    (True, True)
    >>> guide(torch.randn(8, 2))["z"].shape
    torch.Size([8, 2])
    """

    def __init__(self, model: Callable, encoder: Callable[..., EncoderOutput],
                 sites: str | Sequence[str] | None = None, *, name: str = "encoder"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not callable(encoder):
            raise TypeError(f"encoder must be callable (returning (loc, scale)), got {type(encoder).__name__}")
        sites = check_site_names(sites)
        if not isinstance(name, str) or not name or "$$$" in name:
            raise ValueError(f"name must be a non-empty string without '$$$', got {name!r}")
        self.model, self.encoder, self.sites, self.name = model, encoder, sites, name
        self._structures: dict = {}

    def _structure(self, args, kwargs) -> _Structure:
        key = _structure_key(args, kwargs)
        structure = None if key is None else self._structures.get(key)
        if structure is None:
            structure = _model_structure(self.model, args, kwargs)
            if key is not None and not structure.given:
                if len(self._structures) >= _MAX_STRUCTURES:
                    self._structures.pop(next(iter(self._structures)))
                self._structures[key] = structure
        return structure

    def _encode(self, structure: _Structure, args, kwargs) -> dict[str, LocScale]:
        """The encoder's ``{site: (loc, scale)}``, in the model's order, after checking which sites it covers."""
        out = self.encoder(*args, **kwargs)
        latent = list(structure.sites)
        if isinstance(out, dict):
            if self.sites is not None and set(out) != set(self.sites):
                raise ValueError(f"AmortizedGuide(sites={list(self.sites)}), but the encoder returned sites "
                                 f"{list(out)}")
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            names = self.sites or latent
            if len(names) != 1:
                whose = "AmortizedGuide covers sites" if self.sites else "the model has latent sites"
                raise ValueError(f"the encoder returned one (loc, scale) pair, but {whose} {list(names)}: return a "
                                 "dict {site: (loc, scale)}" + ("" if self.sites else " or pass sites="))
            out = {names[0]: tuple(out)}
        else:
            raise TypeError(f"the encoder must return (loc, scale) or a dict {{site: (loc, scale)}}, got "
                            f"{type(out).__name__}")
        check_encoder_sites(out, latent)
        for n, pair in out.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"the encoder must give (loc, scale) for site {n!r}, got {type(pair).__name__}")
            if not is_real(structure.sites[n].support):
                raise ValueError(f"AmortizedGuide places a Normal on real-valued latents, but site {n!r} has support "
                                 f"{structure.sites[n].support}; constrained latents are not supported yet "
                                 "(reparameterise the site onto the real line)")
        return {n: tuple(out[n]) for n in latent}

    @staticmethod
    def _check(name: str, loc: torch.Tensor, scale: torch.Tensor, site: Site) -> None:
        for what, t in (("loc", loc), ("scale", scale)):
            if not torch.is_tensor(t):
                raise TypeError(f"the encoder's {what} for site {name!r} must be a tensor, got {type(t).__name__}")
            if t.shape != site.shape:
                raise ValueError(f"the encoder's {what} for site {name!r} has shape {tuple(t.shape)}, but the site's "
                                 f"value has shape {tuple(site.shape)} (batch shape, plates included, then "
                                 f"{site.event_dim} event dims)")
        if not is_validation_enabled():
            return
        if not bool(torch.isfinite(loc).all()):
            raise ValueError(f"the encoder's loc for site {name!r} has non-finite values (nan or inf)")
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError(f"the encoder's scale for site {name!r} must be positive and finite (smallest "
                             f"{float(scale.min()):.3g}); map the encoder's raw output through softplus or exp, "
                             "e.g. scale = softplus(h) + 1e-4")

    def _loc_scale(self, structure: _Structure, plates: dict, args, kwargs) -> dict[str, LocScale]:
        """Register the encoder and give its checked ``{site: (loc, scale)}`` (the subsample's rows of ``plates``)."""
        if isinstance(self.encoder, torch.nn.Module):
            register_module(self.name, self.encoder)
        out = {}
        for name, (loc, scale) in self._encode(structure, args, kwargs).items():
            site = structure.sites[name]
            out[name] = select(loc, site, plates), select(scale, site, plates)
            self._check(name, *out[name], site)
        return out

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        structure = self._structure(args, kwargs)
        plates = make_plates(structure)
        result = {}
        for name, (loc, scale) in self._loc_scale(structure, plates, args, kwargs).items():
            site = structure.sites[name]
            with contextlib.ExitStack() as stack:
                for frame in site.frames:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, dist.Normal(loc, scale).to_event(site.event_dim))
        return result

    def __repr__(self) -> str:
        return f"AmortizedGuide(encoder={self.encoder!r}, sites={self.sites!r}, name={self.name!r})"
