"""The compiled loops of `compiled.py` (numba): imported only when numba is installed and wanted.

Decorated at import with an on-disk cache (`cache=True`), so importing this module raises
RuntimeError when numba can cache nowhere; `compiled._compiled` then falls back to the reference.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from bpseval.kernel.stats import MAX_LOG_RATE, MIN_RATE

SMALL_COUNTS = 256
LOG_SMALL_COUNTS = np.array([0.0] + [math.log(count) for count in range(1, SMALL_COUNTS)])
"""ln k for the whole counts 0 < k < SMALL_COUNTS (most spike counts): math.log's values, looked up."""


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _read_weights(weights: Any, row: int, w: Any) -> None:
    """Row `row` of the weights into `w` (left as is, all ones, when there are no weights)."""
    if weights is not None:  # a plain `is None` test: numba drops the branch at compile time when it is None
        if weights.shape[1] == w.shape[0]:
            for cell in range(w.shape[0]):
                w[cell] = weights[row, cell]
        else:
            w[:] = weights[row, 0]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _read_row(
    rhat: Any, robs: Any, weights: Any, row: int, log_rate: bool, w: Any, valid: Any, counts: Any, rates: Any
) -> bool:
    """Fill the row buffers of `accumulate` from row `row`; True when a valid entry or a weight is invalid."""
    n_cells = rhat.shape[1]
    _read_weights(weights, row, w)
    bad = False
    for cell in range(n_cells):
        valid[cell] = 1.0 if w[cell] > 0.0 else 0.0
        bad |= not ((w[cell] >= 0.0) & (w[cell] <= 1.0))
    for cell in range(n_cells):
        counts[cell] = float(robs[row, cell]) if w[cell] > 0.0 else 0.0
        bad |= not ((counts[cell] >= 0.0) & (counts[cell] < math.inf))
    if log_rate:
        for cell in range(n_cells):
            value = float(rhat[row, cell]) if w[cell] > 0.0 else 0.0
            bad |= not ((value > -math.inf) & (value <= MAX_LOG_RATE))
            rates[cell] = math.exp(value)
    else:
        for cell in range(n_cells):
            value = float(rhat[row, cell]) if w[cell] > 0.0 else 1.0
            bad |= not ((value >= 0.0) & (value < math.inf))
            rates[cell] = max(value, MIN_RATE)
    return bad


