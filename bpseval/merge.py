"""Merge the shards of one step into exact per-cell sufficient statistics.

Shards are found under a run directory, one step is chosen, the ranks are checked for
completeness and agreement, duplicate samples (DistributedSampler padding) are dropped by
`sample_idx`, and every dataset is streamed in row chunks into `CellStats`, per rank.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bpseval.errors import BpsevalError
from bpseval.parallel import run_tasks
from bpseval.shard import (
    DatasetLayout,
    DatasetReader,
    RowChunk,
    ShardHeader,
    is_shard_name,
    open_dataset,
    read_header,
    read_sample_idx,
    read_stats,
)
from bpseval.stats import (
    MIN_RATE,
    CellStats,
    InvalidValues,
    InvalidValuesError,
    add_by_block,
    batch_stats,
    find_invalid_values,
    pad_blocks,
)

CHUNK_ELEMENTS = 1 << 18
"""Entries (rows x cells) read per chunk: bounds memory whatever the shard size."""
RHAT_COPY_RTOL = 4e-3
"""Relative difference between copies of one sample's rhat that counts as rounding (float16 included)."""


@dataclass
class MergedDataset:
    """Statistics of one dataset after merging every rank's rows once."""

    name: str
    cell_ids: np.ndarray
    rate_kind: str
    per_rank: list[CellStats]
    samples: int
    duplicates_dropped: int
    identity: str = ""
    """Checksum of the dataset name, cell ids and scored sample_idx: equal identities scored the same samples."""
    per_block: CellStats | None = None
    """(blocks, cells) statistics by contiguous sample_idx block, when asked for and sample_idx is present."""
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> CellStats:
        """The statistics of all ranks together: they add up exactly."""
        total = CellStats.zeros(len(self.cell_ids))
        for stats in self.per_rank:
            total = total + stats
        return total


@dataclass
class MergedRun:
    """One step of a run, merged."""

    run_dir: Path
    step: int
    world_size: int
    files: list[Path]
    datasets: list[MergedDataset]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunFiles:
    """The files below a run directory: finished shards, and writes in progress or left by a crash."""

    shards: list[Path]
    leftovers: list[Path]


def scan_run_dir(run_dir: str | os.PathLike[str]) -> RunFiles:
    """Walk `run_dir` (following symlinks that stay inside it) for shards and temporary files.

    Raises BpsevalError for a missing directory and for a symlink that leads outside the run:
    bpseval reads nothing outside the directory it is given, and skips nothing silently.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise BpsevalError(f"{root}: no such directory. Pass the run directory that holds the shards.")
    inside = root.resolve()
    shards: dict[Path, Path] = {}
    leftovers: list[Path] = []
    visited: set[Path] = set()
    for directory, subdirectories, files in os.walk(root, followlinks=True):
        here = Path(directory)
        if here.resolve() in visited:
            subdirectories[:] = []
            continue
        visited.add(here.resolve())
        for name in subdirectories + files:
            path = here / name
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise BpsevalError(
                    f"{path}: a symlink to {path.resolve()}, outside the run directory {root}; bpseval reads only"
                    " files inside it. Copy the data in, or pass the directory it lives in."
                )
        for name in files:
            path = here / name
            if is_shard_name(name):
                shards.setdefault(path.resolve(), path)
            elif name.endswith(".tmp") or (name.startswith(".") and ".h5" in name):
                leftovers.append(path)
    return RunFiles(sorted(shards.values()), sorted(leftovers))


def find_shards(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every finished shard below `run_dir`, sorted; raises BpsevalError when there is none."""
    return require_shards(scan_run_dir(run_dir), run_dir)


def require_shards(files: RunFiles, run_dir: str | os.PathLike[str]) -> list[Path]:
    """The shards of a scan; raises BpsevalError, naming any unfinished writes, when there is none."""
    if not files.shards:
        raise BpsevalError(
            f"{run_dir}: no shards found (no *.h5 file below it). Write shards with bpseval.ShardWriter"
            " during validation, or pass the run directory that holds them."
            + _leftover_note(files.leftovers)
        )
    return files.shards


