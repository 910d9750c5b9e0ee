"""The summary metrics, each declared once: which cells take part, each cell's value, how values aggregate.

Every summary number bpseval reports derives from a `Metric` in `METRICS`: a dataset's numbers and the run's
(`run.scored`), a group's (`features.groups`), the replicates of `--ci` and of both of compare's bootstraps
(`features.uncertainty`), and the cells' contributions to a change (`features.attribution`). Each path looks
its metric up in `METRICS` when it runs, so changing a declaration changes every one of them.

A dataset's number is a ratio of sums over the cells that take part, Σ numerator / Σ denominator:

- a mean (`MEAN`: bps, pseudo_r2, corr) takes the `ok` cells where the cell's value is defined, with
  numerator the value and denominator 1;
- a pooled number (`POOLED`: bps_pooled, pseudo_r2_pooled) takes every covered cell (ok, low and silent; not an
  excluded one), with the numerator and denominator its declaration gives.

The run's number (and a group's over several datasets) is, for a mean, the mean of the datasets' numbers
where they are defined, and for a pooled number the same ratio over every dataset's cells. Any `overflow`
cell leaves every number of its scope undefined (NaN), as does a denominator that is not a positive finite
number. Every function takes arrays of any leading shape (replicates, ...) over a last axis of cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bpseval.kernel.cellstats import GREATEST_FIELDS, LEAST_FIELDS, STAT_FIELDS, CellStats
from bpseval.kernel.stats import EXCLUDED, LN2, OK, OVERFLOW, UNCOVERED, CellScores

MEAN, POOLED = "mean", "pooled"

Scored = tuple[CellScores, CellStats]
"""One dataset's per-cell scores and statistics, of shape (..., cells)."""
PerCell = Callable[[CellScores, CellStats], np.ndarray]


@dataclass(frozen=True)
class Partial:
    """A metric's sums over one dataset's cells, of shape (...): Σ numerator, Σ denominator over the cells that
    take part, and whether a cell overflowed. A dataset's number is their ratio; over several datasets they
    combine (`Metric.combined`) without going back to the cells, which a bootstrap's left-out replicates need."""

    numerator: np.ndarray
    denominator: np.ndarray
    overflowed: np.ndarray

    def value(self) -> np.ndarray:
        """Σ numerator / Σ denominator, NaN where undefined."""
        return _ratio(self.numerator, self.denominator, self.overflowed)

    def repeated(self, times: int) -> Partial:
        """Each replicate `times` times in a row (along the first axis)."""
        return Partial(
            *(np.repeat(values, times, axis=0) for values in (self.numerator, self.denominator, self.overflowed))
        )


