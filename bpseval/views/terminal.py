"""Rich tables and progress on the terminal: what every command shows a person."""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rich.cells import cell_len
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.padding import Padding
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from bpseval.features.compare import Comparison
from bpseval.features.coverage import CoverageReport
from bpseval.features.doctor import Diagnosis
from bpseval.features.groups import GroupScores
from bpseval.features.steps import StepResults, incomplete_text
from bpseval.features.uncertainty import Interval, Intervals
from bpseval.kernel.stats import LOW, OK, OVERFLOW, SILENT, STATUSES, UNCOVERED
from bpseval.run.scored import ScoredRun
from bpseval.views.frames import DATASET_METRICS
from bpseval.views.text import (
    ATTRIBUTION_HEADER,
    ATTRIBUTION_TOP,
    COVERAGE_LISTED,
    GROUP_HEADER,
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

NAME_FLOOR = 12
"""The narrowest a column of names (or a header word longer than this) gets: names fold onto more lines down to
this width; below it the table is printed in the long layout instead."""

LONG_INDENT = 2


@dataclass(frozen=True)
class Column:
    """A column of a terminal table. The values of a `whole` column (numbers, verdicts) are never wrapped, folded or
    cut; other values (names) wrap at spaces and fold. Headers wrap at spaces; their words are never cut."""

    header: str
    whole: bool = True
    justify: JustifyMethod = "right"


def name_column(header: str, justify: JustifyMethod = "left") -> Column:
    """A column of names: wrapped and folded rather than widening the table."""
    return Column(header, whole=False, justify=justify)


def print_table(
    console: Console,
    title: str | None,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    section_before: int | None = None,
    label_columns: int = 1,
) -> None:
    """Print `rows` (Rich markup, one string per column) as a table that fits the console's width without cutting a
    value: names fold and headers wrap as needed, and when even the narrowest table is wider than the console, each
    row becomes a block of "header value" lines under its label (its first `label_columns` values).
    `section_before` is the index of the row that starts a second section (e.g. the overall row)."""
    widths = _fitted_widths(columns, rows, _room(console, columns))
    if widths is None:
        _print_long(console, title, columns, rows, label_columns)
        return
    table = Table(title=title, title_justify="left")
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column.header, justify=column.justify, width=width, overflow="fold")
    for index, row in enumerate(rows):
        if index == section_before and index:
            table.add_section()
        table.add_row(*row)
    console.print(table)


def _fitted_widths(columns: Sequence[Column], rows: Sequence[Sequence[str]], room: int) -> list[int] | None:
    """Column widths (without padding) within `room`: the natural ones when they fit; otherwise every column at its
    narrowest, and the room left given, one character at a time, to the values furthest from fitting on one line,
    then to the headers. None when even the narrowest columns do not fit."""
    natural, content, narrowest = _widths(columns, rows)
    if sum(natural) <= room:
        return natural
    if sum(narrowest) > room:
        return None
    widths = narrowest
    for _ in range(room - sum(widths)):
        target = content if sum(content) > sum(widths) else natural
        widths[max(range(len(widths)), key=lambda i: target[i] - widths[i])] += 1
    return widths


