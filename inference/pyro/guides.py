r"""Guides for models with energy-tilted priors (Pyro).

:class:`ShortRunPosterior` is LEBM's posterior sampler written as a guide: it runs a short Langevin chain on the
model's joint log density over its latent sites and records the result as ``Delta`` sites, so that

.. code-block:: python

    svi = SVI(model, ShortRunPosterior(model, steps=20, step_size=0.1), optim, Trace_ELBO())

takes exactly the LEBM maximum-likelihood step (Pang et al. 2020): the generator gets
:math:`\nabla \log p(x \mid z^+)` and the energy :math:`-\nabla E(z^+) + \mathbb E_{p}[\nabla E]` (the latter from the
prior's :class:`~tilted_priors.pyro.Contrastive` normalizer), with :math:`z^+` the detached posterior samples.

:class:`AmortizedGuide` is a VAE encoder written as a guide: a reparameterised diagonal Gaussian at each latent
site, inside the site's plates. With the prior's :class:`~tilted_priors.pyro.SelfNormalized` normalizer,
``SVI(model, AmortizedGuide(model, encoder), optim, Trace_ELBO())`` maximises the SNELBO (Senetaire et al.).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from tilted_priors.inference.pyro._amortized import AmortizedGuide
from tilted_priors.inference.pyro._log_joint import BaseDraws, LogJoint, Substitute, is_real, trace_log_joint
from tilted_priors.inference.pyro.handlers import normalizer, sampler
from tilted_priors import _adapt
from tilted_priors._compat import pyro_am_i_wrapped
from tilted_priors._validation import check_flag, check_positive_int
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.pyro import ShortRunLangevin, Unnormalized
from tilted_priors.pyro._tracing import GraphCache

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide"]


class ShortRunPosterior:
    r"""Short-run Langevin posterior as a guide (LEBM; Pang et al. 2020).

    On each call it finds the model's latent sites (a trace of the model under the same arguments), starts a chain
    at ``init``, runs ``sampler`` (default ``ShortRunLangevin(steps, step_size)``, ``step_size="auto"``) on the
    **unnormalised** joint log density

    .. math:: \log \tilde p(x, z) = \sum_{\text{sites}} \log p(\cdot) \text{ with every tilted prior's normalizer off}

    (:func:`~tilted_priors.inference.pyro.handlers.normalizer` with :class:`~tilted_priors.pyro.Unnormalized`; :math:`\log Z`
    is constant in :math:`z`), and records the final state as ``Delta`` sites (log density 0) inside the model's
    plates. Its parameters are not trained: the samples are detached, as in LEBM.

    When every latent site sits in one plate (the data plate), each member of it runs its own chain on its own
    term of the joint, :math:`\log \tilde p(x_i, z_i)` (``per_datum=True``): ULA moves are the same as those of
    one chain on the summed joint (LEBM's), and ``MALA`` accepts or rejects each datum's move on its own. Otherwise
    all latent sites form one chain.

    The default ``step_size="auto"`` scales the chain's step size to the posterior on every call (see
    :class:`~tilted_priors.pyro.ShortRunLangevin`), so the guide suits models whose latents are not on LEBM's
    scale; pass ``step_size=0.1`` for LEBM's chain. A chain that hardly moves (root-mean-square displacement under
    :math:`10^{-3}` of its starting points' spread: too small a step size) warns once per guide, naming
    ``step_size`` and ``steps``; a chain that diverges raises :class:`~tilted_priors.ChainDivergenceError` naming
    the guide and its sites.

    Parameters
    ----------
    model : callable
        The Pyro model; the guide is called with the model's arguments.
    steps, step_size : int, float or "auto"
        Of the default ULA sampler (LEBM: 20 x 0.1; default 20 x ``"auto"``).
    init : {"noise", "prior", "persistent"} or callable
        Where chains start: ``"noise"`` draws tilted sites from their base (LEBM's :math:`\mathcal N(0, I)`) and
        other latent sites from their prior; ``"prior"`` from the prior itself (the tilted prior's own sampler);
        a guide (callable with the model's arguments) starts from its sample (e.g. an amortised encoder);
        ``"persistent"`` continues per-datum chains from the previous visit of each datum, which needs
        ``num_data`` and an ``index`` keyword (the data indices of the batch, which the model must accept too)
        and keeps the chains in :meth:`state_dict`.
    sampler : sampler, optional
        Overrides ``steps`` / ``step_size`` (e.g. ``MALA(50, 0.05)``).
    num_data : int, optional
        Data set size, for ``init="persistent"``; sites' first dimension must index the batch.
    per_datum : bool
        One chain per member of the plate all latent sites share (the outermost, if several). This assumes the
        joint factorises over that plate: sites outside it must not depend on its latents (their log density is
        shared out evenly over the chains, which is right only when it is constant in them). ``False``: one
        joint chain (one accept for the whole batch under ``MALA``).
    compile_log_joint : bool
        Replay the log joint's value and gradient from a graph of torch operations traced once per argument
        shapes (see below) instead of running the model at every step. ``False``: run the model at every step
        (e.g. to stop at a breakpoint inside it during the chain).

    Notes
    -----
    **Compiled log joint.** A Pyro model's Python (effect handlers, ``pyro.module`` lookups, distributions built and
    validated) can cost several times its arithmetic on small models, and the chain runs it at every step. With
    ``compile_log_joint=True`` the second call with given argument shapes traces the log joint and its gradient
    (``torch.fx``'s ``make_fx``, Pyro's validation off; the first call runs eagerly) and every later step replays
    that graph: the same operations, the same numbers, without the model's Python (except, on the CPU, transposed
    convolutions of 1 x 1 inputs or to a few channels, an image generator's first and last layers, which replay as
    the matrix products they are, several times faster and equal to rounding). The model still runs eagerly,
    validated, once per call (the chains' starting trace), and the graph's value is compared with the eager log
    joint's at the start of every chain, so a parameter re-assigned or a setting changed between calls makes it
    trace again. A model whose
    Python reads tensor values (``if z.sum() > 0``), or whose log joint is random, cannot be replayed and runs
    eagerly at every step, as with ``compile_log_joint=False``. Print statements and breakpoints inside the model
    run only when it is traced.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from tilted_priors.pyro import EnergyTiltedNormal, EnergyMLP
    >>> energy = EnergyMLP(2, 16)
    >>> def model(x):
    ...     pyro.module("energy", energy)
    ...     with pyro.plate("data", x.shape[0]):
    ...         z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2)))
    ...         pyro.sample("x", dist.Normal(z, 0.3).to_event(1), obs=x)
    >>> guide = ShortRunPosterior(model, steps=20, step_size=0.1)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    >>> loss = svi.step(torch.randn(8, 2))
    >>> guide(torch.randn(8, 2))["z"].shape
    torch.Size([8, 2])
    """

    def __init__(self, model: Callable, steps: int = 20, step_size: float | str = "auto", init="noise", *,
                 sampler=None, num_data: int | None = None, per_datum: bool = True, compile_log_joint: bool = True):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.compile_log_joint = check_flag(compile_log_joint, "compile_log_joint")
        self._graphs = GraphCache()  # the traced log joints, one per argument shapes
        self._warned = False  # the chain-did-not-move warning is given once per guide
        self.per_datum = check_flag(per_datum, "per_datum")
        self.sampler = ShortRunLangevin(steps, step_size) if sampler is None else sampler
        if isinstance(self.sampler, type) or not callable(getattr(self.sampler, "run", None)):
            raise TypeError(f"sampler must be a sampler instance with .run(log_density, init) (e.g. "
                            f"MALA(20, 0.1)), got {self.sampler!r}")
        if not (callable(init) or init in ("noise", "prior", "persistent")):
            raise ValueError(f"init must be 'noise', 'prior', 'persistent' or a guide, got {init!r}")
        self.init = init
        self.num_data = None
        if init == "persistent":
            if num_data is None:
                raise ValueError("init='persistent' keeps one chain per datum: give num_data (the data set size)")
            self.num_data = check_positive_int("num_data", num_data)
        self._chains: dict[str, torch.Tensor] = {}
        self._seen: torch.Tensor | None = None

    # --- where chains start --------------------------------------------------------------------------------
    def _start_trace(self, args, kwargs, guide_trace: poutine.Trace | None = None) -> poutine.Trace:
        """The model's trace at the chains' start (values of ``guide_trace`` where given)."""
        model = self.model if self.init == "prior" else sampler(self.model, BaseDraws())
        with poutine.block(), torch.no_grad():
            if guide_trace is None and callable(self.init):
                guide_trace = poutine.trace(self.init).get_trace(*args, **kwargs)
            if guide_trace is not None:
                model = poutine.replay(model, trace=guide_trace)
            return poutine.trace(model).get_trace(*args, **kwargs)

    @staticmethod
    def _latent_sites(trace: poutine.Trace) -> dict:
        sites = {name: site for name, site in trace.nodes.items()
                 if site["type"] == "sample" and not site["is_observed"]
                 and not site_is_subsample(site)}
        if not sites:
            raise ValueError("ShortRunPosterior found no latent sample site in the model")
        for name, site in sites.items():
            if not is_real(site["fn"].support):
                raise ValueError(f"ShortRunPosterior runs Langevin chains on real-valued latents, but site "
                                 f"{name!r} has support {site['fn'].support}; reparameterise it onto the real line "
                                 "or use NUTS")
        return sites

    def _persistent_start(self, values: dict, kwargs) -> torch.Tensor:
        index = kwargs.get("index")
        if index is None:
            raise ValueError("init='persistent' needs the batch's data indices: call the model and guide with "
                             "index=<indices> (fit(..., pass_index=True) does this)")
        # The chains' bookkeeping lives on the device of the latents (a checkpoint is read back on the CPU).
        device = next(iter(values.values())).device
        index = torch.as_tensor(index, dtype=torch.long, device=device)
        if index.dim() != 1 or (index.numel() and (index.min() < 0 or index.max() >= self.num_data)):
            raise ValueError(f"index must be a 1-d array of data indices in [0, {self.num_data}), got {index}")
        if self._seen is None:
            self._seen = torch.zeros(self.num_data, dtype=torch.bool, device=device)
        self._seen = self._seen.to(device)
        seen = self._seen[index]
        for name, value in values.items():
            if value.shape[:1] != index.shape:
                raise ValueError(f"init='persistent': site {name!r} has shape {tuple(value.shape)}, whose first "
                                 f"dimension should index the batch of {index.numel()} data")
            store = self._chains.get(name)
            if store is None:
                store = value.new_zeros((self.num_data,) + value.shape[1:])
            store = self._chains[name] = store.to(dtype=value.dtype, device=value.device)
            keep = seen.reshape((-1,) + (1,) * (value.dim() - 1))
            values[name] = torch.where(keep, store[index], value)
        return index

    # --- the chain -----------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        trace = self._start_trace(args, kwargs)
        sites = self._latent_sites(trace)
        plate = self._chain_plate(sites)
        return self._run(trace, sites, self._log_joint(trace, args, kwargs, plate), kwargs, plate=plate)

    def _chain_plate(self, sites: dict) -> tuple | None:
        """``(name, dim, size)`` of the plate whose members run one chain each (see :attr:`per_datum`), or None."""
        if not self.per_datum:
            return None
        common = None
        for site in sites.values():
            batch = site["value"].shape[:site["value"].dim() - site["fn"].event_dim]
            frames = {f.name: (f.dim, f.size) for f in site["cond_indep_stack"]
                      if f.vectorized and len(batch) >= -f.dim and batch[f.dim] == f.size}
            common = frames if common is None else {n: f for n, f in common.items() if frames.get(n) == f}
        if not common:
            return None
        name = min(common, key=lambda n: common[n][0])  # the outermost
        return (name,) + common[name]

    def _log_joint(self, trace: poutine.Trace, args, kwargs, plate: tuple | None = None) -> "LogJoint":
        """``values -> log p~(x, z = values)``: the model's unnormalised joint, the plates' subsamples of ``trace``.

        With ``plate = (name, dim, size)`` it is per member of that plate, shape ``(size,)``: each site's log density
        summed over every other dimension; a site outside the plate is shared out evenly (constant in the chain's
        latents, by the factorisation :attr:`per_datum` assumes)."""
        model = normalizer(self.model, Unnormalized())
        subsamples = {name: site["value"] for name, site in trace.nodes.items()
                      if site_is_subsample(site)}

        def log_joint(values: dict, args, kwargs, subsamples) -> torch.Tensor:
            joint = Substitute({**subsamples, **values}, plate)
            with poutine.block():
                joint(model)(*args, **kwargs)
            return joint.total

        return LogJoint(log_joint, (args, kwargs, subsamples))

    def _run(self, trace: poutine.Trace, sites: dict, log_joint: "LogJoint", kwargs,
             whiten: dict | None = None, plate: tuple | None = None) -> dict:
        """Run the chain from the latent values of ``trace`` and record its final state.

        ``whiten``: ``{site: (loc, scale)}``; the chain then runs in :math:`u = (z - loc) / scale` (a diagonal
        preconditioner; the Jacobian is constant). ``plate``: from :meth:`_chain_plate`; the chains' positions are
        then ``(size, d)``, one row per member (``log_joint`` must be per member too)."""
        start = {name: site["value"].detach() for name, site in sites.items()}
        index = self._persistent_start(start, kwargs) if self.init == "persistent" else None
        names = list(start)
        shift = {n: (0.0, 1.0) if whiten is None else tuple(t.detach() for t in whiten[n]) for n in names}
        # Where each site's plate axis is (None for one joint chain).
        axes = {n: None if plate is None else start[n].dim() - sites[n]["fn"].event_dim + plate[1] for n in names}
        lead = () if plate is None else (plate[2],)
        shapes = {n: start[n].shape if axes[n] is None else start[n].movedim(axes[n], 0).shape for n in names}
        sizes = [start[n].numel() // max(1, math.prod(lead)) for n in names]

        def flatten(values: dict) -> torch.Tensor:
            parts = [values[n] if whiten is None else (values[n] - shift[n][0]) / shift[n][1] for n in names]
            parts = [v if not axes[n] else v.movedim(axes[n], 0) for n, v in zip(names, parts)]
            return torch.cat([v.reshape(lead + (-1,)) for v in parts], -1)

        def unflatten(flat: torch.Tensor, shift: dict) -> dict:
            values = {n: v.reshape(shapes[n]) for n, v in zip(names, flat.split(sizes, -1))}
            values = {n: v if not axes[n] else v.movedim(0, axes[n]) for n, v in values.items()}
            return values if whiten is None else {n: shift[n][0] + shift[n][1] * v for n, v in values.items()}

        def log_density(u: torch.Tensor, inputs: tuple, shift: dict) -> torch.Tensor:
            return log_joint.fn(unflatten(u, shift), *inputs)

        flat = flatten(start)
        if self.compile_log_joint:  # the chain replays a graph of the model's log joint (see the class notes)
            key = (tuple(names), tuple(shapes.values()), tuple(sizes), tuple(axes.values()), plate)
            reference = None
            if whiten is None and index is None:  # the chains start at the trace's values: its sites give the joint
                reference = (flat, lambda: trace_log_joint(trace, plate))
            density = self._graphs.log_density(log_density, (log_joint.inputs, shift), key, reference)
        else:
            density = functools.partial(log_density, inputs=log_joint.inputs, shift=shift)
        try:
            moved = self.sampler.run(density, flat)
        except ChainDivergenceError as err:  # say which chain it was
            raise err.add_context(label=f"the posterior guide {type(self).__name__}, sites {names}")
        self._check_moved(flat, moved)
        result = unflatten(moved, shift)

        if index is not None:
            for name, value in result.items():
                self._chains[name][index] = value
            self._seen[index] = True
        plates: dict[str, pyro.plate] = {}  # one plate object per call, re-entered by every site in it
        for name, value in result.items():
            self._record(trace, sites[name], value, plates)
        return result

    def _check_moved(self, start: torch.Tensor, end: torch.Tensor) -> None:
        """Warn (once per guide) when the chain's displacement is negligible against its starting points' spread."""
        if self._warned:
            return
        with torch.no_grad():
            flat = start.reshape(-1, start.shape[-1]) if start.dim() > 1 else start.reshape(1, -1)
            spread = (flat.var(0, unbiased=False).mean() if flat.shape[0] > 1 else flat.var(unbiased=False)).sqrt()
            scale = torch.where(spread > 0, spread, start.square().mean().sqrt())
            displacement = (end - start).square().mean().sqrt()
        message = _adapt.stuck_message(type(self).__name__, float(displacement), float(scale), self.sampler)
        if message is not None:
            self._warned = True
            warnings.warn(message, UserWarning, stacklevel=4)

    @staticmethod
    def _record(trace: poutine.Trace, site: dict, value: torch.Tensor, plates: dict) -> None:
        """``pyro.sample(name, Delta(value))`` inside the plates the model put the site in."""
        with contextlib.ExitStack() as stack:
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    continue
                if frame.name not in plates:
                    sub = trace.nodes.get(frame.name, {}).get("value")
                    plates[frame.name] = pyro.plate(frame.name, frame.full_size or frame.size, dim=frame.dim,
                                                    subsample=sub if torch.is_tensor(sub) else None)
                stack.enter_context(plates[frame.name])
            pyro.sample(site["name"], dist.Delta(value, event_dim=site["fn"].event_dim))

    # --- persistent chains in checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The persistent chains (arrays only; empty unless ``init='persistent'``)."""
        out = {f"chains.{name}": value.clone() for name, value in self._chains.items()}
        if self._seen is not None:
            out["seen"] = self._seen.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._chains = {k[len("chains."):]: v.clone() for k, v in state.items() if k.startswith("chains.")}
        self._seen = state["seen"].clone() if "seen" in state else None

    def __repr__(self) -> str:
        return f"ShortRunPosterior(sampler={self.sampler!r}, init={self.init!r})"


