"""Kill a command-line training with SIGKILL at random moments (one of them while a checkpoint is being written),
resume it each time, and compare with a run never interrupted: weights and loss history equal bit for bit, no
step lost or repeated, nothing left behind. Both backends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

STEPS = 10


def _command(data, out) -> list[str]:
    return [sys.executable, "-m", "tilted_priors", "train", "lebm", "--data", str(data), "--out", str(out),
            "--batch-size", "9", "--ngf", "2", "--latent-dim", "3", "--steps", str(STEPS), "--checkpoint-every", "1",
            "--no-eval", "--quiet", "--resume"]


def _env(tmp_path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _kill(proc, out, mode: str, rng) -> bool:
    """Wait until the run has written its first checkpoint, then SIGKILL it: after a random delay, or as soon as a
    temporary file shows that a write is under way. False if the process finished first."""
    deadline = time.monotonic() + 300
    while not (out.exists() and any(p.name.startswith("checkpoint") for p in out.iterdir())):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    if mode == "random":
        time.sleep(rng.uniform(0.0, 0.3))
    else:
        while not any(p.name.startswith(".checkpoint") and p.name.endswith(".tmp") for p in out.iterdir()):
            if proc.poll() is not None:
                return False
            time.sleep(0.0005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _weights(path) -> dict:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files if k != "__manifest__"}
    import torch

    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items() if k != "__manifest__"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, backend):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=(rng.uniform(size=(30, 28, 28)) * 255).astype(np.uint8))
    env = _env(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(data, straight) + ["--backend", backend], env=env, check=True, capture_output=True)

    kills = 0
    for mode in ("writing", "random", "random"):
        proc = subprocess.Popen(_command(data, killed) + ["--backend", backend], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += _kill(proc, killed, mode, rng)
    assert kills >= 2, "the runs finished before they could be killed: make them longer"
    done = subprocess.run(_command(data, killed), env=env, capture_output=True, text=True)  # the run's backend
    assert done.returncode == 0, done.stderr

    weights = "weights.pt" if backend == "pyro" else "weights.npz"
    a, b = _weights(straight / weights), _weights(killed / weights)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ha = json.loads((straight / "history.json").read_text())["history"]
    hb = json.loads((killed / "history.json").read_text())["history"]
    assert [r["step"] for r in hb] == list(range(1, STEPS + 1))  # no step lost or repeated
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp") or p.name == ".lock"]
