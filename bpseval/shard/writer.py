"""Writing shards: `ShardWriter`, one rank's validation outputs of one step, raw or as sums."""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import secrets
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bpseval._arrays import to_numpy
from bpseval._version import __version__
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.kernel.batch import (
    BatchLayout,
    check_dataset_name,
    check_index_range,
    check_numeric,
    check_rate_kind,
    check_rates_dtype,
    check_shapes,
    checked_cell_ids,
    sample_indices,
    weights_of,
)
from bpseval.kernel.samples import SeenSamples
from bpseval.kernel.stats import (
    STAT_FIELDS,
    Blocks,
    BlockSums,
    CellStats,
    as_weights,
    batch_stats,
    block_stats,
)
from bpseval.shard.format import (
    CHUNK_BYTES,
    DATASETS_GROUP,
    DEFAULT_BLOCK_SIZE,
    FORMAT,
    FORMAT_VERSION,
    STORES,
    shard_path,
)

QUEUE_BYTES = 1 << 26
"""Bytes of whole chunks a background writer holds (queued or being written) before `add` waits: 64 MiB.

The chunks a single batch completes are still taken, alone, when nothing else is queued, however large."""
SPARE_CHUNKS = 2
"""Chunks per array a background writer keeps, once written, to stage rows into again."""
SYNC_BYTES = 1 << 22
"""Each time this much was written (4 MiB), the writer has the kernel start writing it to disk (`start_writeback`).

The fsync at the end of the `with` block, which the loop waits for, then has little left to write."""


@dataclass
class _Written:
    """One dataset as `add` checks it: what its first batch fixed (layout, stored dtypes) and its cell_ids."""

    layout: BatchLayout
    dtypes: dict[str, np.dtype]
    cell_ids: np.ndarray | None = None
    stored_as_given: tuple[Any, ...] | None = None
    """The `_given` signature of the last batch stored as it came (no conversion): a batch with the
    same one needs no checks but of its sample_idx values."""


