"""``python -m tilted_priors diagnose`` end to end on a tiny trained run, both backends."""
import json

import numpy as np
import pytest

from tilted_priors.models.cli import main
from tilted_priors.models.diagnose import diagnose

TINY = ["--starts", "6", "--chains-per-start", "2", "--long-steps", "40", "--images", "2", "--short-chains", "8",
        "--chains", "2", "--warmup", "20", "--samples", "20", "--max-tree-depth", "4"]
#: The same settings for calling ``diagnose`` itself.
TINY_KW = {"num_starts": 6, "chains_per_start": 2, "long_steps": 40, "num_images": 2, "short_chains": 8,
           "num_chains": 2, "num_warmup": 20, "num_samples": 20, "max_tree_depth": 4}


def _train_tiny_lebm(folder, backend: str = "pyro"):
    """A tiny LEBM run (two steps on random images) in ``folder / "run"``."""
    rng = np.random.default_rng(0)
    data = folder / "tiny.npz"
    np.savez(data, x=(rng.uniform(size=(30, 28, 28)) * 255).astype(np.uint8))
    run = folder / "run"
    assert main(["train", "lebm", "--backend", backend, "--data", str(data), "--out", str(run), "--steps", "2",
                 "--batch-size", "9", "--ngf", "2", "--latent-dim", "3", "--quiet", "--no-eval"]) == 0
    return run


def _snapshot(folder) -> dict:
    """Every file under ``folder``: its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder) -> list[str]:
    """The temporary folders of a report left in ``folder``."""
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """A tiny Pyro LEBM run, its files before, and ``diagnose`` of it with the default report folder."""
    folder = tmp_path_factory.mktemp("diagnosed")
    run = _train_tiny_lebm(folder)
    before = _snapshot(run)
    return run, before, diagnose(run, progress=False, **TINY_KW)


@pytest.mark.parametrize("backend", ["pyro", pytest.param("numpyro", marks=pytest.mark.slow)])  # NumPyro: compiles NUTS
def test_diagnose_writes_the_report(tmp_path, backend):
    run = _train_tiny_lebm(tmp_path, backend)
    assert main(["diagnose", str(run)] + TINY) == 0
    report = tmp_path / "run-diagnostics"  # next to the run folder, not inside it
    md = (report / "diagnostics.md").read_text()
    assert "## Prior: short run vs long run" in md and "## Posterior" in md
    result = json.loads((report / "diagnostics.json").read_text())
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
        assert (report / f"{name}.png").stat().st_size > 1000
        assert f"({name}.png)" in md
    assert not (run / "diagnostics.md").exists() and not _leftovers(tmp_path)
    assert result["summary"]["files"] == sorted(p.name for p in report.iterdir())


def test_default_report_folder_is_next_to_the_run_and_leaves_the_run_alone(diagnosed):
    run, before, result = diagnosed
    assert _snapshot(run) == before  # the same names, sizes and modification times
    report = run.parent / "run-diagnostics"
    assert result["summary"]["out"] == str(report)
    assert sorted(p.name for p in report.iterdir()) == result["summary"]["files"]
    assert {"diagnostics.md", "diagnostics.json", "prior_energy.png", "posterior_1_nuts_trace.png"} <= set(
        result["summary"]["files"])
    assert not _leftovers(run.parent)
    assert json.loads((report / "diagnostics.json").read_text())["summary"] == result["summary"]


def test_the_report_explains_its_numbers_and_summarises_them(diagnosed):
    run, _, result = diagnosed
    md = (run.parent / "run-diagnostics" / "diagnostics.md").read_text()
    assert md.count("**How to read this table.**") == 2  # after the prior's table and after the posterior's
    assert "R-hat short has a floor above 1 even when the short run's final states have exactly the right law" in md
    baseline = result["prior"]["nested_rhat_baseline"]
    assert baseline == pytest.approx(np.sqrt(1.5)) and f"sqrt(1 + 1/M) = {baseline:.3f}" in md
    for column in ("max mean diff / NUTS sd", "median sd / NUTS sd", "KSD p", "p vs NUTS", "max R-hat",
                   "min ESS bulk", "Coupling bound"):
        assert f"**{column}**" in md
    summary = result["summary"]
    assert set(summary) == {"out", "files", "prior", "posterior"}
    json.dumps(summary, allow_nan=False)  # plain JSON: floats, ints, strings, None
    assert all((run.parent / "run-diagnostics" / name).is_file() for name in summary["files"])
    assert summary["prior"] == {"differs": result["prior"]["differs"],
                                "energy_distance_p": result["prior"]["energy_distance"]["p_value"],
                                "coupling_steps_tv_0.1": result["prior"]["coupling_bound"]["steps_for_tv_0.1"]}
    assert set(summary["posterior"]) == {"short-run guide", "MALA", "NUTS"}
    for method, numbers in summary["posterior"].items():
        rows = [r for r in result["posterior"] if r["method"] == method]
        assert numbers == {"max_mean_diff_in_nuts_sd": max(r["max mean diff / NUTS sd"] for r in rows),
                           "min_ksd_p": min(r["KSD p"] for r in rows)}


def test_a_failed_diagnose_leaves_nothing_behind(diagnosed, tmp_path, monkeypatch, capsys):
    from tilted_priors.models.pyro import diagnose as backend

    def fail(*args, **kwargs):
        raise RuntimeError("NUTS blew up")

    monkeypatch.setattr(backend, "posterior_draws", fail)  # after the prior's figures are written
    run, before, _ = diagnosed
    settings = {**TINY_KW, "coupling_steps": 0}
    out = tmp_path / "new" / "report"
    with pytest.raises(RuntimeError, match="NUTS blew up"):
        diagnose(run, out=out, progress=True, **settings)
    assert "prior: short vs long run" in capsys.readouterr().err  # the progress bar's stages
    assert list(tmp_path.iterdir()) == []  # neither the report's folder nor the parent it made

    out = tmp_path / "old"
    out.mkdir()
    (out / "diagnostics.md").write_text("an earlier report")
    (out / "notes.txt").write_text("mine")
    kept = _snapshot(out)
    with pytest.raises(RuntimeError, match="NUTS blew up"):
        diagnose(run, out=out, progress=False, **settings)
    assert capsys.readouterr().err == ""  # no progress bar
    assert _snapshot(out) == kept and (out / "diagnostics.md").read_text() == "an earlier report"
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and _snapshot(run) == before


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
    result = json.loads((tmp_path / "report" / "diagnostics.json").read_text())
    assert "prior" not in result and result["summary"]["prior"] is None
    assert not (tmp_path / "abp-diagnostics").exists()


def test_diagnose_needs_a_run_directory(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2  # one line for the user, no traceback
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path.parent / (tmp_path.name + "-diagnostics")).exists()
