"""Child processes: `bpseval` commands with their wall time, peak RSS and process-tree PSS, and the
machine's capacity to run two processes at once."""

from __future__ import annotations

import compileall
import math
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import bpseval
from bpseval.run.merge import CHUNK_ELEMENTS
from bpseval.shard.format import DATASETS_GROUP

CPU_PROBE = "import numpy as np\nx = np.random.default_rng(0).random(1 << 14) + 0.5\nfor _ in range(20_000): np.log(x)"
"""A short CPU-bound, cache-resident numpy loop, for the machine's parallel capacity."""
READ_PROBE = (
    f"import sys, h5py\nfor path in sys.argv[1:]:\n    with h5py.File(path, 'r', locking=False) as handle:\n"
    f"        for group in handle['{DATASETS_GROUP}'].values():\n            for array in group.values():\n"
    f"                step = max(1, {CHUNK_ELEMENTS} // (array.shape[1] if array.ndim > 1 else 1))\n"
    "                for start in range(0, len(array), step): array[start : start + step]"
)
"""Every array of the shards in argv read in row chunks from the page cache: memory-bound work like the merge's."""
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


def compile_bytecode() -> None:
    """Write bpseval's bytecode as `pip install` does. A checkout run with PYTHONDONTWRITEBYTECODE
    set (common in containers) would otherwise compile every module at every start, time that an
    installed bpseval does not spend."""
    compileall.compile_dir(Path(bpseval.__file__).parent, quiet=1)


def bpseval_command(*args: str) -> list[str]:
    """The bpseval command line of this interpreter (the installed console script's entry point)."""
    return [sys.executable, "-c", "from bpseval.cli import main; main()", *args]


@dataclass
class ChildRun:
    """One child command: wall time, peak RSS, peak process-tree PSS and exit code."""

    seconds: float
    max_rss_mb: float
    returncode: int
    stderr: str
    tree_pss_mb: float = math.nan


def run_child(command: list[str], sample_tree: bool = False) -> ChildRun:
    """Run `command` through RSS_PROBE: its wall time and peak RSS (ru_maxrss from os.wait4).

    On Linux ru_maxrss is the largest RSS of the child or of any descendant it waited for (a
    maximum, not a sum). `sample_tree` also samples the summed PSS of the command's process tree,
    which costs CPU: use it on untimed runs only.
    """
    with tempfile.TemporaryFile() as errors, tempfile.NamedTemporaryFile("r") as report:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", RSS_PROBE, report.name, *command],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        sampler = TreeMemorySampler(process.pid) if sample_tree else None
        process.wait()
        tree_pss = sampler.stop() if sampler else math.nan
        errors.seek(0)
        text = errors.read().decode(errors="replace")
        max_rss_kb, seconds = report.read().split()
    return ChildRun(float(seconds), int(max_rss_kb) / 1024, process.returncode, text, tree_pss)


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
