r"""Guides for models with energy-tilted priors (NumPyro).

:class:`ShortRunPosterior` is LEBM's posterior sampler written as a guide: it runs a short Langevin chain on the
model's joint log density over its latent sites and records the result as ``Delta`` sites, so that
``SVI(model, ShortRunPosterior(model), optim, Trace_ELBO())`` takes exactly the LEBM maximum-likelihood step
(Pang et al. 2020). The same class as :class:`tilted_priors.inference.pyro.ShortRunPosterior`, with JAX's rules: the chain is a
:func:`jax.lax.scan` traced into SVI's jitted update (the model is traced once per compilation, not once per
step), randomness comes from the seeded guide (``numpyro.prng_key()``), and persistent chains live in a
``numpyro.mutable`` site, so they travel in SVI's state (and in its checkpoints).

:class:`AmortizedGuide` is the VAE encoder written as a guide: a diagonal Gaussian :math:`q_\phi(z \mid x)` per
latent site whose mean and scale an encoder network computes from the model's arguments. With a
:class:`~tilted_priors.numpyro.SelfNormalized` prior normalizer, ``Trace_ELBO`` then gives the SNELBO (Senetaire
et al.); the same class as :class:`tilted_priors.inference.pyro.AmortizedGuide`.

:class:`RefinedGuide` refines such an encoder's draw by a short Langevin chain on the true posterior (Hoffman 2017):
the model learns from the refined draws, the encoder from its own ELBO; the same class as
:class:`tilted_priors.inference.pyro.RefinedGuide`.
"""
from __future__ import annotations

import itertools
import math
import warnings
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
from numpyro.distributions import constraints
from numpyro.infer.util import compute_log_probs
from numpyro.infer.util import log_density as joint_log_density
from numpyro.primitives import Messenger

from tilted_priors.inference.numpyro.handlers import normalizer, sampler
from tilted_priors import _adapt
from tilted_priors._compat import numpyro_handler_stack
from tilted_priors._validation import check_positive_int
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.numpyro import ShortRunLangevin, Unnormalized
from tilted_priors.numpyro.samplers import _is_array, _is_concrete

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide"]


class _BaseDraws:
    """A sampler that does not move: the tilted site's value is a draw from its base (the "noise" start)."""

    def run(self, rng_key, log_density, init, **kwargs):
        return init

    def __eq__(self, other):
        return type(other) is _BaseDraws

    def __hash__(self):
        return hash(_BaseDraws)


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _prng_key(who: str):
    """A key from the outer ``seed`` handler (SVI's), or an error naming the guide ``who`` that needs it."""
    rng_key = numpyro.prng_key() if numpyro_handler_stack() else None
    if rng_key is None:
        raise ValueError(f"{who} draws random numbers: run it inside numpyro.handlers.seed (SVI and MCMC do this)")
    return rng_key


