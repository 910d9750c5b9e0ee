"""Stats-only shards: the same numbers as raw shards, a few KB per dataset, and their limits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import bpseval
from bpseval import BpsevalError, ShardWriter
from bpseval.features.planning import distributed_sampler_indices
from tests.conftest import poisson_dataset

DATASETS = {
    "Allen_2022-04-13": poisson_dataset(1, n_rows=2000, n_cells=40),
    "Allen_2022-05-02": poisson_dataset(2, n_rows=1500, n_cells=23),
}


def write(run_dir, store: str, world_size: int = 2, padding: bool = False, **options):
    for rank in range(world_size):
        with ShardWriter(run_dir, rank, world_size, store=store, **options) as writer:
            for name, arrays in DATASETS.items():
                n_rows = len(arrays["rhat"])
                rows = (
                    distributed_sampler_indices(n_rows, world_size, rank)
                    if padding
                    else np.arange(rank, n_rows, world_size)
                )
                for start in range(0, len(rows), 128):
                    batch = rows[start : start + 128]
                    writer.add(
                        name,
                        *(arrays[key][batch] for key in ("rhat", "robs", "dfs")),
                        sample_idx=batch,
                        cell_ids=np.arange(arrays["rhat"].shape[1]) + 7,
                    )
    return run_dir


def test_same_numbers_as_raw_shards(tmp_path):
    raw, stats = (
        bpseval.evaluate(write(tmp_path / "raw", "raw", 3)),
        bpseval.evaluate(write(tmp_path / "stats", "stats", 3)),
    )
    pd.testing.assert_frame_equal(
        raw.datasets.drop(columns="identity"), stats.datasets.drop(columns="identity"), rtol=1e-12
    )
    pd.testing.assert_frame_equal(raw.cells, stats.cells, rtol=1e-12)
    assert stats.overall.bps == pytest.approx(raw.overall.bps, rel=1e-12)
    raw_cov = bpseval.check_coverage(tmp_path / "raw", 10_000)
    stats_cov = bpseval.check_coverage(tmp_path / "stats", 10_000)
    assert raw_cov.cells["per_rank"].tolist() == stats_cov.cells["per_rank"].tolist()


def test_a_few_kilobytes_per_dataset(tmp_path):
    write(tmp_path, "stats")
    sizes = [path.stat().st_size for path in tmp_path.rglob("*.h5")]
    assert max(sizes) < 2 * 40_000, sizes


def test_repeats_on_one_rank_are_dropped_and_across_ranks_reported(invoke, tmp_path):
    write(tmp_path, "stats", world_size=3, padding=True)
    result = invoke("compute", tmp_path, "--json", "-")
    assert result.exit_code == 0, result.output
    assert "samples repeated across ranks (DistributedSampler padding) were not checked" in result.stderr
    document = json.loads(result.stdout)
    padding = {name: 3 * -(-len(arrays["rhat"]) // 3) - len(arrays["rhat"]) for name, arrays in DATASETS.items()}
    assert {d["name"]: d["samples"] for d in document["datasets"]} == {
        name: len(arrays["rhat"]) + padding[name] for name, arrays in DATASETS.items()
    }


def test_repeats_within_a_rank_are_dropped_by_the_writer(tmp_path):
    arrays = DATASETS["Allen_2022-05-02"]
    with ShardWriter(tmp_path, 0, 1, store="stats") as writer:
        for rows in (np.arange(0, 100), np.arange(50, 150), np.array([150, 150, 151])):
            writer.add("d", *(arrays[key][rows] for key in ("rhat", "robs", "dfs")), sample_idx=rows)
    result = bpseval.evaluate(tmp_path)
    assert result.datasets[["samples", "duplicates_dropped"]].values.tolist() == [[152, 51]]
    reference = bpseval.bits_per_spike(*(arrays[key][:152] for key in ("rhat", "robs", "dfs")))
    np.testing.assert_allclose(result.cells["bps"], reference["bps"], rtol=1e-12)


def test_mixed_raw_and_stats_shards_in_one_step_exit_2(invoke, tmp_path):
    with ShardWriter(tmp_path, 0, 2, store="raw") as writer:
        writer.add("d", np.ones((3, 2)), np.ones((3, 2)))
    with ShardWriter(tmp_path, 1, 2, store="stats") as writer:
        writer.add("d", np.ones((3, 2)), np.ones((3, 2)))
    result = invoke("compute", tmp_path)
    assert result.exit_code == 2 and "mixes raw and stats-only shards" in result.stderr


def test_bad_values_are_refused_when_written(tmp_path):
    with (
        pytest.raises(BpsevalError, match="dataset 'd': rhat has 1 NaN or infinite value"),
        ShardWriter(tmp_path, 0, 1, store="stats") as writer,
    ):
        writer.add("d", np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    assert not list(tmp_path.rglob("*.h5"))


def test_paired_compare_between_stats_only_runs(invoke, tmp_path):
    write(tmp_path / "a", "stats", block_size=100)
    write(tmp_path / "b", "stats", world_size=3, block_size=100)
    result = invoke("compare", tmp_path / "b", "--baseline", tmp_path / "a", "--significance", "0.05", "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["mode"] == "paired"
    assert all(abs(bound) < 1e-12 for m in document["metrics"] for bound in m["interval"])


def test_block_sizes_must_agree_across_ranks(invoke, tmp_path):
    for rank, block_size in ((0, 100), (1, 50)):
        with ShardWriter(tmp_path, rank, 2, store="stats", block_size=block_size) as writer:
            writer.add("d", np.ones((3, 2)), np.ones((3, 2)), sample_idx=np.arange(3) + 3 * rank)
    result = invoke("compute", tmp_path)
    assert result.exit_code == 2 and "stats blocks of 50 samples" in result.stderr