@dataclass(frozen=True)
class Metric:
    """One summary metric: which cells take part, their numerators and denominators, and how datasets combine.

    Attributes:
        name: The metric's name in every output.
        aggregate: `MEAN` (the mean of a per-cell value over the ok cells where it is defined; the run's is the
            mean of the datasets') or `POOLED` (Σ numerator / Σ denominator over every covered cell, of a
            dataset or of the whole run).
        value: Each cell's value (a mean's) or numerator (a pooled number's), from its scores and statistics.
        denominator: A pooled number's per-cell denominator (None for a mean: every cell counts 1).
        cell_score: The per-cell score shown beside a cell's contribution (bps_pooled shows bps).
        needs: The `CellStats` fields `value` and `denominator` read, beyond the status; a bootstrap merges only
            these (the others are NaN, which leaves a metric that reads them undefined, never wrong).
        clamps: `clamp_negative` (legacy training loops) clamps the cell's value at 0 before the mean.
        description: One line for the docs and tables.
    """

    name: str
    aggregate: str
    value: PerCell
    denominator: PerCell | None = None
    cell_score: str = ""
    needs: tuple[str, ...] = ()
    clamps: bool = False
    description: str = ""

    def parts(self, scores: CellScores, stats: CellStats, clamp_negative: bool = False) -> tuple[np.ndarray, ...]:
        """Per cell: (numerator, denominator, takes part), 0 where a cell takes no part; shapes (..., cells)."""
        with np.errstate(all="ignore"):
            value = np.asarray(self.value(scores, stats), dtype=np.float64)
            if self.clamps and clamp_negative:
                value = np.maximum(value, 0.0)
            if self.aggregate == MEAN:
                takes_part = (scores.status == OK) & ~np.isnan(value)
                denominator = takes_part.astype(np.float64)
            else:
                assert self.denominator is not None
                takes_part = (scores.status != UNCOVERED) & (scores.status != EXCLUDED)
                denominator = np.where(takes_part, self.denominator(scores, stats), 0.0)
        return np.where(takes_part, value, 0.0), denominator, takes_part

    def partial(self, scores: CellScores, stats: CellStats, clamp_negative: bool = False) -> Partial:
        """The metric's sums over one dataset's cells, shape (...): its number, and what combines over datasets."""
        numerator, denominator, _ = self.parts(scores, stats, clamp_negative)
        return Partial(numerator.sum(axis=-1), denominator.sum(axis=-1), _overflowed(scores))

    def of_dataset(self, scores: CellScores, stats: CellStats, clamp_negative: bool = False) -> np.ndarray:
        """The dataset's number, shape (...): NaN when undefined (no cell takes part, or a cell overflowed)."""
        return self.partial(scores, stats, clamp_negative).value()

    def combined(self, partials: Sequence[Partial]) -> np.ndarray:
        """The number over several datasets from their `partial`s (the run's, a group's across datasets), shape
        (...): a mean metric's is the mean of the datasets' defined numbers, a pooled one's the ratio of all sums;
        NaN when undefined, or when any dataset has a cell that overflowed."""
        if not partials:
            return np.asarray(np.nan)
        overflowed = np.any([partial.overflowed for partial in partials], axis=0)
        if self.aggregate == MEAN:
            values = np.stack([partial.value() for partial in partials])
            defined = ~np.isnan(values)
            return _ratio(np.where(defined, values, 0.0).sum(axis=0), defined.sum(axis=0), overflowed)
        numerator = np.sum([partial.numerator for partial in partials], axis=0)
        denominator = np.sum([partial.denominator for partial in partials], axis=0)
        return _ratio(numerator, denominator, overflowed)

    def of_datasets(self, datasets: Sequence[Scored], clamp_negative: bool = False) -> np.ndarray:
        """The number over several datasets' (..., cells) scores and statistics, shape (...)."""
        return self.combined([self.partial(scores, stats, clamp_negative) for scores, stats in datasets])

    def contributions(
        self, datasets: Sequence[Scored], clamp_negative: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each cell's part in the number over `datasets` (one of them: the dataset's), and whether it takes part.

        The parts add up to the number (to rounding) where it is defined; nothing takes part where it is not.
        Returns:
            Per dataset, (contribution, takes part) arrays of shape (cells,).
        """
        value = float(self.of_datasets(datasets, clamp_negative))
        sums = [self.parts(scores, stats, clamp_negative) for scores, stats in datasets]
        if not np.isfinite(value):
            return [(np.zeros(part[2].shape), np.zeros(part[2].shape, dtype=bool)) for part in sums]
        if self.aggregate == POOLED:
            total = sum(float(part[1].sum()) for part in sums)
            return [(numerator / total, takes_part) for numerator, _, takes_part in sums]
        defined = [float(denominator.sum()) > 0 for _, denominator, _ in sums]
        count = max(sum(defined), 1)
        return [
            (numerator / max(float(denominator.sum()), 1.0) / count, takes_part)
            for numerator, denominator, takes_part in sums
        ]


def _overflowed(scores: CellScores) -> np.ndarray:
    return np.asarray((scores.status == OVERFLOW).any(axis=-1))


def _ratio(numerator: np.ndarray, denominator: np.ndarray, overflowed: np.ndarray) -> np.ndarray:
    """numerator / denominator where the denominator is a positive finite number, the ratio finite and nothing
    overflowed; NaN elsewhere."""
    with np.errstate(all="ignore"):
        ratio = np.asarray(numerator / denominator, dtype=np.float64)
    usable = (denominator > 0) & np.isfinite(denominator) & np.isfinite(ratio) & ~overflowed
    return np.where(usable, ratio, np.nan)


def _spikes_in_bits(scores: CellScores, stats: CellStats) -> np.ndarray:
    return LN2 * stats.spikes


def _explained_deviance(scores: CellScores, stats: CellStats) -> np.ndarray:
    return scores.null_deviance - scores.model_deviance


SPIKE_SUMS = ("n_valid", "weight", "spikes", "model_ll")
"""What bps reads: the status, the null model's rate and the model's log-likelihood."""
DEVIANCE_SUMS = (*SPIKE_SUMS, "spike_log_spikes", "count_min", "count_max")
CORRELATION_SUMS = (*SPIKE_SUMS, "rate_sum", "rate_m2", "count_m2", "co_m2", *LEAST_FIELDS, *GREATEST_FIELDS)

METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric(
            "bps",
            MEAN,
            lambda scores, stats: scores.bps,
            cell_score="bps",
            needs=SPIKE_SUMS,
            clamps=True,
            description="mean bits per spike over the ok cells",
        ),
        Metric(
            "bps_pooled",
            POOLED,
            lambda scores, stats: scores.ll_gain,
            _spikes_in_bits,
            cell_score="bps",
            needs=SPIKE_SUMS,
            description="Σ ll_gain / (ln 2 · Σ spikes) over the covered cells (Neural Latents Benchmark co-bps)",
        ),
        Metric(
            "pseudo_r2",
            MEAN,
            lambda scores, stats: scores.pseudo_r2,
            cell_score="pseudo_r2",
            needs=DEVIANCE_SUMS,
            description="mean deviance explained, 1 − D_model / D_null, over the ok cells where it is defined",
        ),
        Metric(
            "pseudo_r2_pooled",
            POOLED,
            _explained_deviance,
            lambda scores, stats: scores.null_deviance,
            cell_score="pseudo_r2",
            needs=DEVIANCE_SUMS,
            description="1 − Σ D_model / Σ D_null over the covered cells",
        ),
        Metric(
            "corr",
            MEAN,
            lambda scores, stats: scores.corr,
            cell_score="corr",
            needs=CORRELATION_SUMS,
            description="mean Pearson correlation of λ and robs over the ok cells where it is defined",
        ),
    )
}
"""Every summary metric, in the order the outputs show them. Adding one is one declaration here, and its test."""


def sums_needed(names: Sequence[str]) -> tuple[str, ...]:
    """The `CellStats` fields the metrics `names` read (`Metric.needs`), in field order."""
    needed = {field for name in names for field in METRICS[name].needs}
    return tuple(field for field in STAT_FIELDS if field in needed)
