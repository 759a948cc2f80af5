"""Training and evaluation runs, backend-free: what ``python -m tilted_priors train|sample`` and ``make demo`` do.

A run directory holds ``config.json`` (everything needed to rebuild the model), the training checkpoint and
``history.json`` (from :func:`tilted_priors.inference.pyro.fit` / :func:`tilted_priors.inference.numpyro.fit`), ``weights.pt`` / ``weights.npz``
(the trained networks, no pickled code), and after evaluation ``samples.png``, ``reconstructions.png`` and
``metrics.json``.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tilted_priors.inference.checkpoints import CheckpointError
from tilted_priors.inference.files import atomic_write, run_lock
from tilted_priors.models import data as datasets
from tilted_priors.models import metrics, runfolder

__all__ = ["METHODS", "BACKENDS", "DEFAULTS", "train", "evaluate", "sample", "save_grid", "load"]

METHODS = ("lebm", "abp")  # LEBM, and its generator with a Normal prior (alternating back-propagation)
BACKENDS = ("pyro", "numpyro")
WEIGHTS = {"pyro": "weights.pt", "numpyro": "weights.npz"}


def _backend(name: str) -> SimpleNamespace:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return SimpleNamespace(lebm=importlib.import_module(f"tilted_priors.models.{name}.lebm"),
                           evaluate=importlib.import_module(f"tilted_priors.models.{name}.evaluate"),
                           inference=importlib.import_module(f"tilted_priors.inference.{name}"))


def _load_data(data: str, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and test splits: images in [-1, 1], channels last, with labels for MNIST (``None`` for user data)."""
    if data.lower() == "mnist":
        return (datasets.load_mnist("train", seed=seed, return_labels=True),
                datasets.load_mnist("test", seed=seed, return_labels=True))
    x = datasets.load_images(data)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, len(x) // 10)
    return datasets.Dataset(x[order[n_test:]], None), datasets.Dataset(x[order[:n_test]], None)


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()))


def save_grid(images: np.ndarray, path: str | os.PathLike, ncol: int = 8) -> Path:
    """Tile images ``(N, H, W, C)`` in ``[-1, 1]`` into one PNG (grey for one channel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.clip((np.asarray(images) + 1) / 2, 0, 1)
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    grid = np.ones((nrow * (h + 2), ncol * (w + 2), c))
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, q * (w + 2) + 1:q * (w + 2) + 1 + w] = im
    path = Path(path)
    plt.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    return path


#: Defaults of :func:`train` for a new run (a resumed run takes the settings it was trained with).
DEFAULTS = {"backend": "numpyro", "data": "mnist", "batch_size": 100, "latent_dim": 16, "ngf": 32, "seed": 0}
# Settings a resumed run cannot change (the data, the networks, the minibatch order).
_FIXED_ON_RESUME = ("method", "backend", "data", "batch_size", "latent_dim", "ngf", "seed")


def _settings(out: Path, resume: bool, given: dict) -> dict:
    """The run's settings: on resume those of its ``config.json`` (validated; explicitly given settings must agree,
    learning rates and the length may change), else ``given`` over :data:`DEFAULTS`."""
    given = {k: v for k, v in given.items() if v is not None}
    path = out / "config.json"
    if not (resume and path.exists()):
        return {**DEFAULTS, **given}
    saved = runfolder.read_config(path)
    diff = [f"{k}={given[k]!r} (the run has {saved[k]!r})" for k in _FIXED_ON_RESUME if k in given
            and given[k] != saved[k]]
    if diff:
        raise ValueError(f"cannot resume {out}: {', '.join(diff)}. A resumed run keeps its method, backend, data, "
                         "batch size, networks and seed: leave these options out (they are read from config.json), "
                         "or train into another --out")
    return {**saved, **{k: v for k, v in given.items() if k not in _FIXED_ON_RESUME}}


def train(method: str = "lebm", *, backend: str | None = None, data: str | None = None, out: str | os.PathLike,
          epochs: int | None = None, num_steps: int | None = None, batch_size: int | None = None,
          latent_dim: int | None = None, ngf: int | None = None, lr_energy: float | None = None,
          lr_generator: float | None = None, seed: int | None = None, resume: bool = False, progress: bool = True,
          checkpoint_every: int = 200, evaluate_after: bool = True, eval_size: int = 500,
          ll_size: int = 200, devices: int | None = None) -> dict:
    """Train ``method`` on ``data`` with ``backend``'s own SVI, save the run, and (by default) evaluate it.

    ``lebm``: :class:`~tilted_priors.inference.pyro.ShortRunPosterior` guide (20 x 0.1) with the tilted prior's contrastive
    normalizer and LEBM's optimiser (Adam(0.5, 0.999), per-group rates, decay 0.998 per epoch). ``abp``: the same
    generator and guide with a Normal prior. Settings left ``None`` take :data:`DEFAULTS` for a new run; with
    ``resume`` they are read from the run's ``config.json``, and settings that would change the data, the networks or
    the minibatch order are refused before anything in the folder changes. The folder is locked while training
    (:class:`~tilted_priors.inference.files.RunFolderLocked` for a second writer). Returns the metrics (or ``{}``
    without evaluation).

    Several workers: ``devices=N`` trains on the first N of ``jax.devices()`` (NumPyro); on Pyro, run the same
    call in every process of ``torchrun --nproc_per_node N``: rank 0 writes the run folder and evaluates, the
    others train their shard and return ``{}``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    given = dict(backend=backend, data=data, batch_size=batch_size, latent_dim=latent_dim, ngf=ngf, seed=seed,
                 lr_energy=lr_energy, lr_generator=lr_generator, epochs=epochs, num_steps=num_steps, method=method)
    if _rank() > 0:  # another process of a torchrun: train its shard, leave the folder to rank 0
        return _train(method, Path(out), resume, False, checkpoint_every, False, eval_size, ll_size, given,
                      devices, writer=False)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} exists and is not a folder")
    created = not out.exists()
    try:
        with run_lock(out):
            return _train(method, out, resume, progress, checkpoint_every, evaluate_after, eval_size, ll_size,
                          given, devices)
    except BaseException:
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {"config.json"}:
            for p in out.iterdir():  # a new run that failed before its first checkpoint leaves no folder
                p.unlink()
            out.rmdir()
        raise


