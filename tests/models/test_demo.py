"""The demo job runs end to end and its numbers agree with the known answer."""
import json

from tilted_priors.models.cli import main


def test_demo_writes_outputs_with_the_known_answer(tmp_path):
    assert main(["prior-demo", "--out", str(tmp_path), "--num", "400"]) == 0
    assert (tmp_path / "prior_samples.png").stat().st_size > 10_000
    s = json.loads((tmp_path / "prior_summary.json").read_text())
    assert abs(s["log_z_ais"] - s["log_z_exact"]) < 4 * s["log_z_ais_stderr"] + 0.02
    assert abs(s["mean_radius_long_run"] - s["mean_radius_exact"]) < 0.15
    assert s["modes_visited_long_run"] == 8
