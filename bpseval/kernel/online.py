"""The online metric's state on one rank, on the array API: sums, held-back rows, samples seen.

`DistributedBPS` (bpseval/torch.py) is a thin layer of collectives over this: each rank keeps an
`OnlineDataset` per dataset, fed by `add_batch` with batches the batch contract checked, and at
`compute()` the ranks exchange `RankSummary`s and their samples seen, and `cross_rank_duplicates`
decides, identically on every rank, which held-back rows to drop. Numpy arrays or tensors of any
array-API namespace; nothing here imports torch or waits for a device but where it says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from bpseval._arrays import is_tensor, to_numpy
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.kernel.batch import Batch, BatchLayout
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.samples import SampleFingerprints, SeenSamples, row_fingerprints
from bpseval.kernel.stats import (
    InvalidValuesError,
    check_labels,
    find_invalid_values,
    reduce_rows,
    screen_values,
    unchecked_batch_stats,
)


@dataclass
class RankSummary:
    """What a rank tells the others about one dataset before the statistics are gathered."""

    layout: BatchLayout
    rows: int
    """Rows given (duplicates included)."""
    cell_ids: np.ndarray | None
    skipped: int
    n_seen: int
    tail_idx: np.ndarray
    invalid: InvalidBatches | None = None
    conflict: int | None = None
    """A sample index this rank was given twice with different robs or dfs."""


@dataclass(frozen=True)
class InvalidBatches:
    """Which value checks failed in a dataset's batches on one rank, read from the device at `compute()`."""

    batches: tuple[int, ...]
    """Per check of `check_labels`: how many batches failed it."""
    first: int
    """The first batch (counting this dataset's `update` calls on the rank from 0) that failed any."""


def conflicting_copies_error(name: str, sample: int, first_rank: int, rank: int) -> BpsevalError:
    where = f"twice on rank {rank}" if first_rank == rank else f"on rank {first_rank} and on rank {rank}"
    return BpsevalError(
        f"dataset {name!r}: sample_idx {sample} was given {where} with different robs or dfs. Copies of one"
        " sample must be identical: sample_idx has to be the sample's index in the dataset's validation set"
        " (e.g. from bpseval.torch.WithSampleIndex), not its position in the batch."
    )


def invalid_values_error(name: str, rank: int, invalid: InvalidBatches, rate_kind: str) -> ArgumentError:
    found = "; ".join(
        f"{array} {problem} in {count} batch{'es' if count != 1 else ''}"
        for (array, problem), count in zip(check_labels(rate_kind), invalid.batches, strict=True)
        if count
    )
    return ArgumentError(
        f"dataset {name!r}: DistributedBPS.update was given invalid values on rank {rank} (first in batch"
        f" {invalid.first} of that dataset there, counting from 0): {found}. The row and cell are not known"
        " online: the values are checked on the device without waiting for it; DistributedBPS(validate='eager')"
        " makes update() raise at the bad batch and name them. Fix the model output or the data, or mark those"
        " entries invalid with dfs = 0 (rates must be finite and >= 0, spike counts finite and >= 0, dfs in"
        " [0, 1]), then reset() the metric."
    )


@dataclass(frozen=True)
class HeldRows:
    """Screened rows of one dataset as `update` was given them (weights None: every entry valid)."""

    rhat: Any
    robs: Any
    weights: Any

    def __len__(self) -> int:
        return self.rhat.shape[0]

    def part(self, rows: slice) -> HeldRows:
        return HeldRows(*(None if values is None else values[rows] for values in (self.rhat, self.robs, self.weights)))

    def copy(self) -> HeldRows:
        """Rows that share no memory with a batch (a caller may reuse its tensors; a batch is not kept alive)."""
        return HeldRows(
            *(None if values is None else array_copy(values) for values in (self.rhat, self.robs, self.weights))
        )

    def then(self, later: HeldRows) -> HeldRows:
        """These rows followed by `later`'s (weights of 1 where one of them has none)."""
        if self.weights is None and later.weights is None:
            weights = None
        else:
            weights = concat_rows(*(rows.full_weights(like) for rows, like in ((self, later), (later, self))))
        return HeldRows(concat_rows(self.rhat, later.rhat), concat_rows(self.robs, later.robs), weights)

    def full_weights(self, like: HeldRows) -> Any:
        """The weights as a (rows, cells) array; ones, in the dtype of `like`'s, when there are none."""
        xp, shape = array_namespace(self.rhat), tuple(self.rhat.shape)
        if self.weights is None:
            return xp.ones(shape, dtype=like.weights.dtype, device=device(self.rhat))
        return xp.broadcast_to(self.weights, shape)

    def stats(self, rate_kind: str) -> CellStats:
        return unchecked_batch_stats(self.rhat, self.robs, self.weights, rate_kind)

    def row_stats(self, rate_kind: str) -> CellStats:
        return row_stats(self.rhat, self.robs, self.weights, rate_kind)


