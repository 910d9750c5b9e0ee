"""One self-contained HTML page about a run (`bpseval report`): numbers, pictures, unscored cells, verdict.

Plain HTML and inline CSS, no JavaScript, every picture a PNG in a base64 data URI: the file can
be opened offline, mailed, or archived as a CI artifact. Every string that comes from the data
(dataset names, cell ids, paths, messages) is escaped. Needs matplotlib (`bpseval[plot]`).
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import os
import platform
import shlex
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpseval._version import __version__
from bpseval.features.compare import OVERALL, Comparison, MetricComparison
from bpseval.features.coverage import coverage_report
from bpseval.features.overview import RunOverview
from bpseval.features.steps import incomplete_text
from bpseval.kernel.stats import OK, SILENT, UNCOVERED
from bpseval.views.files import write_output
from bpseval.views.frames import DATASET_METRICS, RunFrames
from bpseval.views.plot import bps_histogram_figure, figures, png_bytes
from bpseval.views.text import (
    ATTRIBUTION_HEADER,
    ATTRIBUTION_TOP,
    GROUP_HEADER,
    SAMPLES_MARKS,
    UNDEFINED_TEXT,
    VERDICT_MARKS,
    attribution_rows,
    attribution_title,
    format_bps,
    group_rows,
    group_text,
    interval_text,
    listed_attributions,
    more_attributions_text,
    plural,
    printable,
    samples_status,
    signed,
)

if TYPE_CHECKING:
    import pandas as pd

CELLS_LISTED = 400
"""Rows of a cell table shown in full; longer tables say how many more there are."""
CELL_IDS_PER_DATASET = 40
"""Cells named per dataset in the uncovered/silent lists."""

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa; --good: #1a7f37;
        --bad: #cf222e; --warn: #9a6700; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.45;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p { margin: 6px 0; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--soft);
       padding: 1px 4px; border-radius: 4px; overflow-wrap: anywhere; }
.sub { color: var(--muted); margin: 0 0 14px; }
.muted { color: var(--muted); }
nav { font-size: 14px; margin: 10px 0 4px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
.verdict { font-size: 18px; font-weight: 600; padding: 12px 16px; border-radius: 8px; margin: 14px 0; }
.verdict.pass { background: #dafbe1; color: var(--good); border: 1px solid #aceebb; }
.verdict.fail { background: #ffebe9; color: var(--bad); border: 1px solid #ffcecb; }
.verdict small { display: block; font-weight: 400; font-size: 14px; color: var(--ink); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0 6px; }
.card { flex: 1 1 140px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--soft); }
.card .label { font-size: 13px; color: var(--muted); }
.card .value { font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .unit { font-size: 13px; color: var(--muted); }
.card.alert { background: #fff8c5; border-color: #eac54f; }
.card.bad { background: #ffebe9; border-color: #ffcecb; }
.note { background: #fff8c5; border: 1px solid #eac54f; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
table { border-collapse: collapse; font-size: 14px; margin: 6px 0 10px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.total td { font-weight: 650; border-top: 2px solid var(--ink); }
tr.chosen td { background: #ddf4ff; }
.neg { color: var(--bad); }
.zero { color: var(--bad); font-weight: 600; }
.regressed { color: var(--bad); font-weight: 600; }
.improved { color: var(--good); font-weight: 600; }
.inconclusive { color: var(--warn); font-weight: 600; }
.scroll { max-height: 560px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; display: inline-block;
          max-width: 100%; }
.scroll table { margin: 0; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 4px; max-width: 1100px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(500px, 1fr)); gap: 12px; }
.grid figure { margin: 0; }
footer { margin-top: 40px; padding-top: 10px; border-top: 1px solid var(--line); font-size: 13px; color: var(--muted); }
"""


def _e(value: Any) -> str:
    """Any value as escaped HTML text: control characters (and lone surrogates) written as their escapes, as every
    view writes names (`printable`), then HTML's special characters as entities."""
    return escape(printable(value), quote=True)


