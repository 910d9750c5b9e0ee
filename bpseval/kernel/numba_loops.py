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
GROUP_ENTRIES = 2048
"""Entries (whole rows) read as one flat run: long enough that a loop over them vectorises well for narrow
datasets too, short enough that the 15 float64 accumulators of a run stay in the CPU cache."""
FLAT_FIELDS = 15
"""Rows of the flat accumulators of `accumulate`: the 13 statistics, with the shifted sums and Σw·y·ln λ."""
(
    N_VALID,
    WEIGHT,
    SPIKES,
    SPIKE_LOG_RATES,
    SPIKE_LOG_SPIKES,
    RATE_SUM,
    RATE_OFFSET,
    RATE_SQUARE,
    COUNT_OFFSET,
    COUNT_SQUARE,
    CO_SQUARE,
    RATE_MIN,
    COUNT_MIN,
    RATE_MAX,
    COUNT_MAX,
) = range(FLAT_FIELDS)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def accumulate(
    rhat: Any,
    robs: Any,
    weights: Any,
    log_rate: bool,
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
    """Fill the 13 per-cell statistics (given zeroed / ±inf) of a C-contiguous batch; False when it holds an
    invalid value.

    One pass. `weights` is None or (rows, cells) / (rows, 1). Whole rows are taken as one flat run of
    about GROUP_ENTRIES entries, read into float64 buffers (masked entries as harmless values: count 0,
    rate 1 or log-rate 0, which add 0) with validity OR-ed over the run and checked once; every sum
    is then one branch-free loop over the run into flat accumulators, entry k of the run adding into
    accumulator k, so that LLVM vectorises it whatever the number of cells. The accumulators are
    folded per cell at the end. The logarithms, the costliest step, are taken only at the entries
    with spikes, gathered first.

    The centred moments are shifted-data sums: around a shift K per cell, the λ and y of the cell's
    first valid entry, Σw·(λ−K) and Σw·(λ−K)² (the same for y, and the cross term) give
    Σw·(λ−λ̄)² = Σw·(λ−K)² − (Σw·(λ−K))²/Σw. K being one of the values, the cancellation loses at
    most what a sum over the batch loses anyway (|λ̄−K| is at most √n standard deviations).
    """
    n_rows, n_cells = rhat.shape
    if n_rows == 0 or n_cells == 0:
        return True
    group = max(1, GROUP_ENTRIES // n_cells)
    length = group * n_cells
    flat = np.zeros((FLAT_FIELDS, length))
    flat[RATE_MIN : COUNT_MIN + 1, :] = math.inf
    flat[RATE_MAX : COUNT_MAX + 1, :] = -math.inf
    w, counts, rates, values = np.ones(length), np.zeros(length), np.zeros(length), np.zeros(length)
    spiking = np.zeros(length, dtype=np.int64)
    rate_shift, count_shift = np.zeros(length), np.zeros(length)  # per cell, repeated for every row of a run
    unshifted = np.arange(n_cells)  # the cells without a valid entry so far: their shift is not set yet
    n_unshifted = n_cells
    rhat_flat, robs_flat = rhat.reshape(-1), robs.reshape(-1)
    for first_row in range(0, n_rows, group):
        size = min(group, n_rows - first_row) * n_cells
        start = first_row * n_cells
        rhat_run, robs_run = rhat_flat[start : start + size], robs_flat[start : start + size]  # slices: indexed
        _read_weights(weights, first_row, size, n_cells, w)  # by the loop variable alone, the loops vectorise
        bad = False
        for k in range(size):  # masked entries: harmless values (count 0, rate 1, log-rate 0)
            bad |= not ((w[k] >= 0.0) & (w[k] <= 1.0))
            counts[k] = float(robs_run[k]) if w[k] > 0.0 else 0.0
            bad |= not ((counts[k] >= 0.0) & (counts[k] < math.inf))
        if log_rate:
            for k in range(size):
                values[k] = float(rhat_run[k]) if w[k] > 0.0 else 0.0
                bad |= not ((values[k] > -math.inf) & (values[k] <= MAX_LOG_RATE))
                rates[k] = math.exp(values[k])
        else:
            for k in range(size):
                value = float(rhat_run[k]) if w[k] > 0.0 else 1.0
                bad |= not ((value >= 0.0) & (value < math.inf))
                rates[k] = max(value, MIN_RATE)
        if bad:
            return False
        if n_unshifted:
            n_unshifted = _set_shifts(unshifted, n_unshifted, n_cells, size, w, counts, rates, rate_shift, count_shift)
        _add_run(flat, size, w, counts, rates, rate_shift, count_shift)
        if log_rate:
            for k in range(size):
                flat[SPIKE_LOG_RATES, k] += w[k] * counts[k] * values[k]
        n_spiking = 0
        for k in range(size):
            spiking[n_spiking] = k
            n_spiking += counts[k] > 0.0
        for index in range(n_spiking):
            k = spiking[index]
            weighted = counts[k] * w[k]
            small = int(min(counts[k], SMALL_COUNTS - 1))  # ln of a small whole count: from the table
            log_count = LOG_SMALL_COUNTS[small] if small == counts[k] else math.log(counts[k])
            flat[SPIKE_LOG_SPIKES, k] += weighted * log_count
            if not log_rate:
                flat[SPIKE_LOG_RATES, k] += weighted * math.log(rates[k])
    folded = np.zeros((FLAT_FIELDS, n_cells))
    folded[RATE_MIN : COUNT_MIN + 1, :] = math.inf
    folded[RATE_MAX : COUNT_MAX + 1, :] = -math.inf
    for row in range(group):  # fold the runs' accumulators per cell: sums, then least and greatest
        run = flat[:, row * n_cells : (row + 1) * n_cells]
        for field in range(RATE_MIN):
            folded[field] += run[field]
        for field in (RATE_MIN, COUNT_MIN):
            folded[field] = np.minimum(folded[field], run[field])
        for field in (RATE_MAX, COUNT_MAX):
            folded[field] = np.maximum(folded[field], run[field])
    for cell in range(n_cells):
        total_weight = folded[WEIGHT, cell]
        has = total_weight > 0.0
        rate_away = folded[RATE_OFFSET, cell] / total_weight if has else 0.0  # λ̄ − K
        count_away = folded[COUNT_OFFSET, cell] / total_weight if has else 0.0
        n_valid[cell] = round(folded[N_VALID, cell])
        weight[cell] = total_weight
        spikes[cell] = folded[SPIKES, cell]
        model_ll[cell] = folded[SPIKE_LOG_RATES, cell] - folded[RATE_SUM, cell]
        spike_log_spikes[cell] = folded[SPIKE_LOG_SPIKES, cell]
        rate_sum[cell] = folded[RATE_SUM, cell]
        rate_m2[cell] = max(folded[RATE_SQUARE, cell] - total_weight * rate_away * rate_away, 0.0)
        count_m2[cell] = max(folded[COUNT_SQUARE, cell] - total_weight * count_away * count_away, 0.0)
        co_m2[cell] = folded[CO_SQUARE, cell] - total_weight * rate_away * count_away
        rate_min[cell], count_min[cell] = folded[RATE_MIN, cell], folded[COUNT_MIN, cell]
        rate_max[cell], count_max[cell] = folded[RATE_MAX, cell], folded[COUNT_MAX, cell]
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _add_run(flat: Any, size: int, w: Any, counts: Any, rates: Any, rate_shift: Any, count_shift: Any) -> None:
    """Add the first `size` entries of a run's buffers into the flat accumulators, one short loop per sum
    (one or two arrays written per loop: with more, LLVM gives up proving they do not overlap)."""
    n_valid, weight, spikes, rate_sum = flat[N_VALID], flat[WEIGHT], flat[SPIKES], flat[RATE_SUM]
    rate_offset, rate_square, count_offset = flat[RATE_OFFSET], flat[RATE_SQUARE], flat[COUNT_OFFSET]
    count_square, co_square = flat[COUNT_SQUARE], flat[CO_SQUARE]
    rate_min, count_min, rate_max, count_max = flat[RATE_MIN], flat[COUNT_MIN], flat[RATE_MAX], flat[COUNT_MAX]
    for k in range(size):
        n_valid[k] += w[k] > 0.0
    for k in range(size):
        weight[k] += w[k]
    for k in range(size):
        spikes[k] += w[k] * counts[k]
    for k in range(size):
        rate_sum[k] += w[k] * rates[k]
    for k in range(size):  # masked entries have finite harmless values and w = 0: they add 0
        step = rates[k] - rate_shift[k]
        rate_offset[k] += w[k] * step
        rate_square[k] += w[k] * step * step
    for k in range(size):
        step = counts[k] - count_shift[k]
        count_offset[k] += w[k] * step
        count_square[k] += w[k] * step * step
    for k in range(size):
        co_square[k] += w[k] * (rates[k] - rate_shift[k]) * (counts[k] - count_shift[k])
    for k in range(size):  # extremes over valid entries: an invalid one offers ±inf
        rate_min[k] = min(rate_min[k], rates[k] if w[k] > 0.0 else math.inf)
        rate_max[k] = max(rate_max[k], rates[k] if w[k] > 0.0 else -math.inf)
    for k in range(size):
        count_min[k] = min(count_min[k], counts[k] if w[k] > 0.0 else math.inf)
        count_max[k] = max(count_max[k], counts[k] if w[k] > 0.0 else -math.inf)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _read_weights(weights: Any, first_row: int, size: int, n_cells: int, w: Any) -> None:
    """The weights of the run of `size` entries from row `first_row` into `w` (all ones when there are none)."""
    if weights is not None:  # a plain `is None` test: numba drops the branch at compile time when it is None
        if weights.shape[1] == n_cells:
            run = weights.reshape(-1)[first_row * n_cells : first_row * n_cells + size]
            for k in range(size):
                w[k] = run[k]
        else:
            for row in range(size // n_cells):
                w[row * n_cells : (row + 1) * n_cells] = weights[first_row + row, 0]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _set_shifts(
    unshifted: Any,
    n_unshifted: int,
    n_cells: int,
    size: int,
    w: Any,
    counts: Any,
    rates: Any,
    rate_shift: Any,
    count_shift: Any,
) -> int:
    """Give each cell of `unshifted[:n_unshifted]` with a valid entry in this run (of `size` entries) its shifts,
    the λ and y of its first valid entry, in every row of the runs; keep the others in `unshifted` and return
    how many they are.

    Only the cells still without a shift are looked at, so a cell that is never valid costs one check per
    row. The entries before a cell's first valid one have w = 0 and add nothing whatever its shift.
    """
    kept = 0
    for index in range(n_unshifted):
        cell = unshifted[index]
        first = -1
        for k in range(cell, size, n_cells):
            if w[k] > 0.0:
                first = k
                break
        if first < 0:
            unshifted[kept] = cell
            kept += 1
            continue
        for k in range(cell, rate_shift.shape[0], n_cells):
            rate_shift[k], count_shift[k] = rates[first], counts[first]
    return kept
