"""Argument checks shared by both backends (plain Python, no array library)."""
from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["check_positive_int", "check_nonnegative_int", "check_step_size", "check_probability",
           "check_energy_shape", "context_batch_shape", "check_snl_b",
           "check_dense_mass", "mass_matrix_blocks", "check_mass_matrix_shapes"]


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


def context_batch_shape(batch_shape: tuple, context_shape: tuple, what: str = "the base") -> tuple:
    """The batch shape of a conditional tilted distribution: ``batch_shape`` broadcast with ``context_shape[:-1]``.

    ``what`` names the other shape in the error (``"the base"``, ``"z"``); raises ``ValueError`` when the two do
    not broadcast (NumPy's rules, right-aligned).

    Examples
    --------
    >>> context_batch_shape((), (8, 3)), context_batch_shape((5, 1), (8, 3))
    ((8,), (5, 8))
    """
    rows = tuple(context_shape[:-1])
    batch_shape = tuple(batch_shape)
    n = max(len(rows), len(batch_shape))
    a, b = (1,) * (n - len(rows)) + rows, (1,) * (n - len(batch_shape)) + batch_shape
    out = []
    for i, j in zip(a, b):
        if i != j and 1 not in (i, j):
            raise ValueError(f"context of shape {tuple(context_shape)} has rows {rows}, which do not broadcast with "
                             f"the batch shape {batch_shape} of {what}: give context the shape batch_shape + (c,) "
                             "(one row of c covariates per batch element), or a shape that broadcasts with it")
        out.append(j if i == 1 else i)
    return tuple(out)


def check_snl_b(b):
    """Return ``b`` if it is a valid ``b=`` of ``SelfNormalized`` (``None``, ``"per_row"`` or a callable), else raise.

    Examples
    --------
    >>> check_snl_b("per_row")
    'per_row'
    """
    if b is None or (b == "per_row" if isinstance(b, str) else callable(b)):
        return b
    kind = ValueError if isinstance(b, str) else TypeError
    raise kind(f"b must be None (one learned scalar b), 'per_row' (a learned b per batch element) or a callable "
               f"b(context) -> batch-shaped values (an amortised b, e.g. a small network); got {b!r}")


MassBlock = tuple[tuple[str, ...], bool, int]  # (site names, dense, number of unconstrained values)


def check_dense_mass(value) -> bool | list[tuple[str, ...]]:
    """Return ``dense_mass`` as a bool, or as a list of tuples of site names (each tuple one dense block).

    The backends' HMC forms: ``False`` (diagonal), ``True`` (one dense matrix), or the structured form
    ``[("a", "b"), ("c",)]``, the sites not listed sharing one diagonal block. Raises ``ValueError`` otherwise.

    Examples
    --------
    >>> check_dense_mass(True), check_dense_mass([("a", "b")])
    (True, [('a', 'b')])
    """
    if isinstance(value, bool):
        return value
    if (isinstance(value, (list, tuple)) and value and all(isinstance(b, tuple) and b and all(
            isinstance(n, str) for n in b) for b in value)):
        names = [n for b in value for n in b]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"dense_mass puts the sites {repeated} in more than one block: list each site once")
        return [tuple(b) for b in value]
    raise ValueError("dense_mass must be True (one dense mass matrix), False (diagonal) or a list of tuples of "
                     f"site names, each tuple a dense block (e.g. [('a', 'b')]), got {value!r}")


def mass_matrix_blocks(dense_mass: bool | list[tuple[str, ...]], sizes: dict[str, int]) -> list[MassBlock]:
    """The blocks of a mass matrix over the latent sites, as the backends' HMC makes them.

    ``sizes`` maps each site to its number of unconstrained values. ``True``/``False``: one block of all sites
    sorted by name, dense or diagonal; a list: its dense blocks in order, then one diagonal block of the sites not
    listed (sorted). Raises ``ValueError`` when ``dense_mass`` names a site the model does not have.

    Examples
    --------
    >>> mass_matrix_blocks([("b",)], {"b": 2, "a": 3})
    [(('b',), True, 2), (('a',), False, 3)]
    """
    if not sizes:
        return []
    if isinstance(dense_mass, bool):
        names = tuple(sorted(sizes))
        return [(names, dense_mass, sum(sizes[n] for n in names))]
    listed = {n for b in dense_mass for n in b}
    unknown = sorted(listed - set(sizes))
    if unknown:
        raise ValueError(f"dense_mass names the sites {unknown}, which are not latent sites of the model (its "
                         f"latent sites: {sorted(sizes)})")
    rest = tuple(sorted(n for n in sizes if n not in listed))
    blocks = [(b, True, sum(sizes[n] for n in b)) for b in dense_mass]
    return blocks + ([(rest, False, sum(sizes[n] for n in rest))] if rest else [])


def check_mass_matrix_shapes(shapes: tuple | dict, blocks: list[MassBlock]) -> None:
    """Raise ``ValueError`` unless an ``inverse_mass_matrix`` of ``shapes`` fits the mass matrix's ``blocks``.

    ``shapes`` is the shape of one array (for a single block) or ``{block's site names: shape}``. A block of
    ``k`` values takes shape ``(k,)`` (a diagonal) or, when dense, ``(k, k)``.

    Examples
    --------
    >>> check_mass_matrix_shapes((3, 3), [(("z",), False, 3)])
    Traceback (most recent call last):
    ...
    ValueError: inverse_mass_matrix for the sites ('z',) has shape (3, 3), expected (3,) ...
    """
    keys = [b for b, _, _ in blocks]
    if not isinstance(shapes, dict):
        if len(blocks) != 1:
            raise ValueError(f"inverse_mass_matrix is one array, but dense_mass makes {len(blocks)} blocks {keys}: "
                             "give a dict {block's site names: matrix} with these keys")
        shapes = {keys[0]: shapes}
    elif set(shapes) != set(keys):
        raise ValueError(f"inverse_mass_matrix has the blocks {list(shapes)}, but the mass matrix's blocks are "
                         f"{keys} (from dense_mass and the model's latent sites): give one matrix per block")
    for names, dense, k in blocks:
        shape = tuple(shapes[names])
        if shape == (k,) or dense and shape == (k, k):
            continue
        expected = f"({k},) or ({k}, {k})" if dense else f"({k},)"
        hint = (" (a dense matrix for a diagonal block: pass dense_mass=True, or list these sites in dense_mass, "
                "or give its diagonal)" if shape == (k, k) else "")
        raise ValueError(f"inverse_mass_matrix for the sites {names} has shape {shape}, expected {expected} ({k} "
                         f"unconstrained values: the sites' in the order named, each flattened){hint}")
