"""Exact bits per spike inside a torch.distributed job: `DistributedBPS` and `WithSampleIndex`.

`DistributedBPS` is the online twin of "write shards, then `bpseval compute`": each rank reduces
its batches, checked by the batch contract (`bpseval.kernel.batch`), to per-cell sufficient statistics
in a state on the array API (`bpseval.kernel.online`: screened on the device, then reduced by the
kernel's `unchecked_batch_stats`), and `compute()` gathers every rank's statistics into the
`MergedDataset`s the offline merge builds and scores them with the same `score`. This module is the
thin layer of collectives, checkpoints and the torch dataset wrapper over that state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bpseval._arrays import is_tensor
from bpseval._distributed import missing_torch
from bpseval.api import Result
from bpseval.errors import ArgumentError
from bpseval.kernel.batch import Batch, check_dataset_name
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.online import (
    OnlineDataset,
    RankSummary,
    conflicting_copies_error,
    cross_rank_duplicates,
    invalid_values_error,
    map_stats,
)
from bpseval.kernel.samples import SampleFingerprints, SeenSamples
from bpseval.kernel.stats import RATE_KINDS
from bpseval.kernel.sums import ImpossibleSumsError, checked_sums
from bpseval.run.merge import MergedDataset, dataset_identity
from bpseval.run.scored import score
from bpseval.shard.format import DatasetLayout, check_agree

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
    next pass. Memory is O(cells) per dataset plus 17-24 bytes per sample given with `sample_idx`:
    its index on the host and its fingerprint on the device (16 bytes per row given until `compute()`
    keeps one per sample), and the set of samples seen (`kernel.samples.SeenSamples`: 1 byte per
    sample for indices 0..N-1, up to 8 for sparse or huge ones); sums are
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

    Copies of a sample must agree, as offline: each row given with `sample_idx` leaves a
    fingerprint of its robs (where valid) and dfs on the device (`kernel.samples.row_fingerprints`),
    and `compute()` raises the same BpsevalError on every rank for a sample given twice with
    different ones, on one rank or two (`sample_idx` numbering the rows of a batch, say).

    `update` never waits for the device (no `.item()`, no copy to the host of a tensor it was
    given; `sample_idx` is read where it lives, so give it on the CPU, as DataLoader batches
    carry it). With `validate="deferred"` (the default), each batch's values are checked on
    the device and the findings kept there; `compute()` (and `state_dict()`) raise an
    ArgumentError naming the dataset, the rank, the first bad batch and the kinds of bad value,
    but not the row and cell. `validate="eager"` makes `update` wait for the check and raise at
    the bad batch, naming its first bad row and cell, with the metric unchanged.

    `state_dict()` / `load_state_dict()` checkpoint and resume each rank's state mid-validation.

    Args:
        dedup_window: samples per dataset and rank held back until `compute()`, to drop padding copies.
        group: the process group (None: the default one, or this process alone without one).
        validate: "deferred" (values checked on the device, raised at `compute()`) or "eager".

    Example:
        >>> import torch
        >>> from bpseval.torch import DistributedBPS
        >>> metric = DistributedBPS()  # without a process group: this process is the only rank
        >>> robs = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0]])
        >>> metric.update("session", torch.ones(3, 2), robs, sample_idx=torch.arange(3))
        >>> metric.update("session", torch.ones(1, 2), robs[:1], sample_idx=torch.tensor([0]))  # a padding copy
        >>> metric.compute().datasets[["samples", "duplicates_dropped"]].values.tolist()
        [[3, 1]]
    """

    def __init__(self, dedup_window: int = DEFAULT_DEDUP_WINDOW, group: Any = None, validate: str = "deferred") -> None:
        if not isinstance(dedup_window, int) or dedup_window < 1:
            raise ArgumentError(f"dedup_window must be an int >= 1, not {dedup_window!r}")
        if validate not in VALIDATE_MODES:
            raise ArgumentError(f"validate must be one of {VALIDATE_MODES}, not {validate!r}")
        self.dedup_window = dedup_window
        self.group = group
        self.validate = validate
        self._datasets: dict[str, OnlineDataset] = {}

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
        OnlineDataset.add_batch(self._datasets, batch, self.dedup_window, self.validate == "eager")

    def compute(self, step: int = 0) -> Result:
        """Gather every rank's statistics and score them as `bpseval compute` scores shards.

        Returns the `Result` that `bpseval.evaluate` returns (files=[], `step` as given), the
        same on every rank. Collective: call it on every rank. Collectives run on the CPU for
        gloo and on the current CUDA device for NCCL (set it with `torch.cuda.set_device`).
        The metric's state is not changed.
        """
        group = _Collectives(self.group)
        summaries = group.gather_objects({name: state.summary() for name, state in self._datasets.items()})
        names = sorted(set().union(*summaries))
        for name in names:  # the same decision on every rank, before any other collective
            for rank, summary in enumerate(summaries):
                if name in summary and summary[name].invalid is not None:
                    raise invalid_values_error(name, rank, summary[name].invalid, summary[name].layout.rate_kind)
                if name in summary and summary[name].conflict is not None:
                    raise conflicting_copies_error(name, summary[name].conflict, rank, rank)
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
            summary = state.summary()
            if summary.invalid is not None:
                raise invalid_values_error(name, group.rank, summary.invalid, state.rate_kind)
            if summary.conflict is not None:
                raise conflicting_copies_error(name, summary.conflict, group.rank, group.rank)
        datasets = {name: _saved(state) for name, state in self._datasets.items()}
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
            name: _restored(name, inner.get(datasets, name, Mapping), inner.child(name)) for name in datasets
        }

    def _merge(self, name: str, parts: list[RankSummary | None], group: _Collectives) -> MergedDataset:
        """One dataset over all ranks: identical collective calls and decisions on every rank."""
        present = [(rank, part) for rank, part in enumerate(parts) if part is not None]
        first_rank, first = present[0]
        for rank, part in present[1:]:
            check_agree(name, f"rank {first_rank}", _layout(name, first), f"rank {rank}", _layout(name, part))
        n_cells = first.layout.n_cells
        cell_ids = first.cell_ids if first.cell_ids is not None else np.arange(n_cells)
        given = sum(part.rows for _, part in present)
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
        self, name: str, parts: list[RankSummary | None], group: _Collectives
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The samples scored on any rank (sorted), and for each rank those of its samples a lower rank saw too.

        Gathers each rank's sorted sample indices and their fingerprints (padded to the longest), so
        memory and traffic follow the samples seen, not the largest index; `cross_rank_duplicates`
        decides, and raises the same BpsevalError on every rank.
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
        tails = [np.zeros(0, dtype=np.int64) if part is None else part.tail_idx for part in parts]
        return cross_rank_duplicates(name, seen, seen_prints, tails, self.dedup_window)