def _metric(value: Any, digits: int = 4) -> str:
    """A metric (bps, pseudo_r2, corr, ...) as `format_bps` writes it, negative values in red, undefined ones muted."""
    text = format_bps(None if value is None else float(value), digits)
    if text == UNDEFINED_TEXT:
        return f'<span class="muted">{text}</span>'
    return f'<span class="neg">{text}</span>' if float(value) < 0 else text


def _table(
    header: Sequence[tuple[str, bool]],
    rows: Iterable[Sequence[str]],
    *,
    row_classes: Sequence[str] = (),
    scroll: bool = False,
) -> str:
    """An HTML table; `header` is (escaped title, numeric?) per column and cells are already HTML."""
    numeric = [is_num for _, is_num in header]
    head = "".join(f'<th class="num">{title}</th>' if is_num else f"<th>{title}</th>" for title, is_num in header)
    body = []
    for index, row in enumerate(rows):
        css = row_classes[index] if index < len(row_classes) and row_classes[index] else ""
        cells = "".join(
            f'<td class="num">{cell}</td>' if numeric[i] else f"<td>{cell}</td>" for i, cell in enumerate(row)
        )
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>' if scroll else table


def _image(png: bytes, alt: str, caption: str = "") -> str:
    """A figure whose PNG is embedded as a base64 data URI, shown at its natural size (scaled down to fit)."""
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    data = base64.b64encode(png).decode("ascii")
    caption_html = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}" width="{width}" height="{height}">'
        f"{caption_html}</figure>"
    )


def command_text(command: Sequence[str] | str | None) -> str:
    """The command line that made the report, quoted for a POSIX shell."""
    if command is None:
        return "bpseval.views.html.write_report (from Python)"
    if isinstance(command, str):
        return command
    return shlex.join([str(part) for part in command])


# ----------------------------------------------------------------------------------------------
# Sections


def _header(inputs: RunOverview, result: RunFrames, run_label: str, created: str) -> str:
    shards = plural(len(result.files), "shard")
    sub = (
        f"run <code>{_e(run_label)}</code> · step {result.step} · world size {result.world_size} · {shards}"
        f" · made {_e(created)} by bpseval {_e(__version__)}"
    )
    links = [
        ("numbers", "Numbers"),
        ("distribution", "Per-cell bps"),
        ("datasets", "Datasets"),
        ("rate", "bps vs rate"),
        ("coverage", "Coverage"),
        ("unscored", "Unscored cells"),
    ]
    if len(inputs.steps.results) > 1 or inputs.steps.incomplete or inputs.steps.bad:
        links.append(("steps", "Steps"))
    if inputs.comparison is not None:
        links.insert(0, ("comparison", "Comparison"))
    links += [("histograms", "Per dataset"), ("provenance", "Command")]
    nav = "".join(f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text in links)
    return f'<header><h1>bpseval report</h1><p class="sub">{sub}</p><nav>{nav}</nav></header>'


def _verdict(comparison: Comparison) -> str:
    samples = _e(samples_status(comparison))
    if comparison.passed:
        text, css = f"✓ No regression against the baseline <code>{_e(comparison.baseline)}</code>{samples}", "pass"
        detail = "Every gated metric is within tolerance and no cell lost its coverage."
    else:
        text, css = f"✗ Regression against the baseline <code>{_e(comparison.baseline)}</code>{samples}", "fail"
        detail = "Regressed: " + _e("; ".join(_reason_summary(comparison)))
    return f'<div class="verdict {css}">{text}<small>{detail}</small></div>'


