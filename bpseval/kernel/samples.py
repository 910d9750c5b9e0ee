"""Which sample indices a rank has already scored: a sorted set, memory proportional to the samples seen."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class SeenSamples:
    """A set of non-negative sample indices, 8 bytes per index seen whatever the largest index.

    Held as a sorted array plus a smaller sorted array of recent additions, merged when the
    latter grows past a quarter of the former, so that adding N indices in batches costs
    O(N log N) in all and membership is two binary searches.
    """

    sorted: np.ndarray = field(default_factory=_empty)
    recent: np.ndarray = field(default_factory=_empty)

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def indices(self) -> np.ndarray:
        """Every index added, sorted, each once."""
        self._merge()
        return self.sorted

    @classmethod
    def from_indices(cls, indices: np.ndarray) -> SeenSamples:
        """The set of the given distinct, sorted, non-negative indices (the inverse of `indices()`)."""
        return cls(sorted=np.asarray(indices, dtype=np.int64).copy())

    def contains(self, index: np.ndarray) -> np.ndarray:
        return _member(self.sorted, index) | _member(self.recent, index)

    def first_sightings(self, index: np.ndarray) -> np.ndarray:
        """Rows of `index` not seen before, nor earlier in `index` itself (nothing is added)."""
        new = np.zeros(len(index), dtype=bool)
        new[np.unique(index, return_index=True)[1]] = True
        return new & ~self.contains(index)

    def add(self, index: np.ndarray) -> None:
        if not len(index):
            return
        self.recent = _with(self.recent, np.asarray(index, dtype=np.int64))
        if len(self.recent) > max(1024, len(self.sorted) // 4):
            self._merge()

    def _merge(self) -> None:
        if len(self.recent):
            self.sorted, self.recent = _with(self.sorted, self.recent), _empty()


def _with(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The sorted distinct `values` with the entries of `index` they lack, still sorted and distinct.

    Inserted at their binary-search positions: a copy of `values`, where `union1d` would sort them again.
    """
    new = np.unique(index)
    new = new[~_member(values, new)]
    return np.insert(values, np.searchsorted(values, new), new)


def _member(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """For each entry of `index`, whether the sorted array `values` holds it."""
    if not len(values):
        return np.zeros(len(index), dtype=bool)
    position = np.minimum(np.searchsorted(values, index), len(values) - 1)
    return values[position] == index
