"""Bits per spike from additive per-cell sufficient statistics: pure numpy, no I/O.

Every entry point (the offline merge of shards, the in-memory `bits_per_spike` and the online
DDP metric) reduces its data to a `CellStats` with `batch_stats`, adds them up, and scores the
sum with `cell_scores`. Sums are float64 whatever the input precision.

For cell c, weight w = dfs (entries with w = 0 are ignored, NaN or not) and rate
λ = max(rhat, MIN_RATE) (or exp(rhat) for log-rates):

    n_valid = #{w > 0}      weight = Σ w      spikes = Σ w·robs      model_ll = Σ w·(robs·ln λ − λ)
    ll_gain = model_ll − (spikes·ln(spikes/weight) − spikes)         bps = ll_gain / (spikes·ln 2)

The log(robs!) term is the same for the model and the null model and cancels. For the other
metrics (see `cell_scores`) each cell also keeps spike_log_spikes = Σ w·robs·ln robs and
rate_sum = Σ w·λ (additive), the centred second moments rate_m2 = Σ w·(λ − λ̄)²,
count_m2 = Σ w·(robs − r̄)² and co_m2 = Σ w·(λ − λ̄)(robs − r̄) (merged with Chan's pairwise
update, never as raw Σx² − (Σx)²/n), and the least and greatest λ and robs over valid entries,
which tell exactly when a side is constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_numpy_namespace

from bpseval._arrays import to_numpy
from bpseval.errors import BpsevalError
from bpseval.kernel.cellstats import (
    GREATEST_FIELDS,
    LEAST_FIELDS,
    MOMENT_FIELDS,
    STAT_FIELDS,
    CellStats,
    mean_or_zero,
)
from bpseval.kernel.compiled import batch_sums

LN2 = math.log(2.0)
MIN_RATE = 1e-9
RATE_KINDS = ("rate", "log_rate")
OK, SILENT, UNCOVERED, OVERFLOW, LOW = "ok", "silent", "uncovered", "overflow", "low"
EXCLUDED = "excluded"
STATUSES = (OK, SILENT, UNCOVERED, OVERFLOW, LOW, EXCLUDED)
"""`overflow`: a covered cell whose float64 sums, ll_gain or bps are not finite (extreme but finite inputs,
e.g. spike counts near 1e308, log-rates near 700 over many samples, subnormal spike counts). Its bps is
undefined, and so are the bps and bps_pooled of its dataset and of the whole run: no number is reported
that silently leaves it out.

`low`: a cell that would be `ok` but has fewer valid samples than the scoring setting `min_samples`
(never set by `cell_scores`). Its bps is kept, but left out of the means; it stays in bps_pooled, which
pools every covered cell.

`excluded`: a cell the user left out on purpose (`--exclude-cells`: a unit known to be dead, say), whatever
its sums (never set by `cell_scores`). It takes part in no number and fails no coverage gate, and every
output lists it as excluded."""


def reduce_rows(stats: CellStats, counts: Any = None, fields: tuple[str, ...] = STAT_FIELDS) -> CellStats:
    """Merge (rows, cells) statistics over their rows, row r taken counts[r] times (1 when None).

    With 2-D `counts` (replicates, rows), one merge per replicate: the bootstrap's resamples, as
    (replicates, cells). Moments are gathered around the mean of all rows (each row's centred
    moment plus its offset from that shift), then re-centred on each replicate's own mean; the
    shift is that close to every replicate's mean, so nothing large cancels. Only `fields` are merged
    (and n_valid, weight and spikes, which every status needs): the others are NaN, which leaves the
    numbers that read them undefined.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # sums that overflow make the cell `overflow` in cell_scores
        return _reduce_rows(stats, counts, {"n_valid", "weight", "spikes", *fields})


def _reduce_rows(stats: CellStats, counts: Any, fields: set[str]) -> CellStats:
    xp = array_namespace(stats.weight)
    n_rows = stats.weight.shape[0]
    on = device(stats.weight)
    if n_rows == 0:  # min and max of no row have no identity: the statistics of no sample, per replicate
        return _no_samples(xp, (stats.n_cells,) if counts is None else (*counts.shape[:-1], stats.n_cells), on)
    k = xp.ones((n_rows,), dtype=xp.float64, device=on) if counts is None else xp.astype(counts, xp.float64)
    moments = bool(fields & set(MOMENT_FIELDS))
    summed = ["n_valid", "weight", "spikes"]
    summed += [name for name in ("model_ll", "spike_log_spikes") if name in fields]
    summed += ["rate_sum"] if "rate_sum" in fields or moments else []
    columns = {name: getattr(stats, name) for name in summed}
    if moments:
        shifts, row_moments = _row_moments(xp, stats)
        columns |= row_moments
    merged = _totals(xp, k, columns)
    merged["n_valid"] = xp.astype(xp.round(merged["n_valid"]), xp.int64)
    if moments:
        merged |= _recentred_moments(xp, merged, shifts)
    taken = k > 0

    def extreme(values: Any, pick: Callable[..., Any], empty: float) -> Any:
        rows_taken = xp.reshape(taken, (*taken.shape, 1))
        if is_numpy_namespace(xp):  # a masked reduction, without a (replicates, rows, cells) copy
            reduce = (np.minimum if pick is xp.min else np.maximum).reduce
            spread = np.broadcast_to(values, (*taken.shape, values.shape[-1]))
            return reduce(spread, axis=-2, where=rows_taken, initial=empty)
        return pick(xp.where(rows_taken, values, empty), axis=-2)

    merged |= {name: extreme(getattr(stats, name), xp.min, math.inf) for name in LEAST_FIELDS if name in fields}
    merged |= {name: extreme(getattr(stats, name), xp.max, -math.inf) for name in GREATEST_FIELDS if name in fields}
    unknown = xp.full(merged["weight"].shape, math.nan, dtype=xp.float64, device=on)
    for name in STAT_FIELDS:
        merged.setdefault(name, unknown)  # one array for every field not merged: it is only read
    return CellStats(**{name: merged[name] for name in STAT_FIELDS})


