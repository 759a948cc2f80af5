"""Files that protect themselves: every training checkpoint and weights file carries a manifest, verified on load.

A manifest records the file's kind (``"checkpoint"`` of ``fit``, ``"weights"`` of a trained model), the format
version, the backend, the package version, a hash of the configuration that produced it, every array's name,
dtype and shape, and a SHA-256 checksum of the arrays' bytes and of everything else in the file. On load the file
is refused with a :class:`CheckpointError` naming the file, what is wrong and what to do, when it is empty,
truncated or corrupted, was written by the other backend or for another kind of file, holds other arrays than the
reader expects, or (for a checkpoint) holds non-finite numbers.

This module is backend-free: a backend passes ``as_array``, which turns one of its tensors into a NumPy array (or
returns ``None`` for anything else).

Examples
--------
>>> import numpy as np
>>> payload = {"w": np.ones((2, 3), np.float32), "step": 4}
>>> m = make_manifest(payload, kind="weights", backend="numpyro")
>>> m["arrays"]
{'w': ['float32', [2, 3]]}
>>> verify_manifest("w.npz", payload, m, kind="weights", backend="numpyro")
>>> payload["w"][0, 0] = 2.0
>>> verify_manifest("w.npz", payload, m, kind="weights", backend="numpyro")
Traceback (most recent call last):
...
tilted_priors.inference.checkpoints.CheckpointError: w.npz: its content does not match its checksum (the file was \
changed or damaged after it was written). Use an earlier checkpoint, or train again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "make_manifest", "verify_manifest", "config_hash",
           "read_file", "expect_arrays", "backups", "keep_backup", "iter_candidates"]

FORMAT = "tilted-priors"
#: Version of the manifest and of the files' layout; files of a newer version are refused.
FORMAT_VERSION = 2
_KINDS = ("checkpoint", "weights")


class CheckpointError(ValueError):
    """A checkpoint, weights file or run folder that does not match what loads it.

    Parameters
    ----------
    path : str or Path
        The file (or folder) at fault.
    problem : str
        What is wrong, in a sentence.
    fix : str
        What to do about it.

    Examples
    --------
    >>> err = CheckpointError("run/weights.pt", "it is empty (0 bytes)", "Train the run again.")
    >>> str(err)
    'run/weights.pt: it is empty (0 bytes). Train the run again.'
    >>> err.path, isinstance(err, ValueError)
    ('run/weights.pt', True)
    """

    def __init__(self, path, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), str(problem), str(fix)
        super().__init__(f"{self.path}: {self.problem}. {self.fix}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem, self.fix))


def _np_as_array(value) -> np.ndarray | None:
    return value if isinstance(value, np.ndarray) else None


def _walk(obj, as_array: Callable, path: str, arrays: dict, skeleton: list) -> None:
    """Collect ``obj``'s arrays by path and a canonical text of everything else (dict order, types, values)."""
    array = as_array(obj)
    if array is None and isinstance(obj, np.ndarray):
        array = obj
    if array is not None:
        arrays[path] = np.ascontiguousarray(array)
        skeleton.append(f"<{path}>")
    elif isinstance(obj, Mapping):
        skeleton.append("{")
        for key, value in obj.items():
            skeleton.append(repr(key) + ":")
            _walk(value, as_array, f"{path}/{key}" if path else str(key), arrays, skeleton)
            skeleton.append(",")
        skeleton.append("}")
    elif isinstance(obj, (list, tuple)):
        skeleton.append("[" if isinstance(obj, list) else "(")
        for i, value in enumerate(obj):
            _walk(value, as_array, f"{path}/{i}" if path else str(i), arrays, skeleton)
            skeleton.append(",")
        skeleton.append("]" if isinstance(obj, list) else ")")
    else:
        skeleton.append(repr(obj))


