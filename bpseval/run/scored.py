"""The scored run: per dataset its merged statistics and per-cell scores, a typed overall, and the settings.

Every output (tables, JSON, CSV, figures, the compare gate) is a view of a `ScoredRun`. The
offline merge (`score_run`) and the online `DistributedBPS.compute()` produce one through `score`:
one place decides what a dataset's and the run's numbers are. A baseline document gives one back
with its numbers as written (`run.document.scored_from_document`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bpseval.errors import ArgumentError
from bpseval.kernel.cellstats import CellStats
from bpseval.kernel.metrics import METRICS, Partial
from bpseval.kernel.stats import EXCLUDED, LOW, MIN_RATE, OK, OVERFLOW, CellScores, cell_scores, status_counts
from bpseval.run.dedup import RHAT_COPY_RTOL
from bpseval.run.merge import MergedDataset, MergedRun


@dataclass(frozen=True)
class Exclusions:
    """Cells left out of every number on purpose (`--exclude-cells`), each with its reason ("" when none given).

    Matched by dataset name and either the cell's index in its dataset (`by` "cell") or its cell id as text
    (`by` "cell_id").
    """

    source: str
    """The table they were read from, for messages and the document's settings."""
    by: str
    cells: tuple[tuple[str, str, str], ...]
    """(dataset, index or cell id as text, reason) of every excluded cell."""

    def reasons(self, name: str, cell_ids: np.ndarray) -> dict[int, str]:
        """The excluded cells of the dataset `name` (with these cell ids), by index, each with its reason."""
        wanted = {key: reason for dataset, key, reason in self.cells if dataset == name}
        keys = [str(index) for index in range(len(cell_ids))] if self.by == "cell" else map(str, cell_ids.tolist())
        return {index: wanted[key] for index, key in enumerate(keys) if key in wanted}

    def mask(self, name: str, cell_ids: np.ndarray) -> np.ndarray:
        """Which cells of the dataset `name` are excluded."""
        excluded = np.zeros(len(cell_ids), dtype=bool)
        excluded[list(self.reasons(name, cell_ids))] = True
        return excluded

    def lines(self, datasets: Sequence[tuple[str, np.ndarray]]) -> list[str]:
        """One line per dataset (name, cell ids) with excluded cells, each named with its reason, and one for the
        rows of the table that name no cell of `datasets`: what every command says about the exclusions."""
        lines, found = [], set()
        for name, cell_ids in datasets:
            reasons = self.reasons(name, cell_ids)
            keys = {index: str(index) if self.by == "cell" else str(cell_ids[index]) for index in reasons}
            if reasons:
                named = ", ".join(
                    f"{self.by} {keys[index]}" + (f" ({why})" if why else "") for index, why in reasons.items()
                )
                count = f"{len(reasons)} cell{'s' * (len(reasons) != 1)}"
                lines.append(f"dataset {name!r}: {count} excluded by {self.source}: {named}")
            found |= {(name, key) for key in keys.values()}
        unknown = [(dataset, key) for dataset, key, _ in self.cells if (dataset, key) not in found]
        if unknown:
            shown = ", ".join(f"dataset {dataset!r} {self.by} {key}" for dataset, key in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            count = f"{len(unknown)} cell{'s' * (len(unknown) != 1)}"
            lines.append(f"{self.source} names {count} that the run does not hold: {shown}{more}")
        return lines


@dataclass(frozen=True)
class ScoreSettings:
    """What changes the numbers besides the data."""

    clamp_negative: bool = False
    """Reproduce legacy training loops: clamp each cell's bps at 0 before the means (biased upwards)."""
    min_rate: float = MIN_RATE
    duplicate_rhat_rtol: float = RHAT_COPY_RTOL
    min_samples: int = 0
    """Cells that would be ok with fewer valid samples than this are `low`: left out of the means, kept in the
    pooled number. 0 (or 1) marks no cell."""
    exclusions: Exclusions | None = None
    """Cells marked `excluded`: in no number, in no coverage gate, and listed as excluded in every output."""

    def __post_init__(self) -> None:
        value = self.min_samples
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ArgumentError(f"min_samples must be a whole number >= 0, not {self.min_samples!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "clamp_negative": self.clamp_negative,
            "min_rate": self.min_rate,
            "duplicate_rhat_rtol": self.duplicate_rhat_rtol,
            "min_samples": int(self.min_samples),
            **({"exclude_cells": self.exclusions.source} if self.exclusions is not None else {}),
        }


DEFAULT_SETTINGS = ScoreSettings()


class _Number:
    """A summary number read as an attribute: `dataset.bps` is `dataset.numbers["bps"]`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, holder: Numbers, owner: type | None = None) -> float:
        return holder.numbers[self.name]


class Numbers:
    """The summary numbers (`kernel.metrics.METRICS`) of a dataset, a group of cells or a run, by name in `numbers`,
    NaN where undefined; each also as an attribute (bps: the mean over ok cells, of a run the mean of its
    datasets'; bps_pooled: Σ ll_gain / (ln 2 · Σ spikes) over covered cells; ...)."""

    numbers: dict[str, float]
    bps = _Number()
    bps_pooled = _Number()
    pseudo_r2 = _Number()
    pseudo_r2_pooled = _Number()
    corr = _Number()


@dataclass(frozen=True)
class ScoredDataset(Numbers):
    """One dataset: its statistics over all ranks, every cell's scores, and its summary numbers."""

    name: str
    cell_ids: np.ndarray
    stats: CellStats
    scores: CellScores
    samples: int
    duplicates_dropped: int
    identity: str
    """Checksum of the dataset name, cell ids and scored sample_idx: equal identities scored the same samples."""
    numbers: dict[str, float]
    cells: dict[str, int]
    """How many cells have each status."""
    per_rank: list[CellStats] = field(default_factory=list)
    """Each rank's statistics (empty when not known: a baseline document)."""
    per_block: CellStats | None = None
    """(blocks, cells) statistics by contiguous sample_idx block, when asked for."""
    rate_kind: str = "rate"
    rank_valid: np.ndarray | None = None
    """(ranks, cells): the valid samples each rank saw, padding copies included (`MergedDataset.rank_valid`, the
    count `plan` predicts); None when not known (the online metric, a document)."""

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)

    @property
    def has_ok_cells(self) -> bool:
        return self.cells[OK] > 0


@dataclass(frozen=True)
class Overall(Numbers):
    """The run's numbers: a mean metric is the mean of the datasets' numbers, a pooled one pools every covered
    cell."""

    numbers: dict[str, float]
    datasets: int
    """Datasets with an ok cell, which the overall bps averages."""
    datasets_without_ok_cells: list[str]
    cells: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.numbers,
            "datasets": self.datasets,
            "datasets_without_ok_cells": list(self.datasets_without_ok_cells),
            "cells": dict(self.cells),
        }


