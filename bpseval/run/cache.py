"""A cache of merged steps, so that re-scoring a run merges only the steps whose shards changed.

`compute --all-steps`, `plot` and `report` score every step of a run, and users run them after
every epoch: without a cache, every step is read again each time. One entry holds the merged
statistics of one step (`MergedDataset`s, bit for bit). It is found by the step and `blocks`,
and used only when its key matches: every shard's identity (path in the run, rank, device,
inode, size, mtime and ctime in ns), the cache format, the bpseval and shard format versions, and
every setting the merge says its numbers depend on (chunk size, duplicate rule, kernel). A shard
rewritten in place gets a new inode (ShardWriter renames a new file into place) and a new ctime,
which no `os.utime` can set back.

Entries are zip files of `.npy` arrays and a JSON header, deflated (zlib), read without unpickling: a
cache never runs code. Deflating takes an entry to about 38% of its arrays' size (the counts, spike
sums and least and greatest counts shrink to a few percent, the float sums of rates and logs hardly at
all; byte shuffling before deflating gained nothing); `benchmarks/README.md` measures it against the
shards. They live in `<run>/.bpseval-cache/` when this process may write in the run directory
and owns it (a command run as root leaves no root-owned folder in a user's run), else in
`$XDG_CACHE_HOME/bpseval/<hash of the resolved run path>/` (default `~/.cache`). The run catalog
never takes them for shards (not `*.h5`), nor their temporary files for unfinished writes
(hidden, no `.h5`, not `.tmp`). Entries are written whole (temporary file, then rename), so
concurrent commands never see a partial one.

An entry is read by the side-file rule (`bpseval._sidefiles`: a regular file, never a FIFO, of at
most the size its key implies) and checked before anything in it is used: members stored
uncompressed or deflated, and no larger (unpacked) than the shards' layouts allow, a header of bounded size and nesting, a
sha256 digest of the header and every array (written with the entry, so a changed number is
found), the dtypes and shapes the merge makes, and the sums contract (`kernel.sums`). An entry
that fails any check is one warning line on this module's logger (`bpseval.run.cache`) and is
rebuilt by a fresh merge; an entry made for another key is a plain miss. A cache that cannot be
written is one warning, once per directory, and the command goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bpseval._sidefiles import SideFileError, parse_json, read_bytes
from bpseval._version import __version__
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.sums import LEGACY_STAT_FIELDS, ImpossibleSumsError, check_parts_add_up, checked_sums
from bpseval.run.merged import MergedDataset, dataset_cell_ids
from bpseval.shard.format import FORMAT_VERSION, DatasetLayout, ShardHeader

CACHE_FORMAT = 4
"""Bump when the layout of an entry or the meaning of its numbers changes: older entries are then rebuilt.
Format 4 deflates the members and adds each rank's padding copies (`MergedDataset.copies_valid`); format 3 adds
the digest and takes cell ids from the shards; format 2 held every field of `CellStats`; format 1
held n_valid, weight, spikes and model_ll only."""
CACHE_DIRECTORY = ".bpseval-cache"
"""The cache folder inside a run directory: the catalog walks into it and finds no `*.h5` file there."""
META = "meta.json"
META_DEPTH = 8
"""Levels of nesting of an entry's header (it has 4: the key's shards are a list of lists)."""
META_BYTES = 1 << 16
META_BYTES_EACH = 1 << 14
"""Bytes of an entry's header: META_BYTES, and META_BYTES_EACH per shard (its identity) and per dataset (its
numbers of samples, identity and warnings)."""
MEMBER_BYTES = 1 << 10
"""Bytes per member of an entry beyond its numbers: the .npy header (128 as written) and the zip's headers."""
_GROUPS = ("per_rank", "per_block")
_STAT_DTYPES = {field: np.dtype("<i8" if field == "n_valid" else "<f8") for field in STAT_FIELDS}
COPIES = "copies_valid"
"""The member of a dataset's `MergedDataset.copies_valid`, (ranks, cells) int64, when it has one."""
_ENTRY_FIELDS = {
    "name": str,
    "samples": int,
    "duplicates_dropped": int,
    "identity": str,
    "warnings": list,
    "per_block": bool,
    "copies": bool,
}
_ZIP_ERRORS = (zipfile.BadZipFile, EOFError, NotImplementedError, ValueError)
"""What zipfile raises reading a damaged archive (found by flipping its bytes): a bad signature or CRC-32, a cut
member, a version or flag it does not read, a seek to a negative offset computed from damaged headers."""

