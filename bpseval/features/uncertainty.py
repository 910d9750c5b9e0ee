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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bpseval.errors import ArgumentError
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.metrics import SPIKE_SUMS, Partial, sums_needed
from bpseval.kernel.stats import EXCLUDED, CellScores, reduce_rows
from bpseval.run.scored import (
    SUMMARY_METRICS,
    ScoredDataset,
    ScoredRun,
    ScoreSettings,
    joined_scores,
    marked_scores,
    metric_partials,
    metric_values,
    overall_values,
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
    units = [units_of(dataset, settings.over) for dataset in scored.datasets]
    if not units:
        return Intervals(settings, {}, dict.fromkeys(METRICS))
    point = estimates(units, identity_draws(units), scored.settings)
    rngs = [np.random.default_rng(child) for child in np.random.SeedSequence(settings.seed).spawn(len(units))]

    def draw(size: int) -> list[np.ndarray]:
        return [
            rng.integers(0, max(unit.count, 1), size=(size, unit.count)) for unit, rng in zip(units, rngs, strict=True)
        ]

    ((datasets, overall),) = replicate_values([(units, scored.settings)], lambda size: [draw(size)], settings.resamples)
    tail = (1.0 - settings.level) / 2.0
    enough = [unit.count >= 2 for unit in units]
    return Intervals(
        settings,
        {
            dataset.name: scope_intervals(dataset.numbers, point[0][index], datasets[index], tail, enough[index])
            for index, dataset in enumerate(scored.datasets)
        },
        scope_intervals(scored.overall.numbers, point[1], overall, tail, all(enough)),
    )


def scope_intervals(
    numbers: Mapping[str, float], point: Replicates, replicates: Replicates, tail: float, usable: bool = True
) -> dict[str, Interval]:
    """The `studentized` interval of each metric of `replicates`, around `numbers` with the standard errors of
    `point` (the estimate's own `Replicates`); None for every metric when not `usable` (too few units)."""
    if not usable:
        return dict.fromkeys(replicates.values)
    errors, point_errors = replicates.errors(), point.errors()
    return {
        metric: studentized(values, errors[metric], tail, numbers[metric], float(point_errors[metric][0]))
        for metric, values in replicates.values.items()
    }


def studentized(values: np.ndarray, errors: np.ndarray, tail: float, point: float, error: float) -> Interval:
    """The studentized bootstrap interval (bootstrap-t) around the estimate `point` of standard error `error`.

    The replicates' t = (value − point) / (their own standard error) stand in for the unknown
    (point − truth) / error, so the interval is point − error · [t at 1 − tail, t at tail]. Unlike a
    percentile interval it widens where the sample is more spread than the replicates suggest: a mean
    or a pooled ratio over cells with a few very well predicted ones (skewed, heavy-tailed per-cell
    values) is low, with a small spread, exactly when those cells are missing, and percentile
    intervals (plain, BC or BCa) then miss the truth above. The t quantiles are taken at (replicates + 1)
    · tail from either end (numpy's "weibull"), not the inward (replicates − 1) · tail + 1 of the default,
    which costs about 1/replicates of coverage in each tail. [point, point] when nothing varies: the
    error is 0 and every replicate is the point (a change between two runs that score every sample
    alike). None when the estimate or its error is not a finite number, the error is 0 while some
    replicate differs, or more than `tail` of the t are undefined.
    """
    if not (math.isfinite(point) and math.isfinite(error) and error >= 0):
        return None
    if error == 0:
        return (point, point) if bool(np.all(values == point)) else None
    with np.errstate(all="ignore"):
        t = (values - point) / errors
    defined = t[np.isfinite(t)]
    if len(defined) == 0 or len(t) - len(defined) > tail * len(t):
        return None
    low, high = np.quantile(defined, [tail, 1.0 - tail], method="weibull")
    return float(point - high * error), float(point - low * error)


@dataclass(frozen=True)
class Units:
    """What one draw of a dataset picks from: its blocks of samples (scored once drawn), or its cells (with their
    own scores: a cell's scores do not depend on the draw)."""

    stats: CellStats
    scores: CellScores | None = None
    excluded: np.ndarray | None = None
    """The dataset's excluded cells, which a drawn block's scores mark excluded too (`marked_scores`)."""

    @property
    def count(self) -> int:
        return int(self.stats.n_valid.shape[0])


def units_of(dataset: ScoredDataset, over: str) -> Units:
    """The dataset's units of a draw: its blocks holding a valid entry (`over` "blocks"), or its cells."""
    if over == "cells":
        return Units(dataset.stats, dataset.scores)
    return Units(resampled_blocks(dataset), excluded=dataset.scores.status == EXCLUDED)


def resampled_blocks(dataset: ScoredDataset) -> CellStats:
    """The blocks of samples a bootstrap over blocks draws from (`--ci-over blocks`, `compare --significance`):
    those of `dataset.per_block` that hold a valid entry (a block of masked samples only is no unit of data)."""
    per_block = dataset.per_block
    assert per_block is not None  # require_blocks, or a paired comparison
    return per_block.map(lambda values: values[per_block.n_valid.sum(axis=1) > 0])


def identity_draws(units: Sequence[Units]) -> list[np.ndarray]:
    """The draw of every unit once: the estimate itself, as one replicate (with its jackknife error)."""
    return [np.arange(unit.count)[None, :] for unit in units]


def _groups(count: int) -> int:
    return max(1, min(count, GROUPS))


Values = dict[str, np.ndarray]


@dataclass(frozen=True)
class Replicates:
    """Some metrics of some replicates, metric → (replicates,), with their grouped-jackknife left-out values.

    `strata` holds per independently drawn stratum (a dataset; for a difference of two sides drawn apart, a
    dataset of one side) its leave-a-group-out values, metric → (replicates · groups,), and its number of groups;
    the variance of a replicate is the sum of its strata's jackknife variances.
    """

    values: Values
    strata: list[tuple[Values, int]]

    def errors(self) -> Values:
        """The grouped-jackknife standard error of each replicate of each metric."""
        return {
            metric: np.sqrt(sum((_jackknife_error(left[metric], groups) ** 2 for left, groups in self.strata), 0.0))
            for metric in self.values
        }

    def minus(self, other: Replicates, paired: Sequence[bool]) -> Replicates:
        """self − other, replicate by replicate. `paired[i]`: stratum i was drawn alike on both sides (its left-out
        values subtract), else apart (each side's stratum varies with the other side held at its replicate)."""
        values = {metric: self.values[metric] - other.values[metric] for metric in self.values}
        strata = []
        for (mine, groups), (theirs, _), alike in zip(self.strata, other.strata, paired, strict=True):
            if alike:
                strata.append(({metric: mine[metric] - theirs[metric] for metric in values}, groups))
                continue
            strata.append(({m: mine[m] - np.repeat(other.values[m], groups) for m in values}, groups))
        strata += [
            ({m: np.repeat(self.values[m], groups) - theirs[m] for m in values}, groups)
            for (theirs, groups), alike in zip(other.strata, paired, strict=True)
            if not alike
        ]
        return Replicates(values, strata)


def _jackknife_error(left_out: np.ndarray, groups: int) -> np.ndarray:
    """Grouped-jackknife standard error of each replicate from its (replicates · groups,) leave-a-group-out values."""
    values = left_out.reshape(-1, groups)
    spread = ((values - values.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    return np.sqrt((groups - 1) / groups * spread)


Partials = dict[str, Partial]


def estimates(
    units: Sequence[Units], draws: Sequence[np.ndarray], settings: ScoreSettings, metrics: Sequence[str] = METRICS
) -> tuple[list[Replicates], Replicates]:
    """The `metrics` of the replicates whose drawn units (per dataset, (replicates, units) indices) are `draws`,
    with their left-out values: per dataset (in order), and overall (one stratum per dataset).

    A dataset's replicates are scored cell by cell; the overall numbers combine the datasets' sums
    (`metric_partials`), so a stratum's left-out overall values take the other datasets' sums as they are.
    """
    clamp = settings.clamp_negative
    needs = sums_needed(metrics)
    full: list[Partials] = []
    left_out: list[Partials] = []
    for unit, drawn in zip(units, draws, strict=True):
        for parts, (stats, scores) in zip((full, left_out), _drawn(unit, drawn, settings, needs), strict=True):
            parts.append(metric_partials(scores, stats, clamp, metrics))
    groups = [_groups(drawn.shape[1]) for drawn in draws]
    datasets = [
        Replicates(metric_values(full[index]), [(metric_values(left_out[index]), groups[index])])
        for index in range(len(units))
    ]
    strata = []
    for index, count in enumerate(groups):
        parts = [
            left_out[index] if other == index else {name: partial.repeated(count) for name, partial in part.items()}
            for other, part in enumerate(full)
        ]
        strata.append((overall_values(parts), count))
    return datasets, Replicates(overall_values(full), strata)


Scored = tuple[CellStats, CellScores]


def _drawn(units: Units, drawn: np.ndarray, settings: ScoreSettings, needs: tuple[str, ...]) -> tuple[Scored, Scored]:
    """(replicates, cells) statistics and scores of the draws, and (replicates · groups, cells) ones with each group
    of drawn units left out (drawn position j is in group j mod groups)."""
    if units.scores is not None and drawn.shape[1] > 0:
        return _drawn_cells(units.stats, units.scores, drawn, settings)
    stats, without = _drawn_blocks(units.stats, drawn, needs)
    lean = set(needs) <= set(SPIKE_SUMS)  # the other sums are NaN: score only what reads these
    return (
        (stats, marked_scores(stats, settings, units.excluded, lean)),
        (without, marked_scores(without, settings, units.excluded, lean)),
    )


def _drawn_blocks(units: CellStats, drawn: np.ndarray, needs: tuple[str, ...]) -> tuple[CellStats, CellStats]:
    """The merge of the drawn blocks, and of the drawn blocks less a group: a left-out block is merged with its
    multiplicity lowered (`reduce_rows`, of the fields the metrics need)."""
    size, count = drawn.shape
    groups = _groups(count)
    if count == 0:
        return CellStats.zeros((size, units.n_cells)), CellStats.zeros((size * groups, units.n_cells))
    rows = np.arange(size)[:, None]
    counts = np.zeros((size, count))
    np.add.at(counts, (rows, drawn), 1.0)
    in_group = np.zeros((size, groups, count))
    np.add.at(in_group, (rows, (np.arange(count) % groups)[None, :], drawn), 1.0)
    without = (counts[:, None, :] - in_group).reshape(size * groups, count)
    return reduce_rows(units, counts, needs), reduce_rows(units, without, needs)


def _drawn_cells(
    units: CellStats, scores: CellScores, drawn: np.ndarray, settings: ScoreSettings
) -> tuple[Scored, Scored]:
    """The drawn cells, and the drawn cells with a group of them left out as cells without a sample (uncovered),
    which no summary counts. A cell's scores are its own, so they are looked up (the cells' and those of a cell
    without a sample, drawn as the last one), not computed again for every replicate."""
    size, count = drawn.shape
    groups = _groups(count)
    nothing = CellStats.zeros(1)
    cells = CellStats(
        **{name: np.concatenate([values, getattr(nothing, name)]) for name, values in units.fields().items()}
    )
    every = joined_scores([scores, marked_scores(nothing, settings)])
    out = (np.arange(count) % groups)[None, :] == np.arange(groups)[:, None]
    left = np.where(out, units.n_cells, drawn[:, None, :]).reshape(size * groups, count)

    def side(index: np.ndarray) -> Scored:
        return (
            cells.map(lambda values: values[index]),
            every.map(lambda values: values[index]),
        )

    return side(drawn), side(left)


Draw = Callable[[int], list[list[np.ndarray]]]
"""`size` → per side, per dataset, the (size, units) indices drawn for `size` replicates."""


def replicate_values(
    sides: Sequence[tuple[Sequence[Units], ScoreSettings]],
    draw: Draw,
    resamples: int,
    metrics: Sequence[str] = METRICS,
) -> list[tuple[list[Replicates], Replicates]]:
    """The `metrics` of `resamples` bootstrap replicates of each side (a run, or a run and its baseline drawn by one
    `draw`), in chunks that bound memory: per side, per dataset (in order) and overall."""
    chunk = _chunk_size([unit for units, _ in sides for unit in units], resamples)
    chunks = []
    for start in range(0, resamples, chunk):
        draws = draw(min(chunk, resamples - start))
        chunks.append(
            [estimates(units, drawn, settings, metrics) for (units, settings), drawn in zip(sides, draws, strict=True)]
        )
    return [
        (
            [_joined([piece[side][0][index] for piece in chunks]) for index in range(len(units))],
            _joined([piece[side][1] for piece in chunks]),
        )
        for side, (units, _) in enumerate(sides)
    ]


def _joined(pieces: Sequence[Replicates]) -> Replicates:
    """The replicates of several chunks, one after the other."""

    def joined(parts: Sequence[Values]) -> Values:
        return {metric: np.concatenate([part[metric] for part in parts]) for metric in parts[0]}

    strata = [
        (joined([piece.strata[index][0] for piece in pieces]), pieces[0].strata[index][1])
        for index in range(len(pieces[0].strata))
    ]
    return Replicates(joined([piece.values for piece in pieces]), strata)


def _chunk_size(units: Sequence[Units], resamples: int) -> int:
    """Replicates per chunk: each takes GROUPS + 1 rows of statistics, whose widest temporaries are float64
    (blocks, cells) extremes in reduce_rows, or the fields and scores of the drawn cells. Datasets are drawn one
    after the other, and only their sums (`metric_partials`) are kept, so the widest dataset bounds a chunk."""
    width = max(
        2 * len(STAT_FIELDS) * unit.stats.n_cells if unit.scores is not None else unit.count * unit.stats.n_cells
        for unit in units
    )
    return max(1, min(resamples, MEMORY_BOUND // (8 * (GROUPS + 1) * max(width, 1))))
