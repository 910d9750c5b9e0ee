"""The stats store of `ShardWriter(store="stats")`: one dataset's sums on this rank, total and per block."""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from bpseval.errors import ArgumentError, BpsevalError
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.samples import SeenSamples
from bpseval.kernel.stats import Blocks, BlockSums, as_weights, batch_stats, block_stats


@dataclass
class RankStats:
    """One dataset's statistics on this rank, for `store="stats"`: total, per block, and the samples seen.

    Blocks are kept sparse (`BlockSums`): only those that hold samples, so a sample_idx near 2^62 costs
    one block, not every empty block below it.
    """

    n_cells: int
    total: CellStats | None = None
    blocks: BlockSums | None = None
    """None until a batch with sample_idx comes."""
    seen: SeenSamples = field(default_factory=SeenSamples)
    samples: int = 0
    duplicates_dropped: int = 0

    def prepare(self, dataset: str, arrays: dict[str, np.ndarray], rate_kind: str, block_size: int) -> StatsUpdate:
        """The batch's statistics, without changing anything yet: a batch with bad values leaves no trace."""
        rhat, robs, index = arrays["rhat"], arrays["robs"], arrays.get("sample_idx")
        weights = as_weights(arrays.get("dfs"), *rhat.shape)
        dropped = 0
        if index is not None:
            keep = self.seen.first_sightings(index)
            dropped = int((~keep).sum())
            rhat, robs, index = rhat[keep], robs[keep], index[keep]
            weights = None if weights is None else weights[keep]
        try:
            if index is None:
                return StatsUpdate(batch_stats(rhat, robs, weights, rate_kind), None, None, len(rhat), 0)
            blocks = block_stats(index // block_size, rhat, robs, weights, rate_kind)
        except BpsevalError as error:
            raise ArgumentError(f"dataset {dataset!r}: {error}") from None
        return StatsUpdate(blocks.total(), blocks, index, len(rhat), dropped)

    def commit(self, update: StatsUpdate) -> None:
        self.total = update.batch if self.total is None else self.total + update.batch
        if update.blocks is not None:
            if self.blocks is None:
                self.blocks = BlockSums(self.n_cells)
            self.blocks.add(update.blocks)
        if update.index is not None:
            self.seen.add(update.index)
        self.samples += update.samples
        self.duplicates_dropped += update.dropped

    def write(self, group: h5py.Group, block_size: int) -> None:
        """The sums, and the blocks that hold samples with their ids (`blocks/block_ids`, increasing)."""
        total = self.total if self.total is not None else CellStats.zeros(self.n_cells)
        for name in STAT_FIELDS:
            group.create_dataset(name, data=getattr(total, name))
        group.attrs["samples"] = self.samples
        group.attrs["duplicates_dropped"] = self.duplicates_dropped
        if self.blocks is not None:
            blocks = self.blocks.sorted()
            group.attrs["block_size"] = block_size
            stored = group.create_group("blocks")
            stored.create_dataset("block_ids", data=blocks.ids)
            for name in STAT_FIELDS:
                stored.create_dataset(name, data=getattr(blocks.stats, name))


@dataclass(frozen=True)
class StatsUpdate:
    """One batch's contribution to `RankStats`, computed before anything is changed."""

    batch: CellStats
    blocks: Blocks | None
    index: np.ndarray | None
    samples: int
    dropped: int
