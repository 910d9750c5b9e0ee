"""The sample indices seen so far, one structure for the online metric and the offline merge's duplicate removal
(`SeenSamples`), and the fingerprints of their copies."""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from bpseval._arrays import to_numpy

TABLE_FLOOR = 1024
"""Entries a `SeenSamples` table may always have, whatever the indices seen."""
TABLE_BYTES_PER_SAMPLE = 8
"""Beyond `TABLE_FLOOR` (and the caller's span), a table costs at most this per index seen; else sorted arrays."""
RECENT_FLOOR = 1024
"""Recent additions held apart from the sorted array up to this many, or a quarter of it."""


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


class SeenSamples:
    """The non-negative sample indices seen so far; with `positions`, also where each one's first copy was.

    The online metric asks which rows of a batch are first sightings and adds them (`first_sightings`,
    `add`); the offline merge records each part's rows with their positions and asks where each sample's
    first copy is (`first_positions`). Two forms, chosen as indices come:

    - a table indexed by sample (bool; with positions, the position, -1 for none) while the largest index
      stays below the greatest of `span`, `TABLE_FLOOR` and the entries that cost `TABLE_BYTES_PER_SAMPLE`
      per index seen (the usual 0..N-1: O(1) per index, 1 byte per entry, 8 with positions);
    - past that, a sorted array plus a smaller sorted array of recent additions (merged into it when they
      grow past a quarter of it) and, with positions, theirs: 8 bytes per index seen (16 with positions)
      whatever the largest index, two binary searches per lookup, O(N log N) to add N indices. A merge
      that finds the indices dense enough for a table goes back to one (0..N-1 shuffled starts sparse).

    Args:
        span: a table may cover indices below this (the merge gives 4 per row of the dataset).
        positions: keep each index's first position (`first_positions`) rather than a plain set (`add`).
    """

    def __init__(self, span: int = 0, positions: bool = False) -> None:
        self.span = span
        self.positions = positions
        self._table_dtype = np.dtype(np.int64) if positions else np.dtype(bool)
        self.table: np.ndarray | None = np.full(0, -1 if positions else False, dtype=self._table_dtype)
        self.count = 0
        """Indices in the table."""
        self.sorted, self.recent = _empty(), _empty()
        self.sorted_at: np.ndarray | None = _empty() if positions else None
        self.recent_at: np.ndarray | None = _empty() if positions else None
        """With positions: the first position of each entry of `sorted` and of `recent`."""

    def __len__(self) -> int:
        return self.count if self.table is not None else len(self.sorted) + len(self.recent)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held."""
        arrays = (self.table, self.sorted, self.recent, self.sorted_at, self.recent_at)
        return sum(array.nbytes for array in arrays if array is not None)

    @classmethod
    def from_indices(cls, indices: np.ndarray) -> SeenSamples:
        """The set of the given distinct, sorted, non-negative indices (the inverse of `indices()`)."""
        seen = cls()
        seen._insert(np.asarray(indices, dtype=np.int64).copy(), None)
        return seen

    def indices(self) -> np.ndarray:
        """Every index seen, sorted, each once."""
        self._merge()
        if self.table is not None:
            return np.flatnonzero(self._held(self.table)).astype(np.int64, copy=False)
        return self.sorted

    def contains(self, index: np.ndarray) -> np.ndarray:
        """For each entry of `index`, whether it was seen."""
        return self._held(self._stored(np.asarray(index, dtype=np.int64)))

    def first_sightings(self, index: np.ndarray) -> np.ndarray:
        """Rows of `index` not seen before, nor earlier in `index` itself (nothing is added)."""
        new = np.zeros(len(index), dtype=bool)
        new[np.unique(index, return_index=True)[1]] = True
        return new & ~self.contains(index)

    def add(self, index: np.ndarray) -> None:
        """Add the non-negative entries of `index` (a set without positions)."""
        if self.positions:
            raise TypeError("a SeenSamples with positions records indices with first_positions")
        new = np.unique(np.asarray(index, dtype=np.int64))
        self._insert(new[~self.contains(new)], None)

    def first_positions(self, index: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Record the rows of a part and give, for each, where its index's first copy is.

        Args:
            index: (rows,) non-negative sample indices.
            positions: (rows,) int64 positions of the rows, increasing, after every position recorded before.

        Returns:
            (rows,) int64: the position of each row's first copy, among those recorded before and these.
        """
        if not self.positions:
            raise TypeError("a SeenSamples without positions records indices with add")
        index = np.asarray(index, dtype=np.int64)
        if not len(index):
            return positions
        if self._fits(int(index.max()), len(index)):
            return self._table_first_positions(index, positions)
        first = self._stored(index)
        new = first < 0
        distinct, first_row, inverse = np.unique(index[new], return_index=True, return_inverse=True)
        new_positions = positions[new][first_row]
        first[new] = new_positions[inverse]
        self._insert(distinct, new_positions)
        return first

    def _table_first_positions(self, index: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """`first_positions` in the table, which holds every index: O(1) per row, no sort unless an index repeats."""
        assert self.table is not None
        first = self.table[index]
        new = first < 0
        every = bool(new.all())
        new_index, new_positions = (index, positions) if every else (index[new], positions[new])
        self.table[new_index] = new_positions  # with repeats among them, any copy may be stored
        stored = self.table[new_index]
        if (stored != new_positions).any():  # an index repeated among the new ones: its first copy is the first
            distinct, first_row = np.unique(new_index, return_index=True)
            self.table[distinct] = new_positions[first_row]
            stored = self.table[new_index]
            self.count += len(distinct)
        else:
            self.count += len(new_index)
            if every:
                return positions
        first[new] = stored
        return first

    def _held(self, stored: np.ndarray) -> np.ndarray:
        """Whether the values of the table (or `_stored`'s) mean an index held."""
        return stored >= 0 if self.positions else stored

    def _stored(self, index: np.ndarray) -> np.ndarray:
        """For each entry of `index`: with positions its first position (-1 if not held), else whether it is held."""
        absent = -1 if self.positions else False
        if self.table is not None:
            if not len(index) or (int(index.min()) >= 0 and int(index.max()) < len(self.table)):
                return self.table[index]
            inside = (index >= 0) & (index < len(self.table))
            stored = np.full(len(index), absent, dtype=self.table.dtype)
            stored[inside] = self.table[index[inside]]
            return stored
        in_sorted, at_sorted = _lookup(self.sorted, index)
        in_recent, at_recent = _lookup(self.recent, index)
        if self.sorted_at is None or self.recent_at is None:
            return in_sorted | in_recent
        stored = np.full(len(index), -1, dtype=np.int64)
        stored[in_sorted] = self.sorted_at[at_sorted[in_sorted]]
        stored[in_recent] = self.recent_at[at_recent[in_recent]]
        return stored

    def _fits(self, largest: int, more: int) -> bool:
        """Whether the table (grown if need be) holds index `largest` with up to `more` indices more; if it
        cannot, the indices move to the sorted arrays."""
        if self.table is None:
            return False
        if largest < len(self.table):
            return True
        limit = self._table_limit(more)
        if largest < limit:
            size = min(limit, max(largest + 1, 2 * len(self.table)))
            grown = np.full(size, -1 if self.positions else False, dtype=self.table.dtype)
            grown[: len(self.table)] = self.table
            self.table = grown
            return True
        self.sorted = np.flatnonzero(self._held(self.table)).astype(np.int64, copy=False)
        if self.positions:
            self.sorted_at = self.table[self.sorted]
        self.table = None
        return False

    def _table_limit(self, more: int) -> int:
        """The entries a table may have once up to `more` indices more are held."""
        per_sample = TABLE_BYTES_PER_SAMPLE // (8 if self.positions else 1)
        return max(self.span, TABLE_FLOOR, per_sample * (len(self) + more))

    def _insert(self, new: np.ndarray, positions: np.ndarray | None) -> None:
        """Add the sorted distinct indices `new`, none held yet, with their first `positions` (None without)."""
        if not len(new):
            return
        if self._fits(int(new[-1]), len(new)):
            assert self.table is not None
            self.table[new] = True if positions is None else positions
            self.count += len(new)
            return
        at = np.searchsorted(self.recent, new)
        self.recent = np.insert(self.recent, at, new)
        if self.recent_at is not None and positions is not None:
            self.recent_at = np.insert(self.recent_at, at, positions)
        if len(self.recent) > max(RECENT_FLOOR, len(self.sorted) // 4):
            self._merge()

    def _merge(self) -> None:
        """The recent additions into the sorted array (the two hold no index in common); back to a table when the
        indices have become dense enough (0..N-1 in a shuffled order starts sparse)."""
        if len(self.recent):
            at = np.searchsorted(self.sorted, self.recent)
            self.sorted = np.insert(self.sorted, at, self.recent)
            if self.sorted_at is not None and self.recent_at is not None:
                self.sorted_at, self.recent_at = np.insert(self.sorted_at, at, self.recent_at), _empty()
            self.recent = _empty()
        if self.table is None and len(self.sorted) and int(self.sorted[-1]) < self._table_limit(0):
            self.table = np.full(int(self.sorted[-1]) + 1, -1 if self.positions else False, dtype=self._table_dtype)
            self.table[self.sorted] = True if self.sorted_at is None else self.sorted_at
            self.count, self.sorted = len(self.sorted), _empty()
            if self.sorted_at is not None:
                self.sorted_at = _empty()


def _lookup(values: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each entry of `index`, whether the sorted array `values` holds it, and where it would be."""
    if not len(values):
        return np.zeros(len(index), dtype=bool), np.zeros(len(index), dtype=np.int64)
    at = np.minimum(np.searchsorted(values, index), len(values) - 1)
    return values[at] == index, at


_MIX = np.random.default_rng(0x6270736576616C).integers(1, 1 << 62, size=(2, 1 << 12), dtype=np.int64) * 2 + 1
"""Odd 64-bit multipliers, one per cell and side (mask, counts): fingerprints of rows that differ anywhere differ."""
_MULTIPLIERS: dict[tuple[int, str, str], tuple[Any, int]] = {}


def row_fingerprints(robs: Any, weights: Any) -> Any:
    """An int64 fingerprint of each row's weights and of its counts at valid entries, on the batch's device.

    Copies of one sample must carry the same weights everywhere and the same counts where valid (the
    offline merge's rule). Rows that do get the same fingerprint, always: it is exact integer arithmetic
    (wrapping) on the float64 bit patterns, so it depends neither on the order of a sum, nor on the
    device or the input dtype. Rows that do not get different ones but with a probability of about 2^-44
    (each value's bits are folded onto themselves, then weighted by odd per-cell multipliers). Computed
    without waiting for the device.

    Args:
        robs: (rows, cells) counts, numpy or a tensor.
        weights: (rows, cells) or (rows, 1) weights, or None (every entry valid, as weights of 1).

    Returns:
        (rows,) int64 array in `robs`'s namespace and device.
    """
    xp = array_namespace(robs)
    on = device(robs)
    n_cells = robs.shape[1]
    key = (n_cells, xp.__name__, str(on))
    if key not in _MULTIPLIERS:  # made once per shape and device: a copy to the device, never from it
        columns = np.arange(n_cells) % _MIX.shape[1]
        multipliers = _MIX[:, columns] + 2 * (np.arange(n_cells) // _MIX.shape[1])
        unit = np.full(n_cells, np.float64(1.0).view(np.int64), dtype=np.int64)
        all_valid = int((_folded_in_place(unit) * multipliers[0]).sum())  # the weights' part when every weight is 1
        _MULTIPLIERS[key] = (xp.asarray(multipliers, device=on), all_valid)
    multipliers, all_valid = _MULTIPLIERS[key]
    # copies of our own, changed in place: a temporary per step would cost more than the arithmetic
    if isinstance(robs, np.ndarray):
        counts = robs.astype(np.float64)  # a copy, whatever robs's dtype
        if weights is not None:
            np.copyto(counts, 0.0, where=np.broadcast_to(~(weights > 0), counts.shape))
        mask = None if weights is None else np.broadcast_to(weights, counts.shape).astype(np.float64)
    else:  # a tensor: copies made with torch's own calls (the array API has no in-place ones)
        counts = robs.to(dtype=_float64_of(robs), copy=True)
        mask = None
        if weights is not None:
            counts.masked_fill_((weights > 0).logical_not().expand_as(counts), 0.0)
            mask = counts.new_empty(counts.shape).copy_(weights.expand_as(counts))
    counts += 0.0  # turns -0.0 into 0.0
    prints = _folded_in_place(_bits(counts))
    prints *= multipliers[1, :]
    if mask is None:
        return prints.sum(1) + all_valid
    weighted = _folded_in_place(_bits(mask))
    weighted *= multipliers[0, :]
    prints += weighted
    return prints.sum(1)


def _float64_of(tensor: Any) -> Any:
    """torch.float64, without importing torch here (only reached with a tensor)."""
    import torch

    return torch.float64


def _folded_in_place(bits: Any) -> Any:
    """int64 bit patterns with their high half folded onto their low half, written over `bits`: float64 values of
    small integers differ in their top bits only, and an odd multiplier would keep their low bits zero."""
    bits ^= bits >> 29
    return bits


def _bits(values: Any) -> Any:
    """The float64 array's bit patterns as int64 (a view, no copy)."""
    if isinstance(values, np.ndarray):
        return values.view(np.int64)
    import torch  # only reached with tensors, so torch is loaded already

    return values.view(torch.int64)


class SampleFingerprints:
    """The fingerprint of every copy of every sample a rank was given, to refuse copies that differ.

    Sample indices are kept on the host, fingerprints where the batches live until they are asked
    for: 16 bytes per row given since then. Asking (`by_sample`) reads them once and keeps one per
    sample (and the conflict found, if any), so a later ask reads only the rows given since.
    """

    def __init__(self) -> None:
        self._index: list[np.ndarray] = []
        self._prints: list[Any] = []
        self._conflict: int | None = None

    def add(self, index: np.ndarray, prints: Any) -> None:
        """Record rows with sample indices `index` and fingerprints `prints` (from `row_fingerprints`)."""
        self._index.append(np.asarray(index, dtype=np.int64))
        self._prints.append(prints)

    def by_sample(self) -> tuple[np.ndarray, np.ndarray, int | None]:
        """(sorted distinct indices, their fingerprints, the smallest index given twice with different fingerprints
        or None).

        Reads the fingerprints given since the last call from their device (waits for it).
        """
        if not self._index:
            return _empty(), _empty(), self._conflict
        index = np.concatenate(self._index)
        prints = np.concatenate([np.asarray(to_numpy(part), dtype=np.int64) for part in self._prints])
        order = np.lexsort((prints, index))
        index, prints = index[order], prints[order]
        same_sample = index[1:] == index[:-1]
        conflicts = np.flatnonzero(same_sample & (prints[1:] != prints[:-1]))
        if len(conflicts):
            found = int(index[conflicts[0]])
            self._conflict = found if self._conflict is None else min(self._conflict, found)
        first = np.r_[True, ~same_sample]
        self._index, self._prints = [index[first]], [prints[first]]  # one per sample, on the host from now
        return index[first], prints[first], self._conflict

    @classmethod
    def from_samples(cls, index: np.ndarray, prints: np.ndarray) -> SampleFingerprints:
        """The fingerprints `by_sample()` gave (a saved state)."""
        fingerprints = cls()
        if len(index):
            fingerprints.add(index, np.asarray(prints, dtype=np.int64))
        return fingerprints
