"""Duplicate samples across the shards of a dataset: the first copy of every sample_idx is kept."""

from __future__ import annotations

import numpy as np

from bpseval.errors import BpsevalError
from bpseval.kernel.stats import (
    MIN_RATE,
)
from bpseval.shard.format import DatasetLayout, RowChunk, ShardHeader
from bpseval.shard.reader import read_sample_idx

RHAT_COPY_RTOL = 4e-3
"""Relative difference between copies of one sample's rhat that counts as rounding (float16 included)."""


def first_copies(sample_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct values of non-negative `sample_idx` (sorted), which positions hold the first
    copy of their value, and which hold a value that occurs more than once.

    Counts with `bincount` when the values are dense (the usual 0..N-1, in O(N)); sorts only
    the repeated values, or everything when the values are sparse.
    """
    span = int(sample_idx.max()) + 1 if len(sample_idx) else 0
    if span <= 4 * len(sample_idx) + 1024:
        counts = np.bincount(sample_idx, minlength=span)
        unique = np.flatnonzero(counts)
        repeated = counts[sample_idx] > 1
    else:
        unique, inverse, counts = np.unique(sample_idx, return_inverse=True, return_counts=True)
        repeated = counts[inverse] > 1
    keep = ~repeated
    positions = np.flatnonzero(repeated)
    keep[positions[np.unique(sample_idx[positions], return_index=True)[1]]] = True
    return unique, keep, repeated


class _Deduplicator:
    """Keeps the first copy of every sample_idx of a dataset across its shards, in rank order.

    Copies must agree on robs and dfs (else BpsevalError); copies whose rhat differs beyond
    rounding keep the first and are reported as a warning. Only the rows of repeated samples are
    held in memory.
    """

    def __init__(self, name: str, parts: list[tuple[ShardHeader, DatasetLayout]]) -> None:
        self.name = name
        self.paths = [header.path for header, _ in parts]
        indices = [read_sample_idx(header.path, layout.name) for header, layout in parts]
        for path, index in zip(self.paths, indices):
            if len(index) and index.min() < 0:
                raise BpsevalError(
                    f"{path}: dataset {name!r}: sample_idx has negative values (e.g. {index.min()}); it must index"
                    " the dataset's validation set from 0."
                )
        self.offsets = np.cumsum([0] + [len(index) for index in indices])
        self.sample_idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        self.unique, self.keep, self.repeated = first_copies(self.sample_idx)
        self.dropped = len(self.sample_idx) - len(self.unique)
        self.first_copies: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.rhat_mismatch: list[tuple[int, int, int]] = []

    def sample_idx_of(self, part: int) -> np.ndarray:
        """The sample_idx of part `part` (read once, here), to slice into its row chunks."""
        return self.sample_idx[self.offsets[part] : self.offsets[part + 1]]

    def filter(self, part: int, chunk: RowChunk) -> RowChunk:
        """The rows of `chunk` that are first copies; later copies are checked against them."""
        n_rows = len(chunk.rhat)
        positions = slice(self.offsets[part] + chunk.start, self.offsets[part] + chunk.start + n_rows)
        keep, repeated = self.keep[positions], self.repeated[positions]
        if not repeated.any():
            return chunk
        assert chunk.sample_idx is not None
        weights = (
            np.ones_like(chunk.rhat, dtype=np.float64)
            if chunk.weights is None
            else np.broadcast_to(chunk.weights, chunk.rhat.shape)
        )
        for row in np.flatnonzero(repeated):
            copy = (part, chunk.rhat[row].astype(np.float64), chunk.robs[row].astype(np.float64), weights[row].astype(np.float64))
            sample = int(chunk.sample_idx[row])
            if keep[row]:
                self.first_copies[sample] = copy
            else:
                self._compare(sample, self.first_copies[sample], copy)
        if keep.all():
            return chunk
        return RowChunk(
            chunk.start,
            chunk.rhat[keep],
            chunk.robs[keep],
            None if chunk.weights is None else chunk.weights[keep],
            chunk.sample_idx[keep],
        )

    def _compare(self, sample: int, first: tuple, later: tuple) -> None:
        first_part, rhat_a, robs_a, w_a = first
        later_part, rhat_b, robs_b, w_b = later
        valid = w_a > 0
        if not np.array_equal(w_a, w_b) or not np.array_equal(robs_a[valid], robs_b[valid]):
            what = "dfs" if not np.array_equal(w_a, w_b) else "robs"
            raise BpsevalError(
                f"{self.paths[later_part]}: dataset {self.name!r}: sample_idx {sample} also appears in"
                f" {self.paths[first_part]} with different {what}. Copies of one sample must be identical:"
                " check that sample_idx indexes this dataset's validation set."
            )
        if not np.allclose(rhat_a[valid], rhat_b[valid], rtol=RHAT_COPY_RTOL, atol=MIN_RATE):
            self.rhat_mismatch.append((sample, first_part, later_part))

    def rhat_mismatch_message(self) -> str:
        sample, first_part, later_part = self.rhat_mismatch[0]
        count = len(self.rhat_mismatch)
        return (
            f"dataset {self.name!r}: rhat differs beyond rounding between the copies of {count} duplicated"
            f" sample{'s' if count != 1 else ''} (first: sample_idx {sample} in {self.paths[first_part]} and"
            f" {self.paths[later_part]}); kept the first copy."
        )
