"""Backend-free file helpers shared by training, evaluation and metrics: atomic writes and flat array archives."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["atomic_write", "flatten_state", "unflatten_state"]


def atomic_write(path, write: Callable[[Any], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one.

    ``write(f)`` fills a binary temporary file in the same directory; it is flushed, fsynced and renamed over
    ``path`` (``os.replace``). On any error the temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> atomic_write(os.path.join(d, "a.txt"), lambda f: f.write(b"hello"))
    >>> os.listdir(d)
    ['a.txt']
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def flatten_state(state: Mapping, prefix: str = "") -> dict:
    """Flatten nested dicts of arrays to ``{"a/b": array}`` (keys: str without '/', or int).

    Examples
    --------
    >>> flatten_state({"a": {"b": 1, 0: 2}})
    {'a/b': 1, 'a/0': 2}
    """
    flat = {}
    for key, value in state.items():
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or "/" in key:
            raise ValueError(f"state_dict keys must be str without '/' (or int), got {key!r}")
        if isinstance(value, Mapping):
            flat.update(flatten_state(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten_state(flat: Mapping, *, int_keys: bool = False) -> dict:
    """Inverse of :func:`flatten_state`; with ``int_keys`` all-digit keys become ints (e.g. Flax NNX list indices).

    Examples
    --------
    >>> unflatten_state({"a/b": 1, "a/0": 2}, int_keys=True)
    {'a': {'b': 1, 0: 2}}
    """
    out: dict = {}
    for key, value in flat.items():
        parts = [int(p) if int_keys and p.isdigit() else p for p in key.split("/")]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
