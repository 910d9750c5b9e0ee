"""Timings, their ratios, the load other processes put on the machine, and the environment measured."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import bpseval

REPO = Path(__file__).resolve().parents[1]


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
        return {
            "median": self.median,
            "min": min(self.times),
            "max": max(self.times),
            "times": self.times,
            "note": self.note,
            "bytes": self.bytes,
        }


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


def spread(values: list[float]) -> dict[str, Any] | None:
    """Median, min, max and the values themselves (None when nothing was measured)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


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
    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def print_load(load: dict[str, float]) -> None:
    """One line on how busy the rest of the machine was during the run."""
    print(
        f"other processes used {load['foreign_cpus']:.2f} CPUs on average during the {load['wall_s']:.0f} s run"
        f" (steal {load['steal_cpus']:.2f}); above ~0.1 the timings are disturbed"
    )


def git(*args: str) -> str:
    """The output of `git ARGS` in this checkout (empty when git fails)."""
    result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def commit() -> dict[str, Any]:
    """The commit measured: HEAD in full, and whether the work tree differs from it (untracked files included)."""
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def environment() -> dict[str, Any]:
    """Machine, library versions and the bpseval checkout measured (a hash of every bpseval/**/*.py)."""
    source = hashlib.sha256()
    package = Path(bpseval.__file__).parent
    for path in sorted(package.rglob("*.py")):
        source.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
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
