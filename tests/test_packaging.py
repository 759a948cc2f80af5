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
