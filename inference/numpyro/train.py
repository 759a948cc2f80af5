"""``fit``: the training loop around NumPyro's own ``SVI`` — minibatches, per-prefix learning rates with an
exponential schedule (optax), gradient clipping, a divergence guard, atomic checkpoints with bit-identical
resume, a metrics history, a progress bar, and data-parallel training over several devices (``devices=``, see
:mod:`tilted_priors.inference.numpyro._sharding`). The Pyro twin is :func:`tilted_priors.inference.pyro.train.fit`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro

from tilted_priors.inference._health import TrainingHealth
from tilted_priors.inference._plan import TrainingPlan, make_plan, no_latents_error
from tilted_priors.inference._training import (CHECKPOINT_FIX, FitResult, StepReport, TrainingDiverged, run_training,
                                                warn_evaluation_normalizers)
from tilted_priors.inference.checkpoints import CheckpointError, make_manifest, read_file, verify_manifest
from tilted_priors.inference.files import flatten_state, unflatten_state
from tilted_priors.inference.numpyro._sharding import DataParallel, data_parallel
from tilted_priors.inference.numpyro.modules import structure_trace, warn_unregistered_modules

__all__ = ["fit", "FitResult", "TrainingDiverged", "TrainingHealth"]

_STATE = "svi_state/"
_GUIDE = "guide_state/"
_MODEL = "model_state/"


class _GradNorm(NamedTuple):
    norm: jnp.ndarray


def _record_grad_norm() -> optax.GradientTransformation:
    """Keeps the global norm of the incoming gradients in its state (read by the health checks); changes nothing."""
    return optax.GradientTransformation(lambda params: _GradNorm(jnp.zeros(())),
                                        lambda updates, state, params=None: (updates, _GradNorm(
                                            optax.tree.norm(updates))))


def _grad_norm(optim_state) -> jnp.ndarray:
    found = jax.tree_util.tree_leaves(optim_state, is_leaf=lambda x: isinstance(x, _GradNorm))
    return next(x.norm for x in found if isinstance(x, _GradNorm))


def _optimizer(plan: TrainingPlan) -> optax.GradientTransformation:
    """Adam per prefix group with the staircase exponential schedule, after optional global-norm clipping (the
    norm before clipping is recorded in the state)."""
    b1, b2 = plan.betas

    def adam(rate: float) -> optax.GradientTransformation:
        schedule = rate if plan.lr_decay == 1.0 else optax.exponential_decay(
            rate, transition_steps=plan.steps_per_epoch, decay_rate=plan.lr_decay, staircase=True)
        return optax.adam(schedule, b1=b1, b2=b2)

    if plan.lr.grouped:
        def labels(params):
            return {name: jax.tree.map(lambda _, label=plan.lr.label(name): label, value)
                    for name, value in params.items()}
        tx = optax.multi_transform({prefix: adam(rate) for prefix, rate in plan.lr.rates.items()}, labels)
    else:
        tx = adam(plan.lr.rates[""])
    if plan.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(plan.clip_norm), tx)
    return optax.chain(_record_grad_norm(), tx)


def _flat_params(params: Mapping) -> dict:
    """``{site: array}``; the leaves of a pytree site are named ``site/key/...``."""
    out = {}
    for name, value in params.items():
        leaves = jax.tree_util.tree_flatten_with_path(value)[0]
        for path, leaf in leaves:
            keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            out["/".join([name, *keys])] = np.asarray(leaf)
    return out


def _nest_params(given: Mapping, template: Mapping) -> dict:
    """``given`` (values by site name, or a pytree site's leaves as ``site/key/...``, as ``FitResult.params`` names
    them) regrouped onto the param sites of ``template`` (a fresh ``svi.get_params``), in their dtypes; names that
    are no site of ``template`` are left out."""
    out = {}
    for name, value in template.items():
        leaves, treedef = jax.tree_util.tree_flatten(value)
        if name in given:
            new = jax.tree_util.tree_leaves(given[name])
            if jax.tree_util.tree_structure(given[name]) != treedef:
                raise ValueError(f"init_params[{name!r}] does not have the structure of the param site {name!r}")
            keys = [name] * len(leaves)
        else:
            keys = list(_flat_params({name: value}))
            if not all(key in given for key in keys):
                continue
            new = [given[key] for key in keys]
        for key, old, leaf in zip(keys, leaves, new):
            if np.shape(leaf) != np.shape(old):
                raise ValueError(f"init_params: {key!r} has shape {tuple(np.shape(leaf))}, but the param site "
                                 f"expects {tuple(np.shape(old))}")
        out[name] = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(leaf, dtype=jnp.result_type(old))
                                                           for leaf, old in zip(new, leaves)])
    return out


def _extra_state(obj) -> dict | None:
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        return None
    flat = flatten_state(obj.state_dict())
    out = {}
    for key, value in flat.items():
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"{type(obj).__name__}.state_dict() must hold arrays only, got {key!r}: "
                            f"{type(value).__name__}")
        out[key] = array
    return out


def _empty_guide(*args, **kwargs) -> None:
    """The guide of ``fit(model, None, data)``: nothing to infer (every sample site of the model is observed)."""
    return None


def _evaluation_normalizers(trace: dict) -> dict:
    """The traced model's tilted sites whose normalizer is meant for evaluation: ``{site: class name}``."""
    from tilted_priors.inference.numpyro.handlers import find_tilted
    from tilted_priors.numpyro import AnnealedImportance, Importance

    found = {}
    for name, site in trace.items():
        tilted = find_tilted(site["fn"]) if site["type"] == "sample" else None
        if tilted is not None and isinstance(tilted.normalizer, (Importance, AnnealedImportance)):
            found[name] = type(tilted.normalizer).__name__
    return found


