"""Which sample indices a rank has already scored: a growable bitmap, one bit per index."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SeenSamples:
    """A set of non-negative sample indices as a bitmap (little-endian bit order, as np.packbits)."""

    bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))
    n_bits: int = 0
    """One past the largest index added."""

    def contains(self, index: np.ndarray) -> np.ndarray:
        inside = index < 8 * len(self.bytes)
        found = np.zeros(len(index), dtype=bool)
        found[inside] = (self.bytes[index[inside] >> 3] >> (index[inside] & 7)) & 1 == 1
        return found

    def first_sightings(self, index: np.ndarray) -> np.ndarray:
        """Rows of `index` not seen before, nor earlier in `index` itself (nothing is added)."""
        new = np.zeros(len(index), dtype=bool)
        new[np.unique(index, return_index=True)[1]] = True
        return new & ~self.contains(index)

    def add(self, index: np.ndarray) -> None:
        if not len(index):
            return
        self.n_bits = max(self.n_bits, int(index.max()) + 1)
        needed = (self.n_bits + 7) // 8
        if needed > len(self.bytes):  # double, so that growing costs O(samples) in all
            grown = np.zeros(max(needed, 2 * len(self.bytes)), dtype=np.uint8)
            grown[: len(self.bytes)] = self.bytes
            self.bytes = grown
        np.bitwise_or.at(self.bytes, index >> 3, (1 << (index & 7)).astype(np.uint8))

    def indices(self) -> np.ndarray:
        """The indices in the set, sorted, as int64: a form that does not depend on how the set is stored."""
        return np.flatnonzero(np.unpackbits(self.bytes, count=self.n_bits, bitorder="little")).astype(np.int64)

    @classmethod
    def from_indices(cls, indices: np.ndarray) -> SeenSamples:
        """The set of the given non-negative int64 indices (the inverse of `indices()`)."""
        seen = cls()
        seen.add(np.asarray(indices, dtype=np.int64))
        return seen