def _reason_summary(comparison: Comparison, shown: int = 5) -> list[str]:
    """What regressed, short even when many datasets did: the overall metrics, then a few datasets by name."""
    regressed = comparison.failed_metrics
    overall = [m.metric for m in regressed if m.scope == OVERALL]
    datasets = [m.scope for m in regressed if m.scope != OVERALL]
    summary = [f"overall {' and '.join(overall)}"] if overall else []
    if datasets:
        more = f" (+{len(datasets) - shown} more)" if len(datasets) > shown else ""
        summary.append(f"bps of {plural(len(datasets), 'dataset')}: {', '.join(datasets[:shown])}{more}")
    labels = {m.label for m in regressed}
    return summary + [reason for reason in comparison.reasons if reason not in labels]


def _cards(inputs: RunOverview, result: RunFrames, below: int) -> str:
    overall, cells = result.overall, result.overall.cells
    datasets = len(result.datasets)

    def card(label: str, value: str, unit: str = "", css: str = "") -> str:
        unit_html = f'<div class="unit">{unit}</div>' if unit else ""
        return (
            f'<div class="card {css}"><div class="label">{label}</div><div class="value">{value}</div>{unit_html}</div>'
        )

    metrics = [
        card("overall bps", _metric(overall.bps), "bits/spike · mean over datasets"),
        card("overall bps_pooled", _metric(overall.bps_pooled), "bits/spike · all cells pooled"),
        card("overall pseudo_r2", _metric(overall.pseudo_r2), "deviance explained · mean over datasets"),
        card("overall pseudo_r2_pooled", _metric(overall.pseudo_r2_pooled), "deviance explained · all cells pooled"),
        card("overall corr", _metric(overall.corr), "correlation of rate and count · mean over datasets"),
    ]
    counts = [
        card(
            "datasets scored",
            f'{overall.datasets}<span class="unit"> / {datasets}</span>',
            "with at least one ok cell",
            "alert" if overall.datasets < datasets else "",
        ),
        card("cells ok", str(cells["ok"]), "scored"),
        card("cells silent", str(cells[SILENT]), "no spike: bps undefined", "alert" if cells[SILENT] else ""),
        card("cells uncovered", str(cells[UNCOVERED]), "no valid sample", "bad" if cells[UNCOVERED] else ""),
        card(
            f"cells &lt; {inputs.min_samples} valid samples",
            str(below),
            "in total over ranks",
            "alert" if below else "",
        ),
    ]
    rows = "".join(f'<div class="cards">{"".join(row)}</div>' for row in (metrics, counts))
    return f'<section id="numbers">{rows}</section>'


def _notes(inputs: RunOverview, result: RunFrames) -> str:
    notes = [_e(warning) for warning in result.warnings]
    excluded = result.overall.datasets_without_ok_cells
    if excluded:
        notes.append("Left out of the overall bps (no ok cell): " + _e(", ".join(map(str, excluded))))
    if result.settings.get("clamp_negative"):
        notes.append("Per-cell values were clamped at 0 before the means (legacy numbers, biased upwards).")
    return "".join(f'<p class="note">{note}</p>' for note in notes)


def _dataset_table(inputs: RunOverview, result: RunFrames) -> str:
    rows, classes = [], []
    for row in result.datasets.itertuples(index=False):
        rows.append(
            [
                _e(row.name),
                str(row.ok),
                str(row.silent),
                f'<span class="zero">{row.uncovered}</span>' if row.uncovered else "0",
                str(row.samples),
                str(row.duplicates_dropped),
                *(_metric(getattr(row, metric)) for metric in DATASET_METRICS),
            ]
        )
        classes.append("")
    cells = result.overall.cells
    rows.append(
        [
            "overall",
            str(cells["ok"]),
            str(cells[SILENT]),
            str(cells[UNCOVERED]),
            str(int(result.datasets["samples"].sum())),
            str(int(result.datasets["duplicates_dropped"].sum())),
            *(_metric(getattr(result.overall, metric)) for metric in DATASET_METRICS),
        ]
    )
    classes.append("total")
    header = [
        ("dataset", False),
        ("ok", True),
        ("silent", True),
        ("uncovered", True),
        ("samples", True),
        ("duplicates dropped", True),
        *((metric, True) for metric in DATASET_METRICS),
    ]
    return (
        '<section id="datasets"><h2>Datasets</h2>'
        '<p class="muted">bps: mean of the per-cell bits/spike over ok cells; bps_pooled: Σ ll_gain / (ln 2 · Σ spikes)'
        " over covered cells. pseudo_r2: mean over ok cells of the Poisson deviance explained, 1 − D_model / D_null;"
        " pseudo_r2_pooled: 1 − Σ D_model / Σ D_null over covered cells. corr: mean over ok cells of the weighted"
        " Pearson correlation of predicted rate and count. Overall bps, pseudo_r2 and corr are means over datasets"
        " (see the README, section Metrics).</p>"
        + _table(header, rows, row_classes=classes, scroll=len(rows) > 20)
        + "</section>"
    )