# --- the MCMC-refined amortised guide ----------------------------------------------------------------------------
def _loc_scale(fn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loc, scale)`` of a (possibly ``Independent``) Normal, else ``None``."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return (fn.loc, fn.scale) if isinstance(fn, dist.Normal) else None


class RefinedGuide:
    r"""An amortised guide whose sample is refined by a few Langevin steps on the true posterior (Hoffman 2017).

    On each call the encoder guide draws :math:`z_0 \sim q_\phi(z \mid x)`; a short chain (default
    ``ShortRunLangevin(steps, step_size)``) then runs from :math:`z_0` on the model's **unnormalised** joint
    :math:`\log \tilde p(x, z)` (every tilted prior's normalizer off) and its final state :math:`z_K` is recorded as
    ``Delta`` sites inside the model's plates, as :class:`ShortRunPosterior` does. With ``Trace_ELBO`` the two parts
    learn from different objectives:

    - the model (decoder, energy, the prior's normalizer) from the refined, detached :math:`z_K`: the gradient of
      :math:`\log p_\theta(x, z_K)`, with the energy's :math:`\nabla \log Z` from the prior's normalizer
      (``Contrastive`` or ``SelfNormalized``), as in LEBM;
    - the encoder from its own ELBO, :math:`\nabla_\phi\, \mathbb E_{q_\phi}[\log \tilde p_\theta(x, z) -
      \log q_\phi(z \mid x)]` (pathwise), with no gradient from it to the model (an auxiliary ``pyro.factor``
      site ``f"{name}.encoder_elbo"`` of value 0 that carries exactly this gradient, so the reported loss is the
      model's term alone).

    With ``whiten=True`` (default) and a Normal encoder the chain runs in the encoder's coordinates
    :math:`u = (z - \mu_\phi(x)) / \sigma_\phi(x)` (a diagonal preconditioner), so ``step_size`` is in units of
    the encoder's scale and fits every datum and latent dimension alike.

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
    compile_log_joint : bool
        Replay the chain's log joint from a traced graph (see :class:`ShortRunPosterior`).

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
    ...         z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2),
    ...                                                 normalizer=SelfNormalized(64)))
    ...         pyro.sample("x", dist.Normal(z, 0.3).to_event(1), obs=x)
    >>> encoder = lambda x: (pyro.param("w", torch.ones(2)) * x, torch.full_like(x, 0.3))
    >>> guide = RefinedGuide(AmortizedGuide(model, encoder), steps=5, step_size=0.3)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    >>> loss = svi.step(torch.randn(8, 2))
    >>> "w" in pyro.get_param_store(), guide(torch.randn(8, 2))["z"].shape
    (True, torch.Size([8, 2]))
    """

    def __init__(self, guide: Callable, steps: int = 10, step_size: float = 0.2, *, sampler=None,
                 whiten: bool = True, per_datum: bool = True, name: str = "refined", compile_log_joint: bool = True):
        model = getattr(guide, "model", None)
        if not callable(guide) or not callable(model):
            raise TypeError("RefinedGuide refines a guide that knows its model, e.g. AmortizedGuide(model, "
                            f"encoder); got {type(guide).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.guide, self.model, self.whiten, self.name = guide, model, check_flag(whiten, "whiten"), name
        self._posterior = ShortRunPosterior(model, steps, step_size, init=guide, sampler=sampler,
                                            per_datum=per_datum, compile_log_joint=compile_log_joint)
        self.sampler = self._posterior.sampler

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        # The encoder's draw: its params reach SVI (trained), its sample sites do not (replaced by the refined ones).
        with poutine.block(hide_types=["sample"]):
            guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
        trace = self._posterior._start_trace(args, kwargs, guide_trace)
        sites = self._posterior._latent_sites(trace)
        missing = [n for n in sites if n not in guide_trace.nodes or guide_trace.nodes[n]["type"] != "sample"]
        if missing:
            raise ValueError(f"RefinedGuide: the guide gives no sample at the model's latent sites {missing}")
        z = {n: guide_trace.nodes[n]["value"] for n in sites}
        plate = self._posterior._chain_plate(sites)
        log_joint = self._posterior._log_joint(trace, args, kwargs, plate)
        self._encoder_elbo(guide_trace, z, log_joint)
        whiten = None
        if self.whiten:
            whiten = {n: _loc_scale(guide_trace.nodes[n]["fn"]) for n in sites}
            if any(v is None for v in whiten.values()):
                raise ValueError("RefinedGuide(whiten=True) needs a Normal at every site of the guide; pass "
                                 "whiten=False for another guide")
        return self._posterior._run(trace, sites, log_joint, kwargs, whiten, plate)

    def _encoder_elbo(self, guide_trace, z: dict, log_joint: Callable[[dict], torch.Tensor]) -> None:
        r"""Add the auxiliary site whose gradient is :math:`-\nabla_\phi` ELBO and whose value is 0.

        :math:`\nabla_\phi \log \tilde p(x, z_\phi) = g^\top \partial z_\phi / \partial \phi` with
        :math:`g = \nabla_z \log \tilde p(x, z)` taken alone (no gradient to the model's parameters)."""
        if not torch.is_grad_enabled() or not pyro_am_i_wrapped():  # nothing would record the site
            return
        leaves = {n: v.detach().requires_grad_() for n, v in z.items()}
        grads = torch.autograd.grad(log_joint(leaves).sum(), list(leaves.values()), allow_unused=True)
        guide_trace.compute_log_prob()
        log_q = sum(guide_trace.nodes[n]["log_prob_sum"] for n in z)
        surrogate = sum((g * z[n]).sum() for n, g in zip(z, grads) if g is not None) - log_q
        pyro.factor(f"{self.name}.encoder_elbo", -(surrogate - surrogate.detach()), has_rsample=True)

    def __repr__(self) -> str:
        return f"RefinedGuide({self.guide!r}, sampler={self.sampler!r}, whiten={self.whiten})"