class ShortRunPosterior:
    r"""Short-run Langevin posterior as a guide (LEBM; Pang et al. 2020).

    On each call it finds the model's latent sites (a trace of the model under the same arguments), starts a chain
    at ``init``, runs ``sampler`` (default ``ShortRunLangevin(steps, step_size)``, ``step_size="auto"``) on the
    **unnormalised** joint log density (every tilted prior's normalizer switched off with
    :func:`~tilted_priors.inference.numpyro.handlers.normalizer`; :math:`\log Z` is constant in :math:`z`), and records the final
    state as ``Delta`` sites (log density 0) inside the model's plates. The samples carry no gradient, as in LEBM.
    The model's parameters are declared in the guide too, so that the chain sees the values SVI is training.

    When every latent site sits in one plate (the data plate), each member of it runs its own chain on its own
    term of the joint, :math:`\log \tilde p(x_i, z_i)` (``per_datum=True``): ULA moves are the same as those of
    one chain on the summed joint (LEBM's), and ``MALA`` accepts or rejects each datum's move on its own. Otherwise
    all latent sites form one chain.

    The default ``step_size="auto"`` scales the chain's step size to the posterior on every call (see
    :class:`~tilted_priors.numpyro.ShortRunLangevin`), so the guide suits models whose latents are not on LEBM's
    scale; pass ``step_size=0.1`` for LEBM's chain. A chain that hardly moves (root-mean-square displacement under
    :math:`10^{-3}` of its starting points' spread: too small a step size) warns once per guide, naming
    ``step_size`` and ``steps`` (under ``jit``, e.g. in ``SVI``, the check runs as a :func:`jax.debug.callback`);
    a chain that diverges eagerly raises :class:`~tilted_priors.ChainDivergenceError` naming the guide and its
    sites.

    Parameters
    ----------
    model : callable
        The NumPyro model; the guide is called with the model's arguments.
    steps, step_size : int, float or "auto"
        Of the default ULA sampler (LEBM: 20 x 0.1; default 20 x ``"auto"``), its loop unrolled when the model
        calls a convolution (``unroll="auto"``, see :class:`~tilted_priors.numpyro.ShortRunLangevin`).
    init : {"noise", "prior", "persistent"} or callable
        ``"noise"``: tilted sites from their base (LEBM), other latents from their prior; ``"prior"``: from the
        prior (the tilted prior's own sampler); a guide: from its sample; ``"persistent"``: per-datum chains
        continued from the previous visit of each datum, kept in the mutable site ``"<name>$chains"``; needs
        ``num_data`` and an ``index`` keyword (the batch's data indices; the model must accept it too).
    sampler : sampler, optional
        Overrides ``steps`` / ``step_size``.
    num_data : int, optional
        Data set size, for ``init="persistent"``.
    per_datum : bool
        One chain per member of the plate all latent sites share (the outermost, if several). This assumes the
        joint factorises over that plate: sites outside it must not depend on its latents (their log density is
        shared out evenly over the chains, which is right only when it is constant in them). ``False``: one
        joint chain (one accept for the whole batch under ``MALA``).
    name : str
        Prefix of the mutable site of persistent chains.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    >>> from numpyro.infer import SVI, Trace_ELBO
    >>> from tilted_priors.numpyro import EnergyTiltedNormal
    >>> def model(x):
    ...     w = numpyro.param("w", jnp.ones(2))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         z = numpyro.sample("z", EnergyTiltedNormal(lambda z: (w * z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2)))
    ...         numpyro.sample("x", dist.Normal(z, 0.3).to_event(1), obs=x)
    >>> svi = SVI(model, ShortRunPosterior(model), optax.adam(1e-3), Trace_ELBO())
    >>> result = svi.run(jax.random.PRNGKey(0), 3, jnp.ones((8, 2)), progress_bar=False)
    >>> result.losses.shape
    (3,)
    """

    def __init__(self, model: Callable, steps: int = 20, step_size: float | str = "auto", init="noise", *,
                 sampler=None, num_data: int | None = None, per_datum: bool = True,
                 name: str = "short_run_posterior"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self._warned = False  # the chain-did-not-move warning is given once per guide
        self._checked = False  # whether the check has run on concrete values
        self.per_datum = bool(per_datum)
        # Unrolled through a convolutional generator (XLA's CPU loop is 4-5x slower), rolled for MLPs (compiles
        # about twice as fast): see ShortRunLangevin's unroll.
        self.sampler = ShortRunLangevin(steps, step_size, unroll="auto") if sampler is None else sampler
        if isinstance(self.sampler, type) or not callable(getattr(self.sampler, "run", None)):
            raise TypeError(f"sampler must be a sampler instance with .run(rng_key, log_density, init) (e.g. "
                            f"MALA(20, 0.1)), got {self.sampler!r}")
        if not (callable(init) or init in ("noise", "prior", "persistent")):
            raise ValueError(f"init must be 'noise', 'prior', 'persistent' or a guide, got {init!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.init = init
        self.name = name
        self.num_data = None
        if init == "persistent":
            if num_data is None:
                raise ValueError("init='persistent' keeps one chain per datum: give num_data (the data set size)")
            self.num_data = check_positive_int("num_data", num_data)

    # --- where chains start --------------------------------------------------------------------------------
    def _start_trace(self, rng_key, args, kwargs, guide_trace: dict | None = None) -> dict:
        """The model's trace at the chains' start (values of ``guide_trace`` where given)."""
        model = self.model if self.init == "prior" else sampler(self.model, _BaseDraws())
        k_guide, k_model = jax.random.split(rng_key)
        with handlers.block():
            if guide_trace is None and callable(self.init):
                guide_trace = handlers.trace(handlers.seed(self.init, k_guide)).get_trace(*args, **kwargs)
            if guide_trace is not None:
                model = handlers.replay(model, trace=guide_trace)
            return handlers.trace(handlers.seed(model, k_model)).get_trace(*args, **kwargs)

    @staticmethod
    def _latent_sites(trace: dict) -> dict:
        for name, site in trace.items():
            if site["type"] == "plate" and site["args"][1] is not None and site["args"][1] != site["args"][0]:
                raise NotImplementedError(f"ShortRunPosterior does not follow subsampled plates (plate {name!r}); "
                                          "pass minibatches to the model instead")
        sites = {name: site for name, site in trace.items()
                 if site["type"] == "sample" and not site["is_observed"]}
        if not sites:
            raise ValueError("ShortRunPosterior found no latent sample site in the model")
        for name, site in sites.items():
            if not _is_real(site["fn"].support):
                raise ValueError(f"ShortRunPosterior runs Langevin chains on real-valued latents, but site "
                                 f"{name!r} has support {site['fn'].support}; reparameterise it onto the real line "
                                 "or use NUTS")
        return sites

    def _persistent_start(self, start: dict, kwargs):
        index = kwargs.get("index")
        if index is None:
            raise ValueError("init='persistent' needs the batch's data indices: call the model and guide with "
                             "index=<indices> (fit(..., pass_index=True) does this)")
        index = jnp.asarray(index)
        if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
            raise ValueError(f"index must be a 1-d integer array of data indices, got shape {index.shape}")
        for name, value in start.items():
            if value.shape[:1] != index.shape:
                raise ValueError(f"init='persistent': site {name!r} has shape {value.shape}, whose first dimension "
                                 f"should index the batch of {index.shape[0]} data")
        init_state = {"seen": jnp.zeros(self.num_data, bool)}
        init_state.update({f"chains.{n}": jnp.zeros((self.num_data,) + v.shape[1:], v.dtype)
                           for n, v in start.items()})
        state = numpyro.primitives.mutable(f"{self.name}$chains", init_state)
        seen = state["seen"][index]
        for name, value in start.items():
            keep = seen.reshape((-1,) + (1,) * (value.ndim - 1))
            start[name] = jnp.where(keep, state[f"chains.{name}"][index], value)
        return index, state

    # --- the chain -----------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> dict:
        k_start, k_chain = jax.random.split(_prng_key(type(self).__name__))
        trace = self._start_trace(k_start, args, kwargs)
        sites = self._latent_sites(trace)
        plate = self._chain_plate(sites)
        return self._run(k_chain, sites, self._log_joint(k_start, trace, args, kwargs, plate), kwargs, plate=plate)

    def _log_joint(self, rng_key, trace: dict, args, kwargs, plate: tuple | None = None
                   ) -> Callable[[dict], jax.Array]:
        """``values -> log p~(x, z = values)``: the model's unnormalised joint at the parameter values SVI is
        training (the model's params of ``trace``, declared in the guide as well, with their gradient stopped).

        With ``plate = (name, dim, size)`` it is per member of that plate, shape ``(size,)``: each site's log density
        summed over every other dimension; a site outside the plate is shared out evenly (constant in the chain's
        latents, by the factorisation :attr:`per_datum` assumes)."""
        params = {name: numpyro.param(name, site["value"], **site["kwargs"])
                  for name, site in trace.items() if site["type"] == "param"}
        params = jax.lax.stop_gradient(params)
        model = normalizer(self.model, Unnormalized())

        def log_joint(values: dict) -> jax.Array:
            # block: nothing of these runs reaches SVI's trace; the inner seed answers any key request made while
            # the chain is traced (NumPyro's block lets prng_key messages through to the outer seed otherwise).
            with handlers.block(), handlers.seed(rng_seed=rng_key):
                if plate is None:
                    return joint_log_density(model, args, kwargs, {**params, **values})[0]
                log_probs, tr = compute_log_probs(model, args, kwargs, {**params, **values}, sum_log_prob=False)
            return sum((_per_member(lp, tr[n]["cond_indep_stack"], plate) for n, lp in log_probs.items()),
                       start=jnp.zeros(plate[2]))

        return log_joint

    def _chain_plate(self, sites: dict) -> tuple | None:
        """``(name, dim, size)`` of the plate whose members run one chain each (see :attr:`per_datum`), or None."""
        if not self.per_datum:
            return None
        common = None
        for site in sites.values():
            frames = {f.name: (f.dim, f.size) for f in site["cond_indep_stack"]
                      if jnp.ndim(site["value"]) - site["fn"].event_dim >= -f.dim
                      and jnp.shape(site["value"])[f.dim - site["fn"].event_dim] == f.size}
            common = frames if common is None else {n: f for n, f in common.items() if frames.get(n) == f}
        if not common:
            return None
        name = min(common, key=lambda n: common[n][0])  # the outermost
        return (name,) + common[name]

    def _run(self, rng_key, sites: dict, log_joint: Callable, kwargs, whiten: dict | None = None,
             plate: tuple | None = None) -> dict:
        """Run the chain from the latent values of ``sites`` and record its final state.

        ``whiten``: ``{site: (loc, scale)}``; the chain then runs in :math:`u = (z - loc) / scale` (a diagonal
        preconditioner; the Jacobian is constant). ``plate``: from :meth:`_chain_plate`; the chains' positions are
        then ``(size, d)``, one row per member (``log_joint`` must be per member too)."""
        start = {name: jax.lax.stop_gradient(site["value"]) for name, site in sites.items()}
        index, state = self._persistent_start(start, kwargs) if self.init == "persistent" else (None, None)
        names = list(start)
        shift = {n: (0.0, 1.0) if whiten is None else jax.lax.stop_gradient(tuple(whiten[n])) for n in names}
        # Where each site's plate axis is (None for one joint chain); static: plain Python ints.
        axes = {n: None if plate is None else jnp.ndim(start[n]) - sites[n]["fn"].event_dim + plate[1]
                for n in names}
        lead = () if plate is None else (plate[2],)
        shapes = {n: start[n].shape if axes[n] is None else jnp.moveaxis(start[n], axes[n], 0).shape for n in names}
        splits = list(itertools.accumulate(math.prod(shapes[n]) // math.prod(lead) for n in names))[:-1]

        def flatten(values: dict) -> jax.Array:
            parts = [((values[n] - shift[n][0]) / shift[n][1]) for n in names]
            parts = [v if axes[n] is None else jnp.moveaxis(v, axes[n], 0) for n, v in zip(names, parts)]
            return jnp.concatenate([v.reshape(lead + (-1,)) for v in parts], -1)

        def unflatten(flat) -> dict:
            values = {n: v.reshape(shapes[n]) for n, v in zip(names, jnp.split(flat, splits, -1))}
            values = {n: v if axes[n] is None else jnp.moveaxis(v, 0, axes[n]) for n, v in values.items()}
            return {n: shift[n][0] + shift[n][1] * v for n, v in values.items()}

        flat = flatten(start)
        try:
            moved = self.sampler.run(rng_key, lambda u: log_joint(unflatten(u)), flat)
        except ChainDivergenceError as err:  # say which chain it was
            raise err.add_context(label=f"the posterior guide {type(self).__name__}, sites {names}")
        self._check_moved(flat, moved)
        result = unflatten(moved)

        if index is not None:
            for name, value in result.items():
                state[f"chains.{name}"] = state[f"chains.{name}"].at[index].set(value)
            state["seen"] = state["seen"].at[index].set(True)
        for name, value in result.items():
            self._record(sites[name], value)
        return result

    def _check_moved(self, start, end) -> None:
        """Warn (once per guide) when the chain's displacement is negligible against its starting points' spread.
        On concrete values (e.g. ``svi.init``) the check runs at once; under a trace, until one concrete check has
        passed, it runs as a :func:`jax.debug.callback` (a program with a host callback is not kept by JAX's
        persistent compilation cache, so a checked guide compiles without one)."""
        if self._warned:
            return
        start, end = jax.lax.stop_gradient(start), jax.lax.stop_gradient(end)
        flat = start.reshape(-1, start.shape[-1]) if start.ndim > 1 else start.reshape(1, -1)
        spread = jnp.sqrt(jnp.mean(jnp.var(flat, 0)) if flat.shape[0] > 1 else jnp.var(flat))
        scale = jnp.where(spread > 0, spread, jnp.sqrt(jnp.mean(start * start)))
        displacement = jnp.sqrt(jnp.mean((end - start) ** 2))
        if _is_concrete(displacement) and _is_concrete(scale):
            self._warn_if_stuck(displacement, scale)
            self._checked = True
        elif not self._checked:  # once checked on concrete values (e.g. by svi.init), compiled code has no callback,
            jax.debug.callback(self._warn_if_stuck, displacement, scale)  # so that JAX's compilation cache keeps it

    def _warn_if_stuck(self, displacement, scale) -> None:
        if self._warned:
            return
        for d, s in zip(np.ravel(displacement), np.ravel(scale)):  # one pair per vmapped call
            message = _adapt.stuck_message(type(self).__name__, float(d), float(s), self.sampler)
            if message is not None:
                self._warned = True
                warnings.warn(message, UserWarning, stacklevel=2)
                return

    @staticmethod
    def _record(site: dict, value) -> None:
        """``numpyro.sample(name, Delta(value))`` inside the plates the model put the site in."""
        frames = [f for f in site["cond_indep_stack"]]
        record = lambda: numpyro.sample(site["name"], dist.Delta(value, event_dim=site["fn"].event_dim))
        for frame in reversed(frames):
            record = (lambda inner, frame: lambda: _in_plate(frame, inner))(record, frame)
        record()

    def __repr__(self) -> str:
        return f"ShortRunPosterior(sampler={self.sampler!r}, init={self.init!r})"


def _per_member(log_prob, frames, plate: tuple) -> jax.Array:
    """A site's log density summed to one value per member of ``plate`` (``(name, dim, size)``); a site outside
    the plate, or not broadcast along it, is shared out evenly."""
    name, dim, size = plate
    log_prob = jnp.asarray(log_prob)
    if any(f.name == name for f in frames) and log_prob.ndim >= -dim and log_prob.shape[dim] == size:
        return jnp.moveaxis(log_prob, dim, 0).reshape(size, -1).sum(-1)
    return jnp.full(size, jnp.sum(log_prob) / size)


def _in_plate(frame, inner):
    with numpyro.plate(frame.name, frame.size, dim=frame.dim):
        return inner()


# --- amortised guide -----------------------------------------------------------------------------------------
class _Frame(NamedTuple):
    """A plate a latent site sits in, as the model entered it (static: plain Python values)."""

    name: str
    dim: int
    size: int
    subsample_size: int


class _Site(NamedTuple):
    """What a guide needs to know of one latent site of the model (static: no arrays, so no tracers)."""

    name: str
    shape: tuple
    event_dim: int
    frames: tuple  # of _Frame, innermost first (the site's cond_indep_stack)
    support: str | None  # the support when it is not the real line, else None


def _latent_site_structure(trace: dict) -> dict:
    """The latent sample sites of a model trace, in the model's order, as :class:`_Site`."""
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
        sites[name] = _Site(name, tuple(jnp.shape(site["value"])), int(fn.event_dim), tuple(frames),
                            None if _is_real(fn.support) else str(fn.support))
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
        if isinstance(sites, str):
            sites = (sites,)
        if sites is not None:
            sites = tuple(sites)
            if not sites or not all(isinstance(s, str) for s in sites) or len(set(sites)) != len(sites):
                raise ValueError(f"sites must be a non-empty sequence of distinct site names, got {sites!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.model = model
        self.encoder = encoder
        self.sites = sites
        self.name = name
        self._structures: dict = {}

    # --- the model's latent sites ------------------------------------------------------------------------------
    def _model_sites(self, args: tuple, kwargs: dict) -> dict:
        """``{name: _Site}`` for the model's latent sites, from an abstract trace (cached per argument structure)."""
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
        model = normalizer(sampler(self.model, _BaseDraws()), Unnormalized())
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
        unknown = [name for name in out if name not in latent]
        if unknown:
            raise ValueError(f"AmortizedGuide: {unknown} {'is' if len(unknown) == 1 else 'are'} not a latent sample "
                             f"site of the model (its latent sites: {list(latent)}; observed sites need no guide)")
        uncovered = [name for name in latent if name not in out]
        if uncovered:
            raise ValueError(f"AmortizedGuide covers {list(out)}, but the model's latent sites {uncovered} are not "
                             "covered: SVI would draw them from the prior, with no log q. Return (loc, scale) for "
                             "every latent site from the encoder (a dict {site: (loc, scale)})")
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
    def _check(site: _Site, loc, scale) -> None:
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
    def _sample(site: _Site, loc, scale, indices: dict):
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


# --- the MCMC-refined amortised guide ----------------------------------------------------------------------------
def _loc_scale(fn) -> tuple | None:
    """``(loc, scale)`` of a (possibly ``Independent``) Normal, else ``None``."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return (fn.loc, fn.scale) if isinstance(fn, dist.Normal) else None


def _scaled_log_prob(site: dict):
    """A sample site's log density as NumPyro's ``Trace_ELBO`` counts it (times its plates' scale)."""
    fn, value = site["fn"], site["value"]
    log_prob = fn.log_prob(value, site["intermediates"]) if site["intermediates"] else fn.log_prob(value)
    return log_prob if site["scale"] is None else site["scale"] * log_prob


class _OuterKeys(Messenger):
    """Give each random site the key the outer ``seed`` would give it (``numpyro.prng_key()``), so that the guide
    draws the same noise where its sites are hidden from the outer handlers (by an enclosing ``block``)."""

    def process_message(self, msg):
        if msg["type"] in ("sample", "plate") and msg["value"] is None and msg["kwargs"].get("rng_key") is None:
            msg["kwargs"]["rng_key"] = _prng_key("RefinedGuide")


class RefinedGuide:
    r"""An amortised guide whose sample is refined by a few Langevin steps on the true posterior (Hoffman 2017).

    On each call the encoder guide draws :math:`z_0 \sim q_\phi(z \mid x)`; a short chain (default
    ``ShortRunLangevin(steps, step_size, unroll="auto")``) then runs from :math:`z_0` on the model's **unnormalised**
    joint :math:`\log \tilde p(x, z)` (every tilted prior's normalizer off) and its final state :math:`z_K` is
    recorded as ``Delta`` sites inside the model's plates, as :class:`ShortRunPosterior` does. With ``Trace_ELBO``
    the two parts learn from different objectives:

    - the model (decoder, energy, the prior's normalizer) from the refined, detached :math:`z_K`: the gradient of
      :math:`\log p_\theta(x, z_K)`, with the energy's :math:`\nabla \log Z` from the prior's normalizer
      (``Contrastive`` or ``SelfNormalized``), as in LEBM;
    - the encoder from its own ELBO, :math:`\nabla_\phi\, \mathbb E_{q_\phi}[\log \tilde p_\theta(x, z) -
      \log q_\phi(z \mid x)]` (pathwise), with no gradient from it to the model: an auxiliary ``numpyro.factor``
      site ``f"{name}.encoder_elbo"`` of value 0 whose gradient is exactly
      :math:`-\nabla_\phi (g^\top z_\phi - \log q_\phi(z_\phi \mid x))`, with
      :math:`g = \nabla_z \log \tilde p_\theta(x, z)` at :math:`z_\phi` taken as a constant, so the reported
      loss is the model's term alone.

    The encoder guide runs with its sample and plate sites hidden from the outer handlers (its parameters, mutable
    state and key requests reach SVI as usual); its draw uses the keys a plain ``AmortizedGuide`` would get. With
    ``whiten=True`` (default) and a Normal encoder the chain runs in the encoder's coordinates
    :math:`u = (z - \mu_\phi(x)) / \sigma_\phi(x)` (a diagonal preconditioner), so ``step_size`` is in units of
    the encoder's scale and fits every datum and latent dimension alike. Subsampled plates are not followed (see
    :class:`ShortRunPosterior`).

    Parameters
    ----------
    guide : AmortizedGuide
        The encoder guide (any reparameterised guide with a ``model`` attribute and a sample at every latent site).
    steps, step_size : int, float or "auto"
        Of the default ULA refinement chain (``"auto"``: adapted on every call).
    sampler : sampler, optional
        Overrides ``steps`` / ``step_size``.
    whiten : bool
        Run the chain in the encoder's standardised coordinates (needs Normal sites in the guide).
    per_datum : bool
        One chain per datum (per member of the plate every latent site shares), each with its own accept step
        under ``MALA`` (as Hoffman's per-datum HMC); see :class:`ShortRunPosterior`.
    name : str
        Prefix of the auxiliary site.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    >>> from numpyro import handlers
    >>> from numpyro.infer import SVI, Trace_ELBO
    >>> from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal, SelfNormalized
    >>> energy = EnergyMLP(2, 8)
    >>> def model(x):
    ...     with numpyro.plate("data", x.shape[0]):
    ...         z = numpyro.sample("z", EnergyTiltedNormal(energy, jnp.zeros(2), jnp.ones(2),
    ...                                                    normalizer=SelfNormalized(64, name="b")))
    ...         numpyro.sample("x", dist.Normal(z, 0.3).to_event(1), obs=x)
    >>> encoder = lambda x: (numpyro.param("w", jnp.ones(2)) * x, jnp.full_like(x, 0.3))
    >>> guide = RefinedGuide(AmortizedGuide(model, encoder), steps=5, step_size=0.3)
    >>> svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    >>> state = svi.init(jax.random.PRNGKey(0), jnp.ones((8, 2)))
    >>> state, loss = svi.update(state, jnp.ones((8, 2)))
    >>> sorted(svi.get_params(state)), handlers.seed(guide, 0)(jnp.ones((8, 2)))["z"].shape
    (['b', 'w'], (8, 2))
    """

    def __init__(self, guide: Callable, steps: int = 10, step_size: float = 0.2, *, sampler=None,
                 whiten: bool = True, per_datum: bool = True, name: str = "refined"):
        model = getattr(guide, "model", None)
        if not callable(guide) or not callable(model):
            raise TypeError("RefinedGuide refines a guide that knows its model, e.g. AmortizedGuide(model, "
                            f"encoder); got {type(guide).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.guide, self.model, self.whiten, self.name = guide, model, bool(whiten), name
        self._posterior = ShortRunPosterior(model, steps, step_size, init=guide, sampler=sampler,
                                            per_datum=per_datum)
        self.sampler = self._posterior.sampler

    def __call__(self, *args, **kwargs) -> dict:
        # The encoder's draw, first (the noise of a plain AmortizedGuide): its params reach SVI (trained), its sample
        # and plate sites do not (replaced by the refined ones).
        with handlers.block(hide_fn=lambda msg: msg["type"] in ("sample", "plate")), _OuterKeys():
            guide_trace = handlers.trace(self.guide).get_trace(*args, **kwargs)
        k_start, k_chain = jax.random.split(_prng_key(type(self).__name__))
        trace = self._posterior._start_trace(k_start, args, kwargs, guide_trace)
        sites = self._posterior._latent_sites(trace)
        missing = [n for n in sites if n not in guide_trace or guide_trace[n]["type"] != "sample"]
        if missing:
            raise ValueError(f"RefinedGuide: the guide gives no sample at the model's latent sites {missing}")
        plate = self._posterior._chain_plate(sites)
        log_joint = self._posterior._log_joint(k_start, trace, args, kwargs, plate)
        self._encoder_elbo(guide_trace, {n: guide_trace[n]["value"] for n in sites}, log_joint)
        whiten = None
        if self.whiten:
            whiten = {n: _loc_scale(guide_trace[n]["fn"]) for n in sites}
            if any(v is None for v in whiten.values()):
                raise ValueError("RefinedGuide(whiten=True) needs a Normal at every site of the guide; pass "
                                 "whiten=False for another guide")
        return self._posterior._run(k_chain, sites, log_joint, kwargs, whiten, plate)

    def _encoder_elbo(self, guide_trace: dict, z: dict, log_joint: Callable) -> None:
        r"""Add the auxiliary site whose gradient is :math:`-\nabla_\phi` ELBO and whose value is 0.

        :math:`\nabla_\phi \log \tilde p(x, z_\phi) = g^\top \partial z_\phi / \partial \phi` with
        :math:`g = \nabla_z \log \tilde p(x, z)` taken alone (``log_joint`` stops the model's parameters)."""
        if all(isinstance(h, handlers.seed) for h in numpyro_handler_stack()):
            return  # seeded only: nothing would record the site
        grads = jax.lax.stop_gradient(jax.grad(lambda v: jnp.sum(log_joint(v)))(jax.lax.stop_gradient(z)))
        log_q = sum(jnp.sum(_scaled_log_prob(guide_trace[n])) for n in z)
        surrogate = sum(jnp.sum(grads[n] * z[n]) for n in z) - log_q
        numpyro.factor(f"{self.name}.encoder_elbo", -(surrogate - jax.lax.stop_gradient(surrogate)))

    def __repr__(self) -> str:
        return f"RefinedGuide({self.guide!r}, sampler={self.sampler!r}, whiten={self.whiten})"

