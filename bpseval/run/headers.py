"""Shard headers read in forked children with a time limit: libhdf5 can loop forever on a damaged file.

`read_headers` gives every shard's header (or the error that makes it unusable) for the run catalog.
Only a child killed by a signal, or one that outlives its time limit, means a damaged file; any other
exception in a child is a bug in bpseval, raised in the caller with the child's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np

from bpseval.errors import BpsevalError, ShardError
from bpseval.kernel.compiled import available_cpus
from bpseval.run.parallel import START_METHOD
from bpseval.shard.format import ShardHeader
from bpseval.shard.reader import read_header

HEADER_TIMEOUT = 30.0
"""Seconds one shard's metadata may take to read (milliseconds when healthy); BPSEVAL_METADATA_TIMEOUT overrides it."""


SHARDS_PER_CHILD = 64
"""Shards from which `read_headers` forks one more child, up to the CPUs, whatever `jobs`: a header takes
milliseconds to read (most of it HDF5's per-array cost), a fork about ten."""
READERS = 8
"""Children that may read headers at once (more when `jobs` starts more): damaged files are waited for side by
side, so N files that hang cost about the timeout times ceil(N / READERS), not N times the timeout."""
SLOW_HEADER = 0.1
"""Seconds after which a child still reading one file leaves the files after it to new children (up to READERS
at once): a header takes milliseconds, and a file that hangs must not hold the others back."""
GRANTED_AHEAD = 2
"""Files a child may read ahead of the headers the parent has received: enough that it never waits for the
parent, few enough that a slow file keeps few others behind it."""


