"""The `shards` mode: `bpseval compute` on synthetic shards against the floors and the legacy loop."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.baselines import (
    COMPILED,
    KERNELS,
    kernel_setting,
    legacy_cell_bps,
    legacy_run,
    legacy_subset,
    read_shards,
    relative_difference,
    time_kernels,
)
from benchmarks.data import (
    SEED,
    Scale,
    dataset_specs,
    default_data_dir,
    ensure_shards,
    shard_paths,
    synthetic_dataset,
    warm_page_cache,
)
from benchmarks.processes import READ_PROBE, bpseval_command, compile_bytecode, parallel_capacity, run_child
from benchmarks.report import FLOOR, NUMPY_KERNEL_RUN, compute_ratios, compute_targets, print_report
from benchmarks.timing import MachineLoad, Timing, environment, spread, timed
from bpseval import bits_per_spike
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.compiled import choice
from bpseval.kernel.stats import BLOCK_ENTRIES
from bpseval.run.merge import CHUNK_ELEMENTS

MEASUREMENTS = ("read", "kernel", "bpseval", "legacy", "in-memory", "parallel")
STAT_COLUMNS = ("n_valid", "n", "spikes", "model_ll")
"""bpseval's per-cell output columns that hold CellStats' fields, in their order."""


@dataclass
class Collected:
    """What the repetitions measured so far."""

    timings: dict[str, Timing] = field(default_factory=dict)
    rss: dict[str, list[float]] = field(default_factory=dict)
    capacity: list[float] = field(default_factory=list)
    read_capacity: list[float] = field(default_factory=list)
    legacy_bps: float = math.nan

    def add(self, label: str, seconds: float, note: str, size: int = 0) -> None:
        """One more time of measurement `label`."""
        self.timings.setdefault(label, Timing(label, [], note, size)).times.append(seconds)


VARIANT_KERNELS = {NUMPY_KERNEL_RUN: "numpy"}
"""BPSEVAL_KERNEL of the `bpseval compute` variants that set it."""


def bpseval_variants(notes: list[str]) -> dict[str, list[str]]:
    """The `bpseval compute` option sets to time: the default, one job (unless that is the default), two jobs.

    The default is read from `compute --help`, whose option table lists `[default: N]` under --jobs.
    """
    text = subprocess.run(bpseval_command("compute", "--help"), capture_output=True, text=True, check=False).stdout
    jobs_help = text.split("--jobs", 1)[-1].split("\n│ -", 1)[0]
    variants: dict[str, list[str]] = {"bpseval": []}
    if re.search(r"\[default:\s*1\]", jobs_help):
        notes.append("bpseval compute defaults to --jobs 1 (its --help says so): the plain run is the 1-job time")
    else:
        variants["bpseval --jobs 1"] = ["--jobs", "1"]
    variants["bpseval --jobs 2"] = ["--jobs", "2"]
    if COMPILED:
        variants[NUMPY_KERNEL_RUN] = []
    return variants


def cell_stats(columns: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """The sums bpseval's per-cell output columns hold (n_valid, n, spikes, model_ll), under CellStats' names."""
    return {field: np.asarray(columns[key]) for field, key in zip(STAT_FIELDS, STAT_COLUMNS, strict=False)}


def sampled_bpseval_run(run_dir: Path, options: list[str], reference: dict[str, CellStats]) -> tuple[str, float]:
    """Run `bpseval compute` once more, untimed, sampling the process tree's PSS, with a real JSON
    file; when `reference` (the numpy floor's statistics) is given, compare the per-cell statistics.

    Returns a one-line verdict and the peak PSS of the whole process tree in MB.
    """
    label = f"bpseval {' '.join(options) or '(default)'}" + (
        f" ({kernel} kernel)" if (kernel := choice()) != "auto" else ""
    )
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "result.json"
        child = run_child(
            bpseval_command("compute", str(run_dir), "--no-cache", "--json", str(output), *options), sample_tree=True
        )
        if child.returncode != 0:
            raise SystemExit(f"{label} failed:\n{child.stderr}")
        cells = json.loads(output.read_text())["cells"]
    if not reference:
        return f"{label}: not checked (the kernel was not measured)", child.tree_pss_mb
    worst = 0.0
    for name, expected in reference.items():
        rows = [cell for cell in cells if cell["dataset"] == name]
        got = cell_stats({key: [cell[key] for cell in rows] for key in STAT_COLUMNS})
        worst = max(worst, relative_difference(f"{label}, {name}", got, expected))
    return f"{label} matches the {FLOOR} (worst relative difference {worst:.1e})", child.tree_pss_mb


def run_in_memory(samples: int, cells: int, repeat: int) -> dict[str, Timing]:
    """bits_per_spike vs the legacy per-cell loop vs the kernels on one in-memory (samples, cells) dataset."""
    print(f"in-memory: {samples} x {cells} ...", flush=True)
    rhat, robs, dfs = synthetic_dataset(cells, samples, SEED - 1)
    functions: dict[str, tuple[Callable[..., Any], str]] = {
        "bpseval": (bits_per_spike, "bpseval.bits_per_spike"),
        "legacy": (legacy_cell_bps, "per-cell boolean-mask loop"),
        **{label: (function, note.split(",")[0]) for label, (function, note) in KERNELS.items()},
    }
    timings = {name: Timing(name, [], f"{note}, {samples} x {cells} float32") for name, (_, note) in functions.items()}
    results = {name: function(rhat, robs, dfs) for name, (function, _) in functions.items()}  # warm-up, untimed
    for _ in range(repeat):
        for name, (function, _) in functions.items():
            elapsed, results[name] = timed(function, rhat, robs, dfs)
            timings[name].times.append(elapsed)
    relative_difference("in-memory: bits_per_spike", cell_stats(results["bpseval"]), results[FLOOR])
    return timings


def measure_repetition(
    measure: set[str], run_dir: Path, variants: dict[str, list[str]], legacy: tuple[list[str], float], into: Collected
) -> None:
    """One repetition of the interleaved measurements: read, bpseval, legacy, parallel probes."""
    paths = shard_paths(run_dir)
    if "read" in measure:
        for label, chunked in (("read", True), ("read (whole arrays)", False)):
            elapsed, size = timed(read_shards, paths, chunked)
            into.add(label, elapsed, "plain h5py" + (", bpseval's row chunks" if chunked else ""), size)
    if "bpseval" in measure:
        startup = run_child(bpseval_command("--version")).seconds
        into.add("startup", startup, "bpseval --version: interpreter and imports")
        for label, options in variants.items():
            with kernel_setting(VARIANT_KERNELS.get(label)):
                child = run_child(
                    bpseval_command("compute", str(run_dir), "--no-cache", "--json", os.devnull, *options)
                )
            if child.returncode != 0:
                raise SystemExit(f"{label} failed (exit {child.returncode}):\n{child.stderr}")
            into.add(label, child.seconds, "end to end subprocess")
            into.rss.setdefault(label, []).append(child.max_rss_mb)
    if "legacy" in measure:
        (names, factor), note = legacy, "per-cell loop, load included"
        elapsed, into.legacy_bps = timed(legacy_run, paths, names)
        into.add("legacy", elapsed * factor, note + (" (extrapolated)" if factor != 1.0 else ""))
    if "parallel" in measure:
        into.capacity.append(parallel_capacity())
        into.read_capacity.append(parallel_capacity(READ_PROBE, tuple(str(path) for path in paths)))


def main(args: argparse.Namespace, scale_name: str, scale: Scale) -> dict[str, Any]:
    """Every measurement of the shards benchmark; prints the report and returns the JSON document."""
    measure = set(args.measure)
    data_dir = args.data_dir or default_data_dir(scale)
    run_dir = ensure_shards(scale, data_dir)
    paths, specs = shard_paths(run_dir), dataset_specs(scale)
    names = [spec.name for spec in specs]
    data_bytes = sum(path.stat().st_size for path in paths)
    print(
        f"scale {scale_name}: {scale.datasets} datasets, {scale.cells} cells ({scale.cells_min}-{scale.cells_max}"
        f" per dataset), {scale.samples} samples per dataset, {scale.ranks} ranks; {data_bytes / 1e9:.2f} GB",
        flush=True,
    )
    warm_page_cache(paths)
    compile_bytecode()
    load, collected, notes = MachineLoad(), Collected(), []
    variants = bpseval_variants(notes) if "bpseval" in measure else {}
    legacy = legacy_subset(specs, args.legacy_datasets)
    if "legacy" in measure and legacy[1] != 1.0:
        notes.append(
            f"legacy timed on {len(legacy[0])} of {len(names)} datasets and scaled linearly by"
            f" entries (x{legacy[1]:.2f}): the legacy time is an EXTRAPOLATION"
        )
    for repetition in range(args.repeat):
        print(f"repetition {repetition + 1}/{args.repeat}", flush=True)
        measure_repetition(measure, run_dir, variants, legacy, collected)
    timings = collected.timings
    reference: dict[str, CellStats] = {}
    if "kernel" in measure:
        print("kernels ...", flush=True)
        kernel_timings, reference = time_kernels(paths, names, args.repeat)
        timings.update((timing.name, timing) for timing in kernel_timings)
    checks, tree_pss_mb = [], {}
    for label, options in variants.items():
        with kernel_setting(VARIANT_KERNELS.get(label)):
            verdict, tree_pss_mb[label] = sampled_bpseval_run(run_dir, options, reference)
        checks.append(verdict)
    in_memory = run_in_memory(scale.samples, args.in_memory_cells, args.repeat) if "in-memory" in measure else {}
    document = {
        "scale": scale_name,
        "config": {
            **asdict(scale),
            "data_dir": str(data_dir),
            "data_bytes": data_bytes,
            "repeat": args.repeat,
            "read_chunk_elements": CHUNK_ELEMENTS,
            "kernel_block_entries": BLOCK_ENTRIES,
            "in_memory_cells": args.in_memory_cells,
        },
        "environment": environment(),
        "timings": {name: timing.summary() for name, timing in timings.items()},
        "in_memory": {name: timing.summary() for name, timing in in_memory.items()},
        "peak_rss_mb": {label: {"max": max(values), "runs": values} for label, values in collected.rss.items()},
        "peak_tree_pss_mb": tree_pss_mb,
        "parallel_capacity": spread(collected.capacity),
        "parallel_read_capacity": spread(collected.read_capacity),
        "machine_load": load.report(),
        "legacy_bps": collected.legacy_bps,
        "checks": checks,
        "notes": notes,
    }
    document["ratios"] = compute_ratios(timings, in_memory)
    targets = compute_targets(scale_name, document["ratios"], document["peak_rss_mb"])
    document["targets"] = [asdict(target) | {"met": target.met} for target in targets]
    print_report(document, timings, in_memory)
    return document