def _totals(xp: Any, counts: Any, columns: dict[str, Any]) -> dict[str, Any]:
    """counts @ each (rows, cells) column, as one product of the columns side by side (the counts read once)."""
    cells = next(iter(columns.values())).shape[-1]
    side_by_side = xp.concat([xp.astype(values, xp.float64) for values in columns.values()], axis=-1)
    product = counts @ side_by_side
    return {name: product[..., index * cells : (index + 1) * cells] for index, name in enumerate(columns)}


def _row_moments(xp: Any, stats: CellStats) -> tuple[tuple[Any, Any], dict[str, Any]]:
    """Each row's centred moments moved to a common shift (the mean of all rows), which add up over rows: the shifts
    (of λ and robs), and the moved moments by field name."""
    all_weight = xp.sum(stats.weight, axis=0)
    rate_shift = mean_or_zero(xp, xp.sum(stats.rate_sum, axis=0), all_weight)
    count_shift = mean_or_zero(xp, xp.sum(stats.spikes, axis=0), all_weight)
    rate_offset = xp.where(stats.weight > 0, mean_or_zero(xp, stats.rate_sum, stats.weight) - rate_shift, 0.0)
    count_offset = xp.where(stats.weight > 0, mean_or_zero(xp, stats.spikes, stats.weight) - count_shift, 0.0)
    return (rate_shift, count_shift), {
        "rate_m2": stats.rate_m2 + stats.weight * rate_offset * rate_offset,
        "count_m2": stats.count_m2 + stats.weight * count_offset * count_offset,
        "co_m2": stats.co_m2 + stats.weight * rate_offset * count_offset,
    }


def _recentred_moments(xp: Any, merged: dict[str, Any], shifts: tuple[Any, Any]) -> dict[str, Any]:
    """The merged moments about the common shift, re-centred on each merge's own means."""
    weight = merged["weight"]
    rate_away = mean_or_zero(xp, merged["rate_sum"], weight) - shifts[0]
    count_away = mean_or_zero(xp, merged["spikes"], weight) - shifts[1]
    return {
        "rate_m2": xp.maximum(merged["rate_m2"] - weight * rate_away * rate_away, 0.0),
        "count_m2": xp.maximum(merged["count_m2"] - weight * count_away * count_away, 0.0),
        "co_m2": merged["co_m2"] - weight * rate_away * count_away,
    }


@dataclass(frozen=True)
class InvalidValues:
    """`count` entries of `array` are `problem`; the first at (`first_row`, `first_cell`)."""

    array: str
    problem: str
    count: int
    first_row: int
    first_cell: int

    def describe(self) -> str:
        return (
            f"{self.array} has {self.count} {self.problem} value{'s' if self.count != 1 else ''}"
            f" (first at sample row {self.first_row}, cell {self.first_cell})"
        )


class InvalidValuesError(BpsevalError):
    """Raised by `batch_stats` when a batch holds values that make the likelihood meaningless."""

    def __init__(self, problems: list[InvalidValues]):
        self.problems = problems
        super().__init__("; ".join(p.describe() for p in problems) + FIX_VALUES_HINT)


FIX_VALUES_HINT = (
    ". Fix the model output or the data, or mark those entries invalid with dfs = 0"
    " (rates must be finite and >= 0, spike counts finite and >= 0, dfs in [0, 1])."
)


def as_weights(dfs: np.ndarray | None, n_rows: int, n_cells: int) -> np.ndarray | None:
    """The mask as an (n_rows, n_cells) or (n_rows, 1) array, or None when every entry is valid.

    Raises BpsevalError when the shape fits neither; the message names the shapes.
    """
    if dfs is None:
        return None
    if dfs.shape == (n_rows,):
        return dfs.reshape(n_rows, 1)
    if dfs.shape in ((n_rows, n_cells), (n_rows, 1)):
        return dfs
    raise BpsevalError(
        f"dfs has shape {tuple(dfs.shape)} but rhat/robs have shape {(n_rows, n_cells)};"
        f" dfs must be ({n_rows}, {n_cells}), ({n_rows}, 1) or ({n_rows},)"
    )


