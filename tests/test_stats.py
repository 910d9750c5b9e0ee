"""The kernel: the same sums as a dense float64 formula at any size, on numpy and torch alike,
and every kind of bad value found, numbered in the whole batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bpseval.kernel.cellstats import STAT_FIELDS
from bpseval.kernel.stats import BLOCK_ENTRIES, MIN_RATE, InvalidValuesError, batch_stats

N_CELLS = 40
N_ROWS = 3 * BLOCK_ENTRIES // N_CELLS + 17
"""Several row blocks and a partial one."""


def dense_stats(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray | None, rate_kind: str) -> dict[str, np.ndarray]:
    """The spec written out densely in float64, whole batch at once, masked entries zeroed first."""
    rhat, robs = rhat.astype(np.float64), robs.astype(np.float64)
    w = np.ones_like(rhat) if dfs is None else np.broadcast_to(dfs.astype(np.float64), rhat.shape)
    valid = w > 0
    rhat, robs = np.where(valid, rhat, 0.0), np.where(valid, robs, 0.0)
    rates = np.exp(rhat) if rate_kind == "log_rate" else np.maximum(rhat, MIN_RATE)
    log_rates = rhat if rate_kind == "log_rate" else np.log(rates)
    weight, spikes, rate_sum = w.sum(axis=0), (w * robs).sum(axis=0), (w * rates).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_step = rates - np.where(weight > 0, rate_sum / weight, 0.0)
        count_step = robs - np.where(weight > 0, spikes / weight, 0.0)
        log_counts = np.where(robs > 0, np.log(np.where(robs > 0, robs, 1.0)), 0.0)
    return {
        "n_valid": valid.sum(axis=0),
        "weight": weight,
        "spikes": spikes,
        "model_ll": (w * (robs * log_rates - rates)).sum(axis=0),
        "spike_log_spikes": (w * robs * log_counts).sum(axis=0),
        "rate_sum": rate_sum,
        "rate_m2": (w * rate_step**2).sum(axis=0),
        "count_m2": (w * count_step**2).sum(axis=0),
        "co_m2": (w * rate_step * count_step).sum(axis=0),
        "rate_min": np.where(valid, rates, np.inf).min(axis=0),
        "count_min": np.where(valid, robs, np.inf).min(axis=0),
        "rate_max": np.where(valid, rates, -np.inf).max(axis=0),
        "count_max": np.where(valid, robs, -np.inf).max(axis=0),
    }


def make_batch(
    dfs_form: str, rate_kind: str, dtypes: tuple[type, type] = (np.float32, np.float32)
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sparse counts, rates at and below MIN_RATE, and NaN/inf/negative values where dfs = 0."""
    rhat_dtype, robs_dtype = dtypes
    rng = np.random.default_rng(7)
    shape = (N_ROWS, N_CELLS)
    if rate_kind == "log_rate":
        rhat = rng.normal(-2.5, 1.0, shape).astype(np.float32)
        robs = rng.poisson(np.exp(rhat.astype(np.float64)))
    else:
        rhat = rng.lognormal(-2.5, 1.0, shape).astype(np.float32)
        robs = rng.poisson(rhat.astype(np.float64))
        rhat[::97, 3] = 0.0
        rhat[5::89, 4] = 1e-12
    rhat, robs = rhat.astype(rhat_dtype), robs.astype(robs_dtype)
    robs[:, 6] = 0  # a silent cell
    if dfs_form == "none":
        return rhat, robs, None
    dfs = (rng.random(shape if dfs_form == "cells" else (N_ROWS, 1)) > 0.1).astype(np.float32)
    if dfs_form == "cells":
        dfs[rng.random(shape) < 0.05] = 0.4
    masked = np.broadcast_to(dfs == 0, shape)
    rhat[masked & (rng.random(shape) < 0.3)] = np.nan
    rhat[masked & (rng.random(shape) < 0.1)] = -np.inf
    return rhat, robs, dfs


