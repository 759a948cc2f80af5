"""The mass matrix of the Langevin MCMC kernels, shared by both backends (plain Python): the ``dense_mass`` forms,
the blocks they make over a model's latent sites, and the shapes a given ``inverse_mass_matrix`` must have."""
from __future__ import annotations

__all__ = ["MassBlock", "check_dense_mass", "mass_matrix_blocks", "check_mass_matrix_shapes"]

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
