"""``fit``: the training loop around Pyro's own ``SVI`` — minibatches, per-prefix learning rates with an
exponential schedule, gradient clipping, a divergence guard, atomic checkpoints with bit-identical resume, a
metrics history and a progress bar. The NumPyro twin is :func:`tilted_priors.inference.numpyro.train.fit`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import zero_grads
from pyro.poutine.util import site_is_subsample

from tilted_priors._validation import check_flag
from tilted_priors.inference._health import TrainingHealth
from tilted_priors.inference._plan import TrainingPlan, make_plan, no_latents_error
from tilted_priors.inference._training import (CHECKPOINT_FIX, FitResult, StepReport, TrainingDiverged, run_training,
                                                warn_evaluation_normalizers)
from tilted_priors.inference.checkpoints import CheckpointError, make_manifest, read_file, verify_manifest
from tilted_priors.inference.pyro._distributed import ProcessGroup, ShardScale, process_group, resolve_device
from tilted_priors.inference.pyro._fit_state import (FitAdam, as_numpy, derived_seed, load_extra_state,
                                                     module_extra_state, nonfinite_as_floating_point_error,
                                                     rng_state, set_rng_state)
from tilted_priors.inference.pyro.modules import structure_trace, warn_unregistered_modules

__all__ = ["fit", "FitResult", "TrainingDiverged", "TrainingHealth"]


def _empty_guide(*args, **kwargs) -> None:
    """The guide of ``fit(model, None, data)``: nothing to infer (every sample site of the model is observed)."""
    return None


def _evaluation_normalizers(trace: poutine.Trace) -> dict:
    """The traced model's tilted sites whose normalizer is meant for evaluation: ``{site: class name}``."""
    from tilted_priors.inference.pyro.handlers import find_tilted
    from tilted_priors.pyro import AnnealedImportance, Importance

    found = {}
    for name, site in trace.nodes.items():
        tilted = find_tilted(site["fn"]) if site["type"] == "sample" else None
        if tilted is not None and isinstance(tilted.normalizer, (Importance, AnnealedImportance)):
            found[name] = type(tilted.normalizer).__name__
    return found


def _latent_sites(trace: poutine.Trace) -> list[str]:
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
            and not site["infer"].get("is_auxiliary")]


