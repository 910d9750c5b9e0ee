"""The HDF5 shard format v1: writing (`ShardWriter`), and reading with validation.

A shard holds what one rank saw in one validation pass ("step"). Root attributes: `format`,
`format_version`, `rank`, `world_size`, `step` (optional `run_id`, `created_at`,
`bpseval_version`); one group per dataset at `/datasets/<name>` with `rhat`, `robs` (N, C),
and optional `dfs` ((N, C), (N, 1) or (N,)), `sample_idx` (N,) and `cell_ids` (C,). The
README's "Shard format" section is the full contract.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np

from bpseval._arrays import to_numpy
from bpseval._version import __version__
from bpseval.errors import BpsevalError
from bpseval.samples import SeenSamples
from bpseval.stats import (
    RATE_KINDS,
    STAT_FIELDS,
    CellStats,
    add_by_block,
    as_weights,
    batch_stats,
)

FORMAT = "bpseval-shard"
FORMAT_VERSION = 1
DATASETS_GROUP = "datasets"
STORES = ("raw", "stats")
DEFAULT_BLOCK_SIZE = 500
"""Samples per block of a stats-only shard (100 blocks for a 50,000-sample validation set)."""
CHUNK_BYTES = 1 << 18
"""Bytes per HDF5 chunk ShardWriter writes (whole rows, at least one): 256 KiB.

Measured (benchmarks/README.md, HDF5 settings): for a 23-cell session they read 1.4-1.5x
faster than one-batch chunks of 23 KiB and write as fast; 1 MiB chunks read a little faster
still but waste more. Every chunk is allocated in full, so a dataset wastes at most one partly
filled chunk per array."""


def shard_path(run_dir: str | os.PathLike[str], step: int, rank: int) -> Path:
    """Where `ShardWriter` puts the shard of `rank` for `step`."""
    return Path(run_dir) / f"step-{step:06d}" / f"rank-{rank:04d}.h5"


def is_shard_name(name: str) -> bool:
    """True for a finished shard's file name; hidden or `.tmp` names are writes in progress."""
    return name.endswith(".h5") and not name.startswith(".")


# ----------------------------------------------------------------------------------------------
# Writing


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
        from bpseval.distributed import rank_and_world_size

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


def check_dataset_name(name: Any) -> None:
    """Dataset names become HDF5 group names and table rows: no path separators, no control characters."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or not name.isprintable():
        raise ValueError(
            f"dataset name must be a non-empty printable string without '/' or '\\', not {name!r}"
        )


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


# ----------------------------------------------------------------------------------------------
# Reading


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


@contextmanager
def open_shard(path: Path) -> Iterator[h5py.File]:
    """Open a shard read-only, without HDF5 file locks (shards are immutable once renamed into
    place, and locks are missing or broken on many shared filesystems).

    Any failure to open or to read becomes a BpsevalError naming the file.
    """
    handle = _open_file(path)
    try:
        with handle:
            yield handle
    except BpsevalError:
        raise
    except Exception as error:  # h5py raises many types on damaged files
        raise BpsevalError(
            f"{path}: damaged shard ({type(error).__name__}: {_short(error)}); re-run validation to rewrite it."
        ) from None


def _open_file(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except PermissionError:
        raise BpsevalError(f"{path}: not readable (permission denied); fix its permissions or move it away.") from None
    except Exception as error:
        raise BpsevalError(
            f"{path}: cannot be read as an HDF5 file ({_short(error)}). It may be truncated or not a"
            " shard; delete or move it out of the run directory."
        ) from None


def _short(error: BaseException) -> str:
    return str(error).split("\n")[0][:200]


def read_header(path: Path) -> ShardHeader:
    """Read and validate a shard's attributes and dataset layouts; raises BpsevalError if invalid."""
    with open_shard(path) as handle:
        attrs = handle.attrs
        fmt = _text_attr(attrs.get("format"))
        if fmt != FORMAT:
            raise BpsevalError(
                f"{path}: not a bpseval shard (root attribute 'format' is {fmt!r}, expected {FORMAT!r})."
                " Move other .h5 files out of the run directory."
            )
        version = _int_attr(path, attrs, "format_version")
        if version != FORMAT_VERSION:
            raise BpsevalError(
                f"{path}: shard format version {version} is not supported (this bpseval reads version"
                f" {FORMAT_VERSION}); upgrade bpseval or rewrite the shard."
            )
        rank, world_size, step = (_int_attr(path, attrs, key) for key in ("rank", "world_size", "step"))
        if world_size < 1 or not 0 <= rank < world_size:
            raise BpsevalError(f"{path}: rank {rank} is outside 0..world_size-1 (world_size {world_size}).")
        _refuse_links(path, handle)
        group = handle.get(DATASETS_GROUP)
        if group is not None and not isinstance(group, h5py.Group):
            raise BpsevalError(f"{path}: /{DATASETS_GROUP} must be a group holding one group per dataset.")
        store = _text_attr(attrs.get("store", "raw"))
        if store not in STORES:
            raise BpsevalError(f"{path}: root attribute 'store' is {store!r}; it must be one of {STORES}.")
        read_layout = _read_stats_layout if store == "stats" else _read_layout
        datasets = {name: read_layout(path, name, item) for name, item in (group or {}).items()}
        run_id = attrs.get("run_id")
        return ShardHeader(
            path=path,
            rank=rank,
            world_size=world_size,
            step=step,
            run_id=None if run_id is None else _text_attr(run_id),
            datasets=datasets,
            store=store,
        )


