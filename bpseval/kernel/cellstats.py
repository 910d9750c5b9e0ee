"""`CellStats`: the per-cell sufficient statistics every metric is scored from, and their exact merge.

The lowest piece of the kernel: `stats.py` reduces batches to `CellStats` (with the compiled pass of
`compiled.py` when it takes the batch), and both import this module, never each other's in a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from bpseval.errors import BpsevalError

ADDITIVE_FIELDS = ("n_valid", "weight", "spikes", "model_ll", "spike_log_spikes", "rate_sum")
MOMENT_FIELDS = ("rate_m2", "count_m2", "co_m2")
LEAST_FIELDS = ("rate_min", "count_min")
GREATEST_FIELDS = ("rate_max", "count_max")
STAT_FIELDS = (*ADDITIVE_FIELDS, *MOMENT_FIELDS, *LEAST_FIELDS, *GREATEST_FIELDS)
"""Every field of `CellStats`, in order: added, merged as centred moments, merged by min, by max."""


@dataclass
class CellStats:
    """Sufficient statistics of every metric, one entry per cell (or per block and cell), mergeable exactly.

    `+` merges two of them as if one process had seen both sets of samples: sums add, centred
    moments combine by Chan's update, extremes by min and max. Fields are numpy arrays, or arrays
    of one other array-API namespace (torch tensors in the online metric).
    """

    n_valid: Any
    weight: Any
    spikes: Any
    model_ll: Any
    spike_log_spikes: Any
    rate_sum: Any
    rate_m2: Any
    count_m2: Any
    co_m2: Any
    rate_min: Any
    count_min: Any
    rate_max: Any
    count_max: Any

    @classmethod
    def zeros(cls, shape: int | tuple[int, ...]) -> CellStats:
        """Statistics of no sample at all, for `shape` = cells or (blocks, cells)."""
        return cls(
            n_valid=np.zeros(shape, dtype=np.int64),
            **{name: np.zeros(shape) for name in STAT_FIELDS[1:] if name not in LEAST_FIELDS + GREATEST_FIELDS},
            **{name: np.full(shape, math.inf) for name in LEAST_FIELDS},
            **{name: np.full(shape, -math.inf) for name in GREATEST_FIELDS},
        )

    @property
    def n_cells(self) -> int:
        return self.n_valid.shape[-1]

    def fields(self) -> dict[str, Any]:
        """Every field by name, in `STAT_FIELDS` order."""
        return {name: getattr(self, name) for name in STAT_FIELDS}

    def map(self, function: Callable[[Any], Any]) -> CellStats:
        """`function` applied to every field (indexing, copying, moving between devices)."""
        return CellStats(**{name: function(values) for name, values in self.fields().items()})

    def __add__(self, other: CellStats) -> CellStats:
        if other.n_valid.shape != self.n_valid.shape:
            raise BpsevalError(f"cannot add statistics of shape {other.n_valid.shape} to shape {self.n_valid.shape}")
        return combine(self, other)


def mean_or_zero(xp: Any, total: Any, weight: Any) -> Any:
    """total / weight, 0 where the weight is 0."""
    has = weight > 0
    return xp.where(has, total / xp.where(has, weight, 1.0), 0.0)


def combine(a: CellStats, b: CellStats) -> CellStats:
    """The statistics of the samples of `a` and of `b` together, entry by entry (Chan et al. 1979)."""
    with np.errstate(over="ignore", invalid="ignore"):  # sums that overflow make the cell `overflow` in cell_scores
        return _combine(a, b)


def _combine(a: CellStats, b: CellStats) -> CellStats:
    xp = array_namespace(a.weight, b.weight)
    weight = a.weight + b.weight
    both = (a.weight > 0) & (b.weight > 0)
    share = xp.where(both, a.weight * b.weight / xp.where(both, weight, 1.0), 0.0)
    rate_step = mean_or_zero(xp, b.rate_sum, b.weight) - mean_or_zero(xp, a.rate_sum, a.weight)
    count_step = mean_or_zero(xp, b.spikes, b.weight) - mean_or_zero(xp, a.spikes, a.weight)
    return CellStats(
        n_valid=a.n_valid + b.n_valid,
        weight=weight,
        spikes=a.spikes + b.spikes,
        model_ll=a.model_ll + b.model_ll,
        spike_log_spikes=a.spike_log_spikes + b.spike_log_spikes,
        rate_sum=a.rate_sum + b.rate_sum,
        rate_m2=a.rate_m2 + b.rate_m2 + share * rate_step * rate_step,
        count_m2=a.count_m2 + b.count_m2 + share * count_step * count_step,
        co_m2=a.co_m2 + b.co_m2 + share * rate_step * count_step,
        rate_min=xp.minimum(a.rate_min, b.rate_min),
        count_min=xp.minimum(a.count_min, b.count_min),
        rate_max=xp.maximum(a.rate_max, b.rate_max),
        count_max=xp.maximum(a.count_max, b.count_max),
    )
