"""Compare a run with a baseline: tolerances, coverage, bootstrap intervals that know the noise, attribution.

Without a significance level, a metric regresses when `new - base < -tolerance` (tolerance
`atol + rtol * |base|`), improves when `new - base > tolerance`, and is unchanged otherwise. With one,
the verdict reads the bootstrap interval of the change: regressed when all of it lies below
-tolerance; inconclusive when part of it does (or the change itself does) and part does not, which
passes with a warning unless `fail_on_inconclusive`; improved when all of it lies above +tolerance;
unchanged otherwise. When both sides are run directories that scored the same samples, the
bootstrap is paired: the two models' per-cell statistics are resampled together over contiguous
blocks of sample_idx, so the noise of the data cancels and only the difference between the models
remains. Otherwise (a baseline JSON, or different samples) the bootstrap resamples cells. A dataset
with fewer than two units to resample (blocks, or cells) has no interval, nor then has the overall
scope: those verdicts are inconclusive, never read from an interval [Δ, Δ].

One identity rule: the run and the baseline must have scored the same samples of every dataset they
share, as the identity checksums of both sides say (`sample_identity`: dataset, cell ids and the
scored sample_idx), whatever the baseline's kind, a run directory or a baseline document. Datasets
whose samples differ are a `BaselineError` unless `allow_different_samples`; then every verdict they
enter is marked as made on different samples (`MetricComparison.samples`). A baseline that holds no
identity for a dataset (a document written before identities were stored) leaves it unknown: a
warning says so and the verdicts are marked, never taken for "same".

The gate fails closed: a metric defined in the baseline and undefined in the run regresses; a
baseline dataset missing from the run fails unless allowed; the overall metrics are compared over
the datasets both sides hold; a baseline document that no run could produce is refused
(`BaselineError`) before it is used.

Each metric that fails the gate is attributed to cells (`features.attribution`): every cell's change
of contribution, which add up to the metric's change, and, given a cell → group mapping, their sums
per group.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bpseval._json import plain
from bpseval.errors import ArgumentError, BaselineError
from bpseval.features.attribution import Attribution, attribute
from bpseval.features.groups import cell_groups, grouping_table, load_exclusions
from bpseval.features.uncertainty import (
    DEFAULT_RESAMPLES,
    check_resamples,
    estimates,
    identity_draws,
    replicate_values,
    resampled_blocks,
    scope_intervals,
    units_of,
)
from bpseval.kernel.stats import OK, UNCOVERED
from bpseval.run.document import read_document
from bpseval.run.merge import merge_run
from bpseval.run.scored import (
    Exclusions,
    Overall,
    ScoredDataset,
    ScoredRun,
    ScoreSettings,
    cell_pairs,
    overall_of,
    score_run,
    with_exclusions,
)

if TYPE_CHECKING:
    import pandas as pd

REGRESSED, IMPROVED, UNCHANGED, UNDEFINED = "regressed", "improved", "unchanged", "undefined"
INCONCLUSIVE = "inconclusive"
"""With --significance: the interval of the change reaches below -tolerance, but not all of it, or there is no
interval (fewer than two units to resample)."""
OVERALL = "overall"
GATED_METRICS = ("bps", "bps_pooled")
"""The metrics the gate compares: overall both (as `--metric` says), per dataset bps."""
SAME, DIFFERENT, UNKNOWN = "same", "different", "unknown"
"""Whether the two sides scored the same samples of a dataset (`sample_identity`)."""


# ----------------------------------------------------------------------------------------------
# The two sides


@dataclass
class Side:
    """One side of a comparison: a label and a scored run (with per-block statistics when merged with blocks)."""

    label: str
    scored: ScoredRun


def load_run(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    blocks: int | None = None,
    *,
    pass_over: bool = True,
    exclusions: Exclusions | None = None,
    **merge_options: Any,
) -> Side:
    """A run directory as a comparison side, with per-block statistics when `blocks` is given (`pass_over`: see
    `RunCatalog.select`), and the cells of `exclusions` excluded."""
    merged = merge_run(run_dir, step, blocks=blocks, pass_over=pass_over, **merge_options)
    return Side(str(run_dir), score_run(merged, ScoreSettings(exclusions=exclusions)))


def load_baseline(
    path: str | os.PathLike[str], blocks: int | None = None, exclusions: Exclusions | None = None, **merge_options: Any
) -> Side:
    """A baseline: a run directory, or a JSON file written by `bpseval baseline` or `compute --json`; the cells of
    `exclusions` excluded, as in the run."""
    source = Path(path)
    if source.is_dir():
        return load_run(source, blocks=blocks, exclusions=exclusions, **merge_options)
    scored = read_document(source)
    return Side(str(source), scored if exclusions is None else with_exclusions(scored, exclusions))


# ----------------------------------------------------------------------------------------------
# Settings and outcome


@dataclass(frozen=True)
class CompareSettings:
    """Tolerances and the statistical gate of `bpseval compare`."""

    atol: float = 0.0
    rtol: float = 0.01
    dataset_atol: float | None = None
    dataset_rtol: float | None = None
    metric: str = "both"
    allow_missing_datasets: bool = False
    significance: float | None = None
    blocks: int = 100
    bootstrap: int = DEFAULT_RESAMPLES
    """Replicates of the bootstrap of the change, as many as `compute --ci` draws by default."""
    seed: int = 0
    fail_on_inconclusive: bool = False
    allow_different_samples: bool = False
    """Compare a run with a baseline that scored other samples (the verdicts are then marked so)."""

    def __post_init__(self) -> None:
        if self.significance is not None and not 0.0 < self.significance < 1.0:
            raise ArgumentError(
                f"significance must be a two-sided test level between 0 and 1 (exclusive), not {self.significance!r};"
                " e.g. 0.05 shows 95% intervals."
            )
        if self.significance is not None:
            check_resamples(
                1.0 - self.significance,
                self.bootstrap,
                "significance (--significance)",
                self.significance,
                "bootstrap (--bootstrap)",
            )

    def tolerance(self, scope: str, base: float) -> float:
        if scope == OVERALL:
            atol, rtol = self.atol, self.rtol
        else:
            atol = self.atol if self.dataset_atol is None else self.dataset_atol
            rtol = self.rtol if self.dataset_rtol is None else self.dataset_rtol
        return atol + rtol * abs(base)

    def gates(self, scope: str, metric: str) -> bool:
        """Overall metrics gate as `metric` says; every dataset's bps gates."""
        if scope != OVERALL:
            return metric == "bps"
        return self.metric in ("both", metric)


