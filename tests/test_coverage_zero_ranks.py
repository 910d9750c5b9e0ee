"""`bpseval coverage` lists the legacy crash case: cells with no valid sample on some rank, whatever the threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import bpseval
from tests.conftest import table_rows, write_raw_shard

# Two ranks, 3 cells, 12 samples each. Cell 1 is never valid on rank 1, cell 2 never on any rank.
RANK_DFS = {0: np.ones((12, 3), np.float32), 1: np.ones((12, 3), np.float32)}
RANK_DFS[1][:, 1] = 0
RANK_DFS[0][:, 2] = RANK_DFS[1][:, 2] = 0


def write_run(run_dir, rank_dfs: dict[int, np.ndarray], cell_ids=None) -> None:
    """One dataset; rank r's rows are samples r, r + W, ...; `rank_dfs[r]` is its mask."""
    world_size = len(rank_dfs)
    for rank, dfs in rank_dfs.items():
        rows = np.arange(len(dfs)) * world_size + rank
        arrays = {
            "rhat": np.full(dfs.shape, 0.5, np.float32),
            "robs": np.ones(dfs.shape, np.float32),
            "dfs": dfs,
            "sample_idx": rows,
        }
        if cell_ids is not None:
            arrays["cell_ids"] = cell_ids
        write_raw_shard(run_dir / f"rank{rank}.h5", {"V1": arrays}, rank=rank, world_size=world_size, step=2)


@pytest.fixture
def run_dir(tmp_path):
    write_run(tmp_path, RANK_DFS, cell_ids=np.array([101, 102, 103]))
    return tmp_path


EXPECTED = [
    {"dataset": "V1", "cell": 1, "cell_id": 102, "n_valid": 12, "per_rank": [12, 0], "ranks_without": [1]},
    {"dataset": "V1", "cell": 2, "cell_id": 103, "n_valid": 0, "per_rank": [0, 0], "ranks_without": [0, 1]},
]


def test_cells_without_a_valid_sample_on_a_rank_are_listed_although_the_threshold_passes(invoke, run_dir, tmp_path):
    result = invoke("coverage", run_dir, "--min-samples", "0", "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output  # not a gate failure by itself
    document = json.loads((tmp_path / "c.json").read_text())
    assert document["cells"] == []
    assert document["zero_on_some_rank"] == EXPECTED
    assert "no valid sample on some rank: 2" in result.stdout
    section = result.stdout[result.stdout.index("some rank") :]
    rows = [row for row in table_rows(section) if row[0] == "V1"]
    assert [row[1:6] for row in rows] == [["1", "102", "12", "12", "0 ✗"], ["2", "103", "0", "0 ✗", "0 ✗"]]
    assert "every cell has at least 0 valid samples" in result.stdout


def test_below_the_threshold_too_the_list_is_the_same_and_the_gate_still_fails(invoke, run_dir):
    result = invoke("coverage", run_dir, "--min-samples", "25", "--json", "-")
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    assert document["zero_on_some_rank"] == EXPECTED
    assert [cell["cell"] for cell in document["cells"]] == [0, 1, 2]


def test_a_run_where_every_rank_saw_every_cell_lists_none(invoke, tmp_path):
    write_run(tmp_path, {0: np.ones((4, 2), np.float32), 1: np.ones((4, 2), np.float32)})
    result = invoke("coverage", tmp_path, "--min-samples", "1", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["zero_on_some_rank"] == []
    assert "some rank" not in invoke("coverage", tmp_path, "--min-samples", "1").stdout


def test_the_python_report_has_the_same_list(run_dir):
    frame = bpseval.check_coverage(run_dir, min_samples=0).zero_on_some_rank
    assert frame.to_dict(orient="records") == EXPECTED


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), world_size=st.integers(1, 4), n_cells=st.integers(1, 4))
def test_listed_cells_are_exactly_those_some_rank_saw_no_valid_sample_of(tmp_path_factory, data, world_size, n_cells):
    mask = st.integers(0, 5).flatmap(lambda n: arrays(np.float32, (n, n_cells), elements=st.sampled_from([0.0, 1.0])))
    masks = {rank: data.draw(mask) for rank in range(world_size)}
    run_dir = tmp_path_factory.mktemp("zero")
    write_run(run_dir, masks)
    per_rank = np.stack([(mask > 0).sum(axis=0) for mask in masks.values()], axis=1)
    expected = [
        (cell, per_rank[cell].tolist(), np.flatnonzero(per_rank[cell] == 0).tolist())
        for cell in range(n_cells)
        if (per_rank[cell] == 0).any()
    ]
    document = bpseval.check_coverage(run_dir, min_samples=0, step=2).to_dict()
    assert [(row["cell"], row["per_rank"], row["ranks_without"]) for row in document["zero_on_some_rank"]] == expected