def batch_stats(rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate") -> CellStats:
    """Sufficient statistics of one (rows, cells) batch of any size, accumulated in float64.

    Works on numpy arrays and on torch tensors alike (through the array API), so the online
    metric accumulates on the tensors' device with this same code. `weights` is None (all
    valid) or an (rows, cells) / (rows, 1) array from `as_weights`. Raises InvalidValuesError
    for NaN/inf/negative values at valid entries or weights outside [0, 1], numbering rows
    within this batch. Numpy batches are processed in row blocks of about BLOCK_ENTRIES
    entries, so that float64 temporaries stay in the CPU cache.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # sums that overflow make the cell `overflow` in cell_scores
        return _batch_stats(rhat, robs, weights, rate_kind)


def _batch_stats(rhat: Any, robs: Any, weights: Any, rate_kind: str) -> CellStats:
    xp = array_namespace(rhat, robs, *(() if weights is None else (weights,)))
    # the compiled single pass (bpseval[fast]) when installed and worth it; None: the reference below
    if is_numpy_namespace(xp) and (compiled := batch_sums(rhat, robs, weights, rate_kind)) is not None:
        return compiled
    n_rows, n_cells = rhat.shape
    rows = max(1, BLOCK_ENTRIES // max(n_cells, 1)) if is_numpy_namespace(xp) else n_rows
    if n_rows <= rows:
        return _block_stats(xp, rhat, robs, weights, rate_kind)
    total = CellStats.zeros(n_cells)
    for start in range(0, n_rows, rows):
        block = slice(start, start + rows)
        try:
            total += _block_stats(xp, rhat[block], robs[block], None if weights is None else weights[block], rate_kind)
        except InvalidValuesError as error:  # number the rows of the whole batch
            raise InvalidValuesError([replace(p, first_row=p.first_row + start) for p in error.problems]) from None
    return total


BLOCK_ENTRIES = 1 << 17
"""Entries per row block of a numpy batch: its float64 temporaries (1 MiB) stay in the CPU cache."""


def _block_stats(xp: Any, rhat: Any, robs: Any, weights: Any, rate_kind: str) -> CellStats:
    """`batch_stats` of one block: validate, then the four sums with as few passes as possible.

    Numpy: validity is decided from min and max of the inputs as given (NaN propagates through
    both), so the usual all-valid batch costs no float64 copies; only a failing batch is looked at
    closely. Other namespaces are screened on their device (`screen_values`), then asked once
    whether anything was found: the one host synchronisation of this path.
    """
    if not is_numpy_namespace(xp):
        screened = screen_values(rhat, robs, weights, rate_kind)
        if bool(xp.any(screened.problems)):
            raise InvalidValuesError(find_invalid_values(to_numpy(rhat), to_numpy(robs), to_numpy(weights), rate_kind))
        return _sums(xp, screened.rhat, screened.robs, screened.weights, rate_kind)
    return _sums(xp, *validated_values(rhat, robs, weights, rate_kind), rate_kind)


def validated_values(rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate") -> tuple[Any, Any, Any]:
    """A numpy batch whose valid entries are all usable, with harmless values at its masked entries.

    The value rule of every batch: rates finite and >= 0 (log-rates finite and <= MAX_LOG_RATE), counts
    finite and >= 0, weights in [0, 1], at every entry whose weight is > 0; values at masked entries
    are ignored, NaN or not. Decided from min and max of the inputs as given (NaN propagates through
    both), so the usual all-valid batch costs no copy; only a failing batch is looked at closely.

    Returns:
        (rhat, robs, weights): the inputs, masked entries replaced only when some were not usable;
        bool weights as float32.

    Raises:
        InvalidValuesError: naming each kind of bad value, its count and first (row, cell).
    """
    if weights is not None and weights.dtype == np.bool_:
        weights = weights.astype(np.float32)
    if not _weights_are_valid(np, weights):
        raise InvalidValuesError(find_invalid_values(to_numpy(rhat), to_numpy(robs), to_numpy(weights), rate_kind))
    if not _values_are_valid(np, rhat, robs, rate_kind):
        rhat, robs = _neutralize_masked_entries(np, rhat, robs, weights, rate_kind)
    return rhat, robs, weights


def unchecked_batch_stats(rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate") -> CellStats:
    """The four float64 sums of a (rows, cells) batch whose values are usable, or were screened by `screen_values`.

    No validation and, for namespaces other than numpy, no host synchronisation. `weights` is
    None or a float (rows, cells) / (rows, 1) array.
    """
    return _sums(array_namespace(rhat, robs, *(() if weights is None else (weights,))), rhat, robs, weights, rate_kind)


def _sums(xp: Any, rhat: Any, robs: Any, weights: Any, rate_kind: str) -> CellStats:
    """Every field of `CellStats` for one batch; off numpy, rates are clamped without asking the device.

    The centred moments are taken around the batch's own weighted means (two passes over the batch);
    batches are then merged with `combine`.
    """
    n_rows, n_cells = rhat.shape
    on = device(rhat)
    if n_rows == 0 or n_cells == 0:
        return _no_samples(xp, n_cells, on)
    if weights is not None:
        weights = xp.broadcast_to(weights, rhat.shape)
    if not is_numpy_namespace(xp):  # one float64 copy of each, shared by the sums
        robs = xp.astype(robs, xp.float64, copy=False)
        weights = None if weights is None else xp.astype(weights, xp.float64, copy=False)
    n_valid, weight = _valid_counts(xp, weights, rhat.shape, on)
    if rate_kind == "log_rate":
        log_rates = xp.astype(rhat, xp.float64)
        rates = xp.exp(log_rates)
        spikes, spike_log_spikes = _spike_sums(xp, None, robs, weights)
        spike_log_rates = _weighted_column_sums(xp, xp.astype(robs, xp.float64, copy=False) * log_rates, weights)
    else:
        rates = rhat  # λ = max(rhat, MIN_RATE): with numpy only copied when some rate is below MIN_RATE
        if not is_numpy_namespace(xp) or float(xp.min(rhat)) < MIN_RATE:
            rates = xp.maximum(xp.astype(rhat, xp.float64), xp.asarray(MIN_RATE, dtype=xp.float64, device=on))
        spikes, spike_log_spikes, spike_log_rates = _spike_sums(xp, rates, robs, weights)
    rate_sum = _weighted_column_sums(xp, rates, weights)
    spread = _numpy_spread if is_numpy_namespace(xp) else _spread
    moments, extremes = spread(
        xp, rates, robs, weights, weight, mean_or_zero(xp, rate_sum, weight), mean_or_zero(xp, spikes, weight)
    )
    return CellStats(
        n_valid=n_valid,
        weight=weight,
        spikes=spikes,
        model_ll=spike_log_rates - rate_sum,
        spike_log_spikes=spike_log_spikes,
        rate_sum=rate_sum,
        **dict(zip(MOMENT_FIELDS, moments, strict=True)),
        **dict(zip(LEAST_FIELDS + GREATEST_FIELDS, extremes, strict=True)),
    )


def _no_samples(xp: Any, shape: int | tuple[int, ...], on: Any) -> CellStats:
    """`CellStats.zeros` in namespace `xp`, on device `on`."""
    return CellStats.zeros(shape).map(lambda values: xp.asarray(values, device=on))


Spread = tuple[tuple[Any, Any, Any], tuple[Any, Any, Any, Any]]
"""(rate_m2, count_m2, co_m2) and (rate_min, count_min, rate_max, count_max) of a batch."""


def _spread(xp: Any, rates: Any, robs: Any, weights: Any, weight: Any, rate_mean: Any, count_mean: Any) -> Spread:
    """Centred moments around the batch's means, and extremes over valid entries, on the batch's device."""
    rate_step = xp.astype(rates, xp.float64) - rate_mean
    count_step = robs - count_mean
    weighted_rate_step = rate_step if weights is None else weights * rate_step
    weighted_count_step = count_step if weights is None else weights * count_step
    moments = _recentred(
        (
            xp.sum(weighted_rate_step * rate_step, axis=0),
            xp.sum(weighted_count_step * count_step, axis=0),
            xp.sum(weighted_rate_step * count_step, axis=0),
        ),
        (xp.sum(weighted_rate_step, axis=0), xp.sum(weighted_count_step, axis=0)),
        weight,
    )
    valid = None if weights is None else weights > 0

    def extreme(values: Any, pick: Callable[..., Any], empty: float) -> Any:
        chosen = values if valid is None else xp.where(valid, values, empty)
        return xp.astype(pick(chosen, axis=0), xp.float64)

    extremes = (
        extreme(rates, xp.min, math.inf),
        extreme(robs, xp.min, math.inf),
        extreme(rates, xp.max, -math.inf),
        extreme(robs, xp.max, -math.inf),
    )
    return moments, extremes


def _recentred(moments: tuple[Any, Any, Any], offsets: tuple[Any, Any], weight: Any) -> tuple[Any, Any, Any]:
    """Moments taken around approximate means, moved to the exact weighted means (corrected two-pass).

    With d = x − m for an approximate mean m, Σw(x − x̄)² = Σw·d² − (Σw·d)²/W: the correction is
    tiny and exact enough, where the float64 mean of values near 1e15 is itself off by a tenth.
    """
    rate_offset, count_offset = offsets
    xp = array_namespace(rate_offset)
    has = weight > 0
    inverse = xp.where(has, 1.0 / xp.where(has, weight, 1.0), 0.0)
    rate_m2, count_m2, co_m2 = moments
    return (
        xp.maximum(rate_m2 - rate_offset * rate_offset * inverse, 0.0),
        xp.maximum(count_m2 - count_offset * count_offset * inverse, 0.0),
        co_m2 - rate_offset * count_offset * inverse,
    )


def _numpy_spread(xp: Any, rates: Any, robs: Any, weights: Any, weight: Any, rate_mean: Any, count_mean: Any) -> Spread:
    """`_spread` for numpy: float64 copies made once into three block-sized arrays, then written in place.

    Mixed-precision and masked ufuncs take numpy's slow buffered paths, and a fresh temporary per
    operation costs more than the arithmetic on it. Extremes over valid entries use ceil(w), 1 where
    valid and 0 where masked, on values that are >= 0: x / ceil(w) is x or inf (or NaN, which fmin
    skips) and x · ceil(w) is x or 0, both exact.
    """
    rate_step, count_step, scratch = (np.empty(rates.shape) for _ in range(3))
    np.copyto(rate_step, rates)
    rate_step -= rate_mean
    np.copyto(count_step, robs)
    count_step -= count_mean
    if weights is None:
        moments = (
            np.einsum("rc,rc->c", rate_step, rate_step),
            np.einsum("rc,rc->c", count_step, count_step),
            np.einsum("rc,rc->c", rate_step, count_step),
        )
        extremes = (rates.min(axis=0), robs.min(axis=0), rates.max(axis=0), robs.max(axis=0))
        offsets = (rate_step.sum(axis=0), count_step.sum(axis=0))
        rate_min, count_min, rate_max, count_max = (np.asarray(values, dtype=np.float64) for values in extremes)
        return _recentred(moments, offsets, weight), (rate_min, count_min, rate_max, count_max)
    np.copyto(scratch, weights)
    scratch *= rate_step
    rate_m2, co_m2 = np.einsum("rc,rc->c", scratch, rate_step), np.einsum("rc,rc->c", scratch, count_step)
    rate_offset = scratch.sum(axis=0)
    np.copyto(scratch, weights)
    scratch *= count_step
    moments = _recentred(
        (rate_m2, np.einsum("rc,rc->c", scratch, count_step), co_m2),
        (rate_offset, scratch.sum(axis=0)),
        weight,
    )
    valid = np.ceil(weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        least = [np.fmin.reduce(values / valid, axis=0).astype(np.float64) for values in (rates, robs)]
    greatest = [np.max(values * valid, axis=0).astype(np.float64) for values in (rates, robs)]
    empty = ~(least[0] < math.inf)  # no valid entry: every quotient was inf or NaN
    for low, high in zip(least, greatest, strict=True):
        low[empty], high[empty] = math.inf, -math.inf
    return moments, (*least, *greatest)


@dataclass(frozen=True)
class Screened:
    """A batch with harmless values at its masked entries, and which checks of `check_labels` failed."""

    rhat: Any
    robs: Any
    weights: Any
    problems: Any
    """bool (len(check_labels),) array on the batch's device: True where some valid entry fails that check."""


def check_labels(rate_kind: str) -> tuple[tuple[str, str], ...]:
    """(array, problem) of every value check, in the order of `Screened.problems` and `find_invalid_values`."""
    rhat_range = "negative" if rate_kind == "rate" else f"log-rate above {MAX_LOG_RATE:g} (overflowing)"
    return (
        ("dfs", "outside [0, 1] or NaN"),
        ("rhat", "NaN or infinite"),
        ("rhat", rhat_range),
        ("robs", "NaN or infinite"),
        ("robs", "negative"),
    )


def screen_values(rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate") -> Screened:
    """Validate a batch on its own device without synchronising with the host.

    Masked entries (w = 0, whatever their values) are replaced by harmless ones, so they add 0;
    then min and max of each array (NaN propagates through both) decide each check of
    `check_labels`, into a device bool array the caller reads when it may wait (e.g. at the end of
    validation). A check that fails says which kind of value is wrong, not where: for that,
    `find_invalid_values` on the host.
    """
    xp = array_namespace(rhat, robs, *(() if weights is None else (weights,)))
    if weights is not None and weights.dtype == xp.bool:
        weights = xp.astype(weights, xp.float32)
    no = xp.zeros((), dtype=xp.bool, device=device(rhat))
    if rhat.shape[0] == 0 or rhat.shape[1] == 0:
        return Screened(rhat, robs, weights, xp.stack([no] * 5))
    bad_weights = no
    if weights is not None:
        bad_weights = ~((xp.min(weights) >= 0.0) & (xp.max(weights) <= 1.0))
        valid = xp.broadcast_to(weights > 0.0, rhat.shape)
        rhat = xp.where(valid, rhat, 0.0 if rate_kind == "log_rate" else 1.0)
        robs = xp.where(valid, robs, 0.0)
    low, high = xp.min(rhat), xp.max(rhat)
    out_of_range = (high > MAX_LOG_RATE) if rate_kind == "log_rate" else (low < 0.0)
    counts_low, counts_high = xp.min(robs), xp.max(robs)
    problems = xp.stack(
        [
            bad_weights,
            ~((low > -math.inf) & (high < math.inf)),
            out_of_range,
            ~((counts_low > -math.inf) & (counts_high < math.inf)),
            counts_low < 0.0,
        ]
    )
    return Screened(rhat, robs, weights, problems)


def _valid_counts(xp: Any, weights: Any, shape: tuple[int, int], on: Any) -> tuple[Any, Any]:
    """n_valid (entries with w > 0) and Σw per cell."""
    n_rows, n_cells = shape
    if weights is None:
        return (
            xp.full((n_cells,), n_rows, dtype=xp.int64, device=on),
            xp.full((n_cells,), float(n_rows), dtype=xp.float64, device=on),
        )
    if is_numpy_namespace(xp):  # ceil(w) is 1 where w > 0; float32 sums of up to 2^24 ones are exact
        n_valid = np.ones(n_rows, dtype=np.float32) @ np.ceil(weights).astype(np.float32, copy=False)
        return n_valid.astype(np.int64), _weighted_column_sums(xp, weights, None)
    return xp.sum(weights > 0, axis=0, dtype=xp.int64), xp.sum(weights, axis=0, dtype=xp.float64)


def _weighted_column_sums(xp: Any, values: Any, weights: Any) -> Any:
    """Σ_rows w·values per cell in float64 (Σ values when weights is None)."""
    if is_numpy_namespace(xp):  # the column sums as one BLAS matrix-vector product: fast for narrow blocks too
        products = (
            values.astype(np.float64, copy=False) if weights is None else np.multiply(weights, values, dtype=np.float64)
        )
        return np.ones(len(products)) @ products
    if weights is None:
        return xp.sum(values, axis=0, dtype=xp.float64)
    return xp.sum(weights * xp.astype(values, xp.float64, copy=False), axis=0)


def _spike_sums(xp: Any, rates: Any, robs: Any, weights: Any) -> tuple[Any, ...]:
    """Σ w·robs, Σ w·robs·ln robs and (unless `rates` is None) Σ w·robs·ln(rates) per cell, in float64.

    With numpy these are sums over the entries where robs > 0 only (a minority of the entries of
    binned spike counts), gathered once and added up per cell by `bincount`: the logarithms, the
    costliest step, are taken there only. Other namespaces compute them densely on their device.
    """
    if not is_numpy_namespace(xp):
        counts = xp.astype(robs, xp.float64, copy=False)
        log_counts = xp.where(counts > 0, xp.log(xp.where(counts > 0, counts, 1.0)), 0.0)
        sums = [_weighted_column_sums(xp, counts, weights), _weighted_column_sums(xp, counts * log_counts, weights)]
        if rates is not None:
            sums.append(_weighted_column_sums(xp, counts * xp.log(xp.astype(rates, xp.float64, copy=False)), weights))
        return tuple(sums)
    n_cells = robs.shape[1]
    where = np.flatnonzero(robs > 0)
    cells = where % n_cells
    counts = np.ravel(robs)[where].astype(np.float64)
    spikes = counts if weights is None else counts * np.ravel(weights)[where]
    terms = [spikes, spikes * np.log(counts)]
    if rates is not None:
        terms.append(np.log(np.ravel(rates)[where], dtype=np.float64))
        terms[-1] *= spikes
    # without any spike, bincount gives int64 zeros whatever its weights: the sums are float64 all the same
    return tuple(np.bincount(cells, weights=term, minlength=n_cells).astype(np.float64, copy=False) for term in terms)


def pad_blocks(per_block: CellStats, n_blocks: int) -> CellStats:
    """(blocks, cells) statistics with empty blocks appended up to `n_blocks` (never shortened)."""
    have = per_block.n_valid.shape[0]
    if n_blocks <= have:
        return per_block
    grown = CellStats.zeros((n_blocks, per_block.n_cells))
    put_rows(grown, slice(0, have), per_block)
    return grown


def put_rows(target: CellStats, rows: Any, values: CellStats) -> None:
    """Overwrite rows `rows` of (rows, cells) numpy statistics with `values`, in place."""
    for name, array in values.fields().items():
        getattr(target, name)[rows] = array


def merge_into_rows(target: CellStats, rows: np.ndarray, values: CellStats) -> None:
    """Merge `values` into rows `rows` (distinct) of (rows, cells) numpy statistics, in place."""
    put_rows(target, rows, target.map(lambda array: array[rows]) + values)


@dataclass(frozen=True)
class Blocks:
    """Statistics of the blocks that hold samples only: their ids (sorted, distinct) and (len(ids), cells) sums."""

    ids: np.ndarray
    stats: CellStats

    def total(self) -> CellStats:
        """The statistics of all the blocks together."""
        return reduce_rows(self.stats)


def block_stats(block_ids: np.ndarray, rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate") -> Blocks:
    """The statistics of a numpy batch per block: one row per distinct value of `block_ids` (one per sample)."""
    ids = np.unique(block_ids)
    per_block = CellStats.zeros((len(ids), rhat.shape[1]))
    for row, block in enumerate(ids):
        rows = block_ids == block
        put_rows(
            per_block, row, batch_stats(rhat[rows], robs[rows], None if weights is None else weights[rows], rate_kind)
        )
    return Blocks(ids, per_block)


def add_by_block(
    per_block: CellStats, block_ids: np.ndarray, rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate"
) -> tuple[CellStats, CellStats]:
    """Add a numpy batch into rows `block_ids` of dense (blocks, cells) statistics, growing them to fit.

    For a few blocks numbered from 0 (the merge's `--blocks`); `BlockSums` keeps sparse ids. Returns the
    updated per-block statistics and the batch's total (the sum of its blocks).
    """
    blocks = block_stats(block_ids, rhat, robs, weights, rate_kind)
    per_block = pad_blocks(per_block, int(blocks.ids[-1]) + 1 if len(blocks.ids) else 0)
    merge_into_rows(per_block, blocks.ids, blocks.stats)
    return per_block, blocks.total()


class BlockSums:
    """Statistics per block id, kept for the blocks that hold samples only, however large their ids.

    A stats-only writer numbers blocks sample_idx // block_size, up to about 2^63 / block_size: a
    dense array indexed by id would hold every empty block below the first. Rows are kept in the
    order the blocks first appear, in a buffer that doubles when full, so adding costs the blocks
    added, not the blocks held; `sorted()` gives them in id order.
    """

    def __init__(self, n_cells: int) -> None:
        self._rows: dict[int, int] = {}
        self._sums = CellStats.zeros((0, n_cells))

    def add(self, blocks: Blocks) -> None:
        """Add the statistics of `blocks` (distinct ids) into the blocks of the same ids, creating the new ones."""
        rows = np.array([self._rows.setdefault(int(block), len(self._rows)) for block in blocks.ids], dtype=np.int64)
        if len(self._rows) > self._sums.n_valid.shape[0]:
            self._sums = pad_blocks(self._sums, max(len(self._rows), 2 * self._sums.n_valid.shape[0]))
        merge_into_rows(self._sums, rows, blocks.stats)

    def sorted(self) -> Blocks:
        """Every block added, in increasing id order."""
        ids = np.fromiter(self._rows, dtype=np.int64, count=len(self._rows))
        order = np.argsort(ids, kind="stable")
        return Blocks(ids[order], self._sums.map(lambda array: array[order]))


MAX_LOG_RATE = 700.0
"""Largest log-rate accepted: exp(709.8) overflows float64."""


def _extremes(xp: Any, values: Any) -> tuple[float, float]:
    """min and max as Python floats (NaN if any value is NaN), compared in float64 whatever the dtype."""
    return float(xp.min(values)), float(xp.max(values))


def _weights_are_valid(xp: Any, weights: Any) -> bool:
    """Every weight is in [0, 1] (NaN is not)."""
    if weights is None or weights.shape[0] == 0 or weights.shape[1] == 0:
        return True
    low, high = _extremes(xp, weights)
    return low >= 0.0 and high <= 1.0


def _values_are_valid(xp: Any, rhat: Any, robs: Any, rate_kind: str) -> bool:
    """Cheap whole-block check that every entry is usable (finite, in range), from min and max."""
    if rhat.shape[0] == 0 or rhat.shape[1] == 0:
        return True
    low, high = _extremes(xp, robs)
    if not (low >= 0.0 and high < math.inf):
        return False
    low, high = _extremes(xp, rhat)
    if rate_kind == "log_rate":
        return low > -math.inf and high <= MAX_LOG_RATE
    return low >= 0.0 and high < math.inf


def _neutralize_masked_entries(xp: Any, rhat: Any, robs: Any, weights: Any, rate_kind: str) -> tuple[Any, Any]:
    """rhat and robs with harmless values where w = 0, or InvalidValuesError if a valid entry is bad.

    Values at masked entries are ignored, NaN or not; replacing them lets those entries add 0.
    """
    if weights is not None:
        valid = xp.broadcast_to(weights > 0.0, rhat.shape)
        rhat = xp.where(valid, rhat, 0.0 if rate_kind == "log_rate" else 1.0)
        robs = xp.where(valid, robs, 0.0)
        if _values_are_valid(xp, rhat, robs, rate_kind):
            return rhat, robs
    raise InvalidValuesError(
        find_invalid_values(to_numpy(rhat), to_numpy(robs), None if weights is None else to_numpy(weights), rate_kind)
    )


def find_invalid_values(
    rhat: np.ndarray, robs: np.ndarray, weights: np.ndarray | None, rate_kind: str
) -> list[InvalidValues]:
    """Every kind of bad value in a batch, with its count and first (row, cell); slow, for messages."""
    shape = rhat.shape
    valid = np.ones(shape, dtype=bool)
    bad_weights = np.zeros(shape, dtype=bool)
    if weights is not None:
        w = np.broadcast_to(weights, shape)
        bad_weights = ~((w >= 0) & (w <= 1))
        valid = (w > 0) & ~bad_weights
    with np.errstate(invalid="ignore"):
        masks = (
            bad_weights,
            valid & ~np.isfinite(rhat),
            valid & ((rhat < 0) if rate_kind == "rate" else (rhat > MAX_LOG_RATE)),
            valid & ~np.isfinite(robs),
            valid & (robs < 0),
        )
    problems = []
    for (array, problem), bad in zip(check_labels(rate_kind), masks, strict=True):
        count = int(bad.sum())
        if count:
            row, cell = np.argwhere(bad)[0]
            problems.append(InvalidValues(array, problem, count, int(row), int(cell)))
    return problems


@dataclass(frozen=True)
class CellScores:
    """Per-cell results derived from `CellStats`: undefined values are NaN."""

    ll_gain: np.ndarray
    bps: np.ndarray
    status: np.ndarray
    pseudo_r2: np.ndarray
    """1 − D_model / D_null (Poisson deviances), for ok cells whose counts are not all equal."""
    corr: np.ndarray
    """Weighted Pearson correlation of λ and robs, for ok cells where neither side is constant."""
    null_deviance: np.ndarray
    """D_null = 2·(Σ w·y·ln y − spikes·ln(spikes/weight)): 0 for constant counts, NaN for uncovered or overflow."""
    model_deviance: np.ndarray
    """D_model = 2·(Σ w·y·ln y − model_ll − spikes), NaN for uncovered or overflow cells."""

    def with_status(self, status: np.ndarray) -> CellScores:
        return replace(self, status=status)

    def map(self, function: Callable[[np.ndarray], np.ndarray]) -> CellScores:
        """`function` applied to every per-cell array (selecting, repeating cells or replicates)."""
        return CellScores(**{name: function(getattr(self, name)) for name in CellScores.__dataclass_fields__})


STATUS_OF_CODE = np.array([OK, SILENT, UNCOVERED, OVERFLOW])
"""The statuses `cell_scores` sets, by the small code it computes them as (a table lookup builds the text array)."""


def cell_scores(stats: CellStats, spike_sums_only: bool = False) -> CellScores:
    """Every per-cell metric and the status (ok / silent / uncovered / overflow) of every cell.

    The sums can overflow only after many finite batches were added, so finiteness is checked
    here, on the final sums: a covered cell whose sums, ll_gain or bps are not finite is `overflow`
    (every metric NaN), never an `ok` cell without a number. pseudo_r2 and corr need counts that
    are not all equal (and corr rates that are not all equal), decided exactly from the least and
    greatest value, never from a centred sum that rounding may leave just above 0.

    Args:
        stats: the sums, of any leading shape (cells, or (replicates, cells)).
        spike_sums_only: score ll_gain, bps and the status only, from n_valid, weight, spikes and model_ll (a
            bootstrap of bps merges only those); pseudo_r2, corr and the deviances are then NaN.

    Returns:
        The scores, of the shape of the sums.
    """
    covered = stats.n_valid > 0
    ok = covered & (stats.spikes > 0)
    spikes = np.where(ok, stats.spikes, 1.0)
    weight = np.where(ok, stats.weight, 1.0)
    with np.errstate(all="ignore"):
        log_rate = np.log(spikes / weight)
        ll_gain = np.where(covered, stats.model_ll - np.where(ok, spikes * log_rate - spikes, 0.0), np.nan)
        bps = np.where(ok, ll_gain / (spikes * LN2), np.nan)
        others = () if spike_sums_only else _deviance_scores(stats, ok, covered, spikes, log_rate, ll_gain)
    pseudo_r2, corr, null_deviance, model_deviance = others or (np.full(ll_gain.shape, np.nan) for _ in range(4))
    finite = np.isfinite(stats.weight) & np.isfinite(stats.spikes) & np.isfinite(ll_gain) & (np.isfinite(bps) | ~ok)
    overflow = covered & ~finite
    if overflow.any():
        for values in (ll_gain, bps, pseudo_r2, corr, null_deviance, model_deviance):
            values[overflow] = np.nan
    codes = np.where(overflow, 3, np.where(ok, 0, np.where(covered, 1, 2)).astype(np.int8))
    return CellScores(ll_gain, bps, STATUS_OF_CODE[codes], pseudo_r2, corr, null_deviance, model_deviance)


def _deviance_scores(
    stats: CellStats, ok: np.ndarray, covered: np.ndarray, spikes: np.ndarray, log_rate: np.ndarray, ll_gain: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """pseudo_r2, corr, D_null and D_model of `cell_scores` (before overflow is marked)."""
    varied_counts = ok & (stats.count_min < stats.count_max)
    varied_rates = stats.rate_min < stats.rate_max
    null_deviance = np.where(varied_counts, 2.0 * (stats.spike_log_spikes - spikes * log_rate), 0.0)
    null_deviance = np.where(covered, null_deviance, np.nan)
    model_deviance = np.where(covered, 2.0 * (stats.spike_log_spikes - stats.model_ll - stats.spikes), np.nan)
    explained = varied_counts & (null_deviance > 0)
    pseudo_r2 = np.where(explained, 2.0 * ll_gain / np.where(explained, null_deviance, 1.0), np.nan)
    correlated = varied_counts & varied_rates & (stats.rate_m2 > 0) & (stats.count_m2 > 0)
    corr = np.where(
        correlated, stats.co_m2 / np.sqrt(np.where(correlated, stats.rate_m2 * stats.count_m2, 1.0)), np.nan
    )
    return pseudo_r2, np.clip(corr, -1.0, 1.0), null_deviance, model_deviance


def status_counts(status: np.ndarray) -> dict[str, int]:
    """How many cells have each status, every status present as a key."""
    return {name: int((status == name).sum()) for name in STATUSES}
