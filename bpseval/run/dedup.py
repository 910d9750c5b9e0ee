"""Duplicate samples across the shards of a dataset: the first copy of every sample_idx is kept."""

from __future__ import annotations

import numpy as np

from bpseval.errors import BpsevalError
from bpseval.kernel.samples import SeenSamples
from bpseval.kernel.stats import (
    MIN_RATE,
)
from bpseval.shard.format import DatasetLayout, RowChunk, ShardHeader
from bpseval.shard.reader import open_dataset

RHAT_COPY_RTOL = 4e-3
"""Relative difference between copies of one sample's rhat that counts as rounding (float16 included)."""


class _Deduplicator:
    """Keeps the first copy of every sample_idx of a dataset across its shards, in rank order.

    The parts are deduplicated as they are read, in part (rank) order: `begin(part, sample_idx)`
    before `filter`ing the part's row chunks, so no pass over every shard's sample_idx comes first.
    Copies must agree on robs and dfs (else BpsevalError); copies whose rhat differs beyond
    rounding keep the first and are reported as a warning. No copy is held in memory: the first
    copies of a chunk's later copies are read back from their shard in ranges of at most
    `window` rows, so memory stays bounded by a chunk even when every rank saw every sample.
    """

    def __init__(self, name: str, parts: list[tuple[ShardHeader, DatasetLayout]], window: int) -> None:
        self.name = name
        self.parts = parts
        self.paths = [header.path for header, _ in parts]
        self.window = window
        self.offsets = np.cumsum([0] + [layout.n_rows for _, layout in parts])
        self.seen = SeenSamples(span=4 * int(self.offsets[-1]), positions=True)
        self.part = -1
        self.later_rows = np.zeros(0, dtype=np.int64)
        """Rows (within the part begun last) of the copies that are not first, sorted, and the positions of their first copies."""
        self.first_positions = np.zeros(0, dtype=np.int64)
        self.copy_rows = np.zeros(0, dtype=np.int64)
        """Rows (within the part begun last, sorted) that are this part's one copy of a sample first seen in another
        part: a rank's padding copies, dropped from the merge but counted among what the rank saw."""
        self.copies_valid: dict[int, np.ndarray] = {}
        """Per part, the valid entries per cell of its `copy_rows`."""
        self.dropped = 0
        self.rhat_mismatches = 0
        self.first_rhat_mismatch: tuple[int, int, int] | None = None

    def begin(self, part: int, sample_idx: np.ndarray) -> None:
        """Find the copies in part `part` (the next part, in order) from its whole `sample_idx`."""
        if part != self.part + 1 or len(sample_idx) != self.offsets[part + 1] - self.offsets[part]:
            raise AssertionError(f"part {part} of {self.name!r} deduplicated out of order or with the wrong rows")
        self.part = part
        if len(sample_idx) and sample_idx.min() < 0:
            raise BpsevalError(
                f"{self.paths[part]}: dataset {self.name!r}: sample_idx has negative values (e.g. {sample_idx.min()});"
                " it must index the dataset's validation set from 0."
            )
        positions = np.arange(self.offsets[part], self.offsets[part + 1], dtype=np.int64)
        first = self.seen.first_positions(sample_idx, positions)
        self.later_rows = np.flatnonzero(first != positions)
        self.first_positions = first[self.later_rows]
        self.dropped += len(self.later_rows)
        elsewhere = self.first_positions < self.offsets[part]  # first seen in an earlier part
        _, once = np.unique(self.first_positions[elsewhere], return_index=True)  # a sample repeated here counts once
        self.copy_rows = np.sort(self.later_rows[elsewhere][once])

    @property
    def unique(self) -> np.ndarray:
        """The distinct sample_idx of the parts begun so far, sorted."""
        return self.seen.indices()

    def filter(self, part: int, chunk: RowChunk) -> RowChunk:
        """The rows of `chunk` (of the part begun last) that are first copies; later copies are checked
        against their first copies."""
        n_rows = len(chunk.rhat)
        self._count_copies(part, chunk)
        lo, hi = np.searchsorted(self.later_rows, [chunk.start, chunk.start + n_rows])
        if lo == hi:
            return chunk
        rows = self.later_rows[lo:hi] - chunk.start
        keep = np.ones(n_rows, dtype=bool)
        keep[rows] = False
        firsts = self.first_positions[lo:hi]
        first_parts = np.searchsorted(self.offsets, firsts, side="right") - 1
        for first_part in np.unique(first_parts):
            selected = first_parts == first_part
            self._compare(first_part, firsts[selected] - self.offsets[first_part], part, chunk, rows[selected])
        return RowChunk(
            chunk.start,
            chunk.rhat[keep],
            chunk.robs[keep],
            None if chunk.weights is None else chunk.weights[keep],
            None if chunk.sample_idx is None else chunk.sample_idx[keep],
        )

    def _count_copies(self, part: int, chunk: RowChunk) -> None:
        """Add the valid entries of the chunk's `copy_rows` to the part's `copies_valid`."""
        lo, hi = np.searchsorted(self.copy_rows, [chunk.start, chunk.start + len(chunk.rhat)])
        if lo == hi:
            return
        valid = (_weights(chunk, self.copy_rows[lo:hi] - chunk.start) > 0).sum(axis=0, dtype=np.int64)
        held = self.copies_valid.get(part)
        self.copies_valid[part] = valid if held is None else held + valid

    def _compare(self, first_part: int, first_rows: np.ndarray, part: int, chunk: RowChunk, rows: np.ndarray) -> None:
        """Compare later copies (`rows` of `chunk`) with their first copies (`first_rows` of part `first_part`).

        The first copies are read in ranges of at most `window` rows of their shard."""
        header, layout = self.parts[first_part]
        order = np.argsort(first_rows, kind="stable")
        with open_dataset(header.path, layout) as reader:
            start = 0
            while start < len(order):
                low = first_rows[order[start]]
                stop = start + int(np.searchsorted(first_rows[order[start:]], low + self.window))
                stop = max(stop, start + 1)
                taken = order[start:stop]
                first = reader.row_range(int(low), int(first_rows[taken].max()) + 1)
                self._check_copies(first_part, part, first, first_rows[taken] - low, chunk, rows[taken])
                start = stop

    def _check_copies(
        self, first_part: int, part: int, first: RowChunk, first_rows: np.ndarray, later: RowChunk, rows: np.ndarray
    ) -> None:
        assert later.sample_idx is not None  # only datasets with sample_idx are deduplicated
        w_a, w_b = (_weights(chunk, picked) for chunk, picked in ((first, first_rows), (later, rows)))
        robs_a, robs_b = first.robs[first_rows].astype(np.float64), later.robs[rows].astype(np.float64)
        rhat_a, rhat_b = first.rhat[first_rows].astype(np.float64), later.rhat[rows].astype(np.float64)
        valid = w_a > 0
        dfs_differ = (w_a != w_b).any(axis=1)
        robs_differ = ((robs_a != robs_b) & valid).any(axis=1)
        if (dfs_differ | robs_differ).any():
            row = int(np.flatnonzero(dfs_differ | robs_differ)[0])
            raise BpsevalError(
                f"{self.paths[part]}: dataset {self.name!r}: sample_idx {later.sample_idx[rows[row]]} also appears in"
                f" {self.paths[first_part]} with different {'dfs' if dfs_differ[row] else 'robs'}. Copies of one"
                " sample must be identical: check that sample_idx indexes this dataset's validation set."
            )
        close = np.isclose(rhat_a, rhat_b, rtol=RHAT_COPY_RTOL, atol=MIN_RATE)
        mismatch = (~close & valid).any(axis=1)
        if mismatch.any():
            if self.first_rhat_mismatch is None:
                sample = int(later.sample_idx[rows[np.flatnonzero(mismatch)[0]]])
                self.first_rhat_mismatch = (sample, first_part, part)
            self.rhat_mismatches += int(mismatch.sum())

    @property
    def rhat_mismatch(self) -> bool:
        return self.rhat_mismatches > 0

    def rhat_mismatch_message(self) -> str:
        assert self.first_rhat_mismatch is not None
        sample, first_part, later_part = self.first_rhat_mismatch
        count = self.rhat_mismatches
        return (
            f"dataset {self.name!r}: rhat differs beyond rounding between the copies of {count} duplicated"
            f" sample{'s' if count != 1 else ''} (first: sample_idx {sample} in {self.paths[first_part]} and"
            f" {self.paths[later_part]}); kept the first copy."
        )


def _weights(chunk: RowChunk, rows: np.ndarray) -> np.ndarray:
    """The weights of `rows` of `chunk` as a float64 (rows, cells) array (1 where dfs is absent)."""
    if chunk.weights is None:
        return np.ones((len(rows), chunk.rhat.shape[1]))
    return np.broadcast_to(chunk.weights[rows], (len(rows), chunk.rhat.shape[1])).astype(np.float64)
