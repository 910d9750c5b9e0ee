"""Merge the shards of one step into exact per-cell sufficient statistics.

Every dataset is streamed in row chunks into `CellStats`, per rank, with duplicate samples
(DistributedSampler padding) dropped by `sample_idx`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bpseval.errors import BpsevalError
from bpseval.kernel.cellstats import CellStats
from bpseval.kernel.compiled import available_cpus, kernel_setting, uses_compiled, work
from bpseval.kernel.stats import (
    MIN_RATE,
    BlockSums,
    InvalidValues,
    InvalidValuesError,
    add_by_block,
    batch_stats,
    find_invalid_values,
)
from bpseval.run.cache import StepCache
from bpseval.run.catalog import RunCatalog, StepSelection
from bpseval.run.dedup import RHAT_COPY_RTOL, _Deduplicator
from bpseval.run.merged import MergedDataset, MergedRun, dataset_cell_ids
from bpseval.run.parallel import batches, one_ahead, run_tasks
from bpseval.shard.format import DatasetLayout, RowChunk, ShardHeader, check_agree
from bpseval.shard.reader import DatasetReader, ShardFile, read_stats

CHUNK_ELEMENTS = 1 << 18
"""Entries (rows x cells) read per chunk: bounds memory whatever the shard size."""
OVERLAP_ENTRIES = 1 << 16
"""Entries from which a chunk is reduced on a thread while the next is read: below, the hand-over costs
about what the overlap saves."""


def merge_run(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    blocks: int | None = None,
    *,
    pass_over: bool = True,
    **options: Any,
) -> MergedRun:
    """Scan `run_dir` and merge one step of it (default: the latest complete one; see `RunCatalog.select` for
    `pass_over`); `options` as for `merge_selection` (`jobs` also reads the headers in that many processes)."""
    return merge_step(
        RunCatalog.scan(run_dir, jobs=options.get("jobs", 1)), step, blocks, pass_over=pass_over, **options
    )


def merge_step(
    catalog: RunCatalog, step: int | None = None, blocks: int | None = None, *, pass_over: bool = True, **options: Any
) -> MergedRun:
    """Check and merge the shards of one step of a scanned run (`catalog.select(step, pass_over=pass_over)` chooses
    it); `options` as for `merge_selection`. Steps not merged that have unreadable files are named in the warnings."""
    selection = catalog.select(step, pass_over=pass_over)
    unused = [
        f"not merged, has unreadable files: {entry.reason}"
        for entry in catalog.steps.values()
        if entry.problems and entry.step != selection.entry.step
    ]
    return merge_selection(catalog, StepSelection(selection.entry, selection.notes + unused), blocks, **options)


def merge_selection(
    catalog: RunCatalog,
    selection: StepSelection,
    blocks: int | None = None,
    *,
    jobs: int = 1,
    scheduler: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    cache: bool = False,
) -> MergedRun:
    """Merge the shards of a selected step into per-rank statistics of every dataset.

    With `blocks`, also keep the statistics of `blocks` contiguous ranges of sample_idx (for the
    paired bootstrap of `bpseval compare`); datasets without sample_idx get none. Datasets are
    merged by `jobs` processes or on a Dask `scheduler` ("local" or an address), with the same
    result to the last bit. `on_progress(bytes_done, bytes_total)` follows the merge. With `cache`,
    a step merged before from the same shards with the same settings is read from the merge cache
    (`bpseval.run.cache`), bit for bit, and a step merged now is stored there.
    """
    shards = selection.shards
    stores = selection.entry.stores
    parts = _dataset_parts(shards)
    names = list(parts)
    costs = [_merge_cost(group) for group in parts.values()]
    sizes = [sum(layout.nbytes for _, layout in group) for group in parts.values()]
    # one process: tasks as large as memory allows, by the bytes they read (each task opens every shard of its
    # datasets, so splitting by the fixed cost of parts would only add opens)
    groups = batches(costs if jobs > 1 or scheduler else sizes, jobs)
    done = [0]

    def finished(task: int) -> None:
        for index in groups[task]:
            done[0] += sizes[index]
            if on_progress:
                on_progress(done[0], sum(sizes))

    entry = StepCache.of(catalog.root, shards, blocks, merge_settings()) if cache else None
    stored = entry.load(parts) if entry else None
    if stored is None:
        lean = {header.path: replace(header, datasets={}) for header in shards}  # tasks carry no other layouts
        entries = sum(layout.n_rows * layout.n_cells for group in parts.values() for _, layout in group)
        threads = None  # the kernel's threads: every CPU for one process, a share each for several, 1 on Dask
        if scheduler or jobs > 1:
            threads = 1 if scheduler else max(1, available_cpus() // jobs)
        tasks = [
            (
                [(names[i], [(lean[header.path], layout) for header, layout in parts[names[i]]]) for i in group],
                len(shards),
                blocks,
                entries,
                threads,
            )
            for group in groups
        ]
        results = run_tasks(
            _merge_datasets,
            tasks,
            jobs=jobs,
            scheduler=scheduler,
            costs=[sum(costs[i] for i in group) for group in groups],
            on_done=finished,
        )
        datasets = [dataset for result in results for dataset in result]
        if entry:
            entry.save(datasets, merge_settings())
    else:
        datasets = stored
    warnings = selection.notes + [warning for dataset in datasets for warning in dataset.warnings]
    if stores == ["stats"]:
        warnings.append(
            "stats-only shards: samples repeated across ranks (DistributedSampler padding) were not checked;"
            " each writer dropped repeats on its own rank only."
        )
    return MergedRun(
        catalog.root, shards[0].step, len(shards), [h.path for h in shards], datasets, warnings, stored is not None
    )


def merge_settings() -> dict[str, Any]:
    """Every setting the numbers of a merge depend on besides its shards (the merge cache's key holds them)."""
    return {
        "chunk_elements": CHUNK_ELEMENTS,
        "rhat_copy_rtol": RHAT_COPY_RTOL,
        "min_rate": MIN_RATE,
        "kernel": kernel_setting(),
    }


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


PART_COST = 1 << 18
"""Cost, in bytes to read, of one dataset of one shard beyond its arrays: looking up its arrays and
setting up its sums takes a fraction of a millisecond, the time of merging ~256 KB. So 3,000 tiny
datasets weigh what they cost and make a few tasks, not 3,000."""


def _merge_cost(parts: list[tuple[ShardHeader, DatasetLayout]]) -> int:
    """What merging a dataset costs, in bytes: its arrays and a fixed PART_COST per shard holding it."""
    return sum(layout.nbytes + PART_COST for _, layout in parts)


def _merge_datasets(
    datasets: list[tuple[str, list[tuple[ShardHeader, DatasetLayout]]]],
    world_size: int,
    blocks: int | None = None,
    step_entries: int = 0,
    threads: int | None = None,
) -> list[MergedDataset]:
    """Merge several datasets as one task; returns them in the order given.

    Each shard is opened once to read the sample_idx and rows of all of the task's datasets in it
    (duplicates dropped as they are met), shard by shard in rank order (with blocks, once more
    before, for the sample_idx of those datasets): one file open at a time, and every dataset's
    chunks are added in the same order as if it were merged alone, so the numbers do not depend on
    how datasets are grouped into tasks. `step_entries`, the entries of the whole step, chooses the
    kernel (`kernel.compiled.work`): the same for every task of the step; `threads` bounds its threads.
    """
    with work(step_entries, threads):
        return _merge_task(datasets, world_size, blocks)


def _merge_task(
    datasets: list[tuple[str, list[tuple[ShardHeader, DatasetLayout]]]], world_size: int, blocks: int | None
) -> list[MergedDataset]:
    merges = {
        name: _DatasetMerge(name, parts, world_size, blocks) for name, parts in datasets if parts[0][1].store != "stats"
    }
    by_shard: dict[Path, list[tuple[_DatasetMerge, int]]] = {}
    ranks: dict[Path, int] = {}
    for merge in merges.values():
        for part, (header, _) in enumerate(merge.parts):
            by_shard.setdefault(header.path, []).append((merge, part))
            ranks[header.path] = header.rank
    order = sorted(by_shard, key=ranks.__getitem__)
    blocked = [merge for merge in merges.values() if merge.cuts_blocks]
    if blocked:  # blocks cut the distinct sample_idx of a whole dataset: all of them are read before its rows
        for path in order:
            wanted = [(merge, part) for merge, part in by_shard[path] if merge.cuts_blocks]
            if wanted:
                with ShardFile(path) as shard:
                    for merge, part in wanted:
                        merge.read_sample_idx(part, shard)
        for merge in blocked:
            merge.start_blocks()
    for path in order:
        with ShardFile(path) as shard:
            for merge, part in by_shard[path]:
                merge.add(part, shard)
    return [
        merges[name].finish()
        if name in merges
        else _merge_stats_dataset(name, parts, world_size, dataset_cell_ids(parts[0][1]))
        for name, parts in datasets
    ]


class _DatasetMerge:
    """The merge of one raw dataset: every rank's rows once (duplicates dropped) into per-rank statistics.

    `add(part, shard)` streams one part's rows, parts in rank order, dropping the copies of samples
    seen before as it goes; `finish()` gives the MergedDataset. With blocks (`cuts_blocks`), every
    part's sample_idx is read first (`read_sample_idx`, then `start_blocks()`): the blocks cut the
    dataset's distinct sample_idx, known only once all of them are read.
    """

    def __init__(
        self, name: str, parts: list[tuple[ShardHeader, DatasetLayout]], world_size: int, blocks: int | None
    ) -> None:
        first = parts[0][1]
        self.name, self.parts, self.first, self.blocks = name, parts, first, blocks
        self.chunk_rows = max(1, CHUNK_ELEMENTS // max(first.n_cells, 1))
        self.dedup = _Deduplicator(name, parts, self.chunk_rows) if first.has_sample_idx else None
        self.indices: list[np.ndarray | None] = [None] * len(parts)
        """Each part's sample_idx, when read before the rows (for the blocks)."""
        self.unique: np.ndarray | None = None
        # each rank's statistics so far; None until its first chunk, taken as is (adding it to zeros would cost a
        # merge per dataset and rank, a main cost per shard with many small shards)
        self.per_rank: list[CellStats | None] = [None] * world_size
        self.per_block: CellStats | None = None

    @property
    def cuts_blocks(self) -> bool:
        """Whether statistics by block of sample_idx are kept (blocks asked for, and sample_idx present)."""
        return bool(self.blocks) and self.dedup is not None

    def read_sample_idx(self, part: int, shard: ShardFile) -> None:
        """Read part `part`'s sample_idx before the rows."""
        self.indices[part] = shard.sample_idx(self.parts[part][1])

    def start_blocks(self) -> None:
        """Set up the blocks once every part's sample_idx has been read."""
        indices = [values for values in self.indices if values is not None]
        assert self.blocks and len(indices) == len(self.parts)
        self.unique = np.unique(np.concatenate(indices))
        self.per_block = CellStats.zeros((self.blocks, self.first.n_cells))

    def add(self, part: int, shard: ShardFile) -> None:
        """Add the rows of part `part`, read from `shard`, to its rank's statistics (and to the blocks).

        Without blocks, a large chunk is reduced on a thread while the next one is read (`one_ahead`);
        the chunks are added in order all the same.
        """
        dedup, rank, layout = self.dedup, self.parts[part][0].rank, self.parts[part][1]
        reader, sample_idx = shard.dataset(layout), self.indices[part]
        if dedup is not None:
            sample_idx = shard.sample_idx(layout) if sample_idx is None else sample_idx
            self.indices[part] = None
            dedup.begin(part, sample_idx)
        chunks = reader.rows(self.chunk_rows, sample_idx)
        if dedup is not None:
            chunks = (dedup.filter(part, chunk) for chunk in chunks)
        for chunk, stats in one_ahead(chunks, self._reduce, self._worth_a_thread):
            try:
                self._add(rank, stats())
            except InvalidValuesError as error:
                raise _invalid_values_error(reader, chunk, error, self.chunk_rows) from None

    def _worth_a_thread(self, chunk: RowChunk) -> bool:
        """Whether `chunk` is reduced while the next is read: it is large, the compiled kernel takes it (it
        releases the GIL for the whole pass; the reference's many short numpy calls would contend for it
        with the reads and take longer than inline), and no blocks are kept (each chunk's blocks are added
        to the last's)."""
        size = chunk.rhat.size
        return self.per_block is None and size >= OVERLAP_ENTRIES and uses_compiled(self.first.rate_kind, size)

    def _reduce(self, chunk: RowChunk) -> CellStats:
        """The statistics of a chunk (and, with blocks, its blocks added to `per_block`)."""
        rate_kind = self.first.rate_kind
        if self.per_block is None:
            return batch_stats(chunk.rhat, chunk.robs, chunk.weights, rate_kind)
        # per_block is set by start_blocks, which only runs with blocks and sample_idx
        assert self.unique is not None and self.blocks and chunk.sample_idx is not None
        block_ids = sample_blocks(self.unique, chunk.sample_idx, self.blocks)
        self.per_block, total = add_by_block(
            self.per_block, block_ids, chunk.rhat, chunk.robs, chunk.weights, rate_kind
        )
        return total

    def _add(self, rank: int, stats: CellStats) -> None:
        held = self.per_rank[rank]
        self.per_rank[rank] = stats if held is None else held + stats

    def finish(self) -> MergedDataset:
        dedup, cell_ids = self.dedup, dataset_cell_ids(self.first)
        total_rows = sum(layout.n_rows for _, layout in self.parts)
        dropped = dedup.dropped if dedup is not None else 0
        return MergedDataset(
            name=self.name,
            cell_ids=cell_ids,
            rate_kind=self.first.rate_kind,
            per_rank=[CellStats.zeros(self.first.n_cells) if stats is None else stats for stats in self.per_rank],
            samples=total_rows - dropped,
            duplicates_dropped=dropped,
            identity=dataset_identity(self.name, cell_ids, dedup.unique if dedup is not None else None, total_rows),
            per_block=self.per_block,
            warnings=[dedup.rhat_mismatch_message()] if dedup is not None and dedup.rhat_mismatch else [],
            copies_valid=self._copies_valid(),
        )

    def _copies_valid(self) -> np.ndarray | None:
        """Per rank, the valid entries of the copies the deduplicator dropped as first seen on another rank."""
        if self.dedup is None or not self.dedup.copies_valid:
            return None
        counts = np.zeros((len(self.per_rank), self.first.n_cells), dtype=np.int64)
        for part, valid in self.dedup.copies_valid.items():
            counts[self.parts[part][0].rank] += valid
        return counts


def sample_blocks(unique: np.ndarray, sample_idx: np.ndarray, blocks: int) -> np.ndarray:
    """The block of each sample: the dataset's distinct sample_idx (`unique`, sorted), in order, cut into
    `blocks` contiguous runs of equal size (within one sample).

    Blocks follow the rank of a sample_idx among the distinct values, not the value itself: they do
    not depend on where sample_idx starts or on gaps in it, and the arithmetic (rank x blocks) stays
    far below 2^63 whatever the values.
    """
    return np.searchsorted(unique, sample_idx) * blocks // max(len(unique), 1)


def _merge_stats_dataset(
    name: str, parts: list[tuple[ShardHeader, DatasetLayout]], world_size: int, cell_ids: np.ndarray
) -> MergedDataset:
    """Add up the stored sums of stats-only shards; their blocks add up by block id (the union of the ranks' ids).

    The rows of `per_block` are the blocks in increasing id order, those without a valid entry dropped:
    two runs that scored the same samples with the same block size get the same rows, whatever their ranks.
    """
    per_rank = [CellStats.zeros(len(cell_ids)) for _ in range(world_size)]
    sums: BlockSums | None = None
    for header, layout in parts:
        per_rank[header.rank], blocks = read_stats(header.path, layout)
        if blocks is not None:
            if sums is None:
                sums = BlockSums(len(cell_ids))
            sums.add(blocks)
    per_block = None
    if sums is not None:
        merged = sums.sorted().stats
        # blocks without a valid entry (all masked) would enter the bootstrap as empty units
        per_block = merged.map(lambda values: values[merged.n_valid.sum(axis=1) > 0])
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
                counts[key] = InvalidValues(
                    known.array, known.problem, known.count + problem.count, known.first_row, known.first_cell
                )
            else:
                counts[key] = InvalidValues(
                    problem.array, problem.problem, problem.count, problem.first_row + chunk.start, problem.first_cell
                )
    problems = list(counts.values()) or error.problems
    return BpsevalError(f"{reader.path}: dataset {layout.name!r}: {InvalidValuesError(problems)}")