class _Column:
    """One array of a dataset group, its rows staged in memory until they fill an HDF5 chunk.

    Only whole chunks of about CHUNK_BYTES are written while the pass runs (one HDF5 call per
    chunk, not per batch), the last partial one at `finish`. An array that never fills a chunk is
    written at `finish` as one contiguous block of exactly its size: a toy dataset costs its bytes,
    not a 256 KiB chunk. Memory: the stage holds less than one chunk (CHUNK_BYTES, or one row
    when a row is larger), allocated when first needed; rows are copied into it, so the caller
    may reuse its buffers as soon as `stage_rows` returns.

    Staging (`stage_rows`) and writing (`write`, `finish`) touch separate fields: a background
    writer stages each batch on the caller's thread and writes the chunks on its own.
    """

    def __init__(self, name: str, first: np.ndarray) -> None:
        self.name, self.dtype, self.tail = name, first.dtype, first.shape[1:]
        self.chunk_rows = max(1, CHUNK_BYTES // max(1, math.prod(self.tail) * first.dtype.itemsize))
        self.stage: np.ndarray | None = None
        self.stage_bytes: memoryview | None = None
        """The stage as bytes, what `_copy_rows` copies into (None when rows have no bytes)."""
        self.staged = 0
        self.spare: list[np.ndarray] = []
        """Whole chunks handed over and written, reused as stages (a fresh 256 KiB array costs page faults)."""
        self.target: h5py.Dataset | None = None
        self.written = 0

    def stage_rows(self, rows: np.ndarray, group: h5py.Group | None = None) -> list[np.ndarray]:
        """Take `rows`; each whole chunk they complete is written to `group`, or without it returned, in order.

        Whole chunks come straight from `rows` when the stage is empty. With `group`, a chunk is
        written before this returns (the stage is then reused). Chunks returned are the writer's
        own (a copy of rows, or a full stage, replaced by a spare one), to be written later while
        the caller reuses its buffers.
        """
        chunks: list[np.ndarray] = []
        start = 0
        while start < len(rows):
            if self.staged == 0 and len(rows) - start >= self.chunk_rows:
                stop = start + (len(rows) - start) // self.chunk_rows * self.chunk_rows
                if group is not None:
                    self.write(group, rows[start:stop])
                else:
                    whole = np.empty((stop - start, *self.tail), self.dtype)
                    _copy_rows(whole, _bytes(whole), 0, rows[start:stop])
                    chunks.append(whole)
                start = stop
                continue
            if self.stage is None:
                self.stage = self.spare.pop() if self.spare else np.empty((self.chunk_rows, *self.tail), self.dtype)
                self.stage_bytes = _bytes(self.stage)
            taken = min(self.chunk_rows - self.staged, len(rows) - start)
            _copy_rows(self.stage, self.stage_bytes, self.staged, rows[start : start + taken])
            self.staged, start = self.staged + taken, start + taken
            if self.staged == self.chunk_rows:
                self.staged = 0
                if group is not None:
                    self.write(group, self.stage)
                else:
                    chunks.append(self.stage)
                    self.stage = self.stage_bytes = None
        return chunks

    def finish(self, group: h5py.Group) -> None:
        """Write the staged rows: the last chunk, or the whole array, contiguous, if it never filled one."""
        rows = self.stage[: self.staged] if self.stage is not None else np.empty((0, *self.tail), self.dtype)
        if self.target is None:
            group.create_dataset(self.name, data=rows)
        elif len(rows):
            self.write(group, rows)
        self.stage, self.stage_bytes, self.staged = None, None, 0

    def write_chunk(self, group: h5py.Group, chunk: np.ndarray) -> None:
        """`write` a chunk that `stage_rows` handed over, then keep it to stage rows into again."""
        self.write(group, chunk)
        if len(chunk) == self.chunk_rows and len(self.spare) < SPARE_CHUNKS:
            self.spare.append(chunk)  # list.append and list.pop are atomic: the threads need no lock

    def write(self, group: h5py.Group, rows: np.ndarray) -> None:
        """Append rows to the chunked, resizable dataset, created on the first full chunk.

        A dataset without cells ((N, 0) arrays) gets a resizable width too: HDF5 chunks cannot be 0 wide.
        """
        if self.target is None:
            self.target = group.create_dataset(
                self.name,
                shape=(0, *self.tail),
                maxshape=(None, *(size or None for size in self.tail)),
                dtype=self.dtype,
                chunks=(self.chunk_rows, *(size or 1 for size in self.tail)),
            )
        end = self.written + len(rows)
        self.target.resize(end, axis=0)
        if rows.size:
            self.target[self.written : end] = rows
        self.written = end


@dataclass
class _Stored:
    """One dataset group and its arrays: the group is created and written by the thread that writes."""

    rate_kind: str
    group: h5py.Group | None = None
    columns: dict[str, _Column] = field(default_factory=dict)
    room: int = 0
    """Rows fewer than which every array's stage takes without completing a chunk (`copy_in`)."""

    def stage(self, arrays: dict[str, np.ndarray], group: h5py.Group | None = None) -> list[tuple[_Column, np.ndarray]]:
        """Stage a batch (the same arrays, in the same order, on every batch; see `_Column.stage_rows`).

        With `group`, whole chunks are written to it; without, they are returned with their columns.
        """
        if len(self.columns) != len(arrays):
            self.columns = {name: _Column(name, array) for name, array in arrays.items()}
        chunks: list[tuple[_Column, np.ndarray]] = []
        for column, rows in zip(self.columns.values(), arrays.values(), strict=True):
            completed = column.stage_rows(rows, group)
            if completed:
                chunks += [(column, chunk) for chunk in completed]
        self.room = min(
            (column.chunk_rows - column.staged if column.stage is not None else 0 for column in self.columns.values()),
            default=0,
        )
        return chunks

    def copy_in(self, arrays: Iterable[np.ndarray], rows: int) -> None:
        """The usual batch, of `rows` < `room` rows: copied into the stages, nothing else to do."""
        for column, array in zip(self.columns.values(), arrays, strict=True):
            _copy_rows(column.stage, column.stage_bytes, column.staged, array)
            column.staged += rows
        self.room -= rows

    def open(self, file: h5py.File, dataset: str) -> h5py.Group:
        """The group, created on first use."""
        if self.group is None:
            self.group = file.create_group(f"{DATASETS_GROUP}/{dataset}")
            self.group.attrs["rate_kind"] = self.rate_kind
        return self.group

    def finish(self) -> None:
        assert self.group is not None
        for column in self.columns.values():
            column.finish(self.group)


def _copy_rows(target: np.ndarray, target_bytes: memoryview | None, start: int, rows: np.ndarray) -> None:
    """`target[start : start + len(rows)] = rows` (same dtype and row shape), holding the GIL; `target_bytes` is `_bytes(target)`.

    numpy lets go of the GIL while it copies more than a few hundred values. A background writer's
    thread waiting for the GIL may take it then, and keep the caller's thread waiting until its next
    system call, up to the interpreter's switch interval (5 ms): rare, but most of the time the loop
    spent in `add`. A memoryview copy of contiguous rows is one memcpy under the GIL.
    """
    source = memoryview(rows)
    if target_bytes is not None and source.nbytes and source.c_contiguous:
        row_bytes = target_bytes.nbytes // len(target)
        target_bytes[start * row_bytes : start * row_bytes + source.nbytes] = source.cast("B")
    else:
        target[start : start + len(rows)] = rows


def _bytes(array: np.ndarray) -> memoryview | None:
    """A contiguous array's bytes, to copy into; None when it has none (memoryview cannot cast an empty shape)."""
    return memoryview(array).cast("B") if array.nbytes else None


_Job = Callable[[], "BaseException | None"]


class _Worker:
    """A thread running a writer's writes in order, holding at most `limit` bytes of chunks.

    `submit` waits while the queued and running jobs' chunks plus the new one's would exceed `limit`
    (a job larger than `limit` is taken when nothing else is queued). A job returns the error the
    writer must raise, or None; the first error stops the thread, drops the jobs queued after it
    and stays in `error`, and `submit` stops waiting then.
    """

    def __init__(self, name: str, limit: int = QUEUE_BYTES) -> None:
        self.error: BaseException | None = None
        self._limit = limit
        self._jobs: deque[tuple[_Job, int]] = deque()
        self._held = 0
        self._stopping = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: _Job, nbytes: int) -> None:
        """Queue `job` (holding `nbytes` of arrays), waiting while the queue is full; not when it failed."""
        with self._changed:
            while self.error is None and self._held and self._held + nbytes > self._limit:
                self._changed.wait()
            if self.error is None:
                self._jobs.append((job, nbytes))
                self._held += nbytes
                self._changed.notify_all()

    def stop(self, drop: bool) -> BaseException | None:
        """End the thread after the queued jobs (or after the running one, with `drop`); the first error."""
        with self._changed:
            self._stopping = True
            if drop:
                self._jobs.clear()
            self._changed.notify_all()
        self._thread.join()
        return self.error

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._stopping:
                    self._changed.wait()
                if not self._jobs:
                    return
                job, nbytes = self._jobs.popleft()
            try:
                error = job()
            except BaseException as unexpected:  # noqa: BLE001 - anything the job raises is re-raised in the caller's thread
                error = unexpected
            with self._changed:
                self._held -= nbytes
                if error is not None:
                    self.error = error
                    self._jobs.clear()
                self._changed.notify_all()
            if error is not None:
                return


