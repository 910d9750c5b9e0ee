"""How numbers and names are written in every human-readable view: one place for each convention."""

from __future__ import annotations

import html
import json
import math
import re

from rich.markup import escape

from bpseval.features.attribution import Attribution, CellContribution
from bpseval.features.compare import DIFFERENT, UNKNOWN, Comparison, MetricComparison
from bpseval.kernel.metrics import METRICS


def shown(text: object) -> str:
    """User text safe for the terminal: control characters escaped, Rich markup escaped."""
    value = str(text)
    if not value.isprintable():
        value = value.encode("unicode_escape").decode("ascii")
    return escape(value)


def printable(text: object) -> str:
    """`text` with each character that is not printable (control characters, lone surrogates, U+FFFE) written
    as its Python escape, e.g. \\x01: safe in any file, and valid XML 1.0 (which forbids those characters)."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in str(text))


_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]|~$]|:(?=//)|(?<=www)\.|_(?![^\W_])|(?<![^\W_])_")
"""Characters that markdown (GitHub flavour: tables, strikethrough, math, autolinks) may read as syntax inside a
line. An underscore between two letters or digits cannot open or close emphasis (CommonMark), so Allen_2022 stays.
The colon of `://` and the dot of `www.` are escaped too: GitHub turns `http://…`, `https://…`, `ftp://…` and
`www.…` in text into links, but not `http\\://…` nor `www\\.…`, which show as typed."""

WORD_JOINER = "\u2060"
"""Put before each `@` of user text in markdown: GitHub links an e-mail address in text whatever is escaped in it
(it finds them after the escapes are read), but not one broken by this invisible, zero-width character."""


def markdown_text(text: object) -> str:
    """User text (dataset names, cell ids, paths) as literal text in markdown: unprintable characters
    escaped, markdown punctuation backslash-escaped, &, <, > as HTML entities, and no link made of a URL or
    an e-mail address in it (see `_MARKDOWN_SPECIAL` and `WORD_JOINER`)."""
    escaped = _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(), printable(text))
    return html.escape(escaped, quote=False).replace("@", WORD_JOINER + "@")


_MARKDOWN_BLOCK_START = re.compile(r"^([-+=#>]|\d+[.)])")
"""What opens a block (a list item, a heading, a quote, a rule) when it starts a line of markdown."""


def markdown_line(text: object) -> str:
    """User text as a line of literal text in markdown: `markdown_text`, without the spaces that lead it (four of
    them open code), and what would open a block at its start backslash-escaped."""
    escaped = markdown_text(text).lstrip()
    return _MARKDOWN_BLOCK_START.sub(lambda match: match.group()[:-1] + "\\" + match.group()[-1], escaped)


UNDEFINED_TEXT = "—"
"""How every view writes a number that is undefined (never as a number)."""


def format_bps(value: float | None, digits: int = 4) -> str:
    """Bits per spike with `digits` decimals; an em dash where it is undefined."""
    return UNDEFINED_TEXT if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def signed(value: float | None) -> str:
    """A change, with its sign and 4 decimals; an em dash where it is undefined."""
    return UNDEFINED_TEXT if value is None or not math.isfinite(value) else f"{value:+.4f}"


def plural(count: int, word: str) -> str:
    """ "1 cell", "3 cells": a count and its noun."""
    return f"{count} {word}{'' if count == 1 else 's'}"


VERDICT_MARKS = {
    "regressed": "✗ regressed",
    "improved": "✓ improved",
    "unchanged": "= unchanged",
    "undefined": "? undefined",
    "inconclusive": "~ inconclusive",
}


def interval_text(metric: MetricComparison) -> str:
    if metric.interval is None:
        return UNDEFINED_TEXT
    low, high = metric.interval
    return f"[{low:+.4f}, {high:+.4f}]"


def delta_text(metric: MetricComparison) -> str:
    return UNDEFINED_TEXT if not math.isfinite(metric.delta) else f"{metric.delta:+.4f}"


SAMPLES_MARKS = {DIFFERENT: " (different samples)", UNKNOWN: " (samples unknown)"}
"""How a verdict made on different samples, or on samples that may differ, is marked in every view."""


def samples_status(comparison: Comparison) -> str:
    """What a view's verdict line adds when verdicts were made on different samples, or on samples that may
    differ ("" when every dataset's samples are the same on both sides)."""
    if comparison.datasets_with(DIFFERENT):
        return " (verdicts made on different samples)"
    return " (samples unknown)" if comparison.datasets_with(UNKNOWN) else ""


def verdict_text(metric: MetricComparison) -> str:
    """The verdict mark, saying when a regression is a value that became undefined, when it does not gate, and when
    it was made on different (or possibly different) samples."""
    undefined = metric.verdict == "regressed" and not math.isfinite(metric.new)
    suffix = (" (now undefined)" if undefined else "") + ("" if metric.gated else " (not gated)")
    return VERDICT_MARKS[metric.verdict] + suffix + SAMPLES_MARKS.get(metric.samples, "")


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] as "0-2, 5"."""
    parts: list[tuple[int, int]] = []
    for value in values:
        if parts and parts[-1][1] == value - 1:
            parts[-1] = (parts[-1][0], value)
        else:
            parts.append((value, value))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


COVERAGE_LISTED = 50
"""Cells listed one per line where coverage regressed; the rest are counted."""


ATTRIBUTION_TOP = 10
"""Cells (and groups) of a failed metric's change listed in the markdown summary and HTML; the JSON holds all."""
PRINTED_TOP = 3
"""Cells (and groups) of a failed metric's change that the printed compare report lists (unless --top says)."""
ATTRIBUTED_METRICS_LISTED = 10
"""Failed metrics whose attribution the terminal, markdown and HTML show (the overall ones first); the JSON holds all."""