def _groups(result: RunFrames) -> str:
    """The `--group-by` table: every metric per (dataset, value), then per value over all datasets; '' without."""
    if result.group_scores is None:
        return ""
    rows, classes = [], []
    for group in result.group_scores.groups:
        rows.append(
            [
                "all datasets" if group.dataset is None else _e(group.dataset),
                f'<span class="muted">{group_text(None)}</span>'
                if group.value is None
                else _e(group_text(group.value)),
                *(str(group.cells[status]) for status in (OK, SILENT, UNCOVERED)),
                *(_metric(getattr(group.numbers, metric)) for metric in DATASET_METRICS),
            ]
        )
        classes.append("total" if group.dataset is None else "")
    column = _e(result.group_scores.column)
    header = [("dataset", False), (column, False), ("ok", True), ("silent", True), ("uncovered", True)]
    header += [(metric, True) for metric in DATASET_METRICS]
    return (
        f'<section id="groups"><h2>By {column}</h2>'
        '<p class="muted">Each group of cells scored as a dataset is; over all datasets, bps is the mean of the'
        " groups' per-dataset bps and the pooled numbers pool all their cells. null: cells without a value.</p>"
        + _table(header, rows, row_classes=classes, scroll=len(rows) > 20)
        + "</section>"
    )


def _cell_label(cell: Any, cell_id: Any) -> str:
    return _e(cell) if str(cell) == str(cell_id) else f'{_e(cell)} <span class="muted">(id {_e(cell_id)})</span>'


def _status_list(cells: pd.DataFrame, status: str, reason: str) -> str:
    selected = cells[cells["status"] == status]
    title = f'{plural(len(selected), status + " cell")} <span class="muted">({_e(reason)})</span>'
    if selected.empty:
        return f'<h3>{title}</h3><p class="muted">None.</p>'
    rows = []
    for dataset, group in selected.groupby("dataset", sort=False):
        labels = [_cell_label(c, i) for c, i in zip(group["cell"], group["cell_id"], strict=True)]
        more = len(labels) - CELL_IDS_PER_DATASET
        listed = ", ".join(labels[:CELL_IDS_PER_DATASET]) + (
            f' <span class="muted">(+{more} more)</span>' if more > 0 else ""
        )
        rows.append([_e(dataset), str(len(group)), listed])
    return f"<h3>{title}</h3>" + _table([("dataset", False), ("cells", True), ("cell (id)", False)], rows)


def _unscored(inputs: RunOverview, result: RunFrames) -> str:
    cells = result.cells
    return (
        '<section id="unscored"><h2>Unscored cells</h2>'
        '<p class="muted">These cells have no bps and are left out of the dataset means (cell = index within the'
        " dataset).</p>"
        + _status_list(cells, UNCOVERED, "no valid sample on any rank")
        + _status_list(cells, SILENT, "valid samples but no spike: bps undefined")
        + "</section>"
    )