class _GuardedFile:
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


_PROCESS_LOCK = threading.Lock()
_OPEN_HERE: set[Path] = set()
"""Shard paths a writer of this process is writing now."""
_FINISHED_HERE: dict[Path, tuple[int, int, int, int]] = {}
"""Shard paths this process renamed into place, with the (device, inode, size, mtime) they had then."""


def _fingerprint(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class ShardWriter:
    """Writes one rank's validation outputs for one step to `<run_dir>/step-SSSSSS/rank-RRRR.h5`.

    Use as a context manager, once, and call `add` once per batch, for every loader of the
    validation pass. Rows are staged per array until they fill a chunk of about 256 KiB, then
    written as whole chunks of a resizable HDF5 dataset; an array that never fills a chunk is
    written at the end as one contiguous block of its own size, so small shards stay small.
    Memory: one batch, plus less than one chunk per array (under 1 MiB per dataset). The file
    is written under a hidden `.tmp` name, made durable and renamed on a clean exit; after an
    exception, or when the disk fills or a write fails (`OSError` from that `add` or from the
    end of the block), the partial file is deleted and an earlier shard at the final path stays
    as it was. Every SYNC_BYTES written, the kernel is asked to start writing the file to disk
    (on Linux, without waiting), so that the fsync at the end has little left to do.

    A batch of numpy arrays with the dtypes and shapes of the dataset's last batch, which was
    stored as given (no conversion), is not checked again but for its sample_idx values; any
    other batch is checked in full. Either way a refused batch raises at its own `add`, nothing
    of it is written, and the writer stays usable.

    `background=True` writes on a thread of its own: `add` checks the batch and copies it into
    the stages on the caller's thread (for CUDA tensors, after the copy to the host), as the
    synchronous writer does, and queues the whole chunks it completes (with narrow batches, one
    queue item for many batches) for the thread to write; it waits only when QUEUE_BYTES (64 MiB)
    of chunks are queued. Memory: that, plus up to SPARE_CHUNKS written chunks per array kept to
    stage into again. Where the kernel cannot start writeback without waiting, the thread calls
    fdatasync every SYNC_BYTES instead. A write that fails raises its error at the next `add` or
    at the end of the `with` block, with the shard discarded as above; no batch is dropped
    silently. With `store="stats"` nothing is written before the end, so it changes nothing.

    One process writes each shard once: a second writer of the same run directory, step and
    rank in this process is refused while the first one's shard is still in place, unless
    `overwrite=True` (validation run again for that step). Separate processes (a restarted
    job) replace the shard: the last rename wins, whole.

    `store="stats"` writes per-cell sufficient statistics instead of raw arrays (a few KB per
    dataset): in total, and per block of `block_size` consecutive sample_idx for the paired
    bootstrap of `bpseval compare`. Samples repeated on this rank are dropped by sample_idx;
    repeats across ranks cannot be seen any more and are not checked.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rank: int,
        world_size: int,
        step: int = 0,
        run_id: str | None = None,
        store: str = "raw",
        block_size: int = DEFAULT_BLOCK_SIZE,
        overwrite: bool = False,
        background: bool = False,
    ) -> None:
        if store not in STORES:
            raise ArgumentError(f"ShardWriter: store must be one of {STORES}, not {store!r}")
        if block_size < 1:
            raise ArgumentError(f"ShardWriter: block_size must be >= 1, got {block_size}")
        for name, value in (("rank", rank), ("world_size", world_size), ("step", step)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ArgumentError(f"ShardWriter: {name} must be an int, not {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ArgumentError(f"ShardWriter: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if step < 0:
            raise ArgumentError(f"ShardWriter: step must be >= 0, got {step}")
        self.rank, self.world_size, self.step, self.run_id = int(rank), int(world_size), int(step), run_id
        self.path = shard_path(run_dir, self.step, self.rank)
        # unique per writer: two writers of one rank (a restarted job) never write into one file
        self._tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        self.store, self.block_size, self.overwrite = store, int(block_size), bool(overwrite)
        self.background = bool(background) and store == "raw"
        self._state = "new"
        """new -> open -> finished, or -> discarded (exception, abort, failed write)."""
        self._entered = False
        self._claim: Path | None = None
        self._io: _GuardedFile | None = None
        self._file: h5py.File | None = None
        self._written: dict[str, _Written] = {}
        self._stored: dict[str, _Stored] = {}
        self._stats: dict[str, _RankStats] = {}
        self._worker: _Worker | None = None

    @classmethod
    def from_process_group(
        cls,
        run_dir: str | os.PathLike[str],
        step: int = 0,
        run_id: str | None = None,
        group: Any = None,
        **options: Any,
    ) -> ShardWriter:
        """A writer whose rank and world size come from the initialised torch.distributed group.

        Without `run_id`, every rank records the same one: torchrun's TORCHELASTIC_RUN_ID, else
        an id made on the group's first rank and broadcast (then this is a collective call that
        every rank of `group` must make). `options` go to `ShardWriter` (store, block_size, overwrite,
        background).
        """
        from bpseval._distributed import rank_and_world_size, shared_run_id

        rank, world_size = rank_and_world_size(group)
        return cls(run_dir, rank, world_size, step=step, run_id=run_id or shared_run_id(group), **options)

    def __enter__(self) -> ShardWriter:
        if self._entered or self._state in ("finished", "discarded"):
            raise ArgumentError(
                f"ShardWriter for {self.path}: a writer is used in one `with` block only (this one was"
                " already entered or closed); create a new ShardWriter for each validation pass."
            )
        self._entered = True
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        """Create the temporary file and write the root attributes (once; later calls do nothing)."""
        if self._state == "open":
            return
        self._check_usable("open()")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim_path()
        try:
            self._io = _GuardedFile(self._tmp_path)
        except OSError as error:
            self._discard()
            raise self._write_error(error, "creating its temporary file") from error
        self._state = "open"
        self._run("creating its temporary file", self._create_file)
        if self.background:
            self._worker = _Worker(f"bpseval ShardWriter rank {self.rank} step {self.step}")

    def _create_file(self) -> None:
        assert self._io is not None
        self._file = h5py.File(self._io, "w")
        attrs = self._file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["rank"] = self.rank
        attrs["world_size"] = self.world_size
        attrs["step"] = self.step
        attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        attrs["bpseval_version"] = __version__
        attrs["store"] = self.store
        if self.run_id is not None:
            attrs["run_id"] = str(self.run_id)
        self._file.create_group(DATASETS_GROUP)

    def close(self) -> Path:
        """Finish the shard: flush, fsync and atomically rename it into place. Returns its path.

        Closing a finished writer again returns the same path and changes nothing.
        """
        if self._state == "finished":
            return self.path
        self.open()
        if self._worker is not None:  # every queued batch is written first
            worker, self._worker = self._worker, None
            self._raise_failure(worker.stop(drop=False))
        self._run("finishing the shard (writing its last chunks to disk)", self._finish_file)
        try:
            os.replace(self._tmp_path, self.path)
        except OSError as error:
            self._discard()
            raise self._write_error(error, f"renaming it into place from {self._tmp_path.name}") from error
        self._file = self._io = None
        self._state = "finished"
        with _PROCESS_LOCK:
            _OPEN_HERE.discard(self._claim)
            finished = _fingerprint(self.path)
            if self._claim is not None and finished is not None:
                _FINISHED_HERE[self._claim] = finished
        return self.path

    def _finish_file(self) -> None:
        assert self._file is not None and self._io is not None
        for dataset, stats in self._stats.items():
            stats.write(self._stored[dataset].open(self._file, dataset), self.block_size)
        for stored in self._stored.values():
            stored.finish()
        self._file.close()
        self._io.finish()

    def abort(self) -> None:
        """Drop the partial shard, leaving no file that looks complete (a finished shard is kept)."""
        if self._state != "finished":
            self._discard()

    def add(
        self,
        dataset: str,
        rhat: Any,
        robs: Any,
        dfs: Any = None,
        sample_idx: Any = None,
        cell_ids: Any = None,
        rate_kind: str = "rate",
    ) -> None:
        """Append one batch of `dataset`: rhat, robs (samples, cells) and optional mask and identities.

        Accepts numpy arrays or torch tensors on any device; bfloat16 is stored as float32, and
        nothing is stored at a lower precision than it was given. The caller may reuse its buffers
        once `add` returns. Raises ArgumentError, naming the dataset, when shapes, values or settings
        disagree with each other or with earlier batches (nothing of the batch is written then),
        and OSError when writing fails (the partial shard is deleted then); with `background=True`,
        the OSError of an earlier batch's write.
        """
        if self._state != "open":
            self._check_usable("add()")
            self.open()
        if self._worker is not None and self._worker.error is not None:
            self._raise_failure(self._worker.error)
        written = self._written.get(dataset)
        given = _given(rhat, robs, dfs, sample_idx, cell_ids, rate_kind)
        if written is not None and given is not None and given == written.stored_as_given:
            arrays = {"rhat": rhat, "robs": robs}  # types, dtypes and shapes as checked before
            if dfs is not None:
                arrays["dfs"] = dfs
            if sample_idx is not None:
                arrays["sample_idx"] = check_index_range(dataset, sample_idx)
            stored = self._stored.get(dataset)
            if stored is not None and len(rhat) < stored.room:  # no chunk to write: the batch is only copied
                stored.copy_in(arrays.values(), len(rhat))
            else:
                self._keep(dataset, written, arrays, None)
            return
        if written is None:  # the names of earlier batches were checked then
            check_dataset_name(dataset)
        check_rate_kind(dataset, rate_kind)
        arrays = _batch_arrays(dataset, rhat, robs, dfs, sample_idx, cell_ids)
        layout = BatchLayout(
            n_cells=arrays["rhat"].shape[1],
            rate_kind=rate_kind,
            dfs_shape_tail=arrays["dfs"].shape[1:] if "dfs" in arrays else None,
            has_sample_idx="sample_idx" in arrays,
        )
        layout.check_follows(dataset, None if written is None else written.layout)
        ids = arrays.pop("cell_ids", None)
        if ids is not None:
            ids = checked_cell_ids(dataset, ids, layout.n_cells, None if written is None else written.cell_ids)
        if self.store == "raw" and written is not None:
            arrays = {name: _storable(written.dtypes[name], dataset, name, array) for name, array in arrays.items()}
        update = None
        if self.store == "stats":
            stats = self._stats.get(dataset) or _RankStats(layout.n_cells)
            update = (stats, stats.prepare(dataset, arrays, rate_kind, self.block_size))
        if written is None:
            dtypes = {name: array.dtype for name, array in arrays.items()} if self.store == "raw" else {}
            written = self._written[dataset] = _Written(layout, dtypes)
        as_given = {"rhat": rhat, "robs": robs, "dfs": dfs, "sample_idx": sample_idx}
        unchanged = self.store == "raw" and all(array is as_given[name] for name, array in arrays.items())
        written.stored_as_given = given if unchanged else None
        new_ids = ids if ids is not None and written.cell_ids is None else None
        if new_ids is not None:
            written.cell_ids = new_ids
        self._keep(dataset, written, arrays, new_ids, update)

    def _keep(
        self,
        dataset: str,
        written: _Written,
        arrays: dict[str, np.ndarray],
        new_ids: np.ndarray | None,
        update: tuple[_RankStats, _StatsUpdate] | None = None,
    ) -> None:
        """The checked batch of `add`: staged and written (or queued), or its statistics kept."""
        if update is not None:
            stats, batch = update
            arrays = {}
        stored = self._stored.get(dataset)
        new_group = stored is None
        if stored is None:
            stored = self._stored[dataset] = _Stored(written.layout.rate_kind)
        if self._worker is None:
            self._run(f"adding a batch of dataset {dataset!r}", partial(self._store, dataset, stored, new_ids, arrays))
        else:  # staged on this thread into memory of the writer's own: the caller may reuse its buffers
            chunks = stored.stage(arrays)
            if chunks or new_group or new_ids is not None:
                job = partial(self._write_chunks, dataset, stored, new_ids, chunks)
                doing = f"adding a batch of dataset {dataset!r}"
                self._worker.submit(partial(self._attempt, doing, job), sum(chunk.nbytes for _, chunk in chunks))
                self._raise_failure(self._worker.error)
        if update is not None:
            stats.commit(batch)
            self._stats[dataset] = stats

    def _store(self, dataset: str, stored: _Stored, cell_ids: np.ndarray | None, arrays: dict[str, np.ndarray]) -> None:
        """The file's side of a synchronous `add`: the dataset's group (on its first batch), its cell_ids, its rows."""
        assert self._file is not None
        group = stored.open(self._file, dataset)
        if cell_ids is not None:
            _store_cell_ids(group, cell_ids)
        stored.stage(arrays, group)
        self._io.start_writeback(SYNC_BYTES, may_wait=False)

    def _write_chunks(
        self, dataset: str, stored: _Stored, cell_ids: np.ndarray | None, chunks: list[tuple[_Column, np.ndarray]]
    ) -> None:
        """The background thread's side of `add`: the group (on its first batch), its cell_ids, the whole chunks."""
        assert self._file is not None and self._io is not None
        group = stored.open(self._file, dataset)
        if cell_ids is not None:
            _store_cell_ids(group, cell_ids)
        for column, chunk in chunks:
            column.write_chunk(group, chunk)
        self._io.start_writeback(SYNC_BYTES, may_wait=True)

    def _check_usable(self, call: str) -> None:
        if self._state == "finished":
            raise ArgumentError(
                f"ShardWriter for {self.path}: {call} after the shard was finished (its `with` block ended"
                " or close() was called); nothing more can go into it. Call add() inside the `with` block,"
                " for every loader of the validation pass."
            )
        if self._state == "discarded":
            raise ArgumentError(
                f"ShardWriter for {self.path}: {call} after the shard was discarded (an exception, a failed"
                " write or abort()); its batches are gone. Start a new ShardWriter to write this step again."
            )

    def _claim_path(self) -> None:
        """Refuse to replace a shard this process wrote, or is writing, at the same path (unless overwrite)."""
        claim = self.path.resolve()
        with _PROCESS_LOCK:
            finished = _FINISHED_HERE.get(claim)
            taken = claim in _OPEN_HERE or (finished is not None and finished == _fingerprint(claim))
            if taken and not self.overwrite:
                raise ArgumentError(
                    f"{self.path}: this process already wrote (or is writing) the shard of rank {self.rank} for"
                    f" step {self.step}; a second ShardWriter would replace it and lose its batches. Write every"
                    " validation loader into one shard: one ShardWriter for the whole validation pass, and"
                    " add(dataset=<the loader's dataset name>, ...) for each loader's batches. To replace the"
                    " shard on purpose (validation run again for this step), pass overwrite=True."
                )
            _OPEN_HERE.add(claim)
            self._claim = claim

    def _discard(self) -> None:
        """Close and delete the temporary file, whatever state it is in; the writer cannot be used again."""
        if self._worker is not None:  # its queued batches are dropped with the file
            worker, self._worker = self._worker, None
            worker.stop(drop=True)
        file, stream = self._file, self._io
        self._file = self._io = None
        self._state = "discarded"
        try:
            if file is not None and file.id.valid:
                file.close()  # cannot fail on I/O: _GuardedFile never reports an error to HDF5
        finally:
            if stream is not None:
                stream.discard()
            self._tmp_path.unlink(missing_ok=True)
            with _PROCESS_LOCK:
                _OPEN_HERE.discard(self._claim)

    def _run(self, doing: str, action: Callable[[], None]) -> None:
        """One step of writing, on this thread: on an exception or a failed write, the shard is discarded."""
        self._raise_failure(self._attempt(doing, action))

    def _attempt(self, doing: str, action: Callable[[], None]) -> BaseException | None:
        """Run `action`; the error to raise if it raised or a write failed during it, else None.

        Runs on the background thread too, so it changes nothing but the file: the caller discards.
        """
        try:
            action()
        except BaseException as error:  # noqa: BLE001 - returned to be raised after the file is discarded
            # an OSError after a failed write is its consequence: the write error below says more;
            # anything else (a bug, KeyboardInterrupt) is raised as itself
            if self._io is None or self._io.failure is None or not isinstance(error, OSError):
                return error
        failure = self._io.failure if self._io is not None else None
        if failure is None:
            return None
        error = self._write_error(failure, doing)
        error.__cause__ = failure
        return error

    def _raise_failure(self, error: BaseException | None) -> None:
        """Discard the shard and raise `error`, if there is one."""
        if error is not None:
            self._discard()
            raise error

    def _write_error(self, error: OSError, doing: str) -> OSError:
        """The OSError to raise: same errno (so same subclass), naming the shard, what failed and what to do."""
        message = (
            f"{self.path}: {error.strerror or error} while {doing}. The shard was not written and its temporary"
            f" file was removed; an earlier shard at this path is untouched. Free disk space or fix the"
            " filesystem, then run this validation again."
        )
        return OSError(error.errno, message) if error.errno is not None else OSError(message)


