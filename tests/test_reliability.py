"""Reliability: killed writers, concurrent readers, hostile files, shared filesystems, `bpseval doctor`."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import bpseval
from bpseval import ShardWriter
from bpseval.shard.reader import read_header
from tests.conftest import as_unprivileged, poisson_dataset, table_rows, write_raw_shard
from tests.writer_process import write_rank

REPO = Path(__file__).resolve().parents[1]


def start_writer(run_dir: Path, rank: int, world_size: int, step: int, pause: float = 0.0) -> subprocess.Popen:
    """A writer process (tests/writer_process.py); it prints "writing" once its temporary file is open."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.writer_process", str(run_dir), str(rank), str(world_size), str(step), str(pause)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def expected_result(tmp_path: Path, world_size: int, step: int) -> bpseval.Result:
    """The numbers of a step written to completion, without interruption."""
    reference = tmp_path / f"reference-{world_size}-{step}"
    for rank in range(world_size):
        write_rank(str(reference), rank, world_size, step)
    return bpseval.evaluate(reference)


def test_killed_writers_never_leave_a_partial_shard(invoke, tmp_path):
    """At least 50 writers killed with SIGKILL while writing: every visible shard is whole; re-runs succeed. Rounds
    go on until 50 kills (at most 12): on a loaded machine more writers finish before their kill."""
    assert kill_writers(invoke, tmp_path, rounds=12, seed=0, enough=50) >= 50


@pytest.mark.soak
def test_killed_writers_soak(invoke, tmp_path):
    """The same with 40 rounds (about 600 kills): `python -m pytest -m soak`."""
    assert kill_writers(invoke, tmp_path, rounds=40, seed=1) >= 500


def kill_writers(invoke, tmp_path: Path, rounds: int, seed: int, enough: int | None = None) -> int:
    """Start 8 two-rank runs per round, SIGKILL their writers at random points, check, re-run; returns the kills
    (after at most `rounds` rounds, or the round that reaches `enough` kills)."""
    rng = random.Random(seed)
    expected = expected_result(tmp_path, 2, 0).to_dict()
    kills = 0
    for round_ in range(rounds):
        runs = [tmp_path / f"round{round_}-run{i}" for i in range(8)]
        writers = [start_writer(run, rank, 2, 0, pause=0.01) for run in runs for rank in range(2)]
        for process in writers:
            assert process.stdout.readline().strip() == "writing"
        for process in rng.sample(writers, len(writers)):
            time.sleep(rng.uniform(0.0, 0.03))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait()
        for run in runs:
            for shard in run.rglob("rank-*.h5"):  # whole and readable, never partial
                assert read_header(shard).datasets["Allen_2022-04-13"].n_rows == 400
            if len(list(run.rglob("rank-*.h5"))) < 2:
                result = invoke("compute", run)
                assert result.exit_code == 2
                assert "no shard for rank" in result.stderr or "no shards found" in result.stderr
                assert "Unfinished writes left behind" in result.stderr and ".tmp" in result.stderr
        for run in runs:
            for rank in range(2):  # re-running the writer of each rank succeeds
                write_rank(str(run), rank, 2, 0)
            document = bpseval.evaluate(run).to_dict()
            assert document["datasets"] == expected["datasets"] and document["overall"] == expected["overall"]
        if enough is not None and kills >= enough:
            break
    return kills


def test_a_reader_sees_the_previous_or_the_new_complete_step_never_a_mixture(invoke, tmp_path):
    run = tmp_path / "run"
    for rank in range(2):
        write_rank(str(run), rank, 2, 0)
    step0 = bpseval.evaluate(run).to_dict()["overall"]
    step1 = expected_result(tmp_path, 2, 1).to_dict()["overall"]
    writers = [start_writer(run, rank, 2, 1, pause=0.02 * (rank + 1)) for rank in range(2)]
    seen = []

    def new_shards() -> int:
        return len(list(run.rglob("step-000001/rank-*.h5")))

    while any(process.poll() is None for process in writers):
        before = new_shards()
        result = invoke("compute", run, "--json", "-")
        after = new_shards()
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        assert document["overall"] == (step0 if document["step"] == 0 else step1)
        if before == after == 1:
            assert document["step"] == 0
            assert "step 1 is incomplete (rank" in result.stderr and "passed over" in result.stderr
        seen.append(document["step"])
    assert seen and seen[0] == 0
    assert json.loads(invoke("compute", run, "--json", "-").stdout)["step"] == 1


def test_step_option_on_an_incomplete_step_exits_2_naming_the_missing_rank(invoke, tmp_path):
    for rank in range(2):
        with ShardWriter(tmp_path, rank, 2, step=0) as writer:
            writer.add("d", np.ones((2, 2)), np.ones((2, 2)))
    with ShardWriter(tmp_path, 0, 2, step=1) as writer:
        writer.add("d", np.ones((2, 2)), np.ones((2, 2)))
    assert invoke("compute", tmp_path).exit_code == 0
    result = invoke("compute", tmp_path, "--step", "1")
    assert result.exit_code == 2 and "step 1 has world size 2 but no shard for rank 1" in result.stderr


