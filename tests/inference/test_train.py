"""``fit`` on both backends: learning, per-prefix rates and schedule, bit-identical resume, interrupted runs,
the divergence guard, safe-to-load atomic checkpoints and argument checks. Tiny models, a few steps each."""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest

from tilted_priors.inference._plan import batch_order
from tilted_priors.inference._training import TrainingDiverged
from tilted_priors.inference.files import atomic_write
from tilted_priors import ChainDivergenceError

from fit_sides import BATCH, N, SPE, NumPyroSide, PyroSide, side_fixture
from fit_sides import assert_identical as _assert_identical
from fit_sides import data as _data
from fit_sides import run_fit as _run

side = pytest.fixture(params=["pyro", "numpyro"])(side_fixture)


# --- learning ----------------------------------------------------------------------------------------------
def test_loss_decreases_and_history(side, tmp_path):
    side.fresh()
    result = _run(side, epochs=15, lr=0.05, betas=(0.9, 0.999), out=tmp_path)
    assert result.steps == 15 * SPE == len(result.history) == len(result.losses)
    assert result.losses[-8:].mean() < result.losses[:8].mean() - 5.0
    assert abs(float(result.params["mu"]) - 3.0) < 1.0
    assert {"step", "epoch", "loss", "lr", "seconds"} <= set(result.history[0])
    assert result.history[SPE]["epoch"] == 2
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["config"]["batch_size"] == BATCH and len(history["history"]) == result.steps
    assert sorted(os.listdir(tmp_path)) == sorted([side.ckpt, "history.json"])  # no temp files left
    assert result.checkpoint == str(tmp_path / side.ckpt)
    assert side.load(result.checkpoint)["step"] == result.steps