@dataclass
class MetricComparison:
    """One compared number, with its verdict."""

    scope: str
    metric: str
    base: float
    new: float
    tolerance: float
    interval: tuple[float, float] | None
    gated: bool
    verdict: str
    attribution: Attribution | None = None
    """The cells of the change, for a metric that fails the gate."""
    samples: str = SAME
    """Whether the verdict was made on the same samples on both sides: SAME, DIFFERENT (allowed by
    `allow_different_samples`) or UNKNOWN (the baseline holds no identity)."""
    no_interval: str = ""
    """With --significance, why the metric has no interval (its verdict is then inconclusive)."""

    @property
    def label(self) -> str:
        return f"{self.scope} {self.metric}" if self.scope == OVERALL else f"dataset {self.scope!r} {self.metric}"

    @property
    def delta(self) -> float:
        return self.new - self.base

    @property
    def reason(self) -> str:
        """The phrase naming this metric in the reasons of a failed gate."""
        undefined = self.verdict == REGRESSED and not math.isfinite(self.new)
        inconclusive = self.verdict == INCONCLUSIVE
        return self.label + (" (undefined in the run)" if undefined else " (inconclusive)" if inconclusive else "")


@dataclass
class Comparison:
    """Everything `bpseval compare` reports; `passed` decides the exit code."""

    baseline: str
    run: str
    mode: str
    settings: CompareSettings
    metrics: list[MetricComparison]
    coverage_regressions: pd.DataFrame
    missing_datasets: list[str]
    new_datasets: list[str]
    shared_datasets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What merging either side said (steps passed over, files skipped, ...), led by the side's label, and the
    `sample_warnings`."""
    samples: dict[str, str] = field(default_factory=dict)
    """Per shared dataset, whether both sides scored the same samples (SAME, DIFFERENT or UNKNOWN)."""

    def datasets_with(self, samples: str) -> list[str]:
        """The shared datasets whose samples are `samples` (SAME, DIFFERENT or UNKNOWN)."""
        return [name for name, found in self.samples.items() if found == samples]

    @property
    def sample_warnings(self) -> list[str]:
        """One line each for the datasets compared on different samples and those whose samples are unknown."""
        warnings = []
        different, unknown = self.datasets_with(DIFFERENT), self.datasets_with(UNKNOWN)
        if different:
            warnings.append(
                f"the run and the baseline scored different samples of {_datasets_text(different)}"
                " (--allow-different-samples): the verdicts on them, and overall, are made on different samples"
            )
        if unknown:
            warnings.append(
                f"the baseline {self.baseline} holds no identity of the samples of {_datasets_text(unknown)} (written"
                " before bpseval stored it), so whether the run scored the same samples is unknown: the verdicts on"
                " them, and overall, are marked so; recreate the baseline with `bpseval baseline RUN -o FILE`"
            )
        return warnings

    @property
    def population(self) -> str:
        """ "all" when both sides hold the same datasets; "shared" when the overall metrics were restricted to them."""
        return "shared" if self.missing_datasets or self.new_datasets else "all"

    @property
    def failed_metrics(self) -> list[MetricComparison]:
        """The gated metrics that fail: regressed, or inconclusive with `fail_on_inconclusive`."""
        failing = {REGRESSED, INCONCLUSIVE} if self.settings.fail_on_inconclusive else {REGRESSED}
        return [m for m in self.metrics if m.gated and m.verdict in failing]

    @property
    def inconclusive_warnings(self) -> list[str]:
        """One line per gated metric that is inconclusive and passes."""
        if self.settings.fail_on_inconclusive:
            return []
        level = f"{100 * (1 - (self.settings.significance or 0)):g}%"
        warnings = []
        for m in self.metrics:
            if not (m.gated and m.verdict == INCONCLUSIVE):
                continue
            if m.interval is None:
                warnings.append(
                    f"{m.label} is inconclusive: Δ {m.delta:+.4f} has no {level} interval ({m.no_interval}); it passes"
                    " (--fail-on-inconclusive fails it)"
                )
            else:
                low, high = m.interval
                warnings.append(
                    f"{m.label} is inconclusive: Δ {m.delta:+.4f}, {level} interval [{low:+.4f}, {high:+.4f}] reaches"
                    f" below -tolerance {-m.tolerance:+.4f}; it passes (--fail-on-inconclusive fails it)"
                )
        return warnings

    @property
    def reasons(self) -> list[str]:
        """What failed, one short phrase each."""
        reasons = [m.reason for m in self.failed_metrics]
        if len(self.coverage_regressions):
            count = len(self.coverage_regressions)
            reasons.append(f"{count} cell{'s' if count != 1 else ''} ok in the baseline now uncovered")
        if self.missing_datasets and not self.settings.allow_missing_datasets:
            plural = "s" if len(self.missing_datasets) != 1 else ""
            reasons.append(f"dataset{plural} missing: {', '.join(self.missing_datasets)}")
        return reasons

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `bpseval compare --json` (null for undefined values)."""
        return plain(
            {
                "passed": self.passed,
                "reasons": self.reasons,
                "baseline": self.baseline,
                "run": self.run,
                "mode": self.mode,
                "settings": self.settings.__dict__,
                "metrics": [
                    {
                        "scope": m.scope,
                        "metric": m.metric,
                        "baseline": m.base,
                        "new": m.new,
                        "delta": m.delta,
                        "tolerance": m.tolerance,
                        "interval": m.interval,
                        "gated": m.gated,
                        "verdict": m.verdict,
                        "samples": m.samples,
                        "attribution": None if m.attribution is None else m.attribution.to_dict(),
                    }
                    for m in self.metrics
                ],
                "coverage_regressions": [
                    {"dataset": row.dataset, "cell": row.cell, "cell_id": row.cell_id}
                    for row in self.coverage_regressions.itertuples(index=False)
                ],
                "population": self.population,
                "shared_datasets": self.shared_datasets,
                "missing_datasets": self.missing_datasets,
                "new_datasets": self.new_datasets,
                "samples": self.samples,
                "notes": self.notes,
                "warnings": self.warnings + self.inconclusive_warnings,
            }
        )