@dataclass(frozen=True)
class ScoredRun:
    """One step of a run, scored: what every view shows and every gate decides on."""

    step: int
    world_size: int
    files: list[str]
    datasets: list[ScoredDataset]
    overall: Overall
    settings: ScoreSettings
    warnings: list[str] = field(default_factory=list)
    source: str | None = None
    """The run directory it was merged from (None: the online metric or a document)."""

    def dataset(self, name: str) -> ScoredDataset:
        """The dataset called `name` (KeyError when there is none)."""
        for dataset in self.datasets:
            if dataset.name == name:
                return dataset
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [dataset.name for dataset in self.datasets]

    @property
    def samples(self) -> int:
        return sum(dataset.samples for dataset in self.datasets)

    @property
    def duplicates_dropped(self) -> int:
        return sum(dataset.duplicates_dropped for dataset in self.datasets)

    @property
    def identity(self) -> str:
        """Checksum of what was scored (datasets, cells, sample_idx): equal for runs that scored the same samples."""
        digest = hashlib.sha256()
        for name, identity in sorted((dataset.name, dataset.identity) for dataset in self.datasets):
            digest.update(f"{name}={identity};".encode())
        return digest.hexdigest()


def marked_scores(
    stats: CellStats,
    settings: ScoreSettings = DEFAULT_SETTINGS,
    excluded: np.ndarray | None = None,
    spike_sums_only: bool = False,
) -> CellScores:
    """`cell_scores` with the settings applied, for statistics of any shape (cells, or (replicates, cells)).

    The one place where the settings change the scores: ok cells with fewer than `settings.min_samples`
    valid samples become `low`, which the means leave out and the pooled number keeps; the cells of
    `excluded` (a mask over the cells, from `settings.exclusions`) become `excluded`, in no number.
    `spike_sums_only`: as `cell_scores` takes it.
    """
    scores = cell_scores(stats, spike_sums_only)
    if settings.min_samples > 1:
        low = (scores.status == OK) & (stats.n_valid < settings.min_samples)
        scores = scores.with_status(np.where(low, LOW, scores.status))
    return scores if excluded is None else _marked_excluded(scores, excluded)


def _marked_excluded(scores: CellScores, excluded: np.ndarray) -> CellScores:
    """`scores` with the cells of the mask `excluded` marked `excluded`, whatever their status."""
    return scores.with_status(np.where(excluded, EXCLUDED, scores.status)) if excluded.any() else scores