@dataclass
class OnlineDataset:
    """One dataset on this rank: sums of the scored rows, plus its last scored rows, held back.

    The held-back rows are kept as given (`held`), so that each batch adds to the sums with one
    reduction, the rows held back before included; their per-row statistics (`tail`) are made only
    when asked for, at `compute()` and `state_dict()`. A state loaded from `state_dict()` holds
    those instead (`carried`), older than any row in `held`.
    """

    rate_kind: str
    has_sample_idx: bool
    cell_ids: np.ndarray | None
    total: CellStats
    carried: CellStats
    """Per-row statistics of held-back rows that came from a saved state: (rows, cells)."""
    tail_idx: np.ndarray
    """The sample indices of the held-back rows: `carried`'s, then `held`'s."""
    seen: SeenSamples
    fingerprints: SampleFingerprints = dataclass_field(default_factory=SampleFingerprints)
    """Each copy's fingerprint of robs and dfs (with sample_idx): copies that differ are refused at `compute()`."""
    rows: int = 0
    skipped: int = 0
    batches: int = 0
    held: HeldRows | None = None
    problems: Any = None
    """Device int64 array: per check of `check_labels`, the batches that failed it (None: no batch recorded)."""
    first_problem: Any = None
    """Device int64 scalar: the first batch that failed any check, -1 while none has."""

    @classmethod
    def empty(cls, rate_kind: str, has_sample_idx: bool, like: HeldRows) -> OnlineDataset:
        """A state with no rows, whose statistics have the namespace and device of `like`'s arrays."""
        none = like.part(slice(0, 0))
        no_index = np.zeros(0, dtype=np.int64)
        return cls(
            rate_kind, has_sample_idx, None, none.stats(rate_kind), none.row_stats(rate_kind), no_index, SeenSamples()
        )

    @classmethod
    def add_batch(cls, datasets: dict[str, OnlineDataset], batch: Batch, window: int, eager: bool) -> None:
        """Add `batch` to its dataset in `datasets` (created by its first batch); the batch contract checked it.

        Rows whose sample this rank saw before are skipped (their fingerprints are kept, to compare at
        `compute()`); the others are screened on their device. `eager` waits for the screen and raises
        ArgumentError at a bad batch, naming its row and cell, with nothing changed; otherwise the
        findings are recorded on the device. The last `window` samples stay held back (with sample_idx).
        """
        dataset, rate_kind = batch.dataset, batch.rate_kind
        state = datasets.get(dataset)
        rhat, robs, weights, index, ids = batch.rhat, batch.robs, batch.weights, batch.sample_idx, batch.cell_ids
        n_rows = batch.n_rows
        seen = state.seen if state is not None else SeenSamples()
        rows = np.arange(n_rows) if index is None else np.flatnonzero(seen.first_sightings(index))
        if len(rows) < n_rows:
            rhat, robs, weights = (None if x is None else take_rows(x, rows) for x in (rhat, robs, weights))
        screened = screen_values(rhat, robs, weights, rate_kind)
        if eager and bool(array_namespace(screened.problems).any(screened.problems)):
            problems = find_invalid_values(
                to_numpy(rhat), to_numpy(robs), None if weights is None else to_numpy(weights), rate_kind
            )
            problems = [replace(problem, first_row=int(rows[problem.first_row])) for problem in problems]
            raise ArgumentError(f"dataset {dataset!r}: {InvalidValuesError(problems)}")

        kept = HeldRows(screened.rhat, screened.robs, screened.weights)
        if state is None:
            state = datasets[dataset] = OnlineDataset.empty(rate_kind, index is not None, kept)
        held = window if index is not None else 0
        state.add(kept, None if index is None else index[rows], n_rows, held)
        if index is not None:  # every copy's fingerprint, the dropped ones too: compute() compares them
            state.fingerprints.add(index, row_fingerprints(batch.robs, batch.weights))
        if not eager:
            state.record_problems(screened.problems)
        if ids is not None and state.cell_ids is None:
            state.cell_ids = ids

    @property
    def n_cells(self) -> int:
        return self.total.n_valid.shape[0]

    @property
    def tail(self) -> CellStats:
        """Per-row statistics of the held-back rows, oldest first: (rows, cells)."""
        if self.held is None:
            return self.carried
        return map_stats(concat_rows, self.carried, self.held.row_stats(self.rate_kind))

    @property
    def layout(self) -> BatchLayout:
        """What the dataset's first batch fixed: later batches follow it (`Batch.of`), dfs's shape aside."""
        return BatchLayout(self.n_cells, self.rate_kind, None, self.has_sample_idx)

    def add(self, kept: HeldRows, index: np.ndarray | None, n_given: int, window: int) -> None:
        """Add a batch's kept rows (`index`: their sample indices, None without sample_idx).

        Of the rows held back and `kept`, all but the dataset's last `window` go into the sums, in
        one reduction of the given rows (and a merge of the carried per-row statistics, after a load).
        """
        if index is None:
            self.total = self.total + kept.stats(self.rate_kind)
        else:
            held = kept if self.held is None else self.held.then(kept)
            n_carried = self.carried.n_valid.shape[0]
            fold = max(0, n_carried + len(held) - window)
            from_carried = min(fold, n_carried)
            if from_carried:
                self.total = self.total + reduce_rows(map_stats(lambda rows: rows[:from_carried], self.carried))
                self.carried = map_stats(lambda rows: rows[from_carried:], self.carried)
            from_held = fold - from_carried
            if from_held:
                self.total = self.total + held.part(slice(0, from_held)).stats(self.rate_kind)
            self.held = held.part(slice(from_held, len(held))).copy()
            self.tail_idx = np.concatenate([self.tail_idx, index])[fold:]
            self.seen.add(index)
        self.rows += n_given
        self.skipped += n_given - (n_given if index is None else len(index))
        self.batches += 1

    def record_problems(self, failed: Any) -> None:
        """Count, on the device, the checks this batch (the latest added) failed, and remember the first such batch."""
        xp = array_namespace(failed)
        if self.problems is None:
            self.problems = xp.zeros(failed.shape, dtype=xp.int64, device=device(failed))
            self.first_problem = xp.full((), -1, dtype=xp.int64, device=device(failed))
        self.problems = self.problems + xp.astype(failed, xp.int64)
        self.first_problem = xp.where((self.first_problem < 0) & xp.any(failed), self.batches - 1, self.first_problem)

    def invalid_batches(self) -> InvalidBatches | None:
        """The checks that failed, read from the device (waits for it), or None when every batch passed."""
        if self.problems is None:
            return None
        counts = to_numpy(self.problems)
        if not counts.any():
            return None
        return InvalidBatches(tuple(int(count) for count in counts), int(to_numpy(self.first_problem)))

    def total_without(self, held_back: np.ndarray) -> CellStats:
        """The sums with the held-back rows added, except those flagged in `held_back`."""
        keep = np.flatnonzero(~held_back)
        return self.total + reduce_rows(map_stats(lambda rows: take_rows(rows, keep), self.tail))

    def summary(self) -> RankSummary:
        """What this rank tells the others about the dataset; reads the device (checks and fingerprints)."""
        _, _, conflict = self.fingerprints.by_sample()
        return RankSummary(
            self.layout,
            self.rows,
            self.cell_ids,
            self.skipped,
            len(self.seen),
            self.tail_idx,
            self.invalid_batches(),
            conflict,
        )