# ----------------------------------------------------------------------------------------------
# Hostile files


def hostile(path: Path, kind: str) -> None:
    data = poisson_dataset(0)
    outside = path.parent.parent / "outside.h5"
    with h5py.File(outside, "w") as handle:
        handle["rhat"] = data["rhat"]
    raw = outside.parent / "raw.bin"
    data["rhat"].astype("<f4").tofile(raw)
    write_raw_shard(path, {"d": {"robs": data["robs"]}})
    with h5py.File(path, "a") as handle:
        group = handle["datasets/d"]
        if kind == "external link":
            group["rhat"] = h5py.ExternalLink(str(outside), "/rhat")
        elif kind == "soft link":
            handle["elsewhere"] = data["rhat"]
            group["rhat"] = h5py.SoftLink("/elsewhere")
        elif kind == "virtual dataset":
            layout = h5py.VirtualLayout(shape=data["rhat"].shape, dtype="f4")
            layout[:] = h5py.VirtualSource(str(outside), "rhat", shape=data["rhat"].shape)
            group.create_virtual_dataset("rhat", layout)
        elif kind == "external storage":
            group.create_dataset(
                "rhat", shape=data["rhat"].shape, dtype="<f4", external=[(str(raw), 0, h5py.h5f.UNLIMITED)]
            )


@pytest.mark.parametrize("kind", ["external link", "soft link", "virtual dataset", "external storage"])
def test_links_and_foreign_storage_are_refused(invoke, tmp_path, kind):
    run = tmp_path / "run"
    hostile(run / "rank0.h5", kind)
    result = invoke("compute", run)
    assert result.exit_code == 2, result.output
    assert "rank0.h5: refers to data outside the file" in result.stderr and "Traceback" not in result.output


