"""The kernel's blocked form: the same sums as one batch, and bad values numbered in the whole batch."""

from __future__ import annotations

import numpy as np
import pytest

from bpseval.stats import BLOCK_ENTRIES, STAT_FIELDS, InvalidValuesError, batch_stats, blocked_stats


def test_blocked_stats_equal_one_batch():
    rng = np.random.default_rng(0)
    n_rows = 3 * BLOCK_ENTRIES // 40 + 17  # several blocks and a partial one
    rhat = rng.gamma(2.0, 0.5, size=(n_rows, 40)).astype(np.float32)
    robs = rng.poisson(rhat).astype(np.float32)
    dfs = (rng.random((n_rows, 40)) > 0.1).astype(np.float32)
    whole, blocked = batch_stats(rhat, robs, dfs), blocked_stats(rhat, robs, dfs)
    for name in STAT_FIELDS:
        np.testing.assert_allclose(getattr(blocked, name), getattr(whole, name), rtol=1e-12)


def test_bad_values_are_numbered_in_the_whole_batch():
    rhat = np.ones((4 * BLOCK_ENTRIES // 10, 10))
    rhat[3000, 7] = np.nan
    with pytest.raises(InvalidValuesError, match=r"rhat has 1 NaN or infinite value \(first at sample row 3000, cell 7\)"):
        blocked_stats(rhat, np.ones_like(rhat))
