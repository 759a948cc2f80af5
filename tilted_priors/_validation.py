"""Argument checks shared by both backends (plain Python, no array library)."""
from __future__ import annotations

import inspect
import math
import operator
from numbers import Integral, Real

__all__ = ["check_positive_int", "check_nonnegative_int", "check_step_size", "check_probability", "check_flag",
           "check_encoder_sites", "check_energy_shape", "context_batch_shape", "check_snl_b", "check_finite_number",
           "check_name", "check_site_names", "check_sample_shape", "check_protocol", "energy_signature_error",
           "check_proposal_shapes", "check_loc_scale_shapes", "energy_output_error", "dtype_mismatch_message",
           "describe"]


def describe(value) -> str:
    """A short description of ``value`` for an error message: its repr when short, else its type (and shape and
    dtype when it has them).

    Examples
    --------
    >>> describe(3), describe("abc"), describe([1.0] * 40)
    ('3', "'abc'", 'a list of 40 items')
    """
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None and not isinstance(value, (int, float, complex)):
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


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


def check_flag(value, name: str) -> bool:
    """Return ``value`` as a bool, or raise ``TypeError`` unless it is ``True`` or ``False`` (a NumPy bool and the
    integers 0 and 1 count): a string such as ``"False"`` would otherwise be taken as true.

    Examples
    --------
    >>> check_flag(0, "per_datum")
    False
    >>> check_flag("False", "per_datum")
    Traceback (most recent call last):
    ...
    TypeError: per_datum must be True or False, got 'False' (str)
    """
    if isinstance(value, bool) or (isinstance(value, Integral) and value in (0, 1)) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {describe(value)} ({type(value).__name__})")


def check_encoder_sites(covered, latent) -> None:
    """Raise ``ValueError`` unless an ``AmortizedGuide``'s encoder covers exactly the model's latent sites.

    ``covered``: the site names the encoder gave ``(loc, scale)`` for; ``latent``: the model's latent sample sites.

    Examples
    --------
    >>> check_encoder_sites(["z"], ["z", "w"])
    Traceback (most recent call last):
    ...
    ValueError: AmortizedGuide covers sites ['z'] but the model also has latent sites ['w']; give an encoder ...
    """
    covered, latent = list(covered), list(latent)
    unknown = [n for n in covered if n not in latent]
    if unknown:
        raise ValueError(f"AmortizedGuide covers sites {unknown}, not a latent sample site of the model: the "
                         f"model has no latent site of that name (its latent sites: {latent}; observed sites need "
                         "no guide)")
    uncovered = [n for n in latent if n not in covered]
    if uncovered:
        raise ValueError(f"AmortizedGuide covers sites {covered} but the model also has latent sites {uncovered}; "
                         f"give an encoder for them: latent sites {uncovered} are not covered, and SVI would draw "
                         "them from the prior with no log q (return a dict {site: (loc, scale)} for every latent "
                         "site)")


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