def test_stats_only_sums_stored_outside_the_file_are_refused(invoke, tmp_path):
    data = poisson_dataset(0)
    with ShardWriter(tmp_path / "run", 0, 1, store="stats") as writer:
        writer.add("d", data["rhat"], data["robs"])
    shard = next((tmp_path / "run").rglob("*.h5"))
    with h5py.File(tmp_path / "outside.h5", "w") as handle:
        handle["spikes"] = np.ones(data["rhat"].shape[1])
    with h5py.File(shard, "a") as handle:
        group = handle["datasets/d"]
        layout = h5py.VirtualLayout(shape=group["spikes"].shape, dtype="f8")
        layout[:] = h5py.VirtualSource(str(tmp_path / "outside.h5"), "spikes", shape=group["spikes"].shape)
        del group["spikes"]
        group.create_virtual_dataset("spikes", layout)
    result = invoke("compute", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert f"{shard}: refers to data outside the file (/datasets/d/spikes is a virtual dataset)" in result.stderr


def test_huge_declared_shape_is_refused_without_reading(invoke, tmp_path):
    write_raw_shard(tmp_path / "rank0.h5", {"d": {}})
    with h5py.File(tmp_path / "rank0.h5", "a") as handle:
        group = handle["datasets/d"]
        for key in ("rhat", "robs"):
            group.create_dataset(key, shape=(10**9, 100), dtype="f4", chunks=(1000, 100))
    start = time.perf_counter()
    result = invoke("compute", tmp_path)
    assert time.perf_counter() - start < 10
    assert (
        result.exit_code == 2
        and "declares shape (1000000000, 100)" in result.stderr
        and "file holds only" in result.stderr
    )


@pytest.mark.parametrize("name", ["a/b", "a\\b", "bell\x07", "esc\x1b[31mred", ""])
def test_writer_refuses_names_with_separators_or_control_characters(tmp_path, name):
    with ShardWriter(tmp_path, 0, 1) as writer, pytest.raises(ValueError, match="printable string"):
        writer.add(name, np.ones((1, 1)), np.ones((1, 1)))


def test_reader_shows_control_characters_escaped(invoke, tmp_path):
    write_raw_shard(tmp_path / "rank0.h5", {"esc\x1b[31mred": poisson_dataset(0)})
    result = invoke("compute", tmp_path)
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "esc\\x1b[31mred" in result.stdout


# ----------------------------------------------------------------------------------------------
# Filesystem realities


def test_reads_a_shard_another_process_holds_open_with_a_lock(invoke, tmp_path):
    with ShardWriter(tmp_path, 0, 1) as writer:
        writer.add("d", **poisson_dataset(0))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, time; f = h5py.File({str(writer.path)!r}, 'a'); print('open', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        result = invoke("compute", tmp_path)
        assert result.exit_code == 0, result.output
    finally:
        holder.kill()
        holder.wait()


def test_works_with_hdf5_file_locking_disabled(tmp_path):
    with ShardWriter(tmp_path, 0, 1) as writer:
        writer.add("d", **poisson_dataset(0))
    completed = subprocess.run(
        [sys.executable, "-m", "bpseval", "compute", str(tmp_path), "--json", "-"],
        env={**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"},
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["overall"]["bps"] is not None


def test_unreadable_file_is_named(tmp_path):
    run = Path(f"/tmp/bpseval-perm-{os.getpid()}")
    shutil.rmtree(run, ignore_errors=True)
    with ShardWriter(run, 0, 1) as writer:
        writer.add("d", **poisson_dataset(0))
    try:
        for path in [run, *run.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        writer.path.chmod(0o000)
        environment = {**os.environ, "HOME": "/tmp"}
        command = as_unprivileged(
            [sys.executable, "-m", "bpseval", "compute", str(run)], environment, "root reads every file"
        )
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, check=False)
        assert completed.returncode == 2, completed.stderr
        assert f"{writer.path}: not readable (permission denied)" in completed.stderr
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_symlinked_run_directories_work_and_links_out_of_the_run_are_refused(invoke, tmp_path):
    real = tmp_path / "real"
    with ShardWriter(real, 0, 1) as writer:
        writer.add("d", **poisson_dataset(0))
    (tmp_path / "alias").symlink_to(real)
    assert invoke("compute", tmp_path / "alias").exit_code == 0
    run = tmp_path / "run"
    (run / "step-000000").mkdir(parents=True)
    (run / "step-000000" / "rank-0000.h5").symlink_to(writer.path)
    result = invoke("compute", run)
    assert result.exit_code == 2 and "outside the run directory" in result.stderr
    inside = tmp_path / "inside"
    shutil.copytree(real, inside / "data")
    (inside / "view").symlink_to(inside / "data")  # a symlink within the run: followed, counted once
    assert invoke("compute", inside).exit_code == 0


# ----------------------------------------------------------------------------------------------
# bpseval doctor


def test_doctor_reports_steps_ranks_leftovers_and_damaged_files(invoke, tmp_path):
    for rank in range(2):
        with ShardWriter(tmp_path, rank, 2, step=3) as writer:
            writer.add("d", np.ones((2, 2)), np.ones((2, 2)))
    healthy = invoke("doctor", tmp_path, "--json", "-")
    assert healthy.exit_code == 0 and json.loads(healthy.stdout)["status"] == "healthy"
    with ShardWriter(tmp_path, 1, 2, step=4) as writer:
        writer.add("d", np.ones((2, 2)), np.ones((2, 2)))
    leftover = tmp_path / "step-000003" / ".rank-0000.h5.tmp"
    leftover.write_text("partial")
    os.utime(leftover, (1, 1))
    result = invoke("doctor", tmp_path, "--json", "-")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert [(s["step"], s["complete"], s["missing"]) for s in document["steps"]] == [(3, True, []), (4, False, [0])]
    assert document["leftovers"] == [{"path": str(leftover), "stale": True}]
    assert leftover.exists()  # reported, never deleted
    assert document["compute"]["step"] == 3 and document["compare"]["step"] is None
    table = invoke("doctor", tmp_path).stdout
    assert "step 4 is incomplete: world size 2, ranks present [1], missing [0]" in table
    assert "problems found: compute uses step 3. Without --step, compare and report fail" in table
    damaged = tmp_path / "rank-0009.h5"
    damaged.write_text("not hdf5")  # named like a shard: damaged, not skipped; of no known step, so of every step
    result = invoke("doctor", tmp_path, "--json", "-")
    assert result.exit_code == 2  # as compute, even with --step 3
    assert invoke("compute", tmp_path, "--step", "3").exit_code == 2
    document = json.loads(result.stdout)
    assert document["file_problems"][0]["path"] == str(damaged) and document["usable_steps"] == []
    assert document["compute"]["step"] is None and str(damaged) in document["compute"]["error"]
    assert "unusable: no step can be merged; compute fails: " in invoke("doctor", tmp_path).stdout


def test_doctor_lists_ranks_as_ranges(invoke, tmp_path):
    for rank in (0, 1, 2, 5):
        with ShardWriter(tmp_path, rank, 7) as writer:
            writer.add("d", np.ones((2, 2)), np.ones((2, 2)))
    (row,) = table_rows(invoke("doctor", tmp_path).stdout)
    assert row[2:5] == ["7", "0-2, 5", "3-4, 6"]  # world size, present, missing


def test_doctor_on_a_run_without_a_complete_step_exits_2(invoke, tmp_path):
    with ShardWriter(tmp_path, 0, 2) as writer:
        writer.add("d", np.ones((2, 2)), np.ones((2, 2)))
    assert invoke("doctor", tmp_path).exit_code == 2
    assert invoke("doctor", tmp_path / "missing").exit_code == 2
