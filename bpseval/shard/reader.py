"""Reading shards with validation: headers, row chunks, stored sums; every defect becomes a ShardError naming the file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np

from bpseval.errors import BpsevalError
from bpseval.kernel.stats import RATE_KINDS, STAT_FIELDS, CellStats, as_weights
from bpseval.shard.format import (
    DATASETS_GROUP,
    FORMAT,
    FORMAT_VERSION,
    STORES,
    DatasetLayout,
    RowChunk,
    ShardHeader,
)


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
        datasets = {}
        for name, item in (group or {}).items():
            if not isinstance(name, str):  # h5py gives bytes for a name that is not valid UTF-8
                raise BpsevalError(
                    f"{path}: dataset name {name!r} is not valid UTF-8 text; the shard is damaged. Re-run validation"
                    " to rewrite it."
                )
            datasets[name] = read_layout(path, name, item)
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
