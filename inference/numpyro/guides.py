r"""Guides for models with energy-tilted priors (NumPyro).

:class:`ShortRunPosterior` is LEBM's posterior sampler written as a guide: it runs a short Langevin chain on the
model's joint log density over its latent sites and records the result as ``Delta`` sites, so that
``SVI(model, ShortRunPosterior(model), optim, Trace_ELBO())`` takes exactly the LEBM maximum-likelihood step
(Pang et al. 2020). The same class as :class:`inference.pyro.ShortRunPosterior`, with JAX's rules: the chain is a
:func:`jax.lax.scan` traced into SVI's jitted update (the model is traced once per compilation, not once per
step), randomness comes from the seeded guide (``numpyro.prng_key()``), and persistent chains live in a
``numpyro.mutable`` site, so they travel in SVI's state (and in its checkpoints).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.util import log_density as joint_log_density

from inference.numpyro.handlers import normalizer, sampler
from tilted_priors._validation import check_positive_int
from tilted_priors.numpyro import ShortRunLangevin, Unnormalized

__all__ = ["ShortRunPosterior"]


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


class ShortRunPosterior:
    r"""Short-run Langevin posterior as a guide (LEBM; Pang et al. 2020).

    On each call it finds the model's latent sites (a trace of the model under the same arguments), starts a chain
    at ``init``, runs ``sampler`` (default ``ShortRunLangevin(steps, step_size)``) on the **unnormalised** joint
    log density (every tilted prior's normalizer switched off with
    :func:`~inference.numpyro.handlers.normalizer`; :math:`\log Z` is constant in :math:`z`), and records the final
    state as ``Delta`` sites (log density 0) inside the model's plates. The samples carry no gradient, as in LEBM.
    All latent sites form one chain (per-datum chains under a data plate are then exactly LEBM's; with ``MALA``
    the accept step is joint over the batch). The model's parameters are declared in the guide too, so that the
    chain sees the values SVI is training.

    Parameters
    ----------
    model : callable
        The NumPyro model; the guide is called with the model's arguments.
    steps, step_size : int, float
        Of the default ULA sampler (LEBM: 20 x 0.1), a fully unrolled loop (``unroll=True``).
    init : {"noise", "prior", "persistent"} or callable
        ``"noise"``: tilted sites from their base (LEBM), other latents from their prior; ``"prior"``: from the
        prior (the tilted prior's own sampler); a guide: from its sample; ``"persistent"``: per-datum chains
        continued from the previous visit of each datum, kept in the mutable site ``"<name>$chains"``; needs
        ``num_data`` and an ``index`` keyword (the batch's data indices; the model must accept it too).
    sampler : sampler, optional
        Overrides ``steps`` / ``step_size``.
    num_data : int, optional
        Data set size, for ``init="persistent"``.
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

    def __init__(self, model: Callable, steps: int = 20, step_size: float = 0.1, init="noise", *,
                 sampler=None, num_data: int | None = None, name: str = "short_run_posterior"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        # Fully unrolled: through a convolutional generator XLA's CPU loop is 4-5x slower (see ShortRunLangevin).
        self.sampler = ShortRunLangevin(steps, step_size, unroll=True) if sampler is None else sampler
        if not callable(getattr(self.sampler, "run", None)):
            raise TypeError(f"sampler needs .run(rng_key, log_density, init), got {self.sampler!r}")
        if not (callable(init) or init in ("noise", "prior", "persistent")):
            raise ValueError(f"init must be 'noise', 'prior', 'persistent' or a guide, got {init!r}")
        self.init = init
        self.name = name
        self.num_data = None
        if init == "persistent":
            if num_data is None:
                raise ValueError("init='persistent' keeps one chain per datum: give num_data (the data set size)")
            self.num_data = check_positive_int("num_data", num_data)

    # --- where chains start --------------------------------------------------------------------------------
    def _start_trace(self, rng_key, args, kwargs) -> dict:
        model = self.model if self.init == "prior" else sampler(_BaseDraws(), fn=self.model)
        k_guide, k_model = jax.random.split(rng_key)
        with handlers.block():
            if callable(self.init):
                guide_trace = handlers.trace(handlers.seed(self.init, k_guide)).get_trace(*args, **kwargs)
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
        rng_key = numpyro.prng_key() if numpyro.primitives._PYRO_STACK else None
        if rng_key is None:
            raise ValueError("ShortRunPosterior draws random numbers: run it inside numpyro.handlers.seed "
                             "(SVI and MCMC do this)")
        k_start, k_chain = jax.random.split(rng_key)
        trace = self._start_trace(k_start, args, kwargs)
        sites = self._latent_sites(trace)
        # The chain must see the parameter values SVI is training: declare the model's params here as well.
        params = {name: numpyro.param(name, site["value"], **site["kwargs"])
                  for name, site in trace.items() if site["type"] == "param"}
        start = {name: jax.lax.stop_gradient(site["value"]) for name, site in sites.items()}
        index, state = self._persistent_start(start, kwargs) if self.init == "persistent" else (None, None)

        names = list(start)
        shapes = [start[n].shape for n in names]
        splits = list(itertools.accumulate(math.prod(s) for s in shapes))[:-1]  # static: plain Python ints
        model = normalizer(Unnormalized(), fn=self.model)
        params = jax.lax.stop_gradient(params)

        def unflatten(flat):
            return {n: v.reshape(s) for n, v, s in zip(names, jnp.split(flat, splits), shapes)}

        def log_density(flat):
            # block: nothing of these runs reaches SVI's trace; the inner seed answers any key request made while
            # the chain is traced (NumPyro's block lets prng_key messages through to the outer seed otherwise).
            with handlers.block(), handlers.seed(rng_seed=k_start):
                return joint_log_density(model, args, kwargs, {**params, **unflatten(flat)})[0]

        flat = jnp.concatenate([start[n].reshape(-1) for n in names])
        result = unflatten(self.sampler.run(k_chain, log_density, flat))

        if index is not None:
            for name, value in result.items():
                state[f"chains.{name}"] = state[f"chains.{name}"].at[index].set(value)
            state["seen"] = state["seen"].at[index].set(True)
        for name, value in result.items():
            self._record(sites[name], value)
        return result

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


def _in_plate(frame, inner):
    with numpyro.plate(frame.name, frame.size, dim=frame.dim):
        return inner()