# ----------------------------------------------------------------------------------------------
# Comparing


def compare(
    new: Side, base: Side, settings: CompareSettings, groups: Mapping[tuple[str, str], Hashable] | None = None
) -> Comparison:
    """Compare `new` with `base`: every gated metric, coverage, missing datasets, intervals, and attribution.

    The two sides must have scored the same samples of every dataset they share (`sample_identity`): a
    BaselineError names those that differ, unless `settings.allow_different_samples`. The overall metrics compare
    like with like: when the two sides hold different datasets, both are recomputed over the datasets they share
    (the bootstraps resample those too). Each failed metric is attributed to the cells (and with `groups`, mapping
    (dataset, str(cell_id)) to a value, to the groups) whose contributions changed.
    """
    new_names, base_names = new.scored.names, base.scored.names
    news, bases = {d.name: d for d in new.scored.datasets}, {d.name: d for d in base.scored.datasets}
    shared = [name for name in base_names if name in news]
    if not shared:
        raise BaselineError(
            f"{new.label} and {base.label} share no dataset (run: {', '.join(new_names) or 'none'}; baseline:"
            f" {', '.join(base_names) or 'none'}); compare runs of the same model family."
        )
    samples = {name: sample_identity(news[name], bases[name]) for name in shared}
    different = [name for name in shared if samples[name] == DIFFERENT]
    if different and not settings.allow_different_samples:
        raise BaselineError(
            f"{new.label} and the baseline {base.label} did not score the same samples of {_datasets_text(different)}"
            " (their identity checksums of the cell ids and sample_idx differ): compare with a baseline of the same"
            " validation data, or pass --allow-different-samples to compare anyway (every verdict is then marked as"
            " made on different samples)."
        )
    missing = [name for name in base_names if name not in news]
    added = [name for name in new_names if name not in bases]
    notes: list[str] = []
    overall_new, overall_base = new.scored.overall, base.scored.overall
    if missing or added:
        overall_new, overall_base = shared_overall(new.scored, shared), shared_overall(base.scored, shared)
        notes.append(
            f"overall metrics over the {len(shared)} dataset{'s' if len(shared) != 1 else ''} both sides hold"
            f" ({len(missing)} missing from the run, {len(added)} new in it)"
        )
    mode, intervals, untested = "tolerance", {}, {}
    if settings.significance is not None:
        mode = "paired" if _can_pair(new, base, shared) else "cells"
        if mode == "cells" and new.scored.source is not None and base.scored.source is not None:
            notes.append("the runs did not score the same samples (sample_idx or cells differ): bootstrap over cells")
        untested = _too_few_units(new, base, shared, mode)
        if untested:
            notes.append(f"no interval: {'; '.join(untested.values())}; those verdicts are inconclusive")
        intervals = _change_intervals(new, base, shared, settings, mode, (overall_new, overall_base))
    overall_samples = next((found for found in (DIFFERENT, UNKNOWN) if found in samples.values()), SAME)
    metrics = [
        _compare_metric(
            OVERALL,
            metric,
            getattr(overall_base, metric),
            getattr(overall_new, metric),
            intervals,
            settings,
            overall_samples,
            untested.get(OVERALL, ""),
        )
        for metric in GATED_METRICS
    ]
    metrics += [
        _compare_metric(
            name, "bps", bases[name].bps, news[name].bps, intervals, settings, samples[name], untested.get(name, "")
        )
        for name in shared
    ]
    comparison = Comparison(
        baseline=base.label,
        run=new.label,
        mode=mode,
        settings=settings,
        metrics=metrics,
        coverage_regressions=_coverage_regressions(new.scored, base.scored, shared),
        missing_datasets=missing,
        new_datasets=added,
        shared_datasets=shared,
        notes=notes,
        warnings=[f"{side.label}: {warning}" for side in (new, base) for warning in side.scored.warnings],
        samples=samples,
    )
    comparison.warnings += comparison.sample_warnings
    for metric in comparison.failed_metrics:
        names = shared if metric.scope == OVERALL else [metric.scope]
        metric.attribution = attribute(
            [news[name] for name in names],
            [bases[name] for name in names],
            metric.metric,
            (metric.new, metric.base),
            (new.scored.settings.clamp_negative, base.scored.settings.clamp_negative),
            groups,
        )
    return comparison


