"""Write a document to a file or to stdout ('-')."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from bpseval._lazy import pandas as pd


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