@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float16, np.int64), (np.float64, np.int32)], ids=str)
@pytest.mark.parametrize("rate_kind", ["rate", "log_rate"])
@pytest.mark.parametrize("dfs_form", ["cells", "column", "none"])
def test_numpy_batch_of_several_blocks_matches_the_dense_formula(dfs_form, rate_kind, dtypes):
    rhat, robs, dfs = make_batch(dfs_form, rate_kind, dtypes)
    stats = batch_stats(rhat, robs, dfs, rate_kind)
    want = dense_stats(rhat, robs, dfs, rate_kind)
    np.testing.assert_array_equal(stats.n_valid, want["n_valid"])
    assert stats.n_valid.dtype == np.int64
    for name in STAT_FIELDS[1:]:
        assert getattr(stats, name).dtype == np.float64
        np.testing.assert_allclose(getattr(stats, name), want[name], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("rate_kind", ["rate", "log_rate"])
@pytest.mark.parametrize("dfs_form", ["cells", "column"])
def test_torch_tensors_give_the_numpy_sums(dfs_form, rate_kind):
    rhat, robs, dfs = make_batch(dfs_form, rate_kind)
    from_numpy = batch_stats(rhat, robs, dfs, rate_kind)
    from_torch = batch_stats(torch.from_numpy(rhat), torch.from_numpy(robs), torch.from_numpy(dfs), rate_kind)
    for name in STAT_FIELDS:
        assert isinstance(getattr(from_torch, name), torch.Tensor)
        np.testing.assert_allclose(
            getattr(from_torch, name).numpy(), getattr(from_numpy, name), rtol=1e-12, err_msg=name
        )


def test_bool_mask_counts_as_zero_or_one():
    rhat, robs, dfs = make_batch("cells", "rate")
    as_bool, as_float = batch_stats(rhat, robs, dfs > 0), batch_stats(rhat, robs, (dfs > 0).astype(np.float32))
    for name in STAT_FIELDS:
        np.testing.assert_array_equal(getattr(as_bool, name), getattr(as_float, name))


BAD_VALUES = [
    ("rate", "rhat", np.nan, r"rhat has 1 NaN or infinite value"),
    ("rate", "rhat", np.inf, r"rhat has 1 NaN or infinite value"),
    ("rate", "rhat", -0.5, r"rhat has 1 negative value"),
    ("rate", "robs", np.nan, r"robs has 1 NaN or infinite value"),
    ("rate", "robs", np.inf, r"robs has 1 NaN or infinite value"),
    ("rate", "robs", -1.0, r"robs has 1 negative value"),
    ("rate", "dfs", np.nan, r"dfs has 1 outside \[0, 1\] or NaN value"),
    ("rate", "dfs", 1.5, r"dfs has 1 outside \[0, 1\] or NaN value"),
    ("rate", "dfs", -0.1, r"dfs has 1 outside \[0, 1\] or NaN value"),
    ("log_rate", "rhat", 701.0, r"rhat has 1 log-rate above 700 \(overflowing\) value"),
    ("log_rate", "rhat", -np.inf, r"rhat has 1 NaN or infinite value"),
]


@pytest.mark.parametrize(("rate_kind", "array", "value", "message"), BAD_VALUES)
def test_a_bad_value_at_a_valid_entry_is_named_with_its_row_in_the_whole_batch(rate_kind, array, value, message):
    arrays = {
        "rhat": np.full((N_ROWS, N_CELLS), 0.5),
        "robs": np.ones((N_ROWS, N_CELLS)),
        "dfs": np.ones((N_ROWS, N_CELLS)),
    }
    row = 2 * BLOCK_ENTRIES // N_CELLS + 5  # in the third block
    arrays[array][row, 7] = value
    with pytest.raises(InvalidValuesError, match=message + rf" \(first at sample row {row}, cell 7\)"):
        batch_stats(arrays["rhat"], arrays["robs"], arrays["dfs"], rate_kind)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, -3.0])
def test_any_value_where_dfs_is_zero_is_ignored(value):
    rhat, robs, dfs = np.full((50, 4), 0.5), np.ones((50, 4)), np.ones((50, 4))
    clean = batch_stats(rhat, robs, np.where(np.arange(50)[:, None] == 9, 0.0, dfs))
    dfs[9, :] = 0.0
    rhat[9, 1], robs[9, 2] = value, value
    stats = batch_stats(rhat, robs, dfs)
    for name in STAT_FIELDS:
        np.testing.assert_array_equal(getattr(stats, name), getattr(clean, name))
    assert math.isfinite(float(stats.model_ll.sum()))
