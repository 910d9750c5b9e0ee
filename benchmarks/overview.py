"""The `all` mode: every ratio of issue #17 from one run, side by side, each with its target and verdict.

    python benchmarks/run.py all [--quick] [--repeat N] [--json PATH]

It runs the measurements of the `cache`, `writer`, `online`, `shards` and `parallel` modes (their
own functions, at the sizes below) and prints one table: area, ratio, value, the range of the
per-repetition ratios, target and verdict, under the commit measured and above the CPU other
processes used meanwhile. `--quick` uses the smallest sizes that still run every path: a smoke
run whose numbers say nothing about the targets, which are stated for the full sizes.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import cache, parallel, shards, writer
from benchmarks.baselines import kernel_startup
from benchmarks.data import SCALES, Scale, resolve_scale
from benchmarks.report import NUMPY_KERNEL_RUN, READ_LIMIT, RSS_LIMITS_MB, Target
from benchmarks.timing import MachineLoad, commit, environment, print_load

IN_MEMORY_SPEEDUP = 8.0
"""Issue #17: the in-memory bits_per_spike at least this many times faster than the per-cell loop at 1,000 cells."""
SHARDS_MEASURE = ["read", "bpseval", "in-memory"]
"""What the `shards` mode measures here: compute against the plain h5py read, its peak RSS, the in-memory call."""
RSS_UNCHANGED = 1.1
"""Issue #17: peak RSS unchanged with the compiled kernel, read as within 10% of the numpy kernel's."""
WARM_START = 0.5
"""A start with numba's on-disk cache must cost well under one that compiles (the compile paid once)."""
QUICK_NOTE = "QUICK smoke run: sizes far below the targets' scale; these numbers do not judge the targets"


@dataclass(frozen=True)
class Sizes:
    """The data of every area: the shards scale (named for its RSS limit), the writer's sessions, the cache's
    steps, the online metric's calls per round and the parallel runs."""

    shards_scale: str
    shards: Scale
    in_memory_cells: int
    writer_cells: tuple[int, ...]
    writer_samples: int
    cache: Scale
    cache_steps: int
    online_calls: int
    parallel: parallel.Sizes = field(default_factory=parallel.Sizes)


FULL = Sizes(
    shards_scale="realistic",
    shards=SCALES["realistic"],
    in_memory_cells=1000,
    writer_cells=(181, 23),
    writer_samples=SCALES["realistic"].samples,
    cache=resolve_scale(SCALES["small"], None, None, 100_000, None),
    cache_steps=30,
    online_calls=20,
)
QUICK = Sizes(
    shards_scale="quick",
    shards=resolve_scale(SCALES["small"], 2, 24, 400, 2),
    in_memory_cells=1000,
    writer_cells=(181, 23),
    writer_samples=600,
    cache=resolve_scale(SCALES["small"], 2, 12, 300, 2),
    cache_steps=2,
    online_calls=1,
    parallel=parallel.Sizes(tiny_datasets=20, session_samples=300, many_ranks=8, few_ranks=2),
)


@dataclass
class Row:
    """One ratio of the table: its area, the ratio and verdict (a report Target), and its per-repetition range."""

    area: str
    target: Target
    low: float | None = None
    high: float | None = None

    def document(self) -> dict[str, Any]:
        """The row for the JSON document."""
        sign = ">=" if self.target.higher_is_better else "<="
        return {
            "area": self.area,
            "ratio": self.target.name,
            "value": self.target.value,
            "min": self.low,
            "max": self.high,
            "target": f"{sign} {self.target.limit:g}",
            "met": self.target.met,
        }


def row(area: str, name: str, measured: dict[str, float], limit: float, higher_is_better: bool) -> Row:
    """A Row from a mode's {"value", "min", "max"} ratio."""
    return Row(area, Target(name, measured["value"], limit, higher_is_better), measured["min"], measured["max"])