def _digest(payload, as_array: Callable) -> tuple[dict, str]:
    arrays: dict = {}
    skeleton: list = []
    _walk(payload, as_array, "", arrays, skeleton)
    h = hashlib.sha256("".join(skeleton).encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return arrays, h.hexdigest()


def config_hash(config: Mapping | None) -> str | None:
    """SHA-256 (16 hex digits) of a JSON configuration, keys sorted; ``None`` for ``None``.

    Examples
    --------
    >>> config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1})
    True
    """
    if config is None:
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_manifest(payload, *, kind: str, backend: str, config: Mapping | None = None,
                  as_array: Callable[[Any], np.ndarray | None] = _np_as_array) -> dict:
    """The manifest of ``payload`` (nested dicts, lists and tuples of arrays and plain values): a JSON-able dict.

    ``as_array`` turns one of the backend's tensors into a NumPy array (``None`` for other objects). ``config``
    (optional) is recorded with its hash, for a reader to compare with its own.
    """
    from tilted_priors import __version__

    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    arrays, digest = _digest(payload, as_array)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "backend": backend,
            "package_version": __version__, "config_hash": config_hash(config),
            "config": None if config is None else dict(config),
            "arrays": {name: [a.dtype.name, list(a.shape)] for name, a in sorted(arrays.items())},
            "sha256": digest}


def verify_manifest(path, payload, manifest, *, kind: str, backend: str,
                    as_array: Callable[[Any], np.ndarray | None] = _np_as_array, require_finite: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``payload`` read from ``path`` matches ``manifest``.

    Checks, in order: a manifest of this project's format and a version this package reads; the kind and the
    backend; every array's name, dtype and shape; the checksum; with ``require_finite``, that no floating-point
    array holds ``nan`` or ``inf`` (a checkpoint of a diverged state).
    """
    where = "an earlier checkpoint" if kind == "checkpoint" else "the run's checkpoint"
    if not isinstance(manifest, Mapping) or manifest.get("format") != FORMAT:
        raise CheckpointError(path, f"it has no {FORMAT} manifest: it was not written by this package's "
                                    f"{'fit' if kind == 'checkpoint' else 'save_params'} (or by a version before "
                                    "manifests)", "Give a file this package wrote, or train again.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(path, f"it has format version {version!r}, newer than this package's "
                                    f"{FORMAT_VERSION} (written by tilted-priors {manifest.get('package_version')})",
                              "Upgrade tilted-priors to read it.")
    if manifest.get("kind") != kind:
        raise CheckpointError(path, f"it is a {manifest.get('kind')} file, not a {kind} file",
                              f"Give the run's {kind} file.")
    if manifest.get("backend") != backend:
        raise CheckpointError(path, f"it was written by the {manifest.get('backend')} backend, and the {backend} "
                                    "backend cannot read it",
                              f"Use backend={manifest.get('backend')!r}, or train again with {backend}.")
    arrays, digest = _digest(payload, as_array)
    found = {name: [a.dtype.name, list(a.shape)] for name, a in sorted(arrays.items())}
    listed = {k: list(v) for k, v in manifest.get("arrays", {}).items()}
    if found != listed:
        missing = sorted(set(listed) - set(found))
        extra = sorted(set(found) - set(listed))
        changed = sorted(k for k in set(found) & set(listed) if found[k] != listed[k])
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unlisted {_few(extra)}"] if extra else []) \
            + ([f"{k}: {found[k][0]}{found[k][1]} instead of {listed[k][0]}{listed[k][1]}" for k in changed[:3]])
        raise CheckpointError(path, "its arrays do not match its manifest (" + "; ".join(parts) + ")",
                              f"The file was changed or damaged after it was written. Use {where}, or train again.")
    if digest != manifest.get("sha256"):
        raise CheckpointError(path, "its content does not match its checksum (the file was changed or damaged after "
                                    "it was written)", "Use an earlier checkpoint, or train again.")
    if require_finite:
        for name, a in sorted(arrays.items()):
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise CheckpointError(path, f"array {name!r} holds non-finite values (nan or inf): it was written "
                                            "from a diverged state", f"Resume from {where}, or train again.")


def _few(names: list) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def read_file(path, load: Callable[[Path], Any], *, what: str, fix: str) -> Any:
    """``load(path)``, with every failure to read turned into a :class:`CheckpointError`.

    A missing or empty file, or one that ``load`` cannot parse (a truncated or corrupted zip or pickle stream),
    gives an error that names the file and says ``fix``; the loader's own message (which may suggest loading the
    file unsafely) is not repeated, only its type.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, f"the {what} does not exist", fix)
    if path.is_dir():
        raise CheckpointError(path, f"it is a folder, not a {what}", fix)
    if path.stat().st_size == 0:
        raise CheckpointError(path, f"the {what} is empty (0 bytes): its write was interrupted", fix)
    try:
        return load(path)
    except CheckpointError:
        raise
    except Exception as err:  # zipfile.BadZipFile, pickle.UnpicklingError, EOFError, RuntimeError, OSError, ...
        raise CheckpointError(path, f"the {what} cannot be read: it is truncated or corrupted, or not a {what} "
                                    f"({type(err).__name__})", fix) from None