MAX_CELLS = 1 << 20
"""More cells than this in one dataset is not a recording: refused before any memory is spent."""
MAX_COMPRESSION = 2000
"""gzip cannot compress more than ~1000:1; a larger ratio means chunks that were never written."""


LINK_KINDS = {h5py.h5l.TYPE_SOFT: "SoftLink", h5py.h5l.TYPE_EXTERNAL: "ExternalLink"}


def _refuse_links(path: Path, handle: h5py.File) -> None:
    """Refuse soft, external and user-defined links anywhere in the file: a shard is one file.

    Visits the links with HDF5's own iterator (milliseconds; h5py's object wrappers take ~20x longer).
    """
    problems: list[str] = []

    def check_link(name: bytes, info: Any) -> None:
        if info.type != h5py.h5l.TYPE_HARD:
            problems.append(f"/{name.decode(errors='replace')} is a {LINK_KINDS.get(info.type, 'user-defined link')}")

    handle.id.links.visit(check_link, info=True)
    if problems:
        _refuse_foreign_data(path, problems)


def _refuse_foreign_storage(path: Path, array: h5py.Dataset) -> None:
    """Refuse an array read from outside the file: a virtual dataset or one with external storage."""
    if array.is_virtual or array.external:
        kind = "virtual dataset" if array.is_virtual else "dataset with external storage"
        _refuse_foreign_data(path, [f"{array.name} is a {kind}"])


def _refuse_foreign_data(path: Path, problems: list[str]) -> NoReturn:
    raise BpsevalError(
        f"{path}: refers to data outside the file ({'; '.join(problems[:3])}); a shard must hold its own"
        " arrays. Rewrite it with ShardWriter."
    )


def _check_stored(path: Path, where: str, array: h5py.Dataset, file_size: int) -> None:
    """Refuse arrays stored outside the file, or declaring more data than the whole file could hold
    (truncated, or built to exhaust memory); compared with the file's size, so no chunk index has
    to be walked."""
    _refuse_foreign_storage(path, array)
    compressed = array.compression is not None or array.scaleoffset is not None
    if array.nbytes > file_size * (MAX_COMPRESSION if compressed else 1):
        raise BpsevalError(
            f"{where}: {array.name.rsplit('/', 1)[-1]} declares shape {array.shape} ({array.nbytes} bytes) but the"
            f" file holds only {file_size} bytes; the shard is truncated or damaged. Re-run validation to rewrite it."
        )


def _text_attr(value: Any) -> str | None:
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    return None if value is None else str(value)


def _int_attr(path: Path, attrs: h5py.AttributeManager, key: str) -> int:
    value = attrs.get(key)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise BpsevalError(f"{path}: root attribute {key!r} must be an integer, found {value!r}.")
    return int(value)


RAW_ARRAYS = ("rhat", "robs", "dfs", "sample_idx", "cell_ids")