def _coverage(inputs: RunOverview, result: RunFrames, report: Any, figure_html: str) -> str:
    min_samples = inputs.min_samples
    flagged = report.cells
    parts = [
        '<section id="coverage"><h2>Coverage</h2>',
        figure_html,
        f"<h3>{plural(len(flagged), 'cell')} below {min_samples} valid samples</h3>",
    ]
    if flagged.empty:
        parts.append(f"<p>Every cell has at least {min_samples} valid samples.</p>")
    else:
        shown = flagged.head(CELLS_LISTED)
        header = [
            ("dataset", False),
            ("cell", True),
            ("cell_id", True),
            ("valid samples", True),
            ("spikes", True),
            ("status", False),
        ]
        header += [(f"rank {rank}", True) for rank in range(result.world_size)]
        rows = []
        for row in shown.itertuples(index=False):
            per_rank = ['<span class="zero">0 ✗</span>' if count == 0 else str(count) for count in row.per_rank]
            rows.append(
                [
                    _e(row.dataset),
                    str(row.cell),
                    _e(row.cell_id),
                    str(row.n_valid),
                    f"{row.spikes:g}",
                    _e(row.status),
                    *per_rank,
                ]
            )
        parts.append(_table(header, rows, scroll=len(rows) > 20))
        if len(flagged) > len(shown):
            parts.append(
                f'<p class="muted">… and {len(flagged) - len(shown)} more (see <code>bpseval coverage --csv</code>).</p>'
            )
        parts.append('<p class="muted">✗: no valid sample of that cell on that rank.</p>')
    parts.append("</section>")
    return "".join(parts)


def _steps(inputs: RunOverview, result: RunFrames, figure_html: str) -> str:
    steps = inputs.steps
    if len(steps.results) <= 1 and not (steps.incomplete or steps.bad):
        return ""
    rows, classes = [], []
    for step, scored in steps.results.items():
        cells = scored.overall.cells
        rows.append(
            [
                str(step),
                str(scored.world_size),
                str(cells["ok"]),
                str(cells[SILENT]),
                str(cells[UNCOVERED]),
                *(_metric(getattr(scored.overall, metric)) for metric in DATASET_METRICS),
            ]
        )
        classes.append("chosen" if step == result.step else "")
    header = [
        ("step", True),
        ("world size", True),
        ("ok", True),
        ("silent", True),
        ("uncovered", True),
        *((metric, True) for metric in DATASET_METRICS),
    ]
    parts = ['<section id="steps"><h2>Bits per spike over steps</h2>', figure_html]
    parts.append(_table(header, rows, row_classes=classes, scroll=len(rows) > 20))
    parts.append(f'<p class="muted">The highlighted step ({result.step}) is the one the rest of this page shows.</p>')
    if steps.incomplete:
        items = "".join(f"<li>{_e(incomplete_text(step, reason))}</li>" for step, reason in steps.incomplete.items())
        parts.append(f"<h3>{plural(len(steps.incomplete), 'incomplete step')} (not scored)</h3><ul>{items}</ul>")
    if steps.bad:
        failed = [incomplete_text(step, reason) for step, reason in steps.failed.items()] + steps.problems
        items = "".join(f"<li>{_e(text)}</li>" for text in failed)
        parts.append(
            f'<h3 class="bad">{plural(len(failed), "step or file")} that could not be scored</h3><ul>{items}</ul>'
        )
    parts.append("</section>")
    return "".join(parts)


