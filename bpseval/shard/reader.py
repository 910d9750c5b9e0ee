"""Reading shards with validation: headers, row chunks, stored sums; every defect becomes a ShardError naming the file.

Only the exceptions that h5py raises on damaged files, caught around the h5py calls themselves,
become "damaged shard" errors: a bug in bpseval's own code surfaces as its own traceback.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import h5py
import numpy as np

from bpseval.errors import BpsevalError, ShardError
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.stats import RATE_KINDS, Blocks, as_weights
from bpseval.kernel.sums import LEGACY_STAT_FIELDS, ImpossibleSumsError, check_parts_add_up, checked_sums
from bpseval.shard.format import (
    DATASETS_GROUP,
    FORMAT,
    FORMAT_VERSION,
    STORES,
    DatasetLayout,
    RowChunk,
    ShardHeader,
)

H5PY_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)
"""What h5py raises on damaged files; caught only around h5py calls."""


class _h5py_errors:
    """Turn an h5py failure inside the block (which must hold h5py calls only) into a ShardError naming the file.

    A class rather than a generator-based context manager: it wraps every h5py call of every header.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        if kind is not None and isinstance(error, H5PY_ERRORS) and not isinstance(error, BpsevalError):
            raise ShardError(
                f"{self.path}: damaged shard ({kind.__name__}: {_short(error)}); re-run validation to rewrite it."
            ) from None


@contextmanager
def open_shard(path: Path) -> Iterator[h5py.File]:
    """Open a shard read-only, without HDF5 file locks (shards are immutable once renamed into
    place, and locks are missing or broken on many shared filesystems).

    A file that cannot be opened is a ShardError naming it. Errors raised inside the block pass
    through unchanged: the reading code catches h5py's failures around the h5py calls themselves.
    """
    with _open_file(path) as handle:
        yield handle


class NotAShardError(ShardError):
    """The file is not a bpseval shard at all: not HDF5, or HDF5 without (or with another) root attribute 'format'.

    A damaged shard is a plain ShardError: this one lets a run skip foreign files (a mask file,
    say) that are not named like shards. `reason` says why in a few words.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # errors travel from the header-reading child by pickle
        return type(self), (str(self), self.reason)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The 8 bytes HDF5 looks for at offset 0, 512, 1024, 2048, ... of a file."""


def _has_hdf5_signature(path: Path) -> bool:
    """Whether the file holds the HDF5 signature where HDF5 looks for it (True when it cannot be read: can't tell)."""
    try:
        with open(path, "rb") as stream:
            size, offset = os.fstat(stream.fileno()).st_size, 0
            while offset + len(HDF5_SIGNATURE) <= size:
                stream.seek(offset)
                if stream.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return True
                offset = max(512, 2 * offset)
    except OSError:
        return True
    return False


def _open_file(path: Path) -> h5py.File:
    return h5py.File(_open_id(path))


@functools.cache
def _file_access() -> h5py.h5p.PropFAID:
    """The file access properties of `h5py.File(path, "r", locking=False)`, made once (h5py makes them on every open)."""
    plist = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    plist.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    plist.set_file_locking(False, ignore_when_disabled=False)
    return plist


def _open_id(path: Path) -> h5py.h5f.FileID:
    try:
        return h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY, fapl=_file_access())
    except PermissionError:
        raise ShardError(f"{path}: not readable (permission denied); fix its permissions or move it away.") from None
    except H5PY_ERRORS as error:
        message = (
            f"{path}: cannot be read as an HDF5 file ({_short(error)}). It may be truncated or not a"
            " shard; delete or move it out of the run directory."
        )
        if _has_hdf5_signature(path):
            raise ShardError(message) from None
        raise NotAShardError(message, "not an HDF5 file") from None


def _short(error: BaseException) -> str:
    return str(error).split("\n")[0][:200]


