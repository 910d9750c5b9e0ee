"""Writing shards: `ShardWriter`, one rank's validation outputs of one step, raw or as sums."""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bpseval._arrays import to_numpy
from bpseval._version import __version__
from bpseval.errors import BpsevalError
from bpseval.kernel.samples import SeenSamples
from bpseval.kernel.stats import (
    RATE_KINDS,
    STAT_FIELDS,
    CellStats,
    add_by_block,
    as_weights,
    batch_stats,
)
from bpseval.shard.format import (
    CHUNK_BYTES,
    DATASETS_GROUP,
    DEFAULT_BLOCK_SIZE,
    FORMAT,
    FORMAT_VERSION,
    STORES,
    check_dataset_name,
    shard_path,
)
from bpseval.shard.reader import read_cell_ids


@dataclass
class _Layout:
    """What the first `add` of a dataset fixed for the later ones."""

    n_cells: int
    rate_kind: str
    dfs_shape_tail: tuple[int, ...] | None
    has_sample_idx: bool


class ShardWriter:
    """Writes one rank's validation outputs for one step to `<run_dir>/step-SSSSSS/rank-RRRR.h5`.

    Use as a context manager and call `add` once per batch. Batches are appended to chunked,
    resizable HDF5 datasets, so memory stays bounded by one batch. The file is written under a
    hidden `.tmp` name and renamed on a clean exit; after an exception the partial file is
    deleted, so a reader never sees a half-written shard.

    `store="stats"` writes per-cell sufficient statistics instead of raw arrays (a few KB per
    dataset): in total, and per block of `block_size` consecutive sample_idx for the paired
    bootstrap of `bpseval compare`. Samples repeated on this rank are dropped by sample_idx;
    repeats across ranks cannot be seen any more and are not checked.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rank: int,
        world_size: int,
        step: int = 0,
        run_id: str | None = None,
        store: str = "raw",
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        if store not in STORES:
            raise ValueError(f"ShardWriter: store must be one of {STORES}, not {store!r}")
        if block_size < 1:
            raise ValueError(f"ShardWriter: block_size must be >= 1, got {block_size}")
        for name, value in (("rank", rank), ("world_size", world_size), ("step", step)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"ShardWriter: {name} must be an int, not {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardWriter: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if step < 0:
            raise ValueError(f"ShardWriter: step must be >= 0, got {step}")
        self.rank, self.world_size, self.step, self.run_id = int(rank), int(world_size), int(step), run_id
        self.path = shard_path(run_dir, self.step, self.rank)
        # unique per writer: two writers of one rank (a restarted job) never write into one file
        self._tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        self.store, self.block_size = store, int(block_size)
        self._file: h5py.File | None = None
        self._layouts: dict[str, _Layout] = {}
        self._stats: dict[str, _RankStats] = {}

    @classmethod
    def from_process_group(
        cls, run_dir: str | os.PathLike[str], step: int = 0, run_id: str | None = None, group: Any = None
    ) -> ShardWriter:
        """A writer whose rank and world size come from the initialised torch.distributed group."""
        from bpseval._distributed import rank_and_world_size

        rank, world_size = rank_and_world_size(group)
        return cls(run_dir, rank, world_size, step=step, run_id=run_id)

    def __enter__(self) -> ShardWriter:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        """Create the temporary file and write the root attributes."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self._tmp_path, "w")
        attrs = self._file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["rank"] = self.rank
        attrs["world_size"] = self.world_size
        attrs["step"] = self.step
        attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        attrs["bpseval_version"] = __version__
        attrs["store"] = self.store
        if self.run_id is not None:
            attrs["run_id"] = str(self.run_id)
        self._file.create_group(DATASETS_GROUP)

    def close(self) -> Path:
        """Finish the shard: flush, close and atomically rename it into place. Returns its path."""
        if self._file is None:
            self.open()
        assert self._file is not None
        for dataset, stats in self._stats.items():
            stats.write(self._file[f"{DATASETS_GROUP}/{dataset}"], self.block_size)
        self._file.close()
        self._file = None
        os.replace(self._tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial shard, leaving no file that looks complete."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp_path.unlink(missing_ok=True)

    def add(
        self,
        dataset: str,
        rhat: Any,
        robs: Any,
        dfs: Any = None,
        sample_idx: Any = None,
        cell_ids: Any = None,
        rate_kind: str = "rate",
    ) -> None:
        """Append one batch of `dataset`: rhat, robs (samples, cells) and optional mask and identities.

        Accepts numpy arrays or torch tensors on any device; bfloat16 is stored as float32, and
        nothing is stored at a lower precision than it was given. Raises ValueError, naming the
        dataset, when shapes or settings disagree with each other or with earlier batches.
        """
        self.open()
        assert self._file is not None
        check_dataset_name(dataset)
        if rate_kind not in RATE_KINDS:
            raise ValueError(f"dataset {dataset!r}: rate_kind must be one of {RATE_KINDS}, not {rate_kind!r}")
        arrays = _batch_arrays(dataset, rhat, robs, dfs, sample_idx, cell_ids)
        n_cells = arrays["rhat"].shape[1]
        layout = _Layout(
            n_cells=n_cells,
            rate_kind=rate_kind,
            dfs_shape_tail=arrays["dfs"].shape[1:] if "dfs" in arrays else None,
            has_sample_idx="sample_idx" in arrays,
        )
        group_path = f"{DATASETS_GROUP}/{dataset}"
        known = self._layouts.setdefault(dataset, layout)
        if known is layout:
            group = self._file.create_group(group_path)
            group.attrs["rate_kind"] = rate_kind
        else:
            _check_same_layout(dataset, known, layout)
            group = self._file[group_path]
        if "cell_ids" in arrays:
            _store_cell_ids(group, dataset, arrays.pop("cell_ids"))
        if self.store == "stats":
            self._stats.setdefault(dataset, _RankStats(n_cells)).add(dataset, arrays, rate_kind, self.block_size)
        else:
            for name, array in arrays.items():
                _append(group, dataset, name, array)


@dataclass
class _RankStats:
    """One dataset's statistics on this rank, for `store="stats"`: total, per block, and the samples seen."""

    n_cells: int
    total: CellStats | None = None
    per_block: CellStats | None = None
    seen: SeenSamples = field(default_factory=SeenSamples)
    samples: int = 0
    duplicates_dropped: int = 0

    def add(self, dataset: str, arrays: dict[str, np.ndarray], rate_kind: str, block_size: int) -> None:
        rhat, robs, index = arrays["rhat"], arrays["robs"], arrays.get("sample_idx")
        weights = as_weights(arrays.get("dfs"), *rhat.shape)
        if index is not None:
            if len(index) and index.min() < 0:
                raise ValueError(f"dataset {dataset!r}: sample_idx must be >= 0")
            keep = self.seen.first_sightings(index)
            self.seen.add(index[keep])
            self.duplicates_dropped += int((~keep).sum())
            rhat, robs, index = rhat[keep], robs[keep], index[keep]
            weights = None if weights is None else weights[keep]
        try:
            if index is None:
                batch = batch_stats(rhat, robs, weights, rate_kind)
            else:
                blocks = self.per_block if self.per_block is not None else CellStats.zeros((0, self.n_cells))
                self.per_block, batch = add_by_block(blocks, index // block_size, rhat, robs, weights, rate_kind)
        except BpsevalError as error:
            raise BpsevalError(f"dataset {dataset!r}: {error}") from None
        self.total = batch if self.total is None else self.total + batch
        self.samples += len(rhat)

    def write(self, group: h5py.Group, block_size: int) -> None:
        total = self.total if self.total is not None else CellStats.zeros(self.n_cells)
        for name in STAT_FIELDS:
            group.create_dataset(name, data=getattr(total, name))
        group.attrs["samples"] = self.samples
        group.attrs["duplicates_dropped"] = self.duplicates_dropped
        if self.per_block is not None:
            group.attrs["block_size"] = block_size
            blocks = group.create_group("blocks")
            for name in STAT_FIELDS:
                blocks.create_dataset(name, data=getattr(self.per_block, name))


def _batch_arrays(
    dataset: str, rhat: Any, robs: Any, dfs: Any, sample_idx: Any, cell_ids: Any
) -> dict[str, np.ndarray]:
    """The batch as numpy arrays in their storage dtypes, with shapes checked against each other."""
    arrays = {"rhat": _float_array(to_numpy(rhat)), "robs": to_numpy(robs)}
    if arrays["rhat"].ndim != 2 or arrays["robs"].shape != arrays["rhat"].shape:
        raise ValueError(
            f"dataset {dataset!r}: rhat and robs must both have shape (samples, cells);"
            f" got {arrays['rhat'].shape} and {arrays['robs'].shape}"
        )
    n_rows, n_cells = arrays["rhat"].shape
    if dfs is not None:
        mask = to_numpy(dfs)
        try:
            as_weights(mask, n_rows, n_cells)
        except BpsevalError as error:
            raise ValueError(f"dataset {dataset!r}: {error}") from None
        arrays["dfs"] = mask.astype(np.uint8) if mask.dtype == bool else mask
    if sample_idx is not None:
        index = to_numpy(sample_idx)
        if index.shape != (n_rows,) or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(
                f"dataset {dataset!r}: sample_idx must be integers of shape ({n_rows},), got {index.dtype} {index.shape}"
            )
        arrays["sample_idx"] = index.astype(np.int64)
    if cell_ids is not None:
        ids = np.asarray(cell_ids if not hasattr(cell_ids, "detach") else to_numpy(cell_ids))
        if ids.shape != (n_cells,):
            raise ValueError(f"dataset {dataset!r}: cell_ids must have shape ({n_cells},), got {ids.shape}")
        arrays["cell_ids"] = ids
    for name in ("robs", "dfs"):
        if name in arrays and not (np.issubdtype(arrays[name].dtype, np.number)):
            raise ValueError(f"dataset {dataset!r}: {name} must be numeric, got dtype {arrays[name].dtype}")
    return arrays


def _float_array(array: np.ndarray) -> np.ndarray:
    """rhat as float16/32/64; integer predictions become float64 (bool is refused by the caller)."""
    if np.issubdtype(array.dtype, np.floating):
        return array
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float64)
    raise ValueError(f"rhat must be floating point, got dtype {array.dtype}")


def _check_same_layout(dataset: str, known: _Layout, new: _Layout) -> None:
    if known.n_cells != new.n_cells:
        raise ValueError(f"dataset {dataset!r}: this batch has {new.n_cells} cells, earlier batches had {known.n_cells}")
    if known.rate_kind != new.rate_kind:
        raise ValueError(f"dataset {dataset!r}: rate_kind {new.rate_kind!r} differs from earlier {known.rate_kind!r}")
    if known.dfs_shape_tail != new.dfs_shape_tail:
        raise ValueError(
            f"dataset {dataset!r}: dfs must be given with the same shape on every batch"
            f" (earlier: {_describe_tail(known.dfs_shape_tail)}, now: {_describe_tail(new.dfs_shape_tail)})"
        )
    if known.has_sample_idx != new.has_sample_idx:
        raise ValueError(f"dataset {dataset!r}: give sample_idx on every batch or on none")


def _describe_tail(tail: tuple[int, ...] | None) -> str:
    return "no dfs" if tail is None else f"(N{''.join(f', {d}' for d in tail)})"


def _store_cell_ids(group: h5py.Group, dataset: str, ids: np.ndarray) -> None:
    """Write cell_ids once; later batches must give the same ones."""
    is_text = ids.dtype.kind in "USO"
    values = ids.astype(str) if is_text else ids.astype(np.int64)
    if "cell_ids" in group:
        if not np.array_equal(read_cell_ids(group["cell_ids"]), values):
            raise ValueError(f"dataset {dataset!r}: cell_ids differ from the ones given with an earlier batch")
        return
    if is_text:
        group.create_dataset("cell_ids", data=values.astype(object), dtype=h5py.string_dtype("utf-8"))
    else:
        group.create_dataset("cell_ids", data=values)


def _append(group: h5py.Group, dataset: str, name: str, array: np.ndarray) -> None:
    """Append rows to a chunked, resizable HDF5 dataset, creating it on the first batch."""
    if name not in group:
        row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
        chunk_rows = max(1, CHUNK_BYTES // row_bytes)
        group.create_dataset(
            name,
            shape=(0, *array.shape[1:]),
            maxshape=(None, *array.shape[1:]),
            dtype=array.dtype,
            chunks=(chunk_rows, *array.shape[1:]),
        )
    target = group[name]
    if array.dtype != target.dtype:
        if not np.can_cast(array.dtype, target.dtype, "safe"):
            raise ValueError(
                f"dataset {dataset!r}: {name} dtype {array.dtype} cannot be stored without loss in the"
                f" {target.dtype} of earlier batches; give the same dtype on every batch"
            )
        array = array.astype(target.dtype)
    start = target.shape[0]
    target.resize(start + array.shape[0], axis=0)
    target[start:] = array
