"""Bits per spike from additive per-cell sufficient statistics: pure numpy, no I/O.

Every entry point (the offline merge of shards, the in-memory `bits_per_spike` and the online
DDP metric) reduces its data to a `CellStats` with `batch_stats`, adds them up, and scores the
sum with `cell_scores`. Sums are float64 whatever the input precision.

For cell c, weight w = dfs (entries with w = 0 are ignored, NaN or not) and rate
λ = max(rhat, MIN_RATE) (or exp(rhat) for log-rates):

    n_valid = #{w > 0}      weight = Σ w      spikes = Σ w·robs      model_ll = Σ w·(robs·ln λ − λ)
    ll_gain = model_ll − (spikes·ln(spikes/weight) − spikes)         bps = ll_gain / (spikes·ln 2)

The log(robs!) term is the same for the model and the null model and cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_numpy_namespace

from bpseval._arrays import to_numpy
from bpseval.errors import BpsevalError

LN2 = math.log(2.0)
MIN_RATE = 1e-9
RATE_KINDS = ("rate", "log_rate")
STAT_FIELDS = ("n_valid", "weight", "spikes", "model_ll")
OK, SILENT, UNCOVERED, OVERFLOW, LOW = "ok", "silent", "uncovered", "overflow", "low"
STATUSES = (OK, SILENT, UNCOVERED, OVERFLOW, LOW)
"""`overflow`: a covered cell whose float64 sums, ll_gain or bps are not finite (extreme but finite inputs,
e.g. spike counts near 1e308, log-rates near 700 over many samples, subnormal spike counts). Its bps is
undefined, and so are the bps and bps_pooled of its dataset and of the whole run: no number is reported
that silently leaves it out.

