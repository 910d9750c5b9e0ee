"""The run catalog: one scan per command, steps judged once, and every fault of a run directory named."""

from __future__ import annotations

import faulthandler
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bpseval.run.headers as headers
from bpseval import ShardWriter
from bpseval.errors import RunError
from bpseval.run.catalog import RunCatalog
from bpseval.run.headers import READERS, read_headers
from bpseval.shard import reader
from tests.conftest import as_unprivileged, poisson_dataset, table_rows, write_raw_shard
from tests.test_merge import HANGS_HDF5
from tests.test_steps import DATASETS, write_step

REPO = Path(__file__).resolve().parents[1]


def write_launch(run: Path, step: int, ranks: tuple[int, ...], run_id: str, world_size: int = 2) -> None:
    """Shards of `ranks` for `step`, written by one launch of the job (`run_id`): a new launch replaces shards."""
    for rank in ranks:
        with ShardWriter(run, rank, world_size, step=step, run_id=run_id, overwrite=True) as writer:
            writer.add("d", **poisson_dataset(10 * step + rank), sample_idx=np.arange(40) + 40 * rank)


# ----------------------------------------------------------------------------------------------
# One run per step


def test_a_rank_left_over_from_an_earlier_launch_is_refused_by_every_merging_command(invoke, tmp_path):
    run = tmp_path / "run"
    write_launch(run, 0, (0, 1), "launch-a")
    write_launch(run, 1, (0, 1), "launch-a")
    write_launch(run, 1, (0,), "launch-b")  # the job restarted, wrote rank 0 of step 1 and died
    expected = "step 1 mixes shards of 2 launches (run_id 'launch-a': rank 1; run_id 'launch-b': rank 0)"
    for arguments in (
        ("compute", run),
        ("compute", run, "--step", "1"),
        ("coverage", run),
        ("baseline", run, "-o", tmp_path / "b.json"),
        ("compare", run, "--baseline", run),
    ):
        result = invoke(*arguments)
        assert result.exit_code == 2, (arguments, result.output)
        assert expected in result.stderr and "Traceback" not in result.output
    assert invoke("compute", run, "--step", "0").exit_code == 0  # the other step is fine
    all_steps = invoke("compute", run, "--all-steps", "--json", "-")
    assert all_steps.exit_code == 2 and expected in all_steps.stderr
    document = json.loads(all_steps.stdout)
    assert [entry["step"] for entry in document["steps"]] == [0]
    assert [entry["step"] for entry in document["failed_steps"]] == [1]
    doctor = invoke("doctor", run, "--json", "-")
    assert doctor.exit_code == 1  # step 0 is still usable
    steps = json.loads(doctor.stdout)["steps"]
    assert steps[1]["complete"] is False and steps[1]["run_ids"] == ["launch-a", "launch-b"]


def test_a_run_with_one_run_id_or_none_is_one_launch(tmp_path):
    write_launch(tmp_path / "a", 0, (0, 1), "same")
    write_step(tmp_path / "b", 0)  # no run_id at all
    for run in (tmp_path / "a", tmp_path / "b"):
        assert RunCatalog.scan(run).complete_steps == [0]


# ----------------------------------------------------------------------------------------------
# A folder of runs


def test_a_folder_of_runs_is_recognised_and_never_called_a_stale_copy(invoke, tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("lr-1e-3", "lr-1e-4", "lr-3e-4"):
        write_step(sweep / name, 0)
    result = invoke("compute", sweep)
    assert result.exit_code == 2
    assert f"{sweep}: holds 3 runs, not one (lr-1e-3, lr-1e-4, lr-3e-4)" in result.stderr
    runs = " ".join(str(sweep / name) for name in ("lr-1e-3", "lr-1e-4", "lr-3e-4"))
    assert f"bpseval compute {runs}" in result.stderr and "stale" not in result.stderr
    assert invoke("doctor", sweep).exit_code == 2
    several = invoke("compute", *sorted(sweep.iterdir()), "--json", "-")
    assert several.exit_code == 0 and len(json.loads(several.stdout)["runs"]) == 3


def test_the_hint_for_a_folder_of_runs_names_only_the_runs_and_runs_as_given(tmp_path):
    sweep = tmp_path / "my sweep"  # a space: the hint is quoted for the shell
    for name in ("lr-1e-3", "nested/lr-1e-4"):
        write_step(sweep / name, 0)
    (sweep / "notes").mkdir()  # neither a folder without shards nor a file is a run
    (sweep / "notes" / "todo.txt").write_text("compare the learning rates\n")
    (sweep / "baseline.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "bpseval", "compute", str(sweep)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    hint = result.stderr.split("to compare them in one table: ", 1)[1].strip()
    assert shlex.split(hint) == ["bpseval", "compute", str(sweep / "lr-1e-3"), str(sweep / "nested" / "lr-1e-4")]
    again = subprocess.run(
        [sys.executable, "-m", *shlex.split(hint), "--json", "-"], capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr
    assert [entry["run"] for entry in json.loads(again.stdout)["runs"]] == shlex.split(hint)[2:]


def test_stale_copies_inside_a_run_are_not_a_sweep(tmp_path):
    run = tmp_path / "run"
    write_step(run, 0)
    write_step(run / "old", 0, ranks=(1,))  # a copy below the run: its rank 1 appears twice
    assert "rank 1 of step 0 appears twice" in RunCatalog.scan(run).skipped_steps[0]


# ----------------------------------------------------------------------------------------------
# Nothing skipped silently


def test_a_fifo_named_like_a_shard_is_never_opened_and_is_named(invoke, tmp_path):
    run = tmp_path / "run"
    write_step(run, 0)
    write_step(run, 1)
    fifo = run / "step-000001" / "rank-0002.h5"
    os.mkfifo(fifo)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "bpseval", "compute", str(run)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    assert f"{fifo}: is a FIFO, not a regular file; bpseval never opens it" in completed.stderr
    assert time.perf_counter() - started < 30
    in_process = invoke("compute", run)  # the in-process path does not open it either
    assert in_process.exit_code == 2 and "is a FIFO" in in_process.stderr
    assert invoke("compute", run, "--step", "0").exit_code == 0  # it belongs to step 1 by its folder
    doctor = invoke("doctor", run)
    assert doctor.exit_code == 1 and f"{fifo}: is a FIFO" in doctor.stdout


def test_a_folder_that_cannot_be_listed_is_named_and_fails_the_command(tmp_path):
    base = Path(f"/tmp/bpseval-unlistable-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    run = base / "run"
    write_step(run, 0)
    write_step(run, 1)
    try:
        for path in [base, *base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        hidden = run / "step-000001"
        hidden.chmod(0o000)
        environment = {**os.environ, "HOME": "/tmp", "PYTHONPATH": str(REPO)}
        command = as_unprivileged([sys.executable, "-m", "bpseval"], environment, "root lists every folder")

        def run_bpseval(*arguments: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*command, *arguments], capture_output=True, text=True, cwd="/", env=environment, check=False
            )

        computed = run_bpseval("compute", str(run))
        assert computed.returncode == 2, computed.stderr
        assert f"{hidden}: cannot be listed (Permission denied)" in computed.stderr
        assert run_bpseval("compute", str(run), "--step", "0").returncode == 0
        doctor = run_bpseval("doctor", str(run))
        assert doctor.returncode == 1 and f"{hidden}: cannot be listed" in doctor.stdout
        # doctor says what compute does: it fails without --step, and --step 0 works; no empty world size
        assert f"without --step, compute fails: {hidden}: cannot be listed" in doctor.stdout
        assert "--step 0 (the latest complete step) works" in doctor.stdout
        assert "compute still has a complete step" not in doctor.stdout and "world size ," not in doctor.stdout
        assert "step 1 is incomplete: no shard of it could be read, 1 path that cannot be read" in doctor.stdout
        document = json.loads(run_bpseval("doctor", str(run), "--json", "-").stdout)
        assert document["compute"]["step"] is None and f"{hidden}: cannot be listed" in document["compute"]["error"]
        assert document["usable_steps"] == [0] and document["steps"][1]["world_sizes"] == []
        hidden.chmod(0o644)  # listed, but not entered: its entries cannot be looked at
        computed = run_bpseval("compute", str(run))
        assert computed.returncode == 2 and f"{hidden}: cannot be listed (Permission denied)" in computed.stderr
        assert "Traceback" not in computed.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Attributes cannot make the tool allocate


@pytest.mark.parametrize("world_size", [10**8, np.uint64(2**64 - 1)])
def test_an_absurd_world_size_is_refused_quickly_naming_a_handful_of_ranks(invoke, tmp_path, world_size):
    run = tmp_path / "run"
    write_raw_shard(run / "step-000000" / "rank-0000.h5", {"d": poisson_dataset(0)}, attrs={"world_size": world_size})
    started = time.perf_counter()
    result = invoke("compute", run)
    assert time.perf_counter() - started < 1.0
    assert result.exit_code == 2
    more = int(world_size) - 6
    assert f"no shard for ranks 1, 2, 3, 4, 5 and {more} more (found ranks 0)" in result.stderr
    doctor = invoke("doctor", run, "--json", "-")
    step = json.loads(doctor.stdout)["steps"][0]
    assert step["missing"] == [1, 2, 3, 4, 5] and step["missing_count"] == int(world_size) - 1


def test_a_rank_beyond_the_world_size_is_refused(invoke, tmp_path):
    path = write_raw_shard(tmp_path / "run" / "rank5.h5", {"d": poisson_dataset(0)}, rank=5, world_size=2)
    result = invoke("compute", tmp_path / "run")
    assert result.exit_code == 2 and f"{path}: rank 5 is outside 0..world_size-1 (world_size 2)" in result.stderr


# ----------------------------------------------------------------------------------------------
# One bad step does not hide the good ones


def damaged_middle_step(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    for step in (0, 1, 2):
        write_step(run, step)
    damaged = run / "step-000001" / "rank-0001.h5"
    damaged.write_bytes(damaged.read_bytes()[:2000])
    return run, damaged


def test_all_steps_scores_every_good_step_then_exits_2_naming_the_bad_one(invoke, tmp_path):
    run, damaged = damaged_middle_step(tmp_path)
    result = invoke("compute", run, "--all-steps")
    assert result.exit_code == 2
    assert [row[0] for row in table_rows(result.stdout)] == ["0", "2"]
    assert f"Error: step 1: {damaged}:" in result.stderr
    as_json = invoke("compute", run, "--all-steps", "--json", "-")
    document = json.loads(as_json.stdout)
    assert as_json.exit_code == 2 and [entry["step"] for entry in document["steps"]] == [0, 2]
    assert document["failed_steps"][0]["step"] == 1 and str(damaged) in document["failed_steps"][0]["reason"]


def test_invalid_values_in_one_step_fail_that_step_only(invoke, tmp_path):
    run = tmp_path / "run"
    write_step(run, 0)
    arrays = poisson_dataset(1)
    arrays["dfs"][:] = 1.0
    arrays["rhat"][3, 2] = np.nan  # ShardWriter refuses such a batch: written as another program would
    write_raw_shard(run / "step-000001" / "rank-0000.h5", {DATASETS[0]: arrays}, world_size=2, step=1)
    with ShardWriter(run, 1, 2, step=1) as other:
        other.add(DATASETS[0], **poisson_dataset(2))
    result = invoke("compute", run, "--all-steps", "--json", "-")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert [entry["step"] for entry in document["steps"]] == [0]
    assert "rhat has 1 NaN or infinite value (first at sample row 3, cell 2)" in document["failed_steps"][0]["reason"]


def test_step_option_on_a_good_step_ignores_a_damaged_other_step(invoke, tmp_path):
    run, damaged = damaged_middle_step(tmp_path)
    for step in ("0", "2"):
        result = invoke("compute", run, "--step", step)
        assert result.exit_code == 0, result.output
    latest = invoke("compute", run)  # the latest step is good; the damaged older one is said, not hidden
    assert latest.exit_code == 0 and f"step 1: {damaged}" in latest.stderr
    assert invoke("compute", run, "--step", "1").exit_code == 2


def test_plot_and_report_draw_the_good_steps_then_exit_2(invoke, tmp_path):
    pytest.importorskip("matplotlib")
    run, damaged = damaged_middle_step(tmp_path)
    pictures = invoke("plot", run, "-o", tmp_path / "pictures")
    assert pictures.exit_code == 2 and (tmp_path / "pictures" / "bps-over-steps.png").exists()
    assert f"Error: step 1: {damaged}" in pictures.stderr
    report = invoke("report", run, "-o", tmp_path / "report.html")
    assert report.exit_code == 2 and str(damaged) in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------------------------------
# Each header read once per command

COUNT_HEADER_READS = """
import sys
import bpseval.run.headers as headers
log = open(sys.argv[1], "a", buffering=1)
read_header = headers.read_header
def counted(path):
    log.write(f"{path}\\n")
    return read_header(path)
headers.read_header = counted
from bpseval.cli import app
app(sys.argv[2:])
"""


@pytest.mark.parametrize("command", ["compute --all-steps", "plot -o {out}", "report -o {out}.html", "doctor"])
def test_every_shard_header_is_read_once_per_command(tmp_path, command):
    if command.startswith(("plot", "report")):
        pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    for step in range(6):
        write_step(run, step)
    log = tmp_path / "reads.log"
    arguments = command.format(out=tmp_path / "out").split()
    completed = subprocess.run(
        [sys.executable, "-c", COUNT_HEADER_READS, str(log), arguments[0], str(run), *arguments[1:]],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    reads = log.read_text().split()
    assert len(reads) == 12 and len(set(reads)) == 12


# ----------------------------------------------------------------------------------------------
# One step rule: which step a command merges without --step (`RunCatalog.select`)


def run_with_an_incomplete_latest_step(invoke, tmp_path: Path) -> tuple[Path, Path]:
    """Complete steps 0 and 1, a baseline of step 1, then step 2 with rank 1 missing (crashed, or still writing)."""
    run = tmp_path / "run"
    for step in (0, 1):
        write_step(run, step)
    base = tmp_path / "base.json"
    assert invoke("baseline", run, "-o", base).exit_code == 0
    write_step(run, 2, ranks=(0,))
    return run, base


REFUSED = (
    "the latest step, 2, is incomplete (rank 1 missing), and an older step is not used in its place without --step"
)


def test_compare_refuses_an_incomplete_latest_step_naming_its_missing_rank_and_compute_passes_over_it(invoke, tmp_path):
    """compare used to pass over the incomplete step 2 and judge step 1 against the baseline: bad input (a rank
    missing) reported as a verdict. Now it exits 2 naming the step, the rank and --step; compute still passes over
    it, saying so; --step picks a step explicitly."""
    run, base = run_with_an_incomplete_latest_step(invoke, tmp_path)
    compared = invoke("compare", run, "--baseline", base)
    assert compared.exit_code == 2, compared.output
    assert f"Error: {run}: {REFUSED}: pass --step 1 (the latest complete step)" in compared.stderr
    assert "Regression" not in compared.output and "Traceback" not in compared.output
    computed = invoke("compute", run, "--json", "-")
    assert computed.exit_code == 0 and json.loads(computed.stdout)["step"] == 1
    assert "Warning: step 2 is incomplete (rank 1 missing); passed over." in computed.stderr
    explicit = invoke("compare", run, "--baseline", base, "--step", "1", "--json", "-")
    assert explicit.exit_code == 0, explicit.output
    assert json.loads(explicit.stdout)["passed"] is True
    assert invoke("compare", run, "--baseline", base, "--step", "2").exit_code == 2  # named: still incomplete
    doctor = json.loads(invoke("doctor", run, "--json", "-").stdout)
    assert doctor["compute"] == {
        "step": 1,
        "error": None,
        "notes": ["step 2 is incomplete (rank 1 missing); passed over."],
    }
    assert doctor["compare"]["step"] is None and REFUSED in doctor["compare"]["error"]


def test_report_refuses_an_incomplete_latest_step_as_compare_does(invoke, tmp_path):
    pytest.importorskip("matplotlib")
    run, _ = run_with_an_incomplete_latest_step(invoke, tmp_path)
    report = invoke("report", run, "-o", tmp_path / "report.html")
    assert report.exit_code == 2 and f"Error: {run}: {REFUSED}: pass --step 1" in report.stderr
    assert not (tmp_path / "report.html").exists()
    explicit = invoke("report", run, "-o", tmp_path / "report.html", "--step", "1")
    assert explicit.exit_code == 0, explicit.output
    assert "report of step 1 written" in explicit.stdout


def test_the_incomplete_latest_step_of_a_run_without_a_complete_one_says_to_wait(tmp_path):
    run = tmp_path / "run"
    write_step(run, 0, ranks=(1,))
    scanned = RunCatalog.scan(run)
    with pytest.raises(RunError) as refused:
        scanned.select(pass_over=False)
    assert "the latest step, 0, is incomplete (rank 0 missing)" in str(refused.value)
    assert "--step (" not in str(refused.value) and "wait until every rank has written step 0" in str(refused.value)
    with pytest.raises(RunError, match="step 0 has world size 2 but no shard for rank 0"):
        scanned.select()  # passing over leaves nothing: the step's own reason


def truncated_run(tmp_path: Path, where: str, keep: int) -> tuple[Path, Path]:
    """Complete steps 0-2 (2 ranks each), one shard cut to its first `keep` bytes (negative: all but the last
    -keep): in the latest step, in an older one, or a shard outside the step folders (its step is unknown)."""
    run = tmp_path / "run"
    for step in range(3):
        write_step(run, step)
    if where == "outside the step folders":
        shard = write_raw_shard(run / "rank-0000.h5", {"d": poisson_dataset(0)}, step=7)
    else:
        shard = run / ("step-000002" if where == "latest step" else "step-000001") / "rank-0001.h5"
    shard.write_bytes(shard.read_bytes()[:keep])
    return run, shard


@pytest.mark.parametrize("keep", [2000, -1])
@pytest.mark.parametrize("where", ["latest step", "older step", "outside the step folders"])
def test_compute_doctor_and_compare_agree_on_a_truncated_shard(invoke, tmp_path, where, keep):
    """compute, compare and doctor decide through one rule: doctor's "compute"/"compare" entries are what those
    commands do, word for word, and every one names the file. (doctor used to say "compute still has a complete
    step" where compute exited 2.)"""
    clean = tmp_path / "clean"
    for step in range(3):
        write_step(clean, step)
    base = tmp_path / "base.json"
    assert invoke("baseline", clean, "-o", base).exit_code == 0
    run, shard = truncated_run(tmp_path, where, keep)
    computed = invoke("compute", run)
    compared = invoke("compare", run, "--baseline", base)
    doctor = invoke("doctor", run, "--json", "-")
    document = json.loads(doctor.stdout)
    expected = {"latest step": (2, 2, 1), "older step": (0, 0, 1), "outside the step folders": (2, 2, 2)}[where]
    assert (computed.exit_code, compared.exit_code, doctor.exit_code) == expected, (computed.output, compared.output)
    for side, result in (("compute", computed), ("compare", compared)):
        assert str(shard) in result.stderr
        if result.exit_code == 2:
            assert document[side]["step"] is None and f"Error: {document[side]['error']}" in result.stderr
        else:
            assert document[side]["step"] == 2 and document[side]["error"] is None
    assert [problem["path"] for problem in document["file_problems"]] == [str(shard)]
    verdict = invoke("doctor", run).stdout.splitlines()[-1]
    assert ("compute fails" in verdict) == (computed.exit_code == 2)
    assert "compute still has a complete step" not in verdict


# ----------------------------------------------------------------------------------------------
# Reading headers in forked children


DIAGNOSE_TIMED = """
import json, sys, time
from bpseval.features.doctor import diagnose
started = time.perf_counter()
document = diagnose(sys.argv[1]).to_dict()
print(json.dumps({"elapsed": time.perf_counter() - started, **document}))
"""


def test_files_that_hang_are_waited_for_side_by_side_and_each_is_named(tmp_path):
    """12 files on which libhdf5 loops forever, with a 0.5 s timeout: they used to be waited for one after another
    (12 x 0.5 s); now up to READERS children wait at once, about 0.5 s x ceil(12 / READERS). The bound is
    generous: it checks that the waits overlap, it is not a benchmark. Timed inside a fresh interpreter, as
    `bpseval doctor` runs (forking this test process, torch and all, costs far more per child); no good shard
    here, since a 0.5 s timeout on a loaded machine could make a healthy one late too (`test_merge.py` reads
    good shards around a hang)."""
    hanging = [tmp_path / "run" / "step-000000" / f"rank-{rank:04d}.h5" for rank in range(12)]
    hanging[0].parent.mkdir(parents=True)
    for path in hanging:
        shutil.copy(HANGS_HDF5, path)
    completed = subprocess.run(
        [sys.executable, "-c", DIAGNOSE_TIMED, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "BPSEVAL_METADATA_TIMEOUT": "0.5"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    problems = {problem["path"]: problem["problem"] for problem in document["file_problems"]}
    assert sorted(problems) == sorted(map(str, hanging)) and document["status"] == "unusable"
    assert all(problem.startswith("reading its metadata did not finish within 0.5 s") for problem in problems.values())
    assert READERS > 1 and document["elapsed"] < 0.6 * len(hanging) * 0.5, document["elapsed"]


def test_a_bug_in_the_header_reading_child_is_raised_as_itself_not_called_a_damaged_file(invoke, tmp_path, monkeypatch):
    """An AttributeError while a forked child reads a header used to come back as "the file is damaged"."""
    run = tmp_path / "run"
    write_step(run, 0)

    def bug(*args: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'shape' (a bug in bpseval)")

    monkeypatch.setattr(reader, "_check_stored", bug)  # called by read_header; the forked children inherit it
    with pytest.raises(AttributeError, match="a bug in bpseval") as raised:
        RunCatalog.scan(run)
    assert "in bug" in str(raised.value.__cause__)  # the child's traceback, as the cause
    result = invoke("compute", run)
    assert result.exit_code == 3 and "damaged" not in result.output  # a bug: its traceback, exit 3
    assert "(a bug in bpseval)" in result.stderr and "This is a bug in bpseval" in result.stderr


def test_only_a_reader_killed_by_a_signal_means_a_damaged_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_step(run, 0)
    paths = sorted(run.rglob("rank-*.h5"))
    real = headers.read_header

    def crashing(path: Path):
        if path == paths[0]:
            faulthandler.disable()  # pytest's handler would print this child's stack
            os.kill(os.getpid(), signal.SIGSEGV)  # as libhdf5 crashing on a damaged file
        return real(path)

    monkeypatch.setattr(headers, "read_header", crashing)
    first, second = read_headers(paths)
    assert f"{paths[0]}: reading its metadata killed the reader (SIGSEGV); the file is damaged" in str(first)
    assert second.rank == 1  # read by a new child

    def leaving(path: Path):
        os._exit(0)

    monkeypatch.setattr(headers, "read_header", leaving)
    with pytest.raises(
        RuntimeError, match=r"ended without sending it \(exit code 0\): a bug in bpseval, not a damaged file"
    ):
        read_headers(paths)