def _rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _train(method, out, resume, progress, checkpoint_every, evaluate_after, eval_size, ll_size, given,
           devices=None, writer: bool = True) -> dict:
    settings = _settings(out, resume, given)
    backend = settings["backend"]
    if devices is not None and backend == "pyro" and devices > 1:
        raise ValueError(f"devices={devices} is for the NumPyro backend; to train Pyro on {devices} processes, run "
                         f"the same command under `torchrun --nproc_per_node {devices} -m tilted_priors train ...`")
    b = _backend(backend)
    x_train = _load_data(settings["data"], settings["seed"])[0].x
    ref = b.lebm.REFERENCE
    config = {"method": method, "backend": backend, "data": settings["data"],
              "image_shape": list(x_train.shape[1:]), "latent_dim": settings["latent_dim"], "ngf": settings["ngf"],
              "seed": settings["seed"], "batch_size": settings["batch_size"], "epochs": settings.get("epochs"),
              "num_steps": settings.get("num_steps"), "lr_energy": settings.get("lr_energy") or ref["lr_energy"],
              "lr_generator": settings.get("lr_generator") or ref["lr_generator"],
              "posterior_steps": settings.get("posterior_steps", ref["posterior_steps"]),
              "posterior_step_size": settings.get("posterior_step_size", ref["posterior_step_size"])}
    config = runfolder.check_config(config, out / "config.json")
    if resume and "image_shape" in settings and settings["image_shape"] != config["image_shape"]:
        raise ValueError(f"cannot resume {out}: its images have shape {settings['image_shape']}, the data now has "
                         f"{config['image_shape']}")
    lvm = _build(b, config)
    guide = b.inference.ShortRunPosterior(lvm.model, steps=config["posterior_steps"],
                                          step_size=config["posterior_step_size"])
    lr = {"energy": config["lr_energy"], "": config["lr_generator"]} if method == "lebm" else config["lr_generator"]
    start = time.perf_counter()
    parallel = {"devices": devices} if backend == "numpyro" and devices is not None and devices > 1 else {}
    if writer:
        _write_json(out / "config.json", config)
    result = b.inference.fit(lvm.model, guide, x_train, epochs=config["epochs"], num_steps=config["num_steps"],
                             batch_size=config["batch_size"], lr=lr, betas=tuple(ref["adam_betas"]),
                             lr_decay=ref["lr_decay_per_epoch"], seed=config["seed"], out=out,
                             checkpoint_every=checkpoint_every, resume=resume, progress=progress, **parallel)
    if not writer:
        return {}
    lvm = b.evaluate.trained(lvm, result)
    b.evaluate.save_params(lvm, out / WEIGHTS[backend], config=runfolder.network_config(config))
    config["train_seconds"] = time.perf_counter() - start
    config["steps"] = result.steps
    _write_json(out / "config.json", config)
    return evaluate(out, eval_size=eval_size, ll_size=ll_size) if evaluate_after else {}


