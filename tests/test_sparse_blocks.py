"""Stats-only shards keep only the blocks that hold samples, with their ids: memory follows the samples seen."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpseval
from bpseval import ShardWriter
from bpseval.kernel.cellstats import STAT_FIELDS
from bpseval.kernel.stats import batch_stats
from bpseval.run.merge import merge_run
from bpseval.shard.format import DEFAULT_BLOCK_SIZE, shard_path
from bpseval.shard.reader import read_header, read_stats
from tests.conftest import peak_bytes
from tests.test_cache import assert_same_merge

HUGE = (2 * 10**9, 2**62)
PEAK_BYTES = 8 << 20
"""A few MB; a dense array of blocks up to 2^62 // 500 cannot even be allocated."""


def _session(seed: int, index: np.ndarray, n_cells: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """True rates and Poisson counts, one row per sample_idx."""
    rng = np.random.default_rng(seed)
    rates = np.exp(rng.normal(0.0, 0.5, (len(index), n_cells)))
    return rates, rng.poisson(rates).astype(np.float64)


def _write(
    run: Path, index: np.ndarray, rhat: np.ndarray, robs: np.ndarray, world_size: int = 1, seed: int = 0, **options
) -> Path:
    """A stats-only run: the samples dealt at random to `world_size` ranks, each rank adding them in batches of 64."""
    owner = np.random.default_rng(seed).integers(0, world_size, len(index))
    for rank in range(world_size):
        rows = np.flatnonzero(owner == rank)
        with ShardWriter(run, rank, world_size, store="stats", **options) as writer:
            for start in range(0, len(rows), 64):
                batch = rows[start : start + 64]
                writer.add("d", rhat[batch], robs[batch], sample_idx=index[batch])
    return run


def test_two_samples_at_2e9_and_2_62_cost_a_few_mb_and_two_blocks(tmp_path):
    rhat, robs = np.full((2, 3), 0.5), np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])

    def write() -> None:
        with ShardWriter(tmp_path, 0, 1, store="stats") as writer:  # the default block size
            writer.add("d", rhat, robs, sample_idx=np.array(HUGE))

    assert peak_bytes(write) < PEAK_BYTES
    path = shard_path(tmp_path, 0, 0)
    layout = read_header(path).datasets["d"]
    assert layout.block_size == DEFAULT_BLOCK_SIZE
    total, blocks = read_stats(path, layout)
    assert blocks is not None
    assert blocks.ids.tolist() == [HUGE[0] // DEFAULT_BLOCK_SIZE, HUGE[1] // DEFAULT_BLOCK_SIZE]
    assert blocks.stats.spikes.tolist() == robs.tolist()
    assert total.spikes.tolist() == robs.sum(axis=0).tolist()
    with h5py.File(path, "r") as handle:
        assert handle["datasets/d/blocks/block_ids"].dtype == np.int64
        assert handle["datasets/d/blocks/n_valid"].shape == (2, 3)
    result = bpseval.evaluate(tmp_path)
    expected = bpseval.bits_per_spike(rhat, robs)
    np.testing.assert_allclose(result.cells["bps"], expected["bps"], rtol=1e-12)


def test_paired_compare_of_two_stats_only_runs_at_huge_sample_idx(invoke, tmp_path):
    """Same samples written by 1 and by 3 ranks: the blocks pair; the same model gives [0, 0], a worse one does not."""
    index = np.concatenate([np.arange(1500) + HUGE[0], np.arange(1500) + HUGE[1]])
    rates, robs = _session(1, index)
    noisy = rates * np.exp(np.random.default_rng(2).normal(0.0, 0.4, rates.shape))
    base = _write(tmp_path / "base", index, rates, robs)
    same = _write(tmp_path / "same", index, rates, robs, world_size=3, seed=5)
    worse = _write(tmp_path / "worse", index, noisy, robs, world_size=2, seed=6)
    args = ("--baseline", base, "--significance", "0.05", "--bootstrap", "200", "--json", "-")
    unchanged = invoke("compare", same, *args)
    assert unchanged.exit_code == 0, unchanged.output
    document = json.loads(unchanged.stdout)
    assert document["mode"] == "paired"
    assert all(abs(bound) < 1e-12 for metric in document["metrics"] for bound in metric["interval"])
    regressed = invoke("compare", worse, *args)
    assert regressed.exit_code == 1, regressed.output
    document = json.loads(regressed.stdout)
    assert document["mode"] == "paired"
    assert all(metric["interval"][1] < 0 for metric in document["metrics"])


def _dense_reference(index: np.ndarray, rhat: np.ndarray, robs: np.ndarray, block_size: int):
    """Per-block sums of the blocks that hold samples, in block order, computed from all samples at once."""
    ids = index // block_size
    rows = [batch_stats(rhat[ids == block], robs[ids == block]) for block in np.unique(ids)]
    return {key: np.stack([getattr(row, key) for row in rows]) for key in STAT_FIELDS}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    starts=st.lists(st.integers(0, 2**62), min_size=1, max_size=3),
    length=st.integers(1, 120),
    block_size=st.sampled_from([1, 7, DEFAULT_BLOCK_SIZE]),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 100),
)
def test_ranks_blocks_add_up_by_id_like_one_rank_that_saw_every_sample(
    tmp_path_factory, starts, length, block_size, world_size, seed
):
    index = np.unique(np.concatenate([np.arange(length, dtype=np.int64) + start for start in starts]))
    rates, robs = _session(seed, index, n_cells=3)
    run = _write(tmp_path_factory.mktemp("run"), index, rates, robs, world_size, seed, block_size=block_size)
    merged = merge_run(run).datasets[0].per_block
    reference = _dense_reference(index, rates, robs, block_size)
    assert merged is not None
    for key in STAT_FIELDS:
        np.testing.assert_allclose(getattr(merged, key), reference[key], rtol=1e-12, atol=1e-9)