def _leftover_note(leftovers: list[Path]) -> str:
    if not leftovers:
        return ""
    shown = ", ".join(str(path) for path in leftovers[:5]) + (f" (+{len(leftovers) - 5} more)" if len(leftovers) > 5 else "")
    return f" Unfinished writes left behind (a writer was killed?): {shown}."


HEADER_TIMEOUT = 30.0
"""Seconds one shard's metadata may take to read (milliseconds when healthy); BPSEVAL_METADATA_TIMEOUT overrides it."""


def read_headers(
    paths: list[Path], timeout: float | None = None, meanwhile: Callable[[], None] | None = None, jobs: int = 1
) -> list[ShardHeader | BpsevalError]:
    """Every shard's header (or the error that makes it unusable), in the order of `paths`.

    HDF5 can loop forever on some damaged files (a corrupt global heap behind a string
    attribute), which no exception interrupts; so the headers are read in forked children (up
    to `jobs`, each reading a contiguous share of `paths`) and a file that takes longer than
    `timeout` is reported as damaged. Where forking is unsafe (not Linux, or torch loaded in
    this process: fork next to its threads can deadlock), they are read here, without that
    bound. `meanwhile()` is called once, while the children read.
    """
    if not paths or sys.platform != "linux" or "torch" in sys.modules:
        if meanwhile:
            meanwhile()
        return [_header_or_error(path) for path in paths]
    if timeout is None:
        timeout = float(os.environ.get("BPSEVAL_METADATA_TIMEOUT", HEADER_TIMEOUT))
    shares = np.array_split(np.arange(len(paths)), max(1, min(jobs, len(paths))))
    children = [_HeaderReader([paths[i] for i in share]) for share in shares]
    if meanwhile:
        meanwhile()
    return [header for child in children for header in child.collect(timeout)]


class _HeaderReader:
    """A forked child that reads the headers of `paths` in order and sends each back as it is read."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        context = multiprocessing.get_context("fork")
        self.receiver, sender = context.Pipe(duplex=False)
        self.child = context.Process(target=_send_headers, args=(paths, sender), daemon=True)
        self.child.start()
        sender.close()

    def collect(self, timeout: float) -> list[ShardHeader | BpsevalError]:
        """The headers, in order; a file that hangs or crashes the child is reported, and the
        files after it are read by a new child."""
        headers: list[ShardHeader | BpsevalError] = []
        try:
            for path in self.paths:
                if not self.receiver.poll(timeout):
                    headers.append(
                        BpsevalError(
                            f"{path}: reading its metadata did not finish within {timeout:g} s; the file is damaged"
                            " (HDF5 can loop forever on a corrupt heap). Move it out of the run directory."
                        )
                    )
                    break
                headers.append(self.receiver.recv())
        except EOFError:
            headers.append(
                BpsevalError(f"{self.paths[len(headers)]}: reading its metadata crashed the reader; the file is damaged.")
            )
        finally:
            self.child.kill()
            self.child.join()
            self.receiver.close()
        return headers + read_headers(self.paths[len(headers) :], timeout)


def _send_headers(paths: list[Path], sender: Any) -> None:
    for path in paths:
        sender.send(_header_or_error(path))
    sender.close()


def _header_or_error(path: Path) -> ShardHeader | BpsevalError:
    try:
        return read_header(path)
    except BpsevalError as error:
        return error


@dataclass(frozen=True)
class StepSelection:
    """The shards of the step to merge, in rank order, and why that step was chosen."""

    shards: list[ShardHeader]
    notes: list[str]


def step_ranks(headers: list[ShardHeader]) -> tuple[list[int], list[int], list[int]]:
    """For one step's shards: its world sizes, the ranks missing, and the ranks present more than once."""
    sizes = sorted({header.world_size for header in headers})
    ranks = [header.rank for header in headers]
    missing = [rank for rank in range(max(sizes)) if rank not in ranks] if sizes else []
    repeated = sorted({rank for rank in ranks if ranks.count(rank) > 1})
    return sizes, missing, repeated


