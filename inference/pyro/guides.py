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
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.util import scale_and_mask
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import is_validation_enabled

from tilted_priors.inference.pyro.handlers import map_tilted, normalizer, sampler
from tilted_priors.inference.pyro.modules import register_module
from tilted_priors import _adapt
from tilted_priors._compat import pyro_am_i_wrapped
from tilted_priors._validation import check_positive_int
from tilted_priors.errors import ChainDivergenceError
from tilted_priors.pyro import ShortRunLangevin, Unnormalized
from tilted_priors.pyro._tracing import GraphCache

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide"]


class _BaseDraws:
    """A sampler that does not move: the tilted site's value is a draw from its base (the "noise" start)."""

    def run(self, log_density, init, **kwargs):
        return init


class _Substitute(Messenger):
    """Set the latent sites in ``values`` and add up the log density of every sample site (scaled and masked).

    Lighter than ``trace`` + ``condition``: the chain runs the model once per gradient and keeps nothing else.
    """

    def __init__(self, values: dict[str, torch.Tensor], plate: tuple | None = None):
        super().__init__()
        self.values = values
        self.plate = plate  # (name, dim, size): add up per member of this plate instead
        self.total = 0.0

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        if type(msg["fn"]).__name__ == "_Subsample":  # a plate's indices: the same as in the start trace
            msg["value"] = self.values.get(msg["name"], msg["value"])
            return
        if not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
        self.total = self.total + _joint_term(msg, self.plate)


def _joint_term(site: dict, plate: tuple | None) -> torch.Tensor:
    """A sample site's (message's or trace node's) term of the joint: its log density, scaled and masked, summed
    (per member of ``plate``, see :func:`_per_member`)."""
    lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
    return lp.sum() if plate is None else _per_member(lp, site["cond_indep_stack"], plate)


def _trace_log_joint(trace: poutine.Trace, plate: tuple | None) -> torch.Tensor:
    """The unnormalised log joint at the values of ``trace`` from its sites (every tilted prior's normalizer off),
    as :class:`_Substitute` adds it up, without running the model again."""
    unnormalized = Unnormalized()
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample":
            fn = map_tilted(site["fn"], lambda d: d.replace(normalizer=unnormalized))
            total = total + _joint_term({**site, "fn": fn}, plate)
    return total


def _per_member(log_prob, frames, plate: tuple) -> torch.Tensor:
    """A site's log density summed to one value per member of ``plate`` (``(name, dim, size)``); a site outside
    the plate, or not broadcast along it, is shared out evenly."""
    name, dim, size = plate
    log_prob = torch.as_tensor(log_prob)
    if any(f.name == name for f in frames) and log_prob.dim() >= -dim and log_prob.shape[dim] == size:
        return log_prob.movedim(dim, 0).reshape(size, -1).sum(-1)
    return log_prob.sum().div(size).expand(size)