def sample_identity(new: ScoredDataset, base: ScoredDataset) -> str:
    """Whether two scorings of a dataset were of the same samples, by their identity checksums (of the dataset
    name, cell ids and scored sample_idx): SAME, DIFFERENT, or UNKNOWN when either holds none (a baseline
    document written before identities were stored)."""
    if not new.identity or not base.identity:
        return UNKNOWN
    return SAME if new.identity == base.identity else DIFFERENT


def _datasets_text(names: list[str]) -> str:
    """ "dataset 'a'", "datasets 'a', 'b'": names as the messages quote them."""
    return f"dataset{'s' if len(names) != 1 else ''} {', '.join(map(repr, names))}"


def _too_few_units(new: Side, base: Side, shared: list[str], mode: str) -> dict[str, str]:
    """The scopes (datasets, and OVERALL when any dataset is one) that have no interval because a dataset has fewer
    than two units to resample (blocks of samples holding a valid entry when paired, cells otherwise), each with
    the reason."""
    one, many = ("block of samples", "blocks of samples") if mode == "paired" else ("cell", "cells")
    reasons = {}
    for name in shared:
        if mode == "paired":
            units = resampled_blocks(new.scored.dataset(name)).n_valid.shape[0]
        else:
            units = min(new.scored.dataset(name).n_cells, base.scored.dataset(name).n_cells)
        if units < 2:
            reasons[name] = f"dataset {name!r} has {units} {one if units == 1 else many} to resample, fewer than 2"
    if reasons:
        reasons[OVERALL] = f"overall resamples {_datasets_text(list(reasons))}, with fewer than 2 {many}"
    return reasons