def select_step(
    headers: list[ShardHeader], step: int | None, run_dir: Path, leftovers: list[Path] | None = None
) -> StepSelection:
    """The shards of `step` (default: the latest complete one), one per rank 0..W-1, in rank order.

    A step is complete when one world size is used and ranks 0..W-1 are each present once. Without
    `step`, newer incomplete steps are passed over with a note (their writers may still be running).
    """
    by_step: dict[int, list[ShardHeader]] = {}
    for header in headers:
        by_step.setdefault(header.step, []).append(header)
    notes = []
    if step is None:
        for candidate in sorted(by_step, reverse=True):
            sizes, missing, repeated = step_ranks(by_step[candidate])
            if len(sizes) == 1 and not missing and not repeated:
                step = candidate
                break
            notes.append(f"step {candidate} is incomplete ({_describe_ranks(sizes, missing, repeated)}); passed over.")
        else:
            step = max(by_step)  # none is complete: report the latest one's problem below
            notes = []
    elif step not in by_step:
        raise BpsevalError(f"{run_dir}: no shard has step {step}; steps found: {', '.join(map(str, sorted(by_step)))}.")
    chosen = by_step[step]
    sizes, missing, repeated = step_ranks(chosen)
    if len(sizes) > 1:
        listing = "; ".join(f"{h.path} says {h.world_size}" for h in chosen)
        raise BpsevalError(
            f"{run_dir}: step {step} mixes world sizes {sizes} ({listing}). Shards of one step must come"
            " from one run; move stale shards away or pick another --step."
        )
    if repeated:
        paths = [str(h.path) for h in chosen if h.rank == repeated[0]]
        raise BpsevalError(
            f"{run_dir}: rank {repeated[0]} of step {step} appears twice: {' and '.join(paths)}. Remove the stale copy."
        )
    if missing:
        found = sorted(h.rank for h in chosen)
        raise BpsevalError(
            f"{run_dir}: step {step} has world size {sizes[0]} but no shard for rank"
            f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} (found ranks"
            f" {', '.join(map(str, found))}). Did a rank crash before writing its shard?"
            + _leftover_note(leftovers or [])
        )
    return StepSelection(sorted(chosen, key=lambda h: h.rank), notes)


def _describe_ranks(sizes: list[int], missing: list[int], repeated: list[int]) -> str:
    problems = []
    if len(sizes) > 1:
        problems.append(f"world sizes {sizes}")
    if missing:
        problems.append(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} missing")
    if repeated:
        problems.append(f"rank{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} twice")
    return ", ".join(problems)