def test_no_output_written_without_out(side, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    side.fresh()
    result = _run(side, num_steps=3, lr=0.01)
    assert result.checkpoint is None and os.listdir(tmp_path) == []


def test_per_prefix_learning_rates_and_schedule(side):
    side.fresh()
    model, guide, (frozen, moving) = side.two_param_model()
    result = side.fit(model, guide, _data(), num_steps=2 * SPE, batch_size=BATCH, lr={"frozen": 0.0, "": 0.1},
                      lr_decay=0.5, progress=False)
    assert float(result.params[frozen]) == 0.0          # its group's rate is 0: it never moves
    assert float(result.params[moving]) > 0.5           # the default group learns
    assert result.history[0]["lr"] == {"frozen": 0.0, "": 0.1}
    assert result.history[SPE - 1]["lr"][""] == 0.1 and result.history[SPE]["lr"][""] == 0.05


def test_lr_decay_is_applied_per_epoch(side, tmp_path):
    """With decay 1e-4, the second epoch's updates are ~1e-4 times the first's (on the real parameters)."""
    model, guide, (_, moving) = side.two_param_model()
    side.fresh()
    kwargs = dict(batch_size=BATCH, lr=0.1, lr_decay=1e-4, progress=False, out=tmp_path)
    first = float(side.fit(model, guide, _data(), num_steps=SPE, **kwargs).params[moving])
    second = float(side.fit(model, guide, _data(), num_steps=2 * SPE, resume=True, **kwargs).params[moving])
    assert first > 0.2
    assert 0 < abs(second - first) < SPE * 0.1 * 1e-4 * 3


# --- resume ------------------------------------------------------------------------------------------------
RESUME_KW = dict(lr={"mu": 0.03, "": 0.05}, lr_decay=0.9, clip_norm=50.0, seed=3)


def test_resume_is_bit_identical(side, tmp_path):
    side.fresh()
    straight = _run(side, epochs=2, out=tmp_path / "a", **RESUME_KW)
    side.fresh()
    first = _run(side, epochs=1, out=tmp_path / "b", **RESUME_KW)
    assert first.steps == SPE
    side.fresh()  # a new process: nothing in memory survives
    resumed = _run(side, epochs=2, out=tmp_path / "b", resume=True, **RESUME_KW)
    _assert_identical(straight, resumed)
    np.testing.assert_array_equal(first.losses, straight.losses[:SPE])


def test_resume_mid_epoch_and_nothing_left_to_do(side, tmp_path):
    side.fresh()
    straight = _run(side, num_steps=2 * SPE + 1, out=tmp_path / "a", **RESUME_KW)
    side.fresh()
    _run(side, num_steps=SPE + 2, out=tmp_path / "b", **RESUME_KW)   # stops mid-epoch
    side.fresh()
    resumed = _run(side, num_steps=2 * SPE + 1, out=tmp_path / "b", resume=True, **RESUME_KW)
    _assert_identical(straight, resumed)
    again = _run(side, num_steps=2 * SPE + 1, out=tmp_path / "b", resume=True, **RESUME_KW)
    assert again.steps == straight.steps
    np.testing.assert_array_equal(again.losses, straight.losses)
    with pytest.raises(ValueError, match="beyond"):
        _run(side, num_steps=3, out=tmp_path / "b", resume=True, **RESUME_KW)


def test_interrupted_run_loses_nothing(side, tmp_path):
    """A crash at step 7 with checkpoints every 3 steps: resume from step 6 gives the uninterrupted run."""
    side.fresh()
    straight = _run(side, num_steps=10, out=tmp_path / "a", checkpoint_every=3, **RESUME_KW)

    def crash(record):
        if record["step"] == 7:
            raise KeyboardInterrupt

    side.fresh()
    with pytest.raises(KeyboardInterrupt):
        _run(side, num_steps=10, out=tmp_path / "b", checkpoint_every=3, callback=crash, **RESUME_KW)
    assert side.load(tmp_path / "b" / side.ckpt)["step"] == 6
    backup = side.ckpt.replace(".", "-000003.")  # the previous checkpoint is kept
    assert sorted(os.listdir(tmp_path / "b")) == sorted([side.ckpt, backup, "history.json"])
    side.fresh()
    resumed = _run(side, num_steps=10, out=tmp_path / "b", checkpoint_every=3, resume=True, **RESUME_KW)
    _assert_identical(straight, resumed)


def test_callback_can_stop_and_resume_continues(side, tmp_path):
    side.fresh()
    stopped = _run(side, num_steps=8, out=tmp_path, callback=lambda r: r["step"] == 5, lr=0.05)
    assert stopped.steps == 5 and side.load(tmp_path / side.ckpt)["step"] == 5
    side.fresh()
    assert _run(side, num_steps=8, out=tmp_path, resume=True, lr=0.05).steps == 8


def test_resume_refuses_a_different_batch_order(side, tmp_path):
    side.fresh()
    _run(side, num_steps=2, out=tmp_path, lr=0.05)
    with pytest.raises(ValueError, match="seed"):
        _run(side, num_steps=4, out=tmp_path, resume=True, seed=1, lr=0.05)
    with pytest.raises(ValueError, match="batch_size"):
        _run(side, num_steps=4, out=tmp_path, resume=True, batch_size=4, lr=0.05)


def test_resume_without_checkpoint_starts_afresh(side, tmp_path):
    side.fresh()
    a = _run(side, num_steps=3, out=tmp_path / "a", lr=0.05)
    side.fresh()
    b = _run(side, num_steps=3, out=tmp_path / "b", resume=True, lr=0.05)
    _assert_identical(a, b)


# --- divergence guard --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize("nan_in_scale", [False, True], ids=["nan-loss", "nan-scale"])
def test_divergence_raises_and_keeps_last_good_checkpoint(side, tmp_path, nan_in_scale):
    side.fresh()
    # mu climbs from 0 towards 3; above 1 the loss is nan (Pyro's validation reports a nan scale first)
    validation = contextlib.nullcontext() if nan_in_scale else side.no_validation()
    with validation, pytest.raises(TrainingDiverged) as info:
        _run(side, nan_above=1.0, nan_in_scale=nan_in_scale, num_steps=200, lr=0.05, betas=(0.9, 0.999),
             out=tmp_path, checkpoint_every=2)
    err = info.value
    assert isinstance(err, FloatingPointError) and 2 < err.step < 200
    assert err.checkpoint == str(tmp_path / side.ckpt) and err.checkpoint_step == 2 * ((err.step - 1) // 2)
    assert str(err.checkpoint) in str(err) and "learning rate" in str(err) and f"step {err.step}" in str(err)
    ckpt = side.load(tmp_path / side.ckpt)
    assert ckpt["step"] == err.checkpoint_step
    assert all(np.all(np.isfinite(v)) for v in ckpt["params"].values())
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert len(history) == err.checkpoint_step and all(np.isfinite(r["loss"]) for r in history)
    kept = [side.ckpt.replace(".", f"-{s:06d}.") for s in range(err.checkpoint_step - 4, err.checkpoint_step, 2)
            if s > 0]  # the two checkpoints before the last are kept too
    assert sorted(os.listdir(tmp_path)) == sorted([side.ckpt, "history.json", *kept])


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_without_checkpoint_says_so(side):
    side.fresh()
    with side.no_validation(), pytest.raises(TrainingDiverged, match="no checkpoint was written") as info:
        _run(side, nan_above=0.01, num_steps=5, lr=0.05)
    assert info.value.step == 2 and info.value.checkpoint is None


def test_pyro_nan_at_set_up_is_a_divergence():
    side = PyroSide()
    side.fresh()
    with pytest.raises(TrainingDiverged, match="setting up") as info:
        _run(side, nan_above=-1.0, num_steps=3, lr=0.05)
    assert info.value.step == 1


def test_chain_divergence_error_in_guide_becomes_training_diverged(tmp_path):
    side = PyroSide()
    side.fresh()
    model = side.latent_model()
    auto = side.auto_guide(model)
    calls = {"n": 0}

    def guide(x):
        calls["n"] += 1
        if calls["n"] > 6:
            raise ChainDivergenceError("ShortRunLangevin", step=5, step_size=0.4, num_bad=2)
        return auto(x)

    with pytest.raises(TrainingDiverged, match="ShortRunLangevin") as info:
        side.fit(model, guide, _data(), num_steps=20, batch_size=BATCH, lr=0.05, progress=False, out=tmp_path,
                 checkpoint_every=1)
    assert isinstance(info.value.__cause__, ChainDivergenceError)
    assert side.load(tmp_path / side.ckpt)["step"] == info.value.checkpoint_step == info.value.step - 1


# --- per-datum state: pass_index and state_dict ------------------------------------------------------------
def test_pyro_guide_state_and_index_survive_resume(tmp_path):
    side = PyroSide()
    pyro, dist, torch = side.pyro, side.dist, side.torch
    model = side.latent_model()

    class MemoryGuide:
        """Keeps a value per datum (like persistent chains) and reports it through state_dict."""

        def __init__(self):
            self.memory = torch.zeros(N)

        def __call__(self, x, index):
            loc = pyro.param("q_loc", torch.zeros(()))
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(loc + self.memory[index], 1.0))
            self.memory[index] = 0.5 * self.memory[index] + 0.1 * z.detach()

        def state_dict(self):
            return {"memory": self.memory.clone()}

        def load_state_dict(self, state):
            self.memory = state["memory"].clone()

    def run(out, steps, resume=False):
        side.fresh()
        guide = MemoryGuide()
        result = side.fit(model, guide, _data(), num_steps=steps, batch_size=BATCH, lr=0.05, progress=False,
                          out=out, pass_index=True, resume=resume)
        return result, guide

    straight, g1 = run(tmp_path / "a", 10)
    run(tmp_path / "b", 5)
    resumed, g2 = run(tmp_path / "b", 10, resume=True)
    _assert_identical(straight, resumed)
    assert torch.equal(g1.memory, g2.memory) and g1.memory.abs().sum() > 0
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["payload"]["guide_state"]
    assert torch.equal(saved["memory"], g2.memory)


def test_numpyro_mutable_state_index_and_guide_state_survive_resume(tmp_path):
    import jax
    from numpyro.primitives import mutable

    side = NumPyroSide()
    numpyro, dist, jnp = side.numpyro, side.dist, side.jnp
    model = side.latent_model()

    class MemoryGuide:
        """Per-datum memory as NumPyro mutable state (inside the jitted update) plus a host-side state_dict."""

        def __init__(self):
            self.extra = {"tag": np.arange(3.0)}

        def __call__(self, x, index):
            loc = numpyro.param("q_loc", jnp.zeros(()))
            mem = mutable("memory", {"value": jnp.zeros(N)})
            with numpyro.plate("data", x.shape[0]):
                z = numpyro.sample("z", dist.Normal(loc + mem["value"][index], 1.0))
            mem["value"] = mem["value"].at[index].set(0.5 * mem["value"][index] + 0.1 * jax.lax.stop_gradient(z))

        def state_dict(self):
            return self.extra

        def load_state_dict(self, state):
            self.extra = {k: np.array(v) for k, v in state.items()}

    def run(out, steps, resume=False, tag=None):
        guide = MemoryGuide()
        if tag is not None:
            guide.extra["tag"] = tag
        result = side.fit(model, guide, _data(), num_steps=steps, batch_size=BATCH, lr=0.05, progress=False,
                          out=out, pass_index=True, resume=resume)
        return result, guide

    straight, _ = run(tmp_path / "a", 10)
    run(tmp_path / "b", 5, tag=np.array([7.0, 8.0]))
    resumed, guide = run(tmp_path / "b", 10, resume=True)
    _assert_identical(straight, resumed)
    np.testing.assert_array_equal(straight.state.mutable_state["memory"]["value"],
                                  resumed.state.mutable_state["memory"]["value"])
    assert np.abs(np.asarray(resumed.state.mutable_state["memory"]["value"])).sum() > 0
    np.testing.assert_array_equal(guide.extra["tag"], [7.0, 8.0])


def test_numpyro_pytree_params_are_flattened(tmp_path):
    side = NumPyroSide()
    numpyro, dist, jnp = side.numpyro, side.dist, side.jnp

    def model(x):
        p = numpyro.param("net$params", {"w": jnp.zeros(2), "b": jnp.zeros(())})
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(p["w"].sum() + p["b"], 1.0), obs=x)

    result = side.fit(model, lambda x: None, _data(), num_steps=3, batch_size=BATCH, lr={"net": 0.1},
                      progress=False)
    assert sorted(result.params) == ["net$params/b", "net$params/w"]
    assert result.params["net$params/w"].shape == (2,)


