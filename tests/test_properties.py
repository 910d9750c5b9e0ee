"""Property tests: how the data is split over ranks, files and batches never changes the numbers.

(a) Sharding: a run split over 1..5 ranks exactly as torch's DistributedSampler splits it
    (padding repeated samples, optionally shuffled) scores like one rank holding every sample once.
(b) Merge order: the order ranks are written in, the names and places of their files, and the
    order of the batches inside a rank do not matter.
(c) Batching: `bits_per_spike` on a whole array equals the merge of that array written in any
    batch sizes.

Sums taken in another order differ by rounding, so floats agree to 1e-9 relative, with an
absolute slack of 1e-11 times the magnitude of the log-likelihood terms that were summed.
Each example writes into its own TemporaryDirectory (pytest's tmp_path is shared by examples).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data.distributed import DistributedSampler

import bpseval
from bpseval import ShardWriter

REL = 1e-9
CANCELLATION = 1e-11
MIN_RATE = 1e-9
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Data:
    """One dataset's full validation arrays, as a model would produce them."""

    name: str
    rhat: np.ndarray
    robs: np.ndarray
    dfs: np.ndarray | None
    rate_kind: str

    @property
    def n_rows(self) -> int:
        return self.rhat.shape[0]

    def rows(self, index: list[int] | np.ndarray) -> dict:
        index = np.asarray(index, dtype=np.int64)
        return {
            "rhat": self.rhat[index],
            "robs": self.robs[index],
            "dfs": None if self.dfs is None else self.dfs[index],
            "rate_kind": self.rate_kind,
        }

    def magnitude(self) -> np.ndarray:
        """Per cell, the summed size of the log-likelihood terms: the scale of rounding in ll_gain."""
        n, c = self.rhat.shape
        w = np.ones((n, c)) if self.dfs is None else np.broadcast_to(self.dfs.reshape(n, -1), (n, c)).astype(np.float64)
        valid = w > 0
        x = np.where(valid, self.rhat.astype(np.float64), 0.0)
        y = np.where(valid, self.robs.astype(np.float64), 0.0)
        if self.rate_kind == "log_rate":
            rate, log_rate = np.exp(x), x
        else:
            rate = np.maximum(x, MIN_RATE)
            log_rate = np.log(rate)
        spikes, weight = (w * y).sum(axis=0), w.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            null = np.where(spikes > 0, spikes * np.abs(np.log(spikes / weight)) + spikes, 0.0)
        return (w * (np.abs(y * log_rate) + rate)).sum(axis=0) + null


@st.composite
def datasets(draw: st.DrawFn, name: str = "ds", max_rows: int = 24, max_cells: int = 5) -> Data:
    """Random rates and counts with all-zero mask cells, silent cells and NaN where dfs = 0."""
    n_rows = draw(st.integers(1, max_rows), label="n_rows")
    n_cells = draw(st.integers(1, max_cells), label="n_cells")
    rate_kind = draw(st.sampled_from(["rate", "log_rate"]))
    dfs_form = draw(st.sampled_from(["cells", "column", "rows", "absent"]))
    rhat_dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    integer_robs = draw(st.booleans())
    masked_cells = draw(st.lists(st.booleans(), min_size=n_cells, max_size=n_cells))
    silent_cells = draw(st.lists(st.booleans(), min_size=n_cells, max_size=n_cells))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))

    if rate_kind == "log_rate":
        rhat = rng.normal(-0.5, 1.2, (n_rows, n_cells))
        mean = np.exp(rhat)
    else:
        rhat = rng.gamma(1.5, 1.0, (n_rows, n_cells))
        rhat[rng.random((n_rows, n_cells)) < 0.08] = 0.0  # the 1e-9 floor
        mean = rhat + 0.2
    rhat = rhat.astype(rhat_dtype)
    robs = rng.poisson(mean * rng.uniform(0.5, 1.5, n_cells)).astype(np.float64)
    if not integer_robs:
        robs *= rng.uniform(0.3, 1.2, robs.shape)
    robs[:, np.array(silent_cells)] = 0.0

    if dfs_form == "cells":
        dfs = rng.choice([0.0, 0.0, 0.35, 1.0, 1.0, 1.0], size=(n_rows, n_cells))
        dfs[:, np.array(masked_cells)] = 0.0  # uncovered cells
    elif dfs_form == "column":
        dfs = rng.choice([0.0, 0.6, 1.0, 1.0], size=(n_rows, 1))
    elif dfs_form == "rows":
        dfs = rng.choice([0.0, 1.0, 1.0], size=n_rows).astype(bool)
    else:
        dfs = None
    if dfs is not None:
        invalid = np.broadcast_to(dfs.reshape(n_rows, -1) == 0, (n_rows, n_cells))
        rhat[invalid & (rng.random((n_rows, n_cells)) < 0.5)] = np.nan
        robs[invalid & (rng.random((n_rows, n_cells)) < 0.5)] = np.nan
    if integer_robs:
        robs = np.nan_to_num(robs, nan=7.0).astype(np.int64)
    return Data(name, rhat, robs, dfs, rate_kind)