def merge_run(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    blocks: int | None = None,
    *,
    jobs: int = 1,
    scheduler: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> MergedRun:
    """Find, check and merge the shards of one step of a run.

    With `blocks`, also keep the statistics of `blocks` contiguous ranges of sample_idx (for the
    paired bootstrap of `bpseval compare`); datasets without sample_idx get none. Datasets are
    merged by `jobs` processes or on a Dask `scheduler` ("local" or an address), with the same
    result to the last bit. `on_progress(bytes_done, bytes_total)` follows the merge.
    `meanwhile()` is called once, during the longest wait: on the workers when there are some,
    else on the child process that reads the headers.
    """
    root = Path(run_dir)
    files = scan_run_dir(root)
    on_workers = jobs > 1 or scheduler is not None
    headers = []
    for header in read_headers(require_shards(files, root), meanwhile=None if on_workers else meanwhile, jobs=jobs):
        if isinstance(header, BpsevalError):
            raise header
        headers.append(header)
    selection = select_step(headers, step, root, files.leftovers)
    shards = selection.shards
    stores = sorted({header.store for header in shards})
    if len(stores) > 1:
        raise BpsevalError(
            f"{root}: step {shards[0].step} mixes raw and stats-only shards"
            f" ({', '.join(f'{h.path}: {h.store}' for h in shards)}); write one kind per step."
        )
    parts = _dataset_parts(shards)
    sizes = [sum(layout.nbytes for _, layout in group) for group in parts.values()]
    done = [0]

    def finished(index: int) -> None:
        done[0] += sizes[index]
        if on_progress:
            on_progress(done[0], sum(sizes))

    datasets = run_tasks(
        _merge_dataset,
        [(name, group, len(shards), blocks) for name, group in parts.items()],
        jobs=jobs,
        scheduler=scheduler,
        costs=sizes,
        on_done=finished,
        meanwhile=meanwhile if on_workers else None,
    )
    warnings = selection.notes + [warning for dataset in datasets for warning in dataset.warnings]
    if stores == ["stats"]:
        warnings.append(
            "stats-only shards: samples repeated across ranks (DistributedSampler padding) were not checked;"
            " each writer dropped repeats on its own rank only."
        )
    return MergedRun(root, shards[0].step, len(shards), [h.path for h in shards], datasets, warnings)


def _dataset_parts(shards: list[ShardHeader]) -> dict[str, list[tuple[ShardHeader, DatasetLayout]]]:
    """For each dataset name (sorted), the ranks that have it, checked for agreement."""
    parts: dict[str, list[tuple[ShardHeader, DatasetLayout]]] = {}
    for header in shards:
        for name, layout in header.datasets.items():
            parts.setdefault(name, []).append((header, layout))
    for name, group in parts.items():
        first_header, first = group[0]
        for header, layout in group[1:]:
            check_agree(name, first_header.path, first, header.path, layout)
    return dict(sorted(parts.items()))


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
        raise BpsevalError(f"{path_b}: {where} has stats blocks of {b.block_size} samples but {path_a} of {a.block_size}.")
    if a.rate_kind != b.rate_kind:
        raise BpsevalError(f"{path_b}: {where} has rate_kind {b.rate_kind!r} but {path_a} has {a.rate_kind!r}.")
    if a.has_sample_idx != b.has_sample_idx:
        having, lacking = (path_a, path_b) if a.has_sample_idx else (path_b, path_a)
        raise BpsevalError(
            f"{lacking}: {where} has no sample_idx but {having} has one; write sample_idx on every rank or on"
            " none."
        )


def _merge_dataset(
    name: str, parts: list[tuple[ShardHeader, DatasetLayout]], world_size: int, blocks: int | None = None
) -> MergedDataset:
    """Stream every rank's rows of one dataset once (duplicates dropped) into per-rank statistics."""
    first = parts[0][1]
    n_cells = first.n_cells
    cell_ids = first.cell_ids if first.cell_ids is not None else np.arange(n_cells)
    if first.store == "stats":
        return _merge_stats_dataset(name, parts, world_size, cell_ids)
    dedup = _Deduplicator(name, parts) if first.has_sample_idx else None
    per_rank = [CellStats.zeros(n_cells) for _ in range(world_size)]
    per_block = CellStats.zeros((blocks, n_cells)) if blocks and dedup is not None else None
    chunk_rows = max(1, CHUNK_ELEMENTS // max(n_cells, 1))
    for part, (header, layout) in enumerate(parts):
        with open_dataset(header.path, layout) as reader:
            for chunk in reader.rows(chunk_rows, None if dedup is None else dedup.sample_idx_of(part)):
                if dedup is not None:
                    chunk = dedup.filter(part, chunk)
                try:
                    if per_block is None:
                        per_rank[header.rank] += batch_stats(chunk.rhat, chunk.robs, chunk.weights, layout.rate_kind)
                    else:
                        block_ids = chunk.sample_idx * blocks // dedup.span
                        per_block, total = add_by_block(
                            per_block, block_ids, chunk.rhat, chunk.robs, chunk.weights, layout.rate_kind
                        )
                        per_rank[header.rank] += total
                except InvalidValuesError as error:
                    raise _invalid_values_error(reader, chunk, error, chunk_rows) from None
    total_rows = sum(layout.n_rows for _, layout in parts)
    dropped = dedup.dropped if dedup is not None else 0
    return MergedDataset(
        name=name,
        cell_ids=cell_ids,
        rate_kind=first.rate_kind,
        per_rank=per_rank,
        samples=total_rows - dropped,
        duplicates_dropped=dropped,
        identity=dataset_identity(name, cell_ids, dedup.unique if dedup is not None else None, total_rows),
        per_block=per_block,
        warnings=[dedup.rhat_mismatch_message()] if dedup is not None and dedup.rhat_mismatch else [],
    )


def _merge_stats_dataset(
    name: str, parts: list[tuple[ShardHeader, DatasetLayout]], world_size: int, cell_ids: np.ndarray
) -> MergedDataset:
    """Add up the stored sums of stats-only shards; their block statistics add up block by block."""
    per_rank = [CellStats.zeros(len(cell_ids)) for _ in range(world_size)]
    per_block: CellStats | None = None
    for header, layout in parts:
        per_rank[header.rank], blocks = read_stats(header.path, layout)
        if blocks is not None:
            if per_block is None:
                per_block = blocks
            else:
                n_blocks = max(per_block.n_valid.shape[0], blocks.n_valid.shape[0])
                per_block = pad_blocks(per_block, n_blocks) + pad_blocks(blocks, n_blocks)
    return MergedDataset(
        name=name,
        cell_ids=cell_ids,
        rate_kind=parts[0][1].rate_kind,
        per_rank=per_rank,
        samples=sum(layout.n_rows for _, layout in parts),
        duplicates_dropped=sum(layout.duplicates_dropped for _, layout in parts),
        identity=dataset_identity(name, cell_ids, None, sum(layout.n_rows for _, layout in parts)),
        per_block=per_block,
    )


def dataset_identity(name: str, cell_ids: np.ndarray, sample_idx: np.ndarray | None, rows: int) -> str:
    """sha256 of what was scored: dataset, cells, and the distinct sample_idx (or the row count)."""
    digest = hashlib.sha256(name.encode())
    digest.update("\0".join(str(cell) for cell in cell_ids).encode())
    if sample_idx is None:
        digest.update(f"rows without sample_idx: {rows}".encode())
    else:
        digest.update(np.ascontiguousarray(sample_idx, dtype="<i8").tobytes())
    return digest.hexdigest()


def _invalid_values_error(
    reader: DatasetReader, failed: RowChunk, error: InvalidValuesError, chunk_rows: int
) -> BpsevalError:
    """The error for bad values, counted over the whole dataset of that shard from the failing chunk on.

    Rows are numbered within the shard's dataset (before duplicates are dropped).
    """
    layout = reader.layout
    counts: dict[tuple[str, str], InvalidValues] = {}
    for chunk in reader.rows(chunk_rows):
        if chunk.start < failed.start:
            continue
        for problem in find_invalid_values(chunk.rhat, chunk.robs, chunk.weights, layout.rate_kind):
            key = (problem.array, problem.problem)
            if key in counts:
                known = counts[key]
                counts[key] = InvalidValues(known.array, known.problem, known.count + problem.count, known.first_row, known.first_cell)
            else:
                counts[key] = InvalidValues(
                    problem.array, problem.problem, problem.count, problem.first_row + chunk.start, problem.first_cell
                )
    problems = list(counts.values()) or error.problems
    return BpsevalError(f"{reader.path}: dataset {layout.name!r}: {InvalidValuesError(problems)}")


def first_copies(sample_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct values of non-negative `sample_idx` (sorted), which positions hold the first
    copy of their value, and which hold a value that occurs more than once.

    Counts with `bincount` when the values are dense (the usual 0..N-1, in O(N)); sorts only
    the repeated values, or everything when the values are sparse.
    """
    span = int(sample_idx.max()) + 1 if len(sample_idx) else 0
    if span <= 4 * len(sample_idx) + 1024:
        counts = np.bincount(sample_idx, minlength=span)
        unique = np.flatnonzero(counts)
        repeated = counts[sample_idx] > 1
    else:
        unique, inverse, counts = np.unique(sample_idx, return_inverse=True, return_counts=True)
        repeated = counts[inverse] > 1
    keep = ~repeated
    positions = np.flatnonzero(repeated)
    keep[positions[np.unique(sample_idx[positions], return_index=True)[1]]] = True
    return unique, keep, repeated


class _Deduplicator:
    """Keeps the first copy of every sample_idx of a dataset across its shards, in rank order.

    Copies must agree on robs and dfs (else BpsevalError); copies whose rhat differs beyond
    rounding keep the first and are reported as a warning. Only the rows of repeated samples are
    held in memory.
    """

    def __init__(self, name: str, parts: list[tuple[ShardHeader, DatasetLayout]]) -> None:
        self.name = name
        self.paths = [header.path for header, _ in parts]
        indices = [read_sample_idx(header.path, layout.name) for header, layout in parts]
        for path, index in zip(self.paths, indices):
            if len(index) and index.min() < 0:
                raise BpsevalError(
                    f"{path}: dataset {name!r}: sample_idx has negative values (e.g. {index.min()}); it must index"
                    " the dataset's validation set from 0."
                )
        self.offsets = np.cumsum([0] + [len(index) for index in indices])
        self.sample_idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        self.unique, self.keep, self.repeated = first_copies(self.sample_idx)
        self.span = int(self.unique[-1]) + 1 if len(self.unique) else 1
        self.dropped = len(self.sample_idx) - len(self.unique)
        self.first_copies: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.rhat_mismatch: list[tuple[int, int, int]] = []

    def sample_idx_of(self, part: int) -> np.ndarray:
        """The sample_idx of part `part` (read once, here), to slice into its row chunks."""
        return self.sample_idx[self.offsets[part] : self.offsets[part + 1]]

    def filter(self, part: int, chunk: RowChunk) -> RowChunk:
        """The rows of `chunk` that are first copies; later copies are checked against them."""
        n_rows = len(chunk.rhat)
        positions = slice(self.offsets[part] + chunk.start, self.offsets[part] + chunk.start + n_rows)
        keep, repeated = self.keep[positions], self.repeated[positions]
        if not repeated.any():
            return chunk
        assert chunk.sample_idx is not None
        weights = (
            np.ones_like(chunk.rhat, dtype=np.float64)
            if chunk.weights is None
            else np.broadcast_to(chunk.weights, chunk.rhat.shape)
        )
        for row in np.flatnonzero(repeated):
            copy = (part, chunk.rhat[row].astype(np.float64), chunk.robs[row].astype(np.float64), weights[row].astype(np.float64))
            sample = int(chunk.sample_idx[row])
            if keep[row]:
                self.first_copies[sample] = copy
            else:
                self._compare(sample, self.first_copies[sample], copy)
        if keep.all():
            return chunk
        return RowChunk(
            chunk.start,
            chunk.rhat[keep],
            chunk.robs[keep],
            None if chunk.weights is None else chunk.weights[keep],
            chunk.sample_idx[keep],
        )

    def _compare(self, sample: int, first: tuple, later: tuple) -> None:
        first_part, rhat_a, robs_a, w_a = first
        later_part, rhat_b, robs_b, w_b = later
        valid = w_a > 0
        if not np.array_equal(w_a, w_b) or not np.array_equal(robs_a[valid], robs_b[valid]):
            what = "dfs" if not np.array_equal(w_a, w_b) else "robs"
            raise BpsevalError(
                f"{self.paths[later_part]}: dataset {self.name!r}: sample_idx {sample} also appears in"
                f" {self.paths[first_part]} with different {what}. Copies of one sample must be identical:"
                " check that sample_idx indexes this dataset's validation set."
            )
        if not np.allclose(rhat_a[valid], rhat_b[valid], rtol=RHAT_COPY_RTOL, atol=MIN_RATE):
            self.rhat_mismatch.append((sample, first_part, later_part))

    def rhat_mismatch_message(self) -> str:
        sample, first_part, later_part = self.rhat_mismatch[0]
        count = len(self.rhat_mismatch)
        return (
            f"dataset {self.name!r}: rhat differs beyond rounding between the copies of {count} duplicated"
            f" sample{'s' if count != 1 else ''} (first: sample_idx {sample} in {self.paths[first_part]} and"
            f" {self.paths[later_part]}); kept the first copy."
        )