def read_header(path: Path) -> ShardHeader:
    """Read and validate a shard's attributes and dataset layouts; raises BpsevalError if invalid."""
    with open_shard(path) as handle:
        attrs = _attrs(path, handle, ("format", "format_version", "rank", "world_size", "step", "store", "run_id"))
        fmt = _text_attr(attrs["format"])
        if fmt != FORMAT:
            reason = "no root attribute 'format'" if fmt is None else f"root attribute 'format' is {fmt!r}"
            raise NotAShardError(
                f"{path}: not a bpseval shard ({reason}, expected {FORMAT!r}). Move other .h5 files out of the run"
                " directory.",
                reason,
            )
        version = _int_attr(path, attrs, "format_version")
        if version != FORMAT_VERSION:
            raise ShardError(
                f"{path}: shard format version {version} is not supported (this bpseval reads version"
                f" {FORMAT_VERSION}); upgrade bpseval or rewrite the shard."
            )
        rank, world_size, step = (_int_attr(path, attrs, key) for key in ("rank", "world_size", "step"))
        if world_size < 1 or not 0 <= rank < world_size:
            raise ShardError(f"{path}: rank {rank} is outside 0..world_size-1 (world_size {world_size}).")
        _refuse_links(path, handle)
        with _h5py_errors(path):
            group = handle.get(DATASETS_GROUP)
        if group is not None and not isinstance(group, h5py.Group):
            raise ShardError(f"{path}: /{DATASETS_GROUP} must be a group holding one group per dataset.")
        store = _text_attr(attrs["store"] if attrs["store"] is not None else "raw")
        if store not in STORES:
            raise ShardError(f"{path}: root attribute 'store' is {store!r}; it must be one of {STORES}.")
        read_layout = _read_stats_layout if store == "stats" else _read_layout
        with _h5py_errors(path):
            items = _children(group.id) if group is not None else []
        datasets = {}
        file_size = path.stat().st_size
        for name, item in items:
            if not isinstance(name, str):  # h5py gives bytes for a name that is not valid UTF-8
                raise ShardError(
                    f"{path}: dataset name {name!r} is not valid UTF-8 text; the shard is damaged. Re-run validation"
                    " to rewrite it."
                )
            datasets[name] = read_layout(path, name, item, file_size)
        run_id = attrs["run_id"]
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


MAX_COMPRESSION = 100
"""Largest ratio of declared to stored bytes accepted for a compressed array larger than FREE_BYTES.

Measured with gzip level 9: float rates 1.1-1.2:1, sparse spike counts 35-52:1, sample_idx
0..N-1 5:1 (59:1 with shuffle); only constant arrays compress more (~700:1), and those are
accepted up to FREE_BYTES. So a 1 MB shard makes bpseval read at most ~100 MB per array."""


FREE_BYTES = 1 << 24
"""Arrays declaring up to 16 MiB are read whatever their compression: cheap in memory and time."""


LINK_KINDS = {h5py.h5l.TYPE_SOFT: "SoftLink", h5py.h5l.TYPE_EXTERNAL: "ExternalLink"}


def _refuse_links(path: Path, handle: h5py.File) -> None:
    """Refuse soft, external and user-defined links anywhere in the file: a shard is one file.

    Visits the links with HDF5's own iterator (milliseconds; h5py's object wrappers take ~20x longer).
    """
    problems: list[str] = []

    def check_link(name: bytes, info: Any) -> None:
        if info.type != h5py.h5l.TYPE_HARD:
            problems.append(f"/{name.decode(errors='replace')} is a {LINK_KINDS.get(info.type, 'user-defined link')}")

    with _h5py_errors(path):
        handle.id.links.visit(check_link, info=True)
    if problems:
        _refuse_foreign_data(path, problems)