`low`: a cell that would be `ok` but has fewer valid samples than the scoring setting `min_samples`
(never set by `cell_scores`). Its bps is kept, but left out of the means; it stays in bps_pooled, which
pools every covered cell."""


@dataclass
class CellStats:
    """Additive sufficient statistics of the Poisson log-likelihood, one entry per cell."""

    n_valid: np.ndarray
    weight: np.ndarray
    spikes: np.ndarray
    model_ll: np.ndarray

    @classmethod
    def zeros(cls, shape: int | tuple[int, ...]) -> CellStats:
        """Statistics of no sample at all, for `shape` = cells or (blocks, cells)."""
        return cls(
            n_valid=np.zeros(shape, dtype=np.int64),
            weight=np.zeros(shape),
            spikes=np.zeros(shape),
            model_ll=np.zeros(shape),
        )

    @property
    def n_cells(self) -> int:
        return self.n_valid.shape[-1]

    def __add__(self, other: CellStats) -> CellStats:
        if other.n_valid.shape != self.n_valid.shape:
            raise BpsevalError(f"cannot add statistics of shape {other.n_valid.shape} to shape {self.n_valid.shape}")
        return CellStats(
            n_valid=self.n_valid + other.n_valid,
            weight=self.weight + other.weight,
            spikes=self.spikes + other.spikes,
            model_ll=self.model_ll + other.model_ll,
        )


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
    if weights is not None and weights.dtype == xp.bool:
        weights = xp.astype(weights, xp.float32)
    if not is_numpy_namespace(xp):
        screened = screen_values(rhat, robs, weights, rate_kind)
        if bool(xp.any(screened.problems)):
            raise InvalidValuesError(find_invalid_values(to_numpy(rhat), to_numpy(robs), to_numpy(weights), rate_kind))
        return _sums(xp, screened.rhat, screened.robs, screened.weights, rate_kind)
    if not _weights_are_valid(xp, weights):
        raise InvalidValuesError(find_invalid_values(to_numpy(rhat), to_numpy(robs), to_numpy(weights), rate_kind))
    if not _values_are_valid(xp, rhat, robs, rate_kind):
        rhat, robs = _neutralize_masked_entries(xp, rhat, robs, weights, rate_kind)
    return _sums(xp, rhat, robs, weights, rate_kind)


def unchecked_batch_stats(rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate") -> CellStats:
    """The four float64 sums of a (rows, cells) batch whose values are usable, or were screened by `screen_values`.

    No validation and, for namespaces other than numpy, no host synchronisation. `weights` is
    None or a float (rows, cells) / (rows, 1) array.
    """
    return _sums(array_namespace(rhat, robs, *(() if weights is None else (weights,))), rhat, robs, weights, rate_kind)


def _sums(xp: Any, rhat: Any, robs: Any, weights: Any, rate_kind: str) -> CellStats:
    """n_valid, Σw, Σw·robs and Σw·(robs·ln λ − λ) per cell; off numpy, rates are clamped without asking the device."""
    n_rows, n_cells = rhat.shape
    if weights is not None:
        weights = xp.broadcast_to(weights, rhat.shape)
    if not is_numpy_namespace(xp):  # one float64 copy of each, shared by the sums
        robs = xp.astype(robs, xp.float64, copy=False)
        weights = None if weights is None else xp.astype(weights, xp.float64, copy=False)
    n_valid, weight = _valid_counts(xp, weights, rhat.shape, device(rhat))
    if rate_kind == "log_rate":
        rates = xp.astype(rhat, xp.float64)
        spikes = _weighted_column_sums(xp, robs, weights)
        model_ll = _weighted_column_sums(xp, xp.astype(robs, xp.float64, copy=False) * rates - xp.exp(rates), weights)
    else:
        rates = rhat  # λ = max(rhat, MIN_RATE): with numpy only copied when some rate is below MIN_RATE
        if not is_numpy_namespace(xp) or (n_rows and n_cells and float(xp.min(rhat)) < MIN_RATE):
            rates = xp.maximum(xp.astype(rhat, xp.float64), xp.asarray(MIN_RATE, dtype=xp.float64, device=device(rhat)))
        spikes, spike_log_rates = _spike_sums(xp, rates, robs, weights)
        model_ll = spike_log_rates - _weighted_column_sums(xp, rates, weights)
    return CellStats(n_valid=n_valid, weight=weight, spikes=spikes, model_ll=model_ll)


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


def _spike_sums(xp: Any, rates: Any, robs: Any, weights: Any) -> tuple[Any, Any]:
    """Σ_rows w·robs and Σ_rows w·robs·ln(rates) per cell, in float64.

    With numpy both are sums over the entries where robs > 0 only (a minority of the entries of
    binned spike counts), gathered once and added up per cell by `bincount`: the logarithm, the
    costliest step, is taken there only. Other namespaces compute them densely on their device.
    """
    if not is_numpy_namespace(xp):
        terms = xp.astype(robs, xp.float64, copy=False) * xp.log(xp.astype(rates, xp.float64, copy=False))
        return _weighted_column_sums(xp, robs, weights), _weighted_column_sums(xp, terms, weights)
    n_cells = rates.shape[1]
    where = np.flatnonzero(robs > 0)
    cells = where % n_cells
    spikes = np.ravel(robs)[where].astype(np.float64)
    if weights is not None:
        spikes *= np.ravel(weights)[where]
    terms = np.log(np.ravel(rates)[where], dtype=np.float64)
    terms *= spikes
    return np.bincount(cells, weights=spikes, minlength=n_cells), np.bincount(cells, weights=terms, minlength=n_cells)


def pad_blocks(per_block: CellStats, n_blocks: int) -> CellStats:
    """(blocks, cells) statistics with empty blocks appended up to `n_blocks` (never shortened)."""
    have = per_block.n_valid.shape[0]
    if n_blocks <= have:
        return per_block
    grown = CellStats.zeros((n_blocks, per_block.n_cells))
    for name in STAT_FIELDS:
        getattr(grown, name)[:have] = getattr(per_block, name)
    return grown


@dataclass(frozen=True)
class Blocks:
    """Statistics of the blocks that hold samples only: their ids (sorted, distinct) and (len(ids), cells) sums."""

    ids: np.ndarray
    stats: CellStats

    def total(self) -> CellStats:
        """The sum over the blocks."""
        return CellStats(*(getattr(self.stats, name).sum(axis=0) for name in STAT_FIELDS))


def block_stats(block_ids: np.ndarray, rhat: Any, robs: Any, weights: Any = None, rate_kind: str = "rate") -> Blocks:
    """The statistics of a numpy batch per block: one row per distinct value of `block_ids` (one per sample)."""
    ids = np.unique(block_ids)
    per_block = CellStats.zeros((len(ids), rhat.shape[1]))
    for row, block in enumerate(ids):
        rows = block_ids == block
        stats = batch_stats(rhat[rows], robs[rows], None if weights is None else weights[rows], rate_kind)
        for name in STAT_FIELDS:
            getattr(per_block, name)[row] = getattr(stats, name)
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
    for name in STAT_FIELDS:
        getattr(per_block, name)[blocks.ids] += getattr(blocks.stats, name)
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
        for name in STAT_FIELDS:
            getattr(self._sums, name)[rows] += getattr(blocks.stats, name)

    def sorted(self) -> Blocks:
        """Every block added, in increasing id order."""
        ids = np.fromiter(self._rows, dtype=np.int64, count=len(self._rows))
        order = np.argsort(ids, kind="stable")
        return Blocks(ids[order], CellStats(*(getattr(self._sums, name)[order] for name in STAT_FIELDS)))


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


def cell_scores(stats: CellStats) -> CellScores:
    """ll_gain, bits per spike and status (ok / silent / uncovered / overflow) of every cell.

    The sums can overflow only after many finite batches were added, so finiteness is checked
    here, on the final sums: a covered cell whose sums, ll_gain or bps are not finite is `overflow`
    (ll_gain and bps NaN), never an `ok` cell without a number.
    """
    covered = stats.n_valid > 0
    ok = covered & (stats.spikes > 0)
    spikes = np.where(ok, stats.spikes, 1.0)
    weight = np.where(ok, stats.weight, 1.0)
    with np.errstate(all="ignore"):
        null_ll = np.where(ok, spikes * np.log(spikes / weight) - spikes, 0.0)
        ll_gain = np.where(covered, stats.model_ll - null_ll, np.nan)
        bps = np.where(ok, ll_gain / (spikes * LN2), np.nan)
    finite = np.isfinite(stats.weight) & np.isfinite(stats.spikes) & np.isfinite(ll_gain) & (np.isfinite(bps) | ~ok)
    overflow = covered & ~finite
    ll_gain[overflow], bps[overflow] = np.nan, np.nan
    status = np.where(overflow, OVERFLOW, np.where(ok, OK, np.where(covered, SILENT, UNCOVERED)))
    return CellScores(ll_gain=ll_gain, bps=bps, status=status)


def mean_bps(bps: np.ndarray, status: np.ndarray, clamp_negative: bool = False) -> float:
    """Mean bits per spike over the `ok` cells (NaN when there is none, or when a cell overflowed).

    `clamp_negative` reproduces legacy training loops, which clamped each cell at 0 first.
    """
    if (status == OVERFLOW).any():
        return math.nan
    values = bps[status == OK]
    if clamp_negative:
        values = np.maximum(values, 0.0)
    return float(values.mean()) if len(values) else math.nan


def pooled_bps(ll_gain: np.ndarray, spikes: np.ndarray, status: np.ndarray) -> float:
    """Σ ll_gain / (ln 2 · Σ spikes) over covered cells, silent ones included (Neural Latents Benchmark).

    NaN when a cell overflowed or the pooled sums themselves are not finite."""
    if (status == OVERFLOW).any():
        return math.nan
    covered = status != UNCOVERED
    total_spikes = float(spikes[covered].sum())
    if not 0 < total_spikes < math.inf:
        return math.nan
    with np.errstate(all="ignore"):
        pooled = float(ll_gain[covered].sum()) / (LN2 * total_spikes)
    return pooled if math.isfinite(pooled) else math.nan


def status_counts(status: np.ndarray) -> dict[str, int]:
    """How many cells have each status, every status present as a key."""
    return {name: int((status == name).sum()) for name in STATUSES}
