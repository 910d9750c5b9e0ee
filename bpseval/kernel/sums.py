"""The sums contract: per-cell statistics that some data could have produced, or an error naming the first that none could.

Every path that takes `CellStats` it did not compute itself goes through `checked_sums`: stats-only
shards, merge-cache entries and `DistributedBPS` states. A sum no data gives (a negative n_valid,
spikes without weight, a correlation moment above its bound, ...) would otherwise be scored as a
number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from bpseval.errors import BpsevalError
from bpseval.kernel.cellstats import (
    ADDITIVE_FIELDS,
    GREATEST_FIELDS,
    LEAST_FIELDS,
    MOMENT_FIELDS,
    STAT_FIELDS,
    CellStats,
)
from bpseval.kernel.stats import reduce_rows

SUM_RTOL = 1e-9
"""Relative difference between float64 sums of the same values added in different orders that counts as rounding."""
LEGACY_STAT_FIELDS = STAT_FIELDS[:4]
"""What stats-only shards held before pseudo_r2 and corr: read, with those metrics undefined (NaN sums)."""


class ImpossibleSumsError(BpsevalError):
    """Statistics that no data could produce; the message names the field, the problem and the first cell (and block).

    Callers add where the sums came from (a file, a cache entry, a saved state) and what to do.
    """


def checked_sums(values: Mapping[str, Any], samples: int, prefix: str = "") -> CellStats:
    """The sums `values[prefix + field]` as CellStats, refused unless some data could have produced them.

    Per cell (and per block row): every sum finite; n_valid a whole number in [0, samples]; weight,
    spikes, rate_sum and the second moments >= 0; weight <= n_valid (each weight is at most 1); no
    sum without a valid sample; no spikes without weight; |co_m2| at most √(rate_m2·count_m2); the
    least value at most the greatest, both >= 0, for a covered cell, and +inf / -inf for the others.
    Fields a legacy set of four lacks are NaN.

    Args:
        values: arrays by name, each (cells,) or (blocks, cells); every field of `STAT_FIELDS`, or the first four.
        samples: the most rows the sums can cover (an n_valid above it is impossible).
        prefix: prepended to each field name, in the lookup and in the message.

    Returns:
        The statistics, n_valid as int64 and the rest float64.

    Raises:
        ImpossibleSumsError: naming the first field, problem and cell that no data could give.
    """
    with np.errstate(all="ignore"):  # sums that overflowed (inf, NaN) are refused, without numpy's warnings
        return _checked_sums(values, samples, prefix)


def _checked_sums(values: Mapping[str, Any], samples: int, prefix: str) -> CellStats:
    fields = STAT_FIELDS if prefix + STAT_FIELDS[-1] in values else LEGACY_STAT_FIELDS
    missing = [prefix + key for key in fields if prefix + key not in values]
    if missing:
        raise ImpossibleSumsError(f"{', '.join(missing)} missing; the statistics hold every one of {', '.join(fields)}")
    sums = {key: np.asarray(values[prefix + key], dtype=np.float64) for key in fields}
    shape = sums["n_valid"].shape
    for key, array in sums.items():
        if array.shape != shape:
            raise ImpossibleSumsError(f"{prefix}{key} has shape {array.shape}, {prefix}n_valid {shape}")
    for key in STAT_FIELDS[len(fields) :]:
        sums[key] = np.full(shape, np.nan)
    name = {key: prefix + key for key in STAT_FIELDS}
    n_valid, weight, spikes = sums["n_valid"], sums["weight"], sums["spikes"]
    covered, empty = n_valid > 0, n_valid == 0
    slack = SUM_RTOL * n_valid
    checks = [
        *(
            (name[key], "is NaN or infinite", ~np.isfinite(sums[key]))
            for key in fields
            if key in ADDITIVE_FIELDS + MOMENT_FIELDS
        ),
        (name["n_valid"], "is negative or not a whole number", (n_valid < 0) | (n_valid != np.floor(n_valid))),
        (name["n_valid"], f"exceeds the {samples} samples the sums cover", n_valid > samples),
        (name["weight"], "is negative", weight < 0),
        (name["spikes"], "is negative", spikes < 0),
        (name["weight"], "exceeds n_valid (every weight is at most 1)", weight > n_valid + slack),
        (name["weight"], "is 0 while n_valid > 0 (n_valid counts the positive weights)", covered & (weight <= 0)),
        (name["spikes"], "is positive while weight is 0", (spikes > 0) & (weight == 0)),
        *((name[key], "is not 0 while n_valid is 0", (sums[key] != 0) & empty) for key in fields[3:9]),
    ]
    if fields == STAT_FIELDS:
        rate_m2, count_m2 = sums["rate_m2"], sums["count_m2"]
        bound = np.sqrt(np.maximum(rate_m2, 0) * np.maximum(count_m2, 0))
        rounding = moment_rounding(sums)
        checks += [
            (name["rate_sum"], "is negative", sums["rate_sum"] < 0),
            *((name[key], "is negative", sums[key] < 0) for key in ("rate_m2", "count_m2")),
            (
                name["co_m2"],
                "exceeds √(rate_m2·count_m2) in size",
                np.abs(sums["co_m2"]) > bound + SUM_RTOL * (bound + rounding["co_m2"]) + SUM_RTOL,
            ),
            *(
                (name[key], "is NaN or infinite while n_valid > 0", covered & ~np.isfinite(sums[key]))
                for key in LEAST_FIELDS + GREATEST_FIELDS
            ),
            *(
                (
                    name[low],
                    f"is negative or above {high} while n_valid > 0",
                    covered & ((sums[low] < 0) | (sums[low] > sums[high])),
                )
                for low, high in (("rate_min", "rate_max"), ("count_min", "count_max"))
            ),
            *(
                (name[key], f"is not {bound_text} while n_valid is 0", empty & (sums[key] != value))
                for key, value, bound_text in (
                    ("rate_min", np.inf, "+inf"),
                    ("count_min", np.inf, "+inf"),
                    ("rate_max", -np.inf, "-inf"),
                    ("count_max", -np.inf, "-inf"),
                )
            ),
        ]
    with np.errstate(invalid="ignore"):
        for field, problem, bad in checks:
            if bad.any():
                _refuse(field, problem, bad)
    return CellStats(n_valid=n_valid.astype(np.int64), **{key: sums[key] for key in STAT_FIELDS[1:]})


def moment_rounding(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The size that rounding errors of each centred moment scale with (the checks allow SUM_RTOL of it).

    A mean in float64 is off by about eps·|mean|; a centred sum multiplies that by the spread of its
    other side (Σ w·|y − ȳ| ≤ √(weight·count_m2)). Data far from 0 with a small spread (rates near 1e9
    varying by 0.1) thus carry errors far above eps times the moment itself, and merging the same
    samples in another order gives another rounding. Undefined (NaN) for a legacy set, which has no moments.
    """
    weight = sums["weight"]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_mean = np.abs(np.where(weight > 0, sums["rate_sum"] / np.where(weight > 0, weight, 1.0), 0.0))
        count_mean = np.abs(np.where(weight > 0, sums["spikes"] / np.where(weight > 0, weight, 1.0), 0.0))
        rate_spread = np.sqrt(np.maximum(weight * sums["rate_m2"], 0.0))
        count_spread = np.sqrt(np.maximum(weight * sums["count_m2"], 0.0))
    return {
        "rate_m2": 2 * rate_mean * rate_spread,
        "count_m2": 2 * count_mean * count_spread,
        "co_m2": rate_mean * count_spread + count_mean * rate_spread,
    }


