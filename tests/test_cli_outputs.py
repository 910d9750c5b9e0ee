"""Output options behave the same in every command: paths checked before any shard is read, folders made,
`baseline --json`, GitHub's job summary, and path errors that say "file" or "directory" correctly."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpseval.errors import ArgumentError
from bpseval.views.files import check_outputs, destination, write_text
from tests.conftest import as_unprivileged, poisson_dataset, write_raw_shard

DAMAGED = "cannot be read as an HDF5 file"
REPO = Path(__file__).resolve().parents[1]
"""What every merging command says about the damaged shard below, had it been read."""


@pytest.fixture
def damaged_run(tmp_path: Path) -> Path:
    """A run whose only shard is not HDF5: reading it fails, so a path error that wins was found before any read."""
    run = tmp_path / "run"
    (run / "step-000000").mkdir(parents=True)
    (run / "step-000000" / "rank-0000.h5").write_text("not a shard")
    return run


@pytest.fixture
def good_run(tmp_path: Path) -> Path:
    run = tmp_path / "good"
    write_raw_shard(run / "step-000000" / "rank-0000.h5", {"A": poisson_dataset(1), "B": poisson_dataset(2)})
    return run


def _commands(run: Path, masks: Path, out: str) -> dict[str, list[str]]:
    """Every output option of every command, each writing to `out`."""
    return {
        "compute --json": ["compute", str(run), "--json", out],
        "compute --csv": ["compute", str(run), "--csv", out],
        "compute --all-steps --json": ["compute", str(run), "--all-steps", "--json", out],
        "compute --all-steps --csv": ["compute", str(run), "--all-steps", "--csv", out],
        "coverage --json": ["coverage", str(run), "--json", out],
        "coverage --csv": ["coverage", str(run), "--csv", out],
        "plan --json": ["plan", str(masks), "--json", out],
        "baseline -o": ["baseline", str(run), "-o", out],
        "baseline --json": ["baseline", str(run), "--json", out],
        "compare --json": ["compare", str(run), "--baseline", str(run), "--json", out],
        "compare --markdown": ["compare", str(run), "--baseline", str(run), "--markdown", out],
        "compare --junit": ["compare", str(run), "--baseline", str(run), "--junit", out],
        "doctor --json": ["doctor", str(run), "--json", out],
        "report -o": ["report", str(run), "-o", out],
    }


COMMANDS = list(_commands(Path(), Path(), ""))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_file_that_is_a_directory_fails_before_any_shard_is_read(invoke, tmp_path, damaged_run, command):
    masks = tmp_path / "masks.npy"
    masks.write_text("not a mask")  # plan would fail reading it, after the path check
    folder = tmp_path / "out"
    folder.mkdir()
    result = invoke(*_commands(damaged_run, masks, str(folder))[command])
    assert result.exit_code == 2, result.output
    assert f"{folder}: is a directory, not a file" in result.stderr
    assert DAMAGED not in result.stderr and "cannot be read as .npy" not in result.stderr
    assert result.stderr.count("Error:") == 1 and "Traceback" not in result.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_file_fails_before_any_shard_is_read(invoke, tmp_path, damaged_run, command):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    target = blocker / "sub" / "out.json"
    result = invoke(*_commands(damaged_run, tmp_path / "masks.npy", str(target))[command])
    assert result.exit_code == 2, result.output
    assert f"{target}: cannot be created, because {blocker} is a file, not a directory" in result.stderr
    assert DAMAGED not in result.stderr
    assert blocker.read_text() == "a file, not a folder"


def test_plot_folder_that_is_a_file_or_stdout_fails_before_any_shard_is_read(invoke, tmp_path, damaged_run):
    file = tmp_path / "pictures"
    file.write_text("x")
    result = invoke("plot", damaged_run, "-o", file)
    assert result.exit_code == 2 and f"-o/--output {file}: is not a directory (it is a file)" in result.stderr
    result = invoke("plot", damaged_run, "-o", "-")
    assert result.exit_code == 2 and "takes a folder, not stdout" in result.stderr
    assert DAMAGED not in result.stderr


def test_missing_output_folders_are_created_when_writing(invoke, tmp_path, good_run):
    json_path, csv_path = tmp_path / "a" / "b" / "r.json", tmp_path / "c" / "cells.csv"
    assert invoke("compute", good_run, "--json", json_path, "--csv", csv_path).exit_code == 0
    assert json.loads(json_path.read_text())["overall"]["cells"] and csv_path.read_text().startswith("dataset,")
    baseline = tmp_path / "ci" / "baseline.json"
    assert invoke("baseline", good_run, "-o", baseline).exit_code == 0
    assert json.loads(baseline.read_text())["format"] == "bpseval-baseline"


def test_a_failed_merge_leaves_no_output_folder_behind(invoke, tmp_path, damaged_run):
    result = invoke("compute", damaged_run, "--json", tmp_path / "new" / "r.json")
    assert result.exit_code == 2 and DAMAGED in result.stderr
    assert not (tmp_path / "new").exists()


def test_report_makes_missing_folders_and_writes_to_stdout(invoke, tmp_path, good_run):
    pytest.importorskip("matplotlib")
    output = tmp_path / "reports" / "today" / "r.html"
    result = invoke("report", good_run, "-o", output)
    assert result.exit_code == 0, result.output
    assert output.read_text().startswith("<!DOCTYPE html>") and f"written to {output}" in result.stdout
    result = invoke("report", good_run, "-o", "-")
    assert result.exit_code == 0 and result.stdout.startswith("<!DOCTYPE html>") and "written to -" in result.stderr


def test_two_outputs_to_one_place_exit_2(invoke, tmp_path, damaged_run):
    both = invoke("compute", damaged_run, "--json", "-", "--csv", "-")
    assert both.exit_code == 2 and "--json and --csv both write to stdout" in both.stderr
    (tmp_path / "link").symlink_to(tmp_path)
    alias = tmp_path / "link" / "out.xml"
    both = invoke("compare", damaged_run, "--baseline", damaged_run, "--json", tmp_path / "out.xml", "--junit", alias)
    assert both.exit_code == 2 and f"--json and --junit both write to {alias}" in both.stderr
    assert DAMAGED not in both.stderr


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["d", "e", "f", "g", "new", ".."]), min_size=1, max_size=4))
def test_check_outputs_accepts_a_path_exactly_when_it_can_be_written(parts):
    """Over paths through a small tree of files and folders: the check up front agrees with the write after."""
    with tempfile.TemporaryDirectory() as root:
        base = Path(root)
        (base / "d" / "e").mkdir(parents=True)
        (base / "f").write_text("file")
        (base / "d" / "g").write_text("file")
        path = str(base.joinpath(*parts))
        try:
            check_outputs({"--json": path})
        except ArgumentError as error:
            assert str(error).startswith(f"--json {path}: ")
            with pytest.raises(ArgumentError, match="cannot be written"):
                write_text("{}", path)
        else:
            write_text("{}", path)
            assert destination(path).read_text() == "{}\n"


# ----------------------------------------------------------------------------------------------
# baseline --json


def test_baseline_json_is_the_baseline_file_and_refuses_o_with_it(invoke, tmp_path, good_run):
    by_o, by_json = tmp_path / "o.json", tmp_path / "json.json"
    assert invoke("baseline", good_run, "-o", by_o).exit_code == 0
    result = invoke("baseline", good_run, "--json", by_json)
    assert result.exit_code == 0 and f"written to {by_json}" in result.stderr
    assert json.loads(by_json.read_text()) == json.loads(by_o.read_text())
    to_stdout = invoke("baseline", good_run, "--json", "-")
    assert to_stdout.exit_code == 0 and json.loads(to_stdout.stdout) == json.loads(by_o.read_text())
    both = invoke("baseline", good_run, "-o", tmp_path / "a.json", "--json", tmp_path / "b.json")
    assert both.exit_code == 2 and "-o and --json both name the baseline file" in both.stderr
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_baseline_defaults_to_baseline_json(invoke, tmp_path, good_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("baseline", good_run).exit_code == 0
    assert json.loads((tmp_path / "baseline.json").read_text())["format"] == "bpseval-baseline"


# ----------------------------------------------------------------------------------------------
# GitHub Actions job summary


def test_compare_appends_its_markdown_to_the_github_step_summary(invoke, tmp_path, good_run, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("# Earlier step output\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    markdown = tmp_path / "compare.md"
    result = invoke("compare", good_run, "--baseline", good_run, "--markdown", markdown)
    assert result.exit_code == 0, result.output
    assert summary.read_text() == "# Earlier step output\n\n" + markdown.read_text()
    notes = [line for line in result.stderr.splitlines() if "GITHUB_STEP_SUMMARY" in line]
    assert notes == [f"markdown summary appended to $GITHUB_STEP_SUMMARY ({summary})"]


def test_markdown_to_the_step_summary_itself_is_appended_once(invoke, tmp_path, good_run, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("# Earlier step output\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert invoke("compare", good_run, "--baseline", good_run, "--markdown", summary).exit_code == 0
    text = summary.read_text()
    assert text.startswith("# Earlier step output\n\n")
    first_line = text.splitlines()[2]
    assert first_line and text.count(first_line) == 1


def test_a_regression_is_still_written_to_the_step_summary(invoke, tmp_path, good_run, monkeypatch):
    worse = tmp_path / "worse"
    datasets = {name: poisson_dataset(seed) for name, seed in (("A", 1), ("B", 2))}
    for arrays in datasets.values():
        arrays["rhat"] = np.full_like(arrays["rhat"], arrays["rhat"].mean())  # the null model: bps 0
    write_raw_shard(worse / "step-000000" / "rank-0000.h5", datasets)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = invoke("compare", worse, "--baseline", good_run)
    assert result.exit_code == 1 and "Regression:" in result.stderr
    assert "regressed" in summary.read_text()


def test_a_step_summary_that_cannot_be_written_fails_before_merging(invoke, tmp_path, damaged_run, monkeypatch):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))
    result = invoke("compare", damaged_run, "--baseline", damaged_run)
    assert result.exit_code == 2 and f"$GITHUB_STEP_SUMMARY {tmp_path}: is a directory" in result.stderr
    assert DAMAGED not in result.stderr


def test_without_github_no_summary_is_written(invoke, tmp_path, good_run, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    result = invoke("compare", good_run, "--baseline", good_run)
    assert result.exit_code == 0 and "GITHUB_STEP_SUMMARY" not in result.stderr


# ----------------------------------------------------------------------------------------------
# Input paths: "file" and "directory" said correctly


def test_input_path_errors_say_file_or_directory(invoke, tmp_path):
    a_file, a_folder = tmp_path / "masks.npy", tmp_path / "run"
    np.save(a_file, np.ones((4, 2)))
    a_folder.mkdir()
    cases = {
        ("compute", a_file): f"{a_file}: is a file, not a directory. Pass the run directory",
        ("compute", tmp_path / "nope"): "nope: no such directory",
        ("plan", a_folder): f"{a_folder}: is a directory, not a file. Pass the mask file",
        ("plan", tmp_path / "nope.npy"): "nope.npy: no such file",
    }
    for (command, path), message in cases.items():
        result = invoke(command, path)
        assert result.exit_code == 2 and message in result.stderr, (command, path, result.stderr)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_plan_refuses_a_fifo_without_opening_it(invoke, tmp_path):
    fifo = tmp_path / "masks.npy"
    os.mkfifo(fifo)
    result = invoke("plan", fifo)
    assert result.exit_code == 2 and f"{fifo}: not a regular file" in result.stderr


def test_doctor_on_a_run_with_only_empty_step_folders_says_so(invoke, tmp_path):
    (tmp_path / "run" / "step-000003").mkdir(parents=True)
    result = invoke("doctor", tmp_path / "run")
    assert result.exit_code == 2 and result.stdout == ""
    assert "no shards found" in result.stderr and "its step folders hold none: step-000003" in result.stderr


def test_outputs_without_write_permission_fail_before_any_shard_is_read():
    """Run as user nobody when the tests run as root, who writes through any permission bits."""
    base = Path(f"/tmp/bpseval-locked-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    run, locked = base / "run" / "step-000000", base / "locked"
    run.mkdir(parents=True)
    (run / "rank-0000.h5").write_text("not a shard")
    locked.mkdir()
    (locked / "old.json").write_text("{}")
    (locked / "open.json").write_text("{}")
    try:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (locked / "old.json").chmod(0o444)
        (locked / "open.json").chmod(0o666)  # writable, but replacing it whole needs its folder writable too
        locked.chmod(0o555)
        environment = {**os.environ, "HOME": "/tmp", "PYTHONPATH": str(REPO)}
        command = as_unprivileged(
            [sys.executable, "-m", "bpseval", "compute", str(base / "run")], environment, "root writes anywhere"
        )

        def compute_to(target: Path) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*command, "--json", str(target)], capture_output=True, text=True, cwd="/", env=environment, check=False
            )

        missing, existing = compute_to(locked / "new" / "r.json"), compute_to(locked / "old.json")
        assert missing.returncode == 2 and f"the directory {locked} is not writable" in missing.stderr, missing.stderr
        assert existing.returncode == 2 and "the file exists and cannot be written" in existing.stderr, existing.stderr
        writable = compute_to(locked / "open.json")
        assert writable.returncode == 2, writable.stderr
        assert f"the file is replaced whole, and its directory {locked} is not writable" in writable.stderr
        assert DAMAGED not in missing.stderr + existing.stderr + writable.stderr
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# An output is never an input: a shard of the run, the baseline, the --cells table, the masks


INPUT_REFUSED = "an output never overwrites an input: pass another path."


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_that_is_an_input_fails_before_any_shard_is_read(invoke, tmp_path, damaged_run, command):
    """Each output option pointed at a shard of the run (plan: at its mask file) overwrote it and exited 0."""
    shard = damaged_run / "step-000000" / "rank-0000.h5"
    masks = tmp_path / "masks.npy"
    masks.write_text("not a mask")
    target = masks if command.startswith("plan") else shard
    result = invoke(*_commands(damaged_run, masks, str(target))[command])
    assert result.exit_code == 2, result.output
    what = "the input mask file" if command.startswith("plan") else f"a shard of the input run directory {damaged_run}"
    assert f"{target}: is {what}; {INPUT_REFUSED}" in result.stderr
    assert DAMAGED not in result.stderr and "cannot be read as .npy" not in result.stderr
    assert shard.read_text() == "not a shard" and masks.read_text() == "not a mask"


def test_another_spelling_of_a_shard_is_caught_and_so_is_a_new_file_named_like_one(invoke, tmp_path, damaged_run):
    shard = damaged_run / "step-000000" / "rank-0000.h5"
    (tmp_path / "alias").symlink_to(damaged_run)
    hard_link = tmp_path / "copy.json"
    os.link(shard, hard_link)
    for spelling in (tmp_path / "alias" / "step-000000" / "rank-0000.h5", hard_link):
        result = invoke("compute", damaged_run, "--json", spelling)
        assert result.exit_code == 2, result.output
        assert f"{spelling}: is a shard of the input run directory {damaged_run} (the same file as {shard})" in (
            result.stderr
        )
    lexical = damaged_run / "new" / ".." / "step-000000" / "rank-0000.h5"  # `new` is missing: `..` steps back
    result = invoke("compute", damaged_run, "--csv", lexical)
    assert result.exit_code == 2 and f"{lexical}: is a shard of the input run directory {damaged_run};" in result.stderr
    new = damaged_run / "step-000000" / "rank-0001.h5"
    result = invoke("baseline", damaged_run, "-o", new)
    assert result.exit_code == 2 and f"-o/--output {new}: is inside the input run directory" in result.stderr
    assert "with a shard's name (.h5), so it would be read as a shard of the run" in result.stderr
    assert not new.exists() and shard.read_text() == "not a shard" and DAMAGED not in result.stderr


@pytest.mark.parametrize("option", ["--json", "--markdown", "--junit", "$GITHUB_STEP_SUMMARY"])
def test_compare_never_writes_over_its_baseline(invoke, tmp_path, damaged_run, monkeypatch, option):
    """`compare --baseline X --json X` (or --markdown, --junit, GITHUB_STEP_SUMMARY=X) overwrote the baseline."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text('{"format": "bpseval-baseline"}')
    (tmp_path / "alias").symlink_to(tmp_path)
    spelled = tmp_path / "alias" / "baseline.json"
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    arguments = ["compare", damaged_run, "--baseline", baseline]
    if option == "$GITHUB_STEP_SUMMARY":
        monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(spelled))
    else:
        arguments += [option, spelled]
    result = invoke(*arguments)
    assert result.exit_code == 2, result.output
    assert (
        f"{option} {spelled}: is the input --baseline (the same file as {baseline}); {INPUT_REFUSED}" in result.stderr
    )
    assert baseline.read_text() == '{"format": "bpseval-baseline"}' and DAMAGED not in result.stderr