def test_shards_without_block_ids_are_dense_blocks_from_0_and_merge_with_sparse_ones(tmp_path):
    """A shard written before block ids existed holds blocks 0..B-1; it merges by id with a rank's sparse blocks."""
    index = np.concatenate([np.arange(40), np.arange(20) + 10**12])  # rank 0: 0..39 (4 blocks), rank 1: the rest
    rates, robs = _session(3, index, n_cells=2)
    for rank, rows in enumerate((np.arange(40), np.arange(40, 60))):
        with ShardWriter(tmp_path, rank, 2, store="stats", block_size=10) as writer:
            writer.add("d", rates[rows], robs[rows], sample_idx=index[rows])
    old = shard_path(tmp_path, 0, 0)
    with h5py.File(old, "r+") as handle:
        del handle["datasets/d/blocks/block_ids"]
    _, blocks = read_stats(old, read_header(old).datasets["d"])
    assert blocks is not None and blocks.ids.tolist() == [0, 1, 2, 3]
    merged = merge_run(tmp_path).datasets[0].per_block
    reference = _dense_reference(index, rates, robs, 10)
    assert merged is not None and merged.n_valid.shape == (6, 2)
    for key in STAT_FIELDS:
        np.testing.assert_allclose(getattr(merged, key), reference[key], rtol=1e-12)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda ids: ids[::-1].copy(), "not strictly increasing"),
        (lambda ids: ids - ids.max() - 1, "outside 0.."),
        (lambda ids: ids.astype(np.float64), "must be integers of shape (2,)"),
        (lambda ids: ids[:1].copy(), "must be integers of shape (2,)"),
    ],
)
def test_damaged_block_ids_exit_2_naming_them(invoke, tmp_path, damage, fragment):
    with ShardWriter(tmp_path, 0, 1, store="stats") as writer:
        writer.add("d", np.ones((2, 2)), np.ones((2, 2)), sample_idx=np.array(HUGE))
    path = shard_path(tmp_path, 0, 0)
    with h5py.File(path, "r+") as handle:
        ids = handle["datasets/d/blocks/block_ids"][()]
        del handle["datasets/d/blocks/block_ids"]
        handle["datasets/d/blocks/block_ids"] = damage(ids)
    result = invoke("compute", tmp_path, "--no-cache")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.output
    for text in ("rank-0000.h5", "'d'", "blocks/block_ids", fragment):
        assert text in result.stderr


def test_the_merge_cache_round_trips_sparse_blocks(tmp_path):
    index = np.concatenate([np.arange(300) + HUGE[0], np.arange(200) + HUGE[1]])
    rates, robs = _session(4, index)
    run = _write(tmp_path / "run", index, rates, robs, world_size=2)
    first = merge_run(run, blocks=100, cache=True)
    cached = merge_run(run, blocks=100, cache=True)
    assert not first.cached and cached.cached
    blocks = len(np.unique(index // DEFAULT_BLOCK_SIZE))
    assert cached.datasets[0].per_block is not None and cached.datasets[0].per_block.n_valid.shape == (blocks, 5)
    assert_same_merge(cached, merge_run(run, blocks=100))
