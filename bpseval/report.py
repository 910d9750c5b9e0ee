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
