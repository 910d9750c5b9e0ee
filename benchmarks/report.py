"""The shards benchmark's ratios, targets and printed report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from benchmarks.data import MIB
from benchmarks.timing import Timing, print_load, ratio

FLOOR = "numpy floor"
RSS_LIMITS_MB = {"realistic": 400.0, "large": 500.0}
"""Peak RSS of `bpseval compute` allowed at each scale."""
READ_LIMIT = 2.0
"""`bpseval compute` / plain h5py read of the same shards allowed at realistic scale."""
NUMPY_KERNEL_RUN = "bpseval (numpy kernel)"
"""`bpseval compute` with BPSEVAL_KERNEL=numpy, timed beside the default when the compiled kernel is installed."""


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


def compute_ratios(timings: dict[str, Timing], in_memory: dict[str, Timing]) -> dict[str, dict[str, float]]:
    """The headline ratios between measurements that were all taken."""
    ratios: dict[str, dict[str, float]] = {}
    floor = timings.get("read")
    if "bpseval" in timings and floor:
        ratios["bpseval/read"] = ratio(timings["bpseval"], [floor])
        for kernel in ("kernel", "kernel (numpy)", FLOOR):
            if kernel in timings:
                ratios[f"bpseval/(read+{kernel})"] = ratio(timings["bpseval"], [floor, timings[kernel]])
        if NUMPY_KERNEL_RUN in timings:
            ratios[f"{NUMPY_KERNEL_RUN}/read"] = ratio(timings[NUMPY_KERNEL_RUN], [floor])
    if "legacy" in timings and "bpseval" in timings:
        ratios["legacy/bpseval"] = ratio(timings["legacy"], [timings["bpseval"]])
    if "bpseval --jobs 2" in timings:
        one_job = timings.get("bpseval --jobs 1", timings["bpseval"])
        ratios["jobs1/jobs2"] = ratio(one_job, [timings["bpseval --jobs 2"]])
    if in_memory:
        ratios["in-memory: legacy/bpseval"] = ratio(in_memory["legacy"], [in_memory["bpseval"]])
        for kernel in (name for name in ("kernel", "kernel (numpy)", FLOOR) if name in in_memory):
            ratios[f"in-memory: bpseval/{kernel}"] = ratio(in_memory["bpseval"], [in_memory[kernel]])
        if "kernel (numpy)" in in_memory:
            ratios["in-memory: legacy/kernel (numpy)"] = ratio(in_memory["legacy"], [in_memory["kernel (numpy)"]])
    return ratios


def compute_targets(scale_name: str, ratios: dict[str, dict[str, float]], rss: dict[str, Any]) -> list[Target]:
    """The project's performance targets that this run can judge."""
    targets = []
    if scale_name == "realistic":
        for key, limit in ((f"bpseval/(read+{FLOOR})", 1.3), ("bpseval/read", READ_LIMIT)):
            if key in ratios:
                targets.append(Target(key, ratios[key]["value"], limit, False))
    rss_limit = RSS_LIMITS_MB.get(scale_name)
    if rss_limit and "bpseval" in rss:
        for label, values in rss.items():
            targets.append(Target(f"peak RSS MB ({label}, {scale_name})", values["max"], rss_limit, False))
    if "jobs1/jobs2" in ratios:
        targets.append(Target("jobs1/jobs2", ratios["jobs1/jobs2"]["value"], 1.6, True))
    if "in-memory: legacy/bpseval" in ratios:
        targets.append(Target("in-memory: legacy/bpseval", ratios["in-memory: legacy/bpseval"]["value"], 5.0, True))
        key = f"in-memory: bpseval/{FLOOR}"
        targets.append(Target(key, ratios[key]["value"], 1.5, False))
    return targets


def print_report(document: dict[str, Any], timings: dict[str, Timing], in_memory: dict[str, Timing]) -> None:
    """The results table, ratios, peak RSS and targets on stdout."""
    print()
    print(f"{'measurement':<26}{'median s':>10}{'min':>9}{'max':>9}{'MB/s':>8}  note")
    for prefix, group in (("", timings), ("in-memory: ", in_memory)):
        for timing in group.values():
            speed = f"{timing.bytes / MIB / timing.median:8.0f}" if timing.bytes else " " * 8
            print(
                f"{prefix + timing.name:<26}{timing.median:10.3f}{min(timing.times):9.3f}{max(timing.times):9.3f}"
                f"{speed}  {timing.note}"
            )
    print("\nratios (of medians; range of the per-repetition paired ratios)")
    for name, value in document["ratios"].items():
        print(f"  {name:<30}{value['value']:7.2f}   [{value['min']:.2f} - {value['max']:.2f}]")
    for label, values in document["peak_rss_mb"].items():
        pss = document["peak_tree_pss_mb"].get(label, math.nan)
        print(
            f"peak RSS {label}: {values['max']:.0f} MB (runs: {', '.join(f'{v:.0f}' for v in values['runs'])});"
            f" process tree PSS (sampled on one more run): {pss:.0f} MB"
        )
    for key, what in (("parallel_capacity", "CPU-bound"), ("parallel_read_capacity", "page-cache reading")):
        if document.get(key):
            capacity = document[key]
            print(
                f"machine parallel capacity, {what} (2 processes vs 1, a --jobs 2 ceiling): {capacity['median']:.2f}x"
                f" [{capacity['min']:.2f} - {capacity['max']:.2f}]"
            )
    print_load(document["machine_load"])
    for line in [*document["checks"], *document["notes"]]:
        print(line)
    env = document["environment"]
    modified = f" + uncommitted changes, source {env['bpseval_source_sha256']}" if env["bpseval_modified"] else ""
    print(
        f"bpseval {env['bpseval']} at {env['git_head']}{modified};"
        f" {env['cpus']} cpus, numpy {env['numpy']}, h5py {env['h5py']}, HDF5 {env['hdf5']}"
    )
    print("targets:")
    for target in document["targets"]:
        print(f"  {Target(**{k: v for k, v in target.items() if k != 'met'}).describe()}")
