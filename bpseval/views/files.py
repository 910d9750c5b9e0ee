"""Write a document to a file or to stdout ('-'), and check output paths before any work is done."""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TextIO

from bpseval._lazy import pandas as pd
from bpseval.errors import ArgumentError

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make Excel, LibreOffice or Google Sheets read a CSV cell as a formula."""
STDOUT = "-"
"""The path that means stdout."""


def check_outputs(outputs: Mapping[str, str | os.PathLike[str] | None], *, folders: Collection[str] = ()) -> None:
    """Refuse output paths that cannot be written, before a command reads any shard.

    `outputs` maps each option, as the user sees it (e.g. "--json"), to its path, or None when it
    was not given; '-' is stdout. The options in `folders` take a folder, the others a file. A
    file must not be a directory and a folder must not be a file; an existing path must be
    writable; a missing one must be creatable, its nearest existing ancestor a writable directory
    (missing folders are made when writing). Two options naming the same file, or both stdout,
    are refused too: one document would overwrite or interleave with the other. Why up front: a
    merge can take minutes, and its result should not be lost to a typo in an output path.
    """
    taken: dict[str, str] = {}
    for option, value in outputs.items():
        if value is None:
            continue
        if str(value) == STDOUT:
            if option in folders:
                raise ArgumentError(
                    f"{option} -: this option takes a folder, not stdout; pass the folder to write into."
                )
            key, where = STDOUT, "stdout"
        else:
            path = Path(value)
            _check_output_path(path, option, folder=option in folders)
            key, where = os.path.realpath(path), str(path)
        if key in taken:
            raise ArgumentError(f"{taken[key]} and {option} both write to {where}; give each its own path.")
        taken[key] = option


def _check_output_path(path: Path, option: str, *, folder: bool) -> None:
    """One output path: right kind (file or folder), writable, or creatable; ArgumentError saying what to do."""
    target = destination(path)
    if not os.path.exists(target):
        ancestor = next(parent for parent in target.parents if os.path.exists(parent))
        if not os.path.isdir(ancestor):
            raise ArgumentError(
                f"{option} {path}: cannot be created, because {ancestor} is a file, not a directory; pass a path"
                " under a directory."
            )
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ArgumentError(
                f"{option} {path}: cannot be created, because the directory {ancestor} is not writable"
                " (permission denied); pass a path in a directory you can write to."
            )
        return
    if not folder and os.path.isdir(target):
        raise ArgumentError(
            f"{option} {path}: is a directory, not a file; pass the path of the file to write, e.g. a new"
            " file name inside it."
        )
    if folder and not os.path.isdir(target):
        raise ArgumentError(
            f"{option} {path}: is not a directory (it is a file); pass the folder to write into"
            " (it is created if needed)."
        )
    if not os.access(target, os.W_OK | (os.X_OK if folder else 0)):
        raise ArgumentError(
            f"{option} {path}: the {'directory' if folder else 'file'} exists and cannot be written (permission"
            " denied); fix its permissions or pass another path."
        )


def destination(path: str | os.PathLike[str]) -> Path:
    """Where writing `path` goes: the path itself when it exists (a file, /dev/stdout), else its resolved form.

    Missing folders are made when writing, so a `..` after one of them steps back lexically
    (`new/../r.json` is `r.json`), as `os.path.realpath` reads it; symlinks are followed.
    """
    return Path(path) if os.path.exists(path) else Path(os.path.realpath(path))


def write_text(text: str, path: str, stdout: TextIO | None = None, *, append: bool = False) -> None:
    """Write (or append) `text` to `path`, making missing parent folders, or to stdout when `path` is '-'.

    A file that cannot be written raises ArgumentError naming it; `check_outputs` makes that rare.
    """
    text = text if text.endswith("\n") else text + "\n"
    if path == STDOUT:
        stream = stdout or sys.stdout
        stream.write(text)
        stream.flush()
        return
    target = destination(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a" if append else "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        raise ArgumentError(f"{path}: cannot be written ({error.strerror}); pass a path you can write to.") from None


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
