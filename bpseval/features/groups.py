"""Cell groups: a table of cell attributes (`--cells`), cells assigned to the values of one column (`--group-by`), and
every metric of each group per dataset and over all datasets.

A group is scored exactly as a dataset is, from the same per-cell scores (`run.scored.select_cells`, then
`overall_of` for the all-datasets row): grouping held-out neurons gives the Neural Latents Benchmark's co-bps as
that group's `bps_pooled`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bpseval._sidefiles import TABLE_BYTES, SideFileError, read_text
from bpseval.errors import ArgumentError
from bpseval.run.scored import Exclusions, Overall, ScoredDataset, ScoredRun, overall_of, select_cells

DATASET_COLUMN, INDEX_COLUMN, ID_COLUMN = "dataset", "cell", "cell_id"
CELLS_NAMED = 8
"""Cells named in a warning about cells of the table or of the shards that the other side lacks; the rest counted."""


@dataclass(frozen=True)
class CellTable:
    """A validated cell table: one row of text values per cell, keyed by (dataset, cell index or cell id)."""

    path: str
    columns: list[str]
    key: str
    """`cell` (0-based index within the dataset) when that column is there, else `cell_id`."""
    rows: dict[tuple[str, str], dict[str, str]]
    """Each cell's values by column, keyed by (dataset, key text); `cell` keys are normalised (`007` is `7`),
    `cell_id` keys are the table's text as it is."""
    lines: dict[tuple[str, str], int]
    """The line of the file each cell was read from, for messages."""


def load_cell_table(path: str | os.PathLike[str], option: str = "--cells") -> CellTable:
    """Read and check a cell table (CSV with a header row); ArgumentError naming the file, line and column otherwise.

    Refused: a file that cannot be read or is empty, no `dataset` column, neither `cell` nor `cell_id`, repeated
    column names, rows of the wrong length, a `cell` that is not written in the ASCII digits 0-9 alone (no sign,
    space, underscore, or other script's digits), an empty `dataset` or key, and two rows for one cell with
    different values (identical repeats are kept once). Messages name the table by `option`, which gave it.
    """
    try:
        records = list(csv.reader(io.StringIO(read_text(path, TABLE_BYTES, "utf-8-sig"), newline="")))
    except (SideFileError, csv.Error) as error:
        reason = error.reason if isinstance(error, SideFileError) else str(error)
        raise ArgumentError(f"{option} {path}: cannot be read as a UTF-8 CSV table ({reason}).") from None
    if not records:
        raise ArgumentError(
            f"{option} {path}: the file is empty; give a CSV table with a header row (dataset, cell or cell_id, and"
            " the columns to group by) and one row per cell."
        )
    columns = records[0]
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise ArgumentError(f"{option} {path}: line 1 names the column {repeated[0]!r} twice; name each column once.")
    if DATASET_COLUMN not in columns:
        raise ArgumentError(
            f"{option} {path}: line 1 has no column 'dataset' (columns: {', '.join(map(repr, columns))}); add the"
            " dataset name of each cell."
        )
    if INDEX_COLUMN not in columns and ID_COLUMN not in columns:
        raise ArgumentError(
            f"{option} {path}: line 1 has neither a 'cell' column (0-based index of the cell within its dataset)"
            " nor a 'cell_id' column (the shards' cell_ids); add one of them."
        )
    if len(records) == 1:
        raise ArgumentError(f"{option} {path}: the table has a header but no row; add one row per cell.")
    key = INDEX_COLUMN if INDEX_COLUMN in columns else ID_COLUMN
    rows: dict[tuple[str, str], dict[str, str]] = {}
    lines: dict[tuple[str, str], int] = {}
    for line, record in enumerate(records[1:], start=2):
        if len(record) != len(columns):
            raise ArgumentError(
                f"{option} {path}: line {line} has {len(record)} fields, the header {len(columns)}; give every row"
                " one value per column (empty for none)."
            )
        values = dict(zip(columns, record, strict=True))
        for name in (DATASET_COLUMN, key):
            if values[name] == "":
                raise ArgumentError(
                    f"{option} {path}: line {line}, column {name!r} is empty; every row names its cell."
                )
        if key == INDEX_COLUMN:
            values[key] = _cell_index(values[key], path, line, option)
        cell = (values[DATASET_COLUMN], values[key])
        if cell in rows and rows[cell] != values:
            differing = next(name for name in columns if rows[cell][name] != values[name])
            raise ArgumentError(
                f"{option} {path}: lines {lines[cell]} and {line} both describe dataset {cell[0]!r} {key} {cell[1]}"
                f" with different values (column {differing!r}: {rows[cell][differing]!r} and {values[differing]!r});"
                " keep one row per cell."
            )
        rows.setdefault(cell, values)
        lines.setdefault(cell, line)
    return CellTable(str(path), columns, key, rows, lines)


_DIGITS = re.compile(r"[0-9]+")


