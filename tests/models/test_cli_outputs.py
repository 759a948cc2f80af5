"""What the command line shows and leaves behind, on a tiny data set: a summary at the end of each command (the
key numbers, the files written and where), per-image values only with ``--verbose``, outputs in their own
folders (no other run's files change), consistent file permissions, and a default in every option's help."""
from __future__ import annotations

import argparse
import json
import os
import stat

import numpy as np
import pytest

from tilted_priors.models import runs
from tilted_priors.models.cli import build_parser, main

EVAL = ["--test-images", "3", "--recon-images", "3", "--importance-samples", "4", "--log-z-chains", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Pyro LEBM run (2 updates on 30 random 28 x 28 images), evaluated at small settings."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "tiny.npz"
    np.savez(data, x=(np.random.default_rng(0).uniform(size=(30, 28, 28)) * 255).astype(np.uint8))
    run = root / "run"
    assert main(["train", "lebm", "--backend", "pyro", "--data", str(data), "--out", str(run), "--steps", "2",
                 "--batch-size", "9", "--ngf", "2", "--latent-dim", "3", "--quiet", *EVAL]) == 0
    return run


def snapshot(folder) -> dict:
    """Every file under ``folder``: size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def summary(capsys, command: str) -> list[str]:
    out = capsys.readouterr().out.strip().splitlines()
    assert out and all(line.startswith(f"{command}: ") for line in out), out
    return out


def test_train_summarises_what_it_found_and_wrote(tmp_path, capsys):
    data = tmp_path / "tiny.npz"
    np.savez(data, x=(np.random.default_rng(1).uniform(size=(30, 28, 28)) * 255).astype(np.uint8))
    run = tmp_path / "run"
    assert main(["train", "lebm", "--backend", "pyro", "--data", str(data), "--out", str(run), "--steps", "2",
                 "--batch-size", "9", "--ngf", "2", "--latent-dim", "3", "--quiet", *EVAL]) == 0
    lines = summary(capsys, "train")
    assert lines[0].startswith("train: trained lebm (pyro) for 2 updates")
    assert "test log-likelihood" in lines[1] and "over 3 test images" in lines[1] and "MSE" in lines[1]
    assert lines[-1].startswith("train: wrote") and str(run.resolve()) in lines[-1]
    for name in ("config.json", "metrics.json", "weights.pt", "samples.png", "reconstructions.png"):
        assert name in lines[-1] and (run / name).is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["description"]["settings"] == {"eval_size": 3, "ll_size": 3, "num_samples": 1000,
                                                  "importance_samples": 4, "log_z_chains": 8}
    assert "[-1, 1]" in metrics["description"]["metrics"]["mse"]
    assert "4 samples per image" in metrics["description"]["metrics"]["test_log_likelihood"]
    ll = metrics["test_log_likelihood"]
    assert ll["min"] <= ll["q05"] <= ll["median"] <= ll["q95"] <= ll["max"] and ll["n"] == 3


def test_evaluate_writes_its_own_folder_and_leaves_the_run_unchanged(trained, capsys):
    before = snapshot(trained)
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--quiet", "--test-images", "2", "--recon-images", "2",
                 "--importance-samples", "3", "--log-z-chains", "6"]) == 0
    lines = summary(capsys, "evaluate")
    out = runs.evaluation_folder(trained, eval_size=2, ll_size=2, importance_samples=3, log_z_chains=6)
    assert out.parent.parent == trained and str(out.resolve()) in lines[-1]
    assert "over 2 test images" in lines[0] and "per_datum" not in "\n".join(lines)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "samples.png", "reconstructions.png"}
    after = snapshot(trained)
    assert {k: v for k, v in after.items() if not k.startswith("evaluations")} == before
    assert json.loads((out / "metrics.json").read_text())["test_log_likelihood"]["n"] == 2


def test_verbose_prints_every_number(trained, tmp_path, capsys):
    assert main(["evaluate", str(trained), "--quiet", "--verbose", "--out", str(tmp_path / "ev"), *EVAL]) == 0
    out = capsys.readouterr().out
    assert '"test_log_likelihood_per_datum"' in out and out.rstrip().splitlines()[-1].startswith("evaluate: wrote")


def test_sample_and_prior_demo_summaries(trained, tmp_path, capsys):
    before = snapshot(trained)
    assert main(["sample", str(trained), "--n", "4", "--out", str(tmp_path / "s.png"), "--quiet"]) == 0
    lines = summary(capsys, "sample")
    assert lines[0] == f"sample: drew 4 images from the prior of {trained}" and "s.png" in lines[-1]
    assert snapshot(trained) == before
    assert main(["prior-demo", "--out", str(tmp_path / "pd"), "--num", "200", "--quiet"]) == 0
    lines = summary(capsys, "prior-demo")
    assert "log Z by AIS" in lines[0] and "(exact 0)" in lines[0]
    assert {p.name for p in (tmp_path / "pd").iterdir()} == {"prior_samples.png", "prior_summary.json"}


def test_diagnose_writes_next_to_the_run(trained, capsys):
    before = snapshot(trained)
    capsys.readouterr()
    assert main(["diagnose", str(trained), "--quiet", "--starts", "8", "--chains-per-start", "2", "--long-steps",
                 "30", "--images", "1", "--short-chains", "8", "--chains", "2", "--warmup", "20", "--samples", "20",
                 "--max-tree-depth", "3", "--coupling-steps", "0"]) == 0
    lines = summary(capsys, "diagnose")
    out = trained.parent / (trained.name + "-diagnostics")
    assert (out / "diagnostics.md").is_file() and str(out.resolve()) in lines[-1]
    assert snapshot(trained) == before


def test_written_files_get_the_usual_permissions(trained):
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in trained.iterdir() if p.is_file()}
    assert {"config.json", "metrics.json", "samples.png"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_reconstructions_sit_under_their_images_for_any_count(tmp_path):
    import matplotlib.pyplot as plt

    x = np.full((5, 4, 4, 1), -1.0, np.float32)  # black images
    grid = plt.imread(runs.save_pairs(x, x, tmp_path / "pairs.png"))
    assert grid.shape[:2] == (2 * 6, 5 * 6)  # one row of 5 images, the row of their reconstructions under it
    grid = plt.imread(runs.save_pairs(np.concatenate([x, x]), np.concatenate([x, x]), tmp_path / "ten.png"))
    assert grid.shape[:2] == (4 * 6, 8 * 6)  # 8 + 2 images: two pairs of rows, the short one padded with white
    assert grid[3 * 6 + 1:3 * 6 + 5, 2 * 6 + 1:2 * 6 + 5].min() == 1.0  # padding: white, not a stray image


def test_every_option_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"train", "sample", "evaluate", "diagnose", "demo", "prior-demo"}
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            text = action.help or ""
            assert "default" in text or "required" in text, f"{name} {action.option_strings}: {text!r}"


@pytest.mark.slow  # an epoch of MNIST-5k and an evaluation
def test_demo_summarises_what_it_found_and_wrote(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    lines = summary(capsys, "demo")
    assert lines[0].startswith("demo: trained lebm (numpyro) for 40 updates")
    assert "Fréchet distance" in lines[1] and "over 100 test images" in lines[1]
    assert {"config.json", "metrics.json", "weights.npz", "samples.png", "reconstructions.png"} <= {
        p.name for p in out.iterdir()}


def test_a_new_run_gets_the_generator_width_of_its_image_size(tmp_path, capsys):
    data = tmp_path / "rgb.npy"
    np.save(data, (np.random.default_rng(2).uniform(size=(12, 32, 32, 3)) * 255).astype(np.uint8))
    run = tmp_path / "rgb"
    assert main(["train", "abp", "--backend", "pyro", "--data", str(data), "--out", str(run), "--steps", "1",
                 "--batch-size", "4", "--latent-dim", "3", "--quiet", "--no-eval"]) == 0
    assert json.loads((run / "config.json").read_text())["ngf"] == 64  # the paper's width for 32 x 32 images
    assert "not evaluated" in capsys.readouterr().out
