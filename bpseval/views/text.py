"""How numbers and names are written in every human-readable view: one place for each convention."""

from __future__ import annotations

import html
import math
import re

from rich.markup import escape

from bpseval.features.compare import MetricComparison


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


_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]|~$]|_(?![^\W_])|(?<![^\W_])_")
"""Characters that markdown (GitHub flavour: tables, strikethrough, math) may read as syntax inside a line.
An underscore between two letters or digits cannot open or close emphasis (CommonMark), so Allen_2022 stays."""


def markdown_text(text: object) -> str:
    """User text (dataset names, cell ids, paths) as literal text in markdown: unprintable characters
    escaped, markdown punctuation backslash-escaped, and &, <, > as HTML entities."""
    escaped = _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(), printable(text))
    return html.escape(escaped, quote=False)


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
}


def interval_text(metric: MetricComparison) -> str:
    if metric.interval is None:
        return "—"
    low, high = metric.interval
    return f"[{low:+.4f}, {high:+.4f}]"


def delta_text(metric: MetricComparison) -> str:
    return "—" if not math.isfinite(metric.delta) else f"{metric.delta:+.4f}"


def verdict_text(metric: MetricComparison) -> str:
    """The verdict mark, saying when a regression is a value that became undefined, and when it does not gate."""
    undefined = metric.verdict == "regressed" and not math.isfinite(metric.new)
    suffix = (" (now undefined)" if undefined else "") + ("" if metric.gated else " (not gated)")
    return VERDICT_MARKS[metric.verdict] + suffix


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] as "0-2, 5"."""
    parts: list[str] = []
    for value in values:
        if parts and parts[-1][1] == value - 1:
            parts[-1] = (parts[-1][0], value)
        else:
            parts.append((value, value))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


COVERAGE_LISTED = 50
"""Cells listed one per line where coverage regressed; the rest are counted."""