def score_dataset(
    merged: MergedDataset, settings: ScoreSettings = DEFAULT_SETTINGS, stats: CellStats | None = None
) -> ScoredDataset:
    """Score every cell of a merged dataset and summarise it (`stats`: its total, when already added up)."""
    total = merged.total if stats is None else stats
    excluded = None if settings.exclusions is None else settings.exclusions.mask(merged.name, merged.cell_ids)
    scores = marked_scores(total, settings, excluded)
    return ScoredDataset(
        name=merged.name,
        cell_ids=merged.cell_ids,
        stats=total,
        scores=scores,
        samples=merged.samples,
        duplicates_dropped=merged.duplicates_dropped,
        identity=merged.identity,
        **dataset_numbers(scores, total, settings.clamp_negative),
        per_rank=list(merged.per_rank),
        per_block=merged.per_block,
        rate_kind=merged.rate_kind,
        rank_valid=merged.rank_valid,
    )


def dataset_numbers(scores: CellScores, stats: CellStats, clamp_negative: bool = False) -> dict[str, Any]:
    """The summary numbers of a set of cells: every metric of `kernel.metrics.METRICS`, under `numbers`, and the
    cells per status, under `cells`. The one definition of a dataset's numbers, and of a group of its cells."""
    numbers = metric_values(metric_partials(scores, stats, clamp_negative))
    return {"numbers": {name: float(value) for name, value in numbers.items()}, "cells": status_counts(scores.status)}


def metric_partials(
    scores: CellScores, stats: CellStats, clamp_negative: bool = False, names: Sequence[str] | None = None
) -> dict[str, Partial]:
    """Each metric `names` (all of `METRICS` when None) of one dataset's (..., cells) scores and statistics, as its
    sums over the cells (`kernel.metrics.Partial`, of shape (...)): a dataset's numbers, or a bootstrap's
    replicates of them, and what combines over datasets (`overall_values`)."""
    return {name: METRICS[name].partial(scores, stats, clamp_negative) for name in names or METRICS}


def metric_values(partials: Mapping[str, Partial]) -> dict[str, np.ndarray]:
    """The numbers of one dataset's `metric_partials`, NaN where undefined."""
    return {name: partial.value() for name, partial in partials.items()}


def overall_values(datasets: Sequence[Mapping[str, Partial]]) -> dict[str, np.ndarray]:
    """Each metric over several datasets from their `metric_partials`: the run's numbers, or a bootstrap's
    replicates of them."""
    names = list(datasets[0]) if datasets else list(METRICS)
    return {name: METRICS[name].combined([partials[name] for partials in datasets]) for name in names}


def select_cells(dataset: ScoredDataset, cells: np.ndarray, clamp_negative: bool = False) -> ScoredDataset:
    """The dataset restricted to `cells` (indices), its numbers summarised from those cells' scores as a dataset's
    are: the numbers of a group of its cells. Its identity is unknown (empty)."""

    def pick(values: Any) -> Any:
        return values[..., cells]

    scores = dataset.scores.map(pick)
    stats = dataset.stats.map(pick)
    return replace(
        dataset,
        cell_ids=dataset.cell_ids[cells],
        stats=stats,
        scores=scores,
        identity="",
        **dataset_numbers(scores, stats, clamp_negative),
        per_rank=[part.map(pick) for part in dataset.per_rank],
        per_block=None if dataset.per_block is None else dataset.per_block.map(pick),
    )


def cell_pairs(base: ScoredDataset, new: ScoredDataset) -> list[tuple[int | None, int | None]]:
    """The cells of one dataset on two sides, matched: (index in `base`, index in `new`), None where a side lacks it.

    The one rule that matches the cells of two runs (compare, attribution, figures): by cell id as text,
    and among cells that share an id, by their order. Base's cells first, in order, then the new ones.

    Example:
        >>> import numpy as np
        >>> from types import SimpleNamespace as Side
        >>> cell_pairs(Side(cell_ids=np.array([7, 8, 8])), Side(cell_ids=np.array(["8", "9", "7"])))
        [(0, 2), (1, 0), (2, None), (None, 1)]
    """

    def keys(cell_ids: np.ndarray) -> dict[tuple[str, int], int]:
        seen: dict[str, int] = {}
        found = {}
        for index, cell_id in enumerate(cell_ids.tolist()):
            text = str(cell_id)
            found[(text, seen.get(text, 0))] = index
            seen[text] = seen.get(text, 0) + 1
        return found

    in_base, in_new = keys(base.cell_ids), keys(new.cell_ids)
    pairs = [(index, in_new.get(key)) for key, index in in_base.items()]
    return pairs + [(None, index) for key, index in in_new.items() if key not in in_base]


