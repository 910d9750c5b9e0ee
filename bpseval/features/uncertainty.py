"""Bootstrap intervals on one scored run (`bpseval compute --ci`): how far its numbers may move by chance.

Two schemes, each a studentized bootstrap (bootstrap-t, see `studentized`):

- `blocks` (the validation-set noise): each dataset's contiguous blocks of samples (`per_block`, the
  statistics `compare --significance` resamples) are drawn with replacement, the same draw for every
  cell of the dataset and an independent one per dataset (datasets are separate recordings whose
  samples are not paired). Each replicate's per-cell statistics are the exact merge of the drawn
  blocks (`reduce_rows`).
- `cells` (the population noise): each dataset's cells are drawn with replacement, independently per
  dataset.

Either way a replicate is scored by the same kernel functions as the point estimate (`marked_scores`,
then the row-wise forms of `score_dataset`'s and `overall_of`'s summaries, tested equal to them), so
every metric and setting (min_samples, clamp_negative) means the same in the interval as in the number.
The standard error of the estimate, and of every replicate, is a grouped jackknife: the drawn units
(blocks or cells) are dealt into at most `GROUPS` groups by their position in the draw, each group is
left out in turn (a block by lowering its multiplicity, a cell by leaving it uncovered), and the
overall numbers sum the jackknife variances of the datasets (a stratified jackknife, as datasets are
drawn independently). The interval is undefined (None) where the metric is, where a dataset has fewer
than two units (blocks or cells) to draw, where the estimate's standard error is not a positive
number, or where the studentized replicate is undefined in more than (1 − level)/2 of the replicates
(its tail then cannot be placed).

A level needs enough resamples to place its tails: with R replicates, the quantile at tail t lies
inside them only when (R + 1) · t >= 1, so 0.99 needs at least 199, 0.999 at least 1999. A level that
the resamples cannot support is refused (`check_resamples`, an ArgumentError naming the least
resamples that support it), never answered with the extreme replicates: those would be the same
interval at 0.99, 0.999 and 0.9999.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bpseval.errors import ArgumentError
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.stats import CellScores, reduce_rows
from bpseval.run.scored import (
    SUMMARY_METRICS,
    ScoredDataset,
    ScoredRun,
    ScoreSettings,
    dataset_rows,
    marked_scores,
    overall_rows,
)

SCHEMES = ("blocks", "cells")
METRICS = SUMMARY_METRICS
"""The metrics that get an interval, under `<metric>_ci` in the outputs."""
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_BLOCKS = 100
"""Blocks of contiguous samples per dataset of raw shards (stats-only shards keep their own blocks)."""
MEMORY_BOUND = 64 << 20
"""Bytes the (replicates, blocks, cells) temporaries of one chunk of replicates may take."""


GROUPS = 20
"""Jackknife groups of drawn units behind each standard error (as many as units when a dataset has fewer)."""
METHOD = f"studentized bootstrap (bootstrap-t), standard errors by a grouped jackknife (at most {GROUPS} groups)"


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
        check_resamples(self.level, int(self.resamples), "ci (--ci)", self.level, "ci_resamples (--ci-resamples)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "over": self.over,
            "resamples": int(self.resamples),
            "seed": int(self.seed),
            "method": METHOD,
        }


def resamples_needed(level: float) -> int:
    """The fewest bootstrap replicates whose quantiles place both tails of a two-sided `level` interval: R with
    (R + 1) · (1 − level) / 2 >= 1 (the quantile at (R + 1) · tail, as `studentized` takes it, is then a replicate,
    not beyond the most extreme one)."""
    tail = (1.0 - level) / 2.0
    return max(math.ceil((1.0 / tail - 1.0) * (1.0 - 1e-9)), 1)  # 1e-9: the rounding of 1 - level (1 - 0.9999)


def check_resamples(level: float, resamples: int, level_option: str, value: float, resamples_option: str) -> None:
    """ArgumentError unless `resamples` replicates support a two-sided interval at `level` (`resamples_needed`),
    naming the options as given: `level_option` set to `value` (e.g. "ci (--ci)", 0.999), and `resamples_option`."""
    needed = resamples_needed(level)
    if resamples < needed:
        raise ArgumentError(
            f"{level_option} {value:g} needs {resamples_option} >= {needed}: with {resamples} resamples the"
            f" {50 * (1.0 - level):g}% tails of a {100 * level:g}% interval lie beyond the most extreme replicate;"
            f" give at least {needed} resamples, or a lower level."
        )


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
    identity = [np.arange(_count(unit))[None, :] for unit in units]
    (point_datasets, point_overall), (datasets, overall) = (
        estimates(scored, units, identity, settings.over),
        replicate_values(scored, units, settings),
    )
    tail = (1.0 - settings.level) / 2.0
    enough = [_count(unit) >= 2 for unit in units]

    def interval(point: float, error: Rows, replicates: Rows, metric: str, usable: bool) -> Interval:
        if not usable:
            return None
        return studentized(replicates.values[metric], replicates.errors[metric], tail, point, error.errors[metric][0])

    return Intervals(
        settings,
        {
            dataset.name: {
                metric: interval(
                    getattr(dataset, metric), point_datasets[index], datasets[index], metric, enough[index]
                )
                for metric in METRICS
            }
            for index, dataset in enumerate(scored.datasets)
        },
        {
            metric: interval(getattr(scored.overall, metric), point_overall, overall, metric, all(enough))
            for metric in METRICS
        },
    )


def studentized(values: np.ndarray, errors: np.ndarray, tail: float, point: float, error: float) -> Interval:
    """The studentized bootstrap interval (bootstrap-t) around the estimate `point` of standard error `error`.

    The replicates' t = (value − point) / (their own standard error) stand in for the unknown
    (point − truth) / error, so the interval is point − error · [t at 1 − tail, t at tail]. Unlike a
    percentile interval it widens where the sample is more spread than the replicates suggest: a mean
    or a pooled ratio over cells with a few very well predicted ones (skewed, heavy-tailed per-cell
    values) is low, with a small spread, exactly when those cells are missing, and percentile
    intervals (plain, BC or BCa) then miss the truth above. The t quantiles are taken at (replicates + 1)
    · tail from either end (numpy's "weibull"), not the inward (replicates − 1) · tail + 1 of the default,
    which costs about 1/replicates of coverage in each tail. None when the estimate or its error is not
    a finite number with error > 0, or more than `tail` of the t are undefined.
    """
    if not (math.isfinite(point) and math.isfinite(error) and error > 0):
        return None
    with np.errstate(all="ignore"):
        t = (values - point) / errors
    defined = t[np.isfinite(t)]
    if len(defined) == 0 or len(t) - len(defined) > tail * len(t):
        return None
    low, high = np.quantile(defined, [tail, 1.0 - tail], method="weibull")
    return float(point - high * error), float(point - low * error)


@dataclass(frozen=True)
class Rows:
    """Each metric of some replicates and its jackknife standard error, metric → (replicates,) arrays."""

    values: dict[str, np.ndarray]
    errors: dict[str, np.ndarray]


def _units(dataset: ScoredDataset, over: str) -> CellStats:
    """What one draw picks from: the dataset's blocks holding a valid entry, or its cells."""
    return dataset.stats if over == "cells" else resampled_blocks(dataset)


def resampled_blocks(dataset: ScoredDataset) -> CellStats:
    """The blocks of samples a bootstrap over blocks draws from (`--ci-over blocks`, `compare --significance`):
    those of `dataset.per_block` that hold a valid entry (a block of masked samples only is no unit of data)."""
    per_block = dataset.per_block
    assert per_block is not None  # require_blocks, or a paired comparison
    return per_block.map(lambda values: values[per_block.n_valid.sum(axis=1) > 0])


def _count(units: CellStats) -> int:
    return int(units.n_valid.shape[0])


def _groups(count: int) -> int:
    return max(1, min(count, GROUPS))


Scored = tuple[CellStats, CellScores]
Part = tuple[CellStats, CellScores, dict[str, np.ndarray]]


def estimates(
    scored: ScoredRun, units: Sequence[CellStats], draws: Sequence[np.ndarray], over: str
) -> tuple[list[Rows], Rows]:
    """Every metric of the replicates whose drawn units (per dataset, (replicates, units) indices) are `draws`, with
    its grouped-jackknife standard error: per dataset (in order), and overall (stratified over the datasets)."""
    clamp = scored.settings.clamp_negative
    full: list[Part] = []
    left_out: list[Part] = []
    for unit, drawn in zip(units, draws, strict=True):
        for parts, (stats, scores) in zip((full, left_out), _drawn(unit, drawn, over, scored.settings), strict=True):
            parts.append((stats, scores, dataset_rows(stats, scores, clamp)))
    groups = [_groups(drawn.shape[1]) for drawn in draws]
    datasets = [
        Rows(
            full[index][2], {metric: _jackknife_error(left_out[index][2][metric], groups[index]) for metric in METRICS}
        )
        for index in range(len(units))
    ]
    variance: dict[str, np.ndarray | float] = dict.fromkeys(METRICS, 0.0)
    for index, count in enumerate(groups):
        parts = [left_out[index] if other == index else _repeated(part, count) for other, part in enumerate(full)]
        left = overall_rows(parts, clamp)
        for metric in METRICS:
            variance[metric] = variance[metric] + _jackknife_error(left[metric], count) ** 2
    overall = Rows(overall_rows(full, clamp), {metric: np.sqrt(variance[metric]) for metric in METRICS})
    return datasets, overall


def _jackknife_error(left_out: np.ndarray, groups: int) -> np.ndarray:
    """Grouped-jackknife standard error of each replicate from its (replicates · groups,) leave-a-group-out values."""
    values = left_out.reshape(-1, groups)
    spread = ((values - values.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    return np.sqrt((groups - 1) / groups * spread)


def _repeated(part: Part, times: int) -> Part:
    """Every replicate row of a dataset's part `times` times in a row, next to another dataset's left-out groups."""

    def repeat(values: np.ndarray) -> np.ndarray:
        return np.repeat(values, times, axis=0)

    stats, scores, rows = part
    return (
        stats.map(repeat),
        scores.map(repeat),
        {metric: repeat(values) for metric, values in rows.items()},
    )


def _drawn(units: CellStats, drawn: np.ndarray, over: str, settings: ScoreSettings) -> tuple[Scored, Scored]:
    """(replicates, cells) statistics and scores of the draws, and (replicates · groups, cells) ones with each group
    of drawn units left out (drawn position j is in group j mod groups)."""
    if over == "cells" and drawn.shape[1] > 0:
        return _drawn_cells(units, drawn, settings)
    stats, without = _drawn_blocks(units, drawn)
    return (stats, marked_scores(stats, settings)), (without, marked_scores(without, settings))


def _drawn_blocks(units: CellStats, drawn: np.ndarray) -> tuple[CellStats, CellStats]:
    """The merge of the drawn blocks, and of the drawn blocks less a group: a left-out block is merged with its
    multiplicity lowered (`reduce_rows`)."""
    size, count = drawn.shape
    groups = _groups(count)
    if count == 0:
        return CellStats.zeros((size, units.n_cells)), CellStats.zeros((size * groups, units.n_cells))
    rows = np.arange(size)[:, None]
    counts = np.zeros((size, count))
    np.add.at(counts, (rows, drawn), 1.0)
    in_group = np.zeros((size, groups, count))
    np.add.at(in_group, (rows, (np.arange(count) % groups)[None, :], drawn), 1.0)
    return reduce_rows(units, counts), reduce_rows(units, (counts[:, None, :] - in_group).reshape(size * groups, count))


def _drawn_cells(units: CellStats, drawn: np.ndarray, settings: ScoreSettings) -> tuple[Scored, Scored]:
    """The drawn cells, and the drawn cells with a group of them left out as cells without a sample (uncovered),
    which no summary counts. A cell's scores are its own, so they are looked up (`marked_scores` of the cells and of
    a cell without a sample, drawn as the last one), not computed again for every replicate."""
    size, count = drawn.shape
    groups = _groups(count)
    cells = CellStats(
        **{
            name: np.concatenate([values, empty])
            for (name, values), empty in zip(units.fields().items(), CellStats.zeros(1).fields().values(), strict=True)
        }
    )
    scores = marked_scores(cells, settings)
    out = (np.arange(count) % groups)[None, :] == np.arange(groups)[:, None]
    left = np.where(out, units.n_cells, drawn[:, None, :]).reshape(size * groups, count)

    def side(index: np.ndarray) -> Scored:
        return (
            cells.map(lambda values: values[index]),
            scores.map(lambda values: values[index]),
        )

    return side(drawn), side(left)


def replicate_values(
    scored: ScoredRun, units: Sequence[CellStats], settings: IntervalSettings
) -> tuple[list[Rows], Rows]:
    """Every metric in each bootstrap replicate with its standard error: per dataset (in order), and overall."""
    rngs = [np.random.default_rng(child) for child in np.random.SeedSequence(settings.seed).spawn(len(units))]
    chunks = []
    chunk = _chunk_size(units, settings)
    for start in range(0, settings.resamples, chunk):
        size = min(chunk, settings.resamples - start)
        draws = [
            rng.integers(0, max(_count(unit), 1), size=(size, _count(unit)))
            for unit, rng in zip(units, rngs, strict=True)
        ]
        chunks.append(estimates(scored, units, draws, settings.over))

    def joined(pieces: list[Rows]) -> Rows:
        return Rows(
            *(
                {metric: np.concatenate([getattr(piece, side)[metric] for piece in pieces]) for metric in METRICS}
                for side in ("values", "errors")
            )
        )

    per_dataset = [joined([datasets[index] for datasets, _ in chunks]) for index in range(len(units))]
    return per_dataset, joined([overall for _, overall in chunks])


def _chunk_size(units: Sequence[CellStats], settings: IntervalSettings) -> int:
    """Replicates per chunk: each takes GROUPS + 1 rows of statistics, whose widest temporaries are float64
    (blocks, cells) extremes in reduce_rows, or the fields and scores of the drawn cells."""
    if settings.over == "cells":
        width = sum(2 * len(STAT_FIELDS) * unit.n_cells for unit in units)
    else:
        width = sum(_count(unit) * unit.n_cells for unit in units)
    return max(1, min(settings.resamples, MEMORY_BOUND // (8 * (GROUPS + 1) * max(width, 1))))
