r"""Tilt any sample site(s) of a Pyro model by an energy: the effect handler :class:`tilt`.

.. math:: p(z_1, \dots, z_k \mid \text{rest}) = \frac1Z\, e^{-E(z_1, \dots, z_k)} \prod_{i=1}^k p_i(z_i \mid \text{parents}_i)

The model is written with ordinary priors (``dist.Normal``, a hierarchical prior, two layers of latents); ``tilt``
multiplies the prior of the named sites by :math:`e^{-E}` without touching the model. ``energy`` takes a dict
``{site: value}`` (values with the sites' shapes) and returns one energy per element of the sites' batch (plate)
shape.

- **One site.** Its distribution is replaced by :class:`~tilted_priors.pyro.EnergyTilted` of the site's own
  distribution (a one-site tilt of ``Normal(loc, scale).to_event(1)`` *is* ``EnergyTiltedNormal(E, loc, scale)``).
  Sites with event shape other than ``(d,)`` are flattened for the chains and shaped back; sites with constrained
  support (``HalfNormal``, ``Dirichlet``, ...) are tilted in the unconstrained space of their bijection
  (``biject_to(support)``): the chains run on :math:`u = T^{-1}(z)` with base density :math:`q(T(u))|T'(u)|`, and
  the site's density is the exact tilted density :math:`e^{-E(z)} q(z) / Z` in its own space.
- **Several sites** share one energy (a joint tilt, e.g. the joint latent-space prior of a two-layer generator).
  The sites must have the same batch (plate) shape. Their own distributions stay in the trace; a term
  :math:`-E(z_1..z_k) - \log Z` is added to the last site's ``log_prob``, so the model's joint density is the tilted
  one. The joint base :math:`\prod_i p_i(z_i \mid \text{parents}_i)` is evaluated by running the model again
  (hidden from all outer handlers, vectorised over the chains with an outer ``pyro.plate``, stopped after the last
  tilted site), conditioned on the values of everything sampled before it in the current run. Prior draws
  (``Predictive``) are joint draws of all the tilted sites by the sampler; when the first site's value is given (a
  guide, MCMC) and the last one is not, the last one is drawn from its tilted conditional.

The normalizer and sampler work as for :class:`~tilted_priors.pyro.EnergyTilted` (default
:class:`~tilted_priors.pyro.Contrastive` and the default short-run sampler), and the handlers
:class:`~tilted_priors.inference.pyro.handlers.normalizer` / ``sampler`` placed *outside* ``tilt`` change them.
Tilts nest: ``tilt(tilt(model, E1, "a"), E2, "b")``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, TransformedDistribution, constraints
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, ReshapeTransform

from tilted_priors._compat import pyro_isolated
from tilted_priors.inference._wrappers import energy_call_error, tilt_arguments, warn_missing_sites
from tilted_priors.inference.pyro.modules import register_module
from tilted_priors.pyro import MALA, EnergyTilted

__all__ = ["tilt"]


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class _Layout:
    """How a site's value maps to the flat unconstrained vector the chains run on, and back."""

    def __init__(self, name: str, fn):
        if fn.support.is_discrete:
            raise TypeError(f"tilt(): site {name!r} is discrete ({type(fn).__name__}); only sites with continuous "
                            "support can be tilted (the chains are Langevin dynamics)")
        self.name = name
        self.transform = None if _is_real(fn.support) else biject_to(fn.support)
        u = fn if self.transform is None else TransformedDistribution(fn, [self.transform.inv])
        self.u_event = tuple(u.event_shape)
        self.batch = tuple(fn.batch_shape)
        self.dim = int(math.prod(self.u_event))
        self.unconstrained = u

    def flat_base(self):
        u = self.unconstrained
        if len(self.u_event) == 1:
            return u
        return TransformedDistribution(u, [ReshapeTransform(torch.Size(self.u_event), torch.Size((self.dim,)))])

    def to_site(self):
        """Transform from the flat vector to the site's value (``None`` for the identity)."""
        parts = []
        if len(self.u_event) != 1:
            parts.append(ReshapeTransform(torch.Size((self.dim,)), torch.Size(self.u_event)))
        if self.transform is not None:
            parts.append(self.transform)
        return None if not parts else parts[0] if len(parts) == 1 else ComposeTransform(parts)

    def value(self, flat):
        t = self.to_site()
        return flat if t is None else t(flat)

    def flat(self, value):
        u = value if self.transform is None else self.transform.inv(value)
        lead = u.shape[:u.dim() - len(self.u_event)]
        return u.reshape(lead + (self.dim,))

    def log_det(self, flat):
        """:math:`\\log|\\det \\partial z / \\partial u|` summed over the event (0 without a transform)."""
        if self.transform is None:
            return 0.0
        u = flat.reshape(flat.shape[:-1] + self.u_event)
        ladj = self.transform.log_abs_det_jacobian(u, self.transform(u))
        extra = ladj.dim() - (u.dim() - len(self.u_event))
        return ladj.sum(tuple(range(-extra, 0))) if extra > 0 else ladj