class _PyroTrainer:
    def __init__(self, model, guide, loss, plan: TrainingPlan, group: ProcessGroup | None = None,
                 device: torch.device | None = None):
        self.check_latents = guide is None
        guide = _empty_guide if guide is None else guide
        self.model, self.guide, self.loss, self.plan = model, guide, loss, plan
        self.group, self.device = group, device
        self.is_writer = group is None or group.is_writer
        self.data = [torch.as_tensor(a, dtype=torch.get_default_dtype(), device=device) for a in plan.arrays]
        self.optim = FitAdam(plan, group)
        self.scale = None
        if group is not None:  # each process's loss: its shard's terms and 1/W of the global ones
            self.scale = ShardScale(local_size=plan.batch_size // group.world, world=group.world)
            model, guide = self.scale(model), self.scale(guide)
        self.svi = SVI(model, guide, self.optim, loss=loss)
        self.names: list[str] = []
        self._rng_ranks: list[torch.Tensor] | None = None

    def _kwargs(self, idx: np.ndarray) -> tuple[tuple, dict]:
        if self.group is not None:
            idx = self.group.shard(idx, self.plan.batch_size)
        index = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        args, kwargs = self.plan.call([a[index] for a in self.data])
        return args, ({**kwargs, "index": index} if self.plan.pass_index else kwargs)

    def read(self, path: Path):
        ckpt = read_file(path, lambda p: torch.load(p, weights_only=True, map_location="cpu"), what="checkpoint",
                         fix=CHECKPOINT_FIX)
        if not isinstance(ckpt, dict) or "manifest" not in ckpt or "payload" not in ckpt:
            raise CheckpointError(path, "it is not a checkpoint written by fit (no manifest)", CHECKPOINT_FIX)
        try:
            manifest = json.loads(ckpt["manifest"])
        except (TypeError, ValueError):
            raise CheckpointError(path, "its manifest is damaged", CHECKPOINT_FIX) from None
        verify_manifest(path, ckpt["payload"], manifest, kind="checkpoint", backend="pyro", as_array=as_numpy,
                        require_finite=True)
        return ckpt["payload"], ckpt["payload"]

    def setup(self, idx: np.ndarray, payload) -> list[str]:
        # Run the loss once so that every parameter exists (AutoGuides and pyro.module create them lazily);
        # a resumed run then overwrites them in place and restores the optimizer state and the RNGs.
        args, kwargs = self._kwargs(idx)
        model_trace = None
        if self.check_latents:  # seeded: params the model creates here start from the seed
            pyro.set_rng_seed(self.plan.seed)
            with nonfinite_as_floating_point_error():
                model_trace = structure_trace(self.model, args, kwargs)
            if _latent_sites(model_trace):
                raise no_latents_error(_latent_sites(model_trace))
        pyro.set_rng_seed(self.plan.seed)
        model, guide = self.svi.model, self.svi.guide
        with nonfinite_as_floating_point_error(), poutine.trace(param_only=True) as tr:
            if callable(getattr(self.loss, "loss", None)):
                self.loss.loss(model, guide, *args, **kwargs)
            else:
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                poutine.replay(model, trace=guide_trace)(*args, **kwargs)
        self.names = sorted(tr.trace.nodes)
        if self.scale is not None:
            self.scale.check_data_plate()
        with nonfinite_as_floating_point_error():  # the structure, without chains: one more run of each
            traces = [model_trace or structure_trace(self.model, args, kwargs),
                      structure_trace(self.guide, args, kwargs)]
        warn_evaluation_normalizers(_evaluation_normalizers(traces[0]))
        warn_unregistered_modules(self.model, self.guide, traces=traces)
        store = pyro.get_param_store()
        if payload is None:
            if self.group is not None:  # the same start on every process (it is seeded alike; made sure)
                unconstrained = dict(store.named_parameters())
                self.group.broadcast([unconstrained[n] for n in self.names if n in unconstrained])
            pyro.set_rng_seed(derived_seed(self.plan.seed, *self._rank()))
            return self.names
        unconstrained = dict(store.named_parameters())
        missing = sorted(set(payload["params"]) - set(unconstrained))
        if missing:
            raise CheckpointError(self.plan.checkpoint_path, f"it holds parameters {missing!r} that the model and "
                                  "guide did not create", "Resume with the model and guide that wrote it, or start "
                                  "afresh with resume=False")
        with torch.no_grad():
            for name, value in payload["params"].items():
                target = unconstrained[name]
                if target.shape != value.shape:
                    raise CheckpointError(self.plan.checkpoint_path, f"its parameter {name!r} has shape "
                                          f"{tuple(value.shape)}, the model's has {tuple(target.shape)}", "Resume "
                                          "with the model and guide that wrote it, or start afresh with resume=False")
                target.copy_(value)
        self.optim.set_state(payload["optim"])
        for key, obj in (("guide_state", self.guide), ("model_state", self.model)):
            if payload.get(key) is not None:
                load_extra_state(obj, payload[key])
        set_rng_state(payload["rng"])
        if self.group is not None:
            ranks = payload.get("rng_ranks")
            if ranks is not None and len(ranks) == self.group.world:
                torch.set_rng_state(ranks[self.group.rank])
            else:  # another number of processes wrote it: a fresh stream per process, from the step
                pyro.set_rng_seed(derived_seed(self.plan.seed, self.group.rank, int(payload["step"])))
        return self.names

    def _rank(self) -> tuple[int, ...]:
        """``(rank,)`` for processes other than rank 0 (their own random streams); ``()`` for one process."""
        return (self.group.rank,) if self.group is not None and self.group.rank else ()

    def step(self, step: int, idx: np.ndarray) -> StepReport:
        self.optim.step_index = step
        args, kwargs = self._kwargs(idx)
        if self.group is not None:
            loss = self._step_together(args, kwargs)
        else:
            with nonfinite_as_floating_point_error(training=True):
                loss = float(self.svi.step(*args, **kwargs))
        params = list(self.optim.optim_objs)
        moments = [v for opt in self.optim.optim_objs.values() for state in opt.state.values()
                   for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim()]
        checks = torch.stack([torch.isfinite(t).all() for t in params + moments]).tolist() if params else []
        norm = None if self.optim.grad_norm is None else float(self.optim.grad_norm)
        return StepReport(loss, norm, all(checks[:len(params)]), all(checks[len(params):]))

    def _step_together(self, args: tuple, kwargs: dict) -> float:
        """``SVI.step`` for one of several processes: the loss and gradients on this process's shard, one
        ``all_reduce`` that tells every process whether any failed (so that all stop together) and sums the loss,
        then the update (whose gradients ``FitAdam`` sums over the processes)."""
        failure = None
        with poutine.trace(param_only=True) as capture:
            try:
                with nonfinite_as_floating_point_error(training=True):
                    loss = float(self.svi.loss_and_grads(self.svi.model, self.svi.guide, *args, **kwargs))
            except FloatingPointError as err:
                failure, loss = err, float("nan")
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        num_failed, total = self.group.agree(failure is not None, loss, len(params))
        if num_failed:
            zero_grads(params)
            raise failure if failure is not None else FloatingPointError(
                f"{num_failed} of the {self.group.world} processes diverged in this step (see its message)")
        self.optim(params)
        zero_grads(params)
        return total

    def prepare_save(self) -> None:
        """Collect every process's random state for the checkpoint (all processes call this together)."""
        if self.group is not None:
            self._rng_ranks = self.group.gather_rng(torch.get_rng_state())

    def fingerprint(self) -> str:
        store = pyro.get_param_store()
        h = hashlib.sha256()
        for name in self._param_names():
            if self.plan.lr.rate(name) > 0:
                h.update(store[name].detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def _param_names(self) -> list[str]:
        store = pyro.get_param_store()
        names = set(self.names) | {store.param_name(p) for p in self.optim.optim_objs}
        return sorted(n for n in names if n is not None and n in store)

    def save(self, f, meta: dict) -> None:
        store = dict(pyro.get_param_store().named_parameters())
        ckpt = dict(meta)
        ckpt["params"] = {name: store[name].detach().cpu().clone() for name in self._param_names()}
        ckpt["optim"] = self.optim.full_state()
        ckpt["rng"] = rng_state()
        if self._rng_ranks is not None:
            ckpt["rng_ranks"] = self._rng_ranks
        ckpt["guide_state"] = module_extra_state(self.guide)
        ckpt["model_state"] = None if self.model is self.guide else module_extra_state(self.model)
        manifest = make_manifest(ckpt, kind="checkpoint", backend="pyro", config=meta["config"],
                                 as_array=as_numpy)
        torch.save({"manifest": json.dumps(manifest), "payload": ckpt}, f)

    def result(self):
        store = pyro.get_param_store()
        params = {name: store[name].detach().cpu().numpy().copy() for name in self._param_names()}
        return params, None


@dataclasses.dataclass(eq=False)
class _PyroFitResult(FitResult):
    """:class:`FitResult` whose :meth:`restore` writes ``params`` back into Pyro's param store."""

    _constraints: dict = dataclasses.field(default_factory=dict, repr=False)

    def restore(self) -> None:
        store = pyro.get_param_store()
        unconstrained = dict(store.named_parameters())
        with torch.no_grad():
            for name, value in self.params.items():
                constraint = self._constraints.get(name, constraints.real)
                target = unconstrained.get(name)
                value = torch.as_tensor(value)
                if target is not None and target.shape == value.shape:
                    target.copy_(torch.distributions.transform_to(constraint).inv(value.to(target.dtype)))
                else:
                    if name in store:
                        del store[name]
                    store.setdefault(name, value.clone(), constraint)


def _trained(result: FitResult, model: Callable, guide: Callable | None) -> FitResult:
    """``result`` with the model and the guide, and the constraints that :meth:`_PyroFitResult.restore` needs."""
    stored = pyro.get_param_store().get_state()["constraints"]
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    fields.update(model=model, guide=guide)
    return _PyroFitResult(**fields, _constraints={name: stored[name] for name in result.params if name in stored})


def fit(model: Callable, guide: Callable | None, data, *, epochs: int | None = None, num_steps: int | None = None,
        batch_size: int = 100, lr: float | Mapping[str, float] = 1e-4, betas: Sequence[float] = (0.5, 0.999),
        lr_decay: float = 1.0, clip_norm: float | None = None, loss: Any = None, seed: int = 0,
        out: str | Path | None = None, checkpoint_every: int | None = None, resume: bool = False,
        progress: bool = True, pass_index: bool = False, callback: Callable[[dict], Any] | None = None,
        health: bool | TrainingHealth = True, keep_checkpoints: int = 3,
        device: str | torch.device | None = None) -> FitResult:
    """Train a Pyro model and guide with Pyro's ``SVI`` on minibatches of ``data``, on one process or data-parallel
    on several (``torchrun``).

    Parameters
    ----------
    model, guide : callable
        Called by ``SVI`` as ``model(x_batch)`` / ``guide(x_batch)`` with ``x_batch`` a tensor of shape
        ``(batch_size, ...)`` in torch's default dtype (and ``index=`` when ``pass_index``); with several arrays,
        ``model(x_batch, y_batch)`` (a tuple) or ``model(x=x_batch, y=y_batch)`` (a dict). ``guide=None`` is an
        empty guide, for models whose sample sites are all observed (or that have none), e.g. a conditional
        density of ``y`` given ``x`` (``ValueError`` if the model has latent sites).
    data : numpy.ndarray, tuple or dict of numpy.ndarray
        Training data: one array of shape ``(N, ...)``, a tuple of arrays (passed positionally) or a dict of
        arrays (passed by name), all with the same first dimension ``N`` and batched together; finite, real
        (cast to float).
    epochs, num_steps : int
        Length of training: exactly one. ``epochs`` means ``epochs * (N // batch_size)`` updates. Both count
        from the start of training, also when resuming.
    batch_size : int
        Minibatch size, ``1 <= batch_size <= N``. Each epoch visits a permutation drawn from ``(seed, epoch)``
        and drops the last incomplete batch.
    lr : float or dict of str to float
        Adam learning rate, or rates by parameter-name prefix (longest prefix wins, ``""`` is the default),
        matched against param-store names such as ``"energy$$$net.0.weight"`` or ``"snl_b"``. LEBM:
        ``{"energy": 2e-5, "": 1e-4}``. A rate of 0 freezes its group.
    betas : pair of float
        Adam's ``(beta1, beta2)``; LEBM uses ``(0.5, 0.999)``.
    lr_decay : float
        Multiplicative decay per epoch: update ``k`` (0-based) uses ``lr * lr_decay ** (k // (N // batch_size))``
        (a staircase exponential schedule, as ``torch.optim.lr_scheduler.ExponentialLR`` stepped once per epoch;
        LEBM: 0.998). The same holds after a resume.
    clip_norm : float, optional
        Clip the global norm of the gradients of all parameters updated in a step to this value.
    loss : pyro.infer.ELBO, optional
        Default ``Trace_ELBO()``.
    seed : int
        Seeds the minibatch order and Pyro's RNGs (``pyro.set_rng_seed``: torch, ``random``, numpy).
    out : str or Path, optional
        Directory for ``checkpoint.pt`` and ``history.json``; nothing is written when ``None``.
    checkpoint_every : int, optional
        Write a checkpoint every this many updates (needs ``out``); one is always written at the end. Each
        checkpoint carries a manifest (format version, backend, package version, config hash, every array's
        dtype and shape, a checksum) that is verified when it is read.
    resume : bool
        Continue from ``out/checkpoint.pt`` if it exists (else start afresh); a damaged or non-finite
        ``checkpoint.pt`` is passed over, with a warning, for the newest kept one. The result is bit-identical to a run
        that was never interrupted: parameters, Adam moments and step counts, the schedule's position, the RNG
        states and ``guide.state_dict()`` (if the guide has one) are restored. ``seed``, ``batch_size`` and the
        data's shapes (and their tuple or dict structure) must match; learning rates, ``clip_norm`` and the length
        may change.
    progress : bool
        Show a tqdm bar with the loss and the speed.
    pass_index : bool
        Also pass ``index=`` (a ``torch.long`` tensor with the batch's data indices) to the model and guide,
        for guides that keep per-datum state such as persistent chains.
    callback : callable, optional
        Called after every update with the history record (a dict); returning ``True`` stops training (a final
        checkpoint is still written).
    health : bool or TrainingHealth
        The checks that stop a training gone wrong beyond non-finite values (a loss or gradient norm that jumps
        by orders of magnitude, parameters that stop changing): ``True`` (default) with the default settings of
        :class:`~tilted_priors.inference.pyro.TrainingHealth`, ``False`` for none, or your own settings.
    keep_checkpoints : int
        How many checkpoints to keep: ``checkpoint.pt`` and the previous ones as ``checkpoint-<step>.pt``.
    device : str or torch.device, optional
        Where the data's minibatches go (e.g. ``"cuda"``); the model's own tensors and networks must be there too
        (``net.to(device)`` before training). Default: torch's default device, or under ``torchrun`` with NCCL this
        process's GPU, ``cuda:LOCAL_RANK``.

    Returns
    -------
    FitResult
        ``history``, ``losses``, ``params`` (constrained values, by param-store name), ``state=None``,
        ``checkpoint``, ``steps``, and ``model`` / ``guide``: the model and the guide themselves, whose parameters
        are the param store's (``result.restore()`` writes ``params`` back into the store after it changed), ready
        for ``Predictive(result.model, guide=result.guide, ...)`` or
        :func:`~tilted_priors.inference.pyro.log_likelihood`.

    Raises
    ------
    TrainingDiverged
        When a loss, a parameter or Adam's state becomes non-finite, a health check fails, or a sampler raises
        ``ChainDivergenceError``: the state is not checkpointed and the last good checkpoint stays on disk (the
        message names it).
    CheckpointError
        On resume, when no checkpoint of ``out`` can be used (damaged, of the other backend, of another model).
    RunFolderLocked
        When another process is training into ``out``.
    ValueError, TypeError
        For bad arguments (non-finite or empty data, data arrays of different lengths, a batch size outside
        ``[1, N]``, both or neither of ``epochs``/``num_steps``, learning rates <= 0, a prefix that names no
        parameter, ``guide=None`` with latent sites, a model and guide without parameters, ...).

    Notes
    -----
    **Several processes.** Run the same script with ``torchrun --nproc_per_node W script.py`` (or initialise
    ``torch.distributed`` yourself): ``fit`` finds the process group (initialising it from ``torchrun``'s
    environment if needed: NCCL for a CUDA ``device``, else gloo) and trains data-parallel. Every process takes its
    contiguous ``batch_size / W`` of each global minibatch (``batch_size`` must be divisible by ``W``), in the same
    global order as one process; its chains run on its shard; the gradients are summed over the processes by one
    ``all_reduce`` per update, so every process applies the same update. A process's loss counts its data's terms
    and ``1/W`` of the global ones (sites outside the plate whose size is the process's batch), so the sum over
    the processes is one process's loss on the whole minibatch: without random draws (MAP, deterministic chains) the
    parameters equal one process's to float error; with chains each process draws its own noise. Rank 0 alone
    writes checkpoints and the history and shows the progress bar; on ``resume`` every process reads the
    checkpoint, which keeps each process's random state. The data's sites must be inside a plate over the batch
    (``ValueError`` otherwise). A divergence on one process stops all of them at the same step.

    Parameters live in Pyro's global param store, which ``fit`` does not clear; before the first update it runs
    the loss once (to create every parameter, also on resume). The checkpoint holds only tensors, numbers,
    strings, lists and dicts: ``torch.load(path, weights_only=True)`` reads it. Its ``params`` are the
    unconstrained values. A ``KeyboardInterrupt`` writes nothing (a step may be half applied); resume from the
    last periodic checkpoint.

    Examples
    --------
    >>> import numpy as np, pyro, torch
    >>> import pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from tilted_priors.inference.pyro.train import fit
    >>> def model(x):
    ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)
    >>> pyro.clear_param_store()
    >>> data = np.random.default_rng(0).normal(3.0, 1.0, size=200)
    >>> result = fit(model, AutoNormal(model), data, epochs=20, batch_size=50, lr=0.05, betas=(0.9, 0.999),
    ...              progress=False)
    >>> result.steps, bool(abs(result.params["AutoNormal.locs.loc"] - 3.0) < 0.3)
    (80, True)
    """
    loss = Trace_ELBO() if loss is None else loss
    group = process_group(device)
    device = resolve_device(device, group)
    if group is not None and device is not None:  # the collectives' own tensors go where the gradients are
        group = dataclasses.replace(group, device=device)
    writer = group is None or group.is_writer
    plan = make_plan(data, epochs=epochs, num_steps=num_steps, batch_size=batch_size, lr=lr, betas=betas,
                     lr_decay=lr_decay, clip_norm=clip_norm, seed=seed, out=out, checkpoint_every=checkpoint_every,
                     resume=resume, progress=check_flag(progress, "progress") and writer, pass_index=pass_index, callback=callback,
                     loss_name=type(loss).__name__, backend="pyro", checkpoint_name="checkpoint.pt", health=health,
                     keep_checkpoints=keep_checkpoints)
    if group is not None and plan.batch_size % group.world:
        raise ValueError(f"batch_size={plan.batch_size} cannot be split evenly over the {group.world} processes of "
                         f"torch.distributed: give a batch_size divisible by {group.world} (e.g. "
                         f"{plan.batch_size - plan.batch_size % group.world or group.world})")
    return _trained(run_training(plan, _PyroTrainer(model, guide, loss, plan, group, device)), model, guide)
