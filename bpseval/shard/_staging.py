"""Staging: a dataset's rows held in memory of the writer's own until they fill an HDF5 chunk.

`StagedDataset` is one dataset group of a raw shard, `Column` one of its arrays. Rows are copied
into a stage of one chunk (the caller may reuse its buffers at once); each whole chunk is written
by one HDF5 call, the last partial one (or an array that never filled a chunk, contiguous) at the end.
Stages come from the writer's `ChunkBuffers`, which keeps a few written chunks to stage into again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import h5py
import numpy as np

from bpseval.shard.format import CHUNK_BYTES, DATASETS_GROUP

SPARE_CHUNKS = 8
"""Written chunks a writer keeps, for all its arrays together, to stage rows into again: 2 MiB."""

Placed = dict[str, list[tuple[np.ndarray, int, int]]]
"""Where `StagedDataset.stage` copied a batch's rows, per array: (array, first row, row after the last)."""


class ChunkBuffers:
    """The memory stages are taken from: buffers of CHUNK_BYTES, of which up to SPARE_CHUNKS are kept once written.

    A fresh 256 KiB array costs page faults each time it is filled, so a background writer stages
    rows into chunks it has written (whatever the array's shape and dtype: each is a view of a
    buffer of CHUNK_BYTES). The number kept is per writer, not per array: memory does not grow with
    the number of datasets. `take` runs on the caller's thread and `give_back` on the writer's
    thread; list.pop and list.append are atomic, so they need no lock.
    """

    def __init__(self) -> None:
        self._spare: list[np.ndarray] = []

    def take(self, rows: int, tail: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised (rows, *tail) array: a view of a kept buffer, or new memory."""
        if rows * math.prod(tail) * dtype.itemsize > CHUNK_BYTES:  # rows larger than a chunk: one row per chunk
            return np.empty((rows, *tail), dtype)
        buffer = self._spare.pop() if self._spare else np.empty(CHUNK_BYTES, np.uint8)
        return np.ndarray((rows, *tail), dtype, buffer=buffer)

    def give_back(self, chunk: np.ndarray) -> None:
        """Keep the buffer of a written stage (`take`'s), up to SPARE_CHUNKS; other arrays are left to be freed."""
        buffer = chunk.base
        if isinstance(buffer, np.ndarray) and buffer.nbytes == CHUNK_BYTES and len(self._spare) < SPARE_CHUNKS:
            self._spare.append(buffer)


class Column:
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

    def __init__(self, name: str, first: np.ndarray, buffers: ChunkBuffers) -> None:
        self.name, self.dtype, self.tail = name, first.dtype, first.shape[1:]
        self.chunk_rows = max(1, CHUNK_BYTES // max(1, math.prod(self.tail) * first.dtype.itemsize))
        self.buffers = buffers
        self.stage: np.ndarray | None = None
        self.stage_bytes: memoryview | None = None
        """The stage as bytes, what `copy_rows` copies into (None when rows have no bytes)."""
        self.staged = 0
        self.target: h5py.Dataset | None = None
        self.written = 0

    def stage_rows(
        self, rows: np.ndarray, group: h5py.Group | None = None, placed: list[tuple[np.ndarray, int, int]] | None = None
    ) -> list[np.ndarray]:
        """Take `rows`; each whole chunk they complete is written to `group`, or without it returned, in order.

        Whole chunks come straight from `rows` when the stage is empty. With `group`, a chunk is
        written before this returns (the stage is then reused). Chunks returned are the writer's
        own (a copy of rows, or a full stage, replaced by another buffer), to be written later while
        the caller reuses its buffers; `placed` (without `group`) is given where the rows went.
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
                    copy_rows(whole, bytes_of(whole), 0, rows[start:stop])
                    chunks.append(whole)
                    if placed is not None:
                        placed.append((whole, 0, len(whole)))
                start = stop
                continue
            if self.stage is None:
                self.stage = self.buffers.take(self.chunk_rows, self.tail, self.dtype)
                self.stage_bytes = bytes_of(self.stage)
            taken = min(self.chunk_rows - self.staged, len(rows) - start)
            copy_rows(self.stage, self.stage_bytes, self.staged, rows[start : start + taken])
            if placed is not None:
                placed.append((self.stage, self.staged, self.staged + taken))
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
        """`write` a chunk that `stage_rows` handed over, then give its memory back to stage rows into again."""
        self.write(group, chunk)
        self.buffers.give_back(chunk)

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
class StagedDataset:
    """One dataset group and its arrays: the group is created and written by the thread that writes."""

    rate_kind: str
    buffers: ChunkBuffers
    group: h5py.Group | None = None
    columns: dict[str, Column] = field(default_factory=dict)
    room: int = 0
    """Rows fewer than which every array's stage takes without completing a chunk (`copy_in`)."""

    def stage(
        self, arrays: dict[str, np.ndarray], group: h5py.Group | None = None, placed: Placed | None = None
    ) -> list[tuple[Column, np.ndarray]]:
        """Stage a batch (the same arrays, in the same order, on every batch; see `Column.stage_rows`).

        With `group`, whole chunks are written to it; without, they are returned with their columns,
        and `placed`, when given, is filled with where each array's rows went.
        """
        if len(self.columns) != len(arrays):
            self.columns = {name: Column(name, array, self.buffers) for name, array in arrays.items()}
        chunks: list[tuple[Column, np.ndarray]] = []
        for (name, column), rows in zip(self.columns.items(), arrays.values(), strict=True):
            completed = column.stage_rows(rows, group, None if placed is None else placed.setdefault(name, []))
            if completed:
                chunks += [(column, chunk) for chunk in completed]
        self.room = min(
            (column.chunk_rows - column.staged if column.stage is not None else 0 for column in self.columns.values()),
            default=0,
        )
        return chunks

    def copy_in(self, arrays: Iterable[np.ndarray], rows: int) -> Placed:
        """The usual batch, of `rows` < `room` rows: copied into the stages, nothing else to do; where it went."""
        placed: Placed = {}
        for (name, column), array in zip(self.columns.items(), arrays, strict=True):
            assert column.stage is not None  # room > rows: every column's stage exists
            copy_rows(column.stage, column.stage_bytes, column.staged, array)
            placed[name] = [(column.stage, column.staged, column.staged + rows)]
            column.staged += rows
        self.room -= rows
        return placed

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


def staged_rows(pieces: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """The rows of one array of a batch where `StagedDataset.stage` copied them (`Placed`), joined.

    A view when they are in one piece, the usual case; a copy when the batch completed a chunk.
    """
    if len(pieces) == 1:
        array, start, stop = pieces[0]
        return array[start:stop]
    return np.concatenate([array[start:stop] for array, start, stop in pieces])


def copy_rows(target: np.ndarray, target_bytes: memoryview | None, start: int, rows: np.ndarray) -> None:
    """`target[start : start + len(rows)] = rows` (same dtype and row shape), holding the GIL; `target_bytes` is `bytes_of(target)`.

    numpy lets go of the GIL while it copies more than a few hundred values. A background writer's
    thread waiting for the GIL may take it then, and keep the caller's thread waiting until its next
    system call, up to the interpreter's switch interval (5 ms): rare, but most of the time the loop
    spent in `add`. A memoryview copy of contiguous rows is one memcpy under the GIL.
    """
    source = memoryview(rows)  # type: ignore[arg-type]  # numpy's stubs declare the buffer protocol from Python 3.12
    if target_bytes is not None and source.nbytes and source.c_contiguous:
        row_bytes = target_bytes.nbytes // len(target)
        target_bytes[start * row_bytes : start * row_bytes + source.nbytes] = source.cast("B")
    else:
        target[start : start + len(rows)] = rows


def bytes_of(array: np.ndarray) -> memoryview | None:
    """A contiguous array's bytes, to copy into; None when it has none (memoryview cannot cast an empty shape)."""
    return memoryview(array).cast("B") if array.nbytes else None  # type: ignore[arg-type]  # as in copy_rows


def store_cell_ids(group: h5py.Group, ids: np.ndarray) -> None:
    if ids.dtype.kind == "U":
        group.create_dataset("cell_ids", data=ids.astype(object), dtype=h5py.string_dtype("utf-8"))
    else:
        group.create_dataset("cell_ids", data=ids)