def _latent_sites(trace: dict) -> list[str]:
    return [name for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary")]


class _NumPyroTrainer:
    def __init__(self, model, guide, loss, plan: TrainingPlan, init_params: Mapping | None = None,
                 parallel: DataParallel | None = None):
        self.check_latents = guide is None
        guide = _empty_guide if guide is None else guide
        self.model, self.guide, self.plan, self.init_params = model, guide, plan, init_params
        self.parallel = parallel
        self.svi = SVI(model, guide, optax_to_numpyro(_optimizer(plan)), loss)
        self.data = tuple(jnp.asarray(a, dtype=jnp.result_type(float)) for a in plan.arrays)
        if parallel is not None:  # the data set whole on each device; each minibatch is split (below)
            self.data = parallel.replicate(self.data)
        self.state = None
        pass_index, svi = plan.pass_index, self.svi

        def update(state, data, idx):
            batch = [jnp.take(a, idx, axis=0) for a in data]
            if parallel is not None:
                batch = parallel.constrain_batch(batch)
            args, kwargs = plan.call(batch)
            if pass_index:
                kwargs["index"] = idx
            new_state, loss_value = svi.update(state, *args, **kwargs)
            if parallel is not None:
                new_state = parallel.constrain_replicated(new_state)

            def finite(tree):
                leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
                return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or [True]))

            return (new_state, loss_value, finite(svi.optim.get_params(new_state.optim_state)),
                    finite(new_state.optim_state), _grad_norm(new_state.optim_state))

        self._update = jax.jit(update)

    def _kwargs(self, idx: np.ndarray) -> tuple[tuple, dict]:
        index = jnp.asarray(idx, dtype=jnp.int32)
        args, kwargs = self.plan.call([jnp.take(a, index, axis=0) for a in self.data])
        return args, ({**kwargs, "index": index} if self.plan.pass_index else kwargs)

    def read(self, path: Path):
        def load(p):
            with np.load(p, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}

        arrays = read_file(path, load, what="checkpoint", fix=CHECKPOINT_FIX)
        if "manifest" not in arrays:
            raise CheckpointError(path, "it is not a checkpoint written by fit (no manifest)", CHECKPOINT_FIX)
        try:
            manifest = json.loads(str(arrays.pop("manifest")))
        except ValueError:
            raise CheckpointError(path, "its manifest is damaged", CHECKPOINT_FIX) from None
        verify_manifest(path, arrays, manifest, kind="checkpoint", backend="numpyro", require_finite=True)
        meta = {"step": int(arrays["step"]), "elapsed": float(arrays["elapsed"]),
                "config": json.loads(str(arrays["config_json"])), "history": json.loads(str(arrays["history_json"]))}
        return arrays, meta

    def setup(self, idx: np.ndarray, payload) -> list[str]:
        args, kwargs = self._kwargs(idx)
        # The model's structure, without chains: its latents, its normalizers, later its registered modules.
        model_trace = structure_trace(self.model, args, kwargs)
        if self.check_latents and _latent_sites(model_trace):
            raise no_latents_error(_latent_sites(model_trace))
        warn_evaluation_normalizers(_evaluation_normalizers(model_trace))
        # A fresh state from the seed: the run's initial state, or on resume the template whose tree structure
        # receives the checkpoint's leaves.
        state = self.svi.init(jax.random.PRNGKey(self.plan.seed), *args, **kwargs)
        if payload is None and self.init_params is not None:
            init_params = _nest_params(self.init_params, self.svi.get_params(state))
            state = self.svi.init(jax.random.PRNGKey(self.plan.seed), *args, init_params=init_params, **kwargs)
        names = sorted(self.svi.optim.get_params(state.optim_state))
        # the guide's after svi.init: an autoguide sets itself up on its first run, which must be svi.init's
        guide_trace = structure_trace(self.guide, args, kwargs)
        warn_unregistered_modules(self.model, self.guide, traces=[model_trace, guide_trace])
        if payload is not None:
            leaves, treedef = jax.tree_util.tree_flatten(state)
            saved = sorted((k for k in payload if k.startswith(_STATE)), key=lambda k: int(k[len(_STATE):]))
            if len(saved) != len(leaves):
                raise CheckpointError(self.plan.checkpoint_path, f"its SVI state has {len(saved)} arrays, the model, "
                                      f"guide and optimizer here make {len(leaves)}", "Resume with the model, guide "
                                      "and lr prefixes that wrote it, or start afresh with resume=False")
            restored = []
            for key, leaf in zip(saved, leaves):
                value = payload[key]
                if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
                    raise CheckpointError(self.plan.checkpoint_path, f"its SVI state array {key} is "
                                          f"{value.dtype}{list(value.shape)}, the model, guide and optimizer here make "
                                          f"{np.asarray(leaf).dtype}{list(np.shape(leaf))}", "Resume with the model "
                                          "and guide that wrote it, or start afresh with resume=False")
                restored.append(jnp.asarray(value))
            state = jax.tree_util.tree_unflatten(treedef, restored)
            for prefix, obj in ((_GUIDE, self.guide), (_MODEL, self.model)):
                extra = {k[len(prefix):]: payload[k] for k in payload if k.startswith(prefix)}
                if extra:
                    obj.load_state_dict(unflatten_state(extra))
        self.state = state if self.parallel is None else self.parallel.replicate(state)
        return names

    def step(self, step: int, idx: np.ndarray) -> StepReport:
        index = jnp.asarray(idx, dtype=jnp.int32) if self.parallel is None else \
            self.parallel.split(np.asarray(idx, dtype=np.int32))
        new_state, loss, params_finite, state_finite, norm = self._update(self.state, self.data, index)
        report = StepReport(float(loss), float(norm), bool(params_finite), bool(state_finite))
        if np.isfinite(report.loss) and report.params_finite and report.state_finite:
            self.state = new_state
        return report

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, value in sorted(_flat_params(self.svi.get_params(self.state)).items()):
            if self.plan.lr.rate(name) > 0:
                h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()

    def save(self, f, meta: dict) -> None:
        arrays = {"step": np.array(meta["step"]),
                  "epoch": np.array(meta["epoch"]), "elapsed": np.array(meta["elapsed"]),
                  "history_json": np.array(json.dumps(meta["history"])),
                  "config_json": np.array(json.dumps(meta["config"]))}
        for i, leaf in enumerate(jax.tree_util.tree_leaves(self.state)):
            arrays[f"{_STATE}{i:05d}"] = np.asarray(leaf)
        for prefix, obj in ((_GUIDE, self.guide), (_MODEL, None if self.model is self.guide else self.model)):
            for key, value in (_extra_state(obj) or {}).items():
                arrays[prefix + key] = value
        manifest = make_manifest(arrays, kind="checkpoint", backend="numpyro", config=meta["config"])
        np.savez(f, manifest=np.array(json.dumps(manifest)), **arrays)

    def result(self):
        return _flat_params(self.svi.get_params(self.state)), self.state


