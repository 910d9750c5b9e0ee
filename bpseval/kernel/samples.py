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