def _comparison(comparison: Comparison, figure_html: str) -> str:
    significance = comparison.settings.significance
    header = [("scope", False), ("metric", False), ("baseline", True), ("run", True), ("Δ", True), ("tolerance", True)]
    if significance is not None:
        header.append((f"{100 * (1 - significance):g}% interval of Δ", True))
    header.append(("verdict", False))
    rows = []
    for metric in comparison.metrics:
        row = [
            "overall" if metric.scope == OVERALL else _e(metric.scope),
            _e(metric.metric),
            _metric(metric.base),
            _metric(metric.new),
            signed(metric.delta),
            UNDEFINED_TEXT if not math.isfinite(metric.tolerance) else f"{metric.tolerance:.4f}",
        ]
        if significance is not None:
            row.append(interval_text(metric))
        verdict = VERDICT_MARKS[metric.verdict] + ("" if metric.gated else " (not gated)")
        verdict += SAMPLES_MARKS.get(metric.samples, "")
        row.append(f'<span class="{_e(metric.verdict)}">{_e(verdict)}</span>')
        rows.append(row)
    settings = comparison.settings
    attributed, more = listed_attributions(comparison)
    parts = [
        '<section id="comparison"><h2>Comparison with the baseline</h2>',
        (
            f"<p>Run <code>{_e(comparison.run)}</code> against baseline <code>{_e(comparison.baseline)}</code>: a metric"
            f" regresses when run &lt; baseline − (atol + rtol·|baseline|) (atol {settings.atol:g}, rtol {settings.rtol:g});"
            f" mode: {_e(comparison.mode)}.</p>"
        ),
        _table(header, rows, scroll=len(rows) > 24),
        *map(_attribution, attributed),
        f'<p class="muted">{_e(more_attributions_text(more))}</p>' if more else "",
        figure_html,
    ]
    lost = comparison.coverage_regressions
    if len(lost):
        listed = ", ".join(
            f"{_e(r.dataset)} cell {_e(r.cell)} (id {_e(r.cell_id)})"
            for r in lost.head(CELLS_LISTED).itertuples(index=False)
        )
        parts.append(f'<p class="note">{plural(len(lost), "cell")} ok in the baseline now uncovered: {listed}</p>')
    if comparison.missing_datasets:
        parts.append(f'<p class="note">Datasets missing from the run: {_e(", ".join(comparison.missing_datasets))}</p>')
    if comparison.new_datasets:
        parts.append(
            f'<p class="muted">Datasets not in the baseline (not compared): {_e(", ".join(comparison.new_datasets))}</p>'
        )
    parts += [f'<p class="muted">{_e(note)}</p>' for note in comparison.notes]
    parts += [f'<p class="note">{_e(warning)}</p>' for warning in comparison.sample_warnings]
    parts.append("</section>")
    return "".join(parts)


def _attribution(metric: MetricComparison) -> str:
    """The cells (and groups) that carry a failed metric's change, the first ATTRIBUTION_TOP of each."""
    attribution = metric.attribution
    assert attribution is not None
    rows = attribution_rows(attribution, ATTRIBUTION_TOP)
    parts = [
        f"<p>{_e(attribution_title(metric, len(rows)))}</p>",
        _table([(_e(title), index >= 3) for index, title in enumerate(ATTRIBUTION_HEADER)], _escaped(rows)),
    ]
    if attribution.groups:
        header = [(_e(title), index >= 2) for index, title in enumerate(GROUP_HEADER)]
        parts += [
            f"<p>Δ per group of {_e(metric.label)}</p>",
            _table(header, _escaped(group_rows(attribution, ATTRIBUTION_TOP))),
        ]
    return "".join(parts)


def _escaped(rows: list[list[str]]) -> list[list[str]]:
    """Rows of plain text as HTML."""
    return [[_e(value) for value in row] for row in rows]


def _histograms(inputs: RunOverview, result: RunFrames) -> str:
    items = []
    for name in result.datasets["name"]:
        png = png_bytes(bps_histogram_figure(result, name))
        items.append(_image(png, f"Distribution of per-cell bits/spike of dataset {name}"))
    return (
        '<section id="histograms"><h2>Per-cell bps of each dataset</h2>'
        "<p class=\"muted\">Histogram of the ok cells' bits/spike; black: the dataset's bps (mean of ok cells);"
        " dashed orange: bps_pooled.</p>"
        f'<div class="grid">{"".join(items)}</div></section>'
    )


