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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.util import compute_log_probs
from numpyro.infer.util import log_density as joint_log_density
from numpyro.primitives import Messenger

from tilted_priors.inference.numpyro._amortized import AmortizedGuide, loc_scale
from tilted_priors.inference.numpyro._log_joint import BaseDraws, in_plate, is_real, per_member
from tilted_priors.inference.numpyro.handlers import normalizer, sampler
from tilted_priors import _adapt
from tilted_priors._compat import numpyro_handler_stack
from tilted_priors._validation import check_flag, check_positive_int
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.numpyro import ShortRunLangevin, Unnormalized
from tilted_priors.numpyro.samplers import _is_concrete

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide"]


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
        self.per_datum = check_flag(per_datum, "per_datum")
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
        model = self.model if self.init == "prior" else sampler(self.model, BaseDraws())
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
            if not is_real(site["fn"].support):
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
            return sum((per_member(lp, tr[n]["cond_indep_stack"], plate) for n, lp in log_probs.items()),
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
            record = (lambda inner, frame: lambda: in_plate(frame, inner))(record, frame)
        record()

    def __repr__(self) -> str:
        return f"ShortRunPosterior(sampler={self.sampler!r}, init={self.init!r})"


# --- the MCMC-refined amortised guide ----------------------------------------------------------------------------
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
        self.guide, self.model, self.whiten, self.name = guide, model, check_flag(whiten, "whiten"), name
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
            whiten = {n: loc_scale(guide_trace[n]["fn"]) for n in sites}
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