def _widths(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> tuple[list[int], list[int], list[int]]:
    """Per column: its natural width (nothing folded or wrapped), its values' (headers may wrap), its narrowest."""
    natural, content, narrowest = [], [], []
    for index, column in enumerate(columns):
        header = Text.from_markup(column.header).plain
        values = [Text.from_markup(row[index]) for row in rows]
        longest = max((value.cell_len for value in values), default=0)
        words = [word for value in values for word in value.plain.split()]
        least = longest if column.whole else min(max(map(cell_len, words), default=0), NAME_FLOOR)
        header_least = min(max(map(cell_len, header.split()), default=0), NAME_FLOOR)
        narrowest.append(max(header_least, least, 1))
        content.append(max(narrowest[-1], longest))
        natural.append(max(cell_len(header), content[-1]))
    return natural, content, narrowest


def _room(console: Console, columns: Sequence[Column]) -> int:
    """The console's width left for the values of `columns` (without borders and padding)."""
    return console.width - (3 * len(columns) + 1)


def _print_long(
    console: Console, title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]], label_columns: int
) -> None:
    """The long layout: per row, its label on a line, then one "header value" line per other column."""
    if title:
        console.print(title, overflow="fold")
    fields = columns[label_columns:]
    room = console.width - LONG_INDENT - 2  # the indent, and the gap between header and value
    values = [Text.from_markup(row[i]).cell_len for row in rows for i in range(label_columns, len(columns))]
    value_width = min(max(values, default=1), room - NAME_FLOOR // 2)
    key_width = max((cell_len(Text.from_markup(column.header).plain) for column in fields), default=1)
    key_width = max(min(key_width, room - value_width), NAME_FLOOR // 2)
    for row in rows:
        console.print(" · ".join(row[:label_columns]), style="bold", overflow="fold")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(width=key_width, overflow="fold")
        grid.add_column(justify="right", min_width=value_width, overflow="fold")
        for column, value in zip(fields, row[label_columns:], strict=True):
            grid.add_row(column.header, value)
        console.print(Padding(grid, (0, 0, 0, LONG_INDENT), expand=False))


def _fits_whole(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> bool:
    """Whether `print_table` prints these rows at the console's width with nothing folded, wrapped or in blocks."""
    return sum(_widths(columns, rows)[0]) <= _room(console, columns)


def print_split_table(
    console: Console,
    titles: tuple[str, str],
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    labels: int,
    second: Collection[int],
    section_before: int | None = None,
) -> None:
    """One table of every column when it fits the console with no name folded; otherwise two, each led by the first
    `labels` columns: the columns not in `second` (indices), then those in `second`; and when even the first of those
    takes the long layout, every column in the long layout (one block per row, not two). `titles`: the first table's
    (or the one table's), and the second's. Two narrower tables read better than folded names or blocks of lines."""
    first = [index for index in range(len(columns)) if index not in second]
    parts = [(titles[0], first), (titles[1], [*range(labels), *sorted(second)])]
    tables = [([columns[i] for i in part], [[row[i] for i in part] for row in rows]) for _, part in parts]
    if _fits_whole(console, columns, rows) or _fitted_widths(*tables[0], _room(console, tables[0][0])) is None:
        print_table(console, titles[0], columns, rows, section_before=section_before, label_columns=labels)
        return
    for (title, _), (part_columns, part_rows) in zip(parts, tables, strict=True):
        print_table(console, title, part_columns, part_rows, section_before=section_before, label_columns=labels)


BPS_METRICS = ("bps", "bps_pooled")
SECOND_METRICS = [metric for metric in DATASET_METRICS if metric not in BPS_METRICS]
"""When a table of every metric is split in two, the bps go to the first and these to the second."""
METRIC_ORDER = [*BPS_METRICS, *SECOND_METRICS]


def _metric_titles(suffix: str) -> tuple[str, str]:
    """The titles of `print_split_table` for the metrics: the one table, or the first, is named after the headline
    metric (its headers name the others); the second after what it holds."""
    return f"Bits per spike{suffix}", f"Deviance explained (pseudo_r2) and correlation{suffix}"


def render_compute(scored: ScoredRun, console: Console) -> None:
    """The `bpseval compute` report: one row per dataset and the overall row, with every metric (in two tables when
    one does not fit), then the cells without a number."""
    optional = {OVERFLOW: scored.overall.cells[OVERFLOW], LOW: scored.settings.min_samples > 1}
    shown_statuses = [status for status in STATUSES if optional.get(status, True)]
    columns = [name_column("dataset"), *map(Column, (*shown_statuses, "samples", *METRIC_ORDER))]
    rows = [
        [
            shown(dataset.name),
            *(str(dataset.cells[status]) for status in shown_statuses),
            str(dataset.samples),
            *(format_bps(getattr(dataset, metric)) for metric in METRIC_ORDER),
        ]
        for dataset in scored.datasets
    ]
    overall = scored.overall
    rows.append(
        [
            "[bold]overall[/]",
            *(str(overall.cells[status]) for status in shown_statuses),
            str(scored.samples),
            *(f"[bold]{format_bps(getattr(overall, metric))}[/]" for metric in METRIC_ORDER),
        ]
    )
    print_split_table(
        console,
        _metric_titles(f" · step {scored.step}"),
        columns,
        rows,
        labels=1,
        second=range(len(columns) - len(SECOND_METRICS), len(columns)),
        section_before=len(scored.datasets),
    )
    if scored.settings.clamp_negative:
        console.print(
            "[yellow]--clamp-negative is on:[/] per-cell values were clamped at 0 before the means"
            " (legacy numbers, biased upwards)."
        )
    for status in (OVERFLOW, UNCOVERED, SILENT, LOW):
        _render_cells_with_status(scored, status, console)
    if overall.datasets_without_ok_cells:
        left_out = shown(", ".join(overall.datasets_without_ok_cells))
        console.print(f"Left out of the overall bps (no ok cell): {left_out}")
    dropped = scored.duplicates_dropped
    console.print(
        f"step {scored.step} · world size {scored.world_size} · {plural(len(scored.files), 'shard')}"
        + (f" · {dropped} duplicate samples dropped" if dropped else "")
    )


INTERVAL_METRICS = ("bps", "bps_pooled")
"""The intervals the terminal shows (the JSON holds every metric's): the numbers of the compute table."""


def render_intervals(scored: ScoredRun, intervals: Intervals, console: Console) -> None:
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
    print_table(console, title, columns, rows, section_before=len(scored.datasets))


def _interval_cell(interval: Interval) -> str:
    return UNDEFINED_TEXT if interval is None else f"[{format_bps(interval[0])}, {format_bps(interval[1])}]"


CELL_REASONS = {
    UNCOVERED: "no valid sample",
    SILENT: "no spike: bps undefined",
    OVERFLOW: "sums not finite in float64: bps undefined, and so are its dataset's and the overall numbers",
    LOW: "fewer than {min_samples} valid samples: left out of the means, kept in bps_pooled",
}


def _render_cells_with_status(scored: ScoredRun, status: str, console: Console) -> None:
    listed = [(dataset.name, np.flatnonzero(dataset.scores.status == status)) for dataset in scored.datasets]
    listed = [(name, cells) for name, cells in listed if len(cells)]
    count = sum(len(cells) for _, cells in listed)
    if not count:
        return
    reason = CELL_REASONS[status].format(min_samples=scored.settings.min_samples)
    console.print(f"[bold]{plural(count, status + ' cell')}[/] ({reason}):")
    for name, cells in listed:
        cells_text = ", ".join(str(cell) for cell in cells[:CELLS_LISTED_PER_DATASET])
        more = len(cells) - CELLS_LISTED_PER_DATASET
        console.print(f"  {shown(name)}: cell {cells_text}" + (f" (+{more} more)" if more > 0 else ""))


def render_groups(groups: GroupScores, step: int, console: Console) -> None:
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
    first_overall = next((i for i, group in enumerate(groups.groups) if group.dataset is None), len(rows))
    title = f"By {shown(groups.column)} · step {step}"
    print_table(console, title, columns, rows, section_before=first_overall, label_columns=2)


def render_runs(runs: pd.DataFrame, console: Console) -> None:
    """Several runs side by side, one row per run: the overall metrics and cell counts, and each dataset's bps (the
    overall pseudo_r2, pseudo_r2_pooled and corr in a second table when one does not fit)."""
    columns = [name_column(shown(column)) if column == "run" else Column(shown(column)) for column in runs.columns]
    rows = [[format_bps(v) if isinstance(v, float) else shown(str(v)) for v in row] for row in runs.itertuples(False)]
    second = [index for index, column in enumerate(runs.columns) if column in SECOND_METRICS]
    print_split_table(console, _metric_titles(" by run"), columns, rows, labels=1, second=second)


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


def render_coverage(report: CoverageReport, console: Console) -> None:
    """The `bpseval coverage` report: a summary per dataset, the cells below the thresholds, the cells with no valid
    sample on some rank (whatever the thresholds), then the verdict."""
    threshold = f"n_valid < {report.min_samples}"
    title = f"Coverage · step {report.step} · world size {report.world_size}"
    headers = ("cells", f"below ({threshold})", "uncovered", "silent", "min n_valid")
    columns = [name_column("dataset"), *map(Column, headers)]
    rows = [
        [shown(row.name), *(str(v) for v in (row.cells, row.below, row.uncovered, row.silent, row.min_n_valid))]
        for row in report.datasets.itertuples(index=False)
    ]
    print_table(console, title, columns, rows)
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
        print_table(console, title, _cell_columns(report.world_size, Column("spikes")), rows)
    _render_zero_on_some_rank(report, console)
    if report.passed:
        console.print(f"[green]✓[/] every cell has at least {report.min_samples} valid samples{_spikes_clause(report)}")
    else:
        console.print(
            f"[red]✗[/] {plural(len(report.cells), 'cell')} below"
            f" {report.min_samples} valid samples" + _spikes_clause(report)
        )


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


def _render_zero_on_some_rank(report: CoverageReport, console: Console) -> None:
    """The cells some rank saw no valid sample of (what crashed legacy per-rank validation), whatever the thresholds."""
    zero = report.zero_on_some_rank
    if zero.empty:
        return
    rows = [
        [shown(row.dataset), str(row.cell), shown(row.cell_id), str(row.n_valid), *_per_rank_cells(row.per_rank)]
        for row in zero.itertuples(index=False)
    ]
    title = f"Cells with no valid sample on some rank: {len(zero)} (✗: legacy per-rank BPS crashed on them)"
    print_table(console, title, _cell_columns(report.world_size), rows)


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
        print_table(console, None, [Column(header) for header in headers], rows)


def render_compare(comparison: Comparison, console: Console, top: int = ATTRIBUTION_TOP) -> None:
    """The `bpseval compare` report: one row per compared metric, the `top` cells (and groups) of each failed
    metric's change, then coverage and the verdict."""
    significance = comparison.settings.significance
    intervals = [f"{100 * (1 - significance):g}% interval of Δ"] if significance is not None else []
    columns = [
        name_column("scope"),
        Column("metric", justify="left"),
        *map(Column, ("baseline", "new", "Δ", "tolerance", *intervals)),
        Column("verdict", justify="left"),
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
                shown(metric.scope),
                metric.metric,
                format_bps(metric.base),
                format_bps(metric.new),
                delta_text(metric),
                format_bps(metric.tolerance),
                *([interval_text(metric)] if intervals else []),
                f"[{styles.get(metric.verdict, 'default')}]{verdict}[/]" if metric.gated else verdict,
            ]
        )
    print_table(console, f"bpseval compare · {comparison.mode}", columns, rows, label_columns=2)
    attributed, more = listed_attributions(comparison)
    for metric in attributed:
        attribution = metric.attribution
        assert attribution is not None
        rows = [[shown(a), shown(b), *rest] for a, b, *rest in attribution_rows(attribution, top)]
        header = [name_column(ATTRIBUTION_HEADER[0]), name_column(ATTRIBUTION_HEADER[1])]
        header += [name_column(ATTRIBUTION_HEADER[2]), *map(Column, ATTRIBUTION_HEADER[3:])]
        print_table(console, shown(attribution_title(metric, len(rows))), header, rows, label_columns=2)
        if attribution.groups:
            rows = [[shown(a), shown(b), *rest] for a, b, *rest in group_rows(attribution, top)]
            header = [name_column(GROUP_HEADER[0]), name_column(GROUP_HEADER[1]), *map(Column, GROUP_HEADER[2:])]
            print_table(console, f"{shown(metric.label)}: Δ per group", header, rows, label_columns=2)
    if more:
        console.print(f"note: {more_attributions_text(more)}")
    for note in comparison.notes:
        console.print(f"note: {shown(note)}")
    for title, names in (
        ("missing datasets (in the baseline, not in the run)", comparison.missing_datasets),
        ("new datasets (not in the baseline)", comparison.new_datasets),
    ):
        if names:
            console.print(f"{title}: {shown(', '.join(names))}")
    regressions = comparison.coverage_regressions
    for row in regressions.head(COVERAGE_LISTED).itertuples(index=False):
        console.print(f"[red]✗[/] {shown(row.dataset)} cell {row.cell} (id {shown(str(row.cell_id))}): ok → uncovered")
    if len(regressions) > COVERAGE_LISTED:
        console.print(f"  (+{len(regressions) - COVERAGE_LISTED} more cells ok → uncovered)")
    inconclusive = len(comparison.inconclusive_warnings)
    samples = f"[yellow]{samples_status(comparison)}[/]" if samples_status(comparison) else ""
    if comparison.passed:
        note = f" [yellow]({inconclusive} inconclusive, passed: see the warnings)[/]" if inconclusive else ""
        console.print(f"[green]✓ no regression[/]{samples}{note}")
    else:
        console.print(f"[red]✗ regression:[/] {shown('; '.join(comparison.reasons))}{samples}")


def render_doctor(diagnosis: Diagnosis, console: Console) -> None:
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
    print_table(console, f"Run directory {shown(str(diagnosis.run_dir))}", columns, rows)
    for problem in diagnosis.problems:
        console.print(f"[red]✗[/] {shown(problem)}", soft_wrap=True)
    for note in diagnosis.notes:
        console.print(f"[yellow]•[/] {shown(note)}", soft_wrap=True)
    console.print(_doctor_verdict(diagnosis), soft_wrap=True)


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


def render_steps(steps: StepResults, console: Console, run: str | None = None) -> None:
    """The `bpseval compute --all-steps` table: one row per complete step, then the skipped steps."""
    with_low = any(result.settings.min_samples > 1 for result in steps.results.values())
    statuses = [OK, SILENT, UNCOVERED, *([LOW] if with_low else [])]
    columns = [Column(name) for name in ("step", "world size", *statuses, *METRIC_ORDER)]
    rows = [
        [
            str(step),
            str(result.world_size),
            *(str(result.overall.cells[status]) for status in statuses),
            *(format_bps(getattr(result.overall, metric)) for metric in METRIC_ORDER),
        ]
        for step, result in steps.results.items()
    ]
    titles = _metric_titles(" by step" + (f" · {escape(run)}" if run else ""))
    second = range(len(columns) - len(SECOND_METRICS), len(columns))
    print_split_table(console, titles, columns, rows, labels=1, second=second)
    if steps.incomplete:
        count = len(steps.incomplete)
        console.print(f"[yellow]{plural(count, 'incomplete step')} skipped:[/]")
        for step, reason in steps.incomplete.items():
            console.print(f"  {escape(incomplete_text(step, reason))}")