def check_parts_add_up(total: CellStats, parts: CellStats, prefix: str = "blocks/") -> None:
    """The (parts, cells) statistics merged must give `total`: n_valid and the extremes exactly, other sums to rounding.

    Raises:
        ImpossibleSumsError: naming `prefix + field`, how far off it is and the first cell.
    """
    with np.errstate(all="ignore"):
        _check_parts_add_up(total, parts, prefix)


def _check_parts_add_up(total: CellStats, parts: CellStats, prefix: str) -> None:
    merged = reduce_rows(parts)
    rounding = moment_rounding(total.fields())
    for key in STAT_FIELDS:
        per_part, whole, together = getattr(parts, key), getattr(total, key), getattr(merged, key)
        if np.isnan(whole).all():  # a legacy set: not stored
            continue
        with np.errstate(invalid="ignore"):
            difference = np.where(together == whole, 0.0, np.abs(together - whole))
            scale = np.abs(np.where(np.isfinite(per_part), per_part, 0)).sum(axis=0) + np.abs(
                np.where(np.isfinite(whole), whole, 0)
            )
        scale = scale + rounding.get(key, 0.0)
        exact = key == "n_valid" or key in LEAST_FIELDS + GREATEST_FIELDS
        bad = difference != 0 if exact else difference > SUM_RTOL * scale + SUM_RTOL
        if bad.any():
            _refuse(f"{prefix}{key}", f"does not add up to {key} (off by {difference[bad][0]:.6g})", bad)


def _refuse(field: str, problem: str, bad: np.ndarray) -> NoReturn:
    position = np.argwhere(bad)[0]
    cell = f"cell {position[-1]}" + (f" of block {position[0]}" if bad.ndim == 2 else "")
    count = int(bad.sum())
    raise ImpossibleSumsError(
        f"{field} {problem} at {cell} ({count} entr{'ies' if count != 1 else 'y'}); no data gives such sums"
    )
