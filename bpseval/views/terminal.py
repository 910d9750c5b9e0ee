"""Rich tables and progress on the terminal: what every command shows a person."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
from rich.table import Table

from bpseval._lazy import pandas as pd
from bpseval.features.compare import Comparison
from bpseval.features.coverage import CoverageReport
from bpseval.features.doctor import Diagnosis
from bpseval.features.steps import StepResults, incomplete_text
from bpseval.kernel.stats import OVERFLOW, SILENT, STATUSES, UNCOVERED
from bpseval.run.scored import ScoredRun
from bpseval.views.text import (
    COVERAGE_LISTED,
    delta_text,
    format_bps,
    interval_text,
    ranges,
    shown,
    verdict_text,
)

CELLS_LISTED_PER_DATASET = 8


def render_compute(scored: ScoredRun, console: Console) -> None:
    """The `bpseval compute` report: one row per dataset, the overall row, then the cells without a number."""
    table = Table(title=f"Bits per spike · step {scored.step}", title_justify="left")
    table.add_column("dataset")
    shown_statuses = [status for status in STATUSES if status != OVERFLOW or scored.overall.cells[OVERFLOW]]
    for name in (*shown_statuses, "samples"):
        table.add_column(name, justify="right")
    table.add_column("bps", justify="right")
    table.add_column("bps_pooled", justify="right")
    for dataset in scored.datasets:
        table.add_row(
            shown(dataset.name), *(str(dataset.cells[status]) for status in shown_statuses), str(dataset.samples),
            format_bps(dataset.bps), format_bps(dataset.bps_pooled),
        )
    overall = scored.overall
    table.add_section()
    table.add_row(
        "[bold]overall[/]", *(str(overall.cells[status]) for status in shown_statuses), str(scored.samples),
        f"[bold]{format_bps(overall.bps)}[/]", f"[bold]{format_bps(overall.bps_pooled)}[/]",
    )
    console.print(table)
    if scored.settings.clamp_negative:
        console.print(
            "[yellow]--clamp-negative is on:[/] per-cell values were clamped at 0 before the means"
            " (legacy numbers, biased upwards)."
        )
    for status in (OVERFLOW, UNCOVERED, SILENT):
        _render_cells_with_status(scored, status, console)
    if overall.datasets_without_ok_cells:
        console.print(f"Left out of the overall bps (no ok cell): {shown(', '.join(overall.datasets_without_ok_cells))}")
    dropped = scored.duplicates_dropped
    console.print(
        f"step {scored.step} · world size {scored.world_size} · {len(scored.files)} shard"
        f"{'s' if len(scored.files) != 1 else ''}" + (f" · {dropped} duplicate samples dropped" if dropped else "")
    )


CELL_REASONS = {
    UNCOVERED: "no valid sample",
    SILENT: "no spike: bps undefined",
    OVERFLOW: "sums not finite in float64: bps undefined, and so are its dataset's and the overall numbers",
}


def _render_cells_with_status(scored: ScoredRun, status: str, console: Console) -> None:
    listed = [(dataset.name, np.flatnonzero(dataset.scores.status == status)) for dataset in scored.datasets]
    listed = [(name, cells) for name, cells in listed if len(cells)]
    count = sum(len(cells) for _, cells in listed)
    if not count:
        return
    console.print(f"[bold]{count} {status} cell{'s' if count != 1 else ''}[/] ({CELL_REASONS[status]}):")
    for name, cells in listed:
        cells_text = ", ".join(str(cell) for cell in cells[:CELLS_LISTED_PER_DATASET])
        more = len(cells) - CELLS_LISTED_PER_DATASET
        console.print(f"  {shown(name)}: cell {cells_text}" + (f" (+{more} more)" if more > 0 else ""))


def render_runs(runs: pd.DataFrame, console: Console) -> None:
    """Several runs side by side: overall and per-dataset bps, one row per run."""
    table = Table(title="Bits per spike by run", title_justify="left")
    for column in runs.columns:
        table.add_column(shown(column), justify="left" if column == "run" else "right", no_wrap=column == "run")
    for row in runs.itertuples(index=False):
        table.add_row(*(format_bps(v) if isinstance(v, float) else shown(str(v)) for v in row))
    console.print(table)


@contextmanager
def merge_progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar on stderr (only on a terminal): bytes merged, rate and time left."""
    console = Console(file=sys.stderr)
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("merging {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(shown(label), total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _per_rank_cells(counts: list[int]) -> list[str]:
    """Per-rank counts, with the ranks that had no valid sample marked (what crashed legacy loops)."""
    return [f"[red]{count} ✗[/]" if count == 0 else str(count) for count in counts]


def render_coverage(report: CoverageReport, console: Console) -> None:
    """The `bpseval coverage` report: a summary per dataset, then the cells below the thresholds."""
    threshold = f"n_valid < {report.min_samples}"
    summary = Table(title=f"Coverage · step {report.step} · world size {report.world_size}", title_justify="left")
    for name in ("dataset", "cells", f"below ({threshold})", "uncovered", "silent", "min n_valid"):
        summary.add_column(name, justify="left" if name == "dataset" else "right")
    for row in report.datasets.itertuples(index=False):
        summary.add_row(shown(row.name), *(str(v) for v in (row.cells, row.below, row.uncovered, row.silent, row.min_n_valid)))
    console.print(summary)
    if report.passed:
        console.print(f"[green]✓[/] every cell has at least {report.min_samples} valid samples" + _spikes_clause(report))
        return
    cells = Table(title="Cells below the thresholds (✗: no valid sample on that rank)", title_justify="left")
    for name in ("dataset", "cell", "cell_id", "n_valid", "spikes"):
        cells.add_column(name, justify="left" if name == "dataset" else "right")
    for rank in range(report.world_size):
        cells.add_column(f"rank {rank}", justify="right")
    for row in report.cells.itertuples(index=False):
        cells.add_row(
            shown(row.dataset), str(row.cell), shown(row.cell_id), str(row.n_valid), f"{row.spikes:g}",
            *_per_rank_cells(row.per_rank),
        )
    console.print(cells)
    console.print(
        f"[red]✗[/] {len(report.cells)} cell{'s' if len(report.cells) != 1 else ''} below"
        f" {report.min_samples} valid samples" + _spikes_clause(report)
    )


def _spikes_clause(report: CoverageReport) -> str:
    return "" if report.min_spikes is None else f" or {report.min_spikes:g} spikes"


def render_plan(plans: dict[str, pd.DataFrame], min_samples: int, console: Console) -> None:
    """The `bpseval plan` report: per mask, the predicted coverage and the cells below the threshold."""
    for name, frame in plans.items():
        rank_columns = [column for column in frame.columns if column.startswith("rank_")]
        flagged = frame[frame["below"] | (frame["zero_ranks"].map(len) > 0)]
        console.print(
            f"[bold]{shown(name)}[/]: {len(frame)} cells, {int(frame['below'].sum())} predicted below"
            f" {min_samples} valid samples, smallest n_valid {int(frame['n_valid'].min()) if len(frame) else 0}"
        )
        if flagged.empty:
            continue
        table = Table(title_justify="left")
        for column in ("cell", "n_valid", *(f"rank {c.removeprefix('rank_')}" for c in rank_columns), "below"):
            table.add_column(column, justify="right")
        for row in flagged.itertuples(index=False):
            counts = [getattr(row, column) for column in rank_columns]
            table.add_row(str(row.cell), str(row.n_valid), *_per_rank_cells(counts), "yes" if row.below else "")
        console.print(table)


def render_compare(comparison: Comparison, console: Console) -> None:
    """The `bpseval compare` report: one row per compared metric, then coverage and the verdict."""
    significance = comparison.settings.significance
    intervals = [f"{100 * (1 - significance):g}% interval of Δ"] if significance is not None else []
    table = Table(title=f"bpseval compare · {comparison.mode}", title_justify="left")
    for name in ("scope", "metric", "baseline", "new", "Δ", "tolerance", *intervals, "verdict"):
        left = name in ("scope", "metric", "verdict")
        table.add_column(name, justify="left" if left else "right", no_wrap=name == "scope")
    styles = {"regressed": "red", "improved": "green"}
    for metric in comparison.metrics:
        verdict = verdict_text(metric)
        table.add_row(
            shown(metric.scope), metric.metric, format_bps(metric.base), format_bps(metric.new), delta_text(metric),
            format_bps(metric.tolerance), *([interval_text(metric)] if intervals else []),
            f"[{styles.get(metric.verdict, 'default')}]{verdict}[/]" if metric.gated else verdict,
        )
    console.print(table)
    for note in comparison.notes:
        console.print(f"note: {shown(note)}")
    for title, names in (("missing datasets (in the baseline, not in the run)", comparison.missing_datasets),
                         ("new datasets (not in the baseline)", comparison.new_datasets)):
        if names:
            console.print(f"{title}: {shown(', '.join(names))}")
    regressions = comparison.coverage_regressions
    for row in regressions.head(COVERAGE_LISTED).itertuples(index=False):
        console.print(f"[red]✗[/] {shown(row.dataset)} cell {row.cell} (id {shown(str(row.cell_id))}): ok → uncovered")
    if len(regressions) > COVERAGE_LISTED:
        console.print(f"  (+{len(regressions) - COVERAGE_LISTED} more cells ok → uncovered)")
    if comparison.passed:
        console.print("[green]✓ no regression[/]")
    else:
        console.print(f"[red]✗ regression:[/] {shown('; '.join(comparison.reasons))}")


def render_doctor(diagnosis: Diagnosis, console: Console) -> None:
    """The `bpseval doctor` report: steps with their ranks, then every problem found."""
    table = Table(title=f"Run directory {shown(str(diagnosis.run_dir))}", title_justify="left")
    for name in ("step", "complete", "world size", "ranks present", "missing", "twice", "store"):
        table.add_column(name, justify="right" if name in ("step", "world size") else "left")
    for step in diagnosis.steps:
        table.add_row(
            str(step.step), "[green]yes[/]" if step.complete else "[red]no[/]", "/".join(map(str, step.world_sizes)),
            ranges(step.ranks), ranges(step.missing) or "—", ranges(step.repeated) or "—", ", ".join(step.stores),
        )
    console.print(table)
    for problem in diagnosis.problems:
        console.print(f"[red]✗[/] {shown(problem)}", soft_wrap=True)
    for note in diagnosis.notes:
        console.print(f"[yellow]•[/] {shown(note)}", soft_wrap=True)
    verdict = {0: "[green]✓ healthy[/]", 1: "[yellow]problems found[/] (compute still has a complete step)", 2: "[red]unusable:[/] no complete step"}
    console.print(verdict[diagnosis.status])


def render_steps(steps: StepResults, console: Console, run: str | None = None) -> None:
    """The `bpseval compute --all-steps` table: one row per complete step, then the skipped steps."""
    title = "Bits per spike by step" + (f" · {escape(run)}" if run else "")
    table = Table(title=title, title_justify="left")
    for name in ("step", "world size", "ok", "silent", "uncovered", "bps", "bps_pooled"):
        table.add_column(name, justify="right")
    for step, result in steps.results.items():
        cells = result.overall.cells
        table.add_row(
            str(step), str(result.world_size), str(cells["ok"]), str(cells["silent"]), str(cells["uncovered"]),
            format_bps(result.overall.bps), format_bps(result.overall.bps_pooled),
        )
    console.print(table)
    if steps.incomplete:
        count = len(steps.incomplete)
        console.print(f"[yellow]{count} incomplete step{'s' if count != 1 else ''} skipped:[/]")
        for step, reason in steps.incomplete.items():
            console.print(f"  {escape(incomplete_text(step, reason))}")
