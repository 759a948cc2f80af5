r"""Recursive mixture estimation (RME; Kim & Pavlovic 2020): an amortised posterior grown one component at a time.

.. math:: Q_m(z \mid x) = \bigl(1 - e_m(x)\bigr)\, Q_{m-1}(z \mid x) + e_m(x)\, q_m(z \mid x), \qquad Q_1 = q_1,

each :math:`q_k` a diagonal Normal from its own encoder (an :class:`~tilted_priors.inference.pyro.AmortizedGuide`). Unrolled, the
:math:`m` active components have weights :math:`\pi_k = e_k \prod_{j=k+1}^m (1 - e_j)` with :math:`e_1 = 1` and
:math:`e_k = \sigma(\ell_k(x))`. :class:`RecursiveMixtureGuide` is the mixture (a guide for test-time inference),
:class:`RecursiveMixtureELBO` the loss of one training stage, :func:`fit_recursive` the whole schedule. The NumPyro
twin is :mod:`tilted_priors.inference.numpyro.mixture`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from numbers import Real
from pathlib import Path
from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan

from tilted_priors.inference._plan import stage_settings
from tilted_priors.inference.pyro._amortized import AmortizedGuide, Site, make_plates, select
from tilted_priors.inference.pyro._log_joint import per_member
from tilted_priors.inference.pyro.modules import register_module
from tilted_priors.inference.pyro.train import FitResult, fit
from tilted_priors._validation import check_flag, check_positive_int

__all__ = ["RecursiveMixtureGuide", "RecursiveMixtureELBO", "fit_recursive"]


def _check_barrier(barrier) -> float:
    if isinstance(barrier, bool) or not isinstance(barrier, Real) or not (math.isfinite(barrier) and barrier >= 0):
        raise ValueError(f"barrier C must be a finite non-negative number, got {barrier!r}")
    return float(barrier)


def _mixture_log_weights(logits: torch.Tensor | None, m: int, site: Site) -> torch.Tensor:
    r""":math:`\log \pi_k = \log e_k + \sum_{j=k+1}^m \log(1 - e_j)`, ``k = 1..m``, from the logits of
    :math:`e_2, e_3, \dots` (the first ``m - 1`` are used); shape ``(*batch, m)``, ``batch`` the site's batch shape
    (for ``m = 1``, zeros of the site's dtype and device)."""
    if m == 1:
        batch = site.shape[:len(site.shape) - site.event_dim]
        return torch.zeros(batch + (1,), dtype=site.dtype, device=site.device)
    logits = logits[..., :m - 1]
    tail = torch.nn.functional.logsigmoid(-logits).flip(-1).cumsum(-1).flip(-1)  # sum_{j >= k} log(1 - e_j)
    log_e = torch.nn.functional.logsigmoid(logits)
    return torch.cat([tail[..., :1], log_e + torch.cat([tail[..., 1:], torch.zeros_like(tail[..., :1])], -1)], -1)


class RecursiveMixtureGuide:
    r"""A mixture of diagonal-Normal amortised guides, grown recursively (RME; Kim & Pavlovic 2020).

    With the :math:`m` = :attr:`num_active` first components,

    .. math:: Q_m(z \mid x) = \sum_{k=1}^m \pi_k(x)\, \mathcal N\bigl(z;\ \mu_k(x), \operatorname{diag}
              \sigma_k(x)^2\bigr), \qquad \pi_k = e_k \prod_{j=k+1}^m (1 - e_j),\ e_1 = 1,\
              e_k = \sigma(\ell_k(x)),

    i.e. :math:`Q_m = (1 - e_m) Q_{m-1} + e_m q_m`. Component ``k`` (0-based) is
    ``AmortizedGuide(model, encoders[k], name=f"{name}.component{k}")``; the logits :math:`\ell_2, \dots, \ell_M`
    come from ``mixing`` (amortised) or, by default, from a global param ``f"{name}.mixing"`` of shape
    ``(M - 1,)`` initialised at :math:`\ell_k = -\log(k - 1)` (:math:`e_k = 1/k`: equal weights
    :math:`\pi_k = 1/m` for every :math:`m`).

    Calling the guide samples the model's latent site, inside its plate, from
    ``MixtureSameFamily(Categorical(logits=log pi), Normal(loc, scale).to_event(event_dim))`` with all active
    components evaluated in one pass, so a trace of the guide holds the mixture's exact, **normalised** log density
    :math:`\log Q_m(z \mid x) = \operatorname{logsumexp}_k\,[\log \pi_k + \log q_k(z)]`. That makes it a proposal
    for ``Predictive`` and importance sampling; the draw is **not** reparameterised (the component index is
    discrete), so do not train it with ``Trace_ELBO``: train it with :class:`RecursiveMixtureELBO` /
    :func:`fit_recursive`.

    Parameters
    ----------
    model : callable
        The Pyro model. It must have exactly one latent site, real-valued, in exactly one vectorized plate (the
        data plate): the component index is drawn per datum and shared by all of its latents.
    encoders : sequence of callables
        ``M >= 1`` encoders, each as for :class:`~tilted_priors.inference.pyro.AmortizedGuide` (called with the model's
        arguments, returning ``(loc, scale)`` or ``{site: (loc, scale)}``). They must not share parameters.
    mixing : callable, optional
        Called with the model's arguments, returns the logits of :math:`e_2, \dots, e_M`, shape
        ``(*batch, M - 1)`` with ``batch`` the site's batch shape (along a subsampled plate it may give all
        ``full_size`` rows). A :class:`torch.nn.Module` is registered as ``f"{name}.mixing"``.
    barrier : float
        The bound :math:`C \ge 0` of the diversity bonus :math:`\min(\mathrm{KL}(q_m \| Q_{m-1}), C)`, read by
        :class:`RecursiveMixtureELBO` unless it is given its own.
    name : str
        Prefix of the components' and the mixing's names in the param store.

    Attributes
    ----------
    components : tuple of AmortizedGuide
    num_components : int
        ``M``.
    num_active : int
        The components in use, ``1..M`` (default ``M``); :meth:`grow` adds one.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from tilted_priors.pyro import EnergyTiltedNormal, EnergyMLP, SelfNormalized
    >>> pyro.clear_param_store()
    >>> energy = EnergyMLP(2, 16)
    >>> def model(x):
    ...     pyro.module("energy", energy)
    ...     with pyro.plate("data", x.shape[0]):
    ...         z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2),
    ...                                                 normalizer=SelfNormalized(64)))
    ...         pyro.sample("x", dist.Normal(z, 0.3).to_event(1), obs=x)
    >>> def encoder(shift):
    ...     return lambda x: (0.5 * x + shift, torch.full_like(x, 0.5))
    >>> guide = RecursiveMixtureGuide(model, [encoder(-1.0), encoder(0.0), encoder(1.0)])
    >>> x = torch.randn(5, 2)
    >>> guide.log_weights(x).exp()[0]
    tensor([0.3333, 0.3333, 0.3333], grad_fn=<SelectBackward0>)
    >>> guide.num_active = 2
    >>> guide(x)["z"].shape, guide.log_weights(x).shape
    (torch.Size([5, 2]), torch.Size([5, 2]))
    """

    def __init__(self, model: Callable, encoders: Sequence[Callable], mixing: Callable | None = None, *,
                 barrier: float = 1.0, name: str = "rme"):
        if callable(encoders) and not isinstance(encoders, torch.nn.ModuleList):
            raise TypeError("encoders must be a sequence of encoders, one per component (got a single callable; "
                            "wrap it in a list)")
        encoders = list(encoders)
        if not encoders:
            raise ValueError("RecursiveMixtureGuide needs at least one encoder")
        if mixing is not None and not callable(mixing):
            raise TypeError(f"mixing must be None or callable (returning logits), got {type(mixing).__name__}")
        self.components = tuple(AmortizedGuide(model, enc, name=f"{name}.component{k}")
                                for k, enc in enumerate(encoders))
        for component in self.components[1:]:  # one structure trace per argument shape, shared
            component._structures = self.components[0]._structures
        self.model, self.mixing, self.name = model, mixing, name
        self.barrier = _check_barrier(barrier)
        self._num_active = len(encoders)

    @property
    def num_components(self) -> int:
        return len(self.components)

    @property
    def num_active(self) -> int:
        """The components in use, ``1..num_components``; :meth:`grow` adds one."""
        return self._num_active

    @num_active.setter
    def num_active(self, value: int) -> None:
        value = check_positive_int("num_active", value)
        if value > self.num_components:
            raise ValueError(f"num_active must be in 1..{self.num_components} (the number of encoders), got {value}")
        self._num_active = value

    def grow(self) -> int:
        """Make one more component active; returns the new :attr:`num_active` (``ValueError`` past ``M``)."""
        self.num_active = self.num_active + 1
        return self.num_active

    # --- the pieces ------------------------------------------------------------------------------------------
    def _prepare(self, args, kwargs) -> tuple:
        """``(structure, site name, site, plates)``, after checking that the model fits a mixture guide."""
        structure = self.components[0]._structure(args, kwargs)
        if len(structure.sites) != 1:
            raise NotImplementedError(f"RecursiveMixtureGuide covers one latent site (the component index is "
                                      f"shared by a datum's latents), but the model has {list(structure.sites)}")
        (name, site), = structure.sites.items()
        batch = site.shape[:len(site.shape) - site.event_dim]
        if not site.frames:
            raise ValueError(f"RecursiveMixtureGuide needs the latent site {name!r} in a data plate (with "
                             "pyro.plate(...):), whose members each get their own mixture weights")
        if len(site.frames) > 1 or batch.numel() != site.frames[0].size:
            raise NotImplementedError(f"RecursiveMixtureGuide: site {name!r} (batch shape {tuple(batch)}) must sit "
                                      f"in exactly one plate along its batch; it is in "
                                      f"{[f.name for f in site.frames]}")
        return structure, name, site, make_plates(structure)

    def _logits(self, site: Site, plates: dict, args, kwargs) -> torch.Tensor:
        """The logits of :math:`e_2, \\dots, e_M`, shape ``(*batch, M - 1)``."""
        batch = site.shape[:len(site.shape) - site.event_dim]
        shape = batch + (self.num_components - 1,)
        if self.mixing is None:
            m = self.num_components
            logits = pyro.param(f"{self.name}.mixing",
                                lambda: -torch.arange(1, m, dtype=site.dtype, device=site.device).log())
            if logits.shape != (m - 1,):
                raise ValueError(f"the param store holds {self.name}.mixing with shape {tuple(logits.shape)}, but "
                                 f"{m} components need shape ({m - 1},)")
            return logits.expand(shape)
        if isinstance(self.mixing, torch.nn.Module):
            register_module(f"{self.name}.mixing", self.mixing)
        logits = self.mixing(*args, **kwargs)
        if not torch.is_tensor(logits):
            raise TypeError(f"mixing must return a tensor of logits, got {type(logits).__name__}")
        logits = select(logits, replace(site, event_dim=1), plates)
        if logits.shape != shape:
            raise ValueError(f"mixing returned logits of shape {tuple(logits.shape)}; {self.num_components} "
                             f"components need (*batch, M - 1) = {tuple(shape)}")
        return logits

    def _log_weights(self, site: Site, plates: dict, args, kwargs, m: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``log pi`` of ``Q_m`` and of ``Q_{m-1}`` (``None`` when ``m = 1``), shape ``(*batch, m)`` / ``m - 1``."""
        logits = self._logits(site, plates, args, kwargs) if m > 1 else None
        return (_mixture_log_weights(logits, m, site),
                _mixture_log_weights(logits, m - 1, site) if m > 1 else None)

    def log_weights(self, *args, **kwargs) -> torch.Tensor:
        r"""The active components' log weights :math:`\log \pi_k(x)`, shape ``(*batch, num_active)``;
        :math:`\sum_k \pi_k = 1`."""
        _, _, site, plates = self._prepare(args, kwargs)
        return self._log_weights(site, plates, args, kwargs, self.num_active)[0]

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        structure, name, site, plates = self._prepare(args, kwargs)
        pairs = [c._loc_scale(structure, plates, args, kwargs)[name] for c in self.components[:self.num_active]]
        log_pi = self._log_weights(site, plates, args, kwargs, self.num_active)[0]
        axis = -1 - site.event_dim  # the components' axis, left of the event dims
        loc, scale = (torch.stack([p[i] for p in pairs], axis) for i in (0, 1))
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=log_pi),
                                         dist.Normal(loc, scale).to_event(site.event_dim))
        with plates[site.frames[0].name]:
            return {name: pyro.sample(name, mixture)}

    def __repr__(self) -> str:
        return (f"RecursiveMixtureGuide(num_components={self.num_components}, num_active={self.num_active}, "
                f"barrier={self.barrier}, name={self.name!r})")


class RecursiveMixtureELBO(ELBO):
    r"""The loss of one RME training stage, for Pyro's ``SVI`` with a :class:`RecursiveMixtureGuide`.

    With :math:`m` = ``guide.num_active`` (components :math:`1..m-1` frozen) and per datum :math:`x_i`:

    - the model's parameters (decoder, energy, normaliser, ...) and the mixing logits maximise

      .. math:: \mathrm{ELBO}(Q_m) = \sum_{k=1}^m \pi_k(x)\,\bigl[\log p(x, z_k) - \log Q_m(z_k \mid x)\bigr],
                \qquad z_k \sim q_k \text{ (one reparameterised draw each)},

      stratified sampling (the expectation over the component index is exact), with :math:`\log p(x, z)` the
      model's log joint as the model defines it (its normaliser included, e.g. the SNELBO for
      ``SelfNormalized``) and :math:`\log Q_m` the mixture's normalised log density;
    - the new component's encoder maximises :math:`\mathrm{ELBO}(q_m) + \min(\widehat{\mathrm{KL}}_i, C)` with
      :math:`\widehat{\mathrm{KL}}_i = \log q_m(z_m) - \log Q_{m-1}(z_m)` from the same draw :math:`z_m`
      (no KL term for :math:`m = 1`);
    - the frozen components get no gradient (their ``.grad`` is ``None``, which torch optimisers skip).

    :meth:`loss_and_grads` puts on each parameter the gradient of its own objective (``torch.autograd.grad`` per
    group). Terms inside a subsampled data plate carry its scale, as with ``Trace_ELBO``. The reported loss is
    :math:`-\mathrm{ELBO}(Q_m)` summed over the batch, averaged over particles; with one active component it is
    ``Trace_ELBO``'s loss with ``AmortizedGuide(model, encoders[0])``, gradients included, under the same noise.

    Parameters
    ----------
    barrier : float, optional
        :math:`C \ge 0`; default the guide's ``barrier``.
    num_particles : int
        Draws per step (sequential).
    recursive : bool
        ``False`` gives the non-recursive mixture encoder (the baseline RME is compared with): every active
        component, the mixing and the model maximise :math:`\mathrm{ELBO}(Q_m)` together, nothing frozen, no
        barrier term.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI
    >>> pyro.clear_param_store()
    >>> def model(x):
    ...     w = pyro.param("w", torch.tensor(1.0))
    ...     with pyro.plate("data", x.shape[0]):
    ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...         pyro.sample("x", dist.Normal(w * z, 0.3).to_event(1), obs=x)
    >>> class Encoder(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(2, 2)
    ...     def forward(self, x):
    ...         return self.net(x), torch.full_like(x, 0.5)
    >>> encoders = [Encoder(), Encoder()]
    >>> guide = RecursiveMixtureGuide(model, encoders)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), RecursiveMixtureELBO(barrier=0.5))
    >>> loss = svi.step(torch.randn(8, 2))
    >>> encoders[0].net.weight.grad is None, encoders[1].net.weight.grad is not None  # component 0 frozen
    (True, True)
    """

    def __init__(self, barrier: float | None = None, num_particles: int = 1, *, recursive: bool = True):
        super().__init__(num_particles=check_positive_int("num_particles", num_particles))
        self.barrier = None if barrier is None else _check_barrier(barrier)
        self.recursive = check_flag(recursive, "recursive")

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("RecursiveMixtureELBO runs the model once per component's draw: there is no single "
                                  "(model, guide) trace pair")

    def _particle(self, model, guide: RecursiveMixtureGuide, args, kwargs):
        """``(ELBO(Q_m), the new component's objective, {param: group})`` from one stratified draw."""
        if not isinstance(guide, RecursiveMixtureGuide):
            raise TypeError(f"RecursiveMixtureELBO trains a RecursiveMixtureGuide, got {type(guide).__name__}")
        barrier = guide.barrier if self.barrier is None else self.barrier
        m, groups = guide.num_active, {}

        def note(group: str, trace: poutine.Trace) -> None:
            for node in trace.nodes.values():
                leaf = node["value"].unconstrained()
                if groups.setdefault(leaf, group) != group:
                    raise ValueError(f"RecursiveMixtureELBO: parameter {node['name']!r} is used by {groups[leaf]} "
                                     f"and {group}; each component, the mixing and the model need their own")

        with poutine.trace() as guide_side:  # the plates' subsample indices, replayed into the model
            structure, name, site, plates = guide._prepare(args, kwargs)
            pairs = []
            for k, component in enumerate(guide.components[:m]):
                with poutine.trace(param_only=True) as used:
                    pairs.append(component._loc_scale(structure, plates, args, kwargs)[name])
                note("joint" if not self.recursive else "new" if k == m - 1 else "frozen", used.trace)
            with poutine.trace(param_only=True) as used:
                log_pi, log_pi_prev = guide._log_weights(site, plates, args, kwargs, m)
            note("joint", used.trace)
            qs = [dist.Normal(loc, scale).to_event(site.event_dim) for loc, scale in pairs]
            z = [q.rsample() for q in qs]
        frame = site.frames[0]
        size, plate = frame.size, (frame.name, frame.dim, frame.size)
        scale = (frame.full_size or frame.size) / frame.size  # the plate's, as on the guide's sites in Trace_ELBO
        log_p = []
        with poutine.trace(param_only=True) as used:
            for zk in z:
                conditioned = poutine.replay(poutine.condition(model, data={name: zk}), trace=guide_side.trace)
                trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
                trace.compute_log_prob(lambda _, s: not site_is_subsample(s))
                log_p.append(sum(per_member(s["log_prob"], s["cond_indep_stack"], plate)
                                 for s in trace.nodes.values() if "log_prob" in s))
        note("joint", used.trace)
        log_p = torch.stack(log_p, -1)                                                      # (N, k)
        log_q = torch.stack([torch.stack([q.log_prob(zk).reshape(size) for q in qs], -1) for zk in z], 1)  # (N, k, j)
        log_Q = torch.logsumexp(log_pi.reshape(size, 1, m) + log_q, -1)                    # (N, k)
        elbo = (log_pi.reshape(size, m).exp() * (log_p - scale * log_Q)).sum()
        own = log_p[:, -1] - scale * log_q[:, -1, -1]
        if m > 1:
            log_Q_prev = torch.logsumexp(log_pi_prev.reshape(size, m - 1) + log_q[:, -1, :-1], -1)
            own = own + scale * torch.clamp(log_q[:, -1, -1] - log_Q_prev, max=barrier)
        return elbo, own.sum(), groups

    def loss(self, model, guide, *args, **kwargs) -> float:
        """:math:`-\\mathrm{ELBO}(Q_m)`, summed over the batch and averaged over particles."""
        loss = sum(-self._particle(model, guide, args, kwargs)[0].item() for _ in range(self.num_particles))
        loss = loss / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """:meth:`loss`, and each parameter's ``.grad`` from its own objective (frozen components: ``None``)."""
        loss = 0.0
        for _ in range(self.num_particles):
            elbo, own, groups = self._particle(model, guide, args, kwargs)
            loss -= elbo.item() / self.num_particles
            for objective, group in ((elbo, "joint"), (own, "new")):
                params = [p for p, g in groups.items() if g == group]
                if not params or not objective.requires_grad:
                    continue
                grads = torch.autograd.grad(-objective / self.num_particles, params, retain_graph=True,
                                            allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            for p, g in groups.items():
                if g == "frozen":
                    p.grad = None
        warn_if_nan(loss, "loss")
        return loss


def fit_recursive(model: Callable, guide: RecursiveMixtureGuide, data, steps_per_component: int | Sequence[int], *,
                  barrier: float | None = None, warm_start: bool = False, **fit_kwargs) -> list[FitResult]:
    r"""Train a :class:`RecursiveMixtureGuide` and its model stage by stage (RME's schedule).

    For :math:`m = 1, \dots, M`: ``guide.num_active = m``, then
    ``fit(model, guide, data, num_steps=steps_m, loss=RecursiveMixtureELBO(barrier), **fit_kwargs)``: component
    :math:`m` and the mixing learn while components :math:`1..m-1` stay frozen, the model learns throughout. Each
    stage continues from the previous one's parameters (Pyro's param store, which :func:`~tilted_priors.inference.pyro.fit` does
    not clear; each stage starts fresh Adam moments).

    Parameters
    ----------
    model, guide, data
        As for :func:`~tilted_priors.inference.pyro.fit`.
    steps_per_component : int or sequence of int
        Updates per stage: one number for all, or ``M`` of them.
    barrier : float, optional
        :math:`C`; default ``guide.barrier``.
    warm_start : bool
        Start each new component from the weights the previous one ended with (``load_state_dict``; the encoders
        must be torch modules of one architecture) instead of its own initial weights.
    **fit_kwargs
        Passed to every stage's :func:`~tilted_priors.inference.pyro.fit` (``batch_size``, ``lr``, ``seed``, ...). With ``out``,
        stage :math:`m` (1-based) writes to ``out / f"component{m}"``, so ``resume=True`` resumes each stage from
        its own checkpoint. ``lr`` may be a list with one rate (or prefix dict) per stage: e.g.
        ``[1e-3] + [{"decoder": 0.0, "": 1e-3}] * (M - 1)`` trains the decoder in stage 1 only (the protocol of
        ``benchmarks/rme.py``). A prefix must name parameters that exist in its stage (a later component's or the
        mixing's are created at their stage).

    Returns
    -------
    list of FitResult
        One per stage.

    Examples
    --------
    >>> import numpy as np, torch, pyro, pyro.distributions as dist
    >>> pyro.clear_param_store()
    >>> def model(x):
    ...     with pyro.plate("data", x.shape[0]):
    ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...         pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)
    >>> class Encoder(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(2, 4)
    ...     def forward(self, x):
    ...         loc, raw = self.net(x).chunk(2, -1)
    ...         return loc, torch.nn.functional.softplus(raw) + 1e-3
    >>> guide = RecursiveMixtureGuide(model, [Encoder(), Encoder()], barrier=1.0)
    >>> data = np.random.default_rng(0).normal(size=(64, 2))
    >>> results = fit_recursive(model, guide, data, 20, batch_size=16, lr=1e-2, progress=False)
    >>> [r.steps for r in results], guide.num_active
    ([20, 20], 2)
    """
    warm_start = check_flag(warm_start, "warm_start")
    if not isinstance(guide, RecursiveMixtureGuide):
        raise TypeError(f"fit_recursive trains a RecursiveMixtureGuide, got {type(guide).__name__}")
    clash = sorted({"num_steps", "epochs", "loss"} & set(fit_kwargs))
    if clash:
        raise TypeError(f"fit_recursive sets {clash} itself (use steps_per_component and barrier)")
    out = fit_kwargs.pop("out", None)
    stages = stage_settings(steps_per_component, guide.num_components, fit_kwargs)
    encoders = [component.encoder for component in guide.components]
    if warm_start and not all(isinstance(e, torch.nn.Module) for e in encoders):
        raise TypeError("fit_recursive(warm_start=True) copies each component's weights into the next: the "
                        "encoders must be torch modules")
    loss = RecursiveMixtureELBO(barrier)
    results = []
    for m, (num_steps, kwargs) in enumerate(stages, start=1):
        guide.num_active = m
        if warm_start and m > 1:
            try:
                encoders[m - 1].load_state_dict(encoders[m - 2].state_dict())
            except RuntimeError as err:
                raise ValueError(f"fit_recursive(warm_start=True): encoder {m - 1} does not have the architecture "
                                 f"of encoder {m - 2}: {err}") from None
        stage_out = None if out is None else Path(out) / f"component{m}"
        results.append(fit(model, guide, data, num_steps=num_steps, loss=loss, out=stage_out, **kwargs))
    return results