class _LogJoint(NamedTuple):
    """The model's unnormalised log joint ``fn(values, *inputs)`` and the call's tensors it reads (``inputs``: the
    model's arguments and the plates' subsamples), which a traced chain passes to its graph."""

    fn: Callable[..., torch.Tensor]
    inputs: tuple

    def __call__(self, values: dict) -> torch.Tensor:
        return self.fn(values, *self.inputs)


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


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
    that graph: the same operations, the same numbers, without the model's Python. The model still runs eagerly, validated, once per call (the
    chains' starting trace), and the graph's value is compared with the eager log joint's at the start of every
    chain, so a parameter re-assigned or a setting changed between calls makes it trace again. A model whose
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
        self.compile_log_joint = bool(compile_log_joint)
        self._graphs = GraphCache()  # the traced log joints, one per argument shapes
        self._warned = False  # the chain-did-not-move warning is given once per guide
        self.per_datum = bool(per_datum)
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
        model = self.model if self.init == "prior" else sampler(self.model, _BaseDraws())
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
                 and type(site["fn"]).__name__ != "_Subsample"}
        if not sites:
            raise ValueError("ShortRunPosterior found no latent sample site in the model")
        for name, site in sites.items():
            if not _is_real(site["fn"].support):
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

    def _log_joint(self, trace: poutine.Trace, args, kwargs, plate: tuple | None = None) -> "_LogJoint":
        """``values -> log p~(x, z = values)``: the model's unnormalised joint, the plates' subsamples of ``trace``.

        With ``plate = (name, dim, size)`` it is per member of that plate, shape ``(size,)``: each site's log density
        summed over every other dimension; a site outside the plate is shared out evenly (constant in the chain's
        latents, by the factorisation :attr:`per_datum` assumes)."""
        model = normalizer(self.model, Unnormalized())
        subsamples = {name: site["value"] for name, site in trace.nodes.items()
                      if site["type"] == "sample" and type(site["fn"]).__name__ == "_Subsample"}

        def log_joint(values: dict, args, kwargs, subsamples) -> torch.Tensor:
            joint = _Substitute({**subsamples, **values}, plate)
            with poutine.block():
                joint(model)(*args, **kwargs)
            return joint.total

        return _LogJoint(log_joint, (args, kwargs, subsamples))

    def _run(self, trace: poutine.Trace, sites: dict, log_joint: "_LogJoint", kwargs,
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
                with torch.no_grad():
                    reference = (flat, _trace_log_joint(trace, plate))
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


# --- the amortised guide ---------------------------------------------------------------------------------------
LocScale = tuple[torch.Tensor, torch.Tensor]
EncoderOutput = Union[LocScale, dict[str, LocScale]]

_MAX_STRUCTURES = 8  # model structures cached per guide (one per distinct argument shapes)


def _is_subsample(msg) -> bool:
    return type(msg["fn"]).__name__ == "_Subsample"


class _GivenSubsamples(Messenger):
    """Note the plates whose subsample indices the model passes itself (``pyro.plate(name, n, subsample=idx)``)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def _process_message(self, msg):
        if msg["type"] == "sample" and _is_subsample(msg) and msg["value"] is not None:
            self.names.add(msg["name"])


@dataclass(frozen=True)
class _Site:
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

    sites: dict[str, _Site]
    plates: dict[str, CondIndepStackFrame]
    given: dict[str, torch.Tensor]


def _model_structure(model: Callable, args, kwargs) -> _Structure:
    """Trace ``model`` cheaply: tilted sites take a draw from their base (no prior chain), normalizers are off."""
    given = _GivenSubsamples()
    cheap = sampler(normalizer(given(model), Unnormalized()), _BaseDraws())
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(cheap).get_trace(*args, **kwargs)
    sites, plates = {}, {}
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or node["is_observed"] or _is_subsample(node):
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
        sites[name] = _Site(value.shape, node["fn"].event_dim, tuple(frames), node["fn"].support, value.dtype,
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


def _make_plates(structure: _Structure) -> dict[str, pyro.plate]:
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


def _select(t: torch.Tensor, site: _Site, plates: dict) -> torch.Tensor:
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
        if isinstance(sites, str):
            sites = (sites,)
        if sites is not None:
            sites = tuple(sites)
            if not sites or not all(isinstance(s, str) for s in sites) or len(set(sites)) != len(sites):
                raise ValueError(f"sites must be a site name or a non-empty sequence of distinct names, got {sites!r}")
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
        unknown = [n for n in out if n not in structure.sites]
        if unknown:
            raise ValueError(f"AmortizedGuide covers sites {unknown}, but the model has no latent site of that name "
                             f"(its latent sites: {latent})")
        uncovered = [n for n in latent if n not in out]
        if uncovered:
            raise ValueError(f"AmortizedGuide covers sites {list(out)} but the model also has latent sites "
                             f"{uncovered}; give an encoder for them")
        for n, pair in out.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"the encoder must give (loc, scale) for site {n!r}, got {type(pair).__name__}")
            if not _is_real(structure.sites[n].support):
                raise ValueError(f"AmortizedGuide places a Normal on real-valued latents, but site {n!r} has support "
                                 f"{structure.sites[n].support}; constrained latents are not supported yet "
                                 "(reparameterise the site onto the real line)")
        return {n: tuple(out[n]) for n in latent}

    @staticmethod
    def _check(name: str, loc: torch.Tensor, scale: torch.Tensor, site: _Site) -> None:
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
            out[name] = _select(loc, site, plates), _select(scale, site, plates)
            self._check(name, *out[name], site)
        return out

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        structure = self._structure(args, kwargs)
        plates = _make_plates(structure)
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
        self.guide, self.model, self.whiten, self.name = guide, model, bool(whiten), name
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