def _cell_index(text: str, path: str | os.PathLike[str], line: int, option: str) -> str:
    """A `cell` field (the ASCII digits 0-9 alone) as the text of its whole number, or ArgumentError naming the
    line. Python's int() would also take `1_0`, `+3`, ` 4 ` and other scripts' digits."""
    if not _DIGITS.fullmatch(text):
        raise ArgumentError(
            f"{option} {path}: line {line}, column 'cell': {text!r} is not a cell index (a whole number >= 0 in the"
            " digits 0-9 alone, the cell's position within its dataset, from 0); fix the value, or use a 'cell_id'"
            " column instead."
        )
    return str(int(text))


def check_group_column(table: CellTable, column: str) -> None:
    """ArgumentError unless `column` is one of the table's columns other than its keys."""
    choices = [name for name in table.columns if name not in (DATASET_COLUMN, table.key)]
    if column not in choices:
        listed = ", ".join(map(repr, choices)) or "none"
        raise ArgumentError(
            f"--group-by {column!r}: --cells {table.path} has no such column to group by (its columns: {listed})."
        )


def grouping_table(cells: str | os.PathLike[str] | None, group_by: str | None) -> CellTable | None:
    """The cell table of `cells`, checked to hold the column `group_by`; None when neither is given.

    Called before any shard is read, so that a bad table or option costs no merge."""
    if (cells is None) != (group_by is None):
        raise ArgumentError(
            "cells and group_by (--cells and --group-by) go together: the cell table, and the column of it to group by."
        )
    if cells is None or group_by is None:
        return None
    table = load_cell_table(cells)
    check_group_column(table, group_by)
    return table


REASON_COLUMN = "reason"


def load_exclusions(path: str | os.PathLike[str] | None) -> Exclusions | None:
    """The cells to leave out of every number (`--exclude-cells`): a cell table (`load_cell_table`) with the columns
    dataset, cell or cell_id, and an optional reason; ArgumentError naming the file and what is wrong otherwise.

    Args:
        path: the CSV table (None: no exclusions).

    Returns:
        The exclusions, which `ScoreSettings(exclusions=...)` applies; None without a table.
    """
    if path is None:
        return None
    table = load_cell_table(path, "--exclude-cells")
    extra = [name for name in table.columns if name not in (DATASET_COLUMN, INDEX_COLUMN, ID_COLUMN, REASON_COLUMN)]
    if extra:
        raise ArgumentError(
            f"--exclude-cells {path}: line 1 names the column {extra[0]!r}; the table has the columns dataset, cell"
            " (or cell_id) and an optional reason."
        )
    cells = tuple((dataset, key, row.get(REASON_COLUMN, "")) for (dataset, key), row in sorted(table.rows.items()))
    return Exclusions(str(path), table.key, cells)


@dataclass(frozen=True)
class CellGroups:
    """Each cell's group: per dataset of a run, one value per cell (None: the group null)."""

    column: str
    values: dict[str, np.ndarray]
    """Dataset name → object array with the group value of each cell, in cell order."""
    warnings: list[str]
    """Cells of the table not in the run, and cells of the run not in the table (then in the group null)."""

    @property
    def order(self) -> list[str | None]:
        """The group values in the order they are shown: numbers by value when all are numbers, else text order;
        null last."""
        found: set[str] = {value for values in self.values.values() for value in values.tolist() if value is not None}
        numeric = all(_is_number(value) for value in found)
        ordered = sorted(found, key=lambda value: (float(value), value)) if numeric else sorted(found)
        has_null = any(value is None for values in self.values.values() for value in values.tolist())
        return ordered + [None] * has_null


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def cell_groups(table: CellTable, scored: ScoredRun, column: str) -> CellGroups:
    """Assign every cell of `scored` the value of `column` in `table`: per dataset an array of values.

    Cells are matched by index (`cell`) or by id (`cell_id`: the table's text equal to the text of the shards'
    id, so `07` and `1_05` are not 7 and 105). An empty value, and a cell the table lacks, are the group null;
    table rows naming a cell the run does not have are not used. Both kinds are named in `warnings`. With both
    `cell` and `cell_id` columns, a row whose cell_id differs from the shards' id of that cell is an ArgumentError.
    """
    check_group_column(table, column)
    values: dict[str, np.ndarray] = {}
    used: set[tuple[str, str]] = set()
    missing: list[tuple[str, np.ndarray]] = []
    keys_of: dict[str, list[str]] = {}
    for name, key in table.rows:
        keys_of.setdefault(name, []).append(key)
    for dataset in scored.datasets:
        keys = keys_of.get(dataset.name, [])
        positions = _positions(table, dataset, keys)
        found = np.full(dataset.n_cells, None, dtype=object)
        seen = np.zeros(dataset.n_cells, dtype=bool)
        for key in keys:
            if key not in positions:
                continue
            cell, index = (dataset.name, key), positions[key]
            row = table.rows[cell]
            _check_cell_id(table, cell, row, dataset, index)
            found[index] = row[column] if row[column] != "" else None
            seen[index] = True
            used.add(cell)
        values[dataset.name] = found
        if not seen.all():
            missing.append((dataset.name, np.flatnonzero(~seen)))
    unused = [cell for cell in table.rows if cell not in used]
    warnings = []
    if unused:
        named = ", ".join(f"dataset {name!r} {table.key} {key}" for name, key in unused[:CELLS_NAMED])
        more = f" and {len(unused) - CELLS_NAMED} more" if len(unused) > CELLS_NAMED else ""
        warnings.append(
            f"--cells {table.path}: {_cells(len(unused))} of the table {'is' if len(unused) == 1 else 'are'} not in"
            f" the run, so not used: {named}{more}."
        )
    if missing:
        total = sum(len(cells) for _, cells in missing)
        named = "; ".join(
            f"dataset {name!r} cell {', '.join(map(str, cells[:CELLS_NAMED].tolist()))}"
            + (f" (+{len(cells) - CELLS_NAMED} more)" if len(cells) > CELLS_NAMED else "")
            for name, cells in missing
        )
        warnings.append(
            f"--cells {table.path}: {_cells(total)} of the run {'is' if total == 1 else 'are'} not in the table, so in"
            f" the group null of {column!r}: {named}."
        )
    return CellGroups(column, values, warnings)


