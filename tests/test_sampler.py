"""CellBalancedDistributedSampler: its guarantees as properties, and a real 2-process run."""

from __future__ import annotations

import functools
import operator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler

import bpseval
from bpseval import CellBalancedDistributedSampler, ShardWriter
from bpseval.errors import ArgumentError
from tests.gloo import run_gloo


def rank_lists(mask, world_size, **kwargs):
    samplers = [CellBalancedDistributedSampler(mask, world_size, rank, **kwargs) for rank in range(world_size)]
    return samplers, [list(sampler) for sampler in samplers]


masks = st.integers(1, 120).flatmap(
    lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=5).map(
        lambda columns: np.array(columns, dtype=bool).T
    )
)


@settings(max_examples=60, deadline=None)
@given(mask=masks, world_size=st.integers(1, 6), shuffle=st.booleans(), seed=st.integers(0, 100))
def test_every_sample_is_used_exactly_once_and_ranks_differ_by_at_most_one(mask, world_size, shuffle, seed):
    samplers, lists = rank_lists(mask, world_size, shuffle=shuffle, seed=seed)
    used = [index for indices in lists for index in indices]
    assert sorted(used) == list(range(len(mask)))
    lengths = [len(indices) for indices in lists]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == [len(sampler) for sampler in samplers]


@settings(max_examples=60, deadline=None)
@given(mask=masks, world_size=st.integers(2, 6), shuffle=st.booleans(), n_cells=st.integers(1, 4))
def test_cells_sharing_one_mask_stay_within_one_sample_per_rank_in_every_prefix(mask, world_size, shuffle, n_cells):
    shared = np.repeat(mask[:, :1], n_cells, axis=1)
    _, lists = rank_lists(shared, world_size, shuffle=shuffle)
    for prefix in range(1, min(len(indices) for indices in lists) + 1):
        counts = np.array([shared[indices[:prefix]].sum(axis=0) for indices in lists])
        assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all(), (prefix, counts)


@settings(max_examples=30, deadline=None)
@given(mask=masks, world_size=st.integers(1, 4))
def test_without_shuffle_the_order_is_the_same_every_epoch(mask, world_size):
    samplers, first = rank_lists(mask, world_size)
    for sampler in samplers:
        sampler.set_epoch(3)
    assert [list(sampler) for sampler in samplers] == first


def test_with_shuffle_the_order_changes_with_the_epoch_but_not_the_set():
    mask = np.random.default_rng(0).random((200, 3)) < 0.7
    samplers, first = rank_lists(mask, 2, shuffle=True, seed=5)
    for sampler in samplers:
        sampler.set_epoch(1)
    second = [list(sampler) for sampler in samplers]
    assert second != first
    assert (
        sorted(functools.reduce(operator.iadd, second, []))
        == sorted(functools.reduce(operator.iadd, first, []))
        == list(range(200))
    )


def test_rank_and_world_size_come_from_the_process_group_or_must_be_given():
    with pytest.raises(ArgumentError, match="pass num_replicas and rank"):
        CellBalancedDistributedSampler(np.ones((4, 1)))
    with pytest.raises(ArgumentError, match=r"outside 0\.\.1"):
        CellBalancedDistributedSampler(np.ones((4, 1)), num_replicas=2, rank=2)


# ----------------------------------------------------------------------------------------------
# The seed scenario in a real 2-process gloo run.

N_SAMPLES, N_CELLS, BATCH, FRACTION = 1280, 3, 16, 0.05
LATE_CELL = 2
PASSES = {0: ("plain", FRACTION), 1: ("balanced", FRACTION), 2: ("plain", 1.0), 3: ("balanced", 1.0)}
"""Shard step -> (sampler, fraction of batches scored)."""


def scenario_data() -> dict[str, torch.Tensor]:
    """Cell 2 is recorded from sample 63 on: the plain sampler's first 64 samples hold one valid one."""
    rng = np.random.default_rng(0)
    rhat = rng.gamma(2.0, 0.5, size=(N_SAMPLES, N_CELLS))
    dfs = np.ones((N_SAMPLES, N_CELLS))
    dfs[:63, LATE_CELL] = 0.0
    return {
        "rhat": torch.tensor(rhat, dtype=torch.float32),
        "robs": torch.tensor(rng.poisson(rhat), dtype=torch.float32),
        "dfs": torch.tensor(dfs, dtype=torch.float32),
    }


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, index: int) -> dict:
        return {**{key: value[index] for key, value in self.data.items()}, "sample_idx": index}


def validation_passes(rank: int, world_size: int, run_dir: str) -> None:
    data = scenario_data()
    dataset = DictDataset(data)
    for step, (kind, fraction) in PASSES.items():
        if kind == "plain":
            sampler = DistributedSampler(dataset, shuffle=False)
        else:
            sampler = CellBalancedDistributedSampler(data["dfs"])
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
        with ShardWriter.from_process_group(run_dir, step=step) as writer:
            for batch in islice(loader, max(1, int(fraction * len(loader)))):
                writer.add(
                    "Allen_2022-04-13", batch["rhat"], batch["robs"], batch["dfs"], sample_idx=batch["sample_idx"]
                )


@pytest.fixture(scope="module")
def scenario_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sampler_run")
    run_gloo(validation_passes, 2, str(run_dir))
    return run_dir


def per_rank_counts(run_dir: Path, step: int) -> np.ndarray:
    report = bpseval.check_coverage(run_dir, min_samples=N_SAMPLES + 1, step=step)
    return np.array(report.cells["per_rank"].tolist())


def test_plain_sampler_leaves_the_late_cell_without_samples_on_a_rank(scenario_run):
    counts = per_rank_counts(scenario_run, step=0)
    assert counts[LATE_CELL].tolist() == [0, 1]


def test_balanced_sampler_gives_every_cell_samples_on_every_rank(scenario_run):
    counts = per_rank_counts(scenario_run, step=1)
    assert (counts > 0).all()
    assert (np.abs(counts[:, 0] - counts[:, 1]) <= 1).all()
    assert counts[LATE_CELL].sum() > 50


def test_full_pass_bps_is_the_same_with_either_sampler(scenario_run):
    plain, balanced = bpseval.evaluate(scenario_run, step=2), bpseval.evaluate(scenario_run, step=3)
    assert plain.datasets["duplicates_dropped"].tolist() == [0] and balanced.datasets["samples"].tolist() == [N_SAMPLES]
    np.testing.assert_allclose(balanced.cells["bps"], plain.cells["bps"], rtol=1e-12)
    assert balanced.overall.bps == pytest.approx(plain.overall.bps, rel=1e-12)
    reference = bpseval.bits_per_spike(*scenario_data().values())
    np.testing.assert_allclose(balanced.cells["bps"], reference["bps"], rtol=1e-12)