def shared_overall(scored: ScoredRun, names: list[str]) -> Overall:
    """The overall numbers of `scored` as if it held only the datasets `names` (as `overall_of` defines them)."""
    return overall_of([scored.dataset(name) for name in names], scored.settings.clamp_negative)


def _compare_metric(
    scope: str,
    metric: str,
    base: float,
    new: float,
    intervals: dict,
    settings: CompareSettings,
    samples: str,
    untested: str,
) -> MetricComparison:
    """One number compared, with its tolerance, its interval (if any) and `verdict_of` them; `samples` says whether
    both sides scored the same samples, `untested` why a scope has no interval (fewer than two units)."""
    base, new = float(base), float(new)
    tolerance = settings.tolerance(scope, base) if math.isfinite(base) else math.nan
    interval = None if untested else intervals.get((scope, metric))
    tested = settings.significance is not None
    verdict = verdict_of(base, new, tolerance, interval, tested=tested)
    no_interval = (untested or "its bootstrap leaves it undefined") if tested and interval is None else ""
    return MetricComparison(
        scope,
        metric,
        base,
        new,
        tolerance,
        interval,
        settings.gates(scope, metric),
        verdict,
        samples=samples,
        no_interval=no_interval,
    )


def verdict_of(
    base: float, new: float, tolerance: float, interval: tuple[float, float] | None, *, tested: bool = False
) -> str:
    """The verdict on a change. Undefined in the baseline: nothing to hold the run to (undefined).
    Defined in the baseline and undefined now (every cell silent or uncovered, or sums that
    overflowed): regressed, whatever the tolerance or the interval; the gate fails closed.
    Otherwise the change is held to ±tolerance: the point change alone without a test; with
    one (`tested`: --significance), its whole interval (regressed below -tolerance, improved above
    +tolerance), and a change whose interval or point reaches below -tolerance while part of the
    interval does not is inconclusive, as is a tested change without an interval."""
    delta = new - base
    low, high = (delta, delta) if interval is None else interval
    if not math.isfinite(base):
        return UNDEFINED
    if not math.isfinite(new):
        return REGRESSED
    if tested and interval is None:
        return INCONCLUSIVE
    if high < -tolerance:
        return REGRESSED
    if low < -tolerance or delta < -tolerance:
        return INCONCLUSIVE
    return IMPROVED if low > tolerance else UNCHANGED


def _coverage_regressions(new: ScoredRun, base: ScoredRun, shared: list[str]) -> pd.DataFrame:
    """Cells `ok` in the baseline and `uncovered` now, matched by dataset and cell_id."""
    import pandas as pd

    rows = []
    for name in shared:
        before, now = base.dataset(name), new.dataset(name)
        rows += [
            {"dataset": name, "cell": cell, "cell_id": before.cell_ids[cell]}
            for cell, later in cell_pairs(before, now)
            if cell is not None
            and later is not None
            and before.scores.status[cell] == OK
            and now.scores.status[later] == UNCOVERED
        ]
    return pd.DataFrame(rows, columns=["dataset", "cell", "cell_id"])


def _can_pair(new: Side, base: Side, shared: list[str]) -> bool:
    """Both are run directories that scored the same samples of every shared dataset, by sample_idx."""
    return all(_same_samples(new.scored.dataset(name), base.scored.dataset(name)) for name in shared)


def _same_samples(new: ScoredDataset, base: ScoredDataset) -> bool:
    """Same sample_idx and cells, and the same valid entries and spikes in every block."""
    if new.per_block is None or base.per_block is None or sample_identity(new, base) != SAME:
        return False
    return bool(
        np.array_equal(new.per_block.n_valid, base.per_block.n_valid)
        and np.allclose(new.per_block.spikes, base.per_block.spikes, rtol=1e-12, atol=0.0)
    )


# ----------------------------------------------------------------------------------------------
# The bootstrap of the change


