"""Human and machine output of results: Rich tables, JSON and CSV files."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TextIO

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bpseval.coverage import CoverageReport
from bpseval.result import Result
from bpseval.stats import SILENT, UNCOVERED

CELLS_LISTED_PER_DATASET = 8


def format_bps(value: float) -> str:
    """Bits per spike with 4 decimals; an em dash where it is undefined."""
    return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"


def render_compute(result: Result, console: Console) -> None:
    """The `bpseval compute` report: one row per dataset, the overall row, then unscored cells."""
    table = Table(title=f"Bits per spike · step {result.step}", title_justify="left")
    table.add_column("dataset")
    for name in ("ok", "silent", "uncovered", "samples"):
        table.add_column(name, justify="right")
    table.add_column("bps", justify="right")
    table.add_column("bps_pooled", justify="right")
    for row in result.datasets.itertuples(index=False):
        table.add_row(
            escape(row.name), str(row.ok), str(row.silent), str(row.uncovered), str(row.samples),
            format_bps(row.bps), format_bps(row.bps_pooled),
        )
    overall, cells = result.overall, result.overall["cells"]
    table.add_section()
    table.add_row(
        "[bold]overall[/]", str(cells["ok"]), str(cells["silent"]), str(cells["uncovered"]),
        str(int(result.datasets["samples"].sum())),
        f"[bold]{format_bps(overall['bps'])}[/]", f"[bold]{format_bps(overall['bps_pooled'])}[/]",
    )
    console.print(table)
    if result.settings.get("clamp_negative"):
        console.print(
            "[yellow]--clamp-negative is on:[/] per-cell values were clamped at 0 before the means"
            " (legacy numbers, biased upwards)."
        )
    for status in (UNCOVERED, SILENT):
        _render_cells_with_status(result.cells, status, console)
    excluded = result.overall["datasets_without_ok_cells"]
    if excluded:
        console.print(f"Left out of the overall bps (no ok cell): {escape(', '.join(excluded))}")
    dropped = int(result.datasets["duplicates_dropped"].sum())
    console.print(
        f"step {result.step} · world size {result.world_size} · {len(result.files)} shard"
        f"{'s' if len(result.files) != 1 else ''}" + (f" · {dropped} duplicate samples dropped" if dropped else "")
    )


def _render_cells_with_status(cells: pd.DataFrame, status: str, console: Console) -> None:
    selected = cells[cells["status"] == status]
    if selected.empty:
        return
    reason = "no valid sample" if status == UNCOVERED else "no spike: bps undefined"
    console.print(f"[bold]{len(selected)} {status} cell{'s' if len(selected) != 1 else ''}[/] ({reason}):")
    for dataset, group in selected.groupby("dataset", sort=False):
        shown = ", ".join(str(cell) for cell in group["cell"].head(CELLS_LISTED_PER_DATASET))
        more = len(group) - CELLS_LISTED_PER_DATASET
        console.print(f"  {escape(str(dataset))}: cell {shown}" + (f" (+{more} more)" if more > 0 else ""))


def write_text(text: str, path: str, stdout: TextIO | None = None) -> None:
    """Write `text` to `path`, or to stdout when `path` is '-'."""
    if path == "-":
        stream = stdout or sys.stdout
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()
    else:
        Path(path).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def write_csv(frame: pd.DataFrame, path: str, stdout: TextIO | None = None) -> None:
    """The frame as CSV at `path` ('-' = stdout); undefined values are empty fields."""
    write_text(frame.to_csv(index=False), path, stdout)


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
        summary.add_row(escape(row.name), *(str(v) for v in (row.cells, row.below, row.uncovered, row.silent, row.min_n_valid)))
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
            escape(row.dataset), str(row.cell), escape(str(row.cell_id)), str(row.n_valid), f"{row.spikes:g}",
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
            f"[bold]{escape(name)}[/]: {len(frame)} cells, {int(frame['below'].sum())} predicted below"
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
