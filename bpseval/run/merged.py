"""What the merge of a step gives: `MergedDataset` (one dataset's statistics per rank) and `MergedRun` (the step).

The merge (`merge.py`) makes them and the merge cache (`cache.py`) stores them and gives them back:
both import them from here, so that the merge imports the cache and never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bpseval.kernel.cellstats import CellStats
from bpseval.shard.format import DatasetLayout


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
    copies_valid: np.ndarray | None = None
    """(ranks, cells) int64: per rank, the valid entries of its copies of samples first seen on another rank
    (DistributedSampler's padding), which the merge drops; None: no such copy was dropped."""

    @property
    def rank_valid(self) -> np.ndarray:
        """(ranks, cells) int64: the valid samples each rank saw of every cell, its padding copies included.

        The one per-rank count that `bpseval plan` predicts (`rank_<r>`) and `bpseval coverage` reports
        (`per_rank`): the distinct samples a rank was given, counted on that rank whether or not another rank
        was given the same sample. Stats-only shards count so on their own (their sums keep such copies).
        """
        counts = np.stack([stats.n_valid for stats in self.per_rank]).astype(np.int64)
        return counts if self.copies_valid is None else counts + self.copies_valid

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
    cached: bool = False
    """True when the datasets came from the merge cache (`bpseval.run.cache`) instead of the shards' rows."""


def dataset_cell_ids(layout: DatasetLayout) -> np.ndarray:
    """The cell ids of a merged dataset: its shards' cell_ids, or 0..cells-1 when they give none."""
    return layout.cell_ids if layout.cell_ids is not None else np.arange(layout.n_cells)
