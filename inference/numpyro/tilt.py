r"""Tilt any sample site(s) of a NumPyro model by an energy: the effect handler :class:`tilt`.

.. math:: p(z_1, \dots, z_k \mid \text{rest}) = \frac1Z\, e^{-E(z_1, \dots, z_k)} \prod_{i=1}^k p_i(z_i \mid \text{parents}_i)

The model is written with ordinary priors (``dist.Normal``, a hierarchical prior, two layers of latents); ``tilt``
multiplies the prior of the named sites by :math:`e^{-E}` without touching the model. ``energy`` takes a dict
``{site: value}`` (values with the sites' shapes) and returns one energy per element of the sites' batch (plate)
shape.

- **One site.** Its distribution is replaced by :class:`~tilted_priors.numpyro.EnergyTilted` of the site's own
  distribution (a one-site tilt of ``Normal(loc, scale).to_event(1)`` *is* ``EnergyTiltedNormal(E, loc, scale)``).
  Sites with event shape other than ``(d,)`` are flattened for the chains and shaped back; sites with constrained
  support (``HalfNormal``, ``Dirichlet``, ...) are tilted in the unconstrained space of their bijection
  (``biject_to(support)``): the chains run on :math:`u = T^{-1}(z)` with base density :math:`q(T(u))|T'(u)|`, and
  the site's density is the exact tilted density :math:`e^{-E(z)} q(z) / Z` in its own space.
- **Several sites** share one energy (a joint tilt, e.g. the joint latent-space prior of a two-layer generator).
  The sites must have the same batch (plate) shape. Their own distributions stay in the trace; a term
  :math:`-E(z_1..z_k) - \log Z` is added to the last site's ``log_prob``, so the model's joint density is the tilted
  one. The joint base :math:`\prod_i p_i(z_i \mid \text{parents}_i)` is evaluated by running the model again (hidden
  from all outer handlers, vectorised with :func:`jax.vmap`, stopped after the last tilted site), conditioned on
  the values of everything sampled before it in the current run. Prior draws (``Predictive``, ``init_to_sample``)
  are joint draws of all the tilted sites by the sampler; when the first site's value is given (a guide, MCMC) and
  the last one is not, the last one is drawn from its tilted conditional.

The normalizer and sampler work as for :class:`~tilted_priors.numpyro.EnergyTilted` (default
:class:`~tilted_priors.numpyro.Contrastive` and the default short-run sampler), and the handlers
:class:`~tilted_priors.inference.numpyro.handlers.normalizer` / ``sampler`` placed *outside* ``tilt`` change them.
Tilts nest: ``tilt(tilt(model, E1, "a"), E2, "b")``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.distributions import Distribution, TransformedDistribution, constraints
from numpyro.distributions.transforms import ComposeTransform, ReshapeTransform, biject_to
from numpyro.primitives import Messenger

from flax import nnx

from tilted_priors.inference._wrappers import energy_call_error, tilt_arguments, warn_missing_sites
from tilted_priors.inference.numpyro.modules import register_module
from tilted_priors.numpyro import MALA, EnergyTilted

__all__ = ["tilt"]


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class _Layout:
    """How a site's value maps to the flat unconstrained vector the chains run on, and back."""

    def __init__(self, name: str, fn: Distribution):
        if fn.support.is_discrete:
            raise TypeError(f"tilt(): site {name!r} is discrete ({type(fn).__name__}); only sites with continuous "
                            "support can be tilted (the chains are Langevin dynamics)")
        self.name = name
        self.transform = None if _is_real(fn.support) else biject_to(fn.support)
        u = fn if self.transform is None else TransformedDistribution(fn, self.transform.inv)
        self.u_event = tuple(u.event_shape)
        self.batch = tuple(fn.batch_shape)
        self.dim = int(math.prod(self.u_event))
        self.unconstrained = u

    def flat_base(self) -> Distribution:
        u = self.unconstrained
        return u if len(self.u_event) == 1 else TransformedDistribution(u, ReshapeTransform((self.dim,), self.u_event))

    def to_site(self):
        """Transform from the flat vector to the site's value (``None`` for the identity)."""
        parts = []
        if len(self.u_event) != 1:
            parts.append(ReshapeTransform(self.u_event, (self.dim,)))
        if self.transform is not None:
            parts.append(self.transform)
        return None if not parts else parts[0] if len(parts) == 1 else ComposeTransform(parts)

    def value(self, flat):
        t = self.to_site()
        return flat if t is None else t(flat)

    def flat(self, value):
        u = value if self.transform is None else self.transform.inv(value)
        lead = jnp.shape(u)[:jnp.ndim(u) - len(self.u_event)]
        return jnp.reshape(u, lead + (self.dim,))

    def log_det(self, flat):
        """:math:`\\log|\\det \\partial z / \\partial u|` summed over the event (0 without a transform)."""
        if self.transform is None:
            return 0.0
        u = jnp.reshape(flat, jnp.shape(flat)[:-1] + self.u_event)
        ladj = self.transform.log_abs_det_jacobian(u, self.transform(u))
        extra = jnp.ndim(ladj) - (jnp.ndim(u) - len(self.u_event))
        return jnp.sum(ladj, tuple(range(-extra, 0))) if extra > 0 else ladj