def overall_of(datasets: Sequence[ScoredDataset], clamp_negative: bool = False) -> Overall:
    """The overall numbers of `datasets` (all of a run's, or the ones two runs share): each metric of
    `kernel.metrics.METRICS` over them (a mean metric the mean of the datasets' numbers, a pooled one over every
    covered cell)."""
    numbers = overall_values([metric_partials(dataset.scores, dataset.stats, clamp_negative) for dataset in datasets])
    return Overall(
        numbers={name: float(value) for name, value in numbers.items()},
        datasets=sum(dataset.has_ok_cells for dataset in datasets),
        datasets_without_ok_cells=[dataset.name for dataset in datasets if not dataset.has_ok_cells],
        cells=status_counts(joined_scores([dataset.scores for dataset in datasets]).status),
    )


SUMMARY_METRICS = tuple(METRICS)
"""The summary numbers of a dataset and of the run, in the order the outputs show them."""


def joined_scores(parts: Sequence[CellScores]) -> CellScores:
    """The per-cell scores of several datasets, one after the other (along the last axis: cells)."""
    if not parts:
        empty = np.zeros(0)
        return CellScores(empty, empty, np.zeros(0, dtype=object), empty, empty, empty, empty)
    return CellScores(
        **{
            name: np.concatenate([getattr(part, name) for part in parts], axis=-1)
            for name in CellScores.__dataclass_fields__
        }
    )


def score(
    datasets: Sequence[MergedDataset],
    *,
    step: int,
    world_size: int,
    files: Sequence[str] = (),
    warnings: Sequence[str] = (),
    source: str | None = None,
    settings: ScoreSettings = DEFAULT_SETTINGS,
) -> ScoredRun:
    """Score merged datasets into a `ScoredRun`: the one path from sums to every reported number."""
    scored = [score_dataset(dataset, settings) for dataset in datasets]
    return ScoredRun(
        step=step,
        world_size=world_size,
        files=list(files),
        datasets=scored,
        overall=overall_of(scored, settings.clamp_negative),
        settings=settings,
        warnings=[
            *warnings,
            *(_overflow_warning(dataset) for dataset in scored if dataset.cells[OVERFLOW]),
            *(
                settings.exclusions.lines([(d.name, d.cell_ids) for d in scored])
                if settings.exclusions is not None
                else []
            ),
        ],
        source=source,
    )


def _overflow_warning(dataset: ScoredDataset) -> str:
    """Why a dataset's numbers, and the run's, are undefined: its `overflow` cells."""
    count = dataset.cells[OVERFLOW]
    first = dataset.cell_ids[np.flatnonzero(dataset.scores.status == OVERFLOW)[0]]
    return (
        f"dataset {dataset.name!r}: {count} cell{'s' if count != 1 else ''} (first: cell_id {first}) with float64"
        " sums, ll_gain or bps that are not finite (status overflow: spike counts or log-rates too large, or spike"
        " counts too small to divide by); bps and bps_pooled of the dataset and of the run are undefined."
    )


def score_run(run: MergedRun, settings: ScoreSettings = DEFAULT_SETTINGS) -> ScoredRun:
    """Score one merged step of a run directory."""
    return score(
        run.datasets,
        step=run.step,
        world_size=run.world_size,
        files=[str(path) for path in run.files],
        warnings=run.warnings,
        source=str(run.run_dir),
        settings=settings,
    )


def with_exclusions(scored: ScoredRun, exclusions: Exclusions) -> ScoredRun:
    """A scored run as written (a baseline document) with `exclusions` applied as scoring applies them: the cells
    marked `excluded` (`marked_scores`' rule) and every number summarised again without them."""
    settings = replace(scored.settings, exclusions=exclusions)
    datasets = []
    for dataset in scored.datasets:
        excluded = exclusions.mask(dataset.name, dataset.cell_ids)
        if not excluded.any():
            datasets.append(dataset)
            continue
        scores = _marked_excluded(dataset.scores, excluded)
        datasets.append(
            replace(dataset, scores=scores, **dataset_numbers(scores, dataset.stats, settings.clamp_negative))
        )
    return replace(
        scored,
        datasets=datasets,
        overall=overall_of(datasets, settings.clamp_negative),
        settings=settings,
        warnings=[*scored.warnings, *exclusions.lines([(d.name, d.cell_ids) for d in datasets])],
    )