logger = logging.getLogger(__name__)
_warned: set[Path] = set()


def cache_directory(root: Path) -> Path:
    """Where the entries of the run at `root` live: in it when this process may write there and owns the run
    directory, else in the user's cache directory."""
    local = root / CACHE_DIRECTORY
    if os.access(local if local.is_dir() else root, os.W_OK) and _owns(root):
        return local
    base = os.environ.get("XDG_CACHE_HOME", "")
    user = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return user / "bpseval" / hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:24]


def _owns(root: Path) -> bool:
    """Whether this process's effective user owns `root` (always, where there are no user ids)."""
    if not hasattr(os, "geteuid"):
        return True
    try:
        return root.stat().st_uid == os.geteuid()
    except OSError:
        return False


def _identities(root: Path, shards: list[ShardHeader]) -> list[list[Any]]:
    """Each shard's path in the run, rank and file identity; raises OSError when a shard cannot be stat'ed."""
    found = []
    for header in shards:
        status = header.path.stat()
        found.append(
            [
                header.path.relative_to(root).as_posix(),
                header.rank,
                status.st_dev,
                status.st_ino,
                status.st_size,
                status.st_mtime_ns,
                status.st_ctime_ns,
            ]
        )
    return found


def content_digest(header: dict[str, Any], members: dict[str, bytes]) -> str:
    """sha256 of an entry's header (its key and datasets, as canonical JSON) and of every array member by name.

    Written with the entry and checked when it is read, so that a changed number or field is found before it is
    used. It guards against damage and editing, not against someone who recomputes it: the sums contract still
    checks what it holds.
    """
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, allow_nan=False).encode())
    for name in sorted(members):
        digest.update(f"\0{name}\0{len(members[name])}\0".encode())
        digest.update(members[name])
    return digest.hexdigest()


