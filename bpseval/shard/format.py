"""The HDF5 shard format v1: names, constants and the validated metadata of a shard.

A shard holds what one rank saw in one validation pass ("step"). Root attributes: `format`,
`format_version`, `rank`, `world_size`, `step` (optional `run_id`, `created_at`,
`bpseval_version`, `store`); one group per dataset at `/datasets/<name>` with `rhat`, `robs` (N, C),
and optional `dfs` ((N, C), (N, 1) or (N,)), `sample_idx` (N,) and `cell_ids` (C,). The
README's "Shard format" section is the full contract.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bpseval.errors import BpsevalError

FORMAT = "bpseval-shard"


FORMAT_VERSION = 1


DATASETS_GROUP = "datasets"


STORES = ("raw", "stats")


DEFAULT_BLOCK_SIZE = 500
"""Samples per block of a stats-only shard (100 blocks for a 50,000-sample validation set)."""


CHUNK_BYTES = 1 << 18
"""Bytes per HDF5 chunk of an array ShardWriter writes (whole rows, at least one): 256 KiB.

Measured (benchmarks/README.md, HDF5 settings): for a 23-cell session they read 1.4-1.5x
faster than one-batch chunks of 23 KiB and write as fast; 1 MiB chunks read a little faster
still but waste more. Every chunk is allocated in full, so an array wastes at most one partly
filled chunk. An array smaller than one chunk is not chunked at all: ShardWriter stages rows in
memory until they fill a chunk, and writes an array that never does as one contiguous block of
exactly its size."""


def shard_path(run_dir: str | os.PathLike[str], step: int, rank: int) -> Path:
    """Where `ShardWriter` puts the shard of `rank` for `step`."""
    return Path(run_dir) / f"step-{step:06d}" / f"rank-{rank:04d}.h5"


def is_shard_name(name: str) -> bool:
    """True for a finished shard's file name; hidden or `.tmp` names are writes in progress."""
    return name.endswith(".h5") and not name.startswith(".")


@dataclass(frozen=True)
class DatasetLayout:
    """One dataset group of a shard, as far as its metadata goes (no rows read)."""

    name: str
    n_rows: int
    n_cells: int
    rate_kind: str
    dfs_shape: tuple[int, ...] | None
    has_sample_idx: bool
    cell_ids: np.ndarray | None
    nbytes: int = 0
    """Bytes of the arrays a merge reads (for progress and load balance)."""
    store: str = "raw"
    block_size: int | None = None
    """Stats-only shards: samples per block of the stored block statistics (None: no blocks)."""
    duplicates_dropped: int = 0
    """Stats-only shards: samples the writer dropped as repeats on its own rank."""


@dataclass(frozen=True)
class ShardHeader:
    """A shard's root attributes and the layout of its dataset groups, validated."""

    path: Path
    rank: int
    world_size: int
    step: int
    run_id: str | None
    datasets: dict[str, DatasetLayout]
    store: str = "raw"


@dataclass(frozen=True)
class RowChunk:
    """Rows [start, start + len) of one dataset of one shard; `weights` as from `as_weights`."""

    start: int
    rhat: np.ndarray
    robs: np.ndarray
    weights: np.ndarray | None
    sample_idx: np.ndarray | None


def check_agree(name: str, path_a: Path | str, a: DatasetLayout, path_b: Path | str, b: DatasetLayout) -> None:
    """Raise BpsevalError unless two ranks' layouts of dataset `name` can be merged.

    They must agree on the number of cells, cell_ids, rate_kind and whether sample_idx is given.
    `path_a`/`path_b` name the two sources in the message (a shard, or a rank for the online metric).
    """
    where = f"dataset {name!r}"
    if a.n_cells != b.n_cells:
        raise BpsevalError(
            f"{path_b}: {where} has {b.n_cells} cells but {a.n_cells} in {path_a}. Every rank must write"
            " all cells of a dataset."
        )
    ids_a = a.cell_ids if a.cell_ids is not None else np.arange(a.n_cells)
    ids_b = b.cell_ids if b.cell_ids is not None else np.arange(b.n_cells)
    if ids_a.dtype.kind != ids_b.dtype.kind or not np.array_equal(ids_a, ids_b):
        raise BpsevalError(f"{path_b}: {where} has cell_ids that differ from those in {path_a}.")
    if a.block_size != b.block_size:
        raise BpsevalError(
            f"{path_b}: {where} has stats blocks of {b.block_size} samples but {path_a} of {a.block_size}."
        )
    if a.rate_kind != b.rate_kind:
        raise BpsevalError(f"{path_b}: {where} has rate_kind {b.rate_kind!r} but {path_a} has {a.rate_kind!r}.")
    if a.has_sample_idx != b.has_sample_idx:
        having, lacking = (path_a, path_b) if a.has_sample_idx else (path_b, path_a)
        raise BpsevalError(
            f"{lacking}: {where} has no sample_idx but {having} has one; write sample_idx on every rank or on none."
        )
