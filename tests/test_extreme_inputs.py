"""Extreme or impossible data never gives a silent wrong number: overflowing sums, impossible stored
sums in stats-only shards, and arrays that declare far more data than they store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpseval
from bpseval.errors import ShardError
from bpseval.shard import reader
from tests.conftest import poisson_dataset, write_raw_shard

OK, OVERFLOW = "ok", "overflow"  # literals: the tests must run (and fail) on code without the overflow status

# ----------------------------------------------------------------------------------------------
# Item 4: float64 sums that are not finite make a cell `overflow`, never an `ok` cell without bps


def overflowing_arrays() -> tuple[np.ndarray, np.ndarray]:
    """4 cells of finite values: cell 0 spikes sum to inf, cell 1 has one subnormal spike count
    (bps = ll_gain / (spikes·ln 2) overflows), cell 2 robs·log-rate overflows, cell 3 is ordinary."""
    rhat = np.full((3, 4), 1.0)
    robs = np.array([[1e308, 5e-324, 0.0, 1.0], [1e308, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    return rhat, robs


def test_overflowing_cells_in_memory_are_overflow_not_ok_without_bps() -> None:
    rhat, robs = overflowing_arrays()
    cells = bpseval.bits_per_spike(rhat, robs)
    assert cells["status"].tolist() == [OVERFLOW, OVERFLOW, "silent", OK]
    assert cells["bps"][:2].isna().all() and math.isfinite(cells["bps"][3])
    log_rates = np.full((2, 1), 700.0)
    cells = bpseval.bits_per_spike(log_rates, np.array([[1e306], [0.0]]), rate_kind="log_rate")
    assert cells["status"].tolist() == [OVERFLOW]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(0, 1e308, allow_subnormal=True), min_size=6, max_size=6),
    st.lists(st.floats(-50, 700), min_size=6, max_size=6),
    st.sampled_from(["rate", "log_rate"]),
)
def test_no_ok_cell_is_ever_without_a_finite_bps(robs: list[float], rhat: list[float], rate_kind: str) -> None:
    rates = np.array(rhat).reshape(3, 2)
    if rate_kind == "rate":
        rates = np.abs(rates) * 1e300  # also rates near the top of float64
    cells = bpseval.bits_per_spike(rates, np.array(robs).reshape(3, 2), rate_kind=rate_kind)
    ok = cells["status"] == OK
    assert np.isfinite(cells.loc[ok, ["bps", "ll_gain", "n", "spikes", "model_ll"]].to_numpy()).all()
    assert cells.loc[cells["status"] == OVERFLOW, "bps"].isna().all()


def test_compute_reports_overflow_cells_and_undefined_dataset_and_overall_numbers(invoke, tmp_path) -> None:
    rhat, robs = overflowing_arrays()
    ordinary = {"rhat": np.array([[0.5, 1.0], [1.5, 0.2]]), "robs": np.array([[1.0, 0.0], [2.0, 1.0]])}
    write_raw_shard(tmp_path / "rank-0.h5", {"extreme": {"rhat": rhat, "robs": robs}, "plain": ordinary})
    result = invoke("compute", tmp_path, "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert not [cell for cell in document["cells"] if cell["status"] == OK and cell["bps"] is None]
    statuses = [cell["status"] for cell in document["cells"] if cell["dataset"] == "extreme"]
    assert statuses == [OVERFLOW, OVERFLOW, "silent", OK]
    datasets = {entry["name"]: entry for entry in document["datasets"]}
    assert datasets["extreme"]["bps"] is None and datasets["extreme"]["bps_pooled"] is None
    assert datasets["extreme"]["cells"][OVERFLOW] == 2
    assert datasets["plain"]["bps"] is not None
    assert document["overall"]["bps"] is None and document["overall"]["bps_pooled"] is None
    assert document["overall"]["cells"][OVERFLOW] == 2
    assert "dataset 'extreme': 2 cells (first: cell_id 0)" in result.stderr and "overflow" in result.stderr


# ----------------------------------------------------------------------------------------------
# Item 5: stats-only sums that no data could produce are refused


def stats_shard(run_dir: Path) -> Path:
    """A good stats-only shard of one dataset 'd' (5 cells, 2 blocks of 10 samples; cell 3 uncovered in block 0)."""
    arrays = poisson_dataset(3, n_rows=20, n_cells=5)
    arrays["robs"][:, 4] = 0.0  # a silent cell: spikes 0 with weight > 0 is fine
    arrays["dfs"][:10, 3] = 0.0  # no valid sample of cell 3 in block 0: its extremes there are +inf / -inf
    with bpseval.ShardWriter(run_dir, 0, 1, store="stats", block_size=10) as writer:
        writer.add("d", arrays["rhat"], arrays["robs"], arrays["dfs"], sample_idx=np.arange(20))
    return writer.path


def edit(path: Path, key: str, change: Callable[[np.ndarray], None]) -> None:
    """Rewrite one stored array of dataset 'd' in place, as a damaged or foreign writer would leave it."""
    with h5py.File(path, "r+") as handle:
        group = handle["datasets/d"]
        values = group[key][()].astype(np.float64)
        change(values)
        del group[key]
        group.create_dataset(key, data=values)


IMPOSSIBLE_SUMS = {
    "negative n_valid": (
        "n_valid",
        lambda v: v.__setitem__(2, -1),
        "n_valid is negative or not a whole number at cell 2",
    ),
    "fractional n_valid": ("n_valid", lambda v: v.__setitem__(1, 3.5), "n_valid is negative or not a whole number"),
    "n_valid above samples": ("n_valid", lambda v: v.__setitem__(3, 21), "n_valid exceeds the 20 samples"),
    "negative weight": ("weight", lambda v: v.__setitem__(0, -0.5), "weight is negative at cell 0"),
    "weight above n_valid": ("weight", lambda v: v.__setitem__(1, 50.0), "weight exceeds n_valid"),
    "negative spikes": ("spikes", lambda v: v.__setitem__(2, -3.0), "spikes is negative at cell 2"),
    "NaN model_ll": ("model_ll", lambda v: v.__setitem__(0, np.nan), "model_ll is NaN or infinite"),
    "block n_valid above block size": (
        "blocks/n_valid",
        lambda v: v.__setitem__((1, 0), 11),
        "blocks/n_valid exceeds the 10",
    ),
    "block spikes with zero weight": (
        "blocks/spikes",
        lambda v: v.__setitem__((0, 4), 2.0),
        "blocks/spikes is positive while weight is 0 at cell 4 of block 0",
    ),
    "blocks not adding up": (
        "blocks/model_ll",
        lambda v: v.__setitem__((1, 3), v[1, 3] - 1.0),
        "blocks/model_ll does not add up",
    ),
    "NaN spike_log_spikes": (
        "spike_log_spikes",
        lambda v: v.__setitem__(0, np.nan),
        "spike_log_spikes is NaN or infinite at cell 0",
    ),
    "negative rate_sum": ("rate_sum", lambda v: v.__setitem__(1, -1.0), "rate_sum is negative at cell 1"),
    "negative rate_m2": ("rate_m2", lambda v: v.__setitem__(2, -0.5), "rate_m2 is negative at cell 2"),
    "negative count_m2": ("count_m2", lambda v: v.__setitem__(0, -1.0), "count_m2 is negative at cell 0"),
    "co_m2 beyond the Cauchy-Schwarz bound": (
        "co_m2",
        lambda v: v.__setitem__(3, 1e6),
        "co_m2 exceeds √(rate_m2·count_m2) in size at cell 3",
    ),
    "rate_min above rate_max": (
        "rate_min",
        lambda v: v.__setitem__(1, 1e6),
        "rate_min is negative or above rate_max while n_valid > 0 at cell 1",
    ),
    "negative count_min": (
        "count_min",
        lambda v: v.__setitem__(2, -1.0),
        "count_min is negative or above count_max while n_valid > 0 at cell 2",
    ),
    "NaN rate_max of a covered cell": (
        "rate_max",
        lambda v: v.__setitem__(0, np.nan),
        "rate_max is NaN or infinite while n_valid > 0 at cell 0",
    ),
    "infinite count_max of a covered cell": (
        "count_max",
        lambda v: v.__setitem__(1, np.inf),
        "count_max is NaN or infinite while n_valid > 0 at cell 1",
    ),
    "block rate_min of an uncovered cell not +inf": (
        "blocks/rate_min",
        lambda v: v.__setitem__((0, 3), 0.5),
        "blocks/rate_min is not +inf while n_valid is 0 at cell 3 of block 0",
    ),
    "block count_max of an uncovered cell not -inf": (
        "blocks/count_max",
        lambda v: v.__setitem__((0, 3), 0.0),
        "blocks/count_max is not -inf while n_valid is 0 at cell 3 of block 0",
    ),
    "block rate_m2 without a valid sample": (
        "blocks/rate_m2",
        lambda v: v.__setitem__((0, 3), 1.0),
        "blocks/rate_m2 is not 0 while n_valid is 0 at cell 3 of block 0",
    ),
    "block extremes not giving the total's": (
        "blocks/count_max",
        lambda v: v.__setitem__((1, 0), 1000.0),
        "blocks/count_max does not add up to count_max (off by",
    ),
    "block moments not merging to the total's": (
        "blocks/rate_m2",
        lambda v: v.__setitem__((1, 2), v[1, 2] + 1.0),
        "blocks/rate_m2 does not add up to rate_m2 (off by",
    ),
}


@pytest.mark.parametrize("case", IMPOSSIBLE_SUMS, ids=list(IMPOSSIBLE_SUMS))
def test_impossible_stored_sums_exit_2_naming_file_dataset_field_and_cell(invoke, tmp_path, case) -> None:
    key, change, message = IMPOSSIBLE_SUMS[case]
    path = stats_shard(tmp_path)
    if case == "block spikes with zero weight":  # a block cell with no weight at all, spikes added in block and total
        edit(path, "blocks/weight", lambda v: v.__setitem__((0, 4), 0.0))
        edit(path, "blocks/n_valid", lambda v: v.__setitem__((0, 4), 0))
    edit(path, key, change)
    result = invoke("compute", tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {path}: dataset 'd': stored ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    with pytest.raises(ShardError, match="no data gives such sums"):
        bpseval.evaluate(tmp_path)


def test_spikes_without_weight_in_the_totals_are_refused(tmp_path) -> None:
    path = stats_shard(tmp_path)
    for key in ("n_valid", "weight"):
        edit(path, key, lambda v: v.__setitem__(4, 0))
    edit(path, "spikes", lambda v: v.__setitem__(4, 1.0))
    with pytest.raises(ShardError, match=r"stored (weight|spikes|model_ll) .* at cell 4"):
        bpseval.evaluate(tmp_path)


def test_a_good_stats_shard_with_a_silent_cell_is_read(tmp_path) -> None:
    stats_shard(tmp_path)
    assert bpseval.evaluate(tmp_path).cells["status"].tolist()[4] == "silent"


# ----------------------------------------------------------------------------------------------
# Item 10: arrays that declare far more than they store cannot make bpseval allocate or spin


def bomb_shard(path: Path, kind: str, target: str) -> None:
    """A shard of a few MB whose `target` ("rhat": rhat and robs; or "sample_idx") declares 10^8 rows
    of gzip-compressed zeros (every chunk written, ~230:1; a few MB), or 10^9 rows of which one chunk is written."""
    n_rows, chunk_rows = (10**8, 1 << 22) if kind == "gzip" else (10**9, 1 << 16)
    write_raw_shard(path, {})
    with h5py.File(path, "r+") as handle:
        group = handle.create_group("datasets/d")
        width = 1 if target == "rhat" else 0  # 0 cells: rhat and robs hold nothing, sample_idx is the bomb
        arrays = {"rhat": ("f4", (n_rows, width)), "robs": ("f4", (n_rows, width)), "sample_idx": ("i8", (n_rows,))}
        for key, (dtype, shape) in arrays.items():
            if 0 in shape:
                group.create_dataset(key, shape=shape, dtype=dtype)
                continue
            chunks = (chunk_rows, *shape[1:])
            gzip = {"compression": "gzip", "compression_opts": 1}
            array = group.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks, **gzip)
            zeros = np.zeros(chunks, dtype=dtype)
            for start in range(0, n_rows if kind == "gzip" else 1, chunk_rows):
                array[start : start + chunk_rows] = zeros[: n_rows - start]


CHILD = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run([sys.executable, "-m", "bpseval", "compute", sys.argv[1]], capture_output=True, text=True)
elapsed = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(done.returncode, elapsed, peak_mb)
print(done.stderr)
"""


