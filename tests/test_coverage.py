"""`bpseval coverage`: per-cell and per-rank valid-sample counts after merging, and the CI gate."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

import bpseval
from tests.conftest import table_rows, write_raw_shard

# Hand-made two-rank run of one dataset with 4 cells. Rank 1 repeats sample 0 as padding.
#   rank 0: samples 0, 2, 4, 6        rank 1: samples 1, 3, 5, 7, 0 (padding copy)
RANK0_DFS = np.array(
    [
        [1, 1, 0, 1],
        [1, 1, 0, 1],
        [1, 0, 0, 1],
        [1, 0, 0, 1],
    ],
    dtype=np.float32,
)
RANK1_DFS = np.array(
    [
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 0, 0],
        [1, 1, 0, 1],  # copy of sample 0
    ],
    dtype=np.float32,
)
# Per rank, what each rank saw, its padding copy included (as `bpseval plan` predicts); in total, each sample once:
# cell 0: 4 + 4 = 8 valid (the copy counted once), per rank [4, 5]
# cell 1: 2 on rank 0, 1 on rank 1 (its copy of sample 0): 2 in all
# cell 2: 0 on rank 0, 1 on rank 1                     -> no valid sample on rank 0
# cell 3: 4 on rank 0, 1 on rank 1 (the copy), and no spikes -> silent
EXPECTED = {0: (8, [4, 5]), 1: (2, [2, 1]), 2: (1, [0, 1]), 3: (4, [4, 1])}


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    samples = {0: [0, 2, 4, 6], 1: [1, 3, 5, 7, 0]}
    rhat = rng.gamma(2.0, 0.5, size=(8, 4)).astype(np.float32)
    robs = np.ones((8, 4), dtype=np.float32)
    robs[:, 3] = 0.0
    for rank, dfs in ((0, RANK0_DFS), (1, RANK1_DFS)):
        index = np.array(samples[rank])
        write_raw_shard(
            tmp_path / f"rank{rank}.h5",
            {"Allen_2022-04-13": {"rhat": rhat[index], "robs": robs[index], "dfs": dfs, "sample_idx": index}},
            rank=rank,
            world_size=2,
            step=4,
        )
    return tmp_path


def test_per_rank_counts_match_the_hand_computed_case(run_dir):
    report = bpseval.check_coverage(run_dir, min_samples=100)
    got = {row.cell: (row.n_valid, row.per_rank) for row in report.cells.itertuples()}
    assert got == EXPECTED
    assert report.cells.set_index("cell").loc[3, "status"] == "silent"
    summary = report.datasets.iloc[0].to_dict()
    assert summary == {
        "name": "Allen_2022-04-13",
        "cells": 4,
        "below": 4,
        "uncovered": 0,
        "silent": 1,
        "excluded": 0,
        "min_n_valid": 1,
    }


def test_cli_lists_exactly_the_cells_below_and_exits_1(invoke, run_dir):
    result = invoke("coverage", run_dir, "--min-samples", "3", "--json", "-")
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    assert {key: document[key] for key in ("min_samples", "step", "world_size")} == {
        "min_samples": 3,
        "step": 4,
        "world_size": 2,
    }
    assert [(c["cell"], c["n_valid"], c["per_rank"]) for c in document["cells"]] == [(1, 2, [2, 1]), (2, 1, [0, 1])]
    assert document["cells"][0]["status"] == "ok" and document["cells"][0]["dataset"] == "Allen_2022-04-13"
    assert document["datasets"] == [
        {
            "name": "Allen_2022-04-13",
            "cells": 4,
            "below": 2,
            "uncovered": 0,
            "silent": 1,
            "excluded": 0,
            "min_n_valid": 1,
        }
    ]


def test_table_marks_ranks_without_valid_samples(invoke, run_dir):
    result = invoke("coverage", run_dir, "--min-samples", "3")
    assert result.exit_code == 1
    cell_2 = next(row for row in table_rows(result.stdout) if row[:2] == ["Allen_2022-04-13", "2"])
    assert cell_2[5:7] == ["0 ✗", "1"]
    assert "✗ 2 cells below 3 valid samples" in result.stdout


def test_exits_0_when_every_cell_meets_the_threshold(invoke, run_dir):
    result = invoke("coverage", run_dir, "--min-samples", "1")
    assert result.exit_code == 0, result.output
    assert "every cell has at least 1 valid samples" in result.stdout


def test_min_spikes_also_flags_cells_with_few_spikes(invoke, run_dir):
    result = invoke("coverage", run_dir, "--min-samples", "1", "--min-spikes", "1", "--json", "-")
    assert result.exit_code == 1
    flagged = json.loads(result.stdout)["cells"]
    assert [(c["cell"], c["reasons"]) for c in flagged] == [(3, ["below_min_spikes"])]


def test_csv_lists_the_flagged_cells(invoke, run_dir, tmp_path):
    invoke("coverage", run_dir, "--min-samples", "3", "--csv", tmp_path / "below.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "below.csv").read_text())))
    assert [(row["cell"], row["n_valid"]) for row in rows] == [("1", "2"), ("2", "1")]


def test_defaults_to_current_directory_and_min_samples_10(invoke, run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    result = invoke("coverage", "--json", "-")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["min_samples"] == 10


def test_bad_input_exits_2_with_the_compute_message(invoke, tmp_path):
    (tmp_path / "rank0.h5").write_text("not hdf5")
    for command in ("coverage", "compute"):
        result = invoke(command, tmp_path)
        assert result.exit_code == 2
        assert "rank0.h5: cannot be read as an HDF5 file" in result.stderr
    assert invoke("coverage", tmp_path, "--min-samples", "-1").exit_code == 2
