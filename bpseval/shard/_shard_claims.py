"""The shards this process is writing, or wrote: one writer per shard, and no writer left open at exit.

`ShardWriter` claims its shard's path when it opens: a second writer of a path that this process is
writing, or wrote and is still in place, would replace it and lose its batches. A writer that is
still open when the interpreter exits (the script ended, raised or called `sys.exit` without closing
it) is discarded by the exit hook here, before the interpreter finalizes its objects.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable
from pathlib import Path

import h5py  # noqa: F401 - imported before the hook below is registered, so h5py's own exit hook runs after it

EXIT_WAIT = 1.0
"""Seconds an open writer waits, at interpreter exit, for its background thread to finish the write it is doing."""

_LOCK = threading.Lock()
_OPEN: dict[object, tuple[Path, Callable[[float], None]]] = {}
"""The open writers: the path each claimed, and what discards it (given how long it may wait for its thread)."""
_FINISHED: dict[Path, tuple[int, int, int, int]] = {}
"""Shard paths this process renamed into place, with the (device, inode, size, mtime) they had then."""


def claim(writer: object, path: Path, overwrite: bool, discard: Callable[[float], None]) -> bool:
    """Record that `writer` writes the shard at `path` (resolved), to be discarded at exit unless released.

    Returns:
        False, recording nothing, when this process is writing that shard, or wrote it and it is
        still in place, unless `overwrite`.
    """
    with _LOCK:
        finished = _FINISHED.get(path)
        taken = any(claimed == path for claimed, _ in _OPEN.values())
        if (taken or (finished is not None and finished == _fingerprint(path))) and not overwrite:
            return False
        _OPEN[writer] = (path, discard)
        return True


def release(writer: object, finished: bool = False) -> None:
    """`writer` is closed: its shard is finished (renamed into place) or discarded."""
    with _LOCK:
        path, _ = _OPEN.pop(writer, (None, None))
        fingerprint = _fingerprint(path) if finished and path is not None else None
        if path is not None and fingerprint is not None:
            _FINISHED[path] = fingerprint


@atexit.register
def _discard_open_writers() -> None:
    """At interpreter exit, discard every writer still open.

    atexit runs its hooks before the interpreter finalizes objects, the last registered first (this
    one before h5py's): each background thread is stopped and each HDF5 file closed on this thread
    while h5py still works. Left to finalization, h5py objects
    closed beside a writer thread hung the process in h5py's lock, or crashed it.
    """
    with _LOCK:
        discards = [discard for _, discard in _OPEN.values()]
    for discard in discards:
        discard(EXIT_WAIT)


def _forget_open_writers() -> None:
    """In a forked child: the parent's open writers are the parent's to finish or discard, not the child's."""
    global _LOCK
    _LOCK = threading.Lock()  # another thread of the parent may have held it at the fork
    _OPEN.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forget_open_writers)


def _fingerprint(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns
