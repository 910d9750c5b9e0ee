"""The command line: output, exit codes, and one clear message per bad input (no traceback)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

import bpseval
from bpseval import ShardWriter
from tests.conftest import poisson_dataset, write_raw_shard

REPO = Path(__file__).resolve().parents[1]


def two_rank_run(run_dir: Path, step: int = 0) -> Path:
    """Two ranks, two datasets, one uncovered cell and one silent cell."""
    for rank in range(2):
        with ShardWriter(run_dir, rank, 2, step=step) as writer:
            for name, seed in (("Allen_2022-04-13", 1), ("Allen_2022-05-02", 2)):
                arrays = poisson_dataset(seed + 10 * rank)
                arrays["dfs"][:, 0] = 0.0
                arrays["robs"][:, 1] = 0.0
                writer.add(name, **arrays, sample_idx=np.arange(40) + 40 * rank)
    return run_dir


def test_version_and_help(invoke):
    assert invoke("--version").output == f"bpseval {bpseval.__version__}\n"
    for flag in ("-h", "--help"):
        result = invoke("compute", flag)
        assert result.exit_code == 0
        for option in ("--step", "--json", "--csv", "--clamp-negative"):
            assert option in result.output


def test_compute_prints_table_and_unscored_cells(invoke, tmp_path):
    result = invoke("compute", two_rank_run(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    expected = bpseval.evaluate(tmp_path / "run")
    out = result.stdout
    assert "Allen_2022-04-13" in out and "overall" in out
    assert f"{expected.overall.bps:.4f}" in out
    assert f"{expected.overall.bps_pooled:.4f}" in out
    assert "2 uncovered cells (no valid sample):" in out
    assert "Allen_2022-04-13: cell 0" in out
    assert "2 silent cells (no spike: bps undefined):" in out
    assert "step 0 · world size 2 · 2 shards" in out


def test_compute_defaults_to_current_directory(invoke, tmp_path, monkeypatch):
    two_rank_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = invoke("compute")
    assert result.exit_code == 0, result.output
    assert "world size 2" in result.stdout


def test_json_to_stdout_is_only_json_and_has_no_nan(invoke, tmp_path):
    result = invoke("compute", two_rank_run(tmp_path / "run"), "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) >= {
        "bpseval_version",
        "step",
        "world_size",
        "ranks",
        "files",
        "settings",
        "overall",
        "datasets",
        "cells",
    }
    assert document["ranks"] == [0, 1]
    assert set(document["overall"]) >= {"bps", "bps_pooled", "datasets", "cells"}
    assert set(document["datasets"][0]) >= {"name", "samples", "duplicates_dropped", "bps", "bps_pooled", "cells"}
    assert set(document["cells"][0]) >= {"dataset", "cell", "cell_id", "n_valid", "spikes", "ll_gain", "bps", "status"}
    uncovered = [cell for cell in document["cells"] if cell["status"] == "uncovered"]
    assert uncovered and all(cell["bps"] is None and cell["ll_gain"] is None for cell in uncovered)
    assert "NaN" not in result.stdout


def test_json_and_csv_files(invoke, tmp_path):
    run = two_rank_run(tmp_path / "run")
    result = invoke("compute", run, "--json", tmp_path / "out.json", "--csv", tmp_path / "cells.csv")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "out.json").read_text())
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cells.csv").read_text())))
    assert len(rows) == len(document["cells"]) == 12
    assert rows[0]["status"] == "uncovered" and rows[0]["bps"] == ""
    assert math.isclose(float(rows[2]["bps"]), document["cells"][2]["bps"], rel_tol=1e-12)


def test_step_option_selects_an_older_step(invoke, tmp_path):
    run = two_rank_run(tmp_path / "run", step=1)
    for rank in range(2):
        with ShardWriter(run, rank, 2, step=5) as writer:
            writer.add("other", **poisson_dataset(rank))
    latest = json.loads(invoke("compute", run, "--json", "-").stdout)
    older = json.loads(invoke("compute", run, "--step", "1", "--json", "-").stdout)
    assert latest["step"] == 5 and [d["name"] for d in latest["datasets"]] == ["other"]
    assert older["step"] == 1 and len(older["datasets"]) == 2


def test_clamp_negative_reproduces_legacy_mean_and_says_so(invoke, tmp_path):
    rng = np.random.default_rng(0)
    robs = rng.poisson(1.0, size=(200, 4)).astype(np.float32)
    rhat = np.full((200, 4), 1.0, dtype=np.float32)
    rhat[:, :2] = 3.0  # two cells predicted badly: negative bps
    with ShardWriter(tmp_path, 0, 1) as writer:
        writer.add("d", rhat, robs)
    plain = bpseval.evaluate(tmp_path)
    clamped = bpseval.evaluate(tmp_path, clamp_negative=True)
    per_cell = plain.cells["bps"].to_numpy()
    assert (per_cell[:2] < 0).all()
    assert plain.overall.bps == pytest.approx(per_cell.mean())
    assert clamped.overall.bps == pytest.approx(np.maximum(per_cell, 0).mean())
    result = invoke("compute", tmp_path, "--clamp-negative")
    assert "--clamp-negative is on" in result.stdout
    assert json.loads(invoke("compute", tmp_path, "--clamp-negative", "--json", "-").stdout)["settings"][
        "clamp_negative"
    ]


# ----------------------------------------------------------------------------------------------
# Bad input: exit 2, one message naming the file (and dataset), no traceback.

Setup = Callable[[Path], None]


def _valid_shard(path: Path, rank: int = 0, world_size: int = 1, **arrays) -> Path:
    data = poisson_dataset(rank, with_dfs=False)
    data.update(arrays)
    return write_raw_shard(path, {"Allen_2022-04-13": data}, rank=rank, world_size=world_size)


def _truncated(run: Path) -> None:
    path = _valid_shard(run / "rank0.h5")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_rhat(run: Path) -> None:
    rhat = poisson_dataset(0)["rhat"]
    rhat[3, 2] = np.nan
    rhat[7, 1] = np.inf
    rhat[30, 0] = np.nan
    _valid_shard(run / "rank0.h5", rhat=rhat)


def _negative_robs(run: Path) -> None:
    robs = poisson_dataset(0)["robs"]
    robs[5, 4] = -1
    _valid_shard(run / "rank0.h5", robs=robs)


def _dfs_out_of_range(run: Path) -> None:
    _valid_shard(run / "rank0.h5", dfs=np.full((40, 6), 1.5, dtype=np.float32))


def _cell_count_differs(run: Path) -> None:
    _valid_shard(run / "rank0.h5", 0, 2)
    write_raw_shard(run / "rank1.h5", {"Allen_2022-04-13": poisson_dataset(1, n_cells=7)}, rank=1, world_size=2)


def _cell_ids_differ(run: Path) -> None:
    _valid_shard(run / "rank0.h5", 0, 2, cell_ids=np.arange(6))
    _valid_shard(run / "rank1.h5", 1, 2, cell_ids=np.arange(6) + 100)


def _conflicting_duplicates(run: Path) -> None:
    _valid_shard(run / "rank0.h5", 0, 2, sample_idx=np.arange(40))
    other = poisson_dataset(1, with_dfs=False)
    other["robs"] = other["robs"] + 1
    _valid_shard(run / "rank1.h5", 1, 2, robs=other["robs"], sample_idx=np.arange(40))


BAD_INPUTS: dict[str, tuple[Setup, list[str]]] = {
    "no shards": (lambda run: (run / "notes.txt").write_text("x"), ["no shards found"]),
    "not HDF5": (lambda run: (run / "rank0.h5").write_text("hello"), ["rank0.h5", "cannot be read as an HDF5 file"]),
    "truncated": (_truncated, ["rank0.h5", "truncated"]),
    "not a shard": (
        lambda run: write_raw_shard(run / "other.h5", {}, attrs={"format": None}),
        ["other.h5", "not a bpseval shard"],
    ),
    "newer version": (
        lambda run: write_raw_shard(run / "rank0.h5", {}, attrs={"format_version": 2}),
        ["rank0.h5", "format version 2 is not supported"],
    ),
    "missing rank": (
        lambda run: _valid_shard(run / "rank0.h5", 0, 3),
        ["world size 3 but no shard for ranks 1, 2"],
    ),
    "duplicated rank": (
        lambda run: (_valid_shard(run / "a.h5", 0, 1), _valid_shard(run / "b.h5", 0, 1)),
        ["rank 0 of step 0 appears twice", "a.h5", "b.h5"],
    ),
    "mixed world sizes": (
        lambda run: (_valid_shard(run / "a.h5", 0, 1), _valid_shard(run / "b.h5", 1, 2)),
        ["mixes world sizes [1, 2]", "a.h5 says 1", "b.h5 says 2"],
    ),
    "rhat/robs shapes": (
        lambda run: _valid_shard(run / "rank0.h5", robs=np.zeros((39, 6))),
        ["rank0.h5", "'Allen_2022-04-13'", "shape (samples, cells); got (40, 6) and (39, 6)"],
    ),
    "dfs shape": (
        lambda run: _valid_shard(run / "rank0.h5", dfs=np.ones((40, 5))),
        ["rank0.h5", "'Allen_2022-04-13'", "dfs has shape (40, 5)"],
    ),
    "missing robs": (
        lambda run: write_raw_shard(run / "rank0.h5", {"Allen_2022-04-13": {"rhat": np.ones((4, 2))}}),
        ["rank0.h5", "'Allen_2022-04-13'", "missing the 'robs' array"],
    ),
    "cell count differs": (_cell_count_differs, ["rank1.h5", "'Allen_2022-04-13' has 7 cells but 6 in", "rank0.h5"]),
    "cell_ids differ": (_cell_ids_differ, ["rank1.h5", "'Allen_2022-04-13' has cell_ids that differ", "rank0.h5"]),
    "NaN rhat": (
        _nan_rhat,
        ["rank0.h5", "'Allen_2022-04-13'", "rhat has 3 NaN or infinite values (first at sample row 3, cell 2)"],
    ),
    "negative robs": (_negative_robs, ["rank0.h5", "robs has 1 negative value (first at sample row 5, cell 4)"]),
    "dfs outside [0, 1]": (_dfs_out_of_range, ["rank0.h5", "dfs has 240 outside [0, 1] or NaN values"]),
    "log-rate overflow": (
        lambda run: write_raw_shard(
            run / "rank0.h5",
            {
                "Allen_2022-04-13": {
                    "rhat": np.array([[800.0], [0.0]]),
                    "robs": np.ones((2, 1)),
                    "rate_kind": "log_rate",
                }
            },
        ),
        ["rank0.h5", "rhat has 1 log-rate above 700 (overflowing) value (first at sample row 0, cell 0)"],
    ),
    "negative sample_idx": (
        lambda run: _valid_shard(run / "rank0.h5", sample_idx=np.arange(40) - 1),
        ["rank0.h5", "'Allen_2022-04-13'", "sample_idx has negative values (e.g. -1)"],
    ),
    "conflicting duplicates": (
        _conflicting_duplicates,
        ["rank1.h5", "'Allen_2022-04-13'", "sample_idx 0 also appears in", "rank0.h5", "different robs"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_clear_message(invoke, tmp_path, case):
    setup, fragments = BAD_INPUTS[case]
    run = tmp_path / "run"
    run.mkdir()
    setup(run)
    result = invoke("compute", run)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr
    with pytest.raises(bpseval.BpsevalError):
        bpseval.evaluate(run)


def test_missing_directory_and_unknown_step_exit_2(invoke, tmp_path):
    missing = invoke("compute", tmp_path / "nope")
    assert missing.exit_code == 2 and "nope: no such directory" in missing.stderr
    two_rank_run(tmp_path / "run")
    unknown = invoke("compute", tmp_path / "run", "--step", "9")
    assert unknown.exit_code == 2 and "no shard has step 9; steps found: 0" in unknown.stderr


def test_usage_error_exits_2(invoke):
    assert invoke("compute", "--step", "x").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def test_values_at_masked_entries_are_ignored(invoke, tmp_path):
    data = poisson_dataset(3)
    data["dfs"][0, :] = 0.0
    data["rhat"][0, :] = np.nan
    data["robs"][0, :] = -5.0
    write_raw_shard(tmp_path / "rank0.h5", {"d": data})
    result = invoke("compute", tmp_path, "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["overall"]["bps"] is not None


def test_in_progress_files_are_ignored(invoke, tmp_path):
    two_rank_run(tmp_path)
    (tmp_path / "step-000000" / ".rank-0002.h5.tmp").write_text("partial")
    (tmp_path / "step-000000" / ".rank-0003.h5").write_text("partial")
    assert invoke("compute", tmp_path).exit_code == 0


def test_duplicate_rhat_beyond_rounding_warns_and_keeps_first(invoke, tmp_path):
    first = poisson_dataset(0, with_dfs=False)
    second = {key: value.copy() for key, value in first.items()}
    second["rhat"][0] *= 1.5
    write_raw_shard(tmp_path / "a.h5", {"d": {**first, "sample_idx": np.arange(40)}}, rank=0, world_size=2)
    write_raw_shard(tmp_path / "b.h5", {"d": {**second, "sample_idx": np.arange(40)}}, rank=1, world_size=2)
    result = invoke("compute", tmp_path, "--json", "-")
    assert result.exit_code == 0
    assert (
        "Warning: dataset 'd': rhat differs beyond rounding between the copies of 1 duplicated sample"
        in result.stderr.replace("\n", " ")
    )
    document = json.loads(result.stdout)
    assert document["datasets"][0]["duplicates_dropped"] == 40
    reference = bpseval.bits_per_spike(first["rhat"], first["robs"])
    assert [c["bps"] for c in document["cells"]] == pytest.approx(reference["bps"].tolist(), rel=1e-12)


def test_shard_with_empty_datasets_group_is_a_rank_that_saw_nothing(invoke, tmp_path):
    _valid_shard(tmp_path / "rank0.h5", 0, 2)
    write_raw_shard(tmp_path / "rank1.h5", {}, rank=1, world_size=2)
    with h5py.File(tmp_path / "rank1.h5", "a") as handle:
        handle.create_group("datasets")
    result = invoke("compute", tmp_path, "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["datasets"][0]["samples"] == 40


def test_compute_does_not_import_torch(tmp_path):
    """torch costs about a second at start-up; numpy shards never need it."""
    two_rank_run(tmp_path)
    script = (
        "import sys\n"
        "from bpseval.cli import main\n"
        f"sys.argv = ['bpseval', 'compute', {str(tmp_path)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "overall" in completed.stdout


# ----------------------------------------------------------------------------------------------
# Exit codes: a bug is 3 with its traceback, Ctrl-C 130, a closed stdout quiet


def _main_with(raised: str, run: Path) -> subprocess.CompletedProcess:
    """`bpseval compute RUN` in a new process whose merge raises `raised` (a Python expression): a bug planted."""
    script = (
        "import sys\n"
        "import bpseval.cli\n"
        "def merge(*args, **kwargs):\n"
        f"    raise {raised}\n"
        "bpseval.cli.evaluate = merge\n"
        f"sys.argv = ['bpseval', 'compute', {str(run)!r}]\n"
        "bpseval.cli.main()\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False)


@pytest.mark.parametrize(
    ("raised", "shown"),
    [
        ("RuntimeError('planted')", "RuntimeError: planted"),  # exited 1, the code of a failed gate
        ("PermissionError(13, 'Permission denied')", "PermissionError: [Errno 13]"),  # exited 2, as bad input
        ("BrokenPipeError(32, 'Broken pipe')", "BrokenPipeError: [Errno 32]"),  # a pipe that is not stdout's
    ],
)
def test_a_bug_exits_3_with_its_traceback_and_a_request_to_report_it(tmp_path, raised, shown):
    completed = _main_with(raised, two_rank_run(tmp_path / "run"))
    assert completed.returncode == 3, completed.stderr
    assert completed.stderr.startswith("Traceback (most recent call last):")
    assert f"{shown}" in completed.stderr and "in merge" in completed.stderr
    report = f"This is a bug in bpseval {bpseval.__version__}: please report it with the traceback above."
    assert completed.stderr.splitlines()[-1] == report
    assert completed.stdout == ""


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    completed = _main_with("KeyboardInterrupt", two_rank_run(tmp_path / "run"))
    assert completed.returncode == 130, completed.stderr
    assert "Traceback" not in completed.stderr and "bug" not in completed.stderr


def _read_then_close(arguments: list[str], lines: int) -> tuple[int, str]:
    """`bpseval ARGUMENTS | head -LINES`: read `lines` lines of stdout, close it; the exit code and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bpseval", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    for _ in range(lines):
        process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.stderr.close()
    return process.wait(timeout=120), stderr


def _long_output_run(run: Path) -> Path:
    """One dataset of 600 cells: its JSON and CSV are far larger than a pipe holds, so the writer is still writing."""
    write_raw_shard(run / "step-000000" / "rank-0000.h5", {"d": poisson_dataset(0, n_rows=20, n_cells=600)})
    return run


@pytest.mark.parametrize(
    ("run", "output", "lines"),
    [
        ("example", [], 0),
        ("example", [], 1),
        ("example", ["--json", "-"], 0),
        ("example", ["--csv", "-"], 0),
        ("long", ["--json", "-"], 1),
        ("long", ["--csv", "-"], 1),
    ],
)
def test_a_closed_stdout_ends_quietly_with_0_or_141(tmp_path, run, output, lines):
    """As `bpseval compute RUN | head -1`: it exited 1 (a failed gate) or 2 ("Error: [Errno 32] Broken pipe")."""
    path = REPO / "examples" / "runs" / "exp1" if run == "example" else _long_output_run(tmp_path / "run")
    code, stderr = _read_then_close(["compute", str(path), "--no-cache", *output], lines)
    assert code in (0, 141), stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "Error" not in stderr, stderr
    if lines == 0:  # closed before the first write, which fails then (a later one may be cut short without error)
        assert code == 141
