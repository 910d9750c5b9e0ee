"""What bpseval is measured against: plain h5py reads (the I/O floor), one naive numpy pass (the
numpy floor), bpseval's own kernel alone, and the legacy per-rank per-cell loop it replaces."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from benchmarks.data import BATCH_ROWS, SEED, DatasetSpec, load_dataset, synthetic_dataset
from benchmarks.processes import run_child
from benchmarks.timing import Timing, timed
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.compiled import ENVIRONMENT_VARIABLE
from bpseval.kernel.stats import BLOCK_ENTRIES, LN2, MIN_RATE, batch_stats
from bpseval.run.merge import CHUNK_ELEMENTS
from bpseval.shard.format import DATASETS_GROUP

RELATIVE_TOLERANCE = 1e-9
"""How far bpseval's sums may be from the numpy floor's before the benchmark stops."""


def read_shards(paths: list[Path], chunked: bool) -> int:
    """Read every array of every shard with plain h5py; returns the bytes read.

    `chunked` reads rows in blocks of bpseval's merge (CHUNK_ELEMENTS entries); otherwise each
    array is read whole.
    """
    total = 0
    for path in paths:
        with h5py.File(path, "r") as handle:
            for group in handle[DATASETS_GROUP].values():
                n_cells = group["rhat"].shape[1]
                step = max(1, CHUNK_ELEMENTS // n_cells) if chunked else None
                for array in group.values():
                    for start in range(0, array.shape[0], step or max(1, array.shape[0])):
                        total += array[start : start + step if step else None].nbytes
    return total


def numpy_floor(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> CellStats:
    """The numpy floor: the most direct numpy code for every per-cell sum of `CellStats`, independent of bpseval's.

    λ = max(rhat, MIN_RATE), in float64, over the same row blocks as `batch_stats` (BLOCK_ENTRIES
    entries), in two passes: the sums and extremes, then the second moments around the whole data's
    means. No validation: it relies on every value being finite (true of the synthetic data), so
    entries with w = 0 add 0 without masking.
    """
    rows = max(1, BLOCK_ENTRIES // max(1, rhat.shape[1]))
    n_cells = rhat.shape[1]

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, len(rhat), rows):
            block = slice(start, start + rows)
            w = dfs[block].astype(np.float64)
            yield w, robs[block].astype(np.float64), np.maximum(rhat[block].astype(np.float64), MIN_RATE)

    sums = {name: np.zeros(n_cells) for name in STAT_FIELDS[1:9]}
    n_valid = np.zeros(n_cells, dtype=np.int64)
    extremes = {name: np.full(n_cells, np.inf) for name in ("rate_min", "count_min")}
    extremes.update({name: np.full(n_cells, -np.inf) for name in ("rate_max", "count_max")})
    for w, counts, rates in blocks():
        valid = w > 0
        n_valid += np.count_nonzero(valid, axis=0)
        sums["weight"] += w.sum(axis=0)
        sums["spikes"] += (w * counts).sum(axis=0)
        sums["model_ll"] += (w * (counts * np.log(rates) - rates)).sum(axis=0)
        positive = np.where(counts > 0, counts, 1.0)
        sums["spike_log_spikes"] += (w * np.where(counts > 0, counts * np.log(positive), 0.0)).sum(axis=0)
        sums["rate_sum"] += (w * rates).sum(axis=0)
        for values, kind in ((rates, "rate"), (counts, "count")):
            extremes[f"{kind}_min"] = np.minimum(extremes[f"{kind}_min"], np.where(valid, values, np.inf).min(axis=0))
            extremes[f"{kind}_max"] = np.maximum(extremes[f"{kind}_max"], np.where(valid, values, -np.inf).max(axis=0))
    has_weight = sums["weight"] > 0
    rate_mean = np.where(has_weight, sums["rate_sum"] / np.where(has_weight, sums["weight"], 1.0), 0.0)
    count_mean = np.where(has_weight, sums["spikes"] / np.where(has_weight, sums["weight"], 1.0), 0.0)
    for w, counts, rates in blocks():
        rate_step, count_step = rates - rate_mean, counts - count_mean
        sums["rate_m2"] += (w * rate_step * rate_step).sum(axis=0)
        sums["count_m2"] += (w * count_step * count_step).sum(axis=0)
        sums["co_m2"] += (w * rate_step * count_step).sum(axis=0)
    return CellStats(n_valid=n_valid, **sums, **extremes)


COMPILED = importlib.util.find_spec("numba") is not None
"""Whether the extra bpseval[fast] is installed: then `kernel` is the compiled kernel, and the numpy reference
is measured beside it as `kernel (numpy)`, and `bpseval compute` as `bpseval (numpy kernel)`."""


@contextlib.contextmanager
def environment_setting(variable: str, value: str | None) -> Iterator[None]:
    """`variable`=value in this process (and the children it starts) for the block; unchanged when value is None."""
    if value is None:
        yield
        return
    before = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def kernel_setting(name: str | None) -> contextlib.AbstractContextManager[None]:
    """BPSEVAL_KERNEL=name for the block; unchanged when None."""
    return environment_setting(ENVIRONMENT_VARIABLE, name)


def numpy_kernel(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> CellStats:
    """`batch_stats` with the numpy reference (BPSEVAL_KERNEL=numpy)."""
    with kernel_setting("numpy"):
        return batch_stats(rhat, robs, dfs)


def compiled_kernel(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> CellStats:
    """`batch_stats` with the compiled kernel whatever the size of the batch (BPSEVAL_KERNEL=compiled)."""
    with kernel_setting("compiled"):
        return batch_stats(rhat, robs, dfs)


KERNELS: dict[str, tuple[Callable[[np.ndarray, np.ndarray, np.ndarray], CellStats], str]] = {
    "kernel": (
        compiled_kernel if COMPILED else batch_stats,
        f"bpseval.kernel.stats.batch_stats ({'compiled' if COMPILED else 'numpy'}), in memory",
    ),
    **({"kernel (numpy)": (numpy_kernel, "batch_stats, numpy reference, in memory")} if COMPILED else {}),
    "numpy floor": (numpy_floor, f"one naive numpy pass per block of {BLOCK_ENTRIES} entries"),
}
"""The compute-only measurements: bpseval's kernel(s) and the naive pass they are compared with."""