@pytest.mark.parametrize("kind", ["gzip", "unwritten chunks"])
def test_arrays_declaring_far_more_than_they_store_are_refused_fast_and_small(tmp_path, kind) -> None:
    path = tmp_path / "rank-0.h5"
    bomb_shard(path, kind, "rhat")
    assert path.stat().st_size < 10_000_000
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-c", CHILD, str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    code, elapsed, peak_mb = out.stdout.split("\n", 1)[0].split()
    message = out.stdout.split("\n", 1)[1]
    assert int(code) == 2, message
    assert float(elapsed) < 10 and float(peak_mb) < 400, (elapsed, peak_mb)
    assert f"dataset 'd': rhat declares shape ({10**8 if kind == 'gzip' else 10**9}, 1)" in message
    assert ("never written" if kind == "unwritten chunks" else "ratio above 100:1") in message


@pytest.mark.parametrize("kind", ["gzip", "unwritten chunks"])
def test_sample_idx_declaring_far_more_than_it_stores_is_refused(tmp_path, kind) -> None:
    path = tmp_path / "rank-0.h5"
    bomb_shard(path, kind, "sample_idx")
    start = time.perf_counter()
    with pytest.raises(ShardError, match=r"dataset 'd': sample_idx declares shape \(10000000"):
        bpseval.evaluate(tmp_path)
    assert time.perf_counter() - start < 10