@dataclass
class _RankStats:
    """One dataset's statistics on this rank, for `store="stats"`: total, per block, and the samples seen.

    Blocks are kept sparse (`BlockSums`): only those that hold samples, so a sample_idx near 2^62 costs
    one block, not every empty block below it.
    """

    n_cells: int
    total: CellStats | None = None
    blocks: BlockSums | None = None
    """None until a batch with sample_idx comes."""
    seen: SeenSamples = field(default_factory=SeenSamples)
    samples: int = 0
    duplicates_dropped: int = 0

    def prepare(self, dataset: str, arrays: dict[str, np.ndarray], rate_kind: str, block_size: int) -> _StatsUpdate:
        """The batch's statistics, without changing anything yet: a batch with bad values leaves no trace."""
        rhat, robs, index = arrays["rhat"], arrays["robs"], arrays.get("sample_idx")
        weights = as_weights(arrays.get("dfs"), *rhat.shape)
        dropped = 0
        if index is not None:
            keep = self.seen.first_sightings(index)
            dropped = int((~keep).sum())
            rhat, robs, index = rhat[keep], robs[keep], index[keep]
            weights = None if weights is None else weights[keep]
        try:
            if index is None:
                return _StatsUpdate(batch_stats(rhat, robs, weights, rate_kind), None, None, len(rhat), 0)
            blocks = block_stats(index // block_size, rhat, robs, weights, rate_kind)
        except BpsevalError as error:
            raise ArgumentError(f"dataset {dataset!r}: {error}") from None
        return _StatsUpdate(blocks.total(), blocks, index, len(rhat), dropped)

    def commit(self, update: _StatsUpdate) -> None:
        self.total = update.batch if self.total is None else self.total + update.batch
        if update.blocks is not None:
            if self.blocks is None:
                self.blocks = BlockSums(self.n_cells)
            self.blocks.add(update.blocks)
        if update.index is not None:
            self.seen.add(update.index)
        self.samples += update.samples
        self.duplicates_dropped += update.dropped

    def write(self, group: h5py.Group, block_size: int) -> None:
        """The sums, and the blocks that hold samples with their ids (`blocks/block_ids`, increasing)."""
        total = self.total if self.total is not None else CellStats.zeros(self.n_cells)
        for name in STAT_FIELDS:
            group.create_dataset(name, data=getattr(total, name))
        group.attrs["samples"] = self.samples
        group.attrs["duplicates_dropped"] = self.duplicates_dropped
        if self.blocks is not None:
            blocks = self.blocks.sorted()
            group.attrs["block_size"] = block_size
            stored = group.create_group("blocks")
            stored.create_dataset("block_ids", data=blocks.ids)
            for name in STAT_FIELDS:
                stored.create_dataset(name, data=getattr(blocks.stats, name))


@dataclass(frozen=True)
class _StatsUpdate:
    """One batch's contribution to `_RankStats`, computed before anything is changed."""

    batch: CellStats
    blocks: Blocks | None
    index: np.ndarray | None
    samples: int
    dropped: int


def _batch_arrays(
    dataset: str, rhat: Any, robs: Any, dfs: Any, sample_idx: Any, cell_ids: Any
) -> dict[str, np.ndarray]:
    """The batch as numpy arrays in their storage dtypes, checked by the batch contract (but for its values)."""
    rates, counts = _numpy(rhat), _numpy(robs)
    n_rows, n_cells = check_shapes(dataset, rates, counts)
    check_rates_dtype(dataset, rates)
    check_numeric(dataset, "robs", counts)
    arrays = {"rhat": rates if rates.dtype.kind == "f" else rates.astype(np.float64), "robs": counts}
    if dfs is not None:
        mask = _numpy(dfs)
        check_numeric(dataset, "dfs", mask)
        weights_of(dataset, mask, n_rows, n_cells)
        arrays["dfs"] = mask.astype(np.uint8) if mask.dtype.kind == "b" else mask
    if sample_idx is not None:  # no copy here: the writer copies the rows when it stages them
        arrays["sample_idx"] = sample_indices(dataset, sample_idx, n_rows)
    if cell_ids is not None:
        arrays["cell_ids"] = cell_ids
    return arrays


def _given(rhat: Any, robs: Any, dfs: Any, sample_idx: Any, cell_ids: Any, rate_kind: str) -> tuple[Any, ...] | None:
    """What `add` checks of a batch but its values: rate_kind, dtypes and shapes; None unless numpy arrays without cell_ids."""
    if (
        cell_ids is not None
        or type(rhat) is not np.ndarray
        or type(robs) is not np.ndarray
        or (dfs is not None and type(dfs) is not np.ndarray)
        or (sample_idx is not None and type(sample_idx) is not np.ndarray)
    ):
        return None
    return (
        rate_kind,
        rhat.dtype,
        rhat.shape,
        robs.dtype,
        robs.shape,
        None if dfs is None else (dfs.dtype, dfs.shape),
        None if sample_idx is None else (sample_idx.dtype, sample_idx.shape),
    )


def _numpy(value: Any) -> np.ndarray:
    """`to_numpy`, with numpy arrays, what most loops give, passed through first."""
    return value if type(value) is np.ndarray else to_numpy(value)


def _store_cell_ids(group: h5py.Group, ids: np.ndarray) -> None:
    if ids.dtype.kind == "U":
        group.create_dataset("cell_ids", data=ids.astype(object), dtype=h5py.string_dtype("utf-8"))
    else:
        group.create_dataset("cell_ids", data=ids)


def _storable(target: np.dtype, dataset: str, name: str, array: np.ndarray) -> np.ndarray:
    """`array` in the dtype `target` of the earlier batches' `name`, refused when that would lose precision."""
    if array.dtype == target:
        return array
    if not np.can_cast(array.dtype, target, "safe"):
        raise ArgumentError(
            f"dataset {dataset!r}: {name} dtype {array.dtype} cannot be stored without loss in the"
            f" {target} of earlier batches; give the same dtype on every batch"
        )
    return array.astype(target)