class _Energy:
    """The user's energy of ``{site: value}`` as a function of the flat vector (concatenated over sites)."""

    def __init__(self, energy: Callable, layouts: Sequence[_Layout], fixed: dict | None = None):
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
            e = self.energy(values)
        except (KeyError, TypeError) as err:  # say what the energy is given (a dict of the sites' values)
            error = energy_call_error(err, values)
            if error is err:
                raise
            raise error from err
        expected = jnp.shape(flat)[:-1]
        if jnp.shape(e) != expected:
            try:
                e = jnp.broadcast_to(e, expected)
            except ValueError:
                raise ValueError(f"tilt(): the energy returned shape {jnp.shape(e)} for values of batch shape "
                                 f"{expected}: it must return one energy per draw and plate element") from None
        return e


class _ModuleEnergy:
    """A network's energy of the concatenated, flattened site values, in the order of ``sites``."""

    def __init__(self, module, sites, event_ndims: dict):
        self.module, self.sites, self.event_ndims = module, tuple(sites), event_ndims

    def __call__(self, values: dict):
        parts = []
        for name in self.sites:
            v = values[name]
            parts.append(jnp.reshape(v, jnp.shape(v)[:jnp.ndim(v) - self.event_ndims[name]] + (-1,)))
        lead = jnp.broadcast_shapes(*[jnp.shape(p)[:-1] for p in parts])
        return self.module(jnp.concatenate([jnp.broadcast_to(p, lead + jnp.shape(p)[-1:]) for p in parts], -1))


class _Stop(Exception):
    pass


class _StopAfter(Messenger):
    """Record the tilted sites of a nested run and stop the model after the last one."""

    def __init__(self, names):
        super().__init__()
        self.names, self.sites = set(names), {}

    def postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.names:
            self.sites[msg["name"]] = msg
            if len(self.sites) == len(self.names):
                raise _Stop


class _Spec:
    """What the nested runs of a joint tilt need: the model, its arguments, the values seen so far."""

    def __init__(self, model, args, kwargs, layouts, seen, params, names=None):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.layouts, self.seen, self.params = tuple(layouts), dict(seen), dict(params)
        self.names = tuple(layout.name for layout in layouts) if names is None else tuple(names)

    def run(self, rng_key, values=None) -> dict:
        model = handlers.substitute(self.model, data=self.params)
        data = {k: v for k, v in self.seen.items() if k not in self.names}
        data.update(values or {})
        model = handlers.seed(handlers.condition(model, data=data), rng_key)
        stopper = _StopAfter(self.names)
        with handlers.block(), stopper:
            try:
                model(*self.args, **self.kwargs)
            except _Stop:
                pass
        missing = set(self.names) - set(stopper.sites)
        if missing:
            raise ValueError(f"tilt(): the model did not sample the site(s) {sorted(missing)} when run again")
        return stopper.sites