def expect_arrays(path, found: Mapping[str, tuple], expected: Mapping[str, tuple], *, fix: str) -> None:
    """Raise :class:`CheckpointError` unless ``found`` has exactly the names, shapes (and dtypes) of ``expected``.

    Both map a name to ``(dtype name, shape)``; a dtype of ``None`` in ``expected`` matches any.

    Examples
    --------
    >>> expect_arrays("w.npz", {"a": ("float32", (2,))}, {"a": (None, (3,))}, fix="Check config.json.")
    Traceback (most recent call last):
    ...
    tilted_priors.inference.checkpoints.CheckpointError: w.npz: it does not fit the model: 'a' has shape (2,), the \
model expects (3,). Check config.json.
    """
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"it lacks {_few(missing)}")
    if extra:
        parts.append(f"it has {_few(extra)}, which the model does not")
    for name in sorted(set(found) & set(expected)):
        (dtype, shape), (want_dtype, want_shape) = found[name], expected[name]
        if tuple(shape) != tuple(want_shape):
            parts.append(f"{name!r} has shape {tuple(shape)}, the model expects {tuple(want_shape)}")
        elif want_dtype is not None and str(dtype) != str(want_dtype):
            parts.append(f"{name!r} has dtype {dtype}, the model expects {want_dtype}")
    if parts:
        shown = "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more differences" if len(parts) > 4 else "")
        raise CheckpointError(path, f"it does not fit the model: {shown}", fix)


_BACKUP = re.compile(r"^(?P<stem>.+)-(?P<step>\d+)(?P<suffix>\.[^.]+)$")


def backups(path) -> list[tuple[int, Path]]:
    """The kept earlier versions of ``path`` (``<stem>-<step><suffix>`` beside it), newest first.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in ("checkpoint.pt", "checkpoint-000010.pt", "checkpoint-000020.pt", "other-000030.pt"):
    ...     _ = (d / name).write_bytes(b"x")
    >>> [(step, p.name) for step, p in backups(d / "checkpoint.pt")]
    [(20, 'checkpoint-000020.pt'), (10, 'checkpoint-000010.pt')]
    """
    path = Path(path)
    found = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            m = _BACKUP.match(entry.name)
            if m and m["stem"] == path.stem and m["suffix"] == path.suffix:
                found.append((int(m["step"]), entry))
    return sorted(found, reverse=True)


def keep_backup(path, step: int, keep: int) -> None:
    """Before ``path`` is replaced: keep its current version as ``<stem>-<step><suffix>`` (a hard link, or a copy
    where links are not supported) and delete all but the newest ``keep - 1`` such versions (``keep`` counts
    ``path`` itself). Nothing happens when ``path`` does not exist or ``keep <= 1``."""
    path = Path(path)
    if keep <= 1 or not path.exists():
        for _, old in backups(path)[max(keep - 1, 0):]:
            old.unlink(missing_ok=True)
        return
    target = path.with_name(f"{path.stem}-{int(step):06d}{path.suffix}")
    if not target.exists():
        try:
            os.link(path, target)
        except OSError:
            import shutil

            shutil.copy2(path, target)
    for _, old in backups(path)[keep - 1:]:
        old.unlink(missing_ok=True)


def iter_candidates(path) -> Iterator[tuple[int | None, Path]]:
    """``path`` and then its kept earlier versions, newest first (``(None, path)`` first)."""
    yield None, Path(path)
    yield from backups(path)
