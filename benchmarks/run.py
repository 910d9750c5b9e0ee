#!/usr/bin/env python
"""Benchmarks of `bpseval compute` against the I/O floor, a numpy floor and the legacy per-cell loop.

    python benchmarks/run.py --scale realistic [--repeat 5] [--json results.json]
    python benchmarks/run.py hdf5-settings [--repeat 3]
    python benchmarks/run.py profile --scale realistic

The first form generates synthetic shards with `bpseval.ShardWriter` (or reuses them), warms the
page cache and times, in one run: plain h5py reads, a minimal numpy kernel (direct and blocked),
`bpseval compute` end to end as a subprocess (also with --jobs 2 when available; peak RSS and the
process tree's PSS), the legacy per-rank per-cell loop, the in-memory `bpseval.bits_per_spike`
on one (samples, 1000) dataset, and the machine's capacity to run two processes at once; it also
counts the CPU other processes used meanwhile. `hdf5-settings` times writing and reading one
dataset's arrays under several chunk shapes and compressions. `profile` runs the merge under
cProfile. benchmarks/README.md explains every measurement and gives results.
"""

from __future__ import annotations

import argparse
import compileall
import cProfile
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import bpseval
from bpseval import ShardWriter, bits_per_spike

REPO = Path(__file__).resolve().parents[1]
GENERATOR_VERSION = 1
"""Bump when the synthetic data changes, so that stale data directories are regenerated."""
SEED = 20240601
BATCH_ROWS = 256
"""Rows per `ShardWriter.add`, as a validation loop with batch size 256 would write them."""
READ_CHUNK_ELEMENTS = getattr(getattr(bpseval, "merge", None), "CHUNK_ELEMENTS", 1 << 20)
"""Entries per row chunk when reading the way bpseval's merge does (bpseval.merge.CHUNK_ELEMENTS)."""
MIN_RATE = 1e-9
LN2 = math.log(2.0)
KERNEL_BLOCK_ELEMENTS = 1 << 14
"""Entries per row block of the blocked kernel: its float64 temporaries stay in a 1 MiB L2 cache."""
MEASUREMENTS = ("read", "kernel", "bpseval", "legacy", "in-memory", "parallel")
CPU_PROBE = "import numpy as np\nx = np.random.default_rng(0).random(1 << 14) + 0.5\nfor _ in range(20_000): np.log(x)"
"""A CPU-bound, cache-resident numpy loop of about half a second, for the machine's parallel capacity."""
READ_PROBE = (
    "import sys, h5py\nfor path in sys.argv[1:]:\n    with h5py.File(path, 'r', locking=False) as handle:\n"
    "        for group in handle['datasets'].values():\n            for array in group.values():\n"
    f"                step = max(1, {READ_CHUNK_ELEMENTS} // (array.shape[1] if array.ndim > 1 else 1))\n"
    "                for start in range(0, len(array), step): array[start : start + step]"
)
"""Every array of the shards in argv read in row chunks from the page cache: memory-bound work like the merge's."""
MIB = 1 << 20


# ----------------------------------------------------------------------------------------------
# Scales and synthetic data


@dataclass(frozen=True)
class Scale:
    """How much synthetic data: `cells` in all, spread from `cells_min` to `cells_max` per dataset."""

    datasets: int
    cells: int
    cells_min: int
    cells_max: int
    samples: int
    ranks: int


SCALES = {
    "small": Scale(datasets=5, cells=200, cells_min=20, cells_max=60, samples=5_000, ranks=2),
    "realistic": Scale(datasets=30, cells=2_800, cells_min=23, cells_max=181, samples=50_000, ranks=4),
    "large": Scale(datasets=30, cells=2_800, cells_min=23, cells_max=181, samples=200_000, ranks=4),
}


def resolve_scale(
    base: Scale, datasets: int | None, cells: int | None, samples: int | None, ranks: int | None
) -> Scale:
    """`base` with explicit overrides; the per-dataset cell range follows the mean cells per dataset."""
    scale = replace(
        base,
        datasets=datasets or base.datasets,
        cells=cells or base.cells,
        samples=samples or base.samples,
        ranks=ranks or base.ranks,
    )
    if scale.cells < scale.datasets:
        raise SystemExit(f"--cells ({scale.cells}) must be at least --datasets ({scale.datasets})")
    factor = (scale.cells / scale.datasets) / (base.cells / base.datasets)
    return replace(
        scale,
        cells_min=max(1, round(base.cells_min * factor)),
        cells_max=max(1, round(base.cells_max * factor)),
    )


