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

    One pass. `weights` is None or (rows, cells) / (rows, 1). Each row is read into float64 row
    buffers (masked entries as harmless values: count 0, rate 1 or log-rate 0, which add 0) and
    validity OR-ed over the row, checked once; then every sum is one short loop over the cells that
    writes one or two arrays and has no branch, so that LLVM vectorises it (with more arrays it gives
    up proving they do not overlap). The logarithms, the costliest step, are taken only at the
    entries with spikes, gathered first. Sums are kept per block of `block_rows` rows, then added.

    The centred moments are the shifted-data sums: around a shift K per cell, the λ and y of the
    cell's first valid entry, Σw·(λ−K) and Σw·(λ−K)² (and the same for y, and the cross term) give
    Σw·(λ−λ̄)² = Σw·(λ−K)² − (Σw·(λ−K))²/Σw. K being one of the values, the cancellation loses at
    most what a sum over the batch loses anyway (|λ̄−K| is at most √n standard deviations).
    """
    n_rows, n_cells = rhat.shape
    w, valid = np.ones(n_cells), np.ones(n_cells)  # the row's weights, and 1.0 where valid
    counts, rates = np.zeros(n_cells), np.zeros(n_cells)  # the row's y and λ in float64 (log(float32) narrows)
    spiking = np.zeros(n_cells, dtype=np.int64)
    rate_shift, count_shift = _first_valid_values(rhat, robs, weights, log_rate, w, valid, counts, rates)
    sums = np.zeros((8, n_cells))  # per block: Σw, Σw·y, Σw·λ, Σw·(λ−K), Σw·(λ−K)², Σw·(y−K), Σw·(y−K)², co
    totals = np.zeros((8, n_cells))
    for start in range(0, n_rows, block_rows):
        block = sums[:, :]
        block[:, :] = 0.0
        block_weight, block_spikes, block_rate_sum = block[0], block[1], block[2]
        rate_offset, rate_square, count_offset, count_square, co_square = (
            block[3],
            block[4],
            block[5],
            block[6],
            block[7],
        )
        for row in range(start, min(start + block_rows, n_rows)):
            if _read_row(rhat, robs, weights, row, log_rate, w, valid, counts, rates):
                return False
            for cell in range(n_cells):
                n_valid[cell] += valid[cell] > 0.0
            for cell in range(n_cells):
                block_weight[cell] += w[cell]
            for cell in range(n_cells):
                block_spikes[cell] += w[cell] * counts[cell]
            for cell in range(n_cells):
                block_rate_sum[cell] += w[cell] * rates[cell]
            for cell in range(n_cells):  # masked entries: finite harmless values, w = 0
                step = rates[cell] - rate_shift[cell]
                rate_offset[cell] += w[cell] * step
                rate_square[cell] += w[cell] * step * step
            for cell in range(n_cells):
                step = counts[cell] - count_shift[cell]
                count_offset[cell] += w[cell] * step
                count_square[cell] += w[cell] * step * step
            for cell in range(n_cells):
                co_square[cell] += w[cell] * (rates[cell] - rate_shift[cell]) * (counts[cell] - count_shift[cell])
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
        totals += block
    for cell in range(n_cells):
        total_weight = totals[0, cell]
        has = total_weight > 0.0
        rate_away = totals[3, cell] / total_weight if has else 0.0  # λ̄ − K
        count_away = totals[5, cell] / total_weight if has else 0.0
        weight[cell] = total_weight
        spikes[cell] = totals[1, cell]
        rate_sum[cell] = totals[2, cell]
        rate_m2[cell] = max(totals[4, cell] - total_weight * rate_away * rate_away, 0.0)
        count_m2[cell] = max(totals[6, cell] - total_weight * count_away * count_away, 0.0)
        co_m2[cell] = totals[7, cell] - total_weight * rate_away * count_away
        model_ll[cell] -= totals[2, cell]
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _first_valid_values(
    rhat: Any, robs: Any, weights: Any, log_rate: bool, w: Any, valid: Any, counts: Any, rates: Any
) -> tuple[Any, Any]:
    """Per cell, λ and y at its first valid entry (0 for a cell without one): the shifts of `accumulate`.

    Reads rows until every cell has one, usually the first. Values are not checked here: an invalid
    one makes `accumulate` give up anyway.
    """
    n_rows, n_cells = rhat.shape
    rate_shift, count_shift, found = np.zeros(n_cells), np.zeros(n_cells), np.zeros(n_cells)
    missing = n_cells
    for row in range(n_rows):
        if missing == 0:
            break
        _read_row(rhat, robs, weights, row, log_rate, w, valid, counts, rates)
        for cell in range(n_cells):
            first = (found[cell] == 0.0) & (valid[cell] > 0.0)
            rate_shift[cell] = rates[cell] if first else rate_shift[cell]
            count_shift[cell] = counts[cell] if first else count_shift[cell]
            missing -= first
            found[cell] = max(found[cell], valid[cell])
    return rate_shift, count_shift
