"""Bootstrap intervals on one scored run (`bpseval compute --ci`): how far its numbers may move by chance.

Two schemes, each a bias-corrected percentile bootstrap (Efron's BC, see `percentile`):

- `blocks` (the validation-set noise): each dataset's contiguous blocks of samples (`per_block`, the
  statistics `compare --significance` resamples) are drawn with replacement, the same draw for every
  cell of the dataset and an independent one per dataset (datasets are separate recordings whose
  samples are not paired). Each replicate's per-cell statistics are the exact merge of the drawn
  blocks (`reduce_rows`).
- `cells` (the population noise): each dataset's cells are drawn with replacement, independently per
  dataset.

Either way a replicate is scored by the same kernel functions as the point estimate (`marked_scores`,
then the row-wise forms of `score_dataset`'s and `overall_of`'s summaries, tested equal to them), so
every metric and setting (min_samples, clamp_negative) means the same in the interval as in the number. The interval of a metric is two quantiles of its replicates,
around (1 − level)/2 and (1 + level)/2, shifted for the estimator's bias. It is undefined (None) where the metric is, where a dataset has fewer than
two units (blocks or cells) to draw, or where the metric is undefined in more than (1 − level)/2 of
the replicates (its tail then cannot be placed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from bpseval.errors import ArgumentError
from bpseval.features.compare import _resampling_counts
from bpseval.kernel.stats import CellStats, reduce_rows
from bpseval.run.scored import SUMMARY_METRICS, ScoredDataset, ScoredRun, dataset_rows, marked_scores, overall_rows

SCHEMES = ("blocks", "cells")
METRICS = SUMMARY_METRICS
"""The metrics that get an interval, under `<metric>_ci` in the outputs."""
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_BLOCKS = 100
"""Blocks of contiguous samples per dataset of raw shards (stats-only shards keep their own blocks)."""
MEMORY_BOUND = 64 << 20
"""Bytes the (replicates, blocks, cells) temporaries of one chunk of replicates may take."""


@dataclass(frozen=True)
class IntervalSettings:
    """What a `--ci` interval is: its level, what is resampled, how often, and the seed."""

    level: float = 0.95
    over: str = "blocks"
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0.0 < self.level < 1.0:
            raise ArgumentError(f"ci must be a level between 0 and 1 (exclusive), e.g. 0.95, not {self.level!r}")
        if self.over not in SCHEMES:
            raise ArgumentError(f"ci_over must be one of {', '.join(SCHEMES)}, not {self.over!r}")
        if (
            isinstance(self.resamples, bool)
            or not isinstance(self.resamples, (int, np.integer))
            or self.resamples < 100
        ):
            raise ArgumentError(f"ci_resamples must be a whole number >= 100, not {self.resamples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ArgumentError(f"ci_seed must be a whole number >= 0, not {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "over": self.over,
            "resamples": int(self.resamples),
            "seed": int(self.seed),
            "method": "bias-corrected percentile bootstrap",
        }


Interval = tuple[float, float] | None


@dataclass(frozen=True)
class Intervals:
    """The intervals of one scored run: per dataset name, and overall, metric → [low, high] or None."""

    settings: IntervalSettings
    datasets: dict[str, dict[str, Interval]]
    overall: dict[str, Interval]

    def scope(self, name: str | None) -> dict[str, Interval]:
        """`{metric}_ci` of the dataset `name`, or of the run (None)."""
        values = self.overall if name is None else self.datasets[name]
        return {f"{metric}_ci": values[metric] for metric in METRICS}


def require_blocks(scored: ScoredRun) -> None:
    """Refuse a run with a dataset that has no blocks of samples (no sample_idx), naming it and the ways out."""
    for dataset in scored.datasets:
        if dataset.per_block is None:
            raise ArgumentError(
                f"dataset {dataset.name!r} has no sample_idx, so --ci-over blocks cannot resample its samples:"
                " write sample_idx with its rows, or use --ci-over cells."
            )


def intervals(scored: ScoredRun, settings: IntervalSettings) -> Intervals:
    """Bootstrap intervals of every metric of every dataset and of the run (see the module docstring)."""
    if settings.over == "blocks":
        require_blocks(scored)
    units = [_units(dataset, settings.over) for dataset in scored.datasets]
    if not units:
        return Intervals(settings, {}, dict.fromkeys(METRICS))
    datasets, overall = replicate_values(scored, units, settings)
    tail = (1.0 - settings.level) / 2.0
    enough = [_count(unit) >= 2 for unit in units]

    def interval(point: float, values: np.ndarray, usable: bool) -> Interval:
        return percentile(values, tail, point) if usable and math.isfinite(point) else None

    return Intervals(
        settings,
        {
            dataset.name: {
                metric: interval(getattr(dataset, metric), datasets[index][metric], enough[index]) for metric in METRICS
            }
            for index, dataset in enumerate(scored.datasets)
        },
        {metric: interval(getattr(scored.overall, metric), overall[metric], all(enough)) for metric in METRICS},
    )


def percentile(values: np.ndarray, tail: float, point: float) -> Interval:
    """The bias-corrected percentile interval (Efron's BC) of the defined replicates around the estimate `point`.

    The plain percentile interval would sit where the replicates fall, which for a biased estimator is
    twice its bias away from the truth (the resamples are biased once more around the estimate); bps
    is biased low by about 1/(2·samples·rate·ln 2), because the null model is fitted to the same data.
    BC shifts the quantiles by how far the estimate sits from the middle of its replicates. None when
    more than `tail` of the replicates are undefined.
    """
    defined = values[np.isfinite(values)]
    if len(defined) == 0 or len(values) - len(defined) > tail * len(values):
        return None
    below = (np.count_nonzero(defined < point) + 0.5 * np.count_nonzero(defined == point)) / len(defined)
    half = 0.5 / len(defined)
    shift = 2.0 * NORMAL.inv_cdf(min(max(below, half), 1.0 - half))
    levels = [NORMAL.cdf(shift + NORMAL.inv_cdf(tail)), NORMAL.cdf(shift + NORMAL.inv_cdf(1.0 - tail))]
    low, high = np.quantile(defined, levels)
    return float(low), float(high)


NORMAL = NormalDist()


def _units(dataset: ScoredDataset, over: str) -> CellStats:
    """What one draw picks from: the dataset's blocks holding a valid entry, or its cells (as (cells, cells) rows)."""
    if over == "cells":
        return dataset.stats
    per_block = dataset.per_block
    assert per_block is not None  # require_blocks
    return per_block.map(lambda values: values[per_block.n_valid.sum(axis=1) > 0])


def _count(units: CellStats) -> int:
    return int(units.n_valid.shape[0])


def replicate_values(
    scored: ScoredRun, units: Sequence[CellStats], settings: IntervalSettings
) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Every metric in each bootstrap replicate, as (resamples,) arrays: per dataset (in order), and overall."""
    rngs = [np.random.default_rng(child) for child in np.random.SeedSequence(settings.seed).spawn(len(units))]
    chunks: list[tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]] = []
    chunk = _chunk_size(units, settings)
    clamp = scored.settings.clamp_negative
    for start in range(0, settings.resamples, chunk):
        size = min(chunk, settings.resamples - start)
        parts = []
        for unit, rng in zip(units, rngs, strict=True):
            stats = _replicate_stats(unit, rng, size, settings.over)
            scores = marked_scores(stats, scored.settings)
            parts.append((stats, scores, dataset_rows(stats, scores, clamp)))
        chunks.append(([part[2] for part in parts], overall_rows(parts, clamp)))

    def joined(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {metric: np.concatenate([piece[metric] for piece in pieces]) for metric in METRICS}

    per_dataset = [joined([datasets[index] for datasets, _ in chunks]) for index in range(len(units))]
    return per_dataset, joined([overall for _, overall in chunks])


def _chunk_size(units: Sequence[CellStats], settings: IntervalSettings) -> int:
    """Replicates per chunk: reduce_rows holds (replicates, blocks, cells) float64 extremes for each."""
    if settings.over == "cells":
        return settings.resamples
    widest = max((_count(unit) * unit.n_cells for unit in units), default=1)
    return max(1, min(settings.resamples, MEMORY_BOUND // (8 * max(widest, 1))))


def _replicate_stats(units: CellStats, rng: np.random.Generator, size: int, over: str) -> CellStats:
    """(size, cells) statistics of `size` replicates of one dataset."""
    count = _count(units)
    if count == 0:
        return CellStats.zeros((size, units.n_cells))
    if over == "cells":
        drawn = rng.integers(0, count, size=(size, count))
        return units.map(lambda values: values[drawn])
    return reduce_rows(units, _resampling_counts(rng, size, count))