def _read_layout(path: Path, name: str, group: Any) -> DatasetLayout:
    where = f"{path}: dataset {name!r}"
    if not isinstance(group, h5py.Group):
        raise BpsevalError(f"{where}: /{DATASETS_GROUP}/{name} must be a group holding rhat and robs.")
    members = set(group)  # each HDF5 object opened once and only if present: lookups are slow
    arrays = {key: group[key] if key in members else None for key in RAW_ARRAYS}
    for key in ("rhat", "robs"):
        if not isinstance(arrays[key], h5py.Dataset):
            raise BpsevalError(f"{where}: missing the {key!r} array; every dataset group needs rhat and robs.")
    for key, array in arrays.items():
        if array is not None and not isinstance(array, h5py.Dataset):
            raise BpsevalError(f"{where}: {key} must be an array, found a {type(array).__name__}.")
    present = {key: array for key, array in arrays.items() if array is not None}
    rhat, robs, dfs, index = present["rhat"], present["robs"], present.get("dfs"), present.get("sample_idx")
    if rhat.ndim != 2 or robs.shape != rhat.shape:
        raise BpsevalError(
            f"{where}: rhat and robs must both have shape (samples, cells); got {rhat.shape} and {robs.shape}."
        )
    for key in ("rhat", "robs", "dfs"):
        if key in present and present[key].dtype.kind not in "biuf":
            raise BpsevalError(f"{where}: {key} must be numeric, found dtype {present[key].dtype}.")
    n_rows, n_cells = rhat.shape
    if n_cells > MAX_CELLS:
        raise BpsevalError(f"{where}: {n_cells} cells is more than bpseval reads ({MAX_CELLS}); is the array transposed?")
    file_size = path.stat().st_size
    for array in present.values():
        _check_stored(path, where, array, file_size)
    dfs_shape = None if dfs is None else dfs.shape
    if dfs_shape is not None and dfs_shape not in ((n_rows, n_cells), (n_rows, 1), (n_rows,)):
        raise BpsevalError(
            f"{where}: dfs has shape {dfs_shape} but rhat/robs have shape {rhat.shape}; dfs must be"
            f" ({n_rows}, {n_cells}), ({n_rows}, 1) or ({n_rows},)."
        )
    if index is not None and (index.shape != (n_rows,) or index.dtype.kind not in "iu"):
        raise BpsevalError(
            f"{where}: sample_idx must be integers of shape ({n_rows},), found {index.dtype} {index.shape}."
        )
    cell_ids = None
    if "cell_ids" in present:
        cell_ids = read_cell_ids(present["cell_ids"])
        if cell_ids.shape != (n_cells,):
            raise BpsevalError(f"{where}: cell_ids must have shape ({n_cells},), found {cell_ids.shape}.")
    rate_kind = _text_attr(group.attrs.get("rate_kind", "rate"))
    if rate_kind not in RATE_KINDS:
        raise BpsevalError(f"{where}: attribute rate_kind is {rate_kind!r}; it must be one of {RATE_KINDS}.")
    nbytes = sum(array.nbytes for key, array in present.items() if key != "cell_ids")
    return DatasetLayout(name, n_rows, n_cells, rate_kind, dfs_shape, index is not None, cell_ids, nbytes)


def _read_stats_layout(path: Path, name: str, group: Any) -> DatasetLayout:
    """A dataset group of a stats-only shard: per-cell sums, and optional per-block sums."""
    where = f"{path}: dataset {name!r}"
    if not isinstance(group, h5py.Group):
        raise BpsevalError(f"{where}: /{DATASETS_GROUP}/{name} must be a group.")
    shapes = {key: group[key].shape if isinstance(group.get(key), h5py.Dataset) else None for key in STAT_FIELDS}
    if None in shapes.values() or len(set(shapes.values())) != 1 or len(shapes["n_valid"]) != 1:
        raise BpsevalError(
            f"{where}: a stats-only dataset needs arrays {', '.join(STAT_FIELDS)} of one shape (cells,); found {shapes}."
        )
    n_cells = shapes["n_valid"][0]
    block_size = None
    if "blocks" in group:
        block_shapes = {group["blocks"][key].shape for key in STAT_FIELDS if key in group["blocks"]}
        if len(block_shapes) != 1 or len(next(iter(block_shapes))) != 2 or next(iter(block_shapes))[1] != n_cells:
            raise BpsevalError(f"{where}: blocks/ must hold {', '.join(STAT_FIELDS)} of one shape (blocks, {n_cells}).")
        block_size = _int_attr(path, group.attrs, "block_size")
    read_later = [*STAT_FIELDS, *(f"blocks/{key}" for key in STAT_FIELDS if block_size is not None), "cell_ids"]
    for key in read_later:
        if key in group:
            _refuse_foreign_storage(path, group[key])
    cell_ids = read_cell_ids(group["cell_ids"]) if "cell_ids" in group else None
    rate_kind = _text_attr(group.attrs.get("rate_kind", "rate"))
    samples = _int_attr(path, group.attrs, "samples")
    dropped = _int_attr(path, group.attrs, "duplicates_dropped")
    return DatasetLayout(
        name, samples, n_cells, rate_kind, None, block_size is not None, cell_ids, 0, "stats", block_size, dropped
    )


