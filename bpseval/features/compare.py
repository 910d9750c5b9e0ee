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
from bpseval.features.groups import cell_groups, grouping_table
from bpseval.features.uncertainty import check_resamples, resampled_blocks
from bpseval.kernel.stats import LN2, OK, UNCOVERED
from bpseval.run.document import read_document
from bpseval.run.merge import merge_run
from bpseval.run.scored import (
    Overall,
    ScoredDataset,
    ScoredRun,
    cell_pairs,
    overall_of,
    score_run,
)

if TYPE_CHECKING:
    import pandas as pd

REGRESSED, IMPROVED, UNCHANGED, UNDEFINED = "regressed", "improved", "unchanged", "undefined"
INCONCLUSIVE = "inconclusive"
"""With --significance: the interval of the change reaches below -tolerance, but not all of it, or there is no
interval (fewer than two units to resample)."""
OVERALL = "overall"
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
    **merge_options: Any,
) -> Side:
    """A run directory as a comparison side, with per-block statistics when `blocks` is given (`pass_over`: see
    `RunCatalog.select`)."""
    return Side(str(run_dir), score_run(merge_run(run_dir, step, blocks=blocks, pass_over=pass_over, **merge_options)))


def load_baseline(path: str | os.PathLike[str], blocks: int | None = None, **merge_options: Any) -> Side:
    """A baseline: a run directory, or a JSON file written by `bpseval baseline` or `compute --json`."""
    source = Path(path)
    if source.is_dir():
        return load_run(source, blocks=blocks, **merge_options)
    return Side(str(source), read_document(source))


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
    bootstrap: int = 2000
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
        rng = np.random.default_rng(settings.seed)
        bootstrap = _paired_bootstrap if mode == "paired" else _cells_bootstrap
        untested = _too_few_units(new, base, shared, mode)
        if untested:
            notes.append(f"no interval: {'; '.join(untested.values())}; those verdicts are inconclusive")
        intervals = _intervals(bootstrap(new, base, shared, settings, rng), settings.significance)
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
        for metric in ("bps", "bps_pooled")
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
    no_interval = (untested or "every bootstrap replicate of it is undefined") if tested and interval is None else ""
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
# Bootstraps: each returns, per (scope, metric), the bootstrap replicates of new - base.


def _intervals(
    replicates: dict[tuple[str, str], np.ndarray], significance: float
) -> dict[tuple[str, str], tuple[float, float]]:
    """Two-sided percentile intervals at level 1 - significance (replicates that are NaN are dropped)."""
    intervals = {}
    for key, values in replicates.items():
        values = values[np.isfinite(values)]
        if len(values):
            low, high = np.quantile(values, [significance / 2, 1 - significance / 2])
            intervals[key] = (float(low), float(high))
    return intervals


