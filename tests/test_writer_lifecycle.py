"""A ShardWriter left open when the interpreter exits: its temporary file is deleted, and the process exits
at once with its own exit code, whether the script ended, raised, called sys.exit, or was sent SIGTERM.

The training script is a real process (`tests/writer_exit_process.py`), synchronous and background.
An open background writer used to hang the interpreter at shutdown in h5py's lock (or crash it), and
an open synchronous one left its temporary file behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_writer_faults import REPO

EXIT_CODES = {"end": 0, "raise": 1, "exit": 7, "sigterm": 143}
EXIT_WITHIN = 2.0
"""Seconds from the end of the script (or the signal) to the end of the process."""


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize("how", list(EXIT_CODES))
def test_an_open_writer_at_interpreter_exit_is_discarded_and_the_process_exits_with_its_own_code(
    tmp_path, how, background
):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "tests.writer_exit_process", str(run), how] + (["bg"] if background else [])
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stderr is not None
        reached = child.stdout.readline().strip()  # the script reached its end, or is writing (sigterm)
        if how == "sigterm" and reached == "writing":
            child.send_signal(signal.SIGTERM)  # while batches are being written: inside HDF5 too, at times
        try:
            code = child.wait(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the process was still running {EXIT_WITHIN} s after the script's end ({reached!r})")
        stderr = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert reached == ("writing" if how == "sigterm" else "ending"), stderr
    assert code == EXIT_CODES[how], stderr
    assert [path.name for path in Path(run).rglob("*") if path.is_file()] == []  # no .tmp file, no shard
    if how == "raise":  # the script's own traceback, and nothing else
        assert stderr.count("Traceback") == 1 and stderr.rstrip().endswith("RuntimeError: validation crashed"), stderr
    else:
        assert stderr == ""
