"""The shard's temporary file as HDF5 sees it: an I/O error never reaches libhdf5, and writeback starts early.

`GuardedFile` is what `ShardWriter` hands h5py's file-object driver. libhdf5 cannot recover from a
failed write (closing the file fails again, and the library crashes at exit), so the first OSError
is recorded here instead of raised, and the writer checks `failure` after every step.
`start_writeback` asks the kernel to start writing the data out as the file grows (Linux's
sync_file_range, through ctypes), so that the fsync at the end has little left to do.
`signals_deferred` keeps Python signal handlers from raising inside HDF5.
"""

from __future__ import annotations

import _signal  # the C module under `signal`: the same calls, without turning each handler into an enum (5 µs)
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFERRED_SIGNALS = tuple(
    int(getattr(signal, name))
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)
"""The signals a training script handles in Python (Ctrl-C, a scheduler's notice before it kills the job)."""


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Python handlers of DEFERRED_SIGNALS that arrive during the block run when it ends; on the main thread.

    Python runs a signal handler between two bytecodes of the main thread, wherever they are: also
    inside the callbacks libhdf5 makes into `GuardedFile` and inside h5py's cleanup of its objects.
    An exception the handler raises there (KeyboardInterrupt, SystemExit from a SIGTERM handler)
    leaves libhdf5 halfway through a write, or is printed as "Exception ignored" and lost, and the
    process goes on writing instead of exiting. During the block each such handler is replaced by
    one that notes the signal; at its end the handler is put back and the signal raised again, so
    the handler runs right after, in the writer's own code. Other threads run no Python handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {number: handler for number in DEFERRED_SIGNALS if callable(handler := _signal.getsignal(number))}
    arrived: list[int] = []
    for number in handlers:
        _signal.signal(number, lambda received, _: arrived.append(received))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            _signal.signal(number, handler)
        for number in arrived:
            signal.raise_signal(number)


class GuardedFile:
    """The temporary file as HDF5 sees it, through h5py's file-object driver; an I/O error never reaches HDF5.

    libhdf5 cannot recover from a failed write: closing the file fails again, and the library
    crashes at exit. So the first OSError (disk full, I/O error) is recorded instead of raised,
    and from then on writes are kept in memory (`overlay`, read back consistently) so that
    HDF5 finishes its operation and closes cleanly. The writer checks `failure` after every
    step and deletes the file. Memory after a failure is bounded by what HDF5 still flushes:
    the rest of the batch being written and its caches.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failure: OSError | None = None
        self.overlay: list[tuple[int, bytes]] = []
        self._file = open(path, "xb+", buffering=0)  # noqa: SIM115 - closed by finish() or discard()
        self._position = 0
        self._size = 0
        self._unsynced = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._position = offset + (self._size if whence == os.SEEK_END else self._position if whence else 0)
        return self._position

    def tell(self) -> int:
        return self._position

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.failure is None:
            try:
                self._file.seek(self._position)
                done = 0
                while done < len(view):
                    done += self._file.write(view[done:])
                self._unsynced += done
            except OSError as error:
                self.failure = error
        if self.failure is not None:
            self.overlay.append((self._position, bytes(view)))
        self._position += len(view)
        self._size = max(self._size, self._position)
        return len(view)

    def readinto(self, buffer: Any) -> int:
        """Fill `buffer` from the current position: zeros past the end, as HDF5's own driver does."""
        view = memoryview(buffer).cast("B")
        start, done = self._position, 0
        try:
            self._file.seek(start)
            while done < len(view) and (got := self._file.readinto(view[done:])):
                done += got
        except OSError as error:
            self.failure = self.failure or error
        if done < len(view):
            view[done:] = bytes(len(view) - done)
        for offset, piece in self.overlay:  # later writes over earlier ones, as on a disk
            low, high = max(offset, start), min(offset + len(piece), start + len(view))
            if low < high:
                view[low - start : high - start] = piece[low - offset : high - offset]
        self._position += len(view)
        return len(view)

    def read(self, size: int) -> bytes:
        """h5py recognises a file object by `read` (and then uses `readinto`)."""
        buffer = bytearray(size)
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: int) -> int:
        if self.failure is None:
            try:
                self._file.truncate(size)
            except OSError as error:
                self.failure = error
        self._size = size
        return size

    def flush(self) -> None:
        """Nothing is buffered here; `finish` makes the data durable."""

    def start_writeback(self, every: int, may_wait: bool) -> None:
        """Once `every` bytes were written since the last time, have the kernel start writing them to disk.

        The fsync at the end of the shard then has little left to wait for. On Linux this is
        sync_file_range, which returns without waiting for the disk, and whose errors (a hint's) are
        left to that fsync: a write that failed is reported there. Elsewhere, when the caller
        `may_wait` (a background writer's thread), it is fdatasync, its error recorded in `failure`.
        """
        if self.failure is None and self._unsynced >= every:
            self._unsynced = 0
            start = _sync_file_range()
            if start is not None:
                start(self._file.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)
            elif may_wait:
                try:
                    getattr(os, "fdatasync", os.fsync)(self._file.fileno())
                except OSError as error:
                    self.failure = error

    def finish(self) -> None:
        """Make the data durable and close the file; an error is recorded in `failure`, not raised."""
        try:
            if self.failure is None:
                os.fsync(self._file.fileno())
        except OSError as error:
            self.failure = error
        self.discard()

    def discard(self) -> None:
        """Close the file without caring whether its data reached the disk."""
        try:
            self._file.close()
        except OSError as error:
            self.failure = self.failure or error


_SYNC_FILE_RANGE_WRITE = 2
"""Linux's SYNC_FILE_RANGE_WRITE: start writing the range's dirty pages, do not wait."""


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(fd, offset, nbytes, flags) on Linux (not in the os module), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    except (ImportError, OSError):  # a Python without ctypes, or a libc that cannot be loaded: fsync alone
        return None
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function
