"""The amortised guide: a diagonal-Gaussian encoder at each latent site of a NumPyro model (NumPyro).

:class:`AmortizedGuide` (exported by :mod:`tilted_priors.inference.numpyro.guides`) and what the mixture guides
share with it: the model's latent sites as :class:`Site`, and :func:`loc_scale` of an encoder's Normal.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro import handlers
from numpyro.contrib.module import nnx_module

from tilted_priors.inference.numpyro._log_joint import BaseDraws, is_real
from tilted_priors.inference.numpyro.handlers import normalizer, sampler
from tilted_priors._compat import numpyro_handler_stack
from tilted_priors._validation import check_encoder_sites, check_site_names
from tilted_priors.numpyro import Unnormalized
from tilted_priors.numpyro.samplers import _is_array, _is_concrete

__all__ = ["AmortizedGuide", "Site", "loc_scale"]


class _Frame(NamedTuple):
    """A plate a latent site sits in, as the model entered it (static: plain Python values)."""

    name: str
    dim: int
    size: int
    subsample_size: int


class Site(NamedTuple):
    """What a guide needs to know of one latent site of the model (static: no arrays, so no tracers)."""

    name: str
    shape: tuple
    event_dim: int
    frames: tuple  # of _Frame, innermost first (the site's cond_indep_stack)
    support: str | None  # the support when it is not the real line, else None


def _latent_site_structure(trace: dict) -> dict:
    """The latent sample sites of a model trace, in the model's order, as :class:`Site`."""
    plates = {name: site["args"] for name, site in trace.items() if site["type"] == "plate"}
    sites = {}
    for name, site in trace.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        frames = []
        for frame in site["cond_indep_stack"]:
            size, subsample_size = plates.get(frame.name, (frame.size, frame.size))
            subsample_size = size if subsample_size is None else subsample_size
            frames.append(_Frame(frame.name, int(frame.dim), int(size), int(subsample_size)))
        fn = site["fn"]
        sites[name] = Site(name, tuple(jnp.shape(site["value"])), int(fn.event_dim), tuple(frames),
                            None if is_real(fn.support) else str(fn.support))
    return sites


_STRUCTURE_CACHE_SIZE = 32
# What an abstract trace raises where a model needs its arguments' values (e.g. a plate sized by an array's value).
_NEEDS_VALUES = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                 jax.errors.TracerIntegerConversionError, jax.errors.NonConcreteBooleanIndexError)


class AmortizedGuide:
    r"""Amortised diagonal-Gaussian guide (a VAE encoder) for the latent sites of a NumPyro model.

    For each covered latent site :math:`z` the encoder maps the model's arguments (the data :math:`x`) to a mean and
    a scale, and the guide samples (reparameterised)

    .. math:: q_\phi(z \mid x) = \mathcal N\bigl(z;\ \mu_\phi(x),\ \operatorname{diag}\sigma_\phi(x)^2\bigr)

    inside the plates the model put the site in, with the site's event dimensions. ``Trace_ELBO`` with this guide
    estimates, for a prior :math:`p(z) = e^{-E(z)}\mathcal N(z)/Z` and one sample :math:`z \sim q_\phi`,

    .. math:: \mathcal L(x) = \mathbb E_{q_\phi}\bigl[\log p(x \mid z) - E(z) + \log\mathcal N(z)
              - \text{term} - \log q_\phi(z \mid x)\bigr],

    where ``term`` is what the prior's normalizer subtracts for :math:`\log Z`. With
    :class:`~tilted_priors.numpyro.SelfNormalized`, :math:`\text{term} = b + e^{-b}\hat Z - 1 \ge \log Z`
    (:math:`\hat Z` unbiased), so :math:`\mathcal L` is the SNELBO: an unbiased estimate of a lower bound of the ELBO
    (equal to it at :math:`b = \log Z`), itself a lower bound of :math:`\log p(x)`; maximising it over :math:`b`
    drives :math:`b \to \log Z` (Senetaire et al.).

    On each call the guide reads the covered sites' shapes, plates, event dimensions and supports from a trace of
    the model made with :func:`jax.eval_shape` (no arithmetic runs; every tilted prior's sampler swapped for its
    base draws and its normalizer switched off, so no chain is traced), cached per structure of the arguments
    (shapes, dtypes and non-array values); it then calls the encoder and samples each site. Under ``jit`` (SVI's
    update) that costs nothing per step.

    Parameters
    ----------
    model : callable
        The NumPyro model; the guide is called with the model's arguments.
    encoder : flax.nnx.Module or callable
        Called with the model's arguments and keywords; returns ``(loc, scale)`` for one site or a dict
        ``{site: (loc, scale)}`` for several. ``loc`` and ``scale`` have the site's shape (batch and event); along a
        subsampled plate they may instead have the plate's full size, and the guide takes the subsample's rows.
        ``scale`` must be positive (end its head with ``jax.nn.softplus`` or ``jnp.exp``). A Flax NNX module is
        registered on each call with :func:`numpyro.contrib.module.nnx_module` as the param site
        ``"<name>$params"``, which ``SVI`` trains; any other callable is called as it is (parameters it declares
        with ``numpyro.param`` are the guide's).
    sites : str or sequence of str, optional
        The latent sites the guide covers: by default the keys of the encoder's dict, or the model's single latent
        site. Every latent site of the model must be covered (SVI would otherwise draw it from the prior, with no
        :math:`\log q`), and each must be real-valued.
    name : str
        Name of the encoder's param site (keep it distinct from the model's modules).

    Raises
    ------
    ValueError
        On the first call, when a latent site is not covered or not real-valued, when ``sites`` names a site that
        is not latent, when ``loc`` or ``scale`` has the wrong shape, or (outside ``jit``, where values are known)
        when ``scale`` is not positive and finite or ``loc`` is not finite.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    >>> from flax import nnx
    >>> from numpyro.infer import SVI, Trace_ELBO
    >>> from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal, SelfNormalized
    >>> energy = EnergyMLP(2, 8)
    >>> def model(x):
    ...     w = numpyro.param("w", jnp.ones((2, 3)))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         z = numpyro.sample("z", EnergyTiltedNormal(energy, jnp.zeros(2), jnp.ones(2),
    ...                                                    normalizer=SelfNormalized(64, name="b")))
    ...         numpyro.sample("x", dist.Normal(z @ w, 0.5).to_event(1), obs=x)
    >>> class Encoder(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.loc, self.scale = nnx.Linear(3, 2, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.loc(x), jax.nn.softplus(self.scale(x)) + 1e-3
    >>> svi = SVI(model, AmortizedGuide(model, Encoder(nnx.Rngs(0))), optax.adam(1e-2), Trace_ELBO())
    >>> state = svi.init(jax.random.PRNGKey(0), jnp.ones((8, 3)))
    >>> state, loss = svi.update(state, jnp.ones((8, 3)))
    >>> sorted(svi.get_params(state)), bool(jnp.isfinite(loss))
    (['b', 'encoder$params', 'w'], True)
    """

    def __init__(self, model: Callable, encoder: Callable, sites: str | Sequence[str] | None = None, *,
                 name: str = "encoder"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not callable(encoder):
            raise TypeError(f"encoder must be a Flax NNX module or a callable returning (loc, scale), got "
                            f"{type(encoder).__name__}")
        sites = check_site_names(sites)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.model = model
        self.encoder = encoder
        self.sites = sites
        self.name = name
        self._structures: dict = {}

    # --- the model's latent sites ------------------------------------------------------------------------------
    def _model_sites(self, args: tuple, kwargs: dict) -> dict:
        """``{name: Site}`` for the model's latent sites, from an abstract trace (cached per argument structure)."""
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        is_array = [_is_array(leaf) for leaf in leaves]
        try:
            cache_key = (treedef, tuple((jnp.shape(leaf), str(leaf.dtype)) if array else leaf
                                        for leaf, array in zip(leaves, is_array)))
            hash(cache_key)
        except TypeError:  # an unhashable non-array argument: trace every call
            cache_key = None
        if cache_key is not None and cache_key in self._structures:
            return self._structures[cache_key]

        # Only shapes and plates are read: base draws instead of the tilted priors' chains, no normalizer.
        model = normalizer(sampler(self.model, BaseDraws()), Unnormalized())
        found: dict = {}

        def structure(arrays):
            arrays = iter(arrays)
            full = [next(arrays) if array else leaf for leaf, array in zip(leaves, is_array)]
            model_args, model_kwargs = jax.tree_util.tree_unflatten(treedef, full)
            # block: none of this reaches the guide's own trace (or SVI's); the inner seed answers every key request.
            with handlers.block():
                trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*model_args, **model_kwargs)
            found.update(_latent_site_structure(trace))

        abstract = [jax.ShapeDtypeStruct(jnp.shape(leaf), leaf.dtype)
                    for leaf, array in zip(leaves, is_array) if array]
        try:
            jax.eval_shape(structure, abstract)
        except _NEEDS_VALUES:
            if not all(_is_concrete(leaf) for leaf in leaves):
                raise
            # The model's structure depends on its arguments' values (possible outside jit only): trace it with
            # them, and do not cache by shapes.
            found.clear()
            structure([leaf for leaf, array in zip(leaves, is_array) if array])
            return found
        if cache_key is not None:
            if len(self._structures) >= _STRUCTURE_CACHE_SIZE:
                self._structures.clear()
            self._structures[cache_key] = found
        return found

    def _encode(self, args: tuple, kwargs: dict):
        encoder = nnx_module(self.name, self.encoder) if isinstance(self.encoder, nnx.Module) else self.encoder
        return encoder(*args, **kwargs)

    def _resolve(self, latent: dict, out) -> dict:
        """The encoder's output as ``{site: (loc, scale)}``, checked against the model's latent sites."""
        if not latent:
            raise ValueError("AmortizedGuide found no latent sample site in the model")
        if isinstance(out, Mapping):
            out = dict(out)
            if self.sites is not None and set(out) != set(self.sites):
                raise ValueError(f"AmortizedGuide covers the sites {list(self.sites)}, but the encoder returned "
                                 f"(loc, scale) for {list(out)}")
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            if self.sites is None:
                if len(latent) != 1:
                    raise ValueError(f"AmortizedGuide: the model has the latent sites {list(latent)}, but the "
                                     "encoder returned a single (loc, scale): return a dict {site: (loc, scale)} "
                                     "(or pass sites=[...] to name the one site it covers)")
                sites = tuple(latent)
            elif len(self.sites) != 1:
                raise ValueError(f"AmortizedGuide covers the sites {list(self.sites)}: the encoder must return a "
                                 "dict {site: (loc, scale)}, not a single (loc, scale)")
            else:
                sites = self.sites
            out = {sites[0]: out}
        else:
            raise TypeError("the encoder must return (loc, scale) or a dict {site: (loc, scale)}, got "
                            f"{type(out).__name__}")
        check_encoder_sites(out, latent)
        for name, pair in out.items():
            if latent[name].support is not None:
                raise ValueError(f"AmortizedGuide places a Normal at each site, but site {name!r} has support "
                                 f"{latent[name].support}; reparameterise it onto the real line (e.g. sample its "
                                 "logarithm, or use numpyro.infer.reparam.TransformReparam)")
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"the encoder must give a pair (loc, scale) for site {name!r}, got "
                                f"{type(pair).__name__}")
        return out

    @staticmethod
    def _check(site: Site, loc, scale) -> None:
        full = list(site.shape)
        batch_ndim = len(site.shape) - site.event_dim
        for frame in site.frames:
            if frame.subsample_size != frame.size:
                full[batch_ndim + frame.dim] = frame.size
        allowed = {site.shape, tuple(full)}
        for what, value in (("loc", loc), ("scale", scale)):
            if tuple(jnp.shape(value)) not in allowed:
                also = f" (or {tuple(full)}, the full size of its subsampled plates)" if len(allowed) > 1 else ""
                raise ValueError(f"AmortizedGuide: the encoder's {what} for site {site.name!r} has shape "
                                 f"{tuple(jnp.shape(value))}, but the site has shape {site.shape}{also}: batch "
                                 f"(plates) then event ({site.event_dim} dims)")
        # Values are checked where they are known (NumPy, so that no operation is staged into an outer jit).
        if _is_concrete(scale) and not np.all(np.isfinite(np.asarray(scale)) & (np.asarray(scale) > 0)):
            raise ValueError(f"AmortizedGuide: the encoder's scale for site {site.name!r} must be positive and "
                             f"finite, got min {float(np.min(np.asarray(scale))):g}; end its scale head with "
                             "jax.nn.softplus(...) (plus a small floor) or jnp.exp(...)")
        if _is_concrete(loc) and not np.all(np.isfinite(np.asarray(loc))):
            raise ValueError(f"AmortizedGuide: the encoder's loc for site {site.name!r} must be finite, got nan or "
                             "inf")

    @staticmethod
    def _sample(site: Site, loc, scale, indices: dict):
        """``numpyro.sample(name, Normal(loc, scale).to_event(event_dim))`` inside the site's plates."""
        batch_ndim = len(site.shape) - site.event_dim
        with ExitStack() as stack:
            for frame in reversed(site.frames):  # outermost first, as the model entered them
                if frame.subsample_size != frame.size and frame.name in indices:
                    # a subsampled plate entered again: the same subsample (the model replays the last one)
                    with handlers.substitute(data={frame.name: indices[frame.name]}):
                        plate = numpyro.plate(frame.name, frame.size, frame.subsample_size, dim=frame.dim)
                else:
                    plate = numpyro.plate(frame.name, frame.size, frame.subsample_size, dim=frame.dim)
                indices[frame.name] = idx = stack.enter_context(plate)
                if frame.subsample_size != frame.size:
                    axis = batch_ndim + frame.dim
                    if jnp.shape(loc)[axis] == frame.size:
                        loc = jnp.take(loc, idx, axis=axis)
                    if jnp.shape(scale)[axis] == frame.size:
                        scale = jnp.take(scale, idx, axis=axis)
            return numpyro.sample(site.name, dist.Normal(loc, scale).to_event(site.event_dim))

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        """Sample every latent site of the model from the encoder's Gaussians; returns ``{site: value}``."""
        if not numpyro_handler_stack():
            raise ValueError("AmortizedGuide draws random numbers: run it inside numpyro.handlers.seed "
                             "(SVI and Predictive do this)")
        latent = self._model_sites(args, kwargs)
        out = self._resolve(latent, self._encode(args, kwargs))
        indices: dict = {}
        result = {}
        for name in latent:  # the model's order
            site = latent[name]
            loc, scale = (jnp.asarray(v) for v in out[name])
            self._check(site, loc, scale)
            result[name] = self._sample(site, loc, scale, indices)
        return result

    def __repr__(self) -> str:
        return f"AmortizedGuide(encoder={type(self.encoder).__name__}, sites={self.sites!r}, name={self.name!r})"


def loc_scale(fn) -> tuple | None:
    """``(loc, scale)`` of a (possibly ``Independent``) Normal, else ``None``."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return (fn.loc, fn.scale) if isinstance(fn, dist.Normal) else None