def read_headers(paths: list[Path], timeout: float | None = None, jobs: int = 1) -> list[ShardHeader | BpsevalError]:
    """Every shard's header (or the error that makes it unusable), in the order of `paths`.

    HDF5 can loop forever on some damaged files (a corrupt global heap behind a string
    attribute), which no exception interrupts; so the headers are read in forked children (`jobs`,
    or one per SHARDS_PER_CHILD shards up to the CPUs when that is more; each reads a contiguous share
    of `paths`), and a file that takes longer than `timeout`, or whose reading kills its child (a
    signal), is reported as damaged. A file slower than SLOW_HEADER leaves the files after it to new
    children, up to READERS at once, so that files that hang are waited for together. Any other
    exception in a child is a bug in bpseval, never a damaged file: it is raised here, with the
    child's traceback as its cause. Where bpseval does not fork (START_METHOD is not "fork": not
    Linux) the headers are read here, without that bound.
    """
    if not paths or START_METHOD != "fork":
        return [_header_or_error(path) for path in paths]
    if timeout is None:
        timeout = float(os.environ.get("BPSEVAL_METADATA_TIMEOUT", HEADER_TIMEOUT))
    children = min(len(paths), max(jobs, min(available_cpus(), len(paths) // SHARDS_PER_CHILD)))
    return _ReaderPool(paths, timeout, children, max(children, READERS)).read()


class _ReaderPool:
    """The header-reading children of one `read_headers` call: at most `most` at once, each reading a share of
    the paths in order; the files after one that is slow, hangs or kills its child go to new children."""

    def __init__(self, paths: list[Path], timeout: float, children: int, most: int) -> None:
        self.paths, self.timeout, self.most = paths, timeout, most
        self.results: list[ShardHeader | BpsevalError | None] = [None] * len(paths)
        self.pending = [share.tolist() for share in np.array_split(np.arange(len(paths)), children)]
        """Shares (indices into `paths`) waiting for a child."""
        self.active: dict[Any, _HeaderReader] = {}
        """The running children, by the end of the pipe their headers come from."""

    def read(self) -> list[ShardHeader | BpsevalError]:
        """Every header or error, in the order of the paths."""
        try:
            while self.pending or self.active:
                while self.pending and len(self.active) < self.most:
                    reader = _HeaderReader(self.paths, self.pending.pop(0), self.timeout)
                    self.active[reader.receiver] = reader
                self._next_event()
        finally:  # also when receiving fails or a child sent a bug back: no child outlives the call
            for reader in self.active.values():
                reader.stop()
        headers = [result for result in self.results if result is not None]
        assert len(headers) == len(self.paths)  # every file has its header or its error
        return headers

    def _next_event(self) -> None:
        """Wait until a child sends a header or dies, lets its timeout pass, or is slow while others could start."""
        wake = min(reader.since + self.timeout for reader in self.active.values())
        if self._free():
            wake = min([wake, *(reader.since + SLOW_HEADER for reader in self.active.values() if reader.rest())])
        ready = wait(list(self.active), timeout=max(0.0, wake - time.monotonic()))
        for receiver in ready:
            reader = self.active[receiver]
            if not reader.receive(self.results):
                self._end(reader)
        now = time.monotonic()
        for receiver, reader in list(self.active.items()):
            if receiver in ready:
                continue
            if reader.since + self.timeout <= now:
                self.results[reader.current] = ShardError(
                    f"{self.paths[reader.current]}: reading its metadata did not finish within {self.timeout:g} s;"
                    " the file is damaged (HDF5 can loop forever on a corrupt heap). Move it out of the run directory."
                )
                self._end(reader)
            elif reader.since + SLOW_HEADER <= now and reader.rest() and self._free():
                self._share(reader.hand_over())

    def _free(self) -> int:
        """How many more children could start now, besides those running and the shares waiting."""
        return self.most - len(self.active) - len(self.pending)

    def _end(self, reader: _HeaderReader) -> None:
        """Stop `reader`; the files it was still to read go to new children."""
        reader.stop()
        del self.active[reader.receiver]
        self._share(reader.unread())

    def _share(self, indices: list[int]) -> None:
        """Queue `indices` in as many contiguous shares as children could start now (one at least)."""
        if indices:
            parts = max(1, min(len(indices), self._free()))
            self.pending += [share.tolist() for share in np.array_split(np.array(indices), parts)]


class _HeaderReader:
    """A forked child that reads the headers of `paths[i]` for each i of `indices`, in order, and sends each back
    as it is read (or the exception of a bug in bpseval, and then stops).

    The child reads a file only once the parent has granted it (GRANTED_AHEAD at a time, one more per header
    received), so that the parent knows which files it may still read: the others can go to another child
    without any file being read twice.
    """

    def __init__(self, paths: list[Path], indices: list[int], timeout: float) -> None:
        self.paths, self.indices, self.timeout = paths, indices, timeout
        self.taken = 0
        """Headers received."""
        self.granted = 0
        """Files the child was allowed to read: the first `granted` of `indices`."""
        self.limit = len(indices)
        """Files this child is to read (fewer once it handed the rest over)."""
        context = multiprocessing.get_context("fork")
        self.receiver, child_end = context.Pipe()
        self.child = context.Process(target=_send_headers, args=([paths[i] for i in indices], child_end), daemon=True)
        self.child.start()
        child_end.close()
        self.since = time.monotonic()
        """When the current file's reading began, as far as the parent knows: the fork, or the last header."""
        self._grant(GRANTED_AHEAD)

    @property
    def current(self) -> int:
        """The index (into the paths) of the file being read."""
        return self.indices[self.taken]

    def rest(self) -> list[int]:
        """The files this child is to read and was not yet allowed to: they can go to another child."""
        return self.indices[self.granted : self.limit]

    def hand_over(self) -> list[int]:
        """Keep only the files already granted: the rest, returned, is for other children."""
        rest, self.limit = self.rest(), self.granted
        return rest

    def unread(self) -> list[int]:
        """The files after the current one that this child was to read (it hung or died on the current one)."""
        return self.indices[self.taken + 1 : self.limit]

    def receive(self, results: list[ShardHeader | BpsevalError | None]) -> bool:
        """Put the next header into `results` (the pipe is ready); False once all are in or the child died.

        Raises the exception of a bug in bpseval that the child sent back (its traceback as the cause), and
        RuntimeError when the child ended without a word and without a signal.
        """
        try:
            message = self.receiver.recv()
        except EOFError:
            results[self.current] = self._killed()
            return False
        if isinstance(message, _Bug):
            raise message.error from _ChildTraceback(message.traceback)
        results[self.current] = message
        self.taken += 1
        self.since = time.monotonic()
        self._grant(1)
        return self.taken < self.limit

    def _grant(self, count: int) -> None:
        """Allow the child to read up to `count` more files (as many as are left to it)."""
        count = min(count, self.limit - self.granted)
        if count > 0:
            try:
                self.receiver.send_bytes(b"+" * count)
            except (BrokenPipeError, ConnectionResetError):  # the child died: its pipe's end says so when read
                return
            self.granted += count

    def _killed(self) -> ShardError:
        """The error of the current file once the child's pipe closed early: a signal killed it (libhdf5 crashed)."""
        self.child.join(timeout=self.timeout)
        code = self.child.exitcode
        if code is None or code >= 0:
            raise RuntimeError(
                f"the child reading the metadata of {self.paths[self.current]} ended without sending it (exit code"
                f" {code}): a bug in bpseval, not a damaged file."
            )
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return ShardError(
            f"{self.paths[self.current]}: reading its metadata killed the reader ({name}); the file is damaged."
            " Move it out of the run directory."
        )

    def stop(self) -> None:
        """End the child (done, hung or dead) and close the pipe."""
        self.child.kill()
        self.child.join()
        self.receiver.close()


@dataclass(frozen=True)
class _Bug:
    """An exception other than a BpsevalError raised while a child read a header: a bug, sent back to be raised."""

    error: BaseException
    traceback: str

    @classmethod
    def of(cls, error: Exception) -> _Bug:
        text = "".join(traceback.format_exception(error))
        try:  # sent as itself when it survives pickling; else as a RuntimeError naming it
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - whatever pickling raises, the bug is still sent back
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return cls(error, text)


class _ChildTraceback(Exception):
    """The traceback of a bug raised in a header-reading child: the cause of the exception raised again here."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def _send_headers(paths: list[Path], parent: Any) -> None:
    """In the child: read each file once the parent grants it (a byte per file), and send its header back."""
    granted = 0
    for path in paths:
        while not granted:
            granted = len(parent.recv_bytes())
        granted -= 1
        try:
            header = _header_or_error(path)
        except Exception as error:  # noqa: BLE001 - a bug in bpseval: sent back and raised in the parent
            parent.send(_Bug.of(error))
            break
        parent.send(header)
    parent.close()


def _header_or_error(path: Path) -> ShardHeader | BpsevalError:
    try:
        return read_header(path)
    except BpsevalError as error:
        return error