def _change_intervals(
    new: Side, base: Side, shared: list[str], settings: CompareSettings, mode: str, overall: tuple[Overall, Overall]
) -> dict[tuple[str, str], tuple[float, float] | None]:
    """Per (scope, metric), the interval of new − base by the bootstrap and the interval method of `--ci`
    (`features.uncertainty`: studentized, jackknife standard errors), at level 1 − significance.

    Paired: both models scored on the same drawn blocks of samples. Cells: each dataset's cells drawn, the same
    draw on both sides where their cells match, apart otherwise."""
    over = "blocks" if mode == "paired" else "cells"
    sides = [(side, [units_of(side.scored.dataset(name), over) for name in shared]) for side in (new, base)]
    alike = [mode == "paired" or _same_cells(new.scored.dataset(name), base.scored.dataset(name)) for name in shared]
    rng = np.random.default_rng(settings.seed)

    def draw(size: int) -> list[list[np.ndarray]]:
        drawn: list[list[np.ndarray]] = [[], []]
        for unit_new, unit_base, same in zip(sides[0][1], sides[1][1], alike, strict=True):
            drawn[0].append(rng.integers(0, max(unit_new.count, 1), size=(size, unit_new.count)))
            drawn[1].append(
                drawn[0][-1] if same else rng.integers(0, max(unit_base.count, 1), size=(size, unit_base.count))
            )
        return drawn

    scoring = [(units, side.scored.settings) for side, units in sides]
    points = [estimates(units, identity_draws(units), settings_, GATED_METRICS) for units, settings_ in scoring]
    replicates = replicate_values(scoring, draw, settings.bootstrap, GATED_METRICS)
    tail = (settings.significance or 0.0) / 2.0
    intervals: dict[tuple[str, str], tuple[float, float] | None] = {}
    scopes = [(name, index, [alike[index]]) for index, name in enumerate(shared)] + [(OVERALL, None, alike)]
    for scope, index, paired in scopes:
        if index is None:
            numbers = [side.numbers for side in overall]
            point, change = (pair[0][1].minus(pair[1][1], paired) for pair in (points, replicates))
        else:
            numbers = [side.scored.dataset(scope).numbers for side in (new, base)]
            point, change = (pair[0][0][index].minus(pair[1][0][index], paired) for pair in (points, replicates))
        delta = {metric: numbers[0][metric] - numbers[1][metric] for metric in GATED_METRICS}
        intervals |= {(scope, metric): found for metric, found in scope_intervals(delta, point, change, tail).items()}
    return intervals


def _same_cells(new: ScoredDataset, base: ScoredDataset) -> bool:
    """The two sides' cells are the same, in the same order (a cell bootstrap then draws them alike)."""
    return [str(cell) for cell in new.cell_ids] == [str(cell) for cell in base.cell_ids]


def compare_paths(
    run_dir: str | os.PathLike[str],
    baseline: str | os.PathLike[str],
    settings: CompareSettings,
    step: int | None = None,
    *,
    cells: str | os.PathLike[str] | None = None,
    group_by: str | None = None,
    exclude_cells: str | os.PathLike[str] | None = None,
    **merge_options: Any,
) -> Comparison:
    """Load both sides (with block statistics only when a paired test may be needed) and compare.

    The run's step is `step`, or its latest step, which must then be complete (an incomplete one is a
    RunError naming the missing ranks, never a verdict on an older step); a baseline run directory
    gives the step `bpseval baseline` would write. With a cell table `cells` and one of its columns `group_by`, each
    failed metric's change is also summed per group of the run's cells; the table is checked before anything is
    merged. The cells of the table `exclude_cells` are excluded on both sides.
    """
    table = grouping_table(cells, group_by)
    blocks = settings.blocks if settings.significance is not None else None
    exclusions = load_exclusions(exclude_cells)
    new = load_run(run_dir, step, blocks, pass_over=False, exclusions=exclusions, **merge_options)  # latest if complete
    base = load_baseline(baseline, blocks, exclusions, **merge_options)
    if table is None or group_by is None:
        return compare(new, base, settings)
    assigned = cell_groups(table, new.scored, group_by)
    groups = {
        (dataset.name, str(cell_id)): value
        for dataset in new.scored.datasets
        for cell_id, value in zip(dataset.cell_ids.tolist(), assigned.values[dataset.name].tolist(), strict=True)
        if value is not None
    }
    comparison = compare(new, base, settings, groups)
    comparison.warnings.extend(assigned.warnings)
    return comparison
