"""Rich tables and progress on the terminal: what every command shows a person, in the `--format` it asks for
(`views/tables.py` lays out every table and line)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from bpseval.features.compare import Comparison
from bpseval.features.coverage import CoverageReport
from bpseval.features.doctor import Diagnosis
from bpseval.features.groups import GroupScores
from bpseval.features.steps import StepResults, incomplete_text
from bpseval.features.uncertainty import Interval, Intervals
from bpseval.kernel.stats import EXCLUDED, LOW, OK, OVERFLOW, SILENT, STATUSES, UNCOVERED
from bpseval.run.scored import ScoredRun
from bpseval.views.frames import DATASET_METRICS
from bpseval.views.tables import TABLE, Column, TableFormat, name_column, print_line, print_table
from bpseval.views.text import (
    ATTRIBUTION_HEADER,
    COVERAGE_LISTED,
    GROUP_HEADER,
    PRINTED_TOP,
    UNDEFINED_TEXT,
    attribution_rows,
    attribution_title,
    delta_text,
    format_bps,
    group_rows,
    group_text,
    interval_text,
    listed_attributions,
    more_attributions_text,
    plural,
    ranges,
    samples_status,
    shown,
    verdict_text,
)

if TYPE_CHECKING:
    import pandas as pd

CELLS_LISTED_PER_DATASET = 8


def render_compute(scored: ScoredRun, console: Console, form: TableFormat = TABLE) -> None:
    """The `bpseval compute` report: one row per dataset and the overall row, with every metric, then the cells
    without a number."""
    optional = {
        OVERFLOW: scored.overall.cells[OVERFLOW],
        LOW: scored.settings.min_samples > 1,
        EXCLUDED: scored.overall.cells[EXCLUDED],
    }
    shown_statuses = [status for status in STATUSES if optional.get(status, True)]
    columns = [name_column("dataset"), *map(Column, (*shown_statuses, "samples", *DATASET_METRICS))]
    rows = [
        [
            shown(dataset.name),
            *(str(dataset.cells[status]) for status in shown_statuses),
            str(dataset.samples),
            *(format_bps(getattr(dataset, metric)) for metric in DATASET_METRICS),
        ]
        for dataset in scored.datasets
    ]
    overall = scored.overall
    rows.append(
        [
            "[bold]overall[/]",
            *(str(overall.cells[status]) for status in shown_statuses),
            str(scored.samples),
            *(f"[bold]{format_bps(getattr(overall, metric))}[/]" for metric in DATASET_METRICS),
        ]
    )
    print_table(console, f"Bits per spike · step {scored.step}", columns, rows, form=form)
    if scored.settings.clamp_negative:
        print_line(
            console,
            "[yellow]--clamp-negative is on:[/] per-cell values were clamped at 0 before the means"
            " (legacy numbers, biased upwards).",
            form,
        )
    for status in (OVERFLOW, UNCOVERED, SILENT, LOW):
        _render_cells_with_status(scored, status, console, form)
    if overall.datasets_without_ok_cells:
        left_out = shown(", ".join(overall.datasets_without_ok_cells))
        print_line(console, f"Left out of the overall bps (no ok cell): {left_out}", form)
    dropped = scored.duplicates_dropped
    print_line(
        console,
        f"step {scored.step} · world size {scored.world_size} · {plural(len(scored.files), 'shard')}"
        + (f" · {dropped} duplicate samples dropped" if dropped else ""),
        form,
    )


INTERVAL_METRICS = ("bps", "bps_pooled")
"""The intervals the terminal shows (the JSON holds every metric's): the numbers of the compute table."""


def render_intervals(scored: ScoredRun, intervals: Intervals, console: Console, form: TableFormat = TABLE) -> None:
    """The `compute --ci` intervals: one row per dataset and overall, one [low, high] column per metric."""
    settings = intervals.settings
    unit = "blocks of samples" if settings.over == "blocks" else "cells"
    columns = [
        name_column("dataset"),
        *(Column(f"{metric} {100 * settings.level:g}% CI") for metric in INTERVAL_METRICS),
    ]
    rows = [
        [shown(dataset.name), *(_interval_cell(intervals.datasets[dataset.name][m]) for m in INTERVAL_METRICS)]
        for dataset in scored.datasets
    ]
    rows.append(["[bold]overall[/]", *(_interval_cell(intervals.overall[m]) for m in INTERVAL_METRICS)])
    title = f"Bootstrap intervals · over {unit} · {settings.resamples} resamples, seed {settings.seed}"
    print_table(console, title, columns, rows, form=form)
    lopsided = asymmetry_line(scored, intervals)
    if lopsided:
        print_line(console, lopsided, form)


ASYMMETRY = 0.2
"""An interval is called asymmetric when its two sides around the number differ by more than this share of its width."""


def asymmetry_line(scored: ScoredRun, intervals: Intervals) -> str:
    """One line saying that the intervals are asymmetric and why, naming the most asymmetric; "" when none is."""
    found = [
        (label, metric, numbers[metric], bounds)
        for label, numbers, scope in [
            *(
                (f"dataset {dataset.name}", dataset.numbers, intervals.datasets[dataset.name])
                for dataset in scored.datasets
            ),
            ("overall", scored.overall.numbers, intervals.overall),
        ]
        for metric, bounds in scope.items()
        if metric in INTERVAL_METRICS and bounds is not None and bounds[1] > bounds[0]
    ]

    def lopsided(entry: tuple[str, str, float, tuple[float, float]]) -> float:
        _, _, point, (low, high) = entry
        return abs((high - point) - (point - low)) / (high - low)

    if not found or lopsided(worst := max(found, key=lopsided)) <= ASYMMETRY:
        return ""
    label, metric, point, (low, high) = worst
    return (
        f"Asymmetric intervals ({shown(label)} {metric} {format_bps(point)} in [{format_bps(low)},"
        f" {format_bps(high)}]): bootstrap-t follows the skew of the cells' values, which ± would hide."
    )


def _interval_cell(interval: Interval) -> str:
    return UNDEFINED_TEXT if interval is None else f"[{format_bps(interval[0])}, {format_bps(interval[1])}]"


CELL_REASONS = {
    UNCOVERED: "no valid sample",
    SILENT: "no spike: bps undefined",
    OVERFLOW: "sums not finite in float64: bps undefined, and so are its dataset's and the overall numbers",
    LOW: "fewer than {min_samples} valid samples: left out of the means, kept in bps_pooled",
}


def _render_cells_with_status(scored: ScoredRun, status: str, console: Console, form: TableFormat) -> None:
    listed = [(dataset.name, np.flatnonzero(dataset.scores.status == status)) for dataset in scored.datasets]
    listed = [(name, cells) for name, cells in listed if len(cells)]
    count = sum(len(cells) for _, cells in listed)
    if not count:
        return
    reason = CELL_REASONS[status].format(min_samples=scored.settings.min_samples)
    print_line(console, f"[bold]{plural(count, status + ' cell')}[/] ({reason}):", form)
    for name, cells in listed:
        cells_text = ", ".join(str(cell) for cell in cells[:CELLS_LISTED_PER_DATASET])
        more = len(cells) - CELLS_LISTED_PER_DATASET
        print_line(console, f"  {shown(name)}: cell {cells_text}" + (f" (+{more} more)" if more > 0 else ""), form)


def render_groups(groups: GroupScores, step: int, console: Console, form: TableFormat = TABLE) -> None:
    """`compute --group-by`: every metric per (dataset, value), then per value over all datasets (`null`: the cells
    without a value)."""
    shown_statuses = [OK, SILENT, UNCOVERED] + [
        status for status in (OVERFLOW, LOW) if any(group.cells[status] for group in groups.groups)
    ]
    columns = [name_column("dataset"), name_column(shown(groups.column)), *map(Column, shown_statuses)]
    columns += map(Column, DATASET_METRICS)
    rows = [
        [
            shown(group.dataset) if group.dataset is not None else "[bold]all datasets[/]",
            shown(group_text(group.value)) if group.value is not None else f"[italic]{group_text(None)}[/]",
            *(str(group.cells[status]) for status in shown_statuses),
            *(format_bps(getattr(group.numbers, metric)) for metric in DATASET_METRICS),
        ]
        for group in groups.groups
    ]
    title = f"By {shown(groups.column)} · step {step}"
    print_table(console, title, columns, rows, keys=2, form=form)


def render_runs(
    runs: pd.DataFrame | None, console: Console, form: TableFormat = TABLE, failed: dict[str, str] | None = None
) -> None:
    """Several runs side by side, one row per run: the overall metrics and cell counts, and each dataset's bps; then
    a row per run that could not be scored (`failed`: its reason), each number undefined and the reason said."""
    if runs is not None and EXCLUDED in runs.columns and not runs[EXCLUDED].any():
        runs = runs.drop(columns=EXCLUDED)  # shown when some run excludes cells
    names = [] if runs is None else list(runs.columns)
    reasons = failed or {}
    columns = [name_column("run"), *(Column(shown(column)) for column in names[1:])]
    columns += [Column("not scored", justify="left", wraps=True)] if reasons else []
    rows = [
        [
            *(format_bps(v) if isinstance(v, float) else shown(str(v)) for v in row),
            *([""] if reasons else []),
        ]
        for row in ([] if runs is None else runs.itertuples(index=False))
    ]
    rows += [[shown(run), *[UNDEFINED_TEXT] * (len(names) - 1), shown(reason)] for run, reason in reasons.items()]
    print_table(console, "Bits per spike by run", columns, rows, form=form)


@contextmanager
def merge_progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar on stderr (only on a terminal): bytes merged, rate and time left."""
    console = Console(file=sys.stderr)
    if not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("merging {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(shown(label), total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _per_rank_cells(counts: list[int]) -> list[str]:
    """Per-rank counts, with the ranks that had no valid sample marked (what crashed legacy loops)."""
    return [f"[red]{count} ✗[/]" if count == 0 else str(count) for count in counts]


def render_coverage(report: CoverageReport, console: Console, form: TableFormat = TABLE) -> None:
    """The `bpseval coverage` report: a summary per dataset, the cells below the thresholds, the cells with no valid
    sample on some rank (whatever the thresholds), then the verdict."""
    title = f"Coverage · step {report.step} · world size {report.world_size}"
    title += f" · below: fewer than {report.min_samples} valid samples{_spikes_clause(report)}"
    excluded = report.excluded if report.excluded is not None else report.cells.iloc[:0]
    counts = ["cells", "below", "uncovered", "silent", *(["excluded"] * (not excluded.empty)), "min_n_valid"]
    columns = [name_column("dataset"), *(Column("min n_valid" if name == "min_n_valid" else name) for name in counts)]
    rows = [[shown(row["name"]), *(str(row[name]) for name in counts)] for _, row in report.datasets.iterrows()]
    print_table(console, title, columns, rows, form=form)
    if not excluded.empty:
        rows = [
            [shown(row.dataset), str(row.cell), shown(row.cell_id), str(row.n_valid), shown(row.reason)]
            for row in excluded.itertuples(index=False)
        ]
        columns = [*_cell_columns(0)[:4], Column("reason", justify="left", wraps=True)]
        print_table(
            console, "Cells excluded (--exclude-cells): in no number and no threshold", columns, rows, keys=2, form=form
        )
    if not report.passed:
        rows = [
            [
                shown(row.dataset),
                str(row.cell),
                shown(row.cell_id),
                str(row.n_valid),
                f"{row.spikes:g}",
                *_per_rank_cells(row.per_rank),
            ]
            for row in report.cells.itertuples(index=False)
        ]
        title = "Cells below the thresholds (✗: no valid sample on that rank)"
        print_table(console, title, _cell_columns(report.world_size, Column("spikes")), rows, keys=2, form=form)
    _render_zero_on_some_rank(report, console, form)
    if report.passed:
        verdict = f"[green]✓[/] every cell has at least {report.min_samples} valid samples{_spikes_clause(report)}"
    else:
        verdict = f"[red]✗[/] {plural(len(report.cells), 'cell')} below {report.min_samples} valid samples"
        verdict += _spikes_clause(report)
    print_line(console, verdict, form)


def _cell_columns(world_size: int, *extra: Column) -> list[Column]:
    """dataset, cell, cell_id, n_valid, `extra`, then one column per rank."""
    return [
        name_column("dataset"),
        Column("cell"),
        name_column("cell_id", justify="right"),
        Column("n_valid"),
        *extra,
        *(Column(f"rank {rank}") for rank in range(world_size)),
    ]


def _render_zero_on_some_rank(report: CoverageReport, console: Console, form: TableFormat) -> None:
    """The cells some rank saw no valid sample of (what crashed legacy per-rank validation), whatever the thresholds."""
    zero = report.zero_on_some_rank
    if zero.empty:
        return
    rows = [
        [shown(row.dataset), str(row.cell), shown(row.cell_id), str(row.n_valid), *_per_rank_cells(row.per_rank)]
        for row in zero.itertuples(index=False)
    ]
    title = f"Cells with no valid sample on some rank: {len(zero)} (✗: legacy per-rank BPS crashed on them)"
    print_table(console, title, _cell_columns(report.world_size), rows, keys=2, form=form)


def _spikes_clause(report: CoverageReport) -> str:
    return "" if report.min_spikes is None else f" or {report.min_spikes:g} spikes"


def render_plan(plans: dict[str, pd.DataFrame], min_samples: int, console: Console, form: TableFormat = TABLE) -> None:
    """The `bpseval plan` report: per mask, the predicted coverage and the cells below the threshold."""
    for name, frame in plans.items():
        rank_columns = [column for column in frame.columns if column.startswith("rank_")]
        flagged = frame[frame["below"] | (frame["zero_ranks"].map(len) > 0)]
        print_line(
            console,
            f"[bold]{shown(name)}[/]: {len(frame)} cells, {int(frame['below'].sum())} predicted below"
            f" {min_samples} valid samples, smallest n_valid {int(frame['n_valid'].min()) if len(frame) else 0}",
            form,
        )
        if flagged.empty:
            continue
        headers = ("cell", "n_valid", *(f"rank {c.removeprefix('rank_')}" for c in rank_columns), "below")
        rows = [
            [
                str(row.cell),
                str(row.n_valid),
                *_per_rank_cells([getattr(row, c) for c in rank_columns]),
                "yes" if row.below else "",
            ]
            for row in flagged.itertuples(index=False)
        ]
        print_table(console, None, [Column(header) for header in headers], rows, form=form)


def render_compare(comparison: Comparison, console: Console, top: int = PRINTED_TOP, form: TableFormat = TABLE) -> None:
    """The `bpseval compare` report: one row per compared metric, the `top` cells (and groups) of each failed
    metric's change, then coverage and the verdict."""
    significance = comparison.settings.significance
    intervals = [f"{100 * (1 - significance):g}% interval of Δ"] if significance is not None else []
    columns = [
        name_column("metric"),
        *map(Column, ("baseline", "new", "Δ", "tolerance")),
        Column("verdict", justify="left"),
        *map(Column, intervals),
    ]
    styles = {
        "regressed": "red",
        "improved": "green",
        "inconclusive": "red" if comparison.settings.fail_on_inconclusive else "yellow",
    }
    rows = []
    for metric in comparison.metrics:
        verdict = verdict_text(metric)
        rows.append(
            [
                f"{shown(metric.scope)} {metric.metric}",
                format_bps(metric.base),
                format_bps(metric.new),
                delta_text(metric),
                format_bps(metric.tolerance),
                f"[{styles.get(metric.verdict, 'default')}]{verdict}[/]" if metric.gated else verdict,
                *([interval_text(metric)] if intervals else []),
            ]
        )
    print_table(console, f"bpseval compare · {comparison.mode}", columns, rows, form=form)
    attributed, more = listed_attributions(comparison)
    for metric in attributed:
        attribution = metric.attribution
        assert attribution is not None
        rows = [[shown(a), shown(b), *rest] for a, b, *rest in attribution_rows(attribution, top)]
        header = [name_column(ATTRIBUTION_HEADER[0]), name_column(ATTRIBUTION_HEADER[1])]
        header += [name_column(ATTRIBUTION_HEADER[2]), *map(Column, ATTRIBUTION_HEADER[3:])]
        title = shown(attribution_title(metric, len(rows)))
        print_table(console, title, header, rows, keys=2, form=form)
        if attribution.groups:
            rows = [[shown(a), shown(b), *rest] for a, b, *rest in group_rows(attribution, top)]
            header = [name_column(GROUP_HEADER[0]), name_column(GROUP_HEADER[1]), *map(Column, GROUP_HEADER[2:])]
            print_table(console, f"{shown(metric.label)}: Δ per group", header, rows, keys=2, form=form)
    if more:
        print_line(console, f"note: {more_attributions_text(more)}", form)
    for note in comparison.notes:
        print_line(console, f"note: {shown(note)}", form)
    for title, names in (
        ("missing datasets (in the baseline, not in the run)", comparison.missing_datasets),
        ("new datasets (not in the baseline)", comparison.new_datasets),
    ):
        if names:
            print_line(console, f"{title}: {shown(', '.join(names))}", form)
    regressions = comparison.coverage_regressions
    for row in regressions.head(COVERAGE_LISTED).itertuples(index=False):
        cell = f"{shown(row.dataset)} cell {row.cell} (id {shown(str(row.cell_id))})"
        print_line(console, f"[red]✗[/] {cell}: ok → uncovered", form)
    if len(regressions) > COVERAGE_LISTED:
        print_line(console, f"  (+{len(regressions) - COVERAGE_LISTED} more cells ok → uncovered)", form)
    inconclusive = len(comparison.inconclusive_warnings)
    samples = f"[yellow]{samples_status(comparison)}[/]" if samples_status(comparison) else ""
    if comparison.passed:
        note = f" [yellow]({inconclusive} inconclusive, passed: see the warnings)[/]" if inconclusive else ""
        print_line(console, f"[green]✓ no regression[/]{samples}{note}", form)
    else:
        print_line(console, f"[red]✗ regression:[/] {shown('; '.join(comparison.reasons))}{samples}", form)


def render_doctor(diagnosis: Diagnosis, console: Console, form: TableFormat = TABLE) -> None:
    """The `bpseval doctor` report: steps with their ranks, then every problem found."""
    columns = [
        Column("step"),
        Column("complete", justify="left"),
        Column("world size"),
        *(name_column(name) for name in ("ranks present", "missing", "twice", "store")),
    ]
    rows = [
        [
            str(step.step),
            "[green]yes[/]" if step.complete else "[red]no[/]",
            "/".join(map(str, step.world_sizes)) or "—",  # no shard of the step could be read
            ranges(step.ranks) or "—",
            ranges(step.missing) or "—",
            ranges(step.repeated) or "—",
            ", ".join(step.stores) or "—",
        ]
        for step in diagnosis.steps
    ]
    print_table(console, f"Run directory {shown(str(diagnosis.run_dir))}", columns, rows, form=form)
    for problem in diagnosis.problems:
        print_line(console, f"[red]✗[/] {shown(problem)}", form, wrap=False)
    for note in diagnosis.notes:
        print_line(console, f"[yellow]•[/] {shown(note)}", form, wrap=False)
    print_line(console, _doctor_verdict(diagnosis), form, wrap=False)


def _doctor_verdict(diagnosis: Diagnosis) -> str:
    """The last line of `bpseval doctor`: healthy or not, and what compute and compare do without --step."""
    compute, compare = diagnosis.compute, diagnosis.compare
    if diagnosis.status == 0:
        return "[green]✓ healthy[/]"
    if diagnosis.status == 2:
        return f"[red]unusable:[/] no step can be merged; compute fails: {shown(compute.error)}"
    if compute.step is None:
        return (
            f"[yellow]problems found:[/] without --step, compute fails: {shown(compute.error)} --step"
            f" {diagnosis.usable[-1]} (the latest complete step) works."
        )
    refused = f" Without --step, compare and report fail: {shown(compare.error)}" if compare.error else ""
    return f"[yellow]problems found:[/] compute uses step {compute.step}.{refused}"


def render_steps(steps: StepResults, console: Console, run: str | None = None, form: TableFormat = TABLE) -> None:
    """The `bpseval compute --all-steps` table: one row per complete step, then the skipped steps."""
    with_low = any(result.settings.min_samples > 1 for result in steps.results.values())
    statuses = [OK, SILENT, UNCOVERED, *([LOW] if with_low else [])]
    columns = [Column(name) for name in ("step", "world size", *statuses, *DATASET_METRICS)]
    rows = [
        [
            str(step),
            str(result.world_size),
            *(str(result.overall.cells[status]) for status in statuses),
            *(format_bps(getattr(result.overall, metric)) for metric in DATASET_METRICS),
        ]
        for step, result in steps.results.items()
    ]
    title = "Bits per spike by step" + (f" · {escape(run)}" if run else "")
    print_table(console, title, columns, rows, form=form)
    if steps.incomplete:
        count = len(steps.incomplete)
        print_line(console, f"[yellow]{plural(count, 'incomplete step')} skipped:[/]", form)
        for step, reason in steps.incomplete.items():
            print_line(console, f"  {escape(incomplete_text(step, reason))}", form)
