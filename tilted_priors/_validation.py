"""Argument checks shared by both backends (plain Python, no array library)."""
from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["check_positive_int", "check_nonnegative_int", "check_step_size", "check_probability",
           "check_energy_shape"]


def check_positive_int(name: str, value) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_step_size(value, name: str = "step_size") -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is finite and positive."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_probability(value, name: str) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` unless it is a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0:  # nan fails the comparison
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_energy_shape(what: str, in_shape: tuple, out_shape: tuple) -> None:
    """Raise ``ValueError`` unless a function of ``(..., d)`` returned shape ``(...)``."""
    if tuple(out_shape) != tuple(in_shape[:-1]):
        hint = " (squeeze its last dimension)" if tuple(out_shape) == tuple(in_shape[:-1]) + (1,) else ""
        raise ValueError(f"{what} must map shape (..., d) to (...): input {tuple(in_shape)} gave output "
                         f"{tuple(out_shape)}{hint}")