def row_stats(rhat: Any, robs: Any, weights: Any, rate_kind: str) -> CellStats:
    """`unchecked_batch_stats` of each row of a screened batch on its own, as (rows, cells) arrays.

    The batch is flattened into one row in which every entry is its own cell, so one call of
    the shared implementation yields every entry's contribution; summing over rows gives
    exactly what it gives for the batch.
    """
    n_rows, n_cells = rhat.shape
    xp = array_namespace(rhat)

    def flat(array: Any) -> Any:  # no entry: a (0, 0) batch, which batch_stats scores as empty
        return xp.reshape(array, (int(n_rows * n_cells > 0), n_rows * n_cells))

    w = None if weights is None else flat(xp.broadcast_to(weights, (n_rows, n_cells)))
    entries = unchecked_batch_stats(flat(rhat), flat(robs), w, rate_kind)
    return map_stats(lambda values: xp.reshape(values, (n_rows, n_cells)), entries)


def map_stats(function: Callable[..., Any], *stats: CellStats) -> CellStats:
    """Apply `function` field by field to one or more CellStats."""
    return CellStats(**{name: function(*(getattr(s, name) for s in stats)) for name in STAT_FIELDS})


def array_copy(values: Any) -> Any:
    return values.clone() if is_tensor(values) else np.array(values)


