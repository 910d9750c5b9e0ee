"""The side-file rule: every file bpseval reads besides shards is opened one way, here.

Merge-cache entries, baseline documents, `--cells` tables, settings files and the compiled kernel's cache files
are read with `read_bytes` (or `read_text`, `read_json`, `read_toml`):

- a regular file only, never a FIFO, device or directory: checked before opening, and again on the
  descriptor, which is opened without blocking (opening a FIFO would wait for a writer forever);
- at most `limit` bytes, checked before reading;
- JSON nested at most `depth` levels, checked before parsing (json's recursive parser would fail with
  a RecursionError on deep nesting); TOML parsed whole or refused, deep nesting included.

Every failure is one `SideFileError`, whose `reason` the caller puts in its own message: a cache
rebuilds what it cannot use, a file the user named is exit 2 naming it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from itertools import accumulate
from typing import Any

from bpseval.errors import BpsevalError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

DOCUMENT_BYTES = 1 << 28
"""The largest JSON document read from a path the user gives (a baseline): 256 MiB, about 800,000 cells."""
DOCUMENT_DEPTH = 32
"""Levels of nesting of a JSON document read from a path the user gives (bpseval writes 4 to 6)."""
TABLE_BYTES = 1 << 28
"""The largest table read from a path the user gives (`--cells`): 256 MiB."""
SETTINGS_BYTES = 1 << 20
"""The largest settings file read (`bpseval.toml`, `pyproject.toml`): 1 MiB, far beyond any real one."""
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
"""A JSON string literal (escapes included), in one pass without backtracking."""
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class SideFileError(BpsevalError):
    """A side file that cannot be used: missing, unreadable, not a regular file, too large, or not what it should hold.

    `reason` says why in a few words, for the caller's message; `missing` is True when there is no file there.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, missing: bool = False) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.reason = reason
        self.missing = missing


def read_bytes(path: str | os.PathLike[str], limit: int) -> bytes:
    """The content of the regular file at `path`, refused when it is larger than `limit` bytes.

    Args:
        path: the file (a symbolic link is followed; what it leads to must be a regular file).
        limit: the most bytes the file may hold.

    Returns:
        Its bytes.

    Raises:
        SideFileError: no such file, not readable, not a regular file, or more than `limit` bytes.
    """
    try:
        _check_status(path, os.stat(path), limit)
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as error:
        missing = isinstance(error, (FileNotFoundError, NotADirectoryError))  # no such file, or a folder on its path
        raise SideFileError(path, error.strerror or str(error), missing) from None
    try:
        _check_status(path, os.fstat(descriptor), limit)  # the file opened may not be the one checked
        with open(descriptor, "rb", closefd=False) as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise SideFileError(path, error.strerror or str(error)) from None
    finally:
        os.close(descriptor)
    if len(data) > limit:
        raise SideFileError(path, f"grew to more than {_size(limit)} while being read")
    return data


def read_text(path: str | os.PathLike[str], limit: int, encoding: str = "utf-8") -> str:
    """`read_bytes` decoded as `encoding`; SideFileError when the bytes are not such text."""
    return _decoded(read_bytes(path, limit), encoding, path)


def read_json(
    path: str | os.PathLike[str], limit: int, depth: int, parse_constant: Callable[[str], Any] | None = None
) -> Any:
    """The JSON document in the file at `path`: at most `limit` bytes of UTF-8, nested at most `depth` levels.

    Args:
        path: the file.
        limit: the most bytes the file may hold.
        depth: the most levels of arrays and objects inside one another.
        parse_constant: as for `json.loads` (what NaN, Infinity and -Infinity become).

    Returns:
        The parsed document.

    Raises:
        SideFileError: as for `read_bytes`, or not UTF-8, nested too deeply, or not JSON.
    """
    return parse_json(read_text(path, limit), depth, path, parse_constant)


def parse_json(
    text: str | bytes, depth: int, source: str | os.PathLike[str], parse_constant: Callable[[str], Any] | None = None
) -> Any:
    """`text` (bytes: UTF-8) parsed as JSON once its nesting is known to be at most `depth`; SideFileError naming
    `source` if it is not JSON or nested deeper."""
    if isinstance(text, bytes):
        text = _decoded(text, "utf-8", source)
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    deepest = max(accumulate(1 if bracket in "[{" else -1 for bracket in brackets), default=0)
    if deepest > depth:
        raise SideFileError(source, f"nested {deepest} levels deep, more than the {depth} this document can have")
    try:
        return json.loads(text, parse_constant=parse_constant)
    except ValueError as error:  # json.JSONDecodeError, or an integer too long to convert
        raise SideFileError(source, f"not JSON ({error})") from None


def read_toml(path: str | os.PathLike[str], limit: int) -> dict[str, Any]:
    """The TOML document in the file at `path`: at most `limit` bytes of UTF-8.

    Args:
        path: the file.
        limit: the most bytes the file may hold.

    Returns:
        Its tables and values, as `tomllib` gives them.

    Raises:
        SideFileError: as for `read_bytes`, or not UTF-8, or not TOML (nesting too deep for the parser included).
    """
    text = read_text(path, limit)
    try:
        return tomllib.loads(text)
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise SideFileError(path, f"not TOML ({error})") from None
    except RecursionError:  # arrays or inline tables nested deeper than the parser recurses
        raise SideFileError(path, "not TOML this parser can read (nested too deeply)") from None


def _decoded(data: bytes, encoding: str, source: str | os.PathLike[str]) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise SideFileError(source, f"not {encoding} text ({error.reason} at byte {error.start})") from None


def _check_status(path: str | os.PathLike[str], status: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        kind = _KINDS.get(stat.S_IFMT(status.st_mode), "not a file")
        raise SideFileError(path, f"not a regular file ({kind})")
    if status.st_size > limit:
        raise SideFileError(path, f"{_size(status.st_size)}, more than the {_size(limit)} this file can hold")


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