def _cells(count: int) -> str:
    return f"{count} cell{'' if count == 1 else 's'}"


def _positions(table: CellTable, dataset: ScoredDataset, keys: list[str]) -> dict[str, int]:
    """The table's `keys` of `dataset` → cell index: the indices themselves, or the cells whose shards' id has
    exactly that text. Two distinct keys never name one cell: `cell` keys are normalised when read, and two ids of
    one text cannot name one cell, so they are left out and their rows reported as not in the run."""
    if table.key == INDEX_COLUMN:
        return {key: int(key) for key in keys if int(key) < dataset.n_cells}
    texts = [_id_text(cell_id) for cell_id in dataset.cell_ids.tolist()]
    counts = Counter(texts)
    return {text: index for index, text in enumerate(texts) if counts[text] == 1}


def _id_text(cell_id: Any) -> str:
    return cell_id.decode() if isinstance(cell_id, bytes) else str(cell_id)


def _check_cell_id(
    table: CellTable, cell: tuple[str, str], row: dict[str, str], dataset: ScoredDataset, index: int
) -> None:
    """With both `cell` and `cell_id` columns, the row's cell_id must be the shards' id of that cell."""
    if table.key != INDEX_COLUMN or ID_COLUMN not in row or row[ID_COLUMN] == "":
        return
    actual = _id_text(dataset.cell_ids[index])
    if row[ID_COLUMN] != actual:
        raise ArgumentError(
            f"--cells {table.path}: line {table.lines[cell]}, column 'cell_id': {row[ID_COLUMN]!r}, but cell {index}"
            f" of dataset {dataset.name!r} has cell_id {actual!r} in the shards; fix the row, or leave out one of the"
            " columns 'cell' and 'cell_id'."
        )


@dataclass(frozen=True)
class GroupScore:
    """One group's numbers: `dataset` None for the group over all datasets, `value` None for the group null.

    `numbers` is a `ScoredDataset` (the group's cells of one dataset) or an `Overall` (over all datasets): the
    views read the same metric names from it as from a dataset or the run's overall."""

    dataset: str | None
    column: str
    value: str | None
    numbers: ScoredDataset | Overall

    @property
    def cells(self) -> dict[str, int]:
        return self.numbers.cells


@dataclass(frozen=True)
class GroupScores:
    """Every group of one column: per dataset and value first (dataset order, then value order), then per value
    over all datasets."""

    column: str
    groups: list[GroupScore]
    warnings: list[str]


def score_groups(scored: ScoredRun, groups: CellGroups) -> GroupScores:
    """Every metric of every (dataset, value) with cells, and of every value over all datasets.

    A (dataset, value) is scored as a dataset of those cells is; a value over all datasets as the run's overall is
    (`overall_of`): its bps is the mean of its datasets' bps, its pooled numbers pool all its cells.
    """
    clamp = scored.settings.clamp_negative
    order = groups.order
    per_value: dict[str | None, list[ScoredDataset]] = {value: [] for value in order}
    rows = []
    for dataset in scored.datasets:
        values = groups.values[dataset.name].tolist()
        for value in order:
            cells = np.array([index for index, found in enumerate(values) if found == value], dtype=np.int64)
            if len(cells) == 0:
                continue
            part = select_cells(dataset, cells, clamp)
            per_value[value].append(part)
            rows.append(GroupScore(dataset.name, groups.column, value, part))
    rows += [GroupScore(None, groups.column, value, overall_of(per_value[value], clamp)) for value in order]
    return GroupScores(groups.column, rows, groups.warnings)


def group_run(scored: ScoredRun, table: CellTable | str | os.PathLike[str], column: str) -> GroupScores:
    """`score_groups` of `scored` by `column` of `table` (a `CellTable`, or the path of one)."""
    if isinstance(table, (str, os.PathLike, Path)):
        table = load_cell_table(table)
    return score_groups(scored, cell_groups(table, scored, column))