@numba.njit(cache=True, nogil=True, error_model="numpy")
def accumulate(
    rhat: Any,
    robs: Any,
    weights: Any,
    log_rate: bool,
    block_rows: int,
    n_valid: Any,
    weight: Any,
    spikes: Any,
    model_ll: Any,
    spike_log_spikes: Any,
    rate_sum: Any,
    rate_m2: Any,
    count_m2: Any,
    co_m2: Any,
    rate_min: Any,
    count_min: Any,
    rate_max: Any,
    count_max: Any,
) -> bool:
    """Add a batch into the 13 per-cell statistics (given zeroed / ±inf); False when it holds an invalid value.

    `weights` is None or (rows, cells) / (rows, 1). Each row is read into float64 row buffers (masked
    entries as harmless values: count 0, rate 1 or log-rate 0, which add 0), validity OR-ed over the
    row and checked once; then every sum is one short loop over the cells that writes one or two
    arrays and has no branch, so that LLVM vectorises it (with more arrays it gives up proving they do
    not overlap). The logarithms, the costliest step, are taken only at the entries with spikes,
    gathered first.
    """
    n_rows, n_cells = rhat.shape
    w, valid = np.ones(n_cells), np.ones(n_cells)  # the row's weights, and 1.0 where valid
    counts, rates = np.zeros(n_cells), np.zeros(n_cells)  # the row's y and λ in float64 (log(float32) narrows)
    rate_step, count_step = np.zeros(n_cells), np.zeros(n_cells)
    spiking = np.zeros(n_cells, dtype=np.int64)
    block_weight, block_spikes, block_rate_sum = np.zeros(n_cells), np.zeros(n_cells), np.zeros(n_cells)
    block_rate_m2, block_count_m2, block_co_m2 = np.zeros(n_cells), np.zeros(n_cells), np.zeros(n_cells)
    rate_mean, count_mean = np.zeros(n_cells), np.zeros(n_cells)
    harmless = 0.0 if log_rate else 1.0
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        block_weight[:], block_spikes[:], block_rate_sum[:] = 0.0, 0.0, 0.0
        block_rate_m2[:], block_count_m2[:], block_co_m2[:] = 0.0, 0.0, 0.0
        for row in range(start, stop):
            bad = _read_row(rhat, robs, weights, row, log_rate, w, valid, counts, rates)
            if bad:
                return False
            for cell in range(n_cells):
                n_valid[cell] += valid[cell] > 0.0
            for cell in range(n_cells):
                block_weight[cell] += w[cell]
            for cell in range(n_cells):
                block_spikes[cell] += w[cell] * counts[cell]
            for cell in range(n_cells):
                block_rate_sum[cell] += w[cell] * rates[cell]
            for cell in range(n_cells):  # extremes over valid entries: an invalid one offers ±inf
                rate_min[cell] = min(rate_min[cell], rates[cell] if valid[cell] > 0.0 else math.inf)
                rate_max[cell] = max(rate_max[cell], rates[cell] if valid[cell] > 0.0 else -math.inf)
            for cell in range(n_cells):
                count_min[cell] = min(count_min[cell], counts[cell] if valid[cell] > 0.0 else math.inf)
                count_max[cell] = max(count_max[cell], counts[cell] if valid[cell] > 0.0 else -math.inf)
            if log_rate:
                for cell in range(n_cells):
                    model_ll[cell] += w[cell] * counts[cell] * (float(rhat[row, cell]) if valid[cell] > 0.0 else 0.0)
            n_spiking = 0
            for cell in range(n_cells):
                spiking[n_spiking] = cell
                n_spiking += counts[cell] > 0.0
            for index in range(n_spiking):
                cell = spiking[index]
                weighted = counts[cell] * w[cell]
                small = int(min(counts[cell], SMALL_COUNTS - 1))  # ln of a small whole count: from the table
                log_count = LOG_SMALL_COUNTS[small] if small == counts[cell] else math.log(counts[cell])
                spike_log_spikes[cell] += weighted * log_count
                if not log_rate:
                    model_ll[cell] += weighted * math.log(rates[cell])
        for cell in range(n_cells):
            has = block_weight[cell] > 0.0
            rate_mean[cell] = block_rate_sum[cell] / block_weight[cell] if has else 0.0
            count_mean[cell] = block_spikes[cell] / block_weight[cell] if has else 0.0
        for row in range(start, stop):  # the centred moments around the block's means; the row is valid
            _read_weights(weights, row, w)
            for cell in range(n_cells):  # masked entries: harmless values, whose w = 0 makes them add 0
                value = float(rhat[row, cell]) if w[cell] > 0.0 else harmless
                rate_step[cell] = (math.exp(value) if log_rate else max(value, MIN_RATE)) - rate_mean[cell]
            for cell in range(n_cells):
                count_step[cell] = (float(robs[row, cell]) if w[cell] > 0.0 else 0.0) - count_mean[cell]
            for cell in range(n_cells):
                block_rate_m2[cell] += w[cell] * rate_step[cell] * rate_step[cell]
            for cell in range(n_cells):
                block_count_m2[cell] += w[cell] * count_step[cell] * count_step[cell]
            for cell in range(n_cells):
                block_co_m2[cell] += w[cell] * rate_step[cell] * count_step[cell]
        for cell in range(n_cells):  # Chan's update, as `combine`: the totals so far and this block
            before, added = weight[cell], block_weight[cell]
            both = (before > 0.0) & (added > 0.0)
            share = before * added / (before + added) if both else 0.0
            rate_shift = block_rate_sum[cell] / added - rate_sum[cell] / before if both else 0.0
            count_shift = block_spikes[cell] / added - spikes[cell] / before if both else 0.0
            rate_m2[cell] += block_rate_m2[cell] + share * rate_shift * rate_shift
            count_m2[cell] += block_count_m2[cell] + share * count_shift * count_shift
            co_m2[cell] += block_co_m2[cell] + share * rate_shift * count_shift
            weight[cell] = before + added
            spikes[cell] += block_spikes[cell]
            rate_sum[cell] += block_rate_sum[cell]
    for cell in range(n_cells):
        model_ll[cell] -= rate_sum[cell]
    return True
