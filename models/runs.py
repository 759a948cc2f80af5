"""Training and evaluation runs, backend-free: what ``python -m tilted_priors train|sample`` and ``make demo`` do.

A run directory holds ``config.json`` (everything needed to rebuild the model), the training checkpoint and
``history.json`` (from :func:`tilted_priors.inference.pyro.fit` / :func:`tilted_priors.inference.numpyro.fit`), ``weights.pt`` / ``weights.npz``
(the trained networks, no pickled code), and after evaluation ``samples.png``, ``reconstructions.png`` and
``metrics.json``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import time
from pathlib import Path
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np

from tilted_priors.inference.checkpoints import CheckpointError
from tilted_priors.inference.files import atomic_write, run_lock, usual_mode
from tilted_priors.models import data as datasets
from tilted_priors.models import metrics, runfolder
from tilted_priors.models.reference import LEBM, LEBM_MNIST

__all__ = ["METHODS", "BACKENDS", "DEFAULTS", "EVALUATION", "default_ngf", "train", "evaluate", "evaluation_folder",
           "sample", "save_grid", "save_pairs", "load", "progress_stage"]

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
    os.chmod(path, usual_mode())
    return path


def save_pairs(x: np.ndarray, x_hat: np.ndarray, path: str | os.PathLike, ncol: int = 8) -> Path:
    """Images and their reconstructions as one PNG: rows of up to ``ncol`` images, each row followed by the row of
    their reconstructions (a short last row is padded with white), so each reconstruction sits under its image
    for any number of images."""
    n = len(x)
    if n == 0 or len(x_hat) != n:
        raise ValueError(f"save_pairs needs as many reconstructions as images (at least one), got {n} and "
                         f"{len(x_hat)}")
    ncol = min(ncol, n)
    pad = np.ones(((-n) % ncol,) + x.shape[1:], dtype=np.float32)
    x, x_hat = np.concatenate([x, pad]), np.concatenate([x_hat, pad])
    rows = [np.concatenate([x[i:i + ncol], x_hat[i:i + ncol]]) for i in range(0, len(x), ncol)]
    return save_grid(np.concatenate(rows), path, ncol=ncol)


#: Defaults of :func:`evaluate`: test images for the reconstruction error and for the log-likelihood, importance
#: samples per image, annealed-importance chains for the prior's log Z, prior samples for the Fréchet distance.
EVALUATION = {"eval_size": 500, "ll_size": 200, "importance_samples": 64, "log_z_chains": 500, "num_samples": 1000}


#: Defaults of :func:`train` for a new run (a resumed run takes the settings it was trained with); ``ngf`` None:
#: by the images' size (:func:`default_ngf`).
DEFAULTS = {"backend": "numpyro", "data": "mnist", "batch_size": 100, "latent_dim": 16, "ngf": None, "seed": 0}


def default_ngf(image_shape) -> int:
    """The generator width a new run gets when none is given: 32 for 28 x 28 images (this project's MNIST network,
    ``LEBM_MNIST``), the paper's 64 for 32 x 32 and 64 x 64 images (Pang et al.'s SVHN network and its extension).

    Examples
    --------
    >>> default_ngf((28, 28, 1)), default_ngf((32, 32, 3))
    (32, 64)
    """
    return LEBM_MNIST["ngf"] if tuple(image_shape)[0] == 28 else LEBM["ngf"]
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
          checkpoint_every: int = 200, evaluate_after: bool = True, eval_size: int = EVALUATION["eval_size"],
          ll_size: int = EVALUATION["ll_size"], importance_samples: int = EVALUATION["importance_samples"],
          log_z_chains: int = EVALUATION["log_z_chains"], devices: int | None = None) -> dict:
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
    evaluation = dict(eval_size=eval_size, ll_size=ll_size, importance_samples=importance_samples,
                      log_z_chains=log_z_chains)
    given = dict(backend=backend, data=data, batch_size=batch_size, latent_dim=latent_dim, ngf=ngf, seed=seed,
                 lr_energy=lr_energy, lr_generator=lr_generator, epochs=epochs, num_steps=num_steps, method=method)
    if _rank() > 0:  # another process of a torchrun: train its shard, leave the folder to rank 0
        return _train(method, Path(out), resume, False, checkpoint_every, False, evaluation, given,
                      devices, writer=False)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} exists and is not a folder")
    created = not out.exists()
    try:
        with run_lock(out):
            return _train(method, out, resume, progress, checkpoint_every, evaluate_after, evaluation,
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


def _train(method, out, resume, progress, checkpoint_every, evaluate_after, evaluation, given,
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
              "image_shape": list(x_train.shape[1:]), "latent_dim": settings["latent_dim"],
              "ngf": settings["ngf"] or default_ngf(x_train.shape[1:]),
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
    return evaluate(out, **evaluation, progress=progress) if evaluate_after else {}


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


def evaluation_folder(run_dir: str | os.PathLike, *, eval_size: int = EVALUATION["eval_size"],
                      ll_size: int = EVALUATION["ll_size"], importance_samples: int = EVALUATION["importance_samples"],
                      log_z_chains: int = EVALUATION["log_z_chains"],
                      num_samples: int = EVALUATION["num_samples"]) -> Path:
    """Where ``tilted-priors evaluate`` writes by default: ``RUN/evaluations/<settings>``, one folder per setting
    (``test500-ll200-is64-ais500-prior1000``), so an evaluation never overwrites the run's own ``metrics.json`` or
    another evaluation's numbers.

    Examples
    --------
    >>> evaluation_folder("runs/lebm", ll_size=100).as_posix()
    'runs/lebm/evaluations/test500-ll100-is64-ais500-prior1000'
    """
    name = f"test{eval_size}-ll{ll_size}-is{importance_samples}-ais{log_z_chains}-prior{num_samples}"
    return Path(run_dir) / "evaluations" / name


def evaluate(run_dir: str | os.PathLike, *, eval_size: int = EVALUATION["eval_size"],
             ll_size: int = EVALUATION["ll_size"], num_samples: int = EVALUATION["num_samples"],
             importance_samples: int = EVALUATION["importance_samples"],
             log_z_chains: int = EVALUATION["log_z_chains"], out: str | os.PathLike | None = None,
             progress: bool = False, cache_dir: str | os.PathLike | None = None) -> dict:
    """Samples, reconstructions and metrics of a trained run; writes ``samples.png``, ``reconstructions.png`` and
    ``metrics.json`` into ``out`` (default: the run folder, what training's own evaluation writes; the command
    line's ``evaluate`` writes into :func:`evaluation_folder` instead).

    Metrics: reconstruction MSE of ``eval_size`` test images (short-run posterior, LEBM's inference; pixels in
    [-1, 1]), the Fréchet distance between ``num_samples`` prior samples and test images in the feature space of a
    classifier trained on the labelled training split (MNIST; none for unlabelled user data)
    (:func:`tilted_priors.models.metrics.train_feature_net`, cached), and the importance-sampled test
    log-likelihood (nats per image; :func:`tilted_priors.models.pyro.evaluate.log_likelihood`) of ``ll_size`` test
    images with ``importance_samples`` samples each and the prior's log Z from ``log_z_chains`` AIS chains.
    ``metrics.json`` describes itself (its ``"description"``: units, methods, sample sizes, the quantiles of the
    per-image log-likelihoods). ``progress`` shows a progress bar over the evaluation's stages.
    """
    for name, value in (("eval_size", eval_size), ("ll_size", ll_size), ("num_samples", num_samples),
                        ("importance_samples", importance_samples), ("log_z_chains", log_z_chains)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    run_dir = Path(run_dir)
    runfolder.read_config(run_dir / "config.json")  # a run folder (checked before the lock would create one)
    out = run_dir if out is None else Path(out)
    settings = {"eval_size": int(eval_size), "ll_size": int(ll_size), "num_samples": int(num_samples),
                "importance_samples": int(importance_samples), "log_z_chains": int(log_z_chains)}
    with run_lock(run_dir):
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            return _evaluate(run_dir, out, settings, progress, cache_dir)
        except BaseException:
            if created:  # an evaluation that fails leaves no folder of its own behind
                shutil.rmtree(out, ignore_errors=True)
            raise


@contextlib.contextmanager
def progress_stage(bar, name: str) -> Iterator[None]:
    """One stage of a command's progress bar (a :class:`tqdm.tqdm` counting stages): ``name`` shown while the
    stage runs, the bar advanced when it ends.

    Examples
    --------
    >>> import io
    >>> from tqdm import tqdm
    >>> bar = tqdm(total=2, file=io.StringIO())
    >>> with progress_stage(bar, "first"):
    ...     pass
    >>> bar.n, bar.desc
    (1, 'first: ')
    """
    bar.set_description(name)
    yield
    bar.update()


def _evaluate(run_dir: Path, out: Path, settings: dict, progress: bool, cache_dir) -> dict:
    from tqdm.auto import tqdm

    lvm, config, b = load(run_dir)
    seed = config["seed"]
    train, test = _load_data(config["data"], seed)
    x_test = test.x
    x_eval = x_test[:settings["eval_size"]]
    num_samples = settings["num_samples"]
    labelled = train.y is not None  # the feature classifier of the Fréchet distance can be trained
    bar = tqdm(total=3 + labelled, desc="evaluate", unit="stage", disable=not progress, leave=False)
    t0 = time.perf_counter()
    with bar:
        with progress_stage(bar, "evaluate: prior samples"):
            samples = b.evaluate.sample_images(lvm, max(num_samples, 64), seed=seed)
            save_grid(samples[:64], out / "samples.png")
        with progress_stage(bar, "evaluate: reconstructions"):
            recon = b.evaluate.reconstruct(lvm, x_eval, seed=seed)
            save_pairs(x_eval[:32], recon[:32], out / "reconstructions.png")
        result = {"mse": metrics.reconstruction_mse(x_eval, recon)}
        if labelled:
            with progress_stage(bar, "evaluate: Fréchet distance"):
                net = metrics.train_feature_net(train.x, train.y, seed=0,
                                                cache_dir=cache_dir or Path.home() / ".cache" / "tilted-priors")
                result["frechet_distance"] = metrics.frechet_distance(x_test[:num_samples], samples[:num_samples],
                                                                      net)
                result["feature_net_test_accuracy"] = net.accuracy(x_test, test.y)
        with progress_stage(bar, "evaluate: log-likelihood (AIS log Z, importance sampling)"):
            x_ll = x_test[:settings["ll_size"]]
            ll = b.evaluate.log_likelihood(lvm, x_ll, num_samples=settings["importance_samples"],
                                           log_z_chains=settings["log_z_chains"], seed=seed)
    per_datum = np.asarray(ll["per_datum"], dtype=np.float64)
    result.update({"test_log_likelihood": {**metrics.summarize_log_likelihood(per_datum),
                                           **_quantiles(per_datum)},
                   "test_log_likelihood_per_datum": [float(v) for v in per_datum],
                   "log_z": ll["log_z"], "log_z_stderr": ll["log_z_stderr"],
                   "eval_seconds": time.perf_counter() - t0, "method": config["method"],
                   "backend": config["backend"], "train_steps": config.get("steps")})
    result["description"] = _description(config, settings, len(x_eval), len(x_ll), labelled,
                                         min(num_samples, len(x_test)))
    _write_json(out / "metrics.json", result)
    return result


def _quantiles(values: np.ndarray) -> dict:
    """The spread of per-image values: min, 5/25/50/75/95% quantiles, max."""
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"min": float(values.min()), "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]),
            "q75": float(q[3]), "q95": float(q[4]), "max": float(values.max())}


def _description(config: dict, settings: dict, n_eval: int, n_ll: int, labelled: bool, n_fd: int) -> dict:
    """What each number of ``metrics.json`` is: units, method, sample sizes (written into the file)."""
    ebm = config["method"] == "lebm"
    text = {
        "mse": (f"reconstruction mean squared error per pixel, pixels scaled to [-1, 1] (so 0.01 is an RMS error "
                f"of 0.1, 5% of the range); {n_eval} test images, each reconstructed by the generator from the "
                f"short-run posterior chain used in training ({config['posterior_steps']} Langevin steps of "
                f"{config['posterior_step_size']:g} from noise)"),
        "test_log_likelihood": (
            f"log p(x) in nats per image (a density over [-1, 1]-scaled pixels, so it can be positive), estimated "
            f"for {n_ll} test images by importance sampling with {settings['importance_samples']} samples per image "
            "from a Laplace approximation of the posterior; mean and standard error over the images (stderr: the "
            "spread over the test set, not the Monte Carlo error), with the quantiles of the per-image values "
            "(their spread is wide: an image the model explains well can score hundreds of nats above a poor one); "
            "the per-image values are in test_log_likelihood_per_datum"),
        "log_z": ((f"the tilted prior's log normalising constant, by annealed importance sampling with "
                   f"{settings['log_z_chains']} chains of 200 temperatures (MALA moves), subtracted from every "
                   "log-likelihood; log_z_stderr is its standard error") if ebm
                  else "0: the prior is a standard Normal (normalised)"),
        "eval_seconds": "wall time of the evaluation, in seconds",
        "train_steps": "training updates of the evaluated weights",
    }
    if labelled:
        text["frechet_distance"] = (
            f"Fréchet distance between Gaussians fitted to {settings['num_samples']} prior samples and {n_fd} test "
            "images in the 64-d feature space of a small classifier trained on the training split (lower is better; "
            "training vs test images of MNIST score about 1.4); feature_net_test_accuracy is that classifier's "
            "test accuracy")
    return {"settings": settings, "metrics": text}


def sample(run_dir: str | os.PathLike, n: int = 64, *, out: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Draw ``n`` images from a trained run's prior and write them as a PNG grid (default ``RUN/samples-<n>.png``)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    lvm, config, b = load(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / f"samples-{n}.png"
    return save_grid(b.evaluate.sample_images(lvm, n, seed=seed), path)