class _JointBase(Distribution):
    r"""The joint base :math:`\prod_i p_i(z_i \mid \text{parents}_i)` on the flat unconstrained vector."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    pytree_data_fields = ()
    pytree_aux_fields = ("spec",)

    def __init__(self, spec: _Spec, batch_shape):
        self.spec = spec
        dim = sum(layout.dim for layout in spec.layouts)
        super().__init__(tuple(batch_shape), (dim,), validate_args=False)

    def sample(self, key, sample_shape=()):
        n = int(math.prod(sample_shape))

        def one(k):
            sites = self.spec.run(k)
            return jnp.concatenate([lay.flat(sites[lay.name]["value"]) for lay in self.spec.layouts], -1)

        draws = jax.vmap(one)(jax.random.split(key, n))
        return jnp.reshape(draws, tuple(sample_shape) + tuple(self.batch_shape) + tuple(self.event_shape))

    def log_prob(self, value):
        batch, d = tuple(self.batch_shape), self.event_shape[0]
        lead = jnp.shape(value)[:jnp.ndim(value) - len(batch) - 1]
        flat = jnp.reshape(jnp.broadcast_to(value, lead + batch + (d,)), (-1,) + batch + (d,))
        energy = _Energy(None, self.spec.layouts)

        def one(x):
            values = energy.values(x)
            sites = self.spec.run(jax.random.PRNGKey(0), values)
            total, start = 0.0, 0
            for layout in self.spec.layouts:
                fn = sites[layout.name]["fn"]
                total = total + fn.log_prob(values[layout.name]) + layout.log_det(x[..., start:start + layout.dim])
                start += layout.dim
            return jnp.broadcast_to(total, batch)

        return jnp.reshape(jax.vmap(one)(flat), lead + batch)


class _Given(Distribution):
    """A site's own distribution whose draw is already known (the joint draw made at the first tilted site)."""

    pytree_data_fields = ("base_dist", "given")

    def __init__(self, base_dist, given):
        self.base_dist, self.given = base_dist, given
        super().__init__(tuple(base_dist.batch_shape), tuple(base_dist.event_shape), validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    def sample(self, key, sample_shape=()):
        if self.given is None:
            raise NotImplementedError(
                "tilt(): a middle site of a joint tilt of more than two sites has no value: give the values of "
                "all or none of the tilted sites (a guide over all of them, or prior draws)")
        if not tuple(sample_shape):
            return self.given
        return jnp.broadcast_to(self.given, tuple(sample_shape) + jnp.shape(self.given))

    def log_prob(self, value):
        return self.base_dist.log_prob(value)


class _JointFirst(_Given):
    """The first tilted site: its own density; a draw makes the joint draw of all the tilted sites."""

    pytree_aux_fields = ("handler",)

    def __init__(self, base_dist, handler: "tilt"):
        self.handler = handler
        super().__init__(base_dist, None)

    def sample(self, key, sample_shape=()):
        if tuple(sample_shape):
            raise ValueError("tilt(): the first site of a joint tilt draws one joint sample per model run "
                             "(use a plate or Predictive(num_samples=...) for more)")
        return self.handler._joint_draw(key)


def _flat_values(layouts, values):
    parts = [layout.flat(values[layout.name]) for layout in layouts]
    lead = jnp.broadcast_shapes(*[jnp.shape(p)[:-1] for p in parts])
    return jnp.concatenate([jnp.broadcast_to(p, lead + jnp.shape(p)[-1:]) for p in parts], -1)


class _JointLast(Distribution):
    r"""The last tilted site: its own density plus :math:`-E(z_1..z_k) - \log Z` of the joint tilt.

    ``base_dist`` is the joint :class:`~tilted_priors.numpyro.EnergyTilted` (so that ``find_tilted`` and the
    ``normalizer`` / ``sampler`` handlers reach it); ``site_dist`` is the site's own distribution.
    """

    pytree_data_fields = ("site_dist", "base_dist", "given", "earlier", "conditional")

    def __init__(self, site_dist, joint: EnergyTilted, given, earlier: dict, conditional):
        self.site_dist, self.base_dist, self.given = site_dist, joint, given
        self.earlier, self.conditional = earlier, conditional
        super().__init__(tuple(site_dist.batch_shape), tuple(site_dist.event_shape), validate_args=False)

    @property
    def support(self):
        return self.site_dist.support

    def sample(self, key, sample_shape=()):
        if self.given is not None:
            return _Given.sample(self, key, sample_shape)
        return self.conditional.sample(key, sample_shape)

    def log_prob(self, value):
        joint = self.base_dist
        layouts = joint.base.spec.layouts
        flat = _flat_values(layouts, {**self.earlier, layouts[-1].name: value})
        return self.site_dist.log_prob(value) - joint._energy(flat) - joint.log_normalizer()


def _one_site(fn: Distribution, name: str, energy: Callable, normalizer, sampler, fixed=None) -> Distribution:
    layout = _Layout(name, fn)
    if sampler is None and layout.transform is not None:
        # In the unconstrained space of a bijection the curvature varies by orders of magnitude (exp, softplus):
        # the Metropolis test keeps the chains exact where a fixed unadjusted step would overshoot.
        sampler = MALA(100, "auto")
    tilted = EnergyTilted(_Energy(energy, [layout], fixed), layout.flat_base(), normalizer=normalizer,
                          sampler=sampler)
    to_site = layout.to_site()
    return tilted if to_site is None else TransformedDistribution(tilted, to_site)


class tilt(Messenger):
    r"""Tilt the prior of the named sample sites of any model by an energy.

    .. math:: p(z_1..z_k \mid \cdot) \propto e^{-E(\{z_i\})} \prod_i p_i(z_i \mid \text{parents}_i)

    Parameters
    ----------
    fn : callable, optional
        The model. ``None`` for a context manager (one site only: a joint tilt re-runs the model).
    energy : callable or network
        :math:`E`: a function of ``{site: value}`` (values with the sites' own shapes, plus leading dims for
        chains) returning one energy per draw and plate element (the sites' batch shape); or a Flax NNX module (e.g. :class:`~tilted_priors.numpyro.EnergyMLP`) taking the
        sites' values flattened and concatenated in the order of ``sites`` (``(..., d_total) -> (...)``), which
        ``tilt`` registers with the model at every run (``register_module(name, energy)``), so ``SVI`` / ``fit`` train it.
    sites : str or sequence of str
        The sample sites to tilt. Continuous support (constrained ones through ``biject_to``); several sites need
        the same plate (batch) shape.
    normalizer : normalizer, optional
        What the tilted density subtracts for :math:`\log Z` (default
        :class:`~tilted_priors.numpyro.Contrastive`; see :class:`~tilted_priors.numpyro.EnergyTilted`).
    name : str, optional
        When ``energy`` is a network, the name it is registered under at every run of the model (default
        ``"energy_" + "_".join(sites)``).
    sampler : sampler, optional
        Draws from the tilted prior (default: :class:`~tilted_priors.numpyro.EnergyTilted`'s).

    Raises
    ------
    TypeError, ValueError
        For a non-callable energy, missing or repeated site names, discrete sites, sites with different plate
        shapes, or a joint tilt used as a context manager.

    Examples
    --------
    A double-well prior on a regression coefficient written with an ordinary ``Normal``:

    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro import handlers
    >>> from tilted_priors.numpyro import MALA
    >>> def model():
    ...     numpyro.sample("w", dist.Normal(0.0, 2.0))
    >>> double_well = lambda v: (v["w"] ** 2 - 1.0) ** 2
    >>> tr = handlers.trace(handlers.seed(tilt(model, double_well, "w", sampler=MALA(100, 0.1)), 0)).get_trace()
    >>> tr["w"]["value"].shape, float(tr["w"]["fn"].log_prob(1.0)) == float(tr["w"]["fn"].log_prob(-1.0))
    ((), True)
    """

    def __init__(self, fn: Callable | None = None, energy: Callable | None = None, sites=None, *, normalizer=None,
                 sampler=None, name: str | None = None):
        names = tilt_arguments(fn, energy, sites, normalizer, sampler, name)
        self.name = "energy_" + "_".join(names) if name is None else name
        self.energy, self.sites = energy, names
        self.normalizer, self.sampler = normalizer, sampler
        self._args: tuple = ((), {})
        self._warned_missing = False  # a site the model never samples is reported once per tilt
        super().__init__(fn)
        self._reset()

    def _reset(self):
        self._seen: dict = {}
        self._params: dict = {}
        self._layouts: list = []
        self._drawn: dict = {}
        self._event_ndims: dict = {}
        self._run_energy = None

    def __call__(self, *args, **kwargs):
        self._args = (args, kwargs)
        out = super().__call__(*args, **kwargs)
        if not self._warned_missing:
            self._warned_missing = warn_missing_sites(self.sites, self._seen)
        return out

    def __enter__(self):
        self._reset()
        return super().__enter__()

    # --- messages ---------------------------------------------------------------------------------------
    def process_message(self, msg):
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
        if len(self._layouts) == 1:
            msg["fn"] = _JointFirst(fn, self)
        elif len(self._layouts) < len(self.sites):
            msg["fn"] = _Given(fn, self._drawn.get(name))
        else:
            msg["fn"] = self._last(fn, name)

    def postprocess_message(self, msg):
        if msg["type"] == "param":
            self._params[msg["name"]] = msg["value"]
        elif msg["type"] == "sample":
            self._seen[msg["name"]] = msg["value"]

    def _energy_fn(self):
        """This run's energy: the user's function, or the network registered (once per run) with the model."""
        if self._run_energy is None:
            if isinstance(self.energy, nnx.Module):
                self._run_energy = _ModuleEnergy(register_module(self.name, self.energy), self.sites,
                                                 self._event_ndims)
            else:
                self._run_energy = self.energy
        return self._run_energy

    # --- joint tilts ------------------------------------------------------------------------------------
    def _joint(self, layouts) -> EnergyTilted:
        args, kwargs = self._args
        spec = _Spec(self.fn, args, kwargs, layouts, self._seen, self._params)
        return EnergyTilted(_Energy(self._energy_fn(), layouts), _JointBase(spec, layouts[0].batch),
                            normalizer=self.normalizer, sampler=self.sampler)

    def _joint_draw(self, key):
        """Draw all tilted sites jointly (at the first one); keep the others' values for when they come."""
        key_sites, key_draw = jax.random.split(key)
        layouts = self._discover_layouts(key_sites)
        flat = self._joint(layouts).sample(key_draw)
        values = _Energy(None, layouts).values(flat)
        first = layouts[0].name
        self._drawn = {k: v for k, v in values.items() if k != first}
        return values[first]

    def _discover_layouts(self, key) -> list:
        """The layouts of all tilted sites, from a nested run (the later sites have not been reached yet)."""
        first = self._layouts[0]
        args, kwargs = self._args
        spec = _Spec(self.fn, args, kwargs, [], self._seen, self._params, names=self.sites)
        sites = spec.run(key)
        layouts = [first] + [_Layout(n, sites[n]["fn"]) for n in sites if n != first.name]
        for n in sites:
            self._event_ndims.setdefault(n, len(sites[n]["fn"].event_shape))
        for layout in layouts[1:]:
            if layout.batch != first.batch:
                raise ValueError(f"tilt(): the sites of a joint tilt must have the same plate (batch) shape: "
                                 f"{first.name!r} has {first.batch}, {layout.name!r} has {layout.batch}; "
                                 "tilt them separately or put them in the same plates")
        return layouts

    def _last(self, fn, name):
        layouts = list(self._layouts)
        earlier = {layout.name: self._seen[layout.name] for layout in layouts[:-1]}
        given = self._drawn.get(name)
        if given is not None and any(self._drawn.get(k, v) is not v for k, v in earlier.items()):
            given = None  # an earlier site's value was given (a guide, MCMC): draw this one conditionally
        conditional = None if given is not None else _one_site(fn, name, self._energy_fn(), self.normalizer,
                                                               self.sampler, fixed=earlier)
        return _JointLast(fn, self._joint(layouts), given, earlier, conditional)