def check_finite_number(value, name: str) -> float:
    """Return ``value`` as a float, or raise unless it is a finite real number.

    ``TypeError`` for what is not a number (a string, ``None``, a list), ``ValueError`` for ``nan`` and ``inf``.
    A one-element array or tensor counts as a number.

    Examples
    --------
    >>> check_finite_number(1, "init")
    1.0
    >>> check_finite_number("0", "init")
    Traceback (most recent call last):
    ...
    TypeError: init must be a finite real number, got '0' (str)
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a finite real number, got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a finite real number, got {describe(value)} ({type(value).__name__})"
                        ) from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite real number, got {number!r}")
    return number


def check_name(value, name: str) -> str:
    """Return ``value`` unless it is not a non-empty string (``TypeError``): the name of a param or module.

    Examples
    --------
    >>> check_name("snl_b", "name")
    'snl_b'
    """
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string (the name of a param site), got {value!r}")
    return value


def check_site_names(value, name: str = "sites") -> tuple[str, ...] | None:
    """``value`` as a tuple of distinct site names (one name is taken as a tuple of one); ``None`` stays ``None``.

    Examples
    --------
    >>> check_site_names("z"), check_site_names(["z", "w"]), check_site_names(None)
    (('z',), ('z', 'w'), None)
    """
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(s, str) for s in names) or len(set(names)) != len(names):
        raise ValueError(f"{name} must be a site name or a non-empty sequence of distinct names, got {value!r}")
    return names


def check_sample_shape(value, name: str = "sample_shape") -> tuple:
    """``value`` as a tuple of non-negative ints: a shape such as ``(n,)`` or ``torch.Size([n, m])``.

    An int ``n`` is taken as ``(n,)`` (``dist.sample(100)``). Raises ``TypeError`` for what is not a shape (a float,
    a string, a shape holding a float) and ``ValueError`` for a negative size.

    Examples
    --------
    >>> check_sample_shape(3), check_sample_shape((2, 5)), check_sample_shape(())
    ((3,), (2, 5), ())
    >>> check_sample_shape((-1,))
    Traceback (most recent call last):
    ...
    ValueError: sample_shape must hold sizes >= 0, got (-1,): give the number of draws, e.g. (100,)
    """
    if isinstance(value, tuple) and all(type(n) is int for n in value):  # the usual case, torch.Size included
        sizes = tuple(value)
    else:
        if _as_size(value) is not None:
            value = (value,)
        elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{name} must be a tuple of ints such as (100,) or (10, 5) (or an int n for (n,)), "
                            f"got {describe(value)} ({type(value).__name__})")
        given = tuple(value)
        sizes = tuple(_as_size(n) for n in given)
        if None in sizes:
            raise TypeError(f"{name} must be a tuple of ints such as (100,) or (10, 5), got {given!r}: sizes are "
                            "whole numbers, e.g. (int(n),)")
    if any(n < 0 for n in sizes):
        raise ValueError(f"{name} must hold sizes >= 0, got {sizes!r}: give the number of draws, e.g. (100,)")
    return sizes


def _as_size(n) -> int | None:
    """``n`` as an int when it is an integer (a Python or NumPy int, a 0-d integer array), else ``None``."""
    if isinstance(n, bool):
        return None
    if isinstance(n, Integral):
        return int(n)
    if getattr(n, "shape", None) == () and "int" in str(getattr(n, "dtype", "")):
        try:
            return operator.index(n)
        except TypeError:
            return None
    return None


def check_protocol(value, name: str, method: str, example: str, *, optional: bool = False):
    """Return ``value`` if it is an object with a callable ``.method`` (a sampler's ``run``, a normalizer's
    ``term``), else raise ``TypeError``; a class given for an instance is named as such.

    Examples
    --------
    >>> class Unnormalized:
    ...     def term(self, dist): return 0.0
    >>> check_protocol(Unnormalized, "normalizer", "term", "Unnormalized()")
    Traceback (most recent call last):
    ...
    TypeError: normalizer must be an instance with a .term() method, got the class Unnormalized: ...
    """
    if value is None and optional:
        return value
    if isinstance(value, type):
        raise TypeError(f"{name} must be an instance with a .{method}() method, got the class {value.__name__}: "
                        f"instantiate it, e.g. {example}")
    if not callable(getattr(value, method, None)):
        raise TypeError(f"{name} must have a .{method}() method (e.g. {example}), got {describe(value)} "
                        f"({type(value).__name__})")
    return value


def energy_signature_error(energy, conditional: bool) -> TypeError | None:
    """A ``TypeError`` when ``energy`` cannot be called as ``energy(z)`` (``energy(z, context)`` when
    ``conditional``), else ``None`` (also when Python cannot tell: no signature). Used to explain a failed call.

    Examples
    --------
    >>> print(energy_signature_error(lambda z, x: 0.0, conditional=False))
    energy takes the arguments (z, x), but the distribution has no context: it calls energy(z). Give context=... ...
    """
    try:
        signature = inspect.signature(energy)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*((None, None) if conditional else (None,)))
    except TypeError:
        if conditional:
            return TypeError(f"energy takes the arguments {signature}, but with context=... it is called as "
                             "energy(z, context): give it a second argument for the context (e.g. "
                             "EnergyMLP(d, context_dim=c)), or drop context=")
        return TypeError(f"energy takes the arguments {signature}, but the distribution has no context: it calls "
                         "energy(z). Give context=... (covariates x) or an energy of z alone")
    return None


def check_proposal_shapes(proposal_batch: tuple, proposal_event: tuple, batch_shape: tuple, event_shape: tuple
                          ) -> None:
    """Raise ``ValueError`` unless a proposal of ``proposal_batch`` / ``proposal_event`` shapes can stand in for a
    tilted distribution's base of ``batch_shape`` / ``event_shape``: the same event shape, and a batch shape that
    broadcasts to the distribution's.

    Examples
    --------
    >>> check_proposal_shapes((3,), (), (), (3,))
    Traceback (most recent call last):
    ...
    ValueError: proposal has event shape () and batch shape (3,), but the tilted distribution's ...
    """
    proposal_batch, proposal_event = tuple(proposal_batch), tuple(proposal_event)
    batch_shape, event_shape = tuple(batch_shape), tuple(event_shape)
    if proposal_event != event_shape:
        if proposal_event == () and proposal_batch[-1:] == event_shape[-1:]:
            fix = "declare the last dimension as the event, e.g. dist.Normal(loc, scale).to_event(1)"
        else:
            fix = (f"give it the event shape {event_shape}, e.g. dist.Normal(loc, scale).to_event(1) with loc "
                   f"and scale of shape {event_shape}")
        raise ValueError(f"proposal has event shape {proposal_event} and batch shape {proposal_batch}, but the "
                         f"tilted distribution's event shape is {event_shape}: a proposal is a distribution over "
                         f"the same vectors z; {fix}")
    n = max(len(proposal_batch), len(batch_shape))
    padded = (1,) * (n - len(proposal_batch)) + proposal_batch
    target = (1,) * (n - len(batch_shape)) + batch_shape
    if len(proposal_batch) > len(batch_shape) or any(p not in (1, t) for p, t in zip(padded, target)):
        raise ValueError(f"proposal has batch shape {proposal_batch}, which does not broadcast to the tilted "
                         f"distribution's batch shape {batch_shape}: give the proposal that batch shape (one "
                         "proposal per row) or none (one proposal shared by all rows)")


def check_loc_scale_shapes(loc_shape: tuple, scale_shape: tuple) -> None:
    """Raise ``ValueError`` unless ``loc`` and ``scale`` of these shapes broadcast (NumPy's rules).

    Examples
    --------
    >>> check_loc_scale_shapes((3,), (2,))
    Traceback (most recent call last):
    ...
    ValueError: loc of shape (3,) and scale of shape (2,) do not broadcast: give both the shape ...
    """
    a, b = tuple(loc_shape), tuple(scale_shape)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    if any(i != j and 1 not in (i, j) for i, j in zip(a, b)):
        raise ValueError(f"loc of shape {tuple(loc_shape)} and scale of shape {tuple(scale_shape)} do not "
                         "broadcast: give both the shape batch_shape + (d,) (or a scalar scale)")


def energy_output_error(what: str, in_shape: tuple, out, expected: str = "an array") -> Exception:
    """The error for an energy whose output does not fit inputs of shape ``in_shape``.

    ``out`` is the output's shape (a tuple) when the output is of the backend's array type, ``expected``; else
    the output itself, which gives a ``TypeError``. A shape other than ``in_shape[:-1]`` gives the ``ValueError``
    of :func:`check_energy_shape`.

    Examples
    --------
    >>> print(energy_output_error("energy", (4, 2), 1.0, expected="a torch tensor"))
    energy must return a torch tensor of shape (...) (one energy per row of z), got float for z of shape (4, 2): ...
    >>> print(energy_output_error("energy", (4, 2), (4, 1)))
    energy must map shape (..., d) to (...): input (4, 2) gave output (4, 1) (squeeze its last dimension)
    """
    if not isinstance(out, tuple):
        return TypeError(f"{what} must return {expected} of shape (...) (one energy per row of z), got "
                         f"{type(out).__name__} for z of shape {tuple(in_shape)}: build the result from z with the "
                         "backend's operations, e.g. (z ** 2).sum(-1)")
    try:
        check_energy_shape(what, in_shape, out)
    except ValueError as err:
        return err
    return ValueError(f"{what} returned shape {out} for z of shape {tuple(in_shape)}")  # not reached: shapes differ


def dtype_mismatch_message(what: str, energy_dtype, other: dict) -> str:
    """The message for an energy network whose parameters have another floating dtype than its inputs.

    ``other`` maps each input's name to its dtype.

    Examples
    --------
    >>> dtype_mismatch_message("energy", "torch.float32", {"z": "torch.float64"}).split(":")[0]
    "energy's parameters are torch.float32, but z is torch.float64"
    """
    inputs = ", ".join(f"{k} is {v}" for k, v in other.items())
    return (f"{what}'s parameters are {energy_dtype}, but {inputs}: use one dtype throughout. Cast the inputs to "
            f"the energy's dtype (for a tilted prior its loc and scale, which set z's dtype, and its context: "
            f"loc.to({energy_dtype})) or the energy to theirs (energy.double(), or "
            "torch.set_default_dtype(torch.float64) before building it)")
