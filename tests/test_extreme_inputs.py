"""Extreme or impossible data never gives a silent wrong number: overflowing sums, impossible stored
sums in stats-only shards, and arrays that declare far more data than they store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpseval
from tests.conftest import write_raw_shard

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