def test_compressed_shards_of_real_data_are_read(tmp_path) -> None:
    arrays = poisson_dataset(4, n_rows=3000, n_cells=30)
    arrays["sample_idx"] = np.arange(3000)
    arrays["dfs"] = np.ones((3000, 1), dtype=np.uint8)  # constant: compresses ~350:1, under FREE_BYTES
    write_raw_shard(tmp_path / "plain" / "rank-0.h5", {"d": arrays})
    path = write_raw_shard(tmp_path / "gzip" / "rank-0.h5", {})
    with h5py.File(path, "r+") as handle:
        for key, value in arrays.items():
            handle.create_dataset(f"datasets/d/{key}", data=value, compression="gzip", shuffle=True)
    plain, packed = bpseval.evaluate(tmp_path / "plain"), bpseval.evaluate(tmp_path / "gzip")
    assert packed.overall.bps == plain.overall.bps


# ----------------------------------------------------------------------------------------------
# Issue #14 item 5: a bug inside bpseval is not relabelled as a damaged shard


def test_a_bug_while_reading_a_shard_surfaces_as_itself(tmp_path, monkeypatch) -> None:
    write_raw_shard(tmp_path / "rank-0.h5", {"d": poisson_dataset(5)})

    def bug(*args: object) -> None:
        raise ZeroDivisionError("a bug in bpseval")

    monkeypatch.setattr(reader, "_check_stored", bug)  # a helper called inside `with open_shard(...)`
    with pytest.raises(ZeroDivisionError, match="a bug in bpseval"):
        reader.read_header(tmp_path / "rank-0.h5")
