"""A cache of merged steps, so that re-scoring a run merges only the steps whose shards changed.

`compute --all-steps`, `plot` and `report` score every step of a run, and users run them after
every epoch: without a cache, every step is read again each time. One entry holds the merged
statistics of one step (`MergedDataset`s, bit for bit). It is found by the step and `blocks`,
and used only when its key matches: every shard's identity (path in the run, rank, device,
inode, size, mtime and ctime in ns) and every setting that changes the merge (cache format,
bpseval version, shard format version, chunk size, duplicate rule). A shard rewritten in place
gets a new inode (ShardWriter renames a new file into place) and a new ctime, which no
`os.utime` can set back.

Entries are zip files of `.npy` arrays and a JSON header, read with `allow_pickle=False`: a
cache never runs code. They live in `<run>/.bpseval-cache/` when the run directory is writable,
else in `$XDG_CACHE_HOME/bpseval/<hash of the resolved run path>/` (default `~/.cache`). The
run catalog never takes them for shards (not `*.h5`), nor their temporary files for unfinished
writes (hidden, no `.h5`, not `.tmp`). Entries are written whole (temporary file, then rename),
so concurrent commands never see a partial one; a corrupt, truncated or mismatched entry is
ignored and rebuilt (the zip's CRC-32 catches flipped bytes); a cache that cannot be written
is one warning on the `bpseval.cache` logger, once per directory, and the command goes on.
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

from bpseval._version import __version__
from bpseval.kernel.stats import MIN_RATE, STAT_FIELDS, CellStats
from bpseval.run.dedup import RHAT_COPY_RTOL
from bpseval.run.merge import CHUNK_ELEMENTS, MergedDataset
from bpseval.shard.format import FORMAT_VERSION, DatasetLayout, ShardHeader

CACHE_FORMAT = 2
"""Bump when the layout of an entry or the meaning of its numbers changes: older entries are then rebuilt.
Format 2 holds every field of `CellStats`; format 1 held n_valid, weight, spikes and model_ll only."""
CACHE_DIRECTORY = ".bpseval-cache"
"""The cache folder inside a writable run directory: the catalog walks into it and finds no `*.h5` file there."""
_STAT_DTYPES = {field: np.dtype(np.int64 if field == "n_valid" else np.float64) for field in STAT_FIELDS}
_UNREADABLE = (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, zipfile.BadZipFile)
"""What reading a damaged or foreign entry can raise (BadZipFile: truncated, garbage or a failed CRC-32)."""

logger = logging.getLogger(__name__)
_warned: set[Path] = set()


def cache_directory(root: Path) -> Path:
    """Where the entries of the run at `root` live: in it when it is writable, else in the user's cache directory."""
    local = root / CACHE_DIRECTORY
    if os.access(local if local.is_dir() else root, os.W_OK):
        return local
    base = os.environ.get("XDG_CACHE_HOME", "")
    user = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return user / "bpseval" / hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:24]


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