def _resampling_counts(rng: np.random.Generator, replicates: int, size: int) -> np.ndarray:
    """How often each of `size` units is drawn, for each bootstrap replicate: shape (replicates, size)."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=replicates).astype(np.float64)


def _paired_bootstrap(
    new: Side, base: Side, shared: list[str], settings: CompareSettings, rng: np.random.Generator
) -> dict[tuple[str, str], np.ndarray]:
    """Resample blocks of samples (those holding a valid entry); both models are scored on the same resampled
    data."""
    replicates: dict[tuple[str, str], np.ndarray] = {}
    dataset_deltas, gain_deltas, spike_totals = [], [], []
    for name in shared:
        # the same blocks on both sides (_same_samples: the same valid entries in every block)
        blocks_new, blocks_base = (
            resampled_blocks(new.scored.dataset(name)),
            resampled_blocks(base.scored.dataset(name)),
        )
        counts = _resampling_counts(rng, settings.bootstrap, blocks_new.n_valid.shape[0])
        with np.errstate(over="ignore", invalid="ignore"):  # sums that overflow leave the metric undefined
            n_valid, spikes = counts @ blocks_new.n_valid, counts @ blocks_new.spikes
            gain = counts @ (blocks_new.model_ll - blocks_base.model_ll)  # the null model is the same: it cancels
        ok, covered = (n_valid > 0) & (spikes > 0), n_valid > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            per_cell = np.where(ok, gain / (np.where(ok, spikes, 1.0) * LN2), 0.0)
            replicates[(name, "bps")] = per_cell.sum(axis=1) / ok.sum(axis=1)
        dataset_deltas.append(replicates[(name, "bps")])
        gain_deltas.append(np.where(covered, gain, 0.0).sum(axis=1))
        spike_totals.append(np.where(covered, spikes, 0.0).sum(axis=1))
    replicates[(OVERALL, "bps")] = np.nanmean(np.stack(dataset_deltas), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates[(OVERALL, "bps_pooled")] = np.sum(gain_deltas, axis=0) / (LN2 * np.sum(spike_totals, axis=0))
    return replicates


def _cells_bootstrap(
    new: Side, base: Side, shared: list[str], settings: CompareSettings, rng: np.random.Generator
) -> dict[tuple[str, str], np.ndarray]:
    """Resample each dataset's cells (the same draw on both sides when their cells match)."""
    replicates: dict[tuple[str, str], np.ndarray] = {}
    means: dict[str, list[np.ndarray]] = {"new": [], "base": []}
    pooled: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"new": ([], []), "base": ([], [])}
    for name in shared:
        datasets = {"new": new.scored.dataset(name), "base": base.scored.dataset(name)}
        same_cells = [str(c) for c in datasets["new"].cell_ids] == [str(c) for c in datasets["base"].cell_ids]
        shared_draw = _resampling_counts(rng, settings.bootstrap, datasets["new"].n_cells) if same_cells else None
        dataset_means = {}
        for side, dataset in datasets.items():
            draw = (
                shared_draw if shared_draw is not None else _resampling_counts(rng, settings.bootstrap, dataset.n_cells)
            )
            status = dataset.scores.status
            ok, covered = status == OK, status != UNCOVERED
            bps = np.where(ok, dataset.scores.bps, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                dataset_means[side] = (draw @ bps) / (draw @ ok.astype(float))
            pooled[side][0].append(draw @ np.where(covered, dataset.scores.ll_gain, 0.0))
            pooled[side][1].append(draw @ np.where(covered, dataset.stats.spikes, 0.0))
            means[side].append(dataset_means[side])
        replicates[(name, "bps")] = dataset_means["new"] - dataset_means["base"]
    overall = {side: np.nanmean(np.stack(means[side]), axis=0) for side in means}
    replicates[(OVERALL, "bps")] = overall["new"] - overall["base"]
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled_values = {
            side: np.sum(gains, axis=0) / (LN2 * np.sum(spikes, axis=0)) for side, (gains, spikes) in pooled.items()
        }
    replicates[(OVERALL, "bps_pooled")] = pooled_values["new"] - pooled_values["base"]
    return replicates


def compare_paths(
    run_dir: str | os.PathLike[str],
    baseline: str | os.PathLike[str],
    settings: CompareSettings,
    step: int | None = None,
    *,
    cells: str | os.PathLike[str] | None = None,
    group_by: str | None = None,
    **merge_options: Any,
) -> Comparison:
    """Load both sides (with block statistics only when a paired test may be needed) and compare.

    The run's step is `step`, or its latest step, which must then be complete (an incomplete one is a
    RunError naming the missing ranks, never a verdict on an older step); a baseline run directory
    gives the step `bpseval baseline` would write. With a cell table `cells` and one of its columns `group_by`, each failed metric's change is also
    summed per group of the run's cells; the table is checked before anything is merged.
    """
    table = grouping_table(cells, group_by)
    blocks = settings.blocks if settings.significance is not None else None
    new = load_run(run_dir, step, blocks, pass_over=False, **merge_options)  # its latest step only when complete
    base = load_baseline(baseline, blocks, **merge_options)
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
