"""Optional dependencies: each backend comes with an extra, and a missing one is named in the error.

``pip install "tilted-priors[pyro]"`` installs torch and Pyro, ``[numpyro]`` JAX, NumPyro, Flax and optax,
``[models]`` what the ready models, data sets and the command line need (both backends, mlxtend, scikit-learn).
"""
from __future__ import annotations

import importlib
import importlib.util

__all__ = ["require", "import_dependency"]

#: The import names each extra provides, with the distribution names that install them.
EXTRAS: dict[str, dict[str, str]] = {
    "pyro": {"torch": "torch", "pyro": "pyro-ppl"},
    "numpyro": {"jax": "jax", "numpyro": "numpyro", "flax": "flax", "optax": "optax"},
    "models": {"mlxtend": "mlxtend", "sklearn": "scikit-learn"},
}

#: The import names of the core dependencies (``pip install tilted-priors`` installs them), with their
#: distribution names.
CORE: dict[str, str] = {"numpy": "numpy", "scipy": "scipy", "matplotlib": "matplotlib", "tqdm": "tqdm",
                        "arviz": "arviz"}


def _install_hint(module: str) -> str:
    """The command that installs the package providing the import name ``module``."""
    for extra, modules in EXTRAS.items():
        if module in modules:
            return f'pip install "tilted-priors[{extra}]" (or pip install {modules[module]})'
    dist = CORE.get(module, module)
    return f"pip install {dist} (a dependency of tilted-priors: reinstalling it, pip install tilted-priors, also does)"


def import_dependency(module: str, what: str):
    """Import ``module`` (e.g. ``"arviz"``, ``"matplotlib.pyplot"``) for ``what``, or raise an ``ImportError``
    naming the package that is missing and the command that installs it.

    When ``module`` is installed but one of *its* imports is missing (ArviZ without matplotlib), the missing
    package is named, not ``module``.

    Parameters
    ----------
    module : str
        The module to import.
    what : str
        What needs it, named in the message (e.g. ``"tilted_priors.inference.diagnostics.plots"``).

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        Naming the missing package and the command that installs it.

    Examples
    --------
    >>> import_dependency("numpy", "tilted_priors.inference.diagnostics").__name__
    'numpy'
    >>> import_dependency("not_a_module_xyz", "tilted_priors.inference.diagnostics")
    Traceback (most recent call last):
    ...
    ImportError: tilted_priors.inference.diagnostics uses not_a_module_xyz, which is not installed: ...
    """
    try:
        importlib.import_module(module.split(".")[0])  # the package first: its submodules may be loaded already
        return importlib.import_module(module)
    except ImportError as err:
        missing = (getattr(err, "name", None) or module).split(".")[0]
        wanted = module.split(".")[0]
        if missing == wanted:
            message = f"{what} uses {wanted}, which is not installed: {_install_hint(wanted)}"
        else:
            message = (f"{what} uses {wanted}, which cannot be imported because {missing} is not installed: "
                       f"{_install_hint(missing)}")
        raise ImportError(message, name=missing) from err


def require(extra: str, what: str) -> None:
    """Raise an ImportError naming the extra to install when any package of ``extra`` is missing.

    Parameters
    ----------
    extra : {"pyro", "numpyro", "models"}
        The extra whose packages ``what`` needs.
    what : str
        The module that needs them, named in the message (e.g. ``"tilted_priors.pyro"``).

    Raises
    ------
    ImportError
        Naming the missing packages and the command that installs them.

    Examples
    --------
    >>> require("models", "tilted_priors.models")  # installed here: nothing happens
    >>> require("tensorflow", "x")
    Traceback (most recent call last):
    ...
    ValueError: unknown extra 'tensorflow'; the extras are pyro, numpyro, models
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    missing = [dist for module, dist in EXTRAS[extra].items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}, which the {extra!r} extra installs: "
                          f"pip install \"tilted-priors[{extra}]\"")
