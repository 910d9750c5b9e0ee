"""The side-file rule (`bpseval._sidefiles`): every file bpseval reads besides shards is a regular file of bounded
size, JSON of bounded nesting, or one error naming it: never a hang, never a traceback.

Merge-cache entries are in `test_cache.py`, numba's cache files in `test_compiled_kernel.py`; here, the files a user
names (`--baseline`, `--cells`), through the command line in processes of their own (a hang fails after 5 minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bpseval._sidefiles import DOCUMENT_BYTES, DOCUMENT_DEPTH, SideFileError, parse_json, read_bytes, read_json
from tests.test_steps import write_step

REPO = Path(__file__).resolve().parents[1]


def bpseval_cli(*arguments: str | Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    command = [sys.executable, "-m", "bpseval", *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, check=False, timeout=300)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def huge(path: Path) -> Path:
    """A sparse file one byte larger than a document can be (no disk space used)."""
    with open(path, "wb") as stream:
        stream.truncate(DOCUMENT_BYTES + 1)
    return path


def nested(path: Path) -> Path:
    """Valid JSON nested 100,000 levels deep: json's parser raised RecursionError on it (a traceback, exit 1)."""
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


USER_FILES = {
    "a FIFO": (fifo, "not a regular file (a FIFO)"),
    "a character device (/dev/zero)": (lambda path: Path("/dev/zero"), "not a regular file (a character device)"),
    "a sparse file of 256 MiB and a byte": (huge, "256.0 MiB, more than the 256.0 MiB this file can hold"),
}


@pytest.mark.parametrize("kind", [*USER_FILES, "JSON nested 100,000 deep"])
def test_a_baseline_that_is_not_a_regular_bounded_document_exits_2_naming_it(tmp_path, kind):
    run = tmp_path / "run"
    write_step(run, 0)
    make, reason = USER_FILES.get(kind, (nested, f"nested 100000 levels deep, more than the {DOCUMENT_DEPTH}"))
    baseline = make(tmp_path / "base.json")
    result = bpseval_cli("compare", run, "--baseline", baseline, "--no-cache")
    assert result.returncode == 2, result.stderr
    assert f"Error: {baseline}: cannot read the baseline ({reason}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", list(USER_FILES))
def test_a_cells_table_that_is_not_a_regular_bounded_file_exits_2_naming_it(tmp_path, kind):
    run = tmp_path / "run"
    write_step(run, 0)
    make, reason = USER_FILES[kind]
    table = make(tmp_path / "cells.csv")
    result = bpseval_cli("compute", run, "--cells", table, "--group-by", "area", "--no-cache")
    assert result.returncode == 2, result.stderr
    assert f"Error: --cells {table}: cannot be read as a UTF-8 CSV table ({reason}" in result.stderr
    assert "Traceback" not in result.stderr


def test_read_bytes_takes_regular_files_up_to_the_limit(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x" * 10)
    assert read_bytes(path, 10) == b"x" * 10
    with pytest.raises(SideFileError, match="10 bytes, more than the 9 bytes") as error:
        read_bytes(path, 9)
    assert not error.value.missing and str(error.value).startswith(f"{path}: ")
    for missing in (tmp_path / "none", path / "below a file"):
        with pytest.raises(SideFileError) as error:
            read_bytes(missing, 10)
        assert error.value.missing
    with pytest.raises(SideFileError, match=r"not a regular file \(a directory\)"):
        read_bytes(tmp_path, 10)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert read_bytes(link, 10) == b"x" * 10  # a link to a regular file is that file


def test_nesting_is_counted_outside_strings_only(tmp_path):
    text = '{"a": "[[[[{{{{", "b": "\\\\\\"[[[[", "c": [1, {"d": []}]}'
    assert parse_json(text, 4, "text") == {"a": "[[[[{{{{", "b": '\\"[[[[', "c": [1, {"d": []}]}
    with pytest.raises(SideFileError, match="nested 4 levels deep, more than the 3"):
        parse_json(text, 3, "text")
    path = tmp_path / "doc.json"
    path.write_bytes(b'{"a": NaN, "b": 1}')
    assert read_json(path, 100, 1, parse_constant=lambda token: token) == {"a": "NaN", "b": 1}
    for content, reason in ((b"\xff{}", "not utf-8 text"), (b"{", "not JSON"), (b"1" * 5000, "not JSON")):
        path.write_bytes(content)
        with pytest.raises(SideFileError, match=reason):
            read_json(path, 10_000, 1)