def _trained(result: FitResult, trainer: _NumPyroTrainer, model: Callable, guide: Callable | None) -> FitResult:
    """``result`` with the model and the guide given back with the trained parameters (nested, as their param
    sites hold them) and the mutable state substituted."""
    values = dict(trainer.svi.get_params(trainer.state))
    values.update(trainer.state.mutable_state or {})
    return dataclasses.replace(result, model=handlers.substitute(model, data=values),
                               guide=None if guide is None else handlers.substitute(guide, data=values))


def fit(model: Callable, guide: Callable | None, data, *, epochs: int | None = None, num_steps: int | None = None,
        batch_size: int = 100, lr: float | Mapping[str, float] = 1e-4, betas: Sequence[float] = (0.5, 0.999),
        lr_decay: float = 1.0, clip_norm: float | None = None, loss: Any = None, seed: int = 0,
        out: str | Path | None = None, checkpoint_every: int | None = None, resume: bool = False,
        progress: bool = True, pass_index: bool = False, callback: Callable[[dict], Any] | None = None,
        init_params: Mapping | None = None, health: bool | TrainingHealth = True,
        keep_checkpoints: int = 3, devices: int | Sequence | jax.sharding.Mesh | None = None) -> FitResult:
    """Train a NumPyro model and guide with NumPyro's ``SVI`` (jitted updates) on minibatches of ``data``.

    Parameters
    ----------
    model, guide : callable
        Called by ``SVI`` as ``model(x_batch)`` / ``guide(x_batch)`` with ``x_batch`` a JAX array of shape
        ``(batch_size, ...)`` in JAX's default float dtype (and ``index=`` when ``pass_index``); with several
        arrays, ``model(x_batch, y_batch)`` (a tuple) or ``model(x=x_batch, y=y_batch)`` (a dict). ``guide=None``
        is an empty guide, for models whose sample sites are all observed (or that have none), e.g. a conditional
        density of ``y`` given ``x`` (``ValueError`` if the model has latent sites).
    data : numpy.ndarray, tuple or dict of numpy.ndarray
        Training data: one array of shape ``(N, ...)``, a tuple of arrays (passed positionally) or a dict of
        arrays (passed by name), all with the same first dimension ``N`` and batched together; finite, real
        (cast to float). It is put on the device once.
    epochs, num_steps : int
        Length of training: exactly one. ``epochs`` means ``epochs * (N // batch_size)`` updates. Both count
        from the start of training, also when resuming.
    batch_size : int
        Minibatch size, ``1 <= batch_size <= N``. Each epoch visits a permutation drawn from ``(seed, epoch)``
        and drops the last incomplete batch.
    lr : float or dict of str to float
        Adam learning rate, or rates by parameter-name prefix (longest prefix wins, ``""`` is the default),
        matched against NumPyro's site names such as ``"energy$params"``, ``"generator$params"``, ``"snl_b"``.
        LEBM: ``{"energy": 2e-5, "": 1e-4}``. A rate of 0 freezes its group.
    betas : pair of float
        Adam's ``(b1, b2)``; LEBM uses ``(0.5, 0.999)``.
    lr_decay : float
        Multiplicative decay per epoch: update ``k`` (0-based) uses ``lr * lr_decay ** (k // (N // batch_size))``
        (``optax.exponential_decay(..., staircase=True)`` with one transition per epoch; LEBM: 0.998).
    clip_norm : float, optional
        Clip the global norm of all gradients to this value (``optax.clip_by_global_norm``).
    loss : numpyro.infer.elbo.ELBO, optional
        Default ``Trace_ELBO()``.
    seed : int
        Seeds the minibatch order and the ``jax.random.PRNGKey`` given to ``svi.init``.
    out : str or Path, optional
        Directory for ``checkpoint.npz`` and ``history.json``; nothing is written when ``None``.
    checkpoint_every : int, optional
        Write a checkpoint every this many updates (needs ``out``); one is always written at the end. Each
        checkpoint carries a manifest (format version, backend, package version, config hash, every array's
        dtype and shape, a checksum) that is verified when it is read.
    resume : bool
        Continue from ``out/checkpoint.npz`` if it exists (else start afresh); a damaged or non-finite
        ``checkpoint.npz`` is passed over, with a warning, for the newest kept one. The result is bit-identical to a
        run that was never interrupted: the whole ``SVIState`` (parameters, optimizer state with its step count,
        mutable state, RNG key) and ``guide.state_dict()`` (if the guide has one) are restored. ``seed``,
        ``batch_size`` and the data's shapes (and their tuple or dict structure) must match; learning-rate values,
        ``clip_norm`` and the length may change (the prefixes of ``lr`` may not: they shape the optimizer state).
    progress : bool
        Show a tqdm bar with the loss and the speed.
    pass_index : bool
        Also pass ``index=`` (an int32 array with the batch's data indices) to the model and guide, for guides
        that keep per-datum state such as persistent chains.
    callback : callable, optional
        Called after every update with the history record (a dict); returning ``True`` stops training (a final
        checkpoint is still written).
    init_params : mapping, optional
        Starting values (constrained) of param sites, passed to ``svi.init(..., init_params=...)``: by site name,
        as ``SVI.init`` takes them, or as ``FitResult.params`` names them (a pytree site's leaves as
        ``site/key/...``), so that a run can continue from another's parameters (``init_params=result.params``;
        the optimizer state starts afresh). Only param sites that exist at init are set (a pytree site only when
        all its leaves are given); other names are ignored, and sites not named keep their own initial values.
        Ignored on resume (the checkpoint holds the parameters).
    health : bool or TrainingHealth
        The checks that stop a training gone wrong beyond non-finite values (a loss or gradient norm that jumps
        by orders of magnitude, parameters that stop changing): ``True`` (default) with the default settings of
        :class:`~tilted_priors.inference.numpyro.TrainingHealth`, ``False`` for none, or your own settings.
    keep_checkpoints : int
        How many checkpoints to keep: ``checkpoint.npz`` and the previous ones as ``checkpoint-<step>.npz``.
    devices : int, list of jax devices or jax.sharding.Mesh, optional
        Train data-parallel on several devices: a number ``n`` (the first ``n`` of ``jax.devices()``), a list of
        devices, or a :class:`jax.sharding.Mesh` with one axis. ``None`` (default): one device, where JAX puts
        arrays by default. Each minibatch is split along its first axis into equal shares, one per device
        (``batch_size`` must be a multiple of the number of devices); the data set, the parameters, the
        optimizer's state, the mutable state and the random key are copied whole onto every device. Each device
        runs the model and guide on its share, the per-datum terms are summed across devices, and every copy of
        the parameters takes the same update: the jitted update is the one-device one, split by JAX (``jit`` with
        sharded inputs). The results equal one device's up to float rounding (sums added in another order).
        Checkpoints hold plain host arrays and do not record the devices: a run may resume on another number of
        devices. For ``n`` virtual CPU devices set ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` before
        jax is imported.

    Returns
    -------
    FitResult
        ``history``, ``losses``, ``params`` (constrained, by site name; pytree leaves as ``site/key/...``),
        ``state`` (the final ``SVIState``), ``checkpoint``, ``steps``, and ``model`` / ``guide``: the model and
        the guide with the trained parameters and mutable state substituted (``numpyro.handlers.substitute``),
        ready for ``Predictive(result.model, guide=result.guide, ...)`` or
        :func:`~tilted_priors.inference.numpyro.log_likelihood`.

    Raises
    ------
    TrainingDiverged
        When a loss, a parameter or the optimizer's state becomes non-finite (checked on the values the jitted
        update returns) or a health check fails: the diverged state is dropped, not checkpointed, and the last
        good checkpoint stays on disk.
    CheckpointError
        On resume, when no checkpoint of ``out`` can be used (damaged, of the other backend, of another model).
    RunFolderLocked
        When another process is training into ``out``.
    ValueError, TypeError
        For bad arguments (non-finite or empty data, data arrays of different lengths, a batch size outside
        ``[1, N]``, both or neither of ``epochs``/``num_steps``, learning rates <= 0, a prefix that names no
        parameter, ``guide=None`` with latent sites, a model and guide without parameters, more ``devices`` than
        there are, a ``batch_size`` that the devices do not divide, ...).

    Notes
    -----
    The checkpoint is an ``.npz`` of plain arrays (the flattened leaves of the ``SVIState``, step counters,
    the history and config as JSON strings): ``np.load(path, allow_pickle=False)`` reads it, and resume
    rebuilds the state with ``jax.tree_util.tree_unflatten`` and the tree structure of a fresh ``svi.init``.

    Examples
    --------
    >>> import numpy as np
    >>> import numpyro, numpyro.distributions as dist
    >>> from numpyro.infer.autoguide import AutoNormal
    >>> from tilted_priors.inference.numpyro.train import fit
    >>> def model(x):
    ...     loc = numpyro.sample("loc", dist.Normal(0.0, 10.0))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("obs", dist.Normal(loc, 1.0), obs=x)
    >>> data = np.random.default_rng(0).normal(3.0, 1.0, size=200)
    >>> result = fit(model, AutoNormal(model), data, epochs=20, batch_size=50, lr=0.05, betas=(0.9, 0.999),
    ...              progress=False)
    >>> result.steps, bool(abs(result.params["loc_auto_loc"] - 3.0) < 0.3)
    (80, True)

    The same, data-parallel on a list of devices (one here, so that the example runs anywhere; with
    ``devices=2`` each device would take 25 of the 50 data of a batch):

    >>> import jax
    >>> split = fit(model, AutoNormal(model), data, epochs=20, batch_size=50, lr=0.05, betas=(0.9, 0.999),
    ...             progress=False, devices=jax.devices()[:1])
    >>> bool(np.allclose(split.params["loc_auto_loc"], result.params["loc_auto_loc"], atol=1e-5))
    True
    """
    parallel = data_parallel(devices)  # checked first: a bad value leaves no run folder behind
    loss = Trace_ELBO() if loss is None else loss
    plan = make_plan(data, epochs=epochs, num_steps=num_steps, batch_size=batch_size, lr=lr, betas=betas,
                     lr_decay=lr_decay, clip_norm=clip_norm, seed=seed, out=out, checkpoint_every=checkpoint_every,
                     resume=resume, progress=progress, pass_index=pass_index, callback=callback,
                     loss_name=type(loss).__name__, backend="numpyro", checkpoint_name="checkpoint.npz",
                     health=health, keep_checkpoints=keep_checkpoints)
    if init_params is not None and not isinstance(init_params, Mapping):
        raise TypeError(f"init_params must be a mapping of param site names to values, got "
                        f"{type(init_params).__name__}")
    if parallel is not None:
        parallel.check_batch_size(plan.batch_size)
    trainer = _NumPyroTrainer(model, guide, loss, plan, init_params, parallel)
    return _trained(run_training(plan, trainer), trainer, model, guide)