def concat_rows(first: Any, second: Any) -> Any:
    return array_namespace(first, second).concat([first, second], axis=0)


def take_rows(array: Any, rows: np.ndarray) -> Any:
    xp = array_namespace(array)
    return xp.take(array, xp.asarray(rows, device=device(array)), axis=0)


def cross_rank_duplicates(
    name: str, seen: list[np.ndarray], prints: list[np.ndarray], tails: list[np.ndarray], window: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The samples scored on any rank (sorted), and for each rank those of its samples a lower rank saw too.

    Args:
        name: the dataset, for messages.
        seen: per rank, the sorted distinct sample indices it saw.
        prints: per rank, their fingerprints (`SampleFingerprints.by_sample`).
        tails: per rank, the sample indices of its held-back rows.
        window: the held-back rows per rank (`dedup_window`), for messages.

    Raises:
        BpsevalError: when copies of a sample differ (the offline merge's rule), or a duplicate is not held
            back; the same on every rank, which all call this with the same gathered arrays.
    """
    duplicates, below, below_prints = [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for rank, (values, rank_prints) in enumerate(zip(seen, prints, strict=True)):
        common, here, there = np.intersect1d(values, below, assume_unique=True, return_indices=True)
        differ = np.flatnonzero(rank_prints[here] != below_prints[there])
        if len(differ):
            sample = common[differ[0]]
            lower = next(other for other in range(rank) if np.isin(sample, seen[other]))
            raise conflicting_copies_error(name, int(sample), lower, rank)
        duplicates.append(common)
        below, order = np.unique(np.concatenate([below, values]), return_index=True)
        below_prints = np.concatenate([below_prints, rank_prints])[order]
    for rank, tail in enumerate(tails):
        lost = np.setdiff1d(duplicates[rank], tail)
        if len(lost):
            lower = next(other for other in range(rank) if np.isin(lost[0], seen[other]))
            raise BpsevalError(
                f"dataset {name!r}: sample_idx {lost[0]} was scored on rank {lower} and again on rank {rank}"
                f" ({len(lost)} such sample{'s' if len(lost) != 1 else ''} on rank {rank}), but not among the"
                f" last {window} samples rank {rank} scored, so its contribution can no longer be"
                " removed. DistributedBPS removes the padding copies DistributedSampler appends; give each"
                " sample to one rank (e.g. bpseval.CellBalancedDistributedSampler), raise dedup_window, or"
                " write shards and run `bpseval compute`, which removes any duplicate."
            )
    return below, duplicates
