"""Backend-free file helpers shared by training, evaluation and metrics: atomic writes, flat array archives and
the lock of a run folder."""
from __future__ import annotations

import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = ["atomic_write", "usual_mode", "flatten_state", "unflatten_state", "run_lock", "RunFolderLocked",
           "remove_stale_temporaries"]


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
        os.chmod(tmp, usual_mode())  # mkstemp makes it 0600; a new file gets the usual permissions
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


def usual_mode(folder: bool = False) -> int:
    """The permissions a new file (``0o666``) or folder (``0o777``) gets from ``open`` / ``mkdir`` under the
    process's umask; what the files this package writes through temporary files (made ``0o600`` / ``0o700``) are
    given.

    Examples
    --------
    >>> old = os.umask(0o022)
    >>> oct(usual_mode()), oct(usual_mode(folder=True))
    ('0o644', '0o755')
    >>> _ = os.umask(old)
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


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


class RunFolderLocked(RuntimeError):
    """Another process is writing to the run folder (a training, or an evaluation of it).

    Examples
    --------
    >>> str(RunFolderLocked("runs/a", "pid 12 on host x, since 2026-01-01 10:00:00"))[:46]
    'runs/a is in use by another process (pid 12 on'
    """

    def __init__(self, folder, holder: str):
        self.folder, self.holder = str(folder), holder
        super().__init__(f"{self.folder} is in use by another process ({holder}). Wait for it to finish, or give "
                         "another output folder; if that process no longer runs, the lock frees itself.")

    def __reduce__(self):
        return (type(self), (self.folder, self.holder))


LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # folder -> [open lock file, depth]: the lock is re-entrant within a process


@contextmanager
def run_lock(folder) -> Iterator[None]:
    """Hold the run folder's lock while writing to it; a second process gets :class:`RunFolderLocked`.

    The lock is an advisory ``flock`` on ``folder/.lock``, which the operating system releases when its process
    ends, so a lock left by a killed process is free again (its file stays, naming the last holder, until the next
    holder removes it on release). It is
    re-entrant within one process. On taking it, temporary files that interrupted atomic writes left behind are
    removed (:func:`remove_stale_temporaries`). Where ``fcntl`` is missing (Windows) the lock is a no-op.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with run_lock(d):
    ...     with run_lock(d):  # re-entrant
    ...         pass
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunFolderLocked(folder, holder) from None
        try:  # the holder before us may have removed the file between our open and our lock: then lock anew
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held[key] = [f, 1]
    try:
        remove_stale_temporaries(folder)
        yield
    finally:
        del _held[key]
        try:
            os.unlink(path)  # while still holding it (see above)
        except FileNotFoundError:
            pass
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def remove_stale_temporaries(folder) -> list[str]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that interrupted :func:`atomic_write` calls left in
    ``folder``; returns their names. Only safe while holding the folder's :func:`run_lock`.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / ".checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    >>> remove_stale_temporaries(d), sorted(p.name for p in d.iterdir())
    (['.checkpoint.pt.abc123.tmp'], [])
    """
    removed = []
    for entry in Path(folder).iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return sorted(removed)