@dataclass(frozen=True)
class _ArrayInfo:
    """What the checks need to know of one HDF5 array, read with h5py calls only."""

    location: str
    """Its path inside the file, e.g. /datasets/d/rhat."""
    shape: tuple[int, ...]
    dtype: np.dtype
    foreign: str | None
    """"virtual dataset" or "dataset with external storage" when its data is outside the file."""
    filtered: bool
    stored: int
    """Bytes allocated in the file for its data (compressed chunks count as stored)."""
    missing_chunks: int
    """Chunks of a chunked array that were never written: they read as the fill value, not as data."""

    @property
    def name(self) -> str:
        return self.location.rsplit("/", 1)[-1]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _array_info(path: Path, location: str, array: h5py.h5d.DatasetID) -> _ArrayInfo:
    """What the checks need of the array at `location`, with h5py's low-level calls (its Dataset properties
    cost ~10x more, paid for every array of every dataset of every shard)."""
    with _h5py_errors(path):
        shape, dtype = tuple(array.shape), array.dtype
        plist = array.get_create_plist()
        layout = plist.get_layout()
        virtual, external = layout == h5py.h5d.VIRTUAL, plist.get_external_count() > 0
        foreign = "virtual dataset" if virtual else "dataset with external storage" if external else None
        if foreign is not None:
            return _ArrayInfo(location, shape, dtype, foreign, False, 0, 0)
        filtered = plist.get_nfilters() > 0
        stored = array.get_storage_size()
        chunks = plist.get_chunk() if layout == h5py.h5d.CHUNKED else None
        written = array.get_num_chunks() if chunks is not None else 0
    expected = 0 if chunks is None else math.prod(-(-n // c) for n, c in zip(shape, chunks, strict=True))
    return _ArrayInfo(location, shape, dtype, None, filtered, stored, max(0, expected - written))


def _children(group: h5py.h5g.GroupID) -> list[tuple[str | bytes, Any]]:
    """The members of a group as (name, low-level object id), in HDF5's order; a name that is not valid
    UTF-8 stays bytes, as h5py gives it. Must be called inside `_h5py_errors`."""
    names: list[bytes] = []
    group.links.iterate(names.append)
    return [(_decoded(name), h5py.h5o.open(group, name)) for name in names]


def _decoded(name: bytes) -> str | bytes:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return name


OBJECT_KINDS = {h5py.h5g.GroupID: "Group", h5py.h5d.DatasetID: "Dataset", h5py.h5t.TypeID: "Datatype"}
"""The names h5py gives the objects behind low-level ids (in messages: "found a Group")."""


def _kind(item: Any) -> str:
    return next((name for kind, name in OBJECT_KINDS.items() if isinstance(item, kind)), type(item).__name__)


def _refuse_foreign_storage(path: Path, info: _ArrayInfo) -> None:
    """Refuse an array read from outside the file: a virtual dataset or one with external storage."""
    if info.foreign is not None:
        _refuse_foreign_data(path, [f"{info.location} is a {info.foreign}"])


def _refuse_foreign_data(path: Path, problems: list[str]) -> NoReturn:
    raise ShardError(
        f"{path}: refers to data outside the file ({'; '.join(problems[:3])}); a shard must hold its own"
        " arrays. Rewrite it with ShardWriter."
    )


def _check_stored(path: Path, where: str, info: _ArrayInfo, file_size: int) -> None:
    """Refuse arrays stored outside the file, or declaring more data than they store: unwritten chunks
    (which read as the fill value), more than the file holds (truncated), or a compression ratio no
    real data has (built to make the reader allocate or spin). Bounds memory and time by the file size."""
    _refuse_foreign_storage(path, info)
    stored = min(info.stored, file_size)
    if not info.filtered and info.nbytes > file_size:
        problem = f"the file holds only {file_size} bytes"
    elif info.missing_chunks and info.nbytes:
        problem = f"{info.missing_chunks} of its chunks were never written (they would read as fill values)"
    elif not info.filtered and info.nbytes > stored:
        problem = f"only {stored} bytes of it are stored in the file"
    elif info.filtered and info.nbytes > max(FREE_BYTES, MAX_COMPRESSION * stored):
        problem = (
            f"it is stored compressed in {stored} bytes, a ratio above {MAX_COMPRESSION}:1 that no recorded data"
            " reaches"
        )
    else:
        return
    raise ShardError(
        f"{where}: {info.name} declares shape {info.shape} ({info.nbytes} bytes) but {problem}; the shard is"
        " truncated, damaged or not written by ShardWriter. Re-run validation to rewrite it (uncompressed)."
    )


def _text_attr(value: Any) -> str | None:
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    return None if value is None else str(value)


def _attrs(path: Path, item: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The attributes `keys` of an HDF5 object (None where absent), read with h5py calls only."""
    with _h5py_errors(path):
        attrs = item.attrs  # a File's attrs look up its root group on every access
        return {key: attrs.get(key) for key in keys}


def _members(path: Path, group: h5py.Group, keys: tuple[str, ...]) -> dict[str, Any]:
    """The members `keys` of a group (None where absent); each HDF5 object opened once (lookups are slow)."""
    with _h5py_errors(path):
        present = set(group)
        return {key: group[key] if key in present else None for key in keys}


def _int_attr(path: Path, attrs: dict[str, Any], key: str) -> int:
    value = attrs.get(key)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise ShardError(f"{path}: attribute {key!r} must be an integer, found {value!r}.")
    return int(value)


RAW_ARRAYS = ("rhat", "robs", "dfs", "sample_idx", "cell_ids")
BLOCK_IDS = "block_ids"
"""The array of a stats-only shard's `blocks/` group that numbers its rows (sample_idx // block_size)."""


def _read_layout(path: Path, name: str, group: Any, file_size: int) -> DatasetLayout:
    """A dataset group of a raw shard (`group` a low-level object id): its arrays' shapes, types and storage."""
    where = f"{path}: dataset {name!r}"
    if not isinstance(group, h5py.h5g.GroupID):
        raise ShardError(f"{where}: /{DATASETS_GROUP}/{name} must be a group holding rhat and robs.")
    with _h5py_errors(path):
        arrays = {
            key: h5py.h5o.open(group, key.encode()) if group.links.exists(key.encode()) else None for key in RAW_ARRAYS
        }
    for key in ("rhat", "robs"):
        if not isinstance(arrays[key], h5py.h5d.DatasetID):
            raise ShardError(f"{where}: missing the {key!r} array; every dataset group needs rhat and robs.")
    for key, array in arrays.items():
        if array is not None and not isinstance(array, h5py.h5d.DatasetID):
            raise ShardError(f"{where}: {key} must be an array, found a {_kind(array)}.")
    info = {
        key: _array_info(path, f"/{DATASETS_GROUP}/{name}/{key}", array)
        for key, array in arrays.items()
        if array is not None
    }
    rhat, robs, dfs, index = info["rhat"], info["robs"], info.get("dfs"), info.get("sample_idx")
    if len(rhat.shape) != 2 or robs.shape != rhat.shape:
        raise ShardError(
            f"{where}: rhat and robs must both have shape (samples, cells); got {rhat.shape} and {robs.shape}."
        )
    for key in ("rhat", "robs", "dfs"):
        if key in info and info[key].dtype.kind not in "biuf":
            raise ShardError(f"{where}: {key} must be numeric, found dtype {info[key].dtype}.")
    n_rows, n_cells = rhat.shape
    if n_cells > MAX_CELLS:
        raise ShardError(f"{where}: {n_cells} cells is more than bpseval reads ({MAX_CELLS}); is the array transposed?")
    for array in info.values():
        _check_stored(path, where, array, file_size)
    dfs_shape = None if dfs is None else dfs.shape
    if dfs_shape is not None and dfs_shape not in ((n_rows, n_cells), (n_rows, 1), (n_rows,)):
        raise ShardError(
            f"{where}: dfs has shape {dfs_shape} but rhat/robs have shape {rhat.shape}; dfs must be"
            f" ({n_rows}, {n_cells}), ({n_rows}, 1) or ({n_rows},)."
        )
    if index is not None and (index.shape != (n_rows,) or index.dtype.kind not in "iu"):
        raise ShardError(
            f"{where}: sample_idx must be integers of shape ({n_rows},), found {index.dtype} {index.shape}."
        )
    ids = arrays["cell_ids"]
    cell_ids = _read_cell_ids(path, where, None if ids is None else h5py.Dataset(ids), n_cells, file_size)
    rate_kind = _text_attr(_attrs(path, h5py.Group(group), ("rate_kind",))["rate_kind"] or "rate")
    if rate_kind not in RATE_KINDS:
        raise ShardError(f"{where}: attribute rate_kind is {rate_kind!r}; it must be one of {RATE_KINDS}.")
    nbytes = sum(array.nbytes for key, array in info.items() if key != "cell_ids")
    return DatasetLayout(name, n_rows, n_cells, rate_kind, dfs_shape, index is not None, cell_ids, nbytes)


def _read_cell_ids(path: Path, where: str, array: Any, n_cells: int, file_size: int) -> np.ndarray | None:
    """A dataset's cell_ids (None when absent), checked to hold one id per cell."""
    if array is None:
        return None
    if not isinstance(array, h5py.Dataset):
        raise ShardError(f"{where}: cell_ids must be an array, found a {type(array).__name__}.")
    _check_stored(path, where, _array_info(path, array.name, array.id), file_size)
    with _h5py_errors(path):
        cell_ids = read_cell_ids(array)
    if cell_ids.shape != (n_cells,):
        raise ShardError(f"{where}: cell_ids must have shape ({n_cells},), found {cell_ids.shape}.")
    return cell_ids


def _read_stats_layout(path: Path, name: str, group: Any, file_size: int) -> DatasetLayout:
    """A dataset group of a stats-only shard: per-cell sums, and optional per-block sums."""
    where = f"{path}: dataset {name!r}"
    if not isinstance(group, h5py.h5g.GroupID):
        raise ShardError(f"{where}: /{DATASETS_GROUP}/{name} must be a group.")
    group = h5py.Group(group)
    members = _members(path, group, (*STAT_FIELDS, "blocks", "cell_ids"))
    fields = _stored_fields(where, "", members)
    arrays = {
        key: _array_info(path, members[key].name, members[key].id)
        for key in fields
        if isinstance(members[key], h5py.Dataset)
    }
    shapes = {key: arrays[key].shape if key in arrays else None for key in fields}
    one_shape = {shape for shape in shapes.values() if shape is not None}
    if None in shapes.values() or len(one_shape) != 1 or len(shape := one_shape.pop()) != 1:
        raise ShardError(
            f"{where}: a stats-only dataset needs arrays {', '.join(fields)} of one shape (cells,); found {shapes}."
        )
    n_cells = shape[0]
    if n_cells > MAX_CELLS:
        raise ShardError(f"{where}: {n_cells} cells is more than bpseval reads ({MAX_CELLS}).")
    attrs = _attrs(path, group, ("block_size", "rate_kind", "samples", "duplicates_dropped"))
    block_size = None
    if members["blocks"] is not None:
        group_of_blocks = isinstance(members["blocks"], h5py.Group)
        blocks = _members(path, members["blocks"], (*STAT_FIELDS, BLOCK_IDS)) if group_of_blocks else {}
        block_arrays = {
            key: _array_info(path, item.name, item.id) for key, item in blocks.items() if isinstance(item, h5py.Dataset)
        }
        block_shapes = {block_arrays[key].shape for key in fields if key in block_arrays}
        if (
            len(block_shapes) != 1
            or len(next(iter(block_shapes))) != 2
            or next(iter(block_shapes))[1] != n_cells
            or (any(key not in block_arrays for key in fields))
        ):
            raise ShardError(f"{where}: blocks/ must hold {', '.join(fields)} of one shape (blocks, {n_cells}).")
        ids = block_arrays.get(BLOCK_IDS)
        n_blocks = next(iter(block_shapes))[0]
        if (blocks.get(BLOCK_IDS) is not None and ids is None) or (
            ids is not None and (ids.shape != (n_blocks,) or ids.dtype.kind not in "iu")
        ):
            found = f"{ids.dtype} {ids.shape}" if ids is not None else f"a {type(blocks[BLOCK_IDS]).__name__}"
            raise ShardError(f"{where}: blocks/{BLOCK_IDS} must be integers of shape ({n_blocks},), found {found}.")
        arrays.update({f"blocks/{key}": array for key, array in block_arrays.items()})
        block_size = _int_attr(path, attrs, "block_size")
        if block_size < 1:
            raise ShardError(f"{where}: attribute 'block_size' is {block_size}; it must be >= 1.")
    for key, array in arrays.items():
        _check_stored(path, where, array, file_size)
        if array.dtype.kind not in "biuf":
            raise ShardError(f"{where}: {key} must be numeric, found dtype {array.dtype}.")
    cell_ids = _read_cell_ids(path, where, members["cell_ids"], n_cells, file_size)
    rate_kind = _text_attr(attrs["rate_kind"] or "rate")
    if rate_kind not in RATE_KINDS:
        raise ShardError(f"{where}: attribute rate_kind is {rate_kind!r}; it must be one of {RATE_KINDS}.")
    samples, dropped = _int_attr(path, attrs, "samples"), _int_attr(path, attrs, "duplicates_dropped")
    if samples < 0 or dropped < 0:
        raise ShardError(f"{where}: attributes samples ({samples}) and duplicates_dropped ({dropped}) must be >= 0.")
    return DatasetLayout(
        name, samples, n_cells, rate_kind, None, block_size is not None, cell_ids, 0, "stats", block_size, dropped
    )


def read_stats(path: Path, layout: DatasetLayout) -> tuple[CellStats, Blocks | None]:
    """The per-cell sums of a stats-only dataset, and its per-block sums with their ids when stored.

    Blocks are those that hold samples, with ids in `blocks/block_ids`; a shard without that array
    (written before it existed) holds dense blocks 0..B-1. Refuses (ShardError naming the file,
    dataset, field and first cell) sums that no data could produce: see `_checked_sums`, and ids that
    are not increasing or beyond the largest sample_idx.
    """
    with open_shard(path) as handle:
        with _h5py_errors(path):
            group = handle[DATASETS_GROUP][layout.name]
            fields = STAT_FIELDS if STAT_FIELDS[-1] in group else LEGACY_STAT_FIELDS
            arrays = {key: group[key] for key in fields}
            if layout.block_size is not None:
                stored = group["blocks"]
                keys = (*fields, BLOCK_IDS) if BLOCK_IDS in stored else fields
                arrays.update({f"blocks/{key}": stored[key] for key in keys})
        values = {key: _read(path, layout.name, array.id) for key, array in arrays.items()}
    where = f"{path}: dataset {layout.name!r}"
    total = _checked_sums(where, "", values, layout.n_rows)
    if layout.block_size is None:
        return total, None
    per_block = _checked_sums(where, "blocks/", values, layout.block_size)
    _check_blocks_add_up(where, total, per_block)
    n_blocks = per_block.n_valid.shape[0]
    ids = values.get(f"blocks/{BLOCK_IDS}")
    ids = np.arange(n_blocks, dtype=np.int64) if ids is None else _checked_block_ids(where, ids, layout.block_size)
    return total, Blocks(ids, per_block)


def _checked_block_ids(where: str, ids: np.ndarray, block_size: int) -> np.ndarray:
    """Block ids as int64, refused unless strictly increasing and within 0..(2^63 - 1) // block_size."""
    largest = np.iinfo(np.int64).max // block_size
    problems = []
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) > largest):
        problems.append(f"outside 0..{largest} (sample_idx // block_size)")
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        problems.append("not strictly increasing")
    if problems:
        raise ShardError(
            f"{where}: stored blocks/{BLOCK_IDS} {' and '.join(problems)}; the stats-only shard is damaged or was not"
            " written by ShardWriter. Re-run validation to rewrite it."
        )
    return ids.astype(np.int64)


def _stored_fields(where: str, prefix: str, members: dict[str, Any]) -> tuple[str, ...]:
    """The statistics a stats-only group holds: every field, or the four that shards held before the others existed."""
    extra = [key for key in STAT_FIELDS[len(LEGACY_STAT_FIELDS) :] if members.get(key) is not None]
    if not extra:
        return LEGACY_STAT_FIELDS
    missing = [key for key in STAT_FIELDS if members.get(key) is None]
    if missing:
        raise ShardError(
            f"{where}: {prefix}{', '.join(missing)} missing; a stats-only dataset holds every one of {', '.join(STAT_FIELDS)}."
        )
    return STAT_FIELDS


def _checked_sums(where: str, prefix: str, values: dict[str, np.ndarray], samples: int) -> CellStats:
    """`checked_sums` of a stats-only dataset's stored arrays: impossible sums are a ShardError naming the file."""
    try:
        return checked_sums(values, samples, prefix)
    except ImpossibleSumsError as error:
        raise _damaged_sums(where, error) from None


def _check_blocks_add_up(where: str, total: CellStats, blocks: CellStats) -> None:
    try:
        check_parts_add_up(total, blocks)
    except ImpossibleSumsError as error:
        raise _damaged_sums(where, error) from None


def _damaged_sums(where: str, error: ImpossibleSumsError) -> ShardError:
    return ShardError(
        f"{where}: stored {error}, so the stats-only shard is damaged or was not written by ShardWriter."
        " Re-run validation to rewrite it."
    )


def read_cell_ids(array: h5py.Dataset) -> np.ndarray:
    """cell_ids as int64 or str values (byte strings are decoded as UTF-8)."""
    if array.dtype.kind in "SO" or h5py.check_string_dtype(array.dtype) is not None:
        return np.asarray(array.asstr("utf-8")[()], dtype=str)
    return np.asarray(array[()], dtype=np.int64)


@contextmanager
def open_dataset(path: Path, layout: DatasetLayout) -> Iterator[DatasetReader]:
    """One dataset of a shard, opened to read its rows.

    Only opening and reading are turned into ShardError here; errors raised by the caller's
    code inside the block pass through unchanged. Open one shard at a time: HDF5 keeps a chunk
    cache of up to 8 MiB for every open array.
    """
    with ShardFile(path) as shard:
        yield shard.dataset(layout)


class ShardFile:
    """A shard opened once to read the rows and sample_idx of several of its datasets.

    Opening a file for every dataset, and h5py's high-level Group and Dataset objects, cost more
    than reading a small dataset (~0.5 ms per open, ~0.1 ms per object). Here the file is opened
    once and each array is opened by its full path with h5py's low-level calls and read the same
    way. Arrays are closed with the `DatasetReader` that holds them, so the HDF5 chunk cache (up to
    8 MiB per open array) is held for one dataset at a time. Use it as a context manager; opening
    and reading raise ShardError naming the file and dataset, and so does an array whose shape is
    not the one its header gave (the file changed since).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = _open_id(path)

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()  # the file itself closes when its last array (held by a DatasetReader) is closed

    def dataset(self, layout: DatasetLayout) -> DatasetReader:
        """A reader of the rows of `layout`'s dataset."""
        return DatasetReader(self, layout)

    def sample_idx(self, layout: DatasetLayout) -> np.ndarray:
        """The whole sample_idx array of one dataset, as int64 (bounded by the header's `_check_stored`)."""
        shape = (layout.n_rows,)
        return _read(self.path, layout.name, self.array(layout, "sample_idx", shape), shape=shape).astype(np.int64)

    def array(self, layout: DatasetLayout, key: str, shape: tuple[int, ...]) -> h5py.h5d.DatasetID:
        """The array `key` of `layout`'s dataset, opened, refused unless of `shape`."""
        try:
            array = h5py.h5d.open(self._file, f"{DATASETS_GROUP}/{layout.name}/{key}".encode())
            found = array.shape
        except H5PY_ERRORS as error:
            raise ShardError(
                f"{self.path}: dataset {layout.name!r} cannot be opened ({_short(error)}); the shard changed"
                " since its header was read or is damaged."
            ) from None
        if found != shape:
            raise ShardError(
                f"{self.path}: dataset {layout.name!r}: {key} has shape {found}, not {shape} as its header said; the"
                " shard changed since its header was read. Run the command again."
            )
        return array


class DatasetReader:
    """Reads the rows of one dataset of an open shard: each array is opened once, as its header described it."""

    def __init__(self, shard: ShardFile, layout: DatasetLayout) -> None:
        self.path = shard.path
        self.layout = layout
        self._shape = (layout.n_rows, layout.n_cells)
        self._rhat, self._robs = shard.array(layout, "rhat", self._shape), shard.array(layout, "robs", self._shape)
        self._dfs = shard.array(layout, "dfs", layout.dfs_shape) if layout.dfs_shape else None

    def rows(self, chunk_rows: int, sample_idx: np.ndarray | None = None) -> Iterator[RowChunk]:
        """The rows in chunks of `chunk_rows` rows. `sample_idx`, this dataset's whole sample_idx
        as the caller has already read it, is sliced into the chunks (else they carry none)."""
        for start in range(0, self.layout.n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, self.layout.n_rows))
            yield self.row_range(rows.start, rows.stop, None if sample_idx is None else sample_idx[rows])

    def row_range(self, start: int, stop: int, sample_idx: np.ndarray | None = None) -> RowChunk:
        """Rows [start, stop) (a bounded range: the caller keeps it to about one chunk)."""
        rows = slice(start, stop)
        rhat = self._read(self._rhat, rows, self._shape)
        robs = self._read(self._robs, rows, self._shape)
        dfs = None
        if self._dfs is not None:
            assert self.layout.dfs_shape is not None  # a layout with dfs has its shape
            dfs = self._read(self._dfs, rows, self.layout.dfs_shape)
        return RowChunk(start, rhat, robs, as_weights(dfs, *rhat.shape), sample_idx)

    def _read(self, array: h5py.h5d.DatasetID, rows: slice, shape: tuple[int, ...]) -> np.ndarray:
        return _read(self.path, self.layout.name, array, rows, shape)


