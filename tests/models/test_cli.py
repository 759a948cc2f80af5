"""The command line end to end on tiny data: train (both methods, both backends), resume, sample, bad input."""
import json

import numpy as np
import pytest

from tilted_priors.models.cli import main


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=(rng.uniform(size=(30, 28, 28)) * 255).astype(np.uint8))
    return path


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_train_resume_and_sample(tmp_path, tiny_npz, backend):
    out = tmp_path / backend
    args = ["train", "lebm", "--backend", backend, "--data", str(tiny_npz), "--out", str(out), "--batch-size", "9",
            "--ngf", "2", "--latent-dim", "3", "--quiet", "--no-eval"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["image_shape"] == [28, 28, 1] and config["steps"] == 3
    assert main(["sample", str(out), "--n", "4"]) == 0
    assert (out / "samples-4.png").stat().st_size > 100


def test_abp_trains_and_evaluates(tmp_path, tiny_npz):
    out = tmp_path / "abp"
    assert main(["train", "abp", "--backend", "pyro", "--data", str(tiny_npz), "--out", str(out), "--steps", "2",
                 "--batch-size", "9", "--ngf", "2", "--latent-dim", "3", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["mse"]) and np.isfinite(m["test_log_likelihood"]["mean"]) and m["log_z"] == 0.0
    assert "frechet_distance" not in m  # no labels, no feature net for user data
    for png in ("samples.png", "reconstructions.png"):
        assert (out / png).stat().st_size > 100


def test_bad_input(tmp_path, tiny_npz, capsys):
    with pytest.raises(SystemExit):
        main(["train", "lebm", "--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["train", "lebm", "--out", str(tmp_path)])  # neither --epochs nor --steps
    assert main(["sample", str(tmp_path)]) == 2  # an error for users: one line, no traceback
    assert "no config.json" in capsys.readouterr().err
    assert main(["train", "lebm", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r"),
                 "--steps", "1"]) == 2
    assert "missing.npz" in capsys.readouterr().err and not (tmp_path / "r").exists()  # no empty run folder left
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 28, 28)))
    assert main(["train", "lebm", "--data", str(bad), "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "'x'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'x'"):  # --debug: the traceback
        main(["train", "lebm", "--data", str(bad), "--out", str(tmp_path), "--steps", "1", "--debug"])


@pytest.mark.parametrize("backend, says", [("numpyro", "XLA_FLAGS"), ("pyro", "torchrun")])
def test_devices_beyond_what_is_there_are_refused_before_anything_is_left(tmp_path, tiny_npz, capsys, backend, says):
    out = tmp_path / "run"
    assert main(["train", "lebm", "--backend", backend, "--devices", "64", "--data", str(tiny_npz), "--out", str(out),
                 "--steps", "1", "--batch-size", "64", "--ngf", "2", "--latent-dim", "3", "--quiet"]) == 2
    assert says in capsys.readouterr().err and not out.exists()


def test_pyro_runs_do_not_inherit_an_earlier_models_parameters(tmp_path, tiny_npz):
    """Two Pyro runs in one process: the second starts from its own initial weights, not the first's."""
    import pyro
    import torch

    from tilted_priors.models import runs

    common = dict(backend="pyro", data=str(tiny_npz), num_steps=1, batch_size=9, ngf=2, latent_dim=3, progress=False,
                  evaluate_after=False)
    runs.train("lebm", out=tmp_path / "a", seed=1, **common)  # other initial weights
    stale = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    runs.train("abp", out=tmp_path / "b", seed=0, **common)
    first = torch.load(tmp_path / "a" / "weights.pt", weights_only=True)
    second = torch.load(tmp_path / "b" / "weights.pt", weights_only=True)
    fresh = runs._build(runs._backend("pyro"), {"backend": "pyro", "image_shape": [28, 28, 1], "latent_dim": 3,
                                                "method": "abp", "ngf": 2, "seed": 0})
    # the second run starts from its own seed-0 generator; one Adam step moves each weight by at most ~lr
    for key, value in fresh.generator.state_dict().items():
        assert torch.allclose(second[f"generator.{key}"], value, atol=1e-3)
    assert any(not torch.equal(first[k], second[k]) for k in second if k != "__manifest__")
    assert stale  # the first run did leave parameters in the store
