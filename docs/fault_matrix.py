"""The fault matrix: bad inputs and faults, run against the public API and the command line, and what each does.

``python docs/fault_matrix.py`` runs every case and writes ``docs/guide/fault-matrix.md``; the test suite
(``tests/test_fault_matrix.py``) runs them class by class, checks that none runs silently and that each message
names the argument (or file, or quantity) at fault, and that the page still says what the code does.
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PAGE = Path(__file__).parent / "guide" / "fault-matrix.md"
_MESSAGE_CHARS = 180


@dataclass
class Case:
    """One bad input or fault: ``run(tmp)`` does it (``tmp`` an empty folder); the message must contain ``names``."""

    kind: str
    what: str
    backend: str
    names: str
    run: Callable[[Path], object]


CASES: list[Case] = []


def case(kind: str, what: str, backend: str, names: str):
    def register(fn):
        CASES.append(Case(kind, what, backend, names, fn))
        return fn
    return register


# --- helpers -------------------------------------------------------------------------------------------------
def _pyro_fit(model, data, guide=None, **kwargs):
    import pyro

    from tilted_priors.inference.pyro import fit

    pyro.clear_param_store()
    return fit(model, guide, data, batch_size=kwargs.pop("batch_size", 6), progress=False, **kwargs)


def _numpyro_fit(model, data, guide=None, **kwargs):
    from tilted_priors.inference.numpyro import fit

    return fit(model, guide, data, batch_size=kwargs.pop("batch_size", 6), progress=False, **kwargs)


def _mean_model(backend: str, used: bool = True):
    """``obs ~ Normal(mu, 1)`` with a parameter ``mu`` (not used by the likelihood when ``used`` is False)."""
    if backend == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        def model(x):
            mu = pyro.param("mu", torch.zeros(()))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mu if used else 0.0, 1.0), obs=x)
        return model
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    def model(x):
        mu = numpyro.param("mu", jnp.zeros(()))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(mu if used else 0.0, 1.0), obs=x)
    return model


def _unbounded_model(backend: str):
    """A loss of ``-theta^2``: falls without bound, step by step."""
    if backend == "pyro":
        import pyro
        import torch

        return lambda x: pyro.factor("runaway", pyro.param("theta", torch.ones(())) ** 2)
    import jax.numpy as jnp
    import numpyro

    return lambda x: numpyro.factor("runaway", numpyro.param("theta", jnp.ones(())) ** 2)


def _fit(backend: str):
    return _pyro_fit if backend == "pyro" else _numpyro_fit


DATA = np.random.default_rng(0).normal(3.0, 1.0, size=24).astype(np.float32)


def _tiny_images(tmp: Path) -> Path:
    path = tmp / "tiny.npz"
    np.savez(path, x=(np.random.default_rng(0).uniform(size=(30, 28, 28)) * 255).astype(np.uint8))
    return path


def _cli(*args: str) -> None:
    """Run the command line; its one-line error (status 2) is raised as ``SystemExit`` with that line."""
    import contextlib
    import io

    from tilted_priors.models.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(list(args))
    if status:
        raise SystemExit(err.getvalue().strip().splitlines()[-1])


def _run_folder(tmp: Path, **changes) -> Path:
    out = tmp / "run"
    out.mkdir(exist_ok=True)
    config = {"method": "lebm", "backend": "numpyro", "data": "mnist", "image_shape": [28, 28, 1], "latent_dim": 3,
              "ngf": 2, "seed": 0, "batch_size": 9, "epochs": None, "num_steps": 2, "lr_energy": 1e-4,
              "lr_generator": 1e-3, "posterior_steps": 20, "posterior_step_size": 0.1, **changes}
    (out / "config.json").write_text(json.dumps(config))
    return out


# --- training that goes wrong ---------------------------------------------------------------------------------
for _b in ("pyro", "numpyro"):
    case("Training", "learning rate far too large (the loss runs away, still finite)", _b, "the loss jumped")(
        lambda tmp, b=_b: _fit(b)(_mean_model(b), DATA, num_steps=30, lr=1e3, out=tmp, checkpoint_every=1))
    case("Training", "a loss drifting without bound, step by step (never jumping)", _b, "the loss grew")(
        lambda tmp, b=_b: _fit(b)(_unbounded_model(b), DATA, num_steps=2000, lr=1.0))
    case("Training", "a loss that does not depend on the parameters (they never change)", _b,
         "no trainable parameter changed")(
        lambda tmp, b=_b: _fit(b)(_mean_model(b, used=False), DATA, num_steps=250, lr=1e-2))

# --- checkpoints and run folders ------------------------------------------------------------------------------
for _b in ("pyro", "numpyro"):
    def _damaged(tmp, b=_b, how="truncated"):
        _fit(b)(_mean_model(b), DATA, num_steps=2, lr=1e-2, out=tmp, keep_checkpoints=1)
        path = next(tmp.glob("checkpoint.*"))
        raw = path.read_bytes()
        path.write_bytes(b"" if how == "empty" else raw[: len(raw) // 2] if how == "truncated"
                         else raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 1]) + raw[len(raw) // 2 + 1:])
        _fit(b)(_mean_model(b), DATA, num_steps=4, lr=1e-2, out=tmp, resume=True)

    for _how in ("empty", "truncated", "one byte changed"):
        case("Checkpoints and run folders", f"resume from a checkpoint that is {_how} (no earlier one kept)", _b,
             "checkpoint")(lambda tmp, f=_damaged, h=_how: f(tmp, how=h))

    def _fallback(tmp, b=_b):
        _fit(b)(_mean_model(b), DATA, num_steps=4, lr=1e-2, out=tmp, checkpoint_every=2)
        next(tmp.glob("checkpoint.*")).write_bytes(b"")
        _fit(b)(_mean_model(b), DATA, num_steps=6, lr=1e-2, out=tmp, resume=True)

    case("Checkpoints and run folders", "resume from an empty checkpoint, an earlier one kept", _b,
         "resuming from")(_fallback)

    def _infinite_moments(tmp, b=_b):
        import json as _json

        from tilted_priors.inference.checkpoints import make_manifest

        _fit(b)(_mean_model(b), DATA, num_steps=2, lr=1e-2, out=tmp, keep_checkpoints=1)
        path = next(tmp.glob("checkpoint.*"))
        if b == "pyro":
            import torch

            ckpt = torch.load(path, weights_only=True)["payload"]
            for state in ckpt["optim"].values():
                state["state"][0]["exp_avg_sq"].fill_(float("inf"))
            manifest = make_manifest(ckpt, kind="checkpoint", backend="pyro", config=ckpt["config"],
                                     as_array=lambda v: v.numpy() if isinstance(v, torch.Tensor) else None)
            torch.save({"manifest": _json.dumps(manifest), "payload": ckpt}, path)
        else:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files if k != "manifest"}
            key = [k for k in sorted(arrays) if k.startswith("svi_state/") and arrays[k].dtype.kind == "f"][-1]
            arrays[key] = np.full_like(arrays[key], np.inf)
            manifest = make_manifest(arrays, kind="checkpoint", backend="numpyro")
            np.savez(path, manifest=np.array(_json.dumps(manifest)), **arrays)
        _fit(b)(_mean_model(b), DATA, num_steps=4, lr=1e-2, out=tmp, resume=True)

    case("Checkpoints and run folders", "resume from a checkpoint whose Adam moments are infinite", _b,
         "non-finite")(_infinite_moments)

    def _other_backend(tmp, b=_b):
        (tmp / ("checkpoint.npz" if b == "pyro" else "checkpoint.pt")).write_bytes(b"x")
        _fit(b)(_mean_model(b), DATA, num_steps=2, lr=1e-2, out=tmp, resume=True)

    case("Checkpoints and run folders", "train into a folder that holds the other backend's checkpoints", _b,
         "another backend")(_other_backend)

    def _weights(tmp, b=_b, fault="shape"):
        import importlib

        lebm = importlib.import_module(f"tilted_priors.models.{b}.lebm")
        evaluate = importlib.import_module(f"tilted_priors.models.{b}.evaluate")
        path = tmp / ("weights.pt" if b == "pyro" else "weights.npz")
        evaluate.save_params(lebm.build((28, 28, 1), 3, ngf=2, prior="gaussian" if fault == "missing" else "ebm"),
                             path)
        evaluate.load_params(lebm.build((28, 28, 1), 3, ngf=4 if fault == "shape" else 2), path)

    case("Checkpoints and run folders", "weights file with arrays of the wrong shape", _b, "has shape")(_weights)
    case("Checkpoints and run folders", "weights file that lacks the energy's arrays", _b, "lacks")(
        lambda tmp, f=_weights: f(tmp, fault="missing"))


def _locked(tmp):
    import subprocess
    import textwrap

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from tilted_priors.inference.files import run_lock
        with run_lock({str(tmp)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        _pyro_fit(_mean_model("pyro"), DATA, num_steps=2, lr=1e-2, out=tmp)
    finally:
        holder.kill()
        holder.wait()


case("Checkpoints and run folders", "two trainings writing to the same folder at once", "both", "in use by another "
     "process")(_locked)
def _edited_config(tmp, text):
    (_run_folder(tmp) / "config.json").write_text(text)
    _cli("sample", str(tmp / "run"))


case("Checkpoints and run folders", "config.json edited into invalid JSON", "both", "config.json")(
    lambda tmp: _edited_config(tmp, "{oops"))
case("Checkpoints and run folders", "config.json without a setting (latent_dim)", "both", "latent_dim")(
    lambda tmp: _edited_config(tmp, json.dumps({k: v for k, v in json.loads(
        (_run_folder(tmp) / "config.json").read_text()).items() if k != "latent_dim"})))
case("Checkpoints and run folders", "config.json with a wrong value (ngf: \"wide\")", "both", "ngf")(
    lambda tmp: _edited_config(tmp, json.dumps({**json.loads((_run_folder(tmp) / "config.json").read_text()),
                                                "ngf": "wide"})))


def _no_weights(tmp):
    _run_folder(tmp)
    _cli("sample", str(tmp / "run"))


case("Checkpoints and run folders", "a run folder without its weights file", "both", "weights")(_no_weights)


# --- samplers ---------------------------------------------------------------------------------------------------
def _sampler_run(b: str, sampler, log_density, init):
    if b == "pyro":
        import pyro

        pyro.set_rng_seed(0)  # the message quotes the draws: the same whatever ran before
        return sampler.run(log_density, init)
    import jax

    return sampler.run(jax.random.PRNGKey(0), log_density, init)


def _backend_modules(b: str):
    if b == "pyro":
        import torch

        import tilted_priors.pyro as tp

        return tp, torch.as_tensor
    import jax.numpy as jnp

    import tilted_priors.numpyro as tp

    return tp, jnp.asarray


def _standard_normal(z):
    return -0.5 * (z ** 2).sum(-1)


for _b in ("pyro", "numpyro"):
    def _unstable(tmp, b=_b, strict=False):
        tp, array = _backend_modules(b)
        _sampler_run(b, tp.ShortRunLangevin(20, 3.0, strict=strict), _standard_normal,
                     array(np.ones((4, 2), np.float32)))

    case("Samplers", "ULA step far too large: the chains run away but stay finite", _b, "ran away")(_unstable)
    case("Samplers", "the same with strict=True", _b, "ran away")(lambda tmp, f=_unstable: f(tmp, strict=True))

    def _integer_init(tmp, b=_b):
        tp, array = _backend_modules(b)
        _sampler_run(b, tp.MALA(5, 0.1), _standard_normal, array(np.ones((4, 2), np.int64)))

    case("Samplers", "an integer-typed initial state", _b, "init")(_integer_init)

    def _float_density(tmp, b=_b):
        tp, array = _backend_modules(b)
        _sampler_run(b, tp.MALA(5, 0.1), lambda z: 1.0, array(np.ones((4, 2), np.float32)))

    case("Samplers", "a log density that returns a Python float", _b, "log_density")(_float_density)


def _detached_energy(tmp):
    import torch

    from tilted_priors.pyro import EnergyTiltedNormal

    def energy(z):  # through NumPy: detached from torch's graph
        return torch.as_tensor(np.sum(z.detach().numpy() ** 2, -1))

    EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2)).sample((4,))


case("Samplers", "an energy computed through NumPy (detached from torch's graph)", "pyro", "energy")(
    _detached_energy)


def _numpy_energy(tmp):
    import jax
    import jax.numpy as jnp

    from tilted_priors.numpyro import EnergyTiltedNormal

    def energy(z):
        return np.sum(np.asarray(z) ** 2, -1)

    EnergyTiltedNormal(energy, jnp.zeros(2), jnp.ones(2)).sample(jax.random.PRNGKey(0), (4,))


case("Samplers", "an energy computed through NumPy", "numpyro", "jax.numpy")(_numpy_energy)


def _unregistered(tmp, b):
    if b == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal

        from pyro.infer.autoguide import AutoNormal

        from tilted_priors.pyro import Unnormalized

        net, param, lib = EnergyMLP(2), pyro.param, torch
        sample, plate = pyro.sample, pyro.plate
    else:
        import jax.numpy as lib
        import numpyro
        import numpyro.distributions as dist
        from flax import nnx

        from numpyro.infer.autoguide import AutoNormal

        from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal, Unnormalized

        net, param, sample, plate = EnergyMLP(2, rngs=nnx.Rngs(0)), numpyro.param, numpyro.sample, numpyro.plate

    def model(x):
        param("scale", lib.ones(()))
        with plate("data", x.shape[0]):
            z = sample("z", EnergyTiltedNormal(net, lib.zeros(2), lib.ones(2), normalizer=Unnormalized()))
            sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    _fit(b)(model, np.zeros((8, 2), np.float32), guide=AutoNormal(model), num_steps=1, batch_size=4, lr=1e-3)


for _b in ("pyro", "numpyro"):
    case("Samplers", "an energy network used by the model but never registered as parameters", _b,
         "not registered")(lambda tmp, b=_b: _unregistered(tmp, b))


# --- arguments ---------------------------------------------------------------------------------------------------
def _square(z):
    return (z ** 2).sum(-1)


def _prior(b: str, d: int = 3, **kwargs):
    tp, array = _backend_modules(b)
    return tp.EnergyTiltedNormal(_square, array(np.zeros(d, np.float32)), array(np.ones(d, np.float32)), **kwargs)


def _sample(b: str, dist, shape):
    if b == "pyro":
        return dist.sample(shape)
    import jax

    return dist.sample(jax.random.PRNGKey(0), shape)


def _dist_module(b: str):
    if b == "pyro":
        import pyro.distributions as dist
    else:
        import numpyro.distributions as dist
    return dist


for _b in ("pyro", "numpyro"):
    def _proposal(tmp, b=_b, event=True, size=3):
        tp, array = _backend_modules(b)
        proposal = _dist_module(b).Normal(array(np.zeros(size, np.float32)), 1.0)
        proposal = proposal.to_event(1) if event else proposal
        normalizer = tp.Importance(10, proposal=proposal)
        dist = _prior(b)
        if b == "pyro":
            normalizer.estimate(dist)
        else:
            import jax

            normalizer.estimate(dist, jax.random.PRNGKey(0))

    case("Arguments", "Importance proposal without .to_event(1)", _b, "proposal")(
        lambda tmp, f=_proposal: f(tmp, event=False))
    case("Arguments", "Importance proposal of another event size", _b, "proposal")(
        lambda tmp, f=_proposal: f(tmp, size=2))
    case("Arguments", "sample_shape given as a float (2.5)", _b, "sample_shape")(
        lambda tmp, b=_b: _sample(b, _prior(b), 2.5))
    case("Arguments", "sample_shape with a negative size", _b, "sample_shape")(
        lambda tmp, b=_b: _sample(b, _prior(b), (-1,)))
    case("Arguments", "loc and scale that do not broadcast", _b, "loc")(
        lambda tmp, b=_b: _backend_modules(b)[0].EnergyTiltedNormal(
            _square, _backend_modules(b)[1](np.zeros(3, np.float32)), _backend_modules(b)[1](np.ones(2, np.float32))))
    case("Arguments", "a sampler class given where an instance belongs", _b, "sampler")(
        lambda tmp, b=_b: _prior(b, sampler=_backend_modules(b)[0].MALA))


def _float64_loc(tmp):
    import torch

    from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal

    dist = EnergyTiltedNormal(EnergyMLP(3), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    dist.log_prob(torch.zeros(3, dtype=torch.float64))


case("Arguments", "a float32 energy network with a float64 loc", "pyro", "float64")(_float64_loc)


def _energy_distance(tmp):
    from tilted_priors.inference.diagnostics import energy_distance

    energy_distance(np.zeros((2, 10, 3)), np.zeros((10, 3)))


case("Arguments", "energy_distance given chains of shape (chain, draw, d)", "both", "(n, d)")(_energy_distance)


def _no_matplotlib(tmp):
    from tilted_priors.inference.diagnostics import plots
    from tilted_priors.inference.diagnostics._arviz import arviz_module

    arviz_module()
    saved = {k: v for k, v in sys.modules.items() if k == "matplotlib" or k.startswith("matplotlib.")}
    sys.modules["matplotlib"] = None
    try:
        plots.plot_trace(np.zeros((2, 10, 2)), tmp / "t.png")
    finally:
        del sys.modules["matplotlib"]
        sys.modules.update(saved)


case("Arguments", "a plot when matplotlib is not installed", "both", "pip install matplotlib")(_no_matplotlib)


# --- command line ----------------------------------------------------------------------------------------------
def _resume(tmp, *options):
    _run_folder(tmp)
    _cli("train", "lebm", "--out", str(tmp / "run"), "--steps", "3", "--resume", *options)


case("Command line", "train --resume with another seed than the run's", "both", "seed")(
    lambda tmp: _resume(tmp, "--seed", "1"))
case("Command line", "train --resume --backend pyro on a NumPyro run", "both", "backend")(
    lambda tmp: _resume(tmp, "--backend", "pyro"))
case("Command line", "train --resume --ngf 4 on a run with generator width 2", "both", "ngf")(
    lambda tmp: _resume(tmp, "--ngf", "4"))
case("Command line", "train on a data file that does not exist", "both", "missing.npz")(
    lambda tmp: _cli("train", "lebm", "--data", str(tmp / "missing.npz"), "--out", str(tmp / "run"), "--steps", "1"))
case("Command line", "sample from a folder that is not a run", "both", "config.json")(
    lambda tmp: _cli("sample", str(tmp)))


# --- running and rendering -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    behaviour: str  # "error: Type", "warning: Category" or "ran silently"
    message: str

    @property
    def silent(self) -> bool:
        return self.behaviour == "ran silently"


def run_case(c: Case) -> Outcome:
    """Run one case in a fresh temporary folder; its error, else its first warning, else "ran silently"."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            c.run(Path(tmp))
        except SystemExit as err:  # the command line's one-line error
            return Outcome("error: exit status 2", _clean(str(err), tmp))
        except Exception as err:
            return Outcome(f"error: {type(err).__name__}", _clean(str(err), tmp))
        relevant = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
                    and "ArviZ" not in str(w.message)]
        if relevant:
            return Outcome(f"warning: {relevant[0].category.__name__}", _clean(str(relevant[0].message), tmp))
    return Outcome("ran silently", "")


