"""Exact bits per spike inside a torch.distributed job: `DistributedBPS` and `WithSampleIndex`.

`DistributedBPS` is the online twin of "write shards, then `bpseval compute`": each rank reduces
its batches to per-cell sufficient statistics with `bpseval.kernel.stats.batch_stats`, and `compute()`
gathers every rank's statistics into the `MergedDataset`s the offline merge builds and scores them
with the same `score`. Both paths share the math, so they agree up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from bpseval._arrays import is_tensor, to_numpy
from bpseval._distributed import missing_torch
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.kernel.batch import Batch, BatchLayout, check_dataset_name
from bpseval.kernel.samples import SampleFingerprints, SeenSamples, row_fingerprints
from bpseval.kernel.stats import (
    RATE_KINDS,
    STAT_FIELDS,
    CellStats,
    InvalidValuesError,
    check_labels,
    find_invalid_values,
    reduce_rows,
    screen_values,
    unchecked_batch_stats,
)
from bpseval.kernel.sums import ImpossibleSumsError, checked_sums
from bpseval.run.merge import MergedDataset, dataset_identity
from bpseval.run.scored import score
from bpseval.shard.format import DatasetLayout, check_agree
from bpseval.views.result import Result

try:
    import torch
    import torch.distributed as dist
except ImportError as error:
    raise missing_torch("bpseval.torch (DistributedBPS, WithSampleIndex)", error) from error

DEFAULT_DEDUP_WINDOW = 8
"""Samples per dataset and rank whose contributions stay removable until `compute()`."""
STATE_FORMAT = "bpseval.torch.DistributedBPS"
STATE_VERSION = 3
"""Version of the `state_dict()` layout; `load_state_dict` refuses any other. Version 2 lacked the rank, the world
size and the fingerprints of the samples seen. Version 1 held four of the
statistics (n_valid, weight, spikes, model_ll): the others cannot be rebuilt from them, so such a state
is refused, naming them, rather than resumed with pseudo_r2 and corr undefined."""
VALIDATE_MODES = ("deferred", "eager")


class DistributedBPS:
    """Exact per-cell, per-dataset and overall bits per spike over all ranks of a process group.

    `update` once per batch on every rank, `compute()` on every rank after the validation loop
    (it is a collective: every rank must call it, whatever data it saw), `reset()` before the
    next pass. Memory is O(cells) per dataset plus 8 bytes per sample seen; sums are
    float64 on the device of the tensors given. Without an initialised process group,
    `compute()` treats the process as the only rank.

    Duplicates, when `sample_idx` is given, follow the offline rule (the first copy in rank
    order is kept; within a rank, the first occurrence): a rank skips a sample it has already
    seen at `update` time, and `compute()` removes from each rank the samples that a lower
    rank also saw. For that, each rank keeps the sorted sample indices it saw, and holds
    back the per-cell contributions of its last `dedup_window` samples of each dataset (not
    yet added to its sums). `DistributedSampler` pads by repeating the first samples of its
    order, and every copy is the last sample of a higher rank than the original, so it is
    always held back (a window of 1 would do). A duplicate outside the window (a sampler that
    repeats samples elsewhere) makes `compute()` raise the same BpsevalError on every rank.

    Not checked online (the offline merge of shards does): that copies of a sample agree.

    `update` never waits for the device (no `.item()`, no copy to the host of a tensor it was
    given; `sample_idx` is read where it lives, so give it on the CPU, as DataLoader batches
    carry it). With `validate="deferred"` (the default), each batch's values are checked on
    the device and the findings kept there; `compute()` (and `state_dict()`) raise an
    ArgumentError naming the dataset, the rank, the first bad batch and the kinds of bad value,
    but not the row and cell. `validate="eager"` makes `update` wait for the check and raise at
    the bad batch, naming its first bad row and cell, with the metric unchanged.

    `state_dict()` / `load_state_dict()` checkpoint and resume each rank's state mid-validation.
    """

    def __init__(self, dedup_window: int = DEFAULT_DEDUP_WINDOW, group: Any = None, validate: str = "deferred") -> None:
        if not isinstance(dedup_window, int) or dedup_window < 1:
            raise ArgumentError(f"dedup_window must be an int >= 1, not {dedup_window!r}")
        if validate not in VALIDATE_MODES:
            raise ArgumentError(f"validate must be one of {VALIDATE_MODES}, not {validate!r}")
        self.dedup_window = dedup_window
        self.group = group
        self.validate = validate
        self._datasets: dict[str, _DatasetState] = {}

    def reset(self) -> None:
        """Forget every batch: start a new validation pass."""
        self._datasets.clear()

    def update(
        self,
        dataset: str,
        rhat: Any,
        robs: Any,
        dfs: Any = None,
        sample_idx: Any = None,
        *,
        cell_ids: Any = None,
        rate_kind: str = "rate",
    ) -> None:
        """Add one batch of `dataset`: rhat, robs (samples, cells), as `ShardWriter.add` takes them.

        Torch tensors on any device, in any float dtype (bfloat16 and float16 included, never
        rounded further), or numpy arrays. `dfs` is (samples, cells), (samples, 1) or
        (samples,); `sample_idx` (samples,) non-negative indices into that dataset's validation
        set. Raises ArgumentError (a BpsevalError, itself a ValueError) for inconsistent batches,
        naming the dataset; a batch that raises leaves the metric unchanged. Invalid values
        (NaN, infinite or negative at valid entries, dfs outside [0, 1]) raise here with
        `validate="eager"`, else at `compute()`.

        No host-device synchronisation: the checks and the sums stay on the tensors' device.
        The sample indices are bookkept on the host: given on the CPU (a tensor, numpy array or
        list) they are read there; a CUDA `sample_idx` is copied to the host, which waits for
        the device.
        """
        state = self._datasets.get(dataset)
        batch = Batch.of(
            dataset,
            rhat,
            robs,
            dfs,
            sample_idx,
            cell_ids,
            rate_kind,
            earlier=None if state is None else state.layout,
            earlier_cell_ids=None if state is None else state.cell_ids,
            same_dfs_shape=False,
        )
        rhat, robs, weights, index, ids = batch.rhat, batch.robs, batch.weights, batch.sample_idx, batch.cell_ids
        n_rows = batch.n_rows
        seen = state.seen if state is not None else SeenSamples()
        rows = np.arange(n_rows) if index is None else np.flatnonzero(seen.first_sightings(index))
        if len(rows) < n_rows:
            rhat, robs, weights = (None if x is None else _take_rows(x, rows) for x in (rhat, robs, weights))
        screened = screen_values(rhat, robs, weights, rate_kind)
        if self.validate == "eager" and bool(array_namespace(screened.problems).any(screened.problems)):
            problems = find_invalid_values(
                to_numpy(rhat), to_numpy(robs), None if weights is None else to_numpy(weights), rate_kind
            )
            problems = [replace(problem, first_row=int(rows[problem.first_row])) for problem in problems]
            raise ArgumentError(f"dataset {dataset!r}: {InvalidValuesError(problems)}")

        kept = _Rows(screened.rhat, screened.robs, screened.weights)
        if state is None:
            state = self._datasets[dataset] = _DatasetState.empty(rate_kind, index is not None, kept)
        window = self.dedup_window if index is not None else 0
        state.add(kept, None if index is None else index[rows], n_rows, window)
        if index is not None:  # every copy's fingerprint, the dropped ones too: compute() compares them
            state.fingerprints.add(index, row_fingerprints(batch.robs, batch.weights))
        if self.validate == "deferred":
            state.record_problems(screened.problems)
        if ids is not None and state.cell_ids is None:
            state.cell_ids = ids

    def compute(self, step: int = 0) -> Result:
        """Gather every rank's statistics and score them as `bpseval compute` scores shards.

        Returns the `Result` that `bpseval.evaluate` returns (files=[], `step` as given), the
        same on every rank. Collective: call it on every rank. Collectives run on the CPU for
        gloo and on the current CUDA device for NCCL (set it with `torch.cuda.set_device`).
        The metric's state is not changed.
        """
        group = _Collectives(self.group)
        summaries = group.gather_objects({name: state.summary(name) for name, state in self._datasets.items()})
        names = sorted(set().union(*summaries))
        for name in names:  # the same decision on every rank, before any other collective
            for rank, summary in enumerate(summaries):
                if name in summary and summary[name].invalid is not None:
                    raise _invalid_values_error(name, rank, summary[name].invalid, summary[name].layout.rate_kind)
                if name in summary and summary[name].conflict is not None:
                    raise _conflicting_copies_error(name, summary[name].conflict, rank, rank)
        datasets = [self._merge(name, [summary.get(name) for summary in summaries], group) for name in names]
        return Result(score(datasets, step=step, world_size=group.world_size))

    def state_dict(self) -> dict[str, Any]:
        """This rank's state, to checkpoint with `torch.save` and resume with `load_state_dict`.

        Plain data only (str, int, bool, None, lists of str, dicts and CPU or device tensors), so
        `torch.load(path, weights_only=True)` reads it back. Layout, version `STATE_VERSION`:
        `{"format", "version", "rank", "world_size", "datasets": {name: {"rate_kind", "sample_idx"
        (bool), "cell_ids" (int64 tensor, list of str or None), "arrays" ("torch" or "numpy": what
        `update` was given), "total": {field: (cells,)}, "tail": {field: (rows, cells)} (the
        held-back samples), "tail_idx", "seen" (sorted int64 sample indices), "fingerprints" (int64,
        one per index of "seen"), "rows", "skipped"}}}`, fields as in `CellStats` (n_valid int64,
        the others float64). Each rank saves its own; the state is a copy, later updates do not
        change it. Raises the error that `compute()` would when this rank was given invalid values
        or conflicting copies of a sample (such a state is no use).
        """
        group = _Collectives(self.group)
        for name, state in self._datasets.items():
            summary = state.summary(name)
            if summary.invalid is not None:
                raise _invalid_values_error(name, group.rank, summary.invalid, state.rate_kind)
            if summary.conflict is not None:
                raise _conflicting_copies_error(name, summary.conflict, group.rank, group.rank)
        datasets = {name: state.to_state() for name, state in self._datasets.items()}
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "rank": group.rank,
            "world_size": group.world_size,
            "datasets": datasets,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this rank's state by one `state_dict()` returned (on the same rank of the job being resumed).

        Raises ArgumentError naming the key when `state` is of another version, of another rank or world
        size (each rank's samples and sums are its own: resuming them elsewhere would score some samples
        twice and others never), malformed, or holds sums that no data could produce (`checked_sums`);
        the metric is then unchanged. `dedup_window` and `group` stay this metric's own.
        """
        reader = _StateReader("state")
        if reader.get(state, "format", str) != STATE_FORMAT:
            raise reader.error("format", f"is {state['format']!r}, not {STATE_FORMAT!r}")
        version = reader.get(state, "version", int)
        if version != STATE_VERSION:
            lacking = (
                f" (without {', '.join(STAT_FIELDS[4:])}: saved before pseudo_r2 and corr)" if version == 1 else ""
            )
            raise reader.error(
                "version",
                f"is {version}{lacking}, but this bpseval reads version {STATE_VERSION}; resume with the bpseval"
                " that saved it, or restart the validation pass",
            )
        group = _Collectives(self.group)
        for key, here in (("world_size", group.world_size), ("rank", group.rank)):
            saved = reader.get(state, key, int)
            if saved != here:
                raise reader.error(
                    key,
                    f"is {saved}, but this process is rank {group.rank} of {group.world_size}; load on each rank the"
                    " state that rank saved, with the world size it had (or restart the validation pass)",
                )
        datasets, inner = reader.get(state, "datasets", Mapping), reader.child("datasets")
        self._datasets = {
            name: _DatasetState.from_state(name, inner.get(datasets, name, Mapping), inner.child(name))
            for name in datasets
        }

    def _merge(self, name: str, parts: list[_RankSummary | None], group: _Collectives) -> MergedDataset:
        """One dataset over all ranks: identical collective calls and decisions on every rank."""
        present = [(rank, part) for rank, part in enumerate(parts) if part is not None]
        first_rank, first = present[0]
        for rank, part in present[1:]:
            check_agree(name, f"rank {first_rank}", first.layout, f"rank {rank}", part.layout)
        n_cells = first.layout.n_cells
        cell_ids = first.layout.cell_ids if first.layout.cell_ids is not None else np.arange(n_cells)
        given = sum(part.layout.n_rows for _, part in present)
        dropped = sum(part.skipped for _, part in present)
        state = self._datasets.get(name)
        held_back = np.zeros(0 if state is None else len(state.tail_idx), dtype=bool)
        scored = None
        if first.layout.has_sample_idx:
            scored, duplicates = self._cross_rank_duplicates(name, parts, group)
            dropped += sum(len(repeats) for repeats in duplicates)
            if state is not None:
                held_back = np.isin(state.tail_idx, duplicates[group.rank])
        local = CellStats.zeros(n_cells) if state is None else state.total_without(held_back)
        stacked = group.gather_tensors(
            torch.stack([torch.as_tensor(getattr(local, f)).to(group.device, torch.float64) for f in STAT_FIELDS])
        )
        per_rank = [CellStats(stats[0].astype(np.int64), *stats[1:]) for stats in stacked]
        return MergedDataset(
            name=name,
            cell_ids=cell_ids,
            rate_kind=first.layout.rate_kind,
            per_rank=per_rank,
            samples=given - dropped,
            duplicates_dropped=dropped,
            identity=dataset_identity(name, cell_ids, scored, given),
        )

    def _cross_rank_duplicates(
        self, name: str, parts: list[_RankSummary | None], group: _Collectives
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The samples scored on any rank (sorted), and for each rank those of its samples a lower rank saw too.

        Gathers each rank's sorted sample indices and their fingerprints (padded to the longest), so
        memory and traffic follow the samples seen, not the largest index. Raises BpsevalError, on every
        rank alike, when copies of a sample differ (the offline merge's rule), or when a duplicate is not
        held back.
        """
        longest = max(part.n_seen for part in parts if part is not None)
        state = self._datasets.get(name)
        local = np.full((2, longest), -1, dtype=np.int64)
        if state is not None:
            mine, prints, _ = state.fingerprints.by_sample()
            local[0, : len(mine)], local[1, : len(mine)] = mine, prints
        gathered = group.gather_tensors(torch.from_numpy(local).to(group.device)) if longest else [local] * len(parts)
        sizes = [0 if part is None else part.n_seen for part in parts]
        seen = [values[0, :size] for values, size in zip(gathered, sizes, strict=True)]
        seen_prints = [values[1, :size] for values, size in zip(gathered, sizes, strict=True)]
        duplicates, below, below_prints = [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        for rank, (values, prints) in enumerate(zip(seen, seen_prints, strict=True)):
            common, here, there = np.intersect1d(values, below, assume_unique=True, return_indices=True)
            differ = np.flatnonzero(prints[here] != below_prints[there])
            if len(differ):
                sample = common[differ[0]]
                lower = next(other for other in range(rank) if np.isin(sample, seen[other]))
                raise _conflicting_copies_error(name, int(sample), lower, rank)
            duplicates.append(common)
            below, order = np.unique(np.concatenate([below, values]), return_index=True)
            below_prints = np.concatenate([below_prints, prints])[order]
        for rank, part in enumerate(parts):
            lost = np.setdiff1d(duplicates[rank], [] if part is None else part.tail_idx)
            if len(lost):
                lower = next(other for other in range(rank) if np.isin(lost[0], seen[other]))
                raise BpsevalError(
                    f"dataset {name!r}: sample_idx {lost[0]} was scored on rank {lower} and again on rank {rank}"
                    f" ({len(lost)} such sample{'s' if len(lost) != 1 else ''} on rank {rank}), but not among the"
                    f" last {self.dedup_window} samples rank {rank} scored, so its contribution can no longer be"
                    " removed. DistributedBPS removes the padding copies DistributedSampler appends; give each"
                    " sample to one rank (e.g. bpseval.CellBalancedDistributedSampler), raise dedup_window, or"
                    " write shards and run `bpseval compute`, which removes any duplicate."
                )
        return below, duplicates


class WithSampleIndex(torch.utils.data.Dataset):
    """A map-style dataset of dict items, each with `sample_idx` (its index here) added.

    Wrap the validation set that the DataLoader indexes; batches then carry
    `batch["sample_idx"]` for `DistributedBPS.update` and `ShardWriter.add`, so that the
    padding copies of `DistributedSampler` count once. Other attributes are the wrapped
    dataset's.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"WithSampleIndex needs dict items, but item {index} is a {type(item).__name__}")
        if "sample_idx" in item:
            raise ArgumentError(f"item {index} already has a 'sample_idx'; WithSampleIndex would overwrite it")
        return {**item, "sample_idx": index}

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet, e.g. while unpickling in a DataLoader worker
            raise AttributeError(name)
        return getattr(self.dataset, name)


# ----------------------------------------------------------------------------------------------
# Per-rank state


@dataclass
class _RankSummary:
    """What a rank tells the others about one dataset before the statistics are gathered."""

    layout: DatasetLayout
    skipped: int
    n_seen: int
    tail_idx: np.ndarray
    invalid: _InvalidBatches | None = None
    conflict: int | None = None
    """A sample index this rank was given twice with different robs or dfs."""


@dataclass(frozen=True)
class _InvalidBatches:
    """Which value checks failed in a dataset's batches on one rank, read from the device at `compute()`."""

    batches: tuple[int, ...]
    """Per check of `check_labels`: how many batches failed it."""
    first: int
    """The first batch (counting this dataset's `update` calls on the rank from 0) that failed any."""


def _conflicting_copies_error(name: str, sample: int, first_rank: int, rank: int) -> BpsevalError:
    where = f"twice on rank {rank}" if first_rank == rank else f"on rank {first_rank} and on rank {rank}"
    return BpsevalError(
        f"dataset {name!r}: sample_idx {sample} was given {where} with different robs or dfs. Copies of one"
        " sample must be identical: sample_idx must be the sample's index in the dataset's validation set"
        " (e.g. from bpseval.torch.WithSampleIndex), not its position in the batch."
    )


def _invalid_values_error(name: str, rank: int, invalid: _InvalidBatches, rate_kind: str) -> ArgumentError:
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
class _Rows:
    """Screened rows of one dataset as `update` was given them (weights None: every entry valid)."""

    rhat: Any
    robs: Any
    weights: Any

    def __len__(self) -> int:
        return self.rhat.shape[0]

    def part(self, rows: slice) -> _Rows:
        return _Rows(*(None if values is None else values[rows] for values in (self.rhat, self.robs, self.weights)))

    def copy(self) -> _Rows:
        """Rows that share no memory with a batch (a caller may reuse its tensors; a batch is not kept alive)."""
        return _Rows(
            *(None if values is None else _array_copy(values) for values in (self.rhat, self.robs, self.weights))
        )

    def then(self, later: _Rows) -> _Rows:
        """These rows followed by `later`'s (weights of 1 where one of them has none)."""
        if self.weights is None and later.weights is None:
            weights = None
        else:
            weights = _concat_rows(*(rows.full_weights(like) for rows, like in ((self, later), (later, self))))
        return _Rows(_concat_rows(self.rhat, later.rhat), _concat_rows(self.robs, later.robs), weights)

    def full_weights(self, like: _Rows) -> Any:
        """The weights as a (rows, cells) array; ones, in the dtype of `like`'s, when there are none."""
        xp, shape = array_namespace(self.rhat), tuple(self.rhat.shape)
        if self.weights is None:
            return xp.ones(shape, dtype=like.weights.dtype, device=device(self.rhat))
        return xp.broadcast_to(self.weights, shape)

    def stats(self, rate_kind: str) -> CellStats:
        return unchecked_batch_stats(self.rhat, self.robs, self.weights, rate_kind)

    def row_stats(self, rate_kind: str) -> CellStats:
        return _row_stats(self.rhat, self.robs, self.weights, rate_kind)


@dataclass
class _DatasetState:
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
    held: _Rows | None = None
    problems: Any = None
    """Device int64 array: per check of `check_labels`, the batches that failed it (None: no batch recorded)."""
    first_problem: Any = None
    """Device int64 scalar: the first batch that failed any check, -1 while none has."""

    @classmethod
    def empty(cls, rate_kind: str, has_sample_idx: bool, like: _Rows) -> _DatasetState:
        """A state with no rows, whose statistics have the namespace and device of `like`'s arrays."""
        none = like.part(slice(0, 0))
        no_index = np.zeros(0, dtype=np.int64)
        return cls(
            rate_kind, has_sample_idx, None, none.stats(rate_kind), none.row_stats(rate_kind), no_index, SeenSamples()
        )

    @property
    def n_cells(self) -> int:
        return self.total.n_valid.shape[0]

    @property
    def tail(self) -> CellStats:
        """Per-row statistics of the held-back rows, oldest first: (rows, cells)."""
        if self.held is None:
            return self.carried
        return _map(_concat_rows, self.carried, self.held.row_stats(self.rate_kind))

    @property
    def layout(self) -> BatchLayout:
        """What the dataset's first batch fixed: later batches follow it (`Batch.of`), dfs's shape aside."""
        return BatchLayout(self.n_cells, self.rate_kind, None, self.has_sample_idx)

    def add(self, kept: _Rows, index: np.ndarray | None, n_given: int, window: int) -> None:
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
                self.total = self.total + reduce_rows(_map(lambda rows: rows[:from_carried], self.carried))
                self.carried = _map(lambda rows: rows[from_carried:], self.carried)
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

    def invalid_batches(self) -> _InvalidBatches | None:
        """The checks that failed, read from the device (waits for it), or None when every batch passed."""
        if self.problems is None:
            return None
        counts = to_numpy(self.problems)
        if not counts.any():
            return None
        return _InvalidBatches(tuple(int(count) for count in counts), int(to_numpy(self.first_problem)))

    def total_without(self, held_back: np.ndarray) -> CellStats:
        """The sums with the held-back rows added, except those flagged in `held_back`."""
        keep = np.flatnonzero(~held_back)
        return self.total + reduce_rows(_map(lambda rows: _take_rows(rows, keep), self.tail))

    def to_state(self) -> dict[str, Any]:
        """This dataset's part of `DistributedBPS.state_dict()`: copies, as tensors, lists and scalars."""
        cell_ids = self.cell_ids
        if cell_ids is not None:
            cell_ids = cell_ids.tolist() if cell_ids.dtype.kind == "U" else torch.from_numpy(cell_ids.copy())
        return {
            "rate_kind": self.rate_kind,
            "sample_idx": self.has_sample_idx,
            "cell_ids": cell_ids,
            "arrays": "torch" if is_tensor(self.total.n_valid) else "numpy",
            "total": {field: _tensor_copy(getattr(self.total, field)) for field in STAT_FIELDS},
            "tail": {field: _tensor_copy(getattr(self.tail, field)) for field in STAT_FIELDS},
            "tail_idx": torch.from_numpy(self.tail_idx.copy()),
            "seen": torch.from_numpy(self.seen.indices()),
            "fingerprints": torch.from_numpy(self.fingerprints.by_sample()[1]),
            "rows": self.rows,
            "skipped": self.skipped,
        }

    @classmethod
    def from_state(cls, name: str, state: Mapping[str, Any], reader: _StateReader) -> _DatasetState:
        """The dataset state `to_state()` describes, after checking every key (ArgumentError naming it)."""
        try:
            check_dataset_name(name)
        except ValueError as error:
            raise reader.error("", f"is not a dataset name: {error}") from None
        rate_kind = reader.get(state, "rate_kind", str)
        if rate_kind not in RATE_KINDS:
            raise reader.error("rate_kind", f"must be one of {RATE_KINDS}, not {rate_kind!r}")
        has_sample_idx = reader.get(state, "sample_idx", bool)
        arrays = reader.get(state, "arrays", str)
        if arrays not in ("torch", "numpy"):
            raise reader.error("arrays", f"must be 'torch' or 'numpy', not {arrays!r}")
        total = reader.stats(state, "total", 1)
        n_cells = total.n_valid.shape[0]
        tail = reader.stats(state, "tail", 2, n_cells)
        n_held = tail.n_valid.shape[0]
        if total.n_valid.device != tail.n_valid.device:
            raise reader.error("tail", f"is on {tail.n_valid.device}, 'total' on {total.n_valid.device}")
        tail_idx = reader.indices(state, "tail_idx")
        seen = reader.indices(state, "seen")
        if len(tail_idx) != n_held or (n_held and not has_sample_idx):
            raise reader.error("tail_idx", f"holds {len(tail_idx)} sample indices for {n_held} held-back rows")
        if (len(seen) and not has_sample_idx) or np.any(np.diff(seen) <= 0) or not np.isin(tail_idx, seen).all():
            raise reader.error("seen", "must be the sorted, distinct indices of the samples scored (tail_idx included)")
        prints = reader.tensor(state, "fingerprints", torch.int64, 1).cpu().numpy()
        if len(prints) != len(seen):
            raise reader.error("fingerprints", f"holds {len(prints)} fingerprints for {len(seen)} samples seen")
        rows, skipped = reader.get(state, "rows", int), reader.get(state, "skipped", int)
        if not 0 <= skipped <= rows:
            raise reader.error("skipped", f"must be between 0 and rows ({rows}), got {skipped}")
        scored = rows - skipped
        if has_sample_idx and len(seen) != scored:
            raise reader.error("seen", f"holds {len(seen)} samples, but rows - skipped is {scored}")
        reader.possible_sums(total, "total", scored - n_held)
        reader.possible_sums(tail, "tail", 1)
        if arrays == "numpy":
            total, tail = (_map(lambda values: values.cpu().numpy(), stats) for stats in (total, tail))
        return cls(
            rate_kind,
            has_sample_idx,
            reader.cell_ids(state, n_cells),
            total,
            carried=tail,
            tail_idx=tail_idx,
            seen=SeenSamples.from_indices(seen),
            fingerprints=SampleFingerprints.from_samples(seen, prints),
            rows=rows,
            skipped=skipped,
        )

    def summary(self, name: str) -> _RankSummary:
        """What this rank tells the others about the dataset; reads the device (checks and fingerprints)."""
        layout = DatasetLayout(name, self.rows, self.n_cells, self.rate_kind, None, self.has_sample_idx, self.cell_ids)
        _, _, conflict = self.fingerprints.by_sample()
        return _RankSummary(layout, self.skipped, len(self.seen), self.tail_idx, self.invalid_batches(), conflict)


class _StateReader:
    """Reads one level of a `state_dict()`, raising ArgumentError that names the key path on anything malformed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def child(self, key: str) -> _StateReader:
        return _StateReader(f"{self.path}[{key!r}]")

    def error(self, key: str, problem: str) -> ArgumentError:
        where = self.child(key).path if key else self.path
        return ArgumentError(
            f"DistributedBPS.load_state_dict: {where} {problem}. Pass a dict that DistributedBPS.state_dict() made."
        )

    def get(self, state: Any, key: str, kind: type | tuple[type, ...]) -> Any:
        """`state[key]`, which must be an instance of `kind` (an int is not a bool, and a bool is not an int)."""
        if not isinstance(state, Mapping):
            raise self.error("", f"must be a dict, not {type(state).__name__}")
        if key not in state:
            raise self.error(key, "is missing")
        value = state[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(key, f"must be {names}, not {type(value).__name__}")
        return value

    def tensor(self, state: Any, key: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
        value = self.get(state, key, torch.Tensor)
        if value.dtype != dtype or value.ndim != ndim:
            raise self.error(key, f"must be a {ndim}-D {dtype} tensor, not {value.ndim}-D {value.dtype}")
        return value

    def stats(self, state: Any, key: str, ndim: int, n_cells: int | None = None) -> CellStats:
        """Statistics with one row per cell (`ndim` 1) or per held-back sample (`ndim` 2), on one device."""
        fields, inner = self.get(state, key, Mapping), self.child(key)
        values = {
            field: inner.tensor(fields, field, torch.int64 if field == "n_valid" else torch.float64, ndim)
            for field in STAT_FIELDS
        }
        first = values["n_valid"]
        shape = (*first.shape[:-1], first.shape[-1] if n_cells is None else n_cells)
        for field, value in values.items():
            if tuple(value.shape) != shape or value.device != first.device:
                problem = f"has shape {tuple(value.shape)} on {value.device}, not {shape} on {first.device}"
                raise inner.error(field, problem)
        return CellStats(**values)

    def possible_sums(self, stats: CellStats, key: str, samples: int) -> None:
        """Refuse statistics no data could produce (the sums contract); `samples`: the most rows each covers."""
        try:
            checked_sums({name: values.cpu().numpy() for name, values in stats.fields().items()}, samples)
        except ImpossibleSumsError as error:
            raise self.error(key, f"holds impossible statistics: {error}") from None

    def indices(self, state: Any, key: str) -> np.ndarray:
        values = self.tensor(state, key, torch.int64, 1).cpu().numpy()
        if (values < 0).any():
            raise self.error(key, "holds negative sample indices")
        return values

    def cell_ids(self, state: Any, n_cells: int) -> np.ndarray | None:
        ids = self.get(state, "cell_ids", (torch.Tensor, list, type(None)))
        if ids is None:
            return None
        if isinstance(ids, list):
            if not all(isinstance(value, str) for value in ids):
                raise self.error("cell_ids", "must be an int64 tensor or a list of str")
            values = np.array(ids, dtype=str)
        else:
            values = self.tensor(state, "cell_ids", torch.int64, 1).cpu().numpy()
        if values.shape != (n_cells,):
            raise self.error("cell_ids", f"holds {len(values)} ids for {n_cells} cells")
        return values


# ----------------------------------------------------------------------------------------------
# Helpers


def _tensor_copy(values: Any) -> torch.Tensor:
    """A copy of a numpy array or tensor as a tensor (same device), sharing no memory with the metric."""
    return values.detach().clone() if is_tensor(values) else torch.from_numpy(np.array(values))


def _row_stats(rhat: Any, robs: Any, weights: Any, rate_kind: str) -> CellStats:
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
    return _map(lambda values: xp.reshape(values, (n_rows, n_cells)), entries)


def _map(function: Callable[..., Any], *stats: CellStats) -> CellStats:
    """Apply `function` field by field to one or more CellStats."""
    return CellStats(**{name: function(*(getattr(s, name) for s in stats)) for name in STAT_FIELDS})


def _array_copy(values: Any) -> Any:
    return values.clone() if is_tensor(values) else np.array(values)


def _concat_rows(first: Any, second: Any) -> Any:
    return array_namespace(first, second).concat([first, second], axis=0)


def _take_rows(array: Any, rows: np.ndarray) -> Any:
    xp = array_namespace(array)
    return xp.take(array, xp.asarray(rows, device=device(array)), axis=0)


class _Collectives:
    """The few collectives `compute()` needs; a single process when torch.distributed is not initialised."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.device = torch.device("cpu")
        if self.active and not {"gloo", "mpi"} & set(str(dist.get_backend(group)).replace(",", ":").split(":")):
            self.device = torch.device("cuda", torch.cuda.current_device())

    def gather_objects(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def gather_tensors(self, tensor: torch.Tensor) -> list[np.ndarray]:
        """Every rank's `tensor` (same shape and dtype everywhere), as numpy arrays in rank order."""
        if not self.active:
            return [tensor.cpu().numpy()]
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor, group=self.group)
        return [part.cpu().numpy() for part in gathered]
