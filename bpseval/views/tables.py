"""Every printed table and line, in the three formats of `--format`: `table` (box lines), `plain` (columns aligned
with spaces) and `markdown` (GitHub-flavoured tables, user text escaped).

One function, `layout`, decides for all three which columns go in which table: the key columns (a dataset, a run)
lead each table, then as many of the others, in order, as fit the width at their natural widths; the rest follow
in further tables. A value is never cut, folded or wrapped (but prose, such as a reason), a header never wraps, and
a row is one line. Only when the keys and a single other column cannot fit does a row become a block of
"header value" lines. No printed line ends in a space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from bpseval.views.text import markdown_line, markdown_text

TableFormat = Literal["table", "plain", "markdown"]
TABLE: TableFormat = "table"
MARKDOWN: TableFormat = "markdown"

WRAP_FLOOR = 20
"""The narrowest a column of prose gets (or its longest word) before it moves to a table of its own."""
LONG_INDENT = 2


@dataclass(frozen=True)
class Column:
    """A column: its header (Rich markup, one line), how its values are justified, and whether they are prose that
    wraps at spaces within the column (a reason); every other value is printed whole, on one line."""

    header: str
    justify: Literal["left", "right"] = "right"
    wraps: bool = False


def name_column(header: str, justify: Literal["left", "right"] = "left") -> Column:
    """A column of names: left-justified unless told otherwise."""
    return Column(header, justify)


@dataclass(frozen=True)
class _Style:
    """How a format draws a table: what leads and ends each line, what separates columns, the header's rule."""

    left: str
    gap: str
    right: str
    rule: str = ""
    joint: str = ""


_STYLES = {
    "table": _Style("", " │ ", "", rule="━", joint="━┿━"),
    "plain": _Style("", "  ", "", rule=""),
    "markdown": _Style("| ", " | ", " |"),
}

Part = list[tuple[int, int]]
"""One table of a layout: (column index, width) pairs."""


def layout(
    columns: Sequence[Column], cells: Sequence[Sequence[Text]], keys: int, room: int | None, form: TableFormat
) -> list[Part] | None:
    """The tables that show `cells` within `room` (None: no limit): each led by the first `keys` columns, then as many
    of the others, in order, as fit at their natural widths (prose down to WRAP_FLOOR or its longest word, taking
    the room left). None when even the keys and one other column do not fit."""
    style = _STYLES[form]
    natural, least = [], []
    for index, column in enumerate(columns):
        values = [row[index] for row in cells]
        width = max([cell_len(Text.from_markup(column.header).plain), *(value.cell_len for value in values)])
        width = max(width, 3) if form == MARKDOWN else width  # a delimiter cell has at least three dashes
        natural.append(width)
        words = [cell_len(word) for value in values for word in value.plain.split()]
        least.append(max([min(width, WRAP_FLOOR), *words]) if column.wraps else width)

    def need(part: list[int]) -> int:
        return len(style.left) + len(style.right) + len(style.gap) * (len(part) - 1) + sum(least[i] for i in part)

    parts: list[list[int]] = []
    current = list(range(keys))
    for index in range(keys, len(columns)):
        if room is None or need([*current, index]) <= room:
            current.append(index)
            continue
        if len(current) == keys:
            return None
        parts.append(current)
        current = [*range(keys), index]
        if need(current) > room:
            return None
    if room is not None and need(current) > room:
        return None
    parts.append(current)
    return [
        [
            (i, natural[i] if not columns[i].wraps or room is None else min(natural[i], room - need(part) + least[i]))
            for i in part
        ]
        for part in parts
    ]


def print_table(
    console: Console,
    title: str | None,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    keys: int = 1,
    form: TableFormat = TABLE,
) -> None:
    """Print `rows` (Rich markup, one string per column) under `title` (Rich markup) in `form`: as the tables
    `layout` gives, else (when even one column beside the keys cannot fit) one block of "header value" lines per
    row under its keys."""
    headers = [_text(column.header) for column in columns]
    cells = [[_text(value) for value in row] for row in rows]
    if form == MARKDOWN:
        headers = [Text(markdown_text(header.plain)) for header in headers]
        cells = [[Text(markdown_text(value.plain)) for value in row] for row in cells]
    parts = layout(columns, [headers, *cells], keys, None if form == MARKDOWN else console.width, form)
    lines: list[Text] = []
    if title:
        lines += _title_lines(console, _text(title), form)
    if parts is None:
        lines += _long_lines(console, columns, headers, cells, keys)
    for number, part in enumerate(parts or []):
        lines += [Text()] if number else []
        lines += _part_lines(console, columns, headers, cells, part, form)
    lines += [Text()] if form == MARKDOWN else []
    _print_lines(console, lines)