def relative_difference(label: str, got: CellStats | dict[str, np.ndarray], expected: CellStats) -> float:
    """The worst relative difference of `got`'s sums from `expected`'s (those `got` holds, when a dict of them);
    SystemExit when n_valid or an extreme differs, or a sum is off by more than RELATIVE_TOLERANCE.

    The co-moment is compared relative to √(rate_m2 · count_m2), its largest possible size: it may be near 0.
    """
    sums = got.fields() if isinstance(got, CellStats) else got
    for key in ("n_valid", "rate_min", "count_min", "rate_max", "count_max"):
        if key in sums and not np.array_equal(sums[key], getattr(expected, key)):
            raise SystemExit(f"{label}: {key} differs from the numpy floor's")
    worst = 0.0
    for key in [key for key in STAT_FIELDS[1:9] if key in sums]:
        want = getattr(expected, key)
        scale = np.sqrt(expected.rate_m2 * expected.count_m2) if key == "co_m2" else np.abs(want)
        worst = max(worst, float(np.max(np.abs(sums[key] - want) / np.maximum(scale, 1e-300), initial=0.0)))
    if worst > RELATIVE_TOLERANCE:
        raise SystemExit(f"{label}: statistics differ from the numpy floor's by {worst:.2e} relative")
    return worst


def time_kernels(paths: list[Path], names: list[str], repeat: int) -> tuple[list[Timing], dict[str, CellStats]]:
    """Time every KERNELS entry over every dataset, one dataset in memory at a time (compute only).

    Repetition i of a kernel is the sum over datasets of its i-th run; the kernels alternate.
    Returns the timings and each dataset's statistics from the numpy floor, which bpseval's
    kernel must match.
    """
    warm_up = synthetic_dataset(8, BATCH_ROWS, SEED)
    for function, _ in KERNELS.values():  # untimed: the first call pays for lazy imports
        function(*warm_up)
    timings = {label: Timing(label, [0.0] * repeat, note) for label, (_, note) in KERNELS.items()}
    reference: dict[str, CellStats] = {}
    for name in names:
        rhat, robs, dfs, _ = load_dataset(paths, name)
        results: dict[str, CellStats] = {}
        for index in range(repeat):
            for label, (function, _) in KERNELS.items():
                elapsed, results[label] = timed(function, rhat, robs, dfs)
                timings[label].times[index] += elapsed
        for label in (label for label in KERNELS if label != "numpy floor"):
            relative_difference(f"{label} on {name}", results[label], results["numpy floor"])
        reference[name] = results["numpy floor"]
    return list(timings.values()), reference