@dataclass(frozen=True)
class StepCache:
    """The cache entry of one step of a run, merged with `blocks`; `key` is everything its numbers depend on."""

    path: Path
    key: dict[str, Any]
    root: Path
    shards: list[ShardHeader]

    @classmethod
    def of(cls, root: Path, shards: list[ShardHeader], blocks: int | None) -> StepCache | None:
        """The entry for these shards (in rank order); None when a shard cannot be stat'ed (the merge says why)."""
        try:
            identities = _identities(root, shards)
        except (OSError, ValueError):  # ValueError: a shard path outside the run (the catalog never gives one)
            return None
        key = {
            "cache_format": CACHE_FORMAT,
            "bpseval": __version__,
            "shard_format": FORMAT_VERSION,
            "chunk_elements": CHUNK_ELEMENTS,
            "rhat_copy_rtol": RHAT_COPY_RTOL,
            "min_rate": MIN_RATE,
            "step": shards[0].step,
            "blocks": blocks,
            "shards": identities,
        }
        name = f"step-{shards[0].step:06d}" + (f".blocks-{blocks}" if blocks else "") + ".npz"
        return cls(cache_directory(root) / name, key, root, shards)

    def load(self, parts: dict[str, list[tuple[ShardHeader, DatasetLayout]]]) -> list[MergedDataset] | None:
        """The cached datasets if the entry exists, is whole, matches the key and fits the shards' layouts."""
        try:
            with zipfile.ZipFile(self.path) as archive:
                meta = json.loads(archive.read("meta.json"))
                if meta.get("key") != self.key:
                    return None
                datasets = [self._decode(archive, index, entry) for index, entry in enumerate(meta["datasets"])]
        except FileNotFoundError:
            return None
        except _UNREADABLE as error:
            logger.debug("%s: ignored, rebuilt (%s)", self.path, error)
            return None
        return datasets if _fits(datasets, parts, len(self.shards)) else None

    def save(self, datasets: list[MergedDataset]) -> None:
        """Write the entry whole (temporary file, then rename), unless a shard changed during the merge.

        A directory that cannot be written is one warning per directory; the command goes on.
        """
        try:
            if _identities(self.root, self.shards) != self.key["shards"]:
                return
        except OSError:
            return
        meta, arrays = self._encode(datasets)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
                archive.writestr("meta.json", json.dumps(meta))
                for name, array in arrays.items():
                    buffer = io.BytesIO()
                    np.lib.format.write_array(buffer, array, allow_pickle=False)
                    archive.writestr(name, buffer.getvalue())
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

    def _encode(self, datasets: list[MergedDataset]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The JSON header and the arrays of an entry; shard paths in warnings become placeholders."""
        paths = sorted(((str(h.path), i) for i, h in enumerate(self.shards)), key=lambda item: -len(item[0]))
        entries, arrays = [], {}
        for index, dataset in enumerate(datasets):
            warnings = list(dataset.warnings)
            for path, shard in paths:
                warnings = [warning.replace(path, f"\0{shard}\0") for warning in warnings]
            entries.append(
                {
                    "name": dataset.name,
                    "rate_kind": dataset.rate_kind,
                    "samples": dataset.samples,
                    "duplicates_dropped": dataset.duplicates_dropped,
                    "identity": dataset.identity,
                    "warnings": warnings,
                    "per_block": dataset.per_block is not None,
                }
            )
            arrays[f"{index}/cell_ids.npy"] = np.asarray(dataset.cell_ids)
            for field in STAT_FIELDS:
                per_rank = [getattr(stats, field) for stats in dataset.per_rank]
                arrays[f"{index}/per_rank/{field}.npy"] = np.stack(per_rank)
                if dataset.per_block is not None:
                    arrays[f"{index}/per_block/{field}.npy"] = getattr(dataset.per_block, field)
        return {"key": self.key, "datasets": entries}, arrays

    def _decode(self, archive: zipfile.ZipFile, index: int, entry: dict[str, Any]) -> MergedDataset:
        """One dataset of an entry; raises ValueError when an array has the wrong type or shape."""

        def array(name: str) -> np.ndarray:
            with archive.open(f"{index}/{name}.npy") as file:
                return np.lib.format.read_array(file, allow_pickle=False)  # reading to the end checks the CRC-32

        def stats(group: str) -> CellStats:
            fields = {field: array(f"{group}/{field}") for field in STAT_FIELDS}
            typed = all(values.dtype == _STAT_DTYPES[field] and values.ndim == 2 for field, values in fields.items())
            if not typed or len({values.shape for values in fields.values()}) != 1:
                raise ValueError(f"{group} statistics of the wrong type")
            return CellStats(**fields)

        cell_ids = array("cell_ids")
        per_rank = stats("per_rank")
        warnings = []
        for warning in entry["warnings"]:
            pieces = warning.split("\0")
            pieces[1::2] = [str(self.shards[int(shard)].path) for shard in pieces[1::2]]
            warnings.append("".join(pieces))
        return MergedDataset(
            name=str(entry["name"]),
            cell_ids=cell_ids,
            rate_kind=str(entry["rate_kind"]),
            per_rank=[
                per_rank.map(lambda values, rank=rank: values[rank].copy()) for rank in range(per_rank.n_valid.shape[0])
            ],
            samples=int(entry["samples"]),
            duplicates_dropped=int(entry["duplicates_dropped"]),
            identity=str(entry["identity"]),
            per_block=stats("per_block") if entry["per_block"] else None,
            warnings=warnings,
        )


def _fits(datasets: list[MergedDataset], parts: dict[str, list[tuple[ShardHeader, DatasetLayout]]], ranks: int) -> bool:
    """Whether cached datasets have the names, cells and shapes the shards' headers say they must."""
    if [dataset.name for dataset in datasets] != list(parts):
        return False
    for dataset in datasets:
        layout = parts[dataset.name][0][1]
        cell_ids = layout.cell_ids if layout.cell_ids is not None else np.arange(layout.n_cells)
        shapes = [stats.n_valid.shape for stats in dataset.per_rank]
        blocks = dataset.per_block
        if (
            dataset.cell_ids.dtype.kind != cell_ids.dtype.kind
            or not np.array_equal(dataset.cell_ids, cell_ids)
            or dataset.rate_kind != layout.rate_kind
            or shapes != [(layout.n_cells,)] * ranks
            or (blocks is not None and blocks.n_valid.shape[1:] != (layout.n_cells,))
        ):
            return False
    return True