def cache_rows(document: dict[str, Any]) -> list[Row]:
    """Item 1: the second `compute --all-steps` against the first; the run after one more step."""
    steps = document["steps"]
    return [
        row("cache", "second --all-steps / first, unchanged run", document["ratio_second_first"], cache.TARGET, False),
        row(
            "cache",
            f"one more step: (run - all cached) / (first / {steps})",
            document["ratio_new_step_extra_over_one_step"],
            cache.NEW_STEP_TARGET,
            False,
        ),
    ]


def writer_rows(document: dict[str, Any]) -> list[Row]:
    """Item 2: ShardWriter against plain h5py, background against synchronous `add`, for every session width."""
    return [
        row("writer", f"{name} ({result['cells']} cells)", result["ratios"][name], limit, sign == ">=")
        for result in document["results"]
        for name, (sign, limit) in writer.TARGETS.items()
    ]


def online_rows(document: dict[str, Any], target: float) -> list[Row]:
    """Item 3: `DistributedBPS.update` against one fused torch reduction (best of rounds: no range)."""
    ratios, (rows, cells) = document["ratio_to_fused_reduction"], document["batch"]
    return [
        Row("online", Target(f"update {call} / fused reduction ({rows}, {cells})", ratios[call], target, False))
        for call in ("with sample_idx", "without sample_idx")
    ]


def shards_rows(document: dict[str, Any], sizes: Sizes) -> list[Row]:
    """Item 4: in-memory bits_per_spike against the per-cell loop, compute against plain h5py reads, peak RSS;
    with the compiled kernel installed, the same with the numpy reference beside it."""
    ratios, rss = document["ratios"], document["peak_rss_mb"]
    peak = {"value": rss["bpseval"]["max"], "min": min(rss["bpseval"]["runs"]), "max": rss["bpseval"]["max"]}
    rss_limit = RSS_LIMITS_MB.get(sizes.shards_scale, RSS_LIMITS_MB["realistic"])
    name = f"in-memory bits_per_spike speed-up over the per-cell loop, {sizes.in_memory_cells} cells"
    rows = [
        row("kernel", name, ratios["in-memory: legacy/bpseval"], IN_MEMORY_SPEEDUP, True),
        row("kernel", "compute / plain h5py read, same shards", ratios["bpseval/read"], READ_LIMIT, False),
        row("kernel", "peak RSS of compute, MB", peak, rss_limit, False),
    ]
    if NUMPY_KERNEL_RUN in rss:  # bpseval[fast] installed: the numpy reference measured in the same run
        numpy_peak = rss[NUMPY_KERNEL_RUN]["max"]
        unchanged = {"value": peak["value"] / numpy_peak, "min": None, "max": None}
        rows += [
            row(
                "kernel",
                "the same speed-up, numpy kernel",
                ratios["in-memory: legacy/kernel (numpy)"],
                IN_MEMORY_SPEEDUP,
                True,
            ),
            row("kernel", "compute / read, numpy kernel", ratios[f"{NUMPY_KERNEL_RUN}/read"], READ_LIMIT, False),
            Row(
                "kernel",
                Target("peak RSS of compute, compiled / numpy kernel", unchanged["value"], RSS_UNCHANGED, False),
            ),
        ]
    return rows


def startup_rows(timings: dict[str, Any]) -> list[Row]:
    """Item 4: the compile cost is paid once per installation: a warm start costs a fraction of a cold one."""
    if not timings:
        return []
    warm, cold = timings["compiled, warm cache"], timings["compiled, cold cache"]
    measured = {"value": warm["median"] / cold["median"], "min": None, "max": None}
    return [row("kernel", "start-up, compiled kernel: warm cache / cold cache", measured, WARM_START, False)]


