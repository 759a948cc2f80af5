"""One import root, and each backend without the other: what a user who installs one extra gets."""
import importlib.util
import subprocess
import sys
import textwrap

import pytest

from tilted_priors._extras import require


@pytest.mark.parametrize("name", ["inference", "models"])
def test_only_tilted_priors_is_importable(name):
    """The folders inference/ and models/ install as tilted_priors.inference / tilted_priors.models only."""
    assert importlib.util.find_spec(name) is None
    assert importlib.util.find_spec(f"tilted_priors.{name}") is not None


def _run_without(blocked: list[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the packages ``blocked`` cannot be imported."""
    prelude = f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"  # None: as if not installed
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


NUMPYRO_SIDE = """
    import jax.numpy as jnp
    import tilted_priors.numpyro, tilted_priors.inference.numpyro, tilted_priors.inference.diagnostics
    import tilted_priors.inference.numpyro.handlers, tilted_priors.inference.numpyro.kernels
    assert not [m for m, v in sys.modules.items() if v and m.split(".")[0] in ("torch", "pyro")], "torch or Pyro was imported"
"""
PYRO_SIDE = """
    import torch
    import tilted_priors.pyro, tilted_priors.inference.pyro, tilted_priors.inference.diagnostics
    import tilted_priors.inference.pyro.handlers, tilted_priors.inference.pyro.kernels
    assert not [m for m, v in sys.modules.items() if v and m.split(".")[0] in ("jax", "numpyro", "flax", "optax")], "JAX was imported"
"""


@pytest.mark.parametrize("blocked, code", [(["torch", "pyro"], NUMPYRO_SIDE), (["jax", "numpyro"], PYRO_SIDE)],
                         ids=["numpyro-without-torch", "pyro-without-jax"])
def test_one_backend_imports_without_the_other(blocked, code):
    result = _run_without(blocked, code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("blocked, module, extra", [
    (["torch"], "tilted_priors.pyro", "pyro"),
    (["pyro"], "tilted_priors.inference.pyro", "pyro"),
    (["jax"], "tilted_priors.numpyro", "numpyro"),
    (["optax"], "tilted_priors.inference.numpyro", "numpyro"),
    (["mlxtend"], "tilted_priors.models", "models"),
])
def test_a_missing_extra_is_named(blocked, module, extra):
    result = _run_without(blocked, f"import {module}")
    assert result.returncode != 0
    assert f'pip install "tilted-priors[{extra}]"' in result.stderr.splitlines()[-1], result.stderr


def test_require_rejects_an_unknown_extra():
    with pytest.raises(ValueError, match="unknown extra 'tf'"):
        require("tf", "x")


def test_dependencies_are_ranges_that_the_constraints_satisfy():
    """Users get ranges (no ``==``); CI installs exact versions inside them, so the lower bounds are tested."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins: dict[str, list[Version]] = {}
    for line in (root / ".ci" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            pins.setdefault(requirement.name.lower(), []).append(Version(str(requirement.specifier).lstrip("=")))
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    for requirement in requirements:
        if requirement.name == "tilted-priors":
            continue
        assert "==" not in str(requirement.specifier), f"{requirement} is a pin: give a range"
        assert requirement.name.lower() in pins, f"{requirement.name} has no exact version in .ci/constraints.txt"
        for version in pins[requirement.name.lower()]:
            assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes CI's {version}"
