"""Stats-only shards: the same numbers as raw shards, a few KB per dataset, and their limits."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

import bpseval
from bpseval import BpsevalError, ShardWriter
from bpseval.features.planning import distributed_sampler_indices
from bpseval.kernel.cellstats import STAT_FIELDS
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


def stored_members(path) -> tuple[set[str], set[str]]:
    """The arrays of dataset 'Allen_2022-04-13' of a shard, and those of its blocks/ group."""
    with h5py.File(path, "r") as handle:
        group = handle["datasets/Allen_2022-04-13"]
        return set(group) - {"blocks"}, set(group["blocks"])


def test_the_writer_stores_every_statistic_in_the_totals_and_the_blocks(tmp_path):
    write(tmp_path, "stats", world_size=1, block_size=100)
    (path,) = tmp_path.rglob("*.h5")
    totals, blocks = stored_members(path)
    assert totals == {*STAT_FIELDS, "cell_ids"}
    assert blocks == {*STAT_FIELDS, "block_ids"}


def drop_new_fields(path) -> None:
    """Rewrite a stats-only shard as it was written before pseudo_r2 and corr: n_valid, weight, spikes, model_ll."""
    with h5py.File(path, "r+") as handle:
        for group in handle["datasets"].values():
            for holder in (group, group["blocks"]):
                for key in STAT_FIELDS[4:]:
                    del holder[key]


def test_a_four_field_stats_shard_is_read_with_exact_bps_and_null_pseudo_r2_and_corr(invoke, tmp_path):
    write(tmp_path / "new", "stats", block_size=100)
    legacy = write(tmp_path / "legacy", "stats", block_size=100)
    for path in legacy.rglob("*.h5"):
        drop_new_fields(path)
    new, old = bpseval.evaluate(tmp_path / "new"), bpseval.evaluate(legacy)
    pd.testing.assert_series_equal(old.cells["bps"], new.cells["bps"], rtol=1e-12)
    assert new.cells["pseudo_r2"].notna().any() and new.cells["corr"].notna().any()
    assert old.cells["pseudo_r2"].isna().all() and old.cells["corr"].isna().all()
    result = invoke("compute", legacy, "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    for entry in (*document["datasets"], document["overall"]):
        assert (entry["pseudo_r2"], entry["pseudo_r2_pooled"], entry["corr"]) == (None, None, None)
    assert [d["bps"] for d in document["datasets"]] == pytest.approx(new.datasets["bps"].tolist(), rel=1e-12)
    assert document["overall"]["bps"] == pytest.approx(new.overall.bps, rel=1e-12)
    assert all(cell["pseudo_r2"] is None and cell["corr"] is None for cell in document["cells"])


def test_a_stats_shard_holding_only_some_of_the_new_fields_exits_2_naming_them(invoke, tmp_path):
    write(tmp_path, "stats", world_size=1)
    (path,) = tmp_path.rglob("*.h5")
    with h5py.File(path, "r+") as handle:
        del handle["datasets/Allen_2022-04-13/co_m2"]
        del handle["datasets/Allen_2022-04-13/rate_max"]
    result = invoke("compute", tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"Error: {path}: dataset 'Allen_2022-04-13': co_m2, rate_max missing; a stats-only dataset holds every one"
        f" of {', '.join(STAT_FIELDS)}.\n"
    )


@pytest.mark.parametrize("counts", ["equal to the rates", "their squared offsets"])
def test_rates_near_1e9_with_a_small_spread_are_read_not_taken_for_damage(tmp_path, counts):
    """Centred sums of values far from 0 round by about eps·|mean|·spread: the blocks merged in another order
    differ from the totals by far more than eps times the moment, which is rounding, not damage."""
    x = np.random.default_rng(1).normal(0.0, 0.37, (6000, 2))
    rhat = 1e9 + x
    robs = 1e9 + (x if counts == "equal to the rates" else x * x)
    for store in ("raw", "stats"):
        with ShardWriter(tmp_path / store, 0, 1, store=store, block_size=5) as writer:
            for start in range(0, 6000, 500):
                rows = slice(start, start + 500)
                writer.add("d", rhat[rows], robs[rows], sample_idx=np.arange(start, start + 500))
    raw, stats = bpseval.evaluate(tmp_path / "raw"), bpseval.evaluate(tmp_path / "stats")
    assert stats.cells["status"].tolist() == ["ok", "ok"]
    np.testing.assert_allclose(stats.cells["corr"], raw.cells["corr"], atol=1e-7)  # the inputs hold ~7 digits of x