def cell_counts(scale: Scale) -> list[int]:
    """Deterministic cells per dataset from cells_min to cells_max summing to `scale.cells`.

    Dataset d gets cells_min + (cells_max - cells_min)·(d/(D-1))^p, with p chosen by bisection
    so that the counts add up; rounding leftovers go to the middle datasets.
    """
    n, lo, hi = scale.datasets, scale.cells_min, scale.cells_max
    if n == 1:
        return [scale.cells]
    lo, hi = min(lo, scale.cells // n), max(hi, -(-scale.cells // n))
    x = np.arange(n) / (n - 1)
    low_p, high_p = 1e-3, 1e3
    for _ in range(200):
        p = math.sqrt(low_p * high_p)
        if (lo + (hi - lo) * x**p).sum() > scale.cells:
            low_p = p
        else:
            high_p = p
    counts = np.rint(lo + (hi - lo) * x**p).astype(int)
    order = np.argsort(np.abs(np.arange(n) - (n - 1) / 2), kind="stable")
    position = 0
    while (missing := scale.cells - int(counts.sum())) != 0:
        index = order[position % n]
        step = 1 if missing > 0 else -1
        if lo <= counts[index] + step <= hi:
            counts[index] += step
        position += 1
    return counts.tolist()


@dataclass(frozen=True)
class DatasetSpec:
    """One synthetic recording session."""

    name: str
    cells: int
    samples: int


def dataset_specs(scale: Scale) -> list[DatasetSpec]:
    """The sessions of a scale. Dataset d has samples + (d mod ranks) samples, so that
    DistributedSampler pads (repeats) up to ranks - 1 samples in most datasets."""
    return [
        DatasetSpec(f"session-{index:03d}", cells, scale.samples + index % scale.ranks)
        for index, cells in enumerate(cell_counts(scale))
    ]


def synthetic_dataset(cells: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (samples, cells) rhat, robs and dfs of one session.

    True rates are lognormal per cell (median 0.08 spikes per bin) modulated per sample; robs is
    Poisson; rhat is the true rate with multiplicative model error. dfs is a 0/1 mask: 2% of the
    rows are invalid for every cell (blinks), and 30% of the cells drop out over 1-3 contiguous
    stretches of 2-10% of the samples. Every value is finite, also where dfs = 0.
    """
    rng = np.random.default_rng(seed)
    base = np.clip(rng.lognormal(math.log(0.08), 0.8, size=cells), 0.002, 2.0).astype(np.float32)
    rate = base * np.exp(np.float32(0.5) * rng.standard_normal((samples, cells), dtype=np.float32))
    robs = rng.poisson(rate).astype(np.float32)
    rate *= np.exp(np.float32(0.3) * rng.standard_normal((samples, cells), dtype=np.float32) - np.float32(0.045))
    dfs = np.ones((samples, cells), dtype=np.float32)
    for start in rng.integers(0, samples, size=max(1, samples // 500)):
        dfs[start : start + 10] = 0.0
    for cell in np.flatnonzero(rng.random(cells) < 0.3):
        for _ in range(rng.integers(1, 4)):
            length = int(samples * rng.uniform(0.02, 0.10))
            start = int(rng.integers(0, max(1, samples - length)))
            dfs[start : start + length, cell] = 0.0
    return rate, robs, dfs


def sampler_rows(samples: int, ranks: int, rank: int) -> np.ndarray:
    """The sample indices `DistributedSampler(shuffle=False)` gives `rank`, padding included."""
    padded = np.concatenate([np.arange(samples), np.arange((-samples) % ranks)])
    return padded[rank::ranks]


def manifest_for(scale: Scale) -> dict[str, Any]:
    """What identifies a data directory's content; equal manifests mean the data can be reused."""
    return {
        "generator_version": GENERATOR_VERSION,
        "shard_format_version": getattr(getattr(bpseval, "shard", None), "FORMAT_VERSION", None),
        "shard_chunk_bytes": repr(getattr(getattr(bpseval, "shard", None), "CHUNK_BYTES", None)),
        "seed": SEED,
        "batch_rows": BATCH_ROWS,
        "ranks": scale.ranks,
        "datasets": [asdict(spec) for spec in dataset_specs(scale)],
    }


def default_data_dir(scale: Scale) -> Path:
    """A reusable directory under the system temp dir, named after the scale."""
    name = f"{scale.datasets}d-{scale.cells}c-{scale.samples}s-{scale.ranks}r"
    return Path(tempfile.gettempdir()) / "bpseval-bench" / name


def ensure_shards(scale: Scale, data_dir: Path) -> Path:
    """Generate the shards of `scale` under data_dir/run (or reuse them); returns that run dir.

    A manifest is written last, so an interrupted generation is never reused.
    """
    run_dir, manifest_path = data_dir / "run", data_dir / "manifest.json"
    manifest = manifest_for(scale)
    complete = len(list(run_dir.rglob("rank-*.h5"))) == scale.ranks
    if complete and manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        print(f"reusing shards in {run_dir}")
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    manifest_path.unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"generating shards in {run_dir} ...", flush=True)
    started = time.perf_counter()
    writers = [ShardWriter(run_dir, rank, scale.ranks) for rank in range(scale.ranks)]
    for writer in writers:
        writer.open()
    for index, spec in enumerate(dataset_specs(scale)):
        rhat, robs, dfs = synthetic_dataset(spec.cells, spec.samples, SEED + index)
        for rank, writer in enumerate(writers):
            rows = sampler_rows(spec.samples, scale.ranks, rank)
            for start in range(0, len(rows), BATCH_ROWS):
                batch = rows[start : start + BATCH_ROWS]
                ids = np.arange(spec.cells) if start == 0 else None
                writer.add(spec.name, rhat[batch], robs[batch], dfs[batch], sample_idx=batch, cell_ids=ids)
    for writer in writers:
        writer.close()
    manifest_path.write_text(json.dumps(manifest, indent=1))
    size = sum(path.stat().st_size for path in shard_paths(run_dir))
    print(f"  {size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def shard_paths(run_dir: Path) -> list[Path]:
    """The shards of a generated run, in rank order."""
    return sorted(run_dir.rglob("rank-*.h5"))


def compile_bytecode() -> None:
    """Write bpseval's bytecode as `pip install` does. A checkout run with PYTHONDONTWRITEBYTECODE
    set (common in containers) would otherwise compile every module at every start, about 0.06 s
    that an installed bpseval does not spend."""
    compileall.compile_dir(Path(bpseval.__file__).parent, quiet=1)


def warm_page_cache(paths: list[Path]) -> None:
    """Read every byte of the files once so that timings start from a warm page cache."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 * MIB):
                pass


# ----------------------------------------------------------------------------------------------
# Timing helpers


@dataclass
class MachineLoad:
    """CPU time the rest of the machine used while we ran: the noise from other processes.

    Busy time comes from /proc/stat (all CPUs, steal counted apart); our own is this process's
    and its waited-for children's rusage. Linux only; elsewhere every field stays NaN.
    """

    started: float = field(default_factory=time.perf_counter)
    machine: tuple[float, float] = field(default_factory=lambda: _machine_cpu_seconds())
    own: float = field(default_factory=lambda: _own_cpu_seconds())

    def report(self) -> dict[str, float]:
        """Foreign busy CPU-seconds and steal per wall-clock second since creation."""
        wall = time.perf_counter() - self.started
        busy, steal = _machine_cpu_seconds()
        foreign = (busy - self.machine[0]) - (_own_cpu_seconds() - self.own)
        steal_cpus = (steal - self.machine[1]) / wall
        foreign_cpus = math.nan if math.isnan(foreign) else max(0.0, foreign) / wall
        return {"wall_s": wall, "foreign_cpus": foreign_cpus, "steal_cpus": steal_cpus}


def _machine_cpu_seconds() -> tuple[float, float]:
    """Busy (user, nice, system, irq, softirq) and steal CPU-seconds of the machine since boot."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan, math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _, _, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def _own_cpu_seconds() -> float:
    """User + system CPU-seconds of this process and its reaped children."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


@dataclass
class Timing:
    """Repeated wall-clock times of one measurement, in seconds."""

    name: str
    times: list[float]
    note: str = ""
    bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def summary(self) -> dict[str, Any]:
        """Median, min, max and every time, for the JSON output."""
        return {"median": self.median, "min": min(self.times), "max": max(self.times), "times": self.times,
                "note": self.note, "bytes": self.bytes}


def timed(function: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds taken by function(*args) and its result."""
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def ratio(numerator: Timing, denominators: list[Timing]) -> dict[str, float]:
    """median(numerator) / Σ median(denominators), with the range of per-repetition paired ratios."""
    paired = [
        top / sum(timing.times[index] for timing in denominators)
        for index, top in enumerate(numerator.times)
        if all(index < len(timing.times) for timing in denominators)
    ]
    value = numerator.median / sum(timing.median for timing in denominators)
    return {"value": value, "min": min(paired, default=value), "max": max(paired, default=value)}


# ----------------------------------------------------------------------------------------------
# Floors: plain h5py reads and a minimal numpy kernel


def read_shards(paths: list[Path], chunked: bool) -> int:
    """Read every array of every shard with plain h5py; returns the bytes read.

    `chunked` reads rows in blocks of READ_CHUNK_ELEMENTS entries, as bpseval's merge does;
    otherwise each array is read whole.
    """
    total = 0
    for path in paths:
        with h5py.File(path, "r") as handle:
            for group in handle["datasets"].values():
                n_cells = group["rhat"].shape[1]
                step = max(1, READ_CHUNK_ELEMENTS // n_cells) if chunked else None
                for array in group.values():
                    for start in range(0, array.shape[0], step or max(1, array.shape[0])):
                        total += array[start : start + step if step else None].nbytes
    return total


def load_dataset(paths: list[Path], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One dataset's rhat, robs, dfs and sample_idx from all ranks, padding copies dropped."""
    parts: dict[str, list[np.ndarray]] = {"rhat": [], "robs": [], "dfs": [], "sample_idx": []}
    for path in paths:
        with h5py.File(path, "r") as handle:
            group = handle["datasets"].get(name)
            if group is not None:
                for key, values in parts.items():
                    values.append(group[key][()])
    rhat, robs, dfs, index = (np.concatenate(values) for values in parts.values())
    first = np.sort(np.unique(index, return_index=True)[1])
    return rhat[first], robs[first], dfs[first], index[first]


def kernel_stats(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-cell n_valid, Σw, Σw·robs, Σw·(robs·ln λ − λ) in float64, λ = max(rhat, 1e-9).

    The most direct numpy code; it relies on every value being finite (true of the synthetic
    data), so entries with w = 0 contribute 0 without masking.
    """
    w = dfs.astype(np.float64)
    counts = robs.astype(np.float64)
    rates = np.maximum(rhat.astype(np.float64), MIN_RATE)
    return {
        "n_valid": np.count_nonzero(dfs > 0, axis=0),
        "n": w.sum(axis=0),
        "spikes": (w * counts).sum(axis=0),
        "model_ll": (w * (counts * np.log(rates) - rates)).sum(axis=0),
    }


def kernel_stats_blocked(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> dict[str, np.ndarray]:
    """kernel_stats over row blocks of about KERNEL_BLOCK_ELEMENTS entries, added up.

    Same arithmetic; the float64 temporaries stay in cache instead of being fresh arrays the
    size of the data, which the kernel pays for in page faults and memory traffic.
    """
    rows = max(1, KERNEL_BLOCK_ELEMENTS // max(1, rhat.shape[1]))
    blocks = [kernel_stats(rhat[start : start + rows], robs[start : start + rows], dfs[start : start + rows])
              for start in range(0, len(rhat), rows)]
    return {key: np.sum([block[key] for block in blocks], axis=0) for key in blocks[0]}


KERNELS: dict[str, tuple[Callable[..., dict[str, np.ndarray]], str]] = {
    "kernel": (kernel_stats, "direct numpy on whole arrays, already in memory"),
    "kernel (blocked)": (kernel_stats_blocked, f"the same per block of {KERNEL_BLOCK_ELEMENTS} entries"),
}


def time_kernels(
    paths: list[Path], names: list[str], repeat: int
) -> tuple[list[Timing], dict[str, dict[str, np.ndarray]]]:
    """Time both KERNELS over every dataset, one dataset in memory at a time (compute only).

    Repetition i of a kernel is the sum over datasets of its i-th run; the two kernels alternate.
    Returns the timings and each dataset's statistics (from the direct kernel).
    """
    timings = {label: Timing(label, [0.0] * repeat, note) for label, (_, note) in KERNELS.items()}
    results: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        rhat, robs, dfs, _ = load_dataset(paths, name)
        for index in range(repeat):
            for label, (function, _) in KERNELS.items():
                elapsed, stats = timed(function, rhat, robs, dfs)
                timings[label].times[index] += elapsed
                results.setdefault(name, stats)
    return list(timings.values()), results


def parallel_capacity(probe: str = CPU_PROBE, args: tuple[str, ...] = ()) -> float:
    """How much faster the machine runs two copies of `probe` at once than one after the other.

    Times the probe alone, then two copies at once: 2·t(one) / t(two). About 2 on two real cores
    for CPU_PROBE (cache-resident work); lower for READ_PROBE when memory bandwidth is shared.
    Their range brackets the ceiling of any `--jobs 2` speed-up on this machine.
    """
    def wall(copies: int) -> float:
        started = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, "-c", probe, *args]) for _ in range(copies)]
        for process in processes:
            process.wait()
        return time.perf_counter() - started

    return 2 * wall(1) / wall(2)


# ----------------------------------------------------------------------------------------------
# bpseval end to end


@dataclass
class ChildRun:
    """One `bpseval compute` subprocess: wall time, peak RSS, peak process-tree PSS and exit code."""

    seconds: float
    max_rss_mb: float
    returncode: int
    stderr: str
    tree_pss_mb: float = math.nan


class TreeMemorySampler:
    """Samples the summed PSS of the descendants of a process (Linux /proc) every `interval` s.

    ru_maxrss covers one process at a time; with --jobs the workers' memory adds up. PSS
    splits pages shared after fork, so the sum does not count them twice. Peaks shorter than
    the interval can be missed.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak_kb = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        """Stop sampling; the peak in MB (NaN when /proc could not be read)."""
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024 if self.peak_kb else math.nan

    def _run(self) -> None:
        while not self._stop.wait(self.interval):  # the descendants of RSS_PROBE: the command's tree
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(pid) for pid in _process_tree(self.pid)[1:]))


def _process_tree(pid: int) -> list[int]:
    """`pid` and its living descendants."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def _pss_kb(pid: int) -> int:
    """Proportional set size of one process in KB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def bpseval_command(*args: str) -> list[str]:
    """The bpseval command line of this interpreter (the installed console script's entry point)."""
    return [sys.executable, "-c", "from bpseval.cli import main; main()", *args]


RSS_PROBE = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{usage.ru_maxrss} {time.perf_counter() - started}")
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs a command as its own child, then writes that child's ru_maxrss (KB) and wall time to a file.

Linux counts into a process's ru_maxrss the resident memory of the process it was forked from, up
to its exec (also with vfork). Forked from this small interpreter instead of from the benchmark,
which holds hundreds of MB of arrays at times, the command's peak RSS is its own."""


def run_child(command: list[str], sample_tree: bool = False) -> ChildRun:
    """Run `command` through RSS_PROBE: its wall time and peak RSS (ru_maxrss from os.wait4).

    On Linux ru_maxrss is the largest RSS of the child or of any descendant it waited for (a
    maximum, not a sum). `sample_tree` also samples the summed PSS of the command's process tree,
    which costs CPU: use it on untimed runs only.
    """
    with tempfile.TemporaryFile() as errors, tempfile.NamedTemporaryFile("r") as report:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", RSS_PROBE, report.name, *command], stdout=subprocess.DEVNULL, stderr=errors
        )
        sampler = TreeMemorySampler(process.pid) if sample_tree else None
        process.wait()
        tree_pss = sampler.stop() if sampler else math.nan
        errors.seek(0)
        text = errors.read().decode(errors="replace")
        max_rss_kb, seconds = report.read().split()
    return ChildRun(float(seconds), int(max_rss_kb) / 1024, process.returncode, text, tree_pss)


def bpseval_jobs_option() -> str:
    """How `bpseval compute` takes --jobs: "absent", "default 1" (plain `compute` is one job) or "present".

    Read from its --help, whose option table lists `[default: N]` under each option.
    """
    text = subprocess.run(bpseval_command("compute", "--help"), capture_output=True, text=True, check=False).stdout
    if "--jobs" not in text:
        return "absent"
    block = text.split("--jobs", 1)[1].split("\n│ -", 1)[0]
    return "default 1" if re.search(r"\[default:\s*1\]", block) else "present"


def sampled_bpseval_run(
    run_dir: Path, options: list[str], expected: dict[str, dict[str, np.ndarray]]
) -> tuple[str, float]:
    """Run `bpseval compute` once more, untimed, sampling the process tree's PSS, with a real JSON
    file; when `expected` (the kernel's statistics) is given, compare the per-cell statistics
    (n_valid exact, the sums to 1e-9 relative).

    Returns a one-line verdict and the peak PSS of the whole process tree in MB.
    """
    label = f"bpseval {' '.join(options) or '(default)'}"
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "result.json"
        child = run_child(bpseval_command("compute", str(run_dir), "--json", str(output), *options), sample_tree=True)
        if child.returncode != 0:
            raise SystemExit(f"{label} failed:\n{child.stderr}")
        cells = json.loads(output.read_text())["cells"]
    if not expected:
        return f"{label}: not checked (the kernel was not measured)", child.tree_pss_mb
    worst = 0.0
    for name, stats in expected.items():
        rows = [cell for cell in cells if cell["dataset"] == name]
        if [cell["n_valid"] for cell in rows] != stats["n_valid"].tolist():
            raise SystemExit(f"{label}: n_valid differs from the kernel in {name}")
        for key in ("n", "spikes", "model_ll"):
            got = np.array([cell[key] for cell in rows], dtype=float)
            worst = max(worst, float(np.max(np.abs(got - stats[key]) / np.maximum(np.abs(stats[key]), 1e-300))))
    if worst > 1e-9:
        raise SystemExit(f"{label}: statistics differ from the kernel by {worst:.2e} relative")
    return f"{label} matches the kernel (worst relative difference {worst:.1e})", child.tree_pss_mb


# ----------------------------------------------------------------------------------------------
# Legacy: per rank, per dataset, one cell at a time


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
        null_ll = np.sum(counts * math.log(null_rate) - null_rate)
        values[cell] = max((model_ll - null_ll) / (max(counts.sum(), MIN_RATE) * LN2), 0.0)
    return values


def legacy_run(paths: list[Path], names: list[str]) -> float:
    """Legacy overall bps of `names`: per rank load whole arrays, loop over cells, average per
    rank, then over ranks, then over datasets."""
    per_rank: dict[str, list[float]] = {name: [] for name in names}
    for path in paths:
        with h5py.File(path, "r") as handle:
            for name in names:
                group = handle["datasets"][name]
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


# ----------------------------------------------------------------------------------------------
# The shards benchmark


@dataclass
class Target:
    """A performance target and whether the measurement meets it."""

    name: str
    value: float
    limit: float
    higher_is_better: bool

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def describe(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        return f"{self.name}: {self.value:.3g} (target {sign} {self.limit:g}) {'MET' if self.met else 'NOT MET'}"


def run_shards_benchmark(args: argparse.Namespace, scale_name: str, scale: Scale) -> dict[str, Any]:
    """Every measurement of the shards benchmark; returns the JSON document."""
    measure = set(args.measure)
    data_dir = args.data_dir or default_data_dir(scale)
    run_dir = ensure_shards(scale, data_dir)
    paths = shard_paths(run_dir)
    specs = dataset_specs(scale)
    names = [spec.name for spec in specs]
    data_bytes = sum(path.stat().st_size for path in paths)
    print(f"scale {scale_name}: {scale.datasets} datasets, {scale.cells} cells ({scale.cells_min}-{scale.cells_max}"
          f" per dataset), {scale.samples} samples per dataset, {scale.ranks} ranks; {data_bytes / 1e9:.2f} GB",
          flush=True)
    warm_page_cache(paths)
    compile_bytecode()
    load = MachineLoad()
    timings: dict[str, Timing] = {}
    notes: list[str] = []
    rss: dict[str, list[float]] = {}
    tree_pss_mb: dict[str, float] = {}
    capacity: list[float] = []
    read_capacity: list[float] = []
    jobs = bpseval_jobs_option() if "bpseval" in measure else "absent"
    variants: dict[str, list[str]] = {"bpseval": []}
    if jobs == "present":
        variants["bpseval --jobs 1"] = ["--jobs", "1"]
    if jobs != "absent":
        variants["bpseval --jobs 2"] = ["--jobs", "2"]
    if jobs == "default 1":
        notes.append("bpseval compute defaults to --jobs 1 (its --help says so): the plain run is the 1-job time")
    elif jobs == "absent" and "bpseval" in measure:
        notes.append("bpseval compute has no --jobs option yet: measured the default (one process) only")
    legacy_names, legacy_factor = legacy_subset(specs, args.legacy_datasets)
    if "legacy" in measure and legacy_factor != 1.0:
        notes.append(f"legacy timed on {len(legacy_names)} of {len(names)} datasets and scaled linearly by"
                     f" entries (x{legacy_factor:.2f}): the legacy time is an EXTRAPOLATION")
    legacy_result = math.nan
    for repetition in range(args.repeat):
        print(f"repetition {repetition + 1}/{args.repeat}", flush=True)
        if "read" in measure:
            for label, chunked in (("read", True), ("read (whole arrays)", False)):
                elapsed, size = timed(read_shards, paths, chunked)
                note = "plain h5py" + (", bpseval's row chunks" if chunked else "")
                timings.setdefault(label, Timing(label, [], note, size)).times.append(elapsed)
        if "bpseval" in measure:
            startup = run_child(bpseval_command("--version"))
            timings.setdefault("startup", Timing("startup", [], "bpseval --version: interpreter and imports")
                               ).times.append(startup.seconds)
            for label, options in variants.items():
                child = run_child(bpseval_command("compute", str(run_dir), "--json", os.devnull, *options))
                if child.returncode != 0:
                    raise SystemExit(f"{label} failed (exit {child.returncode}):\n{child.stderr}")
                timings.setdefault(label, Timing(label, [], "end to end subprocess")).times.append(child.seconds)
                rss.setdefault(label, []).append(child.max_rss_mb)
        if "legacy" in measure:
            elapsed, legacy_result = timed(legacy_run, paths, legacy_names)
            note = "per-cell loop, load included" + (" (extrapolated)" if legacy_factor != 1.0 else "")
            timings.setdefault("legacy", Timing("legacy", [], note)).times.append(elapsed * legacy_factor)
        if "parallel" in measure:
            capacity.append(parallel_capacity())
            read_capacity.append(parallel_capacity(READ_PROBE, tuple(str(path) for path in paths)))
    kernel_results: dict[str, dict[str, np.ndarray]] = {}
    if "kernel" in measure:
        print("kernels ...", flush=True)
        kernel_timings, kernel_results = time_kernels(paths, names, args.repeat)
        timings.update((timing.name, timing) for timing in kernel_timings)
    checks: list[str] = []
    if "bpseval" in measure:
        for label, options in variants.items():
            verdict, tree_pss = sampled_bpseval_run(run_dir, options, kernel_results)
            checks.append(verdict)
            tree_pss_mb[label] = tree_pss
    in_memory: dict[str, Timing] = {}
    if "in-memory" in measure:
        in_memory = run_in_memory(scale.samples, args.in_memory_cells, args.repeat)
    document = {
        "scale": scale_name,
        "config": {**asdict(scale), "data_dir": str(data_dir), "data_bytes": data_bytes, "repeat": args.repeat,
                   "read_chunk_elements": READ_CHUNK_ELEMENTS, "in_memory_cells": args.in_memory_cells},
        "environment": environment(),
        "timings": {name: timing.summary() for name, timing in timings.items()},
        "in_memory": {name: timing.summary() for name, timing in in_memory.items()},
        "peak_rss_mb": {label: {"max": max(values), "runs": values} for label, values in rss.items()},
        "peak_tree_pss_mb": tree_pss_mb,
        "parallel_capacity": spread(capacity),
        "parallel_read_capacity": spread(read_capacity),
        "machine_load": load.report(),
        "legacy_bps": legacy_result,
        "checks": checks,
        "notes": notes,
    }
    document["ratios"] = compute_ratios(timings, in_memory)
    document["targets"] = [asdict(t) | {"met": t.met} for t in compute_targets(scale_name, document)]
    print_report(document, timings, in_memory)
    return document


def spread(values: list[float]) -> dict[str, Any] | None:
    """Median, min, max and the values themselves (None when nothing was measured)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values} if values else None


def compute_ratios(timings: dict[str, Timing], in_memory: dict[str, Timing]) -> dict[str, dict[str, float]]:
    """The headline ratios between measurements that were all taken."""
    ratios: dict[str, dict[str, float]] = {}
    floor = timings.get("read")
    if "bpseval" in timings and floor:
        ratios["bpseval/read"] = ratio(timings["bpseval"], [floor])
        if "kernel" in timings:
            ratios["bpseval/(read+kernel)"] = ratio(timings["bpseval"], [floor, timings["kernel"]])
            ratios["bpseval/(read+kernel blocked)"] = ratio(timings["bpseval"], [floor, timings["kernel (blocked)"]])
    if "legacy" in timings and "bpseval" in timings:
        ratios["legacy/bpseval"] = ratio(timings["legacy"], [timings["bpseval"]])
    if "bpseval --jobs 2" in timings:
        one_job = timings.get("bpseval --jobs 1", timings["bpseval"])
        ratios["jobs1/jobs2"] = ratio(one_job, [timings["bpseval --jobs 2"]])
    if in_memory:
        ratios["in-memory: legacy/bpseval"] = ratio(in_memory["legacy"], [in_memory["bpseval"]])
        ratios["in-memory: bpseval/kernel"] = ratio(in_memory["bpseval"], [in_memory["kernel"]])
        ratios["in-memory: bpseval/kernel blocked"] = ratio(in_memory["bpseval"], [in_memory["kernel (blocked)"]])
    return ratios


def compute_targets(scale_name: str, document: dict[str, Any]) -> list[Target]:
    """The project's performance targets that this run can judge."""
    ratios, rss = document["ratios"], document["peak_rss_mb"]
    targets = []
    if scale_name == "realistic":
        for key, limit in (("bpseval/(read+kernel)", 1.3), ("bpseval/read", 2.0)):
            if key in ratios:
                targets.append(Target(key, ratios[key]["value"], limit, False))
    rss_limit = {"realistic": 400.0, "large": 500.0}.get(scale_name)
    if rss_limit and "bpseval" in rss:
        for label, values in rss.items():
            targets.append(Target(f"peak RSS MB ({label}, {scale_name})", values["max"], rss_limit, False))
    if "jobs1/jobs2" in ratios:
        targets.append(Target("jobs1/jobs2", ratios["jobs1/jobs2"]["value"], 1.6, True))
    if "in-memory: legacy/bpseval" in ratios:
        targets.append(Target("in-memory: legacy/bpseval", ratios["in-memory: legacy/bpseval"]["value"], 5.0, True))
        targets.append(Target("in-memory: bpseval/kernel", ratios["in-memory: bpseval/kernel"]["value"], 1.5, False))
    return targets


def run_in_memory(samples: int, cells: int, repeat: int) -> dict[str, Timing]:
    """bits_per_spike vs the legacy per-cell loop vs the kernel on one in-memory (samples, cells) dataset."""
    print(f"in-memory: {samples} x {cells} ...", flush=True)
    rhat, robs, dfs = synthetic_dataset(cells, samples, SEED - 1)
    functions: dict[str, Callable[[], Any]] = {
        "bpseval": lambda: bits_per_spike(rhat, robs, dfs),
        "legacy": lambda: legacy_cell_bps(rhat, robs, dfs),
        **{label: lambda function=function: function(rhat, robs, dfs) for label, (function, _) in KERNELS.items()},
    }
    notes = {"bpseval": "bpseval.bits_per_spike", "legacy": "per-cell boolean-mask loop",
             **{label: note.split(",")[0] for label, (_, note) in KERNELS.items()}}
    timings = {name: Timing(name, [], f"{notes[name]}, {samples} x {cells} float32") for name in functions}
    results = {name: function() for name, function in functions.items()}  # warm-up, untimed
    for _ in range(repeat):
        for name, function in functions.items():
            elapsed, results[name] = timed(function)
            timings[name].times.append(elapsed)
    if not np.allclose(results["bpseval"]["model_ll"], results["kernel"]["model_ll"], rtol=1e-9, atol=0):
        raise SystemExit("in-memory: bits_per_spike and the kernel disagree")
    return timings


def environment() -> dict[str, Any]:
    """Machine, library versions and the bpseval checkout measured."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return result.stdout.strip()

    source = hashlib.sha256()
    for path in sorted((REPO / "bpseval").glob("*.py")):
        source.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
        "bpseval": bpseval.__version__,
        "git_head": git("rev-parse", "--short", "HEAD"),
        "bpseval_modified": bool(git("status", "--porcelain", "--", "bpseval")),
        "bpseval_source_sha256": source.hexdigest()[:16],
        "typer": importlib.metadata.version("typer"),
    }


def print_report(document: dict[str, Any], timings: dict[str, Timing], in_memory: dict[str, Timing]) -> None:
    """The results table, ratios, peak RSS and targets on stdout."""
    print()
    print(f"{'measurement':<26}{'median s':>10}{'min':>9}{'max':>9}{'MB/s':>8}  note")
    for prefix, group in (("", timings), ("in-memory: ", in_memory)):
        for timing in group.values():
            speed = f"{timing.bytes / MIB / timing.median:8.0f}" if timing.bytes else " " * 8
            print(f"{prefix + timing.name:<26}{timing.median:10.3f}{min(timing.times):9.3f}{max(timing.times):9.3f}"
                  f"{speed}  {timing.note}")
    print("\nratios (of medians; range of the per-repetition paired ratios)")
    for name, value in document["ratios"].items():
        print(f"  {name:<28}{value['value']:7.2f}   [{value['min']:.2f} - {value['max']:.2f}]")
    for label, values in document["peak_rss_mb"].items():
        pss = document["peak_tree_pss_mb"].get(label, math.nan)
        print(f"peak RSS {label}: {values['max']:.0f} MB (runs: {', '.join(f'{v:.0f}' for v in values['runs'])});"
              f" process tree PSS (sampled on one more run): {pss:.0f} MB")
    for key, what in (("parallel_capacity", "CPU-bound"), ("parallel_read_capacity", "page-cache reading")):
        if document.get(key):
            capacity = document[key]
            print(f"machine parallel capacity, {what} (2 processes vs 1, a --jobs 2 ceiling): {capacity['median']:.2f}x"
                  f" [{capacity['min']:.2f} - {capacity['max']:.2f}]")
    print_load(document["machine_load"])
    for line in [*document["checks"], *document["notes"]]:
        print(line)
    env = document["environment"]
    modified = f" + uncommitted changes, source {env['bpseval_source_sha256']}" if env["bpseval_modified"] else ""
    print(f"bpseval {env['bpseval']} at {env['git_head']}{modified};"
          f" {env['cpus']} cpus, numpy {env['numpy']}, h5py {env['h5py']}, HDF5 {env['hdf5']}")
    print("targets:")
    for target in document["targets"]:
        print(f"  {Target(**{k: v for k, v in target.items() if k != 'met'}).describe()}")


def print_load(load: dict[str, float]) -> None:
    """One line on how busy the rest of the machine was during the run."""
    print(f"other processes used {load['foreign_cpus']:.2f} CPUs on average during the {load['wall_s']:.0f} s run"
          f" (steal {load['steal_cpus']:.2f}); above ~0.1 the timings are disturbed")


# ----------------------------------------------------------------------------------------------
# HDF5 settings


@dataclass(frozen=True)
class Layout:
    """A chunk size target (0 = one batch per chunk, within 16-256 KiB) and an h5py compression setting."""

    chunk_bytes: int
    compression: str

    @property
    def label(self) -> str:
        if self.chunk_bytes == 0:
            size = "one batch (16-256 KiB)"
        elif self.chunk_bytes >= MIB:
            size = f"{self.chunk_bytes // MIB} MiB"
        else:
            size = f"{self.chunk_bytes // 1024} KiB"
        return f"{size}, {self.compression}"

    def options(self) -> dict[str, Any]:
        """create_dataset keyword arguments for the compression."""
        return {
            "none": {},
            "lzf": {"compression": "lzf"},
            "gzip-1": {"compression": "gzip", "compression_opts": 1},
            "shuffle+gzip-1": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
        }[self.compression]

    def chunk_rows(self, array: np.ndarray) -> int:
        """Rows per chunk of `array`: whole rows, about chunk_bytes (or one batch, within 16-256 KiB)."""
        row_bytes = max(1, array[0].nbytes)
        if self.chunk_bytes == 0:
            smallest, largest = (max(1, limit // row_bytes) for limit in (1 << 14, 1 << 18))
            return min(max(BATCH_ROWS, smallest), largest)
        return max(1, self.chunk_bytes // row_bytes)


COMPRESSIONS = ("none", "lzf", "gzip-1", "shuffle+gzip-1")
CHUNK_TARGETS = (0, 64 * 1024, 256 * 1024, 1024 * 1024)


def write_layout(path: Path, arrays: dict[str, np.ndarray], layout: Layout) -> None:
    """Write `arrays` the way ShardWriter appends them (BATCH_ROWS rows per resize and write)."""
    with h5py.File(path, "w") as handle:
        group = handle.create_group("datasets/session")
        targets = {
            name: group.create_dataset(
                name, shape=(0, *array.shape[1:]), maxshape=(None, *array.shape[1:]), dtype=array.dtype,
                chunks=(layout.chunk_rows(array), *array.shape[1:]), **layout.options(),
            )
            for name, array in arrays.items()
        }
        for start in range(0, len(arrays["rhat"]), BATCH_ROWS):
            for name, target in targets.items():
                batch = arrays[name][start : start + BATCH_ROWS]
                target.resize(start + len(batch), axis=0)
                target[start:] = batch


def write_with_shard_writer(run_dir: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` through ShardWriter itself, BATCH_ROWS rows per add; returns the shard path."""
    with ShardWriter(run_dir, 0, 1) as writer:
        for start in range(0, len(arrays["rhat"]), BATCH_ROWS):
            rows = slice(start, start + BATCH_ROWS)
            writer.add("session", arrays["rhat"][rows], arrays["robs"][rows], arrays["dfs"][rows],
                       sample_idx=arrays["sample_idx"][rows])
    return writer.path


def run_hdf5_settings(args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    """Writer throughput, file size and reader throughput per chunk layout and compression."""
    load = MachineLoad()
    rows_out: list[dict[str, Any]] = []
    cell_options = [int(value) for value in args.hdf5_cells.split(",")]
    with tempfile.TemporaryDirectory(dir=args.data_dir) as scratch:
        for cells in cell_options:
            rhat, robs, dfs = synthetic_dataset(cells, scale.samples, SEED)
            arrays = {"rhat": rhat, "robs": robs, "dfs": dfs, "sample_idx": np.arange(scale.samples, dtype=np.int64)}
            raw = sum(array.nbytes for array in arrays.values())
            print(f"\n{scale.samples} samples x {cells} cells, float32 rhat/robs/dfs + int64 sample_idx:"
                  f" {raw / MIB:.0f} MiB raw; {args.repeat} repetitions, page cache warm")
            print(f"{'layout':<34}{'rhat chunk':>12}{'write MB/s':>11}{'[min-max]':>14}{'size MiB':>10}"
                  f"{'ratio':>7}{'read MB/s':>10}{'[min-max]':>14}")
            cases: list[tuple[str, Callable[[Path], Path], str]] = [
                ("ShardWriter itself", partial(write_with_shard_writer, arrays=arrays), f"{shard_writer_chunk_rows(rhat)} rows")
            ]
            for chunk_bytes in CHUNK_TARGETS:
                for compression in COMPRESSIONS:
                    layout = Layout(chunk_bytes, compression)
                    cases.append((layout.label, partial(write_to, arrays=arrays, layout=layout),
                                  f"{layout.chunk_rows(rhat)} rows"))
            for label, write, chunk in cases:
                write_times, read_times, size = [], [], 0
                for repetition in range(args.repeat):
                    target = Path(scratch) / f"case-{len(rows_out)}-{repetition}"
                    elapsed, path = timed(write, target)
                    write_times.append(elapsed)
                    size = path.stat().st_size
                    read_times.append(timed(read_shards, [path], True)[0])
                    shutil.rmtree(target)
                row = {"cells": cells, "layout": label, "chunk": chunk, "raw_bytes": raw, "file_bytes": size,
                       "write_s": write_times, "read_s": read_times}
                rows_out.append(row)
                speeds = [raw / MIB / t for t in write_times], [raw / MIB / t for t in read_times]
                print(f"{label:<34}{chunk:>12}{statistics.median(speeds[0]):11.0f}"
                      f"{f'[{min(speeds[0]):.0f}-{max(speeds[0]):.0f}]':>14}{size / MIB:10.1f}{raw / size:7.2f}"
                      f"{statistics.median(speeds[1]):10.0f}{f'[{min(speeds[1]):.0f}-{max(speeds[1]):.0f}]':>14}")
    document = {"mode": "hdf5-settings", "samples": scale.samples, "environment": environment(),
                "machine_load": load.report(), "results": rows_out}
    print_load(document["machine_load"])
    return document


def shard_writer_chunk_rows(rhat: np.ndarray) -> int:
    """Rows per rhat chunk that this bpseval's ShardWriter writes (a byte target, or older: one batch)."""
    chunk_bytes = getattr(bpseval.shard, "CHUNK_BYTES", 0)
    return max(1, chunk_bytes // rhat[0].nbytes) if isinstance(chunk_bytes, int) else Layout(0, "none").chunk_rows(rhat)


def write_to(target: Path, arrays: dict[str, np.ndarray], layout: Layout) -> Path:
    """write_layout into a fresh directory `target`; returns the file path."""
    target.mkdir()
    path = target / "rank-0000.h5"
    write_layout(path, arrays, layout)
    return path


# ----------------------------------------------------------------------------------------------
# Profile


PROFILE_GROUPS = (
    ("h5py reads of rhat, robs, dfs (DatasetReader.rows)", ("rows@shard.py",)),
    ("batch_stats", ("batch_stats",)),
    ("dedup (reading sample_idx, first_copies, filter)", ("read_sample_idx", "first_copies", "filter@merge.py")),
    ("shard headers (read_headers, in forked children)", ("read_headers",)),
    ("identity checksum", ("dataset_identity",)),
    ("result building (build_result)", ("build_result",)),
    ("JSON (to_json)", ("to_json",)),
)


def run_profile(scale: Scale, data_dir: Path | None) -> dict[str, Any]:
    """Profile bpseval.evaluate plus Result.to_json in-process with cProfile; print where the time goes."""
    run_dir = ensure_shards(scale, data_dir or default_data_dir(scale))
    warm_page_cache(shard_paths(run_dir))
    profiler = cProfile.Profile()
    load = MachineLoad()
    started = time.perf_counter()
    profiler.enable()
    bpseval.evaluate(run_dir).to_json()
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    groups = {label: sum(cumulative_time(stats, key) for key in keys) for label, keys in PROFILE_GROUPS}
    print(f"\nevaluate + to_json: {total:.2f} s (under cProfile)")
    groups["other"] = total - sum(groups.values())
    for label, seconds in groups.items():
        print(f"  {label:<54}{seconds:8.2f} s {100 * seconds / total:5.1f} %")
    print("\ncallees of batch_stats (cumulative s):")
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_callees("batch_stats")
    print(buffer.getvalue())
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(20)
    print(buffer.getvalue())
    document = {"mode": "profile", "total_s": total, "groups_s": groups, "environment": environment(),
                "machine_load": load.report()}
    print_load(document["machine_load"])
    return document


def cumulative_time(stats: pstats.Stats, key: str) -> float:
    """Cumulative seconds of the functions named `key` ("name" or "name@file")."""
    name, _, filename = key.partition("@")
    return sum(
        entry[3]
        for (path, _, function), entry in stats.stats.items()  # type: ignore[attr-defined]
        if function == name and (not filename or path.endswith(filename))
    )


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="shards", choices=("shards", "hdf5-settings", "profile"),
                        help="shards (default): the full benchmark; hdf5-settings: chunk/compression table;"
                             " profile: cProfile of the merge")
    parser.add_argument("--scale", choices=SCALES, help="default: small for shards, realistic otherwise")
    parser.add_argument("--datasets", type=int, help="override the scale's number of datasets")
    parser.add_argument("--cells", type=int, help="override the scale's total number of cells")
    parser.add_argument("--samples", type=int, help="override the scale's validation samples per dataset")
    parser.add_argument("--ranks", type=int, help="override the scale's number of ranks")
    parser.add_argument("--data-dir", type=Path, help="where shards go (default: a reusable dir under the temp dir)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of every timing (default 5)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--measure", type=lambda text: text.split(","), default=list(MEASUREMENTS),
                        help=f"comma-separated subset of {','.join(MEASUREMENTS)} (default: all)")
    parser.add_argument("--legacy-datasets", type=int,
                        help="time legacy on this many datasets and extrapolate by entries (default: all)")
    parser.add_argument("--in-memory-cells", type=int, default=1000, help="cells of the in-memory dataset")
    parser.add_argument("--hdf5-cells", default="181,23", help="hdf5-settings: comma-separated cell counts")
    args = parser.parse_args(argv)
    unknown = set(args.measure) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown --measure {', '.join(sorted(unknown))}; choose from {', '.join(MEASUREMENTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen mode and write its JSON document when asked."""
    args = parse_args(argv)
    scale_name = args.scale or ("small" if args.mode == "shards" else "realistic")
    overridden = any(getattr(args, key) for key in ("datasets", "cells", "samples", "ranks"))
    scale = resolve_scale(SCALES[scale_name], args.datasets, args.cells, args.samples, args.ranks)
    label = f"{scale_name} (overridden)" if overridden else scale_name
    if args.mode == "hdf5-settings":
        document = run_hdf5_settings(args, scale)
    elif args.mode == "profile":
        document = run_profile(scale, args.data_dir)
    else:
        document = run_shards_benchmark(args, label, scale)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2, default=float))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