@st.composite
def runs(draw: st.DrawFn, max_datasets: int = 2) -> list[Data]:
    count = draw(st.integers(1, max_datasets))
    return [draw(datasets(name=f"ds{i}")) for i in range(count)]


def sampler_indices(n_rows: int, world_size: int, rank: int, shuffle: bool, seed: int) -> list[int]:
    """The sample indices torch's DistributedSampler gives `rank` (padding included)."""
    return list(DistributedSampler(range(n_rows), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed))


def cut(n_rows: int, sizes: list[int]) -> list[slice]:
    """Consecutive slices of 1.. rows covering range(n_rows), sizes taken cyclically from `sizes`."""
    slices, start, i = [], 0, 0
    while start < n_rows:
        stop = min(n_rows, start + sizes[i % len(sizes)])
        slices.append(slice(start, stop))
        start, i = stop, i + 1
    return slices


def write_rank(
    run_dir: Path,
    rank: int,
    world_size: int,
    parts: dict[str, tuple[Data, list[int]]],
    batch_sizes: list[int],
    batch_order: list[int] | None = None,
) -> Path:
    """Write the rows `index` of each dataset for one rank, in batches, with sample_idx."""
    with ShardWriter(run_dir, rank=rank, world_size=world_size) as writer:
        for name, (data, index) in parts.items():
            batches = cut(len(index), batch_sizes)
            if batch_order is not None:
                batches = [
                    batches[i] for i in sorted(range(len(batches)), key=lambda i: batch_order[i % len(batch_order)])
                ]
            for rows in batches:
                chosen = index[rows]
                writer.add(name, sample_idx=np.asarray(chosen, dtype=np.int64), **data.rows(chosen))
    return writer.path


# ----------------------------------------------------------------------------------------------
# Comparing results


def _close(a: float, b: float, slack: float) -> bool:
    if math.isnan(b):
        return math.isnan(a)
    return math.isclose(a, b, rel_tol=REL, abs_tol=CANCELLATION * slack)


def assert_cells_agree(got: pd.DataFrame, want: pd.DataFrame, magnitude: np.ndarray) -> None:
    """Same per-cell statistics, up to rounding of sums taken in another order."""
    got, want = got.reset_index(drop=True), want.reset_index(drop=True)
    assert len(got) == len(want) == len(magnitude)
    assert list(got["n_valid"]) == list(want["n_valid"])
    assert list(got["status"]) == list(want["status"])
    for c in range(len(want)):
        spikes = want.at[c, "spikes"]
        for key, slack in (
            ("n", 0.0),
            ("spikes", 0.0),
            ("ll_gain", magnitude[c]),
            ("bps", magnitude[c] / (spikes * math.log(2)) if spikes > 0 else 0.0),
        ):
            assert _close(float(got.at[c, key]), float(want.at[c, key]), slack), (
                c,
                key,
                got.at[c, key],
                want.at[c, key],
            )


def assert_results_agree(
    got: bpseval.Result, want: bpseval.Result, data: list[Data], *, same_samples: bool = True
) -> None:
    """Same cells, per-dataset and overall numbers for the datasets in `data`."""
    magnitudes = {d.name: d.magnitude() for d in data}
    assert list(got.datasets["name"]) == list(want.datasets["name"]) == sorted(magnitudes)
    for name, magnitude in magnitudes.items():
        assert_cells_agree(
            got.cells[got.cells["dataset"] == name], want.cells[want.cells["dataset"] == name], magnitude
        )
    # Dataset and overall bps are means / ratios of per-cell values: bound their slack by the largest cell's.
    total_slack = max(float(m.max()) for m in magnitudes.values())
    min_spikes = (
        want.cells.loc[want.cells["status"] == "ok", "spikes"].min() if (want.cells["status"] == "ok").any() else 1.0
    )
    slack = total_slack * len(want.cells) / (min_spikes * math.log(2))
    g, w = got.datasets.set_index("name"), want.datasets.set_index("name")
    for name in magnitudes:
        for key in ("ok", "silent", "uncovered"):
            assert g.at[name, key] == w.at[name, key]
        if same_samples:
            assert g.at[name, "samples"] == w.at[name, "samples"]
        for key in ("bps", "bps_pooled"):
            assert _close(float(g.at[name, key]), float(w.at[name, key]), slack), (name, key)
    for key in ("bps", "bps_pooled"):
        assert _close(float(got.overall.to_dict()[key]), float(want.overall.to_dict()[key]), slack), key


