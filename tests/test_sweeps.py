"""Sweeps (`compute RUN...`) score every run they can; files under a run that are not shards are skipped, not fatal."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import bpseval
from bpseval import ShardWriter
from bpseval.run.catalog import RunCatalog
from tests.conftest import poisson_dataset, table_rows, write_raw_shard


def write_run(run: Path, world_size: int = 2, ranks: tuple[int, ...] | None = None, seed: int = 0) -> Path:
    """A run of one step; `ranks` (default all) is which ranks have written their shard so far."""
    for rank in range(world_size) if ranks is None else ranks:
        with ShardWriter(run, rank, world_size) as writer:
            writer.add("d", **poisson_dataset(seed + rank), sample_idx=np.arange(40) + 40 * rank)
    return run


def sweep(root: Path) -> list[Path]:
    """Runs a, c scored; b a job still on its first validation (rank 1 missing); as `runs/*` would list them."""
    write_run(root / "a", seed=0)
    write_run(root / "b", ranks=(0,), seed=10)
    write_run(root / "c", seed=20)
    return sorted(root.iterdir())


def test_compute_shows_every_run_it_can_then_exits_2_naming_the_one_it_cannot(invoke, tmp_path):
    runs = sweep(tmp_path / "runs")
    json_path, csv_path = tmp_path / "out.json", tmp_path / "out.csv"
    result = invoke("compute", *runs, "--json", json_path, "--csv", csv_path, "--no-cache")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert str(runs[0]) in result.stdout and str(runs[2]) in result.stdout  # the table of the good runs
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert f"{runs[1]}: not scored: step 0 has world size 2 but no shard for rank 1" in errors[0]

    document = json.loads(json_path.read_text())
    assert [entry["run"] for entry in document["runs"]] == [str(run) for run in runs]
    good, bad = document["runs"][0], document["runs"][1]
    assert "error" not in good and good["overall"]["bps"] == pytest.approx(bpseval.evaluate(runs[0]).overall.bps)
    assert set(bad) == {"run", "error"} and "no shard for rank 1" in bad["error"]

    with csv_path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["run"] for row in rows] == [str(runs[0]), str(runs[2]), str(runs[1])]  # the failed run last
    assert rows[2]["error"].startswith(f"{runs[1]}: step 0 has world size 2") and rows[2]["bps"] == ""
    assert rows[0]["error"] == "" and float(rows[0]["bps"]) == pytest.approx(good["overall"]["bps"])


def test_json_on_stdout_holds_every_run_and_the_errors_go_to_stderr(invoke, tmp_path):
    runs = sweep(tmp_path / "runs")
    result = invoke("compute", *runs, "--json", "-", "--sort", "bps")
    assert result.exit_code == 2, result.output
    entries = json.loads(result.stdout)["runs"]
    assert ["error" in entry for entry in entries] == [False, True, False]
    assert "Error: " in result.stderr and str(runs[1]) in result.stderr


def test_a_sweep_where_no_run_can_be_scored_names_each_and_exits_2(invoke, tmp_path):
    runs = [write_run(tmp_path / "x", ranks=(0,)), tmp_path / "missing"]
    result = invoke("compute", *runs, "--json", "-")
    assert result.exit_code == 2, result.output
    assert [entry["run"] for entry in json.loads(result.stdout)["runs"]] == [str(run) for run in runs]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and "no shard for rank 1" in errors[0] and "no such directory" in errors[1]
    table = invoke("compute", *runs)  # a row per run, its reason last
    assert table.exit_code == 2 and [row[0] for row in table_rows(table.stdout)] == [str(run) for run in runs]
    assert [row[-1] for row in table_rows(table.stdout)] == [error.split("not scored: ")[1] for error in errors]


def test_one_run_that_cannot_be_scored_is_still_one_error_and_nothing_else(invoke, tmp_path):
    result = invoke("compute", write_run(tmp_path / "x", ranks=(0,)), "--json", "-")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and "no shard for rank 1" in result.stderr


def foreign_files(run: Path) -> list[Path]:
    """A mask file (HDF5 without a 'format' attribute), a text file named .h5, and an HDF5 file in a subfolder."""
    with h5py.File(run / "masks.h5", "w") as handle:
        handle["dfs"] = np.ones((40, 6))
    (run / "notes.h5").write_text("not HDF5 at all")
    (run / "extra").mkdir()
    write_raw_shard(run / "extra" / "model.h5", {}, attrs={"format": "something-else"})
    return [run / "extra" / "model.h5", run / "masks.h5", run / "notes.h5"]


def test_files_that_are_not_shards_are_skipped_with_one_warning_naming_them(invoke, tmp_path):
    run = write_run(tmp_path / "run")
    expected = bpseval.evaluate(run).overall.bps
    skipped = foreign_files(run)
    result = invoke("compute", run, "--no-cache")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1
    for path, why in zip(
        skipped,
        ("root attribute 'format' is 'something-else'", "no root attribute 'format'", "not an HDF5 file"),
        strict=True,
    ):
        assert f"{path} ({why})" in warnings[0]
    assert bpseval.evaluate(run).overall.bps == expected
    for arguments in (
        ("coverage", run, "--min-samples", "0"),
        ("baseline", run, "-o", tmp_path / "b.json"),
        ("compare", run, "--baseline", run),
        ("compute", run, "--all-steps"),
    ):
        outcome = invoke(*arguments)
        assert outcome.exit_code == 0, (arguments, outcome.output)
    all_steps = invoke("compute", run, "--all-steps", "--json", "-")
    said = [line for line in all_steps.stderr.splitlines() if line.startswith("Warning:") and "skipped" in line]
    assert len(said) == 1 and all(str(path) in said[0] for path in skipped)  # once, not once per step
    assert json.loads(all_steps.stdout)["notes"] == [said[0].removeprefix("Warning: ")]
    catalog = RunCatalog.scan(run, jobs=2)  # the errors come back from the header-reading children intact
    assert [problem.path for problem in catalog.skipped] == skipped and not catalog.problems
    assert [problem.reason for problem in catalog.skipped][2] == "not an HDF5 file"


def test_doctor_lists_skipped_files_without_calling_the_run_unhealthy(invoke, tmp_path):
    run = write_run(tmp_path / "run")
    skipped = foreign_files(run)
    result = invoke("doctor", run)
    assert result.exit_code == 0, result.output
    assert "healthy" in result.stdout
    for path in skipped:
        assert f"{path}: skipped, not a bpseval shard" in result.stdout
    document = json.loads(invoke("doctor", run, "--json", "-").stdout)
    assert [entry["path"] for entry in document["skipped"]] == [str(path) for path in skipped]
    assert document["skipped"][1]["reason"] == "no root attribute 'format'" and document["problems"] == []


def _text_named_like_a_shard(run: Path) -> Path:
    path = run / "rank3.h5"
    path.write_text("x")
    return path


def _damaged_shard(run: Path) -> Path:
    """Claims the format, but its rank is text."""
    return write_raw_shard(run / "other.h5", {}, attrs={"rank": "zero"})


def _truncated_hdf5(run: Path) -> Path:
    """An HDF5 file cut short: whether it was a shard cannot be told."""
    path = write_raw_shard(run / "other.h5", {"d": poisson_dataset(1)}, attrs={"format": None})
    path.write_bytes(path.read_bytes()[:1500])
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_text_named_like_a_shard, "cannot be read as an HDF5 file"),
        (lambda run: write_raw_shard(run / "Rank_7.h5", {}, attrs={"format": None}), "not a bpseval shard"),
        (
            lambda run: write_raw_shard(run / "step-000000" / "mask.h5", {}, attrs={"format": None}),
            "not a bpseval shard",
        ),
        (_damaged_shard, "attribute 'rank' must be an integer"),
        (_truncated_hdf5, "cannot be read as an HDF5 file"),
    ],
    ids=[
        "named like a shard, not HDF5",
        "named like a shard, no format",
        "in a step folder",
        "claims the format",
        "truncated HDF5",
    ],
)
def test_files_named_like_shards_or_claiming_the_format_are_still_errors(invoke, tmp_path, make, fragment):
    run = write_run(tmp_path / "run", world_size=1)
    path = make(run)
    result = invoke("compute", run)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and str(path) in result.stderr and fragment in result.stderr
    assert "Traceback" not in result.output


def test_a_run_of_foreign_files_only_has_no_shards_and_says_what_was_skipped(invoke, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    skipped = foreign_files(run)
    result = invoke("compute", run)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"Error: {run}: no shards found; skipped 3 files that are not a bpseval shard")
    assert all(str(path) in result.stderr for path in skipped)
    assert invoke("doctor", run).exit_code == 2


def test_every_merging_command_says_what_the_merge_passed_over_or_skipped(invoke, tmp_path):
    """coverage, baseline and compare used to drop the merge's warnings: a skipped file or a newer
    incomplete step passed over went unsaid there. (compare passes over a newer incomplete step only on
    the side of a baseline run directory, as `bpseval baseline` does: its run needs --step then.)"""
    run = write_run(tmp_path / "run")
    skipped = foreign_files(run)
    with ShardWriter(run, 0, 2, step=9) as writer:  # a newer step whose rank 1 has not written yet
        writer.add("d", **poisson_dataset(9))
    for arguments in (
        ("coverage", run, "--min-samples", "0", "--json", tmp_path / "c.json"),
        ("baseline", run, "-o", tmp_path / "b.json"),
        ("compare", run, "--step", "0", "--baseline", run, "--json", tmp_path / "r.json"),
    ):
        result = invoke(*arguments, "--no-cache")
        assert result.exit_code == 0, (arguments, result.output)
        warnings = "\n".join(line for line in result.stderr.splitlines() if line.startswith("Warning:"))
        assert "step 9 is incomplete" in warnings and str(skipped[0]) in warnings, (arguments, result.stderr)
    assert any("step 9 is incomplete" in line for line in json.loads((tmp_path / "c.json").read_text())["warnings"])
    compared = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert any(line.startswith(f"{run}: step 9 is incomplete") for line in compared)
