"""Run folders refuse what does not match: weights files checked against the model and config.json, config.json
validated, a resume that would change the run refused before anything in the folder changes."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from tilted_priors.inference.checkpoints import CheckpointError
from tilted_priors.models import runs

BACKENDS = ["pyro", "numpyro"]
CONFIG = {"method": "lebm", "backend": "numpyro", "data": "mnist", "image_shape": [28, 28, 1], "latent_dim": 3,
          "ngf": 2, "seed": 0, "batch_size": 9, "epochs": None, "num_steps": 2, "lr_energy": 1e-4,
          "lr_generator": 1e-3, "posterior_steps": 20, "posterior_step_size": 0.1}


def _side(backend):
    return (importlib.import_module(f"tilted_priors.models.{backend}.lebm"),
            importlib.import_module(f"tilted_priors.models.{backend}.evaluate"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_that_do_not_fit_the_model_are_refused(tmp_path, backend):
    lebm, evaluate = _side(backend)
    path = tmp_path / ("weights.pt" if backend == "pyro" else "weights.npz")
    evaluate.save_params(lebm.build((28, 28, 1), 3, ngf=2), path, config={"ngf": 2, "latent_dim": 3})
    with pytest.raises(CheckpointError, match="does not fit the model: .*has shape"):
        evaluate.load_params(lebm.build((28, 28, 1), 3, ngf=4), path)
    with pytest.raises(CheckpointError, match="ngf=2 \\(config.json: 4\\)"):
        evaluate.load_params(lebm.build((28, 28, 1), 3, ngf=2), path, config={"ngf": 4, "latent_dim": 3})
    with pytest.raises(CheckpointError, match="lacks 'energy"):  # the run's energy is not in a Gaussian prior's file
        gaussian = tmp_path / f"gaussian{path.suffix}"
        evaluate.save_params(lebm.build((28, 28, 1), 3, ngf=2, prior="gaussian"), gaussian)
        evaluate.load_params(lebm.build((28, 28, 1), 3, ngf=2), gaussian)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["empty", "truncated", "other backend"])
def test_damaged_weights_files_are_refused_in_the_users_words(tmp_path, backend, damage):
    lebm, evaluate = _side(backend)
    path = tmp_path / ("weights.pt" if backend == "pyro" else "weights.npz")
    lvm = lebm.build((28, 28, 1), 3, ngf=2)
    if damage == "other backend":
        other = "numpyro" if backend == "pyro" else "pyro"
        _side(other)[1].save_params(_side(other)[0].build((28, 28, 1), 3, ngf=2), path)
    else:
        evaluate.save_params(lvm, path)
        raw = path.read_bytes()
        path.write_bytes(b"" if damage == "empty" else raw[: len(raw) // 2])
    with pytest.raises(CheckpointError) as info:
        evaluate.load_params(lvm, path)
    message = str(info.value)
    assert message.startswith(str(path)) and "train" in message
    assert "weights_only" not in message and "allow_pickle" not in message


def _run_folder(tmp_path, **changes) -> tuple:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    return out, (out / "config.json").read_bytes()


@pytest.mark.parametrize("given, match", [
    ({"seed": 1}, "seed=1 \\(the run has 0\\)"),
    ({"ngf": 4}, "ngf=4 \\(the run has 2\\)"),
    ({"backend": "pyro"}, "backend='pyro' \\(the run has 'numpyro'\\)"),
])
def test_resume_that_would_change_the_run_is_refused_before_the_folder_changes(tmp_path, given, match):
    out, before = _run_folder(tmp_path)
    with pytest.raises(ValueError, match=match):
        runs.train("lebm", out=out, num_steps=3, resume=True, progress=False, evaluate_after=False, **given)
    assert (out / "config.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({k: v for k, v in CONFIG.items() if k != "latent_dim"}), "lacks the setting\\(s\\) 'latent_dim'"),
    (json.dumps({**CONFIG, "image_shape": [28, 28]}), "'image_shape' is \\[28, 28\\]"),
    (json.dumps([1, 2]), "holds a list"),
])
def test_hand_edited_config_is_refused_with_the_field(tmp_path, text, match):
    out, _ = _run_folder(tmp_path)
    (out / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        runs.load(out)


def test_a_run_without_weights_says_how_to_finish_it(tmp_path):
    out, _ = _run_folder(tmp_path)
    with pytest.raises(CheckpointError, match="weights file is missing.*--resume"):
        runs.load(out)
