r"""Recursive mixture estimation (RME; Kim & Pavlovic 2020) for NumPyro models.

The amortised posterior is a mixture grown one component at a time, each component a diagonal Gaussian from its own
encoder:

.. math:: Q_m(z \mid x) = \bigl(1 - e_m(x)\bigr)\, Q_{m-1}(z \mid x) + e_m(x)\, q_m(z \mid x), \qquad Q_1 = q_1,

so that the weights of the :math:`m` active components are
:math:`\pi_k = e_k \prod_{j=k+1}^{m} (1 - e_j)`, with :math:`e_1 = 1` and :math:`e_k = \sigma(\ell_k(x))`.

:class:`RecursiveMixtureGuide` is the mixture (a guide for test-time inference), :class:`RecursiveMixtureELBO` the
loss of one training stage, :func:`fit_recursive` the schedule that trains the components one after the other. The
same names as :mod:`tilted_priors.inference.pyro.mixture`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import nnx
from jax.lax import stop_gradient
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.contrib.module import nnx_module
from numpyro.infer.elbo import ELBO
from numpyro.infer.util import compute_log_probs

from tilted_priors._compat import numpyro_handler_stack
from tilted_priors._validation import check_flag
from tilted_priors.inference._plan import stage_settings
from tilted_priors.inference.numpyro._amortized import AmortizedGuide, Site, loc_scale
from tilted_priors.inference.numpyro._log_joint import in_plate, per_member
from tilted_priors.inference.numpyro.train import FitResult, fit

__all__ = ["RecursiveMixtureGuide", "RecursiveMixtureELBO", "fit_recursive"]


def _check_barrier(barrier) -> float:
    try:
        value = float(barrier)
    except (TypeError, ValueError):
        raise TypeError(f"barrier must be a number, got {type(barrier).__name__}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"barrier (the bound C on the KL bonus) must be finite and non-negative, got {barrier!r}")
    return value


def _log_pi(logits, m: int):
    r""":math:`\log \pi_k`, :math:`k = 1..m`, from the logits of :math:`e_2, e_3, \dots` (last axis; the first
    :math:`m - 1` are used): :math:`\log e_k + \sum_{j > k} \log(1 - e_j)`, with :math:`\log e_1 = 0`."""
    logits = logits[..., :m - 1]
    zero = jnp.zeros(logits.shape[:-1] + (1,), logits.dtype)
    log_e = jnp.concatenate([zero, jax.nn.log_sigmoid(logits)], -1)
    # later[k] = sum over j > k of log(1 - e_j): a reversed cumulative sum of log(1 - e_{k+1}) (0 for k = m)
    shifted = jnp.concatenate([jax.nn.log_sigmoid(-logits), zero], -1)
    return log_e + jnp.flip(jnp.cumsum(jnp.flip(shifted, -1), -1), -1)


class RecursiveMixtureGuide:
    r"""A recursive mixture of amortised diagonal Gaussians (RME; Kim & Pavlovic 2020) at one latent site.

    With :math:`q_k(z \mid x) = \mathcal N(z;\ \mu_k(x), \operatorname{diag}\sigma_k(x)^2)` from the ``k``-th encoder,
    the guide's density over the :math:`m` = :attr:`num_active` components is the normalised mixture

    .. math:: Q_m(z \mid x) = \sum_{k=1}^{m} \pi_k(x)\, q_k(z \mid x), \qquad
              \pi_k = e_k \prod_{j=k+1}^{m} (1 - e_j), \quad e_1 = 1, \quad e_k = \sigma(\ell_k(x)),

    i.e. :math:`Q_m = (1 - e_m) Q_{m-1} + e_m q_m`. A call samples the site, inside the model's plate, from
    ``MixtureSameFamily(Categorical(logits=log pi), Normal(loc, scale).to_event(event_dim))`` in one batched pass
    over the active components, so a trace of the guide records the mixture's exact (normalised) log density
    :math:`\log Q_m(z \mid x) = \operatorname{logsumexp}_k(\log \pi_k + \log q_k(z \mid x))`. That makes it a valid
    guide for ``Predictive`` and importance sampling, but **not** for ``Trace_ELBO`` training (the component index is
    discrete and the draw is not reparameterised): train it with :class:`RecursiveMixtureELBO` (or
    :func:`fit_recursive`).

    Parameters
    ----------
    model : callable
        The NumPyro model. It must have exactly one latent site (the component index is shared by a datum's
        latents), real-valued, in one plate over the data (not subsampled) whose members are the site's batch.
    encoders : sequence of flax.nnx.Module or callable
        :math:`M \ge 1` encoders, each following :class:`~tilted_priors.inference.numpyro.AmortizedGuide`'s convention (called with
        the model's arguments, returns ``(loc, scale)`` or ``{site: (loc, scale)}``). Component ``k`` (0-based) is
        ``AmortizedGuide(model, encoders[k], name=f"{name}.component{k}")`` (a module's param site is
        ``f"{name}.component{k}$params"``).
    mixing : flax.nnx.Module or callable, optional
        Amortised weights: called with the model's arguments, returns the logits :math:`\ell_2 .. \ell_M` of shape
        ``(*batch, M - 1)`` (``batch`` the site's batch shape); a module is registered as ``f"{name}.mixing$params"``.
        ``None``: a global param site ``f"{name}.mixing"`` of shape ``(M - 1,)``, broadcast over the data,
        initialised at :math:`e_k = 1/k`, which gives the active components equal weights :math:`1/m`.
    barrier : float
        :math:`C \ge 0`, the bound on the KL bonus of a new component, read by :class:`RecursiveMixtureELBO` unless it
        has its own (an attribute, validated when set).
    name : str
        Prefix of the guide's param sites.

    Attributes
    ----------
    num_active : int
        Components in use, ``1 <= num_active <= num_components`` (default all); :meth:`grow` adds one.
    num_components : int
        :math:`M`.
    components : tuple of AmortizedGuide
        One per encoder.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro import handlers
    >>> def model(x):
    ...     with numpyro.plate("data", x.shape[0]):
    ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    ...         numpyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)
    >>> encoders = [lambda x: (0.5 * x, jnp.full_like(x, 0.7)), lambda x: (-x, jnp.full_like(x, 0.3))]
    >>> guide = RecursiveMixtureGuide(model, encoders, barrier=2.0)
    >>> x = jnp.ones((4, 2))
    >>> jnp.exp(guide.log_weights(x))[0]  # equal weights by default
    Array([0.5, 0.5], dtype=float32)
    >>> tr = handlers.trace(handlers.seed(guide, 0)).get_trace(x)
    >>> type(tr["z"]["fn"]).__name__, tr["z"]["value"].shape, tr["z"]["fn"].log_prob(tr["z"]["value"]).shape
    ('MixtureSameFamily', (4, 2), (4,))
    """

    def __init__(self, model: Callable, encoders: Sequence[Callable], mixing: Callable | None = None, *,
                 barrier: float = 1.0, name: str = "rme"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if callable(encoders) or isinstance(encoders, (str, bytes)) or not isinstance(encoders, Iterable):
            raise TypeError("encoders must be a sequence of encoders (one per mixture component), got "
                            f"{type(encoders).__name__}; wrap a single encoder in a list")
        encoders = tuple(encoders)
        if not encoders:
            raise ValueError("encoders is empty: RecursiveMixtureGuide needs at least one encoder")
        if mixing is not None and not callable(mixing):
            raise TypeError(f"mixing must be None, a Flax NNX module or a callable returning logits, got "
                            f"{type(mixing).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.model, self.mixing, self.name = model, mixing, name
        self.components = tuple(AmortizedGuide(model, encoder, name=f"{name}.component{k}")
                                for k, encoder in enumerate(encoders))
        self.barrier = barrier
        self._num_active = len(self.components)

    @property
    def num_components(self) -> int:
        return len(self.components)

    @property
    def barrier(self) -> float:
        return self._barrier

    @barrier.setter
    def barrier(self, value: float) -> None:
        self._barrier = _check_barrier(value)

    @property
    def num_active(self) -> int:
        """The components in use, ``1..num_components``; :meth:`grow` adds one."""
        return self._num_active

    @num_active.setter
    def num_active(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.num_components:
            raise ValueError(f"num_active must be an integer in [1, {self.num_components}] (the number of "
                             f"components), got {value!r}")
        self._num_active = value

    def grow(self) -> int:
        """Activate one more component; returns the new :attr:`num_active` (a ``ValueError`` past ``M``)."""
        if self.num_active == self.num_components:
            raise ValueError(f"all {self.num_components} components are already active")
        self.num_active += 1
        return self.num_active

    # --- the model's site, the components and the weights ----------------------------------------------------------
    def _structure(self, args: tuple, kwargs: dict) -> tuple[dict, Site]:
        """The model's latent sites and the mixture's one site (static: read from an abstract trace, cached)."""
        latent = self.components[0]._model_sites(args, kwargs)
        if not latent:
            raise ValueError("RecursiveMixtureGuide found no latent sample site in the model")
        if len(latent) > 1:
            raise NotImplementedError(f"RecursiveMixtureGuide covers one latent site, but the model has {list(latent)}"
                                      ": the component index would be shared by a datum's latents; gather them in "
                                      "one site (an event dimension)")
        site = next(iter(latent.values()))
        if len(site.frames) != 1:
            raise (ValueError if not site.frames else NotImplementedError)(
                f"RecursiveMixtureGuide needs its site {site.name!r} in exactly one plate over the data (the mixture "
                f"weights are per datum), but it sits in {[f.name for f in site.frames]}")
        frame = site.frames[0]
        if frame.subsample_size != frame.size:
            raise NotImplementedError(f"RecursiveMixtureGuide does not follow subsampled plates (plate "
                                      f"{frame.name!r}); pass minibatches to the model instead")
        if math.prod(self._batch(site)) != frame.size:
            raise NotImplementedError(f"RecursiveMixtureGuide: site {site.name!r} has batch shape "
                                      f"{self._batch(site)}, not just its plate {frame.name!r} of size {frame.size}; "
                                      "declare the other dimensions as event dimensions (.to_event)")
        return latent, site

    @staticmethod
    def _batch(site: Site) -> tuple:
        return site.shape[:len(site.shape) - site.event_dim]

    def _logits(self, site: Site, args: tuple, kwargs: dict):
        """The logits of :math:`e_2 .. e_M`, shape ``(*batch, M - 1)``."""
        shape = self._batch(site) + (self.num_components - 1,)
        if self.mixing is None:
            init = -jnp.log(jnp.arange(1, self.num_components, dtype=jnp.result_type(float)))  # e_k = 1 / k
            return jnp.broadcast_to(numpyro.param(f"{self.name}.mixing", init), shape)
        mixing = (nnx_module(f"{self.name}.mixing", self.mixing) if isinstance(self.mixing, nnx.Module)
                  else self.mixing)
        logits = jnp.asarray(mixing(*args, **kwargs))
        if logits.shape != shape:
            raise ValueError(f"RecursiveMixtureGuide: the mixing logits have shape {logits.shape}, expected {shape} "
                             f"(the site's batch shape, then one logit per component after the first)")
        return logits

    def _log_weights(self, site: Site, args: tuple, kwargs: dict):
        if self.num_active == 1:
            return jnp.zeros(self._batch(site) + (1,))
        return _log_pi(self._logits(site, args, kwargs), self.num_active)

    def log_weights(self, *args: Any, **kwargs: Any) -> jax.Array:
        r""":math:`\log \pi_k(x)` of the active components, shape ``(*batch, num_active)`` (normalised:
        :math:`\sum_k \pi_k = 1`)."""
        return self._log_weights(self._structure(args, kwargs)[1], args, kwargs)

    def _component(self, k: int, latent: dict, site: Site, args: tuple, kwargs: dict) -> tuple:
        """``(loc, scale)`` of component ``k``, checked as :class:`AmortizedGuide` checks them."""
        component = self.components[k]
        loc, scale = (jnp.asarray(v) for v in
                      component._resolve(latent, component._encode(args, kwargs))[site.name])
        component._check(site, loc, scale)
        return loc, scale

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        """Sample the site from the mixture of the active components; returns ``{site: value}``."""
        if not numpyro_handler_stack():
            raise ValueError("RecursiveMixtureGuide draws random numbers: run it inside numpyro.handlers.seed "
                             "(SVI and Predictive do this)")
        latent, site = self._structure(args, kwargs)
        locs, scales = zip(*(self._component(k, latent, site, args, kwargs) for k in range(self.num_active)))
        axis = len(self._batch(site))
        components = dist.Normal(jnp.stack(locs, axis), jnp.stack(scales, axis)).to_event(site.event_dim)
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=self._log_weights(site, args, kwargs)), components)
        return {site.name: in_plate(site.frames[0], lambda: numpyro.sample(site.name, mixture))}

    def __repr__(self) -> str:
        return (f"RecursiveMixtureGuide(num_components={self.num_components}, num_active={self.num_active}, "
                f"barrier={self.barrier}, name={self.name!r})")


class RecursiveMixtureELBO(ELBO):
    r"""The loss of RME's training stage :math:`m` = ``guide.num_active``, for NumPyro's ``SVI`` with a
    :class:`RecursiveMixtureGuide`.

    Each parameter group gets the gradient of its own objective (components :math:`1..m-1` are frozen: their
    outputs are behind :func:`jax.lax.stop_gradient`, so their parameters' gradient is exactly 0):

    - the new component's encoder maximises, per datum :math:`i`,
      :math:`\mathrm{ELBO}(q_m) + \min(\widehat{\mathrm{KL}}_i(q_m \,\|\, Q_{m-1}), C)` with
      :math:`\widehat{\mathrm{KL}}_i = \log q_m(z_m) - \log Q_{m-1}(z_m)` at its own reparameterised draw
      :math:`z_m \sim q_m` (no KL term for :math:`m = 1`);
    - the mixing logits and the model's parameters maximise the stratified estimate

      .. math:: \mathrm{ELBO}(Q_m) = \sum_i \sum_{k=1}^{m} \pi_k(x_i)
                \bigl[\log p(x_i, z_{k,i}) - \log Q_m(z_{k,i} \mid x_i)\bigr], \qquad z_k \sim q_k,

      one draw per active component (the exact expectation over the component index), where
      :math:`\log p(x_i, z)` is the model's log joint as the model defines it (its prior normalizer included, e.g.
      the SNELBO with :class:`~tilted_priors.numpyro.SelfNormalized`), per member of the data plate.

    The value is :math:`-\mathrm{ELBO}(Q_m)` summed over the batch (averaged over particles). With
    ``num_active = 1`` value and gradients are those of ``Trace_ELBO`` with
    ``AmortizedGuide(model, encoders[0])`` under the same key (the first component draws with the guide's key, as
    ``Trace_ELBO`` does; component ``k`` with ``jax.random.fold_in`` of it; the model's key is shared). Models with
    ``numpyro.mutable`` state are not supported.

    Parameters
    ----------
    barrier : float, optional
        :math:`C \ge 0`; default the guide's ``barrier``.
    num_particles : int
        Independent estimates averaged.
    vectorize_particles : bool or callable
        As :class:`numpyro.infer.elbo.ELBO`.
    recursive : bool
        ``False`` gives the non-recursive mixture encoder (the baseline RME is compared with): every active
        component, the mixing and the model maximise :math:`\mathrm{ELBO}(Q_m)` together, nothing frozen, no
        barrier term.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    >>> from numpyro.infer import SVI
    >>> def model(x):
    ...     w = numpyro.param("w", jnp.ones(2))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    ...         numpyro.sample("x", dist.Normal(w * z, 0.5).to_event(1), obs=x)
    >>> def encoder(k):
    ...     return lambda x: (numpyro.param(f"a{k}", 0.5 + k) * x, jnp.full_like(x, 0.5))
    >>> guide = RecursiveMixtureGuide(model, [encoder(0), encoder(1)])
    >>> svi = SVI(model, guide, optax.adam(1e-2), RecursiveMixtureELBO(barrier=1.0))
    >>> state = svi.init(jax.random.PRNGKey(0), jnp.ones((8, 2)))
    >>> state, loss = svi.update(state, jnp.ones((8, 2)))
    >>> sorted(svi.get_params(state)), bool(jnp.isfinite(loss))
    (['a0', 'a1', 'rme.mixing', 'w'], True)
    """

    def __init__(self, barrier: float | None = None, num_particles: int = 1, vectorize_particles: bool = True, *,
                 recursive: bool = True):
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.barrier = None if barrier is None else _check_barrier(barrier)
        self.recursive = check_flag(recursive, "recursive")

    def loss(self, rng_key, param_map: dict, model: Callable, guide: Callable, *args: Any, **kwargs: Any):
        r""":math:`-\mathrm{ELBO}(Q_m)` plus a zero-valued surrogate routing each parameter's gradient (see above)."""
        if not isinstance(guide, RecursiveMixtureGuide):
            raise TypeError(f"RecursiveMixtureELBO trains a RecursiveMixtureGuide, got {type(guide).__name__}")
        barrier = guide.barrier if self.barrier is None else self.barrier

        def particle(key):
            return self._particle(key, param_map, model, guide, barrier, args, kwargs, self.recursive)

        if self.num_particles == 1:
            return particle(rng_key)
        return jnp.mean(self.vectorize_particles_fn(particle, jax.random.split(rng_key, self.num_particles)))

    @staticmethod
    def _particle(rng_key, params: dict, model: Callable, guide: RecursiveMixtureGuide, barrier: float,
                  args: tuple, kwargs: dict, recursive: bool = True):
        model_key, guide_key = jax.random.split(rng_key)  # as Trace_ELBO
        site = guide._structure(args, kwargs)[1]
        frame = site.frames[0]
        plate, size, m = (frame.name, frame.dim, frame.size), frame.size, guide.num_active

        # one reparameterised draw per active component, by its own AmortizedGuide; the frozen ones stopped
        draws = []
        for k in range(m):
            key = guide_key if k == 0 else jax.random.fold_in(guide_key, k)
            component = handlers.substitute(handlers.seed(guide.components[k], key), data=params)
            tr = handlers.trace(component).get_trace(*args, **kwargs)[site.name]
            draw = (tr["value"], *loc_scale(tr["fn"]))
            draws.append(draw if k == m - 1 or not recursive else stop_gradient(draw))

        def log_q(k, z, stop=True):  # per datum; component k's loc and scale stopped unless stop=False
            _, loc, scale = draws[k]
            if stop:
                loc, scale = stop_gradient((loc, scale))
            return dist.Normal(loc, scale).to_event(site.event_dim).log_prob(z).reshape(size)

        def log_p(z, values):  # per datum: the model's log joint as it defines it
            log_probs, tr = compute_log_probs(handlers.seed(model, model_key), args, kwargs,
                                              {**values, site.name: z}, sum_log_prob=False)
            return sum((per_member(lp, tr[n]["cond_indep_stack"], plate) for n, lp in log_probs.items()),
                       start=jnp.zeros(size))

        # ELBO(Q_m), stratified: for the mixing logits and the model (the components' draws and densities stopped)
        with handlers.substitute(data=params):
            logits = guide._logits(site, args, kwargs) if m > 1 else jnp.zeros(guide._batch(site) + (0,))
        log_pi = _log_pi(logits, m).reshape(size, m)
        zs = [stop_gradient(z) if recursive else z for z, _, _ in draws]
        log_mix = jnp.stack([logsumexp(log_pi + jnp.stack([log_q(j, z, recursive) for j in range(m)], -1), -1)
                             for z in zs], -1)
        log_joint = jnp.stack([log_p(z, params) for z in zs], -1)
        elbo = jnp.sum(jnp.exp(log_pi) * (log_joint - log_mix))
        if not recursive:  # the non-recursive mixture: everything on ELBO(Q_m)
            return -elbo

        # ELBO(q_m) + min(KL(q_m || Q_{m-1}), C): for the new component only (the model and the weights stopped)
        z = draws[-1][0]
        log_q_new = log_q(m - 1, z, stop=False)
        objective = log_p(z, stop_gradient(params)) - log_q_new
        if m > 1:
            log_prev = stop_gradient(_log_pi(logits, m - 1)).reshape(size, m - 1)
            log_prev = logsumexp(log_prev + jnp.stack([log_q(j, z) for j in range(m - 1)], -1), -1)
            objective = objective + jnp.minimum(log_q_new - log_prev, barrier)
        objective = jnp.sum(objective)
        return -elbo - (objective - stop_gradient(objective))


def fit_recursive(model: Callable, guide: RecursiveMixtureGuide, data, steps_per_component: int | Sequence[int], *,
                  barrier: float | None = None, warm_start: bool = False, **fit_kwargs: Any) -> list[FitResult]:
    r"""Train a :class:`RecursiveMixtureGuide` and its model stage by stage (RME's schedule).

    For :math:`m = 1..M`: ``guide.num_active = m``, then ``fit(model, guide, data, num_steps=steps[m - 1],
    loss=RecursiveMixtureELBO(barrier), init_params=<the previous stage's params>, **fit_kwargs)``: stage
    :math:`m` starts from the parameters stage :math:`m - 1` ended with (a fresh optimizer state), trains component
    :math:`m` on :math:`\mathrm{ELBO}(q_m) + \min(\mathrm{KL}(q_m \| Q_{m-1}), C)` and the weights and the model on
    :math:`\mathrm{ELBO}(Q_m)`, with components :math:`1..m-1` frozen. The guide is left with all components active.

    Parameters
    ----------
    model : callable
        The model (SVI's; it may differ from ``guide.model`` by handlers, e.g. a swapped normalizer).
    guide : RecursiveMixtureGuide
    data : numpy.ndarray
        As :func:`~tilted_priors.inference.numpyro.fit`.
    steps_per_component : int or sequence of int
        Updates per stage: one number for all, or one per component (length ``M``).
    barrier : float, optional
        :math:`C`; default the guide's.
    warm_start : bool
        Start each new component from the parameters the previous one ended with instead of its own initial ones
        (the encoders must be Flax NNX modules of one architecture: their param sites are copied).
    **fit_kwargs
        Passed to :func:`~tilted_priors.inference.numpyro.fit` (not ``epochs``, ``num_steps``, ``loss``, ``init_params``). With
        ``out``, stage :math:`m` writes to ``out / f"component{m}"`` (so ``resume=True`` resumes per stage).
        ``lr`` may be a list with one rate (or prefix dict) per stage: e.g.
        ``[1e-3] + [{"decoder": 0.0, "": 1e-3}] * (M - 1)`` trains the decoder in stage 1 only (the protocol of
        ``benchmarks/rme.py``).

    Returns
    -------
    list of FitResult
        One per stage.

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> def model(x):
    ...     with numpyro.plate("data", x.shape[0]):
    ...         z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    ...         numpyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)
    >>> def encoder(k):
    ...     return lambda x: (numpyro.param(f"a{k}", 0.1 * k) * x, jnp.full_like(x, 0.5))
    >>> guide = RecursiveMixtureGuide(model, [encoder(0), encoder(1)])
    >>> data = np.random.default_rng(0).normal(size=(32, 2))
    >>> results = fit_recursive(model, guide, data, 20, batch_size=16, lr=1e-2, progress=False)
    >>> [r.steps for r in results], guide.num_active, sorted(results[1].params)
    ([20, 20], 2, ['a0', 'a1', 'rme.mixing'])
    """
    warm_start = check_flag(warm_start, "warm_start")
    if not isinstance(guide, RecursiveMixtureGuide):
        raise TypeError(f"fit_recursive trains a RecursiveMixtureGuide, got {type(guide).__name__}")
    clash = sorted({"epochs", "num_steps", "loss", "init_params"} & set(fit_kwargs))
    if clash:
        raise TypeError(f"fit_recursive sets {clash} itself (steps come from steps_per_component)")
    out = fit_kwargs.pop("out", None)
    stages = stage_settings(steps_per_component, guide.num_components, fit_kwargs)
    if warm_start and not all(isinstance(c.encoder, nnx.Module) for c in guide.components):
        raise TypeError("fit_recursive(warm_start=True) copies each component's parameters into the next: the "
                        "encoders must be Flax NNX modules")
    loss = RecursiveMixtureELBO(barrier)
    results: list[FitResult] = []
    for m, (num_steps, kwargs) in enumerate(stages, start=1):
        guide.num_active = m
        params = dict(results[-1].params) if results else None
        if warm_start and m > 1:
            params.update(_copied_component(params, guide.name, m - 2, m - 1))
        results.append(fit(model, guide, data, num_steps=num_steps, loss=loss, init_params=params,
                           out=None if out is None else Path(out) / f"component{m}", **kwargs))
    return results


def _copied_component(params: dict, name: str, source: int, target: int) -> dict:
    """Component ``source``'s module parameters (flat ``site/key`` names) renamed to component ``target``'s."""
    old, new = f"{name}.component{source}$params", f"{name}.component{target}$params"
    return {new + key[len(old):]: value for key, value in params.items() if key == old or key.startswith(old + "/")}
