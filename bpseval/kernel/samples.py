"""Which sample indices a rank has already scored (a sorted set, memory proportional to the samples seen), and the fingerprints of their copies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from bpseval._arrays import to_numpy


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