def _build(b: SimpleNamespace, config: dict):
    """The run's model with fresh networks. On Pyro the global param store is cleared first: ``pyro.module``
    would otherwise hand the networks whatever an earlier model in this process left under the same names."""
    if config["backend"] == "pyro":
        import pyro

        pyro.clear_param_store()
    return b.lebm.build(tuple(config["image_shape"]), config["latent_dim"],
                        prior="ebm" if config["method"] == "lebm" else "gaussian", ngf=config["ngf"],
                        seed=config["seed"])


def load(run_dir: str | os.PathLike):
    """The trained model of a run directory and its config; a ``config.json`` or weights file that is missing,
    invalid or does not match the other is refused with a
    :class:`~tilted_priors.inference.checkpoints.CheckpointError`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no such folder); train one with "
                                "`tilted-priors train --out DIR`")
    config = runfolder.read_config(run_dir / "config.json")
    b = _backend(config["backend"])
    weights = run_dir / WEIGHTS[config["backend"]]
    if not weights.exists():
        raise CheckpointError(weights, "the weights file is missing: the run did not finish training",
                              f"Finish it with `tilted-priors train {config['method']} --resume --out {run_dir}`")
    return b.evaluate.load_params(_build(b, config), weights, config=runfolder.network_config(config)), config, b


def evaluate(run_dir: str | os.PathLike, *, eval_size: int = 500, ll_size: int = 200, num_samples: int = 1000,
             cache_dir: str | os.PathLike | None = None) -> dict:
    """Samples, reconstructions and metrics of a trained run; writes the PNGs and ``metrics.json``.

    Metrics: reconstruction MSE of ``eval_size`` test images (short-run posterior, LEBM's inference), the
    Fréchet distance between ``num_samples`` prior samples and test images in the feature space of a classifier
    trained on the labelled training split (MNIST; none for unlabelled user data) (:func:`tilted_priors.models.metrics.train_feature_net`, cached), and the importance-sampled
    test log-likelihood (nats per image; :func:`tilted_priors.models.pyro.evaluate.log_likelihood`) of ``ll_size`` test images.
    """
    run_dir = Path(run_dir)
    runfolder.read_config(run_dir / "config.json")  # a run folder (checked before the lock would create one)
    with run_lock(run_dir):
        return _evaluate(run_dir, eval_size, ll_size, num_samples, cache_dir)


def _evaluate(run_dir: Path, eval_size: int, ll_size: int, num_samples: int, cache_dir) -> dict:
    lvm, config, b = load(run_dir)
    seed = config["seed"]
    train, test = _load_data(config["data"], seed)
    x_test = test.x
    x_eval = x_test[:eval_size]
    t0 = time.perf_counter()
    samples = b.evaluate.sample_images(lvm, max(num_samples, 64), seed=seed)
    save_grid(samples[:64], run_dir / "samples.png")
    recon = b.evaluate.reconstruct(lvm, x_eval, seed=seed)
    save_grid(np.concatenate([x_eval[:32], recon[:32]]), run_dir / "reconstructions.png")
    result = {"mse": metrics.reconstruction_mse(x_eval, recon)}
    if train.y is not None:  # a labelled data set: the feature classifier of the Fréchet distance can be trained
        net = metrics.train_feature_net(train.x, train.y, seed=0,
                                        cache_dir=cache_dir or Path.home() / ".cache" / "tilted-priors")
        result["frechet_distance"] = metrics.frechet_distance(x_test[:num_samples], samples[:num_samples], net)
        result["feature_net_test_accuracy"] = net.accuracy(x_test, test.y)
    ll = b.evaluate.log_likelihood(lvm, x_test[:ll_size], seed=seed)
    result.update({"test_log_likelihood": metrics.summarize_log_likelihood(ll["per_datum"]),
                   "test_log_likelihood_per_datum": [float(v) for v in ll["per_datum"]],
                   "log_z": ll["log_z"], "log_z_stderr": ll["log_z_stderr"],
                   "eval_seconds": time.perf_counter() - t0, "method": config["method"],
                   "backend": config["backend"], "train_steps": config.get("steps")})
    _write_json(run_dir / "metrics.json", result)
    return result


def sample(run_dir: str | os.PathLike, n: int = 64, *, out: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Draw ``n`` images from a trained run's prior and write them as a PNG grid (default ``RUN/samples-<n>.png``)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    lvm, config, b = load(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / f"samples-{n}.png"
    return save_grid(b.evaluate.sample_images(lvm, n, seed=seed), path)