def _clean(message: str, tmp: str) -> str:
    message = message.replace(str(Path(tmp).resolve()), "TMP").replace(tmp, "TMP")
    message = re.sub(r"pid \d+ on host [^,]+, since [0-9: -]+", "pid N on host H, since T", message)
    message = " ".join(message.split())
    return message if len(message) <= _MESSAGE_CHARS else message[:_MESSAGE_CHARS - 1].rstrip() + "…"


def kinds() -> list[str]:
    return list(dict.fromkeys(c.kind for c in CASES))


def rows_of(cases: list[Case], outcomes: list[Outcome]) -> list[str]:
    """The table rows of cases and their outcomes."""
    return [f"| {c.what} | {c.backend} | {o.behaviour} | " + o.message.replace("|", "\\|") + " |"
            for c, o in zip(cases, outcomes)]


def rows(kind: str) -> list[str]:
    """The table rows of one class of failure, running its cases."""
    cases = [c for c in CASES if c.kind == kind]
    return rows_of(cases, [run_case(c) for c in cases])


def render() -> str:
    lines = ["# Fault matrix", "",
             "What the library does with bad inputs and faults, case by case: every row is run by",
             "`python docs/fault_matrix.py`, which wrote this page, and by the test suite, which checks that no case",
             "runs silently, that each message names what is at fault, and that this page still says what the code",
             "does. Messages are shown up to their first 180 characters; `TMP` is the temporary folder of the case.", ""]
    for kind in kinds():
        lines += [f"## {kind}", "", "| Input or fault | Backend | Behaviour | Message |", "|---|---|---|---|",
                  *rows(kind), ""]
    return "\n".join(lines)


def page_rows(kind: str) -> list[str]:
    """The rows of one class as the page shows them."""
    text = PAGE.read_text() if PAGE.exists() else ""
    section = text.split(f"## {kind}\n", 1)[1].split("\n## ", 1)[0] if f"## {kind}\n" in text else ""
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Input")]


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
