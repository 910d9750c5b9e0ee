"""Settings files: the defaults of the command line's options, from `bpseval.toml` or `pyproject.toml`.

Where: from the current directory upward, the first folder that holds a `bpseval.toml`, or a
`pyproject.toml` with a `[tool.bpseval]` table (one without it is passed over, as if absent). In
one folder, `bpseval.toml` wins and `pyproject.toml` is not read. The search stops after the
folder that holds `.git` (a repository's top; a worktree's `.git` file counts) or at the
filesystem root, so a checkout never takes settings from a folder above it.

What: the keys of `KEYS`, named as the options they set. In `pyproject.toml` they sit in
`[tool.bpseval]`; in `bpseval.toml` at its top. They apply to every command that has the option;
a table named after a command (`[tool.bpseval.compare]`, or `[compare]` in `bpseval.toml`) holds
keys for that command alone, which win over the keys outside it:

    [tool.bpseval]
    min-samples = 20
    exclude-cells = "bad_cells.csv"    # relative to this file

    [tool.bpseval.compare]
    rtol = 0.02
    significance = 0.05

Precedence: an option given on the command line, then the command's table, then the keys outside
any table, then the option's own default. `--help` shows the defaults the settings give. Every
command that takes a default from a settings file says so in one line on stderr (`using settings
from PATH (keys)`), so nothing is applied silently. An unknown key or table, or a value of the
wrong type or range, is exit 2 naming the key, the file and what the value must be.

`exclude-cells` is known here and checked as a path (relative to the settings file); a command
takes it when it has an `--exclude-cells` option, and `value("exclude-cells")` gives it to code
that wants it directly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpseval._sidefiles import SETTINGS_BYTES, SideFileError, read_toml
from bpseval.errors import ArgumentError

SETTINGS_FILE = "bpseval.toml"
PYPROJECT = "pyproject.toml"
BOUNDARY = ".git"
"""The search for a settings file ends at the folder holding this (a folder, or a worktree's file)."""
GATED_METRICS = ("bps", "bps_pooled", "both")
"""The values of compare's `--metric`."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Key:
    """One setting: what its value must be (`expected`, for messages), the check of a value from TOML, and what a
    value that passes becomes (`convert`: given the value and the settings file)."""

    expected: str
    check: Callable[[Any], bool]
    convert: Callable[[Any, Path], Any] = lambda value, _: value


_TOLERANCE = Key("a number >= 0", lambda value: _number(value) and value >= 0, lambda value, _: float(value))
KEYS: dict[str, Key] = {
    "min-samples": Key(
        "an integer >= 0", lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0
    ),
    "atol": _TOLERANCE,
    "rtol": _TOLERANCE,
    "dataset-atol": _TOLERANCE,
    "dataset-rtol": _TOLERANCE,
    "metric": Key(f"one of {', '.join(GATED_METRICS)}", lambda value: value in GATED_METRICS),
    "significance": Key(
        "a number between 0 and 1 (exclusive)",
        lambda value: _number(value) and 0 < value < 1,
        lambda value, _: float(value),
    ),
    "exclude-cells": Key(
        "a path to a CSV file (text, relative to the settings file)",
        lambda value: isinstance(value, str) and value.strip() != "" and "\0" not in value,
        lambda value, settings: settings.parent / value,
    ),
}
"""Every key a settings file may hold, by the name of the option it sets."""


@dataclass(frozen=True)
class Settings:
    """What a settings file says: the keys outside any table (`common`) and per command (`commands`).

    `path` is the file, or None when there is none (and every key is then unset).
    """

    path: Path | None = None
    common: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of(self, command: str | None = None) -> dict[str, Any]:
        """The keys `command` takes from the file (its table's over the common ones); None: the common ones."""
        return {**self.common, **(self.commands.get(command, {}) if command else {})}

    def value(self, key: str, command: str | None = None) -> Any:
        """The value of `key` for `command` (a path key as an absolute `Path`), or None when the file sets none.

        Raises:
            KeyError: `key` is not one of `KEYS`.
        """
        if key not in KEYS:
            raise KeyError(key)
        return self.of(command).get(key)

    def default_map(self, command: str, options: Collection[str]) -> dict[str, Any]:
        """The defaults `command` takes, for click's `default_map`: by parameter name, only for `options` it has."""
        return {key.replace("-", "_"): value for key, value in self.of(command).items() if key in options}


def find(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The settings file for a command run in `start` (default: the current directory); None when there is none.

    Args:
        start: the folder the search begins in.

    Returns:
        The path of the first `bpseval.toml`, or `pyproject.toml` with a `[tool.bpseval]` table, from `start`
        upward; the search ends after the folder holding `.git`, or at the filesystem root.

    Raises:
        ArgumentError: a `pyproject.toml` on the way cannot be read.
    """
    folder = Path(start if start is not None else os.getcwd()).absolute()
    for candidate in (folder, *folder.parents):
        if (candidate / SETTINGS_FILE).is_file():
            return candidate / SETTINGS_FILE
        pyproject = candidate / PYPROJECT
        if pyproject.is_file():
            tool = _document(pyproject).get("tool")
            if isinstance(tool, dict) and "bpseval" in tool:
                return pyproject
        if (candidate / BOUNDARY).exists():
            return None
    return None


def load(
    start: str | os.PathLike[str] | None = None, commands: Mapping[str, Collection[str]] | None = None
) -> Settings:
    """The settings for a command run in `start` (see `find`), every key and value checked.

    Args:
        start: the folder the search begins in (default: the current directory).
        commands: the commands and the options each has (as keys: `min-samples`); a table named otherwise,
            or one holding a key its command has no option for, is refused. None: any command name is taken.

    Returns:
        The settings (empty, with `path` None, when no file is found).

    Raises:
        ArgumentError: the file cannot be read, is not TOML, or holds an unknown key or a wrong value; the message
            names the file and the key.
    """
    path = find(start)
    if path is None:
        return Settings()
    document = _document(path)
    table, where = (document, "") if path.name == SETTINGS_FILE else (document["tool"]["bpseval"], "tool.bpseval")
    if not isinstance(table, dict):
        raise ArgumentError(f"{path}: [{where}] must be a table of settings, not {_shown(table)}.")
    common: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for name, value in table.items():
        if name not in KEYS and isinstance(value, dict) and (commands is None or name in commands):
            tables[name] = {
                key: _checked(
                    path, f"{where}.{name}".lstrip("."), key, entry, None if commands is None else commands[name]
                )
                for key, entry in value.items()
            }
        else:
            common[name] = _checked(path, where, name, value, None, commands)
    return Settings(path, common, tables)


def value(key: str, command: str | None = None, start: str | os.PathLike[str] | None = None) -> Any:
    """The value the settings file gives `key` for `command`, or None: e.g. `value("exclude-cells", "compute")`
    is the CSV of cells to exclude (an absolute `Path`) or None.

    Args:
        key: one of `KEYS`.
        command: the command whose table is read too (None: the keys outside any table only).
        start: the folder the search begins in (default: the current directory).

    Returns:
        The checked value, or None when no settings file sets it.

    Raises:
        ArgumentError: as for `load`.
        KeyError: `key` is not one of `KEYS`.
    """
    return load(start).value(key, command)


def _document(path: Path) -> dict[str, Any]:
    try:
        return read_toml(path, SETTINGS_BYTES)
    except SideFileError as error:
        raise ArgumentError(f"{path}: settings cannot be read: {error.reason}.") from None


def _checked(
    path: Path,
    where: str,
    key: str,
    value: Any,
    options: Collection[str] | None,
    commands: Mapping[str, Collection[str]] | None = None,
) -> Any:
    """`value` of `key` in table `where` of `path` once checked (a path key made absolute); ArgumentError naming
    the file, the table and the key when the key is unknown there or the value is wrong."""
    table = f"[{where}] " if where else ""
    if key not in KEYS:
        tables = f"; or a table per command ({', '.join(sorted(commands))})" if commands else ""
        raise ArgumentError(f"{path}: unknown setting {table}{key!r}. Known settings: {', '.join(KEYS)}{tables}.")
    if options is not None and key not in options:
        command = where.rsplit(".", 1)[-1]
        raise ArgumentError(f"{path}: {table}{key!r}: bpseval {command} has no --{key} option to set.")
    setting = KEYS[key]
    if not setting.check(value):
        raise ArgumentError(f"{path}: {table}{key} must be {setting.expected}, not {_shown(value)}.")
    return setting.convert(value, path)


def _shown(value: Any) -> str:
    """A TOML value as a message names it: its kind and, when short, itself."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "text", list: "an array", dict: "a table"}
    kind = next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 else kind