class _Energy:
    """The user's energy of ``{site: value}`` as a function of the flat vector (concatenated over sites)."""

    def __init__(self, energy: Callable | None, layouts: Sequence[_Layout], fixed: dict | None = None):
        self.energy, self.layouts, self.fixed = energy, tuple(layouts), dict(fixed or {})

    def values(self, flat) -> dict:
        out, start = dict(self.fixed), 0
        for layout in self.layouts:
            out[layout.name] = layout.value(flat[..., start:start + layout.dim])
            start += layout.dim
        return out

    def __call__(self, flat):
        values = self.values(flat)
        try:
            e = torch.as_tensor(self.energy(values))
        except (KeyError, TypeError) as err:  # say what the energy is given (a dict of the sites' values)
            error = energy_call_error(err, values)
            if error is err:
                raise
            raise error from err
        expected = flat.shape[:-1]
        if e.shape != expected:
            try:
                e = e.expand(expected)
            except RuntimeError:
                raise ValueError(f"tilt(): the energy returned shape {tuple(e.shape)} for values of batch shape "
                                 f"{tuple(expected)}: it must return one energy per draw and plate element") from None
        return e


class _ModuleEnergy:
    """A network's energy of the concatenated, flattened site values, in the order of ``sites``."""

    def __init__(self, module, sites, event_ndims: dict):
        self.module, self.sites, self.event_ndims = module, tuple(sites), event_ndims

    def __call__(self, values: dict):
        parts = []
        for name in self.sites:
            v = values[name]
            parts.append(v.reshape(v.shape[:v.dim() - self.event_ndims[name]] + (-1,)))
        lead = torch.broadcast_shapes(*[p.shape[:-1] for p in parts])
        return self.module(torch.cat([p.expand(lead + p.shape[-1:]) for p in parts], -1))


class _Stop(Exception):
    pass


class _StopAfter(Messenger):
    """Record the tilted sites of a nested run and stop the model after the last one."""

    def __init__(self, names):
        super().__init__()
        self.names, self.sites = set(names), {}

    def _postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.names:
            self.sites[msg["name"]] = msg
            if len(self.sites) == len(self.names):
                raise _Stop


class _Spec:
    """What the nested runs of a joint tilt need: the model, its arguments, the values seen so far."""

    def __init__(self, model, args, kwargs, layouts, names, seen, nesting: int):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.layouts, self.names, self.seen = tuple(layouts), tuple(names), dict(seen)
        self.nesting = nesting

    def run(self, num_particles: int, values: dict | None = None) -> dict:
        """Run the model for ``num_particles`` particles (an outer plate left of all its plates)."""
        data = {k: v for k, v in self.seen.items() if k not in self.names}
        data.update(values or {})
        stopper = _StopAfter(self.names)
        with pyro_isolated(), poutine.block(), stopper:
            with pyro.plate("_tilt_particles", num_particles, dim=-(self.nesting + 1)):
                try:
                    poutine.condition(self.model, data=data)(*self.args, **self.kwargs)
                except _Stop:
                    pass
        missing = set(self.names) - set(stopper.sites)
        if missing:
            raise ValueError(f"tilt(): the model has no sample site(s) {sorted(missing)}")
        return stopper.sites

    def particles(self, value, batch, event):
        """``value`` of shape ``(n, *batch, *event)`` as the particle plate expects it."""
        pad = (1,) * (self.nesting - len(batch))
        return value.reshape(value.shape[:1] + pad + tuple(batch) + tuple(event))


