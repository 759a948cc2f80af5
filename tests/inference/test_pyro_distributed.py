"""Pyro's ``fit`` on devices and under ``torchrun``: ``device=`` places the minibatches; two gloo processes train as
one process does, a killed two-process run resumes, and with stochastic chains the processes stay in step (CPU;
the multi-process tests are marked slow: each launch starts Python twice)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    import numpy as np, pyro, torch
    import pyro.distributions as dist
    from pyro.distributions import constraints
    from pyro.infer.autoguide import AutoDelta
    from tilted_priors.inference.pyro import ShortRunPosterior, fit, register_module
    from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal, LearnedLogZ

    kind, out, steps, resume, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = int(os.environ.get("RANK", "0"))
    data = np.random.default_rng(0).normal(1.0, 0.5, size=(24, 1)).astype(np.float32)
    if kind == "deterministic":   # no random draw anywhere: one process and two must agree to float error
        net = EnergyMLP(1, 8)

        def model(x):
            energy = register_module("energy", net)
            loc = pyro.sample("loc", dist.Normal(0.0, 3.0))            # a global latent: 1/W of it per process
            scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", EnergyTiltedNormal(energy, loc.expand(1), scale.expand(1),
                                                    normalizer=LearnedLogZ("c")), obs=x)
        guide = AutoDelta(model)
    else:                         # LEBM: short-run posterior chains and the contrastive prior chains
        net, decoder = EnergyMLP(2, 8), torch.nn.Linear(2, 1)

        def model(x):
            energy = register_module("energy", net)
            g = register_module("decoder", decoder)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2)))
                pyro.sample("x", dist.Normal(g(z), 0.5).to_event(1), obs=x)
        guide = ShortRunPosterior(model, steps=5, step_size=0.1)


    def callback(record):
        if record["step"] == die_at and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)


    result = fit(model, guide, data, num_steps=steps, batch_size=8, lr=0.01, betas=(0.9, 0.999), out=out,
                 checkpoint_every=1, resume=resume, progress=False, callback=callback)
    with open(os.path.join(out, f"result-{rank}.json"), "w") as f:
        json.dump({"params": {k: np.asarray(v).tolist() for k, v in result.params.items()},
                   "losses": result.losses.tolist()}, f)
''')


def _run(tmp_path: Path, out: Path, *args: str, processes: int = 2, check: bool = True):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    done = subprocess.run(launcher + [str(script), *args[:1], str(out), *args[1:]], env=env, capture_output=True,
                          text=True, timeout=240)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _result(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"result-{rank}.json").read_text())


def _assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        np.testing.assert_allclose(a["params"][name], b["params"][name], rtol=tol, atol=tol, err_msg=name)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=tol, atol=tol)


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    _run(tmp_path, tmp_path / "one", "deterministic", "6", "0", "0", processes=1)
    _run(tmp_path, tmp_path / "two", "deterministic", "6", "0", "0")
    one, two = _result(tmp_path / "one"), _result(tmp_path / "two")
    _assert_close(one, two)
    assert _result(tmp_path / "two", 1) == two           # both processes hold the same parameters
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint*")) == \
        sorted(p.name for p in (tmp_path / "one").glob("checkpoint*"))   # rank 0 alone writes


@pytest.mark.slow
def test_a_killed_two_process_run_resumes(tmp_path):
    out = tmp_path / "run"
    died = _run(tmp_path, out, "deterministic", "6", "0", "3", check=False)
    assert died.returncode != 0 and (out / "checkpoint.pt").exists() and not (out / "result-0.json").exists()
    _run(tmp_path, out, "deterministic", "6", "1", "0")
    _run(tmp_path, tmp_path / "whole", "deterministic", "6", "0", "0", processes=1)  # = two processes (above)
    _assert_close(_result(out), _result(tmp_path / "whole"))
    assert len(json.loads((out / "history.json").read_text())["history"]) == 6


@pytest.mark.slow
def test_processes_stay_in_step_with_stochastic_chains(tmp_path):
    _run(tmp_path, tmp_path / "lebm", "lebm", "4", "0", "0")
    a, b = _result(tmp_path / "lebm", 0), _result(tmp_path / "lebm", 1)
    assert a == b and all(np.isfinite(np.asarray(v, dtype=float)).all() for v in a["params"].values())


def test_fit_places_minibatches_on_the_given_device():
    import pyro
    import pyro.distributions as dist
    import torch

    from tilted_priors.inference.pyro import fit

    seen = []

    def model(x):
        seen.append(x.device)
        mu = pyro.param("device_mu", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    pyro.clear_param_store()
    data = np.zeros(8, dtype=np.float32)
    result = fit(model, None, data, num_steps=2, batch_size=4, lr=0.1, progress=False, device="cpu")
    assert result.steps == 2 and set(seen) == {torch.device("cpu")}
    with pytest.raises(ValueError, match="device must be a torch device"):
        fit(model, None, data, num_steps=1, batch_size=4, progress=False, device="warp-drive")