class WithSampleIndex(torch.utils.data.Dataset):
    """A map-style dataset of dict items, each with `sample_idx` (its index here) added.

    Wrap the validation set that the DataLoader indexes; batches then carry
    `batch["sample_idx"]` for `DistributedBPS.update` and `ShardWriter.add`, so that the
    padding copies of `DistributedSampler` count once. Other attributes are the wrapped
    dataset's.

    Args:
        dataset: a map-style dataset whose items are dicts.

    Example:
        >>> from bpseval.torch import WithSampleIndex
        >>> WithSampleIndex([{"x": 1}, {"x": 2}])[1]
        {'x': 2, 'sample_idx': 1}
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


def _layout(name: str, part: RankSummary) -> DatasetLayout:
    """A rank's dataset as the offline merge describes a shard's, for the same agreement checks."""
    layout = part.layout
    return DatasetLayout(name, part.rows, layout.n_cells, layout.rate_kind, None, layout.has_sample_idx, part.cell_ids)


def _saved(self: OnlineDataset) -> dict[str, Any]:
    """A dataset's part of `DistributedBPS.state_dict()`: copies, as tensors, lists and scalars."""
    cell_ids: Any = self.cell_ids
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


def _restored(name: str, state: Mapping[str, Any], reader: _StateReader) -> OnlineDataset:
    """The dataset state `_saved` describes, after checking every key (ArgumentError naming it)."""
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
        total, tail = (map_stats(lambda values: values.cpu().numpy(), stats) for stats in (total, tail))
    return OnlineDataset(
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