@pytest.mark.parametrize("command", ["compute --csv", "compare --markdown", "report -o"])
def test_no_output_writes_over_the_cells_table(invoke, tmp_path, damaged_run, command):
    table = tmp_path / "cells.csv"
    table.write_text("dataset,cell,area\nA,0,V1\n")
    name, option = command.split()
    baseline = ["--baseline", str(damaged_run)] if name == "compare" else []
    result = invoke(name, damaged_run, *baseline, "--cells", table, option, table)
    assert result.exit_code == 2, result.output
    assert f"{table}: is the input --cells; {INPUT_REFUSED}" in result.stderr
    assert table.read_text() == "dataset,cell,area\nA,0,V1\n" and DAMAGED not in result.stderr


# ----------------------------------------------------------------------------------------------
# Files are written whole or not at all


def _with_file_size_limit(limit: int) -> Callable[[], None]:
    """For subprocess' preexec_fn: files of at most `limit` bytes, and a write past it fails (EFBIG), as a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed rather than told
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_that_fails_leaves_the_old_file_as_it_was_and_no_temporary_file(tmp_path, good_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").write_text("the earlier result\n")
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    for option, path in (("--json", out / "r.json"), ("--csv", out / "new.csv")):
        completed = subprocess.run(
            [sys.executable, "-m", "bpseval", "compute", str(good_run), "--no-cache", option, str(path)],
            capture_output=True,
            text=True,
            env=environment,
            preexec_fn=_with_file_size_limit(1000),
            check=False,
        )
        assert completed.returncode == 2, completed.stderr
        assert f"Error: {path}: cannot be written (File too large)" in completed.stderr
        assert "Traceback" not in completed.stderr
    assert sorted(path.name for path in out.iterdir()) == ["r.json"]  # no temporary file, no half a CSV
    assert (out / "r.json").read_text() == "the earlier result\n"


def test_tensorboard_files_that_cannot_be_written_exit_2_naming_the_folder(tmp_path, good_run):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    completed = subprocess.run(
        [sys.executable, "-m", "bpseval", "compute", str(good_run), "--no-cache", "--tensorboard", str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=_with_file_size_limit(100),
        check=False,
    )
    assert completed.returncode == 2, completed.stderr  # TensorBoard's writing thread prints its own traceback first
    assert f"Error: {folder}: TensorBoard event files cannot be written there (File too large)" in completed.stderr


def test_a_replaced_output_keeps_its_permissions_and_a_symlink_to_it_stays(invoke, tmp_path, good_run):
    out = tmp_path / "out"
    out.mkdir()
    real, link = out / "r.json", out / "link.json"
    real.write_text("old")
    real.chmod(0o640)
    owner = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())  # root writes a user's file
    os.chown(real, *owner)
    link.symlink_to(real.name)
    assert invoke("compute", good_run, "--json", link).exit_code == 0
    assert link.is_symlink() and json.loads(real.read_text())["overall"]["cells"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o640 and (real.stat().st_uid, real.stat().st_gid) == owner
    assert sorted(path.name for path in out.iterdir()) == ["link.json", "r.json"]
    summary = out / "summary.md"
    summary.write_text("# before\n")
    write_text("after", summary, append=True)
    assert summary.read_text() == "# before\nafter\n"
