"""``python -m tilted_priors diagnose`` end to end on a tiny trained run, both backends."""
import json

import numpy as np
import pytest

from tilted_priors.models.cli import main

TINY = ["--starts", "6", "--chains-per-start", "2", "--long-steps", "40", "--images", "2", "--short-chains", "8",
        "--chains", "2", "--warmup", "20", "--samples", "20", "--max-tree-depth", "4"]


@pytest.mark.parametrize("backend", ["pyro", pytest.param("numpyro", marks=pytest.mark.slow)])  # NumPyro: compiles NUTS
def test_diagnose_writes_the_report(tmp_path, backend):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=(rng.uniform(size=(30, 28, 28)) * 255).astype(np.uint8))
    run = tmp_path / "run"
    assert main(["train", "lebm", "--backend", backend, "--data", str(data), "--out", str(run), "--steps", "2",
                 "--batch-size", "9", "--ngf", "2", "--latent-dim", "3", "--quiet", "--no-eval"]) == 0
    assert main(["diagnose", str(run)] + TINY) == 0
    md = (run / "diagnostics.md").read_text()
    assert "## Prior: short run vs long run" in md and "## Posterior" in md
    result = json.loads((run / "diagnostics.json").read_text())
    assert [r["quantity"] for r in result["prior"]["table"]] == ["latent 0", "latent 1", "latent 2", "energy"]
    ksd = result["prior"]["kernel_stein_discrepancy"]
    assert ksd["short"]["ksd"] >= 0 and 0 <= ksd["long"]["p_value"] <= 1 and "Kernel Stein discrepancy" in md
    coupling = result["prior"]["coupling_bound"]
    assert coupling["lag"] == 60 and coupling["max_steps"] == 600 and coupling["num_pairs"] == 6
    assert coupling["num_unmet"] == 0 and 0 <= coupling["tv_bound"]["60"] <= 1 and "Coupling bound" in md
    methods = [(r["image"], r["method"]) for r in result["posterior"]]
    assert methods == [(i, m) for i in range(2) for m in ("short-run guide", "MALA", "NUTS")]
    for r in result["posterior"]:
        assert np.isfinite(r["max mean diff / NUTS sd"]) and r["KSD"] >= 0 and 0 <= r["KSD p"] <= 1
        assert (r["method"] == "NUTS") == ("p vs NUTS" not in r)
    for name in ("prior_energy", "prior_marginals", "prior_rank", "prior_trace", "prior_ksd", "prior_coupling",
                 "posterior_0_marginals",
                 "posterior_1_nuts_trace"):
        assert (run / f"{name}.png").stat().st_size > 1000
        assert f"({name}.png)" in md


def test_diagnose_of_a_normal_prior_run_skips_the_prior(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=(rng.uniform(size=(20, 28, 28)) * 255).astype(np.uint8))
    run = tmp_path / "abp"
    assert main(["train", "abp", "--backend", "pyro", "--data", str(data), "--out", str(run), "--steps", "1",
                 "--batch-size", "9", "--ngf", "2", "--latent-dim", "2", "--quiet", "--no-eval"]) == 0
    assert main(["diagnose", str(run), "--out", str(tmp_path / "report")] + TINY) == 0
    md = (tmp_path / "report" / "diagnostics.md").read_text()
    assert "standard Normal" in md and not (tmp_path / "report" / "prior_energy.png").exists()
    assert "prior" not in json.loads((tmp_path / "report" / "diagnostics.json").read_text())


def test_diagnose_needs_a_run_directory(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2  # one line for the user, no traceback
    assert "no config.json" in capsys.readouterr().err