def _provenance(command: str, result: RunFrames, created: str) -> str:
    files = result.files
    listed = "".join(f"<li><code>{_e(path)}</code></li>" for path in files[:64])
    more = f"<li>… and {len(files) - 64} more</li>" if len(files) > 64 else ""
    return (
        '<footer id="provenance">'
        f"<p>Made by <code>{_e(command)}</code></p>"
        f"<p>bpseval {_e(__version__)} · Python {_e(platform.python_version())} · {_e(created)}</p>"
        f"<details><summary>{plural(len(files), 'shard')} of step {result.step}</summary><ul>{listed}{more}</ul></details>"
        "</footer>"
    )


# ----------------------------------------------------------------------------------------------
# The page


def render_report(
    inputs: RunOverview,
    command: Sequence[str] | str | None = None,
    *,
    run_label: str | None = None,
    created: dt.datetime | None = None,
) -> str:
    """The whole report as one HTML string (images embedded).

    `command` is the command line that made it (shown at the bottom, with the bpseval version);
    `run_label` names the run (default: the merged run's directory).
    """
    result = RunFrames(inputs.scored, inputs.groups)
    run_label = run_label if run_label is not None else str(inputs.scored.source)
    created_text = (created or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M %Z").strip()
    report = coverage_report(inputs.scored, inputs.min_samples)
    made = figures(inputs, result)
    pictures = {stem: png_bytes(figure) for stem, figure in made.items()}
    body = [_header(inputs, result, run_label, created_text)]
    if inputs.comparison is not None:
        body.append(_verdict(inputs.comparison))
    body.append(_cards(inputs, result, len(report.cells)))
    body.append(_notes(inputs, result))
    if inputs.comparison is not None:
        body.append(
            _comparison(
                inputs.comparison,
                _image(
                    pictures["compare-cells"],
                    "Per-cell bits/spike of the run against the baseline",
                    "Each dot is a cell ok on both sides; above the diagonal the run is better.",
                ),
            )
        )
    body.append(
        '<section id="distribution"><h2>Per-cell bits per spike</h2>'
        + _image(
            pictures["bps-by-dataset"],
            "Per-cell bits/spike of every dataset",
            "One row per dataset, one dot per ok cell. Black bar: the dataset's bps (mean of its ok cells); orange diamond:"
            " its bps_pooled; dashed line: overall bps. Right: cells ok / silent / uncovered.",
        )
        + "</section>"
    )
    body.append(_dataset_table(inputs, result))
    body.append(_groups(result))
    body.append(
        '<section id="rate"><h2>Bits per spike against firing rate</h2>'
        + _image(
            pictures["bps-vs-rate"],
            "Per-cell bits/spike against mean observed rate",
            f"Mean rate = spikes per valid bin. Ringed: cells with fewer than {inputs.min_samples} valid samples."
            " Low-rate cells and cells with few samples have the noisiest bps.",
        )
        + "</section>"
    )
    body.append(
        _coverage(
            inputs,
            result,
            report,
            _image(
                pictures["coverage"],
                "Valid samples per cell and rank",
                f"Valid samples of every cell on every rank; grey: none on that rank; red outline: fewer than"
                f" {inputs.min_samples} valid samples in total.",
            ),
        )
    )
    body.append(_unscored(inputs, result))
    if "bps-over-steps" in pictures:
        steps_html = _image(pictures["bps-over-steps"], "Bits per spike over validation steps")
    else:
        steps_html = ""
    body.append(_steps(inputs, result, steps_html))
    body.append(_histograms(inputs, result))
    body.append(_provenance(command_text(command), result, created_text))
    title = f"bpseval report · {run_label} · step {result.step}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="bpseval {_e(__version__)}">'
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def write_report(
    inputs: RunOverview,
    output: str | os.PathLike[str],
    command: Sequence[str] | str | None = None,
    *,
    run_label: str | None = None,
) -> Path:
    """Write the report of `inputs` to `output` (UTF-8), whole or not at all (`write_output`); returns its path."""
    return write_output(render_report(inputs, command, run_label=run_label).encode("utf-8"), output)


__all__ = ["command_text", "render_report", "write_report"]