# ----------------------------------------------------------------------------------------------
# (a) sharding invariance


@PROPERTY_SETTINGS
@given(
    data=runs(),
    world_size=st.integers(1, 5),
    shuffle=st.booleans(),
    sampler_seed=st.integers(0, 1000),
    batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
)
def test_distributed_sampler_sharding_scores_like_one_rank_without_padding(
    data, world_size, shuffle, sampler_seed, batch_sizes
):
    with tempfile.TemporaryDirectory() as tmp:
        single_dir, sharded_dir = Path(tmp, "single"), Path(tmp, "sharded")
        write_rank(single_dir, 0, 1, {d.name: (d, np.arange(d.n_rows)) for d in data}, [10**6])
        for rank in range(world_size):
            parts = {
                d.name: (d, np.asarray(sampler_indices(d.n_rows, world_size, rank, shuffle, sampler_seed)))
                for d in data
            }
            write_rank(sharded_dir, rank, world_size, parts, batch_sizes)
        single, sharded = bpseval.evaluate(single_dir), bpseval.evaluate(sharded_dir)

    assert_results_agree(sharded, single, data)
    padded = {d.name: -(-d.n_rows // world_size) * world_size - d.n_rows for d in data}
    assert dict(zip(sharded.datasets["name"], sharded.datasets["duplicates_dropped"], strict=True)) == padded
    assert dict(zip(sharded.datasets["name"], sharded.datasets["samples"], strict=True)) == {
        d.name: d.n_rows for d in data
    }
    assert list(single.datasets["duplicates_dropped"]) == [0] * len(data)


# ----------------------------------------------------------------------------------------------
# (b) merge-order invariance


@PROPERTY_SETTINGS
@given(
    data=runs(),
    world_size=st.integers(2, 5),
    shuffle=st.booleans(),
    batch_sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st_data=st.data(),
)
def test_rank_write_order_file_names_and_batch_order_do_not_change_the_result(
    data, world_size, shuffle, batch_sizes, st_data
):
    write_order = st_data.draw(st.permutations(range(world_size)), label="write_order")
    name_order = st_data.draw(st.permutations(range(world_size)), label="name_order")
    batch_order = st_data.draw(st.lists(st.integers(0, 100), min_size=1, max_size=8), label="batch_order")
    nested = st_data.draw(st.lists(st.booleans(), min_size=world_size, max_size=world_size), label="nested")
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir, shuffled_dir = Path(tmp, "plain"), Path(tmp, "shuffled")
        for rank in range(world_size):
            parts = {d.name: (d, np.asarray(sampler_indices(d.n_rows, world_size, rank, shuffle, 0))) for d in data}
            write_rank(plain_dir, rank, world_size, parts, batch_sizes)
        for rank in write_order:
            parts = {d.name: (d, np.asarray(sampler_indices(d.n_rows, world_size, rank, shuffle, 0))) for d in data}
            path = write_rank(shuffled_dir, rank, world_size, parts, batch_sizes, batch_order)
            # Rename so that sorted paths list the ranks in `name_order`, some nested deeper.
            position = name_order[rank]
            target = shuffled_dir / (f"n{position}/deeper/r.h5" if nested[rank] else f"n{position}.h5")
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
        plain, shuffled = bpseval.evaluate(plain_dir), bpseval.evaluate(shuffled_dir)

    assert_results_agree(shuffled, plain, data)
    assert list(shuffled.datasets["duplicates_dropped"]) == list(plain.datasets["duplicates_dropped"])


# ----------------------------------------------------------------------------------------------
# (c) batching invariance


@PROPERTY_SETTINGS
@given(
    data=datasets(max_rows=40, max_cells=6),
    batch_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    with_sample_idx=st.booleans(),
)
def test_bits_per_spike_of_whole_array_equals_merge_of_any_batching(data, batch_sizes, with_sample_idx):
    whole = bpseval.bits_per_spike(data.rhat, data.robs, data.dfs, rate_kind=data.rate_kind)
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, rank=0, world_size=1) as writer:
            for rows in cut(data.n_rows, batch_sizes):
                index = np.arange(data.n_rows)[rows]
                writer.add(
                    data.name,
                    sample_idx=index if with_sample_idx else None,
                    **data.rows(index),
                )
        merged = bpseval.evaluate(tmp)

    assert_cells_agree(merged.cells, whole, data.magnitude())
    assert list(merged.cells["cell"]) == list(whole["cell"])
    assert int(merged.datasets.at[0, "samples"]) == data.n_rows