def read_stats(path: Path, layout: DatasetLayout) -> tuple[CellStats, CellStats | None]:
    """The per-cell sums of a stats-only dataset, and its per-block sums when stored; checked for sanity."""
    with open_shard(path) as handle:
        group = handle[DATASETS_GROUP][layout.name]
        total = CellStats(*(_read(path, layout.name, group[key], slice(None)) for key in STAT_FIELDS))
        blocks = None
        if layout.block_size is not None:
            blocks = CellStats(*(_read(path, layout.name, group["blocks"][key], slice(None)) for key in STAT_FIELDS))
    for stats in (total, blocks):
        if stats is not None and not all(np.isfinite(getattr(stats, key)).all() for key in STAT_FIELDS):
            raise BpsevalError(f"{path}: dataset {layout.name!r}: stats-only sums hold NaN or infinite values.")
    return (
        CellStats(total.n_valid.astype(np.int64), *(getattr(total, key).astype(np.float64) for key in STAT_FIELDS[1:])),
        blocks,
    )


def read_cell_ids(array: h5py.Dataset) -> np.ndarray:
    """cell_ids as int64 or str values (byte strings are decoded as UTF-8)."""
    if array.dtype.kind in "SO" or h5py.check_string_dtype(array.dtype) is not None:
        return np.asarray(array.asstr("utf-8")[()], dtype=str)
    return np.asarray(array[()], dtype=np.int64)


@contextmanager
def open_dataset(path: Path, layout: DatasetLayout) -> Iterator[DatasetReader]:
    """One dataset of a shard, opened to read its rows.

    Only opening and reading are turned into BpsevalError here; errors raised by the caller's
    code inside the block pass through unchanged. Open one shard at a time: HDF5 keeps a chunk
    cache of up to 8 MiB for every open array.
    """
    with _open_file(path) as handle:
        try:
            reader = DatasetReader(path, layout, handle[DATASETS_GROUP][layout.name])
        except Exception as error:
            raise BpsevalError(
                f"{path}: dataset {layout.name!r} cannot be opened ({_short(error)}); the shard changed"
                " since its header was read or is damaged."
            ) from None
        yield reader


def read_sample_idx(path: Path, dataset: str) -> np.ndarray:
    """The whole sample_idx array of one dataset of a shard."""
    with open_shard(path) as handle:
        return _read(path, dataset, handle[DATASETS_GROUP][dataset]["sample_idx"], slice(None)).astype(np.int64)


class DatasetReader:
    """Reads the rows of one dataset of an open shard: each array is looked up once (h5py lookups cost ~0.1 ms)."""

    def __init__(self, path: Path, layout: DatasetLayout, group: h5py.Group) -> None:
        self.path = path
        self.layout = layout
        self._rhat, self._robs = group["rhat"], group["robs"]
        self._dfs = group["dfs"] if layout.dfs_shape else None

    def rows(self, chunk_rows: int, sample_idx: np.ndarray | None = None) -> Iterator[RowChunk]:
        """The rows in chunks of `chunk_rows` rows. `sample_idx`, this dataset's whole sample_idx
        as the caller has already read it, is sliced into the chunks (else they carry none)."""
        for start in range(0, self.layout.n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, self.layout.n_rows))
            rhat = self._read(self._rhat, rows)
            robs = self._read(self._robs, rows)
            dfs = None if self._dfs is None else self._read(self._dfs, rows)
            index = None if sample_idx is None else sample_idx[rows]
            yield RowChunk(start, rhat, robs, as_weights(dfs, *rhat.shape), index)

    def _read(self, array: h5py.Dataset, rows: slice) -> np.ndarray:
        return _read(self.path, self.layout.name, array, rows)


def _read(path: Path, dataset: str, array: h5py.Dataset, rows: slice) -> np.ndarray:
    try:
        return array[rows]
    except Exception as error:
        raise BpsevalError(
            f"{path}: dataset {dataset!r}: cannot read {array.name.rsplit('/', 1)[-1]} ({_short(error)});"
            " the file is probably truncated or damaged. Re-run validation to rewrite it."
        ) from None
