"""Optional dependencies: each backend comes with an extra, and a missing one is named in the error.

``pip install "tilted-priors[pyro]"`` installs torch and Pyro, ``[numpyro]`` JAX, NumPyro, Flax and optax,
``[models]`` what the ready models, data sets and the command line need (both backends, mlxtend, scikit-learn).
"""
from __future__ import annotations

import importlib.util

__all__ = ["require"]

#: The import names each extra provides, with the distribution names that install them.
EXTRAS: dict[str, dict[str, str]] = {
    "pyro": {"torch": "torch", "pyro": "pyro-ppl"},
    "numpyro": {"jax": "jax", "numpyro": "numpyro", "flax": "flax", "optax": "optax"},
    "models": {"mlxtend": "mlxtend", "sklearn": "scikit-learn"},
}


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
