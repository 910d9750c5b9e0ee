"""The pre-training coverage planner against what a real DistributedSampler and DataLoader yield."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import bpseval
from bpseval.features.coverage import coverage_report
from bpseval.features.overview import load_overview
from bpseval.features.planning import distributed_sampler_indices


def real_counts(mask, world_size, fraction, batch_size, seed):
    """Per-rank valid counts and distinct valid samples, from real sampler and loader indices."""
    per_rank, seen = [], set()
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(len(mask)), num_replicas=world_size, rank=rank, shuffle=seed is not None, seed=seed or 0
        )
        loader = DataLoader(range(len(mask)), batch_size=batch_size or 1, sampler=sampler)
        kept_batches = int(len(loader) * fraction)
        indices = [int(i) for batch_index, batch in enumerate(loader) if batch_index < kept_batches for i in batch]
        per_rank.append(mask[indices].sum(axis=0))
        seen.update(indices)
    return np.array(per_rank), mask[sorted(seen)].sum(axis=0)


@pytest.mark.parametrize("n_samples", [1, 7, 64, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [None, 0, 17])
def test_indices_equal_the_real_distributed_sampler(n_samples, world_size, seed):
    for rank in range(world_size):
        real = list(
            DistributedSampler(
                range(n_samples), num_replicas=world_size, rank=rank, shuffle=seed is not None, seed=seed or 0
            )
        )
        assert distributed_sampler_indices(n_samples, world_size, rank, seed=seed).tolist() == real


@pytest.mark.parametrize(
    ("world_size", "fraction", "batch_size", "seed"),
    [
        (1, 1.0, None, None),
        (2, 0.1, 16, None),
        (3, 0.25, 7, None),
        (2, 0.1, 8, 3),
        (4, 1.0, 5, 11),
        (2, 0.5, None, None),
    ],
)
def test_prediction_equals_real_sampler_counts(world_size, fraction, batch_size, seed):
    rng = np.random.default_rng(world_size)
    mask = rng.random((333, 12)) < np.linspace(0.01, 0.9, 12)
    mask[:, 0] = False
    mask[100, 0] = True  # a cell with one valid sample
    frame = bpseval.check_cell_coverage(
        mask, world_size=world_size, fraction=fraction, batch_size=batch_size, min_samples=10, seed=seed
    )
    per_rank, total = real_counts(mask, world_size, fraction, batch_size, seed)
    for rank in range(world_size):
        np.testing.assert_array_equal(frame[f"rank_{rank}"], per_rank[rank])
    np.testing.assert_array_equal(frame["n_valid"], total)
    assert frame["below"].tolist() == (total < 10).tolist()
    assert frame["zero_ranks"].tolist() == [list(np.flatnonzero(per_rank[:, c] == 0)) for c in range(12)]


def test_single_column_mask_applies_to_every_cell_and_accepts_tensors():
    mask = torch.zeros(100, 1)
    mask[::3] = 1
    frame = bpseval.check_cell_coverage(mask, world_size=2, min_samples=40)
    assert frame["n_valid"].tolist() == [34] and frame["below"].tolist() == [True]
    assert (frame["rank_0"] + frame["rank_1"]).tolist() == [34]


def test_fraction_that_keeps_no_batch_is_refused_like_lightning():
    with pytest.raises(bpseval.BpsevalError, match="keeps no batch"):
        bpseval.check_cell_coverage(np.ones((100, 2)), world_size=2, fraction=0.01, batch_size=16)


def seed_scenario_mask() -> np.ndarray:
    """Cell 2 starts being recorded at sample 63: in the first 64 samples only one valid sample."""
    mask = np.ones((1280, 3), dtype=np.float32)
    mask[:63, 2] = 0
    return mask


def test_plan_command_on_npy_exits_1_and_names_the_zero_rank(invoke, tmp_path):
    np.save(tmp_path / "val_dfs.npy", seed_scenario_mask())
    args = ("plan", tmp_path / "val_dfs.npy", "--world-size", "2", "--fraction", "0.05", "--batch-size", "16")
    result = invoke(*args, "--min-samples", "10", "--json", "-")
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)
    assert document["datasets"][0]["name"] == "val_dfs"
    assert document["datasets"][0]["flagged"] == [
        {"cell": 2, "n_valid": 1, "per_rank": [0, 1], "zero_ranks": [0], "below": True}
    ]
    table = invoke(*args, "--min-samples", "10").stdout
    assert "val_dfs: 3 cells, 1 predicted below 10 valid samples" in table and "0 ✗" in table
    assert invoke(*args, "--min-samples", "1").exit_code == 0


def test_plan_command_reads_every_array_of_an_hdf5_file(invoke, tmp_path):
    with h5py.File(tmp_path / "masks.h5", "w") as handle:
        handle["Allen_2022-04-13/dfs"] = seed_scenario_mask()
        handle["Allen_2022-05-02"] = np.ones((500, 1))
    result = invoke("plan", tmp_path / "masks.h5", "--world-size", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    names = [dataset["name"] for dataset in json.loads(result.stdout)["datasets"]]
    assert names == ["Allen_2022-04-13/dfs", "Allen_2022-05-02"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("missing", "no such file"), ("text", "cannot be read as .npy or HDF5"), ("empty", "holds no 1-D or 2-D")],
)
def test_plan_command_bad_input_exits_2(invoke, tmp_path, content, message):
    path = tmp_path / "masks.h5"
    if content == "text":
        path.write_text("hello")
    elif content == "empty":
        h5py.File(path, "w").close()
    result = invoke("plan", path)
    assert result.exit_code == 2 and message in result.stderr


def test_plan_command_too_small_fraction_exits_2(invoke, tmp_path):
    np.save(tmp_path / "m.npy", np.ones((100, 2)))
    result = invoke("plan", tmp_path / "m.npy", "--world-size", "2", "--fraction", "0.01", "--batch-size", "16")
    assert result.exit_code == 2 and "keeps no batch" in result.stderr


@pytest.mark.parametrize(
    ("n_samples", "world_size", "seed", "store"),
    [(9, 2, None, "raw"), (10, 4, 3, "raw"), (7, 3, None, "stats"), (3, 4, None, "raw")],
    ids=["one padding copy", "two copies, shuffled", "stats-only shards", "more ranks than samples"],
)
def test_plan_and_coverage_give_the_same_per_rank_counts_padding_copies_included(
    tmp_path, n_samples, world_size, seed, store
):
    """Shards written as DistributedSampler deals the samples (N not a multiple of the world size: the last
    ranks get copies of the first samples): `plan` predicts what `coverage` then reports, rank by rank, also
    when the coverage is read back from the merge cache."""
    rng = np.random.default_rng(n_samples)
    mask = rng.random((n_samples, 4)) > 0.4
    mask[0] = True  # sample 0, the first to be repeated as padding, is valid for every cell
    rhat = rng.gamma(2.0, 0.5, size=(n_samples, 4))
    robs = rng.poisson(rhat).astype(np.float64)
    run = tmp_path / "run"
    for rank in range(world_size):
        index = distributed_sampler_indices(n_samples, world_size, rank, seed=seed)
        with bpseval.ShardWriter(run, rank, world_size, store=store) as writer:
            writer.add("session", rhat[index], robs[index], mask[index].astype(np.float32), sample_idx=index)
    plan = bpseval.check_cell_coverage(mask, world_size=world_size, seed=seed, min_samples=0)
    predicted = plan[[f"rank_{rank}" for rank in range(world_size)]].to_numpy().tolist()
    for cache in (False, True, True):  # the second cached pass reads the entry the first one wrote
        report = bpseval.check_coverage(run, min_samples=10**6, cache=cache)
        assert report.cells["per_rank"].tolist() == predicted
    overview = load_overview(run, cache=False)  # what the HTML report's coverage section reads
    assert coverage_report(overview.scored, 10**6).cells["per_rank"].tolist() == predicted
    if store == "raw":
        assert report.cells["n_valid"].tolist() == plan["n_valid"].tolist()  # in total, each sample once