# --- checkpoints and atomic writes -------------------------------------------------------------------------
def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]


def test_batch_order_is_a_function_of_seed_and_epoch():
    a = batch_order(5, 2, 10, 3)
    assert a.shape == (3, 3) and len(np.unique(a)) == 9
    np.testing.assert_array_equal(a, batch_order(5, 2, 10, 3))
    assert not np.array_equal(a, batch_order(5, 3, 10, 3)) and not np.array_equal(a, batch_order(6, 2, 10, 3))


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(data=np.array([1.0, np.nan] * 12)), ValueError, "non-finite"),
    (dict(data=np.zeros((0, 2))), ValueError, "empty"),
    (dict(data=np.array(["a"] * 24)), TypeError, "numeric"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=N + 1), ValueError, "larger than the data set"),
    (dict(epochs=1), ValueError, "exactly one"),
    (dict(num_steps=None), ValueError, "exactly one"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(lr=0.0), ValueError, "positive"),
    (dict(lr=-1e-3), ValueError, "positive"),
    (dict(lr={"mu": -1.0, "": 1e-3}), ValueError, "non-negative"),
    (dict(lr={"": 0.0}), ValueError, "every learning rate is 0"),
    (dict(lr={"nosuch": 1e-3, "": 1e-3}), ValueError, "nosuch"),
    (dict(lr={"mu": 1e-3}), ValueError, "matches none of the prefixes"),
    (dict(betas=(0.5, 1.0)), ValueError, "betas"),
    (dict(lr_decay=0.0), ValueError, "lr_decay"),
    (dict(clip_norm=-1.0), ValueError, "clip_norm"),
    (dict(resume=True), ValueError, "needs out"),
    (dict(resume="False"), TypeError, "resume must be True or False"),
    (dict(progress="no"), TypeError, "progress must be True or False"),
    (dict(checkpoint_every=2), ValueError, "needs out"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_bad_input(side, kwargs, error, match):
    side.fresh()
    kwargs = {"num_steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        _run(side, **kwargs)


# --- with the project's own persistent-chain guide ---------------------------------------------------------
def test_resume_with_persistent_short_run_posterior(side, tmp_path):
    """LEBM-style training with per-datum persistent chains: the chains travel in the checkpoint (Pyro:
    ``guide.state_dict()``; NumPyro: SVI's mutable state) and resume stays bit-identical."""
    data = np.random.default_rng(1).normal(size=(N, 2)).astype(np.float32)
    if side.name == "pyro":
        from tilted_priors.inference.pyro.guides import ShortRunPosterior
        from tilted_priors.pyro import EnergyMLP, EnergyTiltedNormal, ShortRunLangevin
        pyro, dist, torch = side.pyro, side.dist, side.torch

        def build():
            side.fresh()
            torch.manual_seed(0)
            energy = EnergyMLP(2, hidden=8)

            def model(x, index=None):
                pyro.module("energy", energy)
                w = pyro.param("w", torch.ones(2))
                with pyro.plate("data", x.shape[0]):
                    prior = EnergyTiltedNormal(energy, torch.zeros(2), torch.ones(2), sampler=ShortRunLangevin(4, 0.4))
                    z = pyro.sample("z", prior)
                    pyro.sample("x", dist.Normal(w * z, 0.3).to_event(1), obs=x)
            return model, ShortRunPosterior(model, steps=3, step_size=0.1, init="persistent", num_data=N)
    else:
        from tilted_priors.inference.numpyro.guides import ShortRunPosterior
        from tilted_priors.numpyro import EnergyTiltedNormal, ShortRunLangevin
        numpyro, dist, jnp = side.numpyro, side.dist, side.jnp

        def build():
            def model(x, index=None):
                a = numpyro.param("energy_a", jnp.full(2, 0.1))
                w = numpyro.param("w", jnp.ones(2))
                with numpyro.plate("data", x.shape[0]):
                    prior = EnergyTiltedNormal(lambda z: (a * z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2),
                                               sampler=ShortRunLangevin(4, 0.4))
                    z = numpyro.sample("z", prior)
                    numpyro.sample("x", dist.Normal(w * z, 0.3).to_event(1), obs=x)
            return model, ShortRunPosterior(model, steps=3, step_size=0.1, init="persistent", num_data=N)

    kwargs = dict(batch_size=BATCH, lr={"energy": 1e-3, "": 1e-2}, pass_index=True, progress=False)
    model, guide = build()
    straight = side.fit(model, guide, data, num_steps=6, out=tmp_path / "a", **kwargs)
    model, guide = build()
    side.fit(model, guide, data, num_steps=3, out=tmp_path / "b", **kwargs)
    model, guide = build()
    resumed = side.fit(model, guide, data, num_steps=6, out=tmp_path / "b", resume=True, **kwargs)
    _assert_identical(straight, resumed)


# --- the trained model and guide ------------------------------------------------------------------------------
def _predict_z(side, model, guide=None, num_samples: int = 1000) -> np.ndarray:
    """Draws of the latent ``z`` for one batch (the AutoNormal's size), from the model's prior or from the guide, by
    the backend's ``Predictive``."""
    x = _data()[:BATCH]
    if side.name == "pyro":
        from pyro.infer import Predictive

        predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=["z"], parallel=True)
        return predictive(side.torch.as_tensor(x))["z"].detach().numpy()
    import jax
    from numpyro.infer import Predictive

    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=["z"])
    return np.asarray(predictive(jax.random.PRNGKey(1), side.jnp.asarray(x))["z"])


def test_result_gives_back_the_trained_model_and_guide(side):
    side.fresh()
    result = _run(side, epochs=15, lr=0.05, betas=(0.9, 0.999))
    mu = float(result.params["mu"])
    assert mu > 1.5  # learned (it starts at 0)
    # z ~ N(mu, 1) under the model: the mean of 1000 * 6 draws is within 0.06 of the trained mu (~4.6 std errors)
    assert abs(_predict_z(side, result.model).mean() - mu) < 0.06
    # z ~ the guide's N(loc, scale ~ 0.45): each datum's mean of 1000 draws is within 0.06 of the trained loc
    loc = result.params["AutoNormal.locs.z" if side.name == "pyro" else "z_auto_loc"]
    assert np.abs(_predict_z(side, result.model, result.guide).mean(0) - loc).max() < 0.06
    if side.name == "pyro":  # the parameters live in the param store: restore() puts them back
        side.pyro.clear_param_store()
        assert abs(_predict_z(side, result.model).mean()) < 0.06
        result.restore()
        assert abs(_predict_z(side, result.model).mean() - mu) < 0.06
        assert np.abs(_predict_z(side, result.model, result.guide).mean(0) - loc).max() < 0.06
