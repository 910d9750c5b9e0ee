"""Write a document to a file or to stdout ('-')."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from bpseval._lazy import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make Excel, LibreOffice or Google Sheets read a CSV cell as a formula."""


def write_text(text: str, path: str, stdout: TextIO | None = None) -> None:
    """Write `text` to `path`, or to stdout when `path` is '-'."""
    if path == "-":
        stream = stdout or sys.stdout
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()
    else:
        Path(path).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def inert(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with `'`; any other value unchanged.

    Only strings are touched: a number such as a negative bps stays a number.
    """
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_csv(frame: pd.DataFrame, path: str, stdout: TextIO | None = None) -> None:
    """The frame as CSV at `path` ('-' = stdout); undefined values are empty fields.

    Text cells and column names that begin like a formula (dataset names, cell ids, run names
    come from the data) are made inert, so that opening the file in a spreadsheet runs nothing.
    Lines end in CRLF, as RFC 4180 says: then a text cell holding a carriage return is quoted too
    (with '\n' line ends Python's csv writer leaves a bare '\r' unquoted, which splits the row).
    """
    safe = frame.rename(columns=inert)
    for column, dtype in safe.dtypes.items():
        if not pd.api.types.is_numeric_dtype(dtype):
            safe[column] = safe[column].map(inert)
    write_text(safe.to_csv(index=False, lineterminator="\r\n"), path, stdout)