class _JointBase(TorchDistribution):
    r"""The joint base :math:`\prod_i p_i(z_i \mid \text{parents}_i)` on the flat unconstrained vector."""

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, spec: _Spec, batch_shape):
        self.spec = spec
        dim = sum(layout.dim for layout in spec.layouts)
        super().__init__(torch.Size(batch_shape), torch.Size((dim,)), validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        n = int(math.prod(sample_shape))
        batch = tuple(self.batch_shape)
        with torch.no_grad():
            sites = self.spec.run(n)
            parts = [layout.flat(sites[layout.name]["value"].expand(
                (n,) + (1,) * (self.spec.nesting - len(batch)) + batch + tuple(sites[layout.name]["fn"].event_shape)
            ).reshape((n,) + batch + tuple(sites[layout.name]["fn"].event_shape))) for layout in self.spec.layouts]
        return torch.cat(parts, -1).reshape(tuple(sample_shape) + batch + tuple(self.event_shape))

    def log_prob(self, value):
        batch, d = tuple(self.batch_shape), self.event_shape[0]
        lead = value.shape[:value.dim() - len(batch) - 1]
        flat = value.expand(lead + batch + (d,)).reshape((-1,) + batch + (d,))
        n = flat.shape[0]
        values = _Energy(None, self.spec.layouts).values(flat)
        events = {}
        for layout in self.spec.layouts:
            v = values[layout.name]
            events[layout.name] = tuple(v.shape[1 + len(batch):])
        sites = self.spec.run(n, {k: self.spec.particles(v, batch, events[k]) for k, v in values.items()})
        total, start = 0.0, 0
        for layout in self.spec.layouts:
            site = sites[layout.name]
            lp = site["fn"].log_prob(site["value"])
            lp = lp.expand((n,) + (1,) * (self.spec.nesting - len(batch)) + batch).reshape((n,) + batch)
            total = total + lp + layout.log_det(flat[..., start:start + layout.dim])
            start += layout.dim
        return total.reshape(lead + batch)


class _Given(TorchDistribution):
    """A site's own distribution whose draw is already known (the joint draw made at the first tilted site)."""

    arg_constraints: dict = {}

    def __init__(self, base_dist, given):
        self.base_dist, self.given = base_dist, given
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    def sample(self, sample_shape=torch.Size()):
        if self.given is None:
            raise NotImplementedError(
                "tilt(): a middle site of a joint tilt of more than two sites has no value: give the values of "
                "all or none of the tilted sites (a guide over all of them, or prior draws)")
        return self.given.expand(torch.Size(sample_shape) + self.given.shape)

    def log_prob(self, value):
        return self.base_dist.log_prob(value)


class _JointFirst(_Given):
    """The first tilted site: its own density; a draw makes the joint draw of all the tilted sites."""

    def __init__(self, base_dist, handler: "tilt"):
        self.handler = handler
        super().__init__(base_dist, None)

    def sample(self, sample_shape=torch.Size()):
        if tuple(sample_shape):
            raise ValueError("tilt(): the first site of a joint tilt draws one joint sample per model run "
                             "(use a plate or Predictive(num_samples=...) for more)")
        return self.handler._joint_draw()


def _flat_values(layouts, values):
    parts = [layout.flat(values[layout.name]) for layout in layouts]
    lead = torch.broadcast_shapes(*[p.shape[:-1] for p in parts])
    return torch.cat([p.expand(lead + p.shape[-1:]) for p in parts], -1)


class _JointLast(TorchDistribution):
    r"""The last tilted site: its own density plus :math:`-E(z_1..z_k) - \log Z` of the joint tilt.

    ``base_dist`` is the joint :class:`~tilted_priors.pyro.EnergyTilted` (so that ``find_tilted`` and the
    ``normalizer`` / ``sampler`` handlers reach it); ``site_dist`` is the site's own distribution.
    """

    arg_constraints: dict = {}

    def __init__(self, site_dist, joint: EnergyTilted, given, earlier: dict, conditional):
        self.site_dist, self.base_dist, self.given = site_dist, joint, given
        self.earlier, self.conditional = earlier, conditional
        super().__init__(site_dist.batch_shape, site_dist.event_shape, validate_args=False)

    @property
    def support(self):
        return self.site_dist.support

    def sample(self, sample_shape=torch.Size()):
        if self.given is not None:
            return self.given.expand(torch.Size(sample_shape) + self.given.shape)
        return self.conditional.sample(sample_shape)

    def log_prob(self, value):
        joint = self.base_dist
        layouts = joint.base.spec.layouts
        flat = _flat_values(layouts, {**self.earlier, layouts[-1].name: value})
        return self.site_dist.log_prob(value) - joint._energy(flat) - joint.log_normalizer()


def _strip(shape: tuple) -> tuple:
    """``shape`` without leading ones (the particle plate's padding)."""
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _one_site(fn, name: str, energy: Callable, normalizer, sampler, fixed=None):
    layout = _Layout(name, fn)
    if sampler is None and layout.transform is not None:
        # In the unconstrained space of a bijection the curvature varies by orders of magnitude (exp, softplus):
        # the Metropolis test keeps the chains exact where a fixed unadjusted step would overshoot.
        sampler = MALA(100, "auto")
    tilted = EnergyTilted(_Energy(energy, [layout], fixed), layout.flat_base(), normalizer=normalizer,
                          sampler=sampler)
    to_site = layout.to_site()
    return tilted if to_site is None else TransformedDistribution(tilted, [to_site])


class tilt(Messenger):
    r"""Tilt the prior of the named sample sites of any model by an energy.

    .. math:: p(z_1..z_k \mid \cdot) \propto e^{-E(\{z_i\})} \prod_i p_i(z_i \mid \text{parents}_i)

    Parameters
    ----------
    fn : callable, optional
        The model. ``None`` for a context manager (one site only: a joint tilt re-runs the model).
    energy : callable or network
        :math:`E`: a function of ``{site: value}`` (values with the sites' own shapes, plus leading dims for
        chains) returning one energy per draw and plate element (the sites' batch shape); or a torch module (e.g. :class:`~tilted_priors.pyro.EnergyMLP`) taking the
        sites' values flattened and concatenated in the order of ``sites`` (``(..., d_total) -> (...)``), which
        ``tilt`` registers with the model at every run (``register_module(name, energy)``), so ``SVI`` / ``fit`` train it.
    sites : str or sequence of str
        The sample sites to tilt. Continuous support (constrained ones through ``biject_to``); several sites need
        the same plate (batch) shape.
    normalizer : normalizer, optional
        What the tilted density subtracts for :math:`\log Z` (default :class:`~tilted_priors.pyro.Contrastive`;
        see :class:`~tilted_priors.pyro.EnergyTilted`).
    name : str, optional
        When ``energy`` is a network, the name it is registered under at every run of the model (default
        ``"energy_" + "_".join(sites)``).
    sampler : sampler, optional
        Draws from the tilted prior (default: :class:`~tilted_priors.pyro.EnergyTilted`'s).

    Raises
    ------
    TypeError, ValueError
        For a non-callable energy, missing or repeated site names, discrete sites, sites with different plate
        shapes, or a joint tilt used as a context manager.

    Examples
    --------
    A double-well prior on a regression coefficient written with an ordinary ``Normal``:

    >>> import torch, pyro, pyro.distributions as dist
    >>> from tilted_priors.pyro import MALA
    >>> def model():
    ...     pyro.sample("w", dist.Normal(0.0, 2.0))
    >>> double_well = lambda v: (v["w"] ** 2 - 1.0) ** 2
    >>> tr = pyro.poutine.trace(tilt(model, double_well, "w", sampler=MALA(100, 0.1))).get_trace()
    >>> tr.nodes["w"]["value"].shape, float(tr.nodes["w"]["fn"].log_prob(torch.tensor(1.0)).detach()) == float(
    ...     tr.nodes["w"]["fn"].log_prob(torch.tensor(-1.0)).detach())
    (torch.Size([]), True)
    """

    def __init__(self, fn: Callable | None = None, energy: Callable | None = None, sites=None, *, normalizer=None,
                 sampler=None, name: str | None = None):
        names = tilt_arguments(fn, energy, sites, normalizer, sampler, name)
        self.name = "energy_" + "_".join(names) if name is None else name
        self.energy, self.sites = energy, names
        self.normalizer, self.sampler = normalizer, sampler
        self.fn = fn
        self._args: tuple = ((), {})
        self._warned_missing = False  # a site the model never samples is reported once per tilt
        super().__init__()
        self._reset()

    def _reset(self):
        self._seen: dict = {}
        self._layouts: list = []
        self._drawn: dict = {}
        self._event_ndims: dict = {}
        self._run_energy = None
        self._nesting = 0

    def __call__(self, *args, **kwargs):
        if self.fn is None:  # decorator form
            return super().__call__(*args, **kwargs)
        self._args = (args, kwargs)
        with self:
            out = self.fn(*args, **kwargs)
        if not self._warned_missing:
            self._warned_missing = warn_missing_sites(self.sites, self._seen)
        return out

    def __enter__(self):
        self._reset()
        return super().__enter__()

    # --- messages ---------------------------------------------------------------------------------------
    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] not in self.sites:
            return
        name, fn = msg["name"], msg["fn"]
        self._event_ndims[name] = len(fn.event_shape)
        energy = self._energy_fn()
        if len(self.sites) == 1:
            msg["fn"] = _one_site(fn, name, energy, self.normalizer, self.sampler)
            return
        layout = _Layout(name, fn)
        if self._layouts and layout.batch != self._layouts[0].batch:
            raise ValueError(f"tilt(): the sites of a joint tilt must have the same plate (batch) shape: "
                             f"{self._layouts[0].name!r} has {self._layouts[0].batch}, {name!r} has {layout.batch}; "
                             "tilt them separately or put them in the same plates")
        self._layouts.append(layout)
        self._note_nesting(msg, layout)
        if len(self._layouts) == 1:
            msg["fn"] = _JointFirst(fn, self)
        elif len(self._layouts) < len(self.sites):
            msg["fn"] = _Given(fn, self._drawn.get(name))
        else:
            msg["fn"] = self._last(fn, name)

    def _note_nesting(self, msg, layout):
        dims = [-f.dim for f in msg.get("cond_indep_stack", ()) if f.dim is not None]
        self._nesting = max([self._nesting, len(layout.batch)] + dims)

    def _postprocess_message(self, msg):
        if msg["type"] == "sample":
            self._seen[msg["name"]] = msg["value"]
            dims = [-f.dim for f in msg.get("cond_indep_stack", ()) if f.dim is not None]
            self._nesting = max([self._nesting] + dims)

    def _energy_fn(self):
        """This run's energy: the user's function, or the network registered (once per run) with the model."""
        if self._run_energy is None:
            if isinstance(self.energy, torch.nn.Module):
                self._run_energy = _ModuleEnergy(register_module(self.name, self.energy), self.sites,
                                                 self._event_ndims)
            else:
                self._run_energy = self.energy
        return self._run_energy

    # --- joint tilts ------------------------------------------------------------------------------------
    def _spec(self, layouts, names) -> _Spec:
        args, kwargs = self._args
        return _Spec(self.fn, args, kwargs, layouts, names, self._seen, self._nesting + 2)

    def _joint(self, layouts) -> EnergyTilted:
        spec = self._spec(layouts, [layout.name for layout in layouts])
        return EnergyTilted(_Energy(self._energy_fn(), layouts), _JointBase(spec, layouts[0].batch),
                            normalizer=self.normalizer, sampler=self.sampler)

    def _joint_draw(self):
        """Draw all tilted sites jointly (at the first one); keep the others' values for when they come."""
        first = self._layouts[0]
        sites = self._spec([], self.sites).run(1)
        layouts = [first]
        for name in sites:
            self._event_ndims.setdefault(name, len(sites[name]["fn"].event_shape))
            if name != first.name:
                layout = _Layout(name, sites[name]["fn"])
                if _strip(layout.batch[-self._nesting:] if self._nesting else ()) != _strip(first.batch):
                    raise ValueError(f"tilt(): the sites of a joint tilt must have the same plate (batch) shape: "
                                     f"{first.name!r} has {first.batch}, {name!r} has "
                                     f"{_strip(layout.batch[-self._nesting:] if self._nesting else ())}; "
                                     "tilt them separately or put them in the same plates")
                layouts.append(layout)
        flat = self._joint(layouts).sample()
        values = _Energy(None, layouts).values(flat)
        self._drawn = {k: v for k, v in values.items() if k != first.name}
        return values[first.name]

    def _last(self, fn, name):
        layouts = list(self._layouts)
        earlier = {layout.name: self._seen[layout.name] for layout in layouts[:-1]}
        given = self._drawn.get(name)
        if given is not None and any(self._drawn.get(k, v) is not v for k, v in earlier.items()):
            given = None  # an earlier site's value was given (a guide, MCMC): draw this one conditionally
        conditional = None if given is not None else _one_site(fn, name, self._energy_fn(), self.normalizer,
                                                               self.sampler, fixed=earlier)
        return _JointLast(fn, self._joint(layouts), given, earlier, conditional)
