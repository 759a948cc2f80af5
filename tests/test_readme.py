"""The README's examples run as written, one per backend, and train: the loss falls and the prior draws are finite
(also run in fresh one-backend environments by ``make check-install``)."""
import numpy as np
import pytest

from readme import readme_examples

EXAMPLES = readme_examples()


def test_readme_has_one_example_per_backend():
    assert set(EXAMPLES) == {"pyro", "numpyro", "tilt-numpyro"}


def test_readme_tilt_example_runs(capsys):
    namespace: dict = {}
    exec(compile(EXAMPLES["tilt-numpyro"], "README.md:tilt-numpyro", "exec"), namespace)
    w = np.asarray(namespace["w"])
    assert w.shape == (500, 3) and np.isfinite(w).all()
    assert abs(w[:, 0].mean() - 1.0) < 0.2 and abs(w[:, 1].mean() + 1.0) < 0.2
    assert "posterior means" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["pyro", "numpyro"])
def test_readme_example_runs(name, fresh_pyro, capsys):
    namespace: dict = {}
    exec(compile(EXAMPLES[name], f"README.md:{name}", "exec"), namespace)
    losses = np.asarray(namespace["losses"] if name == "pyro" else namespace["result"].losses)
    z = np.asarray(namespace["z"])
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], "the example's training did not learn"
    assert z.shape == (1000, 2) and np.isfinite(z).all()
    assert "prior draws" in capsys.readouterr().out