def _read(
    path: Path,
    dataset: str,
    array: h5py.h5d.DatasetID,
    rows: slice = slice(None),
    shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Rows [rows.start, rows.stop) of an array (clipped to its length, as h5py slices), or all of it, in its
    stored dtype, with h5py's low-level calls (its Dataset.__getitem__ costs ~0.1 ms of Python per call).
    `shape`: the array's, when the caller has checked it (`ShardFile.array`), else asked of HDF5.
    An array without rows (a scalar, as h5py's slicing) is a ShardError. Only the h5py calls are guarded."""

    def cannot_read(reason: str) -> ShardError:
        name = _decoded((h5py.h5i.get_name(array) or b"?").rsplit(b"/", 1)[-1])
        shown = name if isinstance(name, str) else repr(name)  # bytes that are not UTF-8: their escapes
        return ShardError(
            f"{path}: dataset {dataset!r}: cannot read {shown} ({reason});"
            " the file is probably truncated or damaged. Re-run validation to rewrite it."
        )

    try:
        shape, dtype = array.shape if shape is None else shape, array.dtype
    except H5PY_ERRORS as error:
        raise cannot_read(_short(error)) from None
    if not shape:
        raise cannot_read("a scalar, not an array of rows")
    start, stop, _ = rows.indices(shape[0])
    count = (max(stop - start, 0), *shape[1:])
    out = np.empty(count, dtype=dtype)
    if out.size:
        try:
            if count == shape:  # the whole array: no selection to make (a third of the time of a small read)
                array.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
            else:
                space = array.get_space()
                space.select_hyperslab((start,) + (0,) * (len(shape) - 1), count)
                array.read(h5py.h5s.create_simple(count), space, out)
        except H5PY_ERRORS as error:
            raise cannot_read(_short(error)) from None
    return out