def parallel_rows(document: dict[str, Any]) -> list[Row]:
    """Item 5: `--jobs 2` against `--jobs 1` on many tiny datasets; many small shards against few large ones."""
    sizes, ratios = document["sizes"], document["ratios"]
    names = {
        "jobs2_over_jobs1": f"--jobs 2 / --jobs 1, {sizes['tiny_datasets']} tiny datasets",
        "many_over_few": f"{sizes['many_ranks']} shards / {sizes['few_ranks']} shards, same data",
    }
    return [row("parallel", names[key], ratios[key], limit, False) for key, limit in parallel.TARGETS.items()]


def measure(args: argparse.Namespace, sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    """Every area's measurement at `sizes`; returns the rows and each mode's own document."""
    from benchmarks import online  # imports torch, which the other modes do not need

    def scratch(name: str) -> Path | None:
        if args.data_dir is None:
            return None
        (args.data_dir / name).mkdir(parents=True, exist_ok=True)
        return args.data_dir / name

    documents: dict[str, Any] = {}
    print("== cache", flush=True)
    documents["cache"] = cache.main(sizes.cache, sizes.cache_steps, args.repeat, scratch("cache"))
    print("== writer", flush=True)
    documents["writer"] = writer.main(list(sizes.writer_cells), sizes.writer_samples, args.repeat, scratch("writer"))
    print("== online", flush=True)
    documents["online"] = online.main(args.repeat, sizes.online_calls)
    print("== shards", flush=True)
    options = {"measure": SHARDS_MEASURE, "in_memory_cells": sizes.in_memory_cells, "data_dir": scratch("shards")}
    documents["shards"] = shards.main(argparse.Namespace(**{**vars(args), **options}), sizes.shards_scale, sizes.shards)
    print("== kernel start-up", flush=True)
    documents["startup"] = {label: timing.summary() for label, timing in kernel_startup(args.repeat).items()}
    print("== parallel", flush=True)
    documents["parallel"] = parallel.main(args.repeat, scratch("parallel"), sizes.parallel)
    rows = [
        *cache_rows(documents["cache"]),
        *writer_rows(documents["writer"]),
        *online_rows(documents["online"], online.TARGET),
        *shards_rows(documents["shards"], sizes),
        *startup_rows(documents["startup"]),
        *parallel_rows(documents["parallel"]),
    ]
    return rows, documents


def print_table(rows: list[Row]) -> None:
    """The ratios side by side, each column as wide as its widest cell."""
    cells = [
        [
            entry["area"],
            entry["ratio"],
            f"{entry['value']:.3g}",
            "" if entry["min"] is None else f"[{entry['min']:.3g} - {entry['max']:.3g}]",
            entry["target"],
            "met" if entry["met"] else "NOT MET",
        ]
        for entry in (item.document() for item in rows)
    ]
    header = ["area", "ratio", "value", "[range]", "target", "verdict"]
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header))]
    for line in [header, *cells]:
        print(
            "  ".join(
                text.ljust(width) if column < 2 else text.rjust(width)
                for column, (text, width) in enumerate(zip(line, widths, strict=True))
            )
        )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """The `all` mode: measure every area, print the table, return the JSON document."""
    sizes = QUICK if args.quick else FULL
    measured = commit()
    load = MachineLoad()
    rows, documents = measure(args, sizes)
    machine_load = load.report()
    state = "dirty work tree" if measured["dirty"] else "clean"
    print(f"\nissue #17 ratios at {measured['sha']} ({state}); medians of {args.repeat} repetitions")
    if args.quick:
        print(QUICK_NOTE)
    print_table(rows)
    print_load(machine_load)
    met = sum(item.target.met for item in rows)
    print(f"{met} of {len(rows)} targets met")
    return {
        "mode": "all",
        "quick": args.quick,
        "note": QUICK_NOTE if args.quick else "",
        "commit": measured,
        "repeat": args.repeat,
        "sizes": asdict(sizes),
        "ratios": [item.document() for item in rows],
        "machine_load": machine_load,
        "environment": environment(),
        "modes": documents,
    }