def listed_attributions(comparison: Comparison) -> tuple[list[MetricComparison], int]:
    """The failed metrics whose attribution a view shows, and how many more failed metrics it leaves to the JSON."""
    attributed = [m for m in comparison.failed_metrics if m.attribution is not None and m.attribution.cells]
    return attributed[:ATTRIBUTED_METRICS_LISTED], max(len(attributed) - ATTRIBUTED_METRICS_LISTED, 0)


def more_attributions_text(more: int) -> str:
    """The line that says what a view left out."""
    return f"the attribution of {plural(more, 'more failed metric')} is in the JSON (--json)"


def share_text(value: float) -> str:
    """A share of a change, as a percentage; an em dash where it is undefined."""
    if not math.isfinite(value):
        return UNDEFINED_TEXT
    text = f"{100 * value:.1f}%"
    return "0.0%" if text == "-0.0%" else text


def contribution_text(value: float) -> str:
    """A change of a cell's or group's contribution: small numbers, so 6 decimals."""
    return UNDEFINED_TEXT if not math.isfinite(value) else f"{value:+.6f}"


def attribution_title(metric: MetricComparison, listed: int) -> str:
    """What an attribution table shows (user text in it: the dataset name of `metric.label`)."""
    attribution = metric.attribution
    assert attribution is not None
    score = METRICS[metric.metric].cell_score
    return (
        f"{metric.label}: the {listed} of {plural(len(attribution.cells), 'cell')} contributing most to"
        f" Δ {signed(metric.delta)} (per cell: its {score}, the change of its contribution, its share of Δ)"
    )


ATTRIBUTION_HEADER = ("dataset", "cell", "status", "baseline", "new", "Δ contribution", "share")
GROUP_HEADER = ("dataset", "group", "cells", "Δ contribution", "share")


def cell_text(cell: CellContribution) -> str:
    """The cell's index, with its id when that differs (user text)."""
    if cell.cell is None:
        return f"id {cell.cell_id}"
    return str(cell.cell) if str(cell.cell_id) == str(cell.cell) else f"{cell.cell} (id {cell.cell_id})"


def attribution_rows(attribution: Attribution, top: int) -> list[list[str]]:
    """The `top` cells, as ATTRIBUTION_HEADER; the first two values are user text, to escape for each view."""
    return [
        [
            cell.dataset,
            cell_text(cell),
            (cell.status_new or "—")
            if cell.change is None
            else f"{cell.status_base or '—'} → {cell.status_new or '—'}",
            format_bps(cell.value_base),
            format_bps(cell.value_new),
            contribution_text(cell.delta),
            share_text(attribution.share(cell)),
        ]
        for cell in attribution.cells[:top]
    ]


NULL_GROUP = "null"
"""How the views write the group of the cells without a value (the group None)."""


def group_text(value: object) -> str:
    """A group's value as the human-readable views write it: the group None as `null`, and a value that could be
    read as that (the text "null", or any text that starts with a double quote) quoted as a JSON string, e.g.
    "null" as `"null"`; every other value as it is. No two groups look alike."""
    if value is None:
        return NULL_GROUP
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if text == NULL_GROUP or text.startswith('"') else text


def group_rows(attribution: Attribution, top: int) -> list[list[str]]:
    """The `top` groups, as GROUP_HEADER; the first two values are user text (cells the mapping lacks: `null`)."""
    return [
        [
            "all datasets" if group.dataset is None else group.dataset,
            group_text(group.value),
            str(group.cells),
            contribution_text(group.delta),
            share_text(attribution.share(group)),
        ]
        for group in attribution.groups[:top]
    ]
