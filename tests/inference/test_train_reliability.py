"""``fit`` protects the run: health checks beyond non-finite values, verified checkpoints with fallback, one writer
per run folder, no temporary files left. Both backends, tiny models."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fit_sides import BATCH, side_fixture
from fit_sides import assert_identical as _assert_identical
from fit_sides import data as _data
from fit_sides import run_fit as _run

from tilted_priors.inference._training import TrainingDiverged
from tilted_priors.inference.checkpoints import CheckpointError, make_manifest, verify_manifest
from tilted_priors.inference.files import RunFolderLocked

side = pytest.fixture(params=["pyro", "numpyro"])(side_fixture)
KW = dict(lr=0.05, betas=(0.9, 0.999))


# --- health ------------------------------------------------------------------------------------------------
def test_runaway_loss_stops_training_while_finite(side, tmp_path):
    model, guide, _ = side.two_param_model()
    side.fresh()
    with pytest.raises(TrainingDiverged, match="the loss jumped") as info:
        side.fit(model, guide, _data(), num_steps=40, batch_size=BATCH, lr=1e3, out=tmp_path, checkpoint_every=1,
                 progress=False)
    err = info.value
    assert err.step <= 5 and "learning rate" in str(err)
    assert err.checkpoint_step == err.step - 1  # the last good state is on disk, the runaway one is not
    assert side.load(tmp_path / side.ckpt)["step"] == err.step - 1


def test_a_loss_drifting_without_bound_stops_training(side):
    from tilted_priors.inference._health import TrainingHealth

    side.fresh()
    with pytest.raises(TrainingDiverged, match="the loss grew to .* times its scale at the start") as info:
        side.fit(side.unbounded_model(), None, _data(), num_steps=300, batch_size=BATCH, lr=1.0, progress=False,
                 health=TrainingHealth(loss_growth=100))
    assert 30 < info.value.step < 120  # -theta^2 with theta ~ step: past 100 x the first losses' median (~30)


def test_health_checks_can_be_switched_off(side):
    from tilted_priors.inference._health import TrainingHealth

    model, guide, _ = side.two_param_model()
    side.fresh()
    result = side.fit(model, guide, _data(), num_steps=8, batch_size=BATCH, lr=1e3, health=False, progress=False)
    assert result.steps == 8 and np.all(np.isfinite(result.losses)) and result.losses.max() > 1e5
    with pytest.raises(ValueError, match="loss_jump"):
        TrainingHealth(loss_jump=0.5)
    with pytest.raises(TypeError, match="health"):
        _run(side, num_steps=2, health="yes")


def test_stalled_parameters_stop_training(side):
    from tilted_priors.inference._health import TrainingHealth

    model = side.unused_param_model()
    side.fresh()
    with pytest.raises(TrainingDiverged, match="no trainable parameter changed from step 3 to step 6"):
        side.fit(model, None, _data(), num_steps=20, batch_size=BATCH, progress=False,
                 health=TrainingHealth(stall_steps=3), **KW)


def test_non_finite_checkpoints_are_refused():
    payload = {"params": np.ones(3, np.float32), "moments": np.array([1.0, np.inf], np.float32)}
    manifest = make_manifest(payload, kind="checkpoint", backend="numpyro")
    verify_manifest("c.npz", payload, manifest, kind="checkpoint", backend="numpyro")  # intact
    with pytest.raises(CheckpointError, match="'moments' holds non-finite values"):
        verify_manifest("c.npz", payload, manifest, kind="checkpoint", backend="numpyro", require_finite=True)
    with pytest.raises(CheckpointError, match="written by the numpyro backend"):
        verify_manifest("c.npz", payload, manifest, kind="checkpoint", backend="pyro")


# --- checkpoints ---------------------------------------------------------------------------------------------
def _damage(path, how: str) -> None:
    raw = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    else:  # one byte changed inside the stored arrays: only the checksum can tell
        i = len(raw) // 2
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "flipped"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(side, tmp_path, how):
    side.fresh()
    straight = _run(side, num_steps=8, **KW)
    side.fresh()
    _run(side, num_steps=6, out=tmp_path, checkpoint_every=2, **KW)
    assert {p.name for p in tmp_path.iterdir()} >= {side.ckpt, side.ckpt.replace(".", "-000004.")}
    _damage(tmp_path / side.ckpt, how)
    side.fresh()
    with pytest.warns(UserWarning, match="resuming from .*checkpoint-000004") as record:
        resumed = _run(side, num_steps=8, out=tmp_path, resume=True, **KW)
    _assert_identical(straight, resumed)
    message = str(record[0].message)
    assert side.ckpt in message and "weights_only" not in message and "allow_pickle" not in message


def test_no_usable_checkpoint_is_an_error_naming_the_file(side, tmp_path):
    side.fresh()
    _run(side, num_steps=2, out=tmp_path, keep_checkpoints=1, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([side.ckpt, "history.json"])
    _damage(tmp_path / side.ckpt, "truncated")
    side.fresh()
    with pytest.raises(CheckpointError, match=f"{side.ckpt}: the checkpoint cannot be read.*resume=False"):
        _run(side, num_steps=4, out=tmp_path, resume=True, **KW)


def test_another_backends_run_folder_is_refused(side, tmp_path):
    other = "checkpoint.npz" if side.name == "pyro" else "checkpoint.pt"
    (tmp_path / other).write_bytes(b"x")
    side.fresh()
    with pytest.raises(CheckpointError, match=f"another backend's checkpoint.*{other}"):
        _run(side, num_steps=2, out=tmp_path, resume=True, **KW)


def test_stale_temporary_files_are_removed(side, tmp_path):
    (tmp_path / f".{side.ckpt}.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    side.fresh()
    _run(side, num_steps=2, out=tmp_path, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([side.ckpt, "history.json"])


# --- one writer per run folder -------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_a_killed_ones_lock_frees_itself(side, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from tilted_priors.inference.files import run_lock
        with run_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        side.fresh()
        with pytest.raises(RunFolderLocked, match=f"pid {holder.pid}"):
            _run(side, num_steps=2, out=tmp_path, **KW)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    side.fresh()
    assert _run(side, num_steps=2, out=tmp_path, **KW).steps == 2  # the dead holder's lock is free
    assert not (tmp_path / ".lock").exists()


def _importance_model(side):
    if side.name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from tilted_priors.pyro import EnergyTiltedNormal, Importance

        def model(x):
            w = pyro.param("w", torch.ones(()))
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", EnergyTiltedNormal(lambda z: w * (z ** 2).sum(-1), torch.zeros(2), torch.ones(2),
                                                        normalizer=Importance(8)))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
        return model
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from tilted_priors.numpyro import EnergyTiltedNormal, Importance

    def model(x):
        w = numpyro.param("w", jnp.ones(()))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", EnergyTiltedNormal(lambda z: w * (z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2),
                                                       normalizer=Importance(8)))
            numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    return model


def test_training_with_an_evaluation_normalizer_warns(side):
    """Importance and AnnealedImportance estimate log Z for evaluation; training with them is warned about."""
    model = _importance_model(side)
    side.fresh()
    with pytest.warns(UserWarning, match="'z' \\(Importance\\) use a normalizer meant for evaluation"):
        side.fit(model, side.auto_guide(model), np.zeros((8, 2), np.float32), num_steps=1, batch_size=4,
                 progress=False)


def test_an_energy_network_that_is_never_registered_warns(side):
    """An energy module not registered as parameters would keep its initial weights: fit says so."""
    if side.name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal

        net = EnergyMLP(2)

        def model(x):
            pyro.param("scale", torch.ones(()))
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", EnergyTiltedNormal(net, torch.zeros(2), torch.ones(2)))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    else:
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from flax import nnx

        from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal

        net = EnergyMLP(2, rngs=nnx.Rngs(0))

        def model(x):
            numpyro.param("scale", jnp.ones(()))
            with numpyro.plate("data", x.shape[0]):
                z = numpyro.sample("z", EnergyTiltedNormal(net, jnp.zeros(2), jnp.ones(2)))
                numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    side.fresh()
    with pytest.warns(UserWarning, match="'z'.*not registered"):
        side.fit(model, side.auto_guide(model), np.zeros((8, 2), np.float32), num_steps=1, batch_size=4,
                 progress=False)