def print_line(console: Console, markup: str, form: TableFormat = TABLE, *, wrap: bool = True) -> None:
    """Print a line of prose (Rich markup): wrapped at the console's width unless `wrap` is False (a message kept on
    one line for grep); in markdown, its text escaped, as a paragraph of its own."""
    text = _text(markup)
    if form == MARKDOWN:
        _print_lines(console, [Text(markdown_line(text.plain)), Text()])
    else:
        _print_lines(console, list(text.wrap(console, console.width, overflow="fold")) if wrap else [text])


def _text(markup: str) -> Text:
    return Text.from_markup(markup, emoji=False)


def _print_lines(console: Console, lines: Sequence[Text]) -> None:
    """Each line as it is (never wrapped, cropped or padded), without the spaces that end it."""
    for line in lines:
        line = line.copy()
        line.rstrip()
        console.print(line, soft_wrap=True)


def _title_lines(console: Console, title: Text, form: TableFormat) -> list[Text]:
    if form == MARKDOWN:
        return [Text(f"**{markdown_text(title.plain)}**"), Text()]
    title.stylize("bold")
    return list(title.wrap(console, console.width, overflow="fold"))


def _part_lines(
    console: Console,
    columns: Sequence[Column],
    headers: Sequence[Text],
    cells: Sequence[Sequence[Text]],
    part: Part,
    form: TableFormat,
) -> list[Text]:
    """One table of a layout: the header line, the rule under it, then each row (prose wrapped within its column)."""
    style = _STYLES[form]
    lines = [_joined([(headers[i].copy(), width, columns[i]) for i, width in part], style, bold=True)]
    if form == MARKDOWN:
        dashes = ["-" * (width - 1) + (":" if columns[i].justify == "right" else "-") for i, width in part]
        lines.append(Text(style.left + style.gap.join(dashes) + style.right))
    elif style.rule:
        lines.append(Text(style.joint.join(style.rule * width for _, width in part)))
    for row in cells:
        wrapped = [
            list(row[i].wrap(console, width)) if columns[i].wraps and row[i].cell_len > width else [row[i]]
            for i, width in part
        ]
        for depth in range(max(map(len, wrapped))):
            values = [(lines_[depth] if depth < len(lines_) else Text()) for lines_ in wrapped]
            lines.append(
                _joined(
                    [(value.copy(), width, columns[i]) for value, (i, width) in zip(values, part, strict=True)], style
                )
            )
    return lines


def _joined(values: list[tuple[Text, int, Column]], style: _Style, *, bold: bool = False) -> Text:
    """Values padded to their widths as their columns justify them, joined as `style` draws a row."""
    for value, width, column in values:
        value.rstrip()
        pad = width - value.cell_len
        value.pad_left(pad) if column.justify == "right" else value.pad_right(pad)
        if bold:
            value.stylize("bold")
    return Text(style.left) + Text(style.gap).join(value for value, _, _ in values) + Text(style.right)


def _long_lines(
    console: Console, columns: Sequence[Column], headers: Sequence[Text], cells: Sequence[Sequence[Text]], keys: int
) -> list[Text]:
    """Per row, its keys on a line, then one "header value" line per other column (or the header, then the value on
    a line of its own, where both do not fit on one)."""
    width = console.width
    fields = range(keys, len(columns))
    header_width = max((headers[i].cell_len for i in fields), default=0)
    value_width = max((row[i].cell_len for row in cells for i in fields), default=0)
    side_by_side = LONG_INDENT + header_width + 2 + value_width <= width
    lines: list[Text] = []
    for row in cells:
        label = Text(" · ").join(row[:keys])
        label.stylize("bold")
        lines += label.wrap(console, width, overflow="fold")
        for i in fields:
            value = row[i].copy()
            if side_by_side and not columns[i].wraps:
                value.pad_left(value_width - value.cell_len)
                header = headers[i].copy()
                header.pad_right(header_width - header.cell_len + 2)
                lines.append(Text(" " * LONG_INDENT) + header + value)
                continue
            lines += [Text(" " * LONG_INDENT) + line for line in headers[i].wrap(console, width - LONG_INDENT)]
            values = value.wrap(console, width - 2 * LONG_INDENT) if columns[i].wraps else [value]
            lines += [Text(" " * 2 * LONG_INDENT) + line for line in values]
    return lines
