"""Every docstring example runs, each module imported once under its installed name (``tilted_priors...``).

The modules are found from the files and pyproject.toml's package-dir mapping (inference/ installs as
``tilted_priors.inference``, models/ as ``tilted_priors.models``), without importing anything at collection, so that
an environment with one backend can select the modules it has (``-k diagnostics``)."""
import doctest
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_modules() -> list[str]:
    """Each module's installed name, from the package-dir mapping of pyproject.toml."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    names = []
    for package in setuptools["packages"]:
        mapped = max((p for p in setuptools["package-dir"] if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / setuptools["package-dir"][mapped] / Path(*package[len(mapped):].split(".")[1:])
        names += [package if path.stem == "__init__" else f"{package}.{path.stem}" for path in sorted(folder.glob("*.py"))
                  if path.stem != "__main__"]
    return names


MODULES = installed_modules()


def test_every_package_folder_is_installed():
    """A folder with an ``__init__.py`` that pyproject.toml does not list would be left out of the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for folder in ("tilted_priors", "inference", "models"):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            name = ".".join(("tilted_priors",) + parts if folder != "tilted_priors" else parts)
            assert name in listed, f"{init.parent} is a package but pyproject.toml's packages do not list {name}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
