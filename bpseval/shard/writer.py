"""Writing shards: `ShardWriter`, one rank's validation outputs of one step, raw or as sums."""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bpseval._arrays import to_numpy
from bpseval._version import __version__
from bpseval.errors import ArgumentError
from bpseval.kernel.batch import (
    BatchLayout,
    check_dataset_name,
    check_index_range,
    check_numeric,
    check_rate_kind,
    check_rates_dtype,
    check_shapes,
    check_values,
    checked_cell_ids,
    sample_indices,
    weights_of,
)
from bpseval.shard import _shard_claims
from bpseval.shard._guarded_file import GuardedFile, signals_deferred
from bpseval.shard._staging import ChunkBuffers, Column, Placed, StagedDataset, staged_rows, store_cell_ids
from bpseval.shard._stats_store import RankStats, StatsUpdate
from bpseval.shard._writer_thread import WriterThread
from bpseval.shard.format import (
    DATASETS_GROUP,
    DEFAULT_BLOCK_SIZE,
    FORMAT,
    FORMAT_VERSION,
    STORES,
    shard_path,
)

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
    same one needs no checks of its layout, only of its sample_idx and values."""
    batches: int = 0
    """Batches taken so far (refused ones not counted): a background writer names a bad batch by its number."""
    rows: int = 0

    def took(self, rows: int) -> None:
        """Count a batch of `rows` rows, taken."""
        self.batches += 1
        self.rows += rows


class ShardWriter:
    """Writes one rank's validation outputs for one step to `<run_dir>/step-SSSSSS/rank-RRRR.h5`.

    Use as a context manager, once, and call `add` once per batch, for every loader of the
    validation pass. Rows are staged per array until they fill a chunk of about 256 KiB, then
    written as whole chunks of a resizable HDF5 dataset, straight to the file (HDF5 keeps no chunk
    cache here); an array that never fills a chunk is written at the end as one contiguous block of
    its own size, so small shards stay small. Memory: one batch, plus less than one chunk per array
    (at most 2 MiB of RSS per dataset, measured with 40 datasets). The file is written under a
    hidden `.tmp` name, made durable and renamed on a clean exit; after an exception, or when the
    disk fills or a write fails (`OSError` from the `add` whose chunk could not be written, or from
    the end of the block), the partial file is deleted and an earlier shard at the final path
    stays as it was. Every SYNC_BYTES written, the kernel is asked to start writing the file to
    disk (on Linux, without waiting), so that the fsync at the end has little left to do. A writer
    still open when the interpreter exits (the script ended, raised, or called `sys.exit`, also
    from a signal handler) is discarded then, its temporary file deleted.

    Every batch is checked by the batch contract (`bpseval.kernel.batch`), its values too:
    finite non-negative rates (finite log-rates), counts >= 0, dfs in [0, 1], at every entry
    dfs does not mask. A batch of numpy arrays with the dtypes and shapes of the dataset's last
    batch, which was stored as given (no conversion), skips the checks of its layout, not those
    of its sample_idx and values. A refused batch raises ArgumentError at its own `add`, nothing
    of it is written, and the writer stays usable.

    `background=True` writes on a thread of its own: `add` checks the batch's layout and
    sample_idx and copies it into the stages on the caller's thread (for CUDA tensors, after the
    copy to the host), as the synchronous writer does, and queues the whole chunks it completes,
    and the check of the batch's values, for the thread; it waits only when QUEUE_BYTES (64 MiB) of
    chunks are queued. Memory: that, plus up to SPARE_CHUNKS written chunks kept to stage into
    again. Where the kernel cannot start writeback without waiting, the thread calls fdatasync
    every SYNC_BYTES instead. A write that fails, or a batch whose values the thread refuses,
    raises its error (OSError, or ArgumentError naming the dataset and the batch) at the next
    `add` or at the end of the `with` block, with the shard discarded as above: the refused batch
    is already staged beside the others, so the shard cannot be finished without it, and no batch
    is dropped silently. With `store="stats"` nothing is written before the end, so it changes
    nothing.

    One process writes each shard once: a second writer of the same run directory, step and
    rank in this process is refused while the first one's shard is still in place, unless
    `overwrite=True` (validation run again for that step). Separate processes (a restarted
    job) replace the shard: the last rename wins, whole.

    `store="stats"` writes per-cell sufficient statistics instead of raw arrays (a few KB per
    dataset): in total, and per block of `block_size` consecutive sample_idx for the paired
    bootstrap of `bpseval compare`. Samples repeated on this rank are dropped by sample_idx;
    repeats across ranks cannot be seen any more and are not checked.

    Args:
        run_dir: the run directory; the shard goes to `<run_dir>/step-SSSSSS/rank-RRRR.h5`.
        rank: this process's rank.
        world_size: the number of ranks of the validation job.
        step: the validation step (e.g. the epoch).
        run_id: the same text on every rank of one launch (`from_process_group` finds one).
        store: "raw" (the arrays) or "stats" (per-cell sums).
        block_size: samples per block of a stats-only shard.
        overwrite: replace a shard this process already wrote for this step.
        background: write on a thread of its own.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from bpseval import ShardWriter, evaluate
        >>> with tempfile.TemporaryDirectory() as run:
        ...     for rank in range(2):  # each rank writes its own shard, here one after the other
        ...         with ShardWriter(run, rank=rank, world_size=2) as shards:
        ...             rows = np.arange(rank, 6, 2)  # the samples DistributedSampler gives this rank
        ...             shards.add("session", np.full((3, 2), 0.5), np.array([[0, 1], [1, 0], [2, 1]]), sample_idx=rows)
        ...     result = evaluate(run, cache=False)
        >>> result.datasets["samples"].tolist(), result.cells["status"].tolist()
        ([6], ['ok', 'ok'])
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
        # isprintable() is False for NUL, control characters and lone surrogates (which UTF-8 cannot encode)
        if run_id is not None and (not isinstance(run_id, str) or not run_id or not run_id.isprintable()):
            raise ArgumentError(
                f"ShardWriter: run_id must be a non-empty printable string (it is stored as UTF-8 text and"
                f" names the launch in every shard), not {run_id!r}"
            )
        self.rank, self.world_size, self.step, self.run_id = int(rank), int(world_size), int(step), run_id
        self.path = shard_path(run_dir, self.step, self.rank)
        # unique per writer: two writers of one rank (a restarted job) never write into one file
        self._tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        self.store, self.block_size, self.overwrite = store, int(block_size), bool(overwrite)
        self.background = bool(background) and store == "raw"
        self._state = "new"
        """new -> open -> finished, or -> discarded (exception, abort, failed write)."""
        self._entered = False
        self._io: GuardedFile | None = None
        self._file: h5py.File | None = None
        self._written: dict[str, _Written] = {}
        self._stored: dict[str, StagedDataset] = {}
        self._stats: dict[str, RankStats] = {}
        self._buffers = ChunkBuffers()
        self._worker: WriterThread | None = None

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
            self._io = GuardedFile(self._tmp_path)
        except OSError as error:
            self._discard()
            raise self._write_error(error, "creating its temporary file") from error
        self._state = "open"
        self._run("creating its temporary file", self._create_file)
        if self.background:
            self._worker = WriterThread(f"bpseval ShardWriter rank {self.rank} step {self.step}")

    def _create_file(self) -> None:
        """The HDF5 file and its root attributes.

        rdcc_nbytes=0: HDF5 keeps no chunk of any array in memory. The writer hands it only whole
        chunks (and each array's last rows once), so a cache would gain nothing; with HDF5's default
        (8 MiB per array) every dataset kept its chunks in memory until the file was closed, and a
        full disk was found only then. Without it each chunk reaches the file in the call that writes it.
        """
        assert self._io is not None
        self._file = h5py.File(self._io, "w", rdcc_nbytes=0)
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
            attrs["run_id"] = self.run_id
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
        _shard_claims.release(self, finished=True)
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
        once `add` returns.

        Raises:
            ArgumentError: naming the dataset, when shapes, dtypes, identities, values or settings
                disagree with each other or with earlier batches (nothing of the batch is written, the
                writer stays usable); with `background=True`, for an earlier batch whose values the
                writer's thread refused (the shard is discarded then).
            OSError: when writing fails (the partial shard is deleted); with `background=True`, the
                error of an earlier batch's write.
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
            if self._worker is None:
                _check_values(dataset, arrays, rate_kind)
            stored = self._stored.get(dataset)
            if stored is not None and len(rhat) < stored.room:  # no chunk to write: the batch is only copied
                placed = stored.copy_in(arrays.values(), len(rhat))
                written.took(len(rhat))
                if self._worker is not None:
                    self._queue(dataset, written, stored, len(rhat), placed)
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
        if self._worker is None:
            _check_values(dataset, arrays, rate_kind)
        update = None
        if self.store == "stats":
            stats = self._stats.get(dataset) or RankStats(layout.n_cells)
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
        update: tuple[RankStats, StatsUpdate] | None = None,
    ) -> None:
        """The checked batch of `add`: staged and written (or queued), or its statistics kept."""
        rows = len(arrays["rhat"])
        if update is not None:
            stats, batch = update
            arrays = {}
        stored = self._stored.get(dataset)
        new_group = stored is None
        if stored is None:
            stored = self._stored[dataset] = StagedDataset(written.layout.rate_kind, self._buffers)
        if self._worker is None:
            self._run(f"adding a batch of dataset {dataset!r}", partial(self._store, dataset, stored, new_ids, arrays))
            written.took(rows)
        else:  # staged on this thread into memory of the writer's own: the caller may reuse its buffers
            placed: Placed = {}
            chunks = stored.stage(arrays, placed=placed)
            written.took(rows)
            self._queue(dataset, written, stored, rows, placed, chunks, new_ids, new_group)
        if update is not None:
            stats.commit(batch)
            self._stats[dataset] = stats

    def _queue(
        self,
        dataset: str,
        written: _Written,
        stored: StagedDataset,
        rows: int,
        placed: Placed,
        chunks: list[tuple[Column, np.ndarray]] | None = None,
        cell_ids: np.ndarray | None = None,
        new_group: bool = False,
    ) -> None:
        """Hand the batch just staged to the background thread: the check of its `rows` (where `placed` says
        the staging copied them), then the whole chunks it completed, the group and cell_ids if new.

        The staged rows are not written over before the check has run: the memory they are in is
        reused only once the thread has written it, after the jobs queued before.
        """
        if not (rows or chunks or cell_ids is not None or new_group):
            return
        check = None
        if rows:
            first = written.rows - rows
            check = partial(self._check_staged, dataset, written.batches, first, written.layout.rate_kind, placed)
        job = partial(self._write_chunks, dataset, stored, cell_ids, chunks or [], check)
        assert self._worker is not None
        nbytes = sum(chunk.nbytes for _, chunk in chunks or [])
        self._worker.submit(partial(self._attempt, f"adding a batch of dataset {dataset!r}", job), nbytes)
        self._raise_failure(self._worker.error)

    def _check_staged(self, dataset: str, number: int, first_row: int, rate_kind: str, placed: Placed) -> None:
        """The background thread's check of a batch's values, on the writer's copy of its rows.

        Raises:
            ArgumentError: naming the dataset and the batch, raised by the caller's next `add` (or
                the end of the `with` block), which discards the shard.
        """
        arrays = {name: staged_rows(pieces) for name, pieces in placed.items() if name != "sample_idx"}
        try:
            _check_values(dataset, arrays, rate_kind)
        except ArgumentError as error:
            found = str(error).removeprefix(f"dataset {dataset!r}: ")
            raise ArgumentError(
                f"{self.path}: batch {number} of dataset {dataset!r} (the dataset's rows {first_row} to"
                f" {first_row + len(arrays['rhat']) - 1} on this rank), given to an earlier add() and checked on"
                f" the writer's thread, rows counted from the batch's first: {found} The shard was discarded,"
                " with its temporary file: start a new ShardWriter to write this step again."
            ) from None

    def _store(
        self, dataset: str, stored: StagedDataset, cell_ids: np.ndarray | None, arrays: dict[str, np.ndarray]
    ) -> None:
        """The file's side of a synchronous `add`: the dataset's group (on its first batch), its cell_ids, its rows."""
        assert self._file is not None
        group = stored.open(self._file, dataset)
        if cell_ids is not None:
            store_cell_ids(group, cell_ids)
        stored.stage(arrays, group)
        assert self._io is not None  # an open writer has its file
        self._io.start_writeback(SYNC_BYTES, may_wait=False)

    def _write_chunks(
        self,
        dataset: str,
        stored: StagedDataset,
        cell_ids: np.ndarray | None,
        chunks: list[tuple[Column, np.ndarray]],
        check: Callable[[], None] | None,
    ) -> None:
        """The background thread's side of `add`: `check`, then the group (on its first batch), its cell_ids,
        the whole chunks."""
        assert self._file is not None and self._io is not None
        if check is not None:
            check()
        if chunks or cell_ids is not None or stored.group is None:
            group = stored.open(self._file, dataset)
            if cell_ids is not None:
                store_cell_ids(group, cell_ids)
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
        if not _shard_claims.claim(self, self.path.resolve(), self.overwrite, self._discard):
            raise ArgumentError(
                f"{self.path}: this process already wrote (or is writing) the shard of rank {self.rank} for"
                f" step {self.step}; a second ShardWriter would replace it and lose its batches. Write every"
                " validation loader into one shard: one ShardWriter for the whole validation pass, and"
                " add(dataset=<the loader's dataset name>, ...) for each loader's batches. To replace the"
                " shard on purpose (validation run again for this step), pass overwrite=True."
            )

    def _discard(self, wait: float | None = None) -> None:
        """Close and delete the temporary file, whatever state it is in; the writer cannot be used again.

        A background thread is stopped first, after the write it is doing, waiting at most `wait`
        seconds (at interpreter exit); if it is still writing then, HDF5 is not called from here
        and only the temporary file is deleted.
        """
        worker, self._worker = self._worker, None
        if worker is not None:  # its queued batches are dropped with the file
            worker.stop(drop=True, wait=wait)
        stopped = worker is None or not worker.running
        file, stream = (self._file, self._io) if stopped else (None, None)
        self._file = self._io = None
        self._state = "discarded"
        try:
            if file is not None and file.id.valid:
                with signals_deferred():
                    file.close()  # cannot fail on I/O: GuardedFile never reports an error to HDF5
        finally:
            if stream is not None:
                stream.discard()
            self._tmp_path.unlink(missing_ok=True)
            _shard_claims.release(self)

    def _run(self, doing: str, action: Callable[[], None]) -> None:
        """One step of writing, on this thread: on an exception or a failed write, the shard is discarded.

        A signal's Python handler waits for the step to end (`signals_deferred`): an exception it
        raises inside HDF5 would break the file, or be lost.
        """
        with signals_deferred():
            error = self._attempt(doing, action)
        self._raise_failure(error)

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
        raised = self._write_error(failure, doing)
        raised.__cause__ = failure
        return raised

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


def _check_values(dataset: str, arrays: dict[str, np.ndarray], rate_kind: str) -> None:
    """The batch contract's value check (`check_values`) of a batch's arrays in their storage dtypes."""
    rhat = arrays["rhat"]
    check_values(dataset, rhat, arrays["robs"], weights_of(dataset, arrays.get("dfs"), *rhat.shape), rate_kind)


def _numpy(value: Any) -> np.ndarray:
    """`to_numpy`, with numpy arrays, what most loops give, passed through first."""
    return value if type(value) is np.ndarray else to_numpy(value)


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