def legacy_cell_bps(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> np.ndarray:
    """Per-cell bps the way legacy training loops computed it on one rank's arrays.

    Each cell is boolean-masked on its own and scored against its own null (mean-rate) model;
    a cell without valid samples gets 0.0 (after the crash was patched), the spike count is
    floored at an epsilon, and negative values are clamped to 0.
    """
    values = np.zeros(rhat.shape[1])
    for cell in range(rhat.shape[1]):
        valid = dfs[:, cell] > 0
        counts = robs[valid, cell].astype(np.float64)
        if counts.size == 0:
            continue
        rates = np.maximum(rhat[valid, cell].astype(np.float64), MIN_RATE)
        null_rate = max(counts.mean(), MIN_RATE)
        model_ll = np.sum(counts * np.log(rates) - rates)
        null_ll = np.sum(counts * np.log(null_rate) - null_rate)
        values[cell] = max((model_ll - null_ll) / (max(counts.sum(), MIN_RATE) * LN2), 0.0)
    return values


def legacy_run(paths: list[Path], names: list[str]) -> float:
    """Legacy overall bps of `names`: per rank load whole arrays, loop over cells, average per
    rank, then over ranks, then over datasets."""
    per_rank: dict[str, list[float]] = {name: [] for name in names}
    for path in paths:
        with h5py.File(path, "r") as handle:
            for name in names:
                group = handle[DATASETS_GROUP][name]
                rhat, robs, dfs = (group[key][()] for key in ("rhat", "robs", "dfs"))
                per_rank[name].append(float(legacy_cell_bps(rhat, robs, dfs).mean()))
    return float(np.mean([np.mean(values) for values in per_rank.values()]))


def legacy_subset(specs: list[DatasetSpec], count: int | None) -> tuple[list[str], float]:
    """`count` datasets spread over the size range (all when None) and the factor that scales
    their time to all datasets (total entries / subset entries)."""
    if count is None or count >= len(specs):
        return [spec.name for spec in specs], 1.0
    chosen = [specs[int(i)] for i in np.unique(np.linspace(0, len(specs) - 1, count).round())]
    entries = sum(spec.cells * spec.samples for spec in specs)
    return [spec.name for spec in chosen], entries / sum(spec.cells * spec.samples for spec in chosen)


STARTUP_PROBE = """
import numpy as np
from bpseval.kernel.stats import batch_stats
rates = np.full((1000, 50), 0.1, dtype=np.float32)
batch_stats(rates, rates, rates)
"""
"""A fresh process's first `batch_stats` of a float32 batch with weights: imports, and compiling or loading."""


def kernel_startup(repeat: int) -> dict[str, Timing]:
    """Wall time and peak RSS of STARTUP_PROBE in fresh processes: the numpy reference, and the compiled kernel
    with an empty on-disk cache (it compiles: once per installation) and with the cache it left (every later
    command). Empty when numba is not installed."""
    if not COMPILED:
        return {}
    labels = ("numpy kernel", "compiled, cold cache", "compiled, warm cache")
    timings = {
        label: Timing(label, [], "python -c 'batch_stats(1000 x 50 float32)' in a fresh process") for label in labels
    }
    rss: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache:
            for label in labels:
                with (
                    kernel_setting("numpy" if label == "numpy kernel" else "compiled"),
                    environment_setting("NUMBA_CACHE_DIR", cache),
                ):
                    child = run_child([sys.executable, "-c", STARTUP_PROBE])
                if child.returncode != 0:
                    raise SystemExit(f"start-up probe ({label}) failed:\n{child.stderr}")
                timings[label].times.append(child.seconds)
                rss[label].append(child.max_rss_mb)
    for label, values in rss.items():
        timings[label].note += f"; peak RSS {max(values):.0f} MB"
    return timings