@dataclass(frozen=True)
class StepCache:
    """The cache entry of one step of a run, merged with `blocks`; `key` is everything its numbers depend on."""

    path: Path
    key: dict[str, Any]
    root: Path
    shards: list[ShardHeader]

    @classmethod
    def of(
        cls, root: Path, shards: list[ShardHeader], blocks: int | None, settings: dict[str, Any]
    ) -> StepCache | None:
        """The entry for these shards (in rank order) merged with `settings` (JSON values); None when a shard
        cannot be stat'ed (the merge says why)."""
        try:
            identities = _identities(root, shards)
        except (OSError, ValueError):  # ValueError: a shard path outside the run (the catalog never gives one)
            return None
        key = {
            "cache_format": CACHE_FORMAT,
            "bpseval": __version__,
            "shard_format": FORMAT_VERSION,
            "settings": settings,
            "step": shards[0].step,
            "blocks": blocks,
            "shards": identities,
        }
        name = f"step-{shards[0].step:06d}" + (f".blocks-{blocks}" if blocks else "") + ".npz"
        return cls(cache_directory(root) / name, key, root, shards)

    def load(self, parts: dict[str, list[tuple[ShardHeader, DatasetLayout]]]) -> list[MergedDataset] | None:
        """The cached datasets when the entry exists and matches the key, else None (the step is merged).

        `parts`: each dataset's shards and layouts, as the merge has them. An entry that matches the key but
        fails a check is one warning line, and None: the merge rewrites it.
        """
        try:
            return self._read(parts)
        except SideFileError as error:
            logger.warning(
                "Warning: merge cache entry %s cannot be used (%s); step %d is merged afresh and the entry rewritten.",
                self.path,
                error.reason,
                self.key["step"],
            )
            return None

    def save(self, datasets: list[MergedDataset], settings: dict[str, Any]) -> None:
        """Write the entry whole (temporary file, then rename), unless a shard or a setting changed during the merge,
        or the merge's sums are outside the sums contract (sums that overflowed: such a step is merged every time).

        A directory that cannot be written is one warning per directory; the command goes on.
        """
        try:
            if settings != self.key["settings"] or _identities(self.root, self.shards) != self.key["shards"]:
                return
        except OSError:
            return
        try:
            for dataset in datasets:
                _check_sums(dataset)
        except ImpossibleSumsError as error:
            logger.debug("%s: not cached, the merge made %s", self.path, error)
            return
        header, members = self._encode(datasets)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(META, json.dumps({**header, "digest": content_digest(header, members)}))
                for name, data in members.items():
                    archive.writestr(name, data)
            os.replace(temporary, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            if self.path.parent not in _warned:
                _warned.add(self.path.parent)
                logger.warning(
                    "Warning: cannot write the merge cache in %s (%s); every step is merged afresh."
                    " Make it writable, set XDG_CACHE_HOME, or pass --no-cache.",
                    self.path.parent,
                    error.strerror or error,
                )

    def _encode(self, datasets: list[MergedDataset]) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The header (key and datasets) and the array members of an entry; shard paths in warnings become
        placeholders."""
        paths = sorted(((str(h.path), i) for i, h in enumerate(self.shards)), key=lambda item: -len(item[0]))
        entries, members = [], {}
        for index, dataset in enumerate(datasets):
            warnings = list(dataset.warnings)
            for path, shard in paths:
                warnings = [warning.replace(path, f"\0{shard}\0") for warning in warnings]
            entries.append(
                {
                    "name": dataset.name,
                    "samples": dataset.samples,
                    "duplicates_dropped": dataset.duplicates_dropped,
                    "identity": dataset.identity,
                    "warnings": warnings,
                    "per_block": dataset.per_block is not None,
                    "copies": dataset.copies_valid is not None,
                }
            )
            if dataset.copies_valid is not None:
                members[f"{index}/{COPIES}.npy"] = _npy(
                    dataset.copies_valid.astype(_STAT_DTYPES["n_valid"], casting="same_kind")
                )
            for field in STAT_FIELDS:
                arrays = {"per_rank": np.stack([getattr(stats, field) for stats in dataset.per_rank])}
                if dataset.per_block is not None:
                    arrays["per_block"] = getattr(dataset.per_block, field)
                for group, values in arrays.items():
                    # the kernel's dtypes: another is a bug of the merge, not cast away
                    members[_member(index, group, field)] = _npy(values.astype(_STAT_DTYPES[field], casting="equiv"))
        return {"key": self.key, "datasets": entries}, members

    def _read(self, parts: dict[str, list[tuple[ShardHeader, DatasetLayout]]]) -> list[MergedDataset] | None:
        """The entry's datasets; None when there is none or it has another key; SideFileError when it fails a check."""
        limits = _Limits.of(parts, len(self.shards), self.key["blocks"])
        try:
            data = read_bytes(self.path, limits.file)
        except SideFileError as error:
            if error.missing:
                return None
            raise
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except _ZIP_ERRORS as error:
            raise self._damaged(f"not a zip archive ({error})") from None
        with archive:
            infos = {info.filename: info for info in archive.infolist()}
            if len(infos) > limits.members or sum(info.file_size for info in infos.values()) > limits.content:
                raise self._damaged(f"more members or bytes than {len(parts)} datasets of these shards can have")
            if META not in infos:
                raise self._damaged(f"no {META}")
            meta = parse_json(self._member(archive, infos[META], limits.meta), META_DEPTH, self.path)
            if not isinstance(meta, dict) or sorted(meta) != ["datasets", "digest", "key"]:
                raise self._damaged(f"{META} is not an object of key, datasets and digest")
            if meta["key"] != self.key:
                return None
            entries = meta["datasets"]
            if not isinstance(entries, list) or len(entries) != len(parts):
                raise self._damaged(f"{META} does not list the step's {len(parts)} datasets")
            for entry, name in zip(entries, parts, strict=True):
                self._check_entry(entry, name)
            expected = {
                _member(index, group, field)
                for index, entry in enumerate(entries)
                for group in _GROUPS[: 1 + entry["per_block"]]
                for field in STAT_FIELDS
            } | {f"{index}/{COPIES}.npy" for index, entry in enumerate(entries) if entry["copies"]}
            if set(infos) - {META} != expected:
                raise self._damaged("its arrays are not those of the datasets it lists")
            members = {name: self._member(archive, infos[name], limits.content) for name in sorted(expected)}
        if content_digest({"key": meta["key"], "datasets": entries}, members) != meta["digest"]:
            raise self._damaged("its content does not match its digest: it was changed after it was written")
        datasets = []
        for index, (entry, group) in enumerate(zip(entries, parts.values(), strict=True)):
            dataset = self._dataset(index, entry, group[0][1], members, limits.block_rows[index])
            try:
                _check_sums(dataset)
            except ImpossibleSumsError as error:
                raise self._damaged(str(error)) from None
            datasets.append(dataset)
        return datasets

    def _member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
        """The bytes of a member stored or deflated, unencrypted, of at most `limit` bytes unpacked."""
        packed = info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
        if packed or info.flag_bits & 0x1 or info.file_size > limit:
            raise self._damaged(
                f"{info.filename} is compressed otherwise than deflated, encrypted or larger than these shards allow"
            )
        try:
            return archive.read(info)  # unpacks at most file_size bytes, and checks the CRC-32
        except _ZIP_ERRORS as error:
            raise self._damaged(f"{info.filename} cannot be read ({error})") from None

    def _check_entry(self, entry: Any, name: str) -> None:
        """One dataset's fields in the header: their names and types, the dataset's name, counts >= 0, and
        placeholders of shards in its warnings that name shards of the step."""
        if not isinstance(entry, dict) or sorted(entry) != sorted(_ENTRY_FIELDS):
            raise self._damaged(f"a dataset in {META} does not have the fields {', '.join(_ENTRY_FIELDS)}")
        wrong = [field for field, kind in _ENTRY_FIELDS.items() if type(entry[field]) is not kind]
        if wrong or entry["name"] != name or entry["samples"] < 0 or entry["duplicates_dropped"] < 0:
            raise self._damaged(f"dataset {name!r} in {META} has a wrong name, type or count")
        for warning in entry["warnings"]:
            shards = warning.split("\0")[1::2] if isinstance(warning, str) else None
            if shards is None or warning.count("\0") % 2 or not all(_is_index(s, len(self.shards)) for s in shards):
                raise self._damaged(
                    f"dataset {name!r} in {META} has a warning that is not text naming the step's shards"
                )

    def _dataset(
        self, index: int, entry: dict[str, Any], layout: DatasetLayout, members: dict[str, bytes], block_rows: int
    ) -> MergedDataset:
        """One dataset of an entry whose header was checked: its arrays of the kernel's dtypes and the right shapes."""
        ranks, cells = len(self.shards), layout.n_cells
        groups = {}
        for group in _GROUPS[: 1 + entry["per_block"]]:
            fields = {
                field: self._array(members[_member(index, group, field)], field, _STAT_DTYPES[field])
                for field in STAT_FIELDS
            }
            shapes = {values.shape for values in fields.values()}
            rows, width = next(iter(shapes))
            if len(shapes) != 1 or width != cells or (rows != ranks if group == "per_rank" else rows > block_rows):
                raise self._damaged(f"{group} statistics of dataset {entry['name']!r} have shapes {sorted(shapes)}")
            groups[group] = CellStats(**fields)
        per_rank = groups["per_rank"]
        copies = None
        if entry["copies"]:
            copies = self._array(members[f"{index}/{COPIES}.npy"], COPIES, _STAT_DTYPES["n_valid"])
            if copies.shape != (ranks, cells) or copies.min(initial=0) < 0:
                raise self._damaged(f"{COPIES} of dataset {entry['name']!r} is not a count per rank and cell")
            if (copies.sum(axis=0) > entry["duplicates_dropped"]).any():
                raise self._damaged(f"{COPIES} of dataset {entry['name']!r} counts more copies than were dropped")
        warnings = []
        for warning in entry["warnings"]:
            pieces = warning.split("\0")
            pieces[1::2] = [str(self.shards[int(shard)].path) for shard in pieces[1::2]]
            warnings.append("".join(pieces))
        return MergedDataset(
            name=entry["name"],
            cell_ids=dataset_cell_ids(layout),
            rate_kind=layout.rate_kind,
            per_rank=[_row(per_rank, rank) for rank in range(ranks)],
            samples=entry["samples"],
            duplicates_dropped=entry["duplicates_dropped"],
            identity=entry["identity"],
            per_block=groups.get("per_block"),
            warnings=warnings,
            copies_valid=copies,
        )

    def _array(self, data: bytes, field: str, expected: np.dtype) -> np.ndarray:
        """A 2-D .npy member `field` of dtype `expected`, as a native array of its own (its header read before its
        data)."""
        stream = io.BytesIO(data)
        try:
            if np.lib.format.read_magic(stream) != (1, 0):  # the version write_array gives these arrays
                raise ValueError("not version 1.0")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        except ValueError as error:  # numpy's word for a damaged .npy header
            raise self._damaged(f"a {field} array is not a .npy array ({error})") from None
        rest = data[stream.tell() :]
        if dtype != expected or fortran or len(shape) != 2 or len(rest) != shape[0] * shape[1] * expected.itemsize:
            raise self._damaged(f"a {field} array is not a 2-D array of {expected}")
        return np.frombuffer(rest, dtype=expected).reshape(shape).astype(expected.newbyteorder("="))

    def _damaged(self, reason: str) -> SideFileError:
        return SideFileError(self.path, reason)


@dataclass(frozen=True)
class _Limits:
    """What an entry for a step's datasets can hold, from the shards' layouts: checked before anything is read."""

    members: int
    content: int
    """Bytes of all members."""
    meta: int
    block_rows: list[int]
    """Per dataset, the most rows its per-block statistics can have."""
    file: int

    @classmethod
    def of(cls, parts: dict[str, list[tuple[ShardHeader, DatasetLayout]]], ranks: int, blocks: int | None) -> _Limits:
        """Raw rows give `blocks` blocks; a stats-only dataset stores only blocks that hold samples (one each at
        most). Cell ids count as slack: an older format stored them."""
        meta = META_BYTES + META_BYTES_EACH * (ranks + len(parts))
        members = 1 + len(parts) * (2 + 2 * len(STAT_FIELDS))
        block_rows, content = [], meta
        for group in parts.values():
            layout = group[0][1]
            rows = sum(part.n_rows for _, part in group) if layout.store == "stats" else blocks or 0
            block_rows.append(rows)
            ids = dataset_cell_ids(layout).nbytes
            content += ((ranks + rows) * len(STAT_FIELDS) + ranks) * layout.n_cells * 8 + ids
        return cls(members, content + MEMBER_BYTES * members, meta, block_rows, content + 2 * MEMBER_BYTES * members)


def _member(index: int, group: str, field: str) -> str:
    return f"{index}/{group}/{field}.npy"


def _npy(values: np.ndarray) -> bytes:
    """`values` as the bytes of a .npy file (never pickled)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _row(stats: CellStats, index: int) -> CellStats:
    """Row `index` of (rows, cells) statistics, as arrays of its own."""
    return stats.map(lambda values: values[index].copy())


def _is_index(text: str, count: int) -> bool:
    return text.isascii() and text.isdigit() and int(text) < count


def _check_sums(dataset: MergedDataset) -> None:
    """Refuse (ImpossibleSumsError) statistics of `dataset` that no data gives: each rank's and each block's
    (`kernel.sums.checked_sums`), and blocks that do not add up to the ranks' total."""
    where = f"dataset {dataset.name!r}"
    for rank, stats in enumerate(dataset.per_rank):
        prefix = f"{where} rank {rank} "
        checked_sums(_stored_fields(stats, prefix), dataset.samples, prefix)
    if dataset.per_block is not None:
        prefix = f"{where} per-block "
        checked_sums(_stored_fields(dataset.per_block, prefix), dataset.samples, prefix)
        check_parts_add_up(dataset.total, dataset.per_block, prefix)


def _stored_fields(stats: CellStats, prefix: str) -> dict[str, np.ndarray]:
    """The fields of `stats` keyed `prefix + field`: the four a legacy stats-only shard holds when every other is NaN."""
    fields = stats.fields()
    legacy = all(np.isnan(fields[key]).all() for key in STAT_FIELDS[len(LEGACY_STAT_FIELDS) :])
    return {prefix + key: fields[key] for key in (LEGACY_STAT_FIELDS if legacy else STAT_FIELDS)}
