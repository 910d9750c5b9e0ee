"""The `parallel` mode: `--jobs` on many tiny datasets, and many small shards against few large ones.

(a) 3,000 tiny datasets (2 ranks, 40 samples x 6 cells each): `bpseval compute --no-cache` with
`--jobs 1` and `--jobs 2`. Target (issue #17): `--jobs 2` takes no longer than `--jobs 1`.

(b) The same data as 256 shards of ~1 MB and as 32 shards of ~8 MB: one step of 10 sessions of
64 cells and 32,768 - d samples (DistributedSampler rows, so up to 9 padding copies), dealt over
256 ranks or over 32 ranks. Ranks rather than steps, because a merge reads one step: 256 ranks is
the worst case of many small shards (every dataset is spread over every shard, each shard holds
128 rows per dataset). 32,768 rows fill whole 256 KiB HDF5 chunks on 32 ranks (1,024 rows of 64
float32 cells), so both runs hold the same bytes on disk, not just the same data. Target: 256
shards take at most 2x the time of 32.

These are the defaults of `Sizes`; the `all` mode's `--quick` passes smaller ones. Every run is a
subprocess with a warm page cache, repetitions interleaved, medians reported; the
CPU used by other processes meanwhile is recorded (the machine is shared).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.data import SEED, sampler_rows, synthetic_dataset
from benchmarks.processes import bpseval_command, compile_bytecode, run_child
from benchmarks.timing import MachineLoad, environment, print_load, spread
from bpseval import ShardWriter

TINY_SAMPLES, TINY_CELLS, TINY_RANKS = 40, 6, 2
SESSIONS, SESSION_CELLS = 10, 64
TARGETS = {"jobs2_over_jobs1": 1.0, "many_over_few": 2.0}


@dataclass(frozen=True)
class Sizes:
    """How many tiny datasets; the samples per session; the ranks of the many-shards and few-shards runs."""

    tiny_datasets: int = 3000
    session_samples: int = 32_768
    many_ranks: int = 256
    few_ranks: int = 32


def write_tiny(run: Path, datasets: int) -> None:
    """`datasets` datasets of TINY_SAMPLES (+ d mod ranks) samples x TINY_CELLS cells on TINY_RANKS ranks."""
    writers = [ShardWriter(run, rank, TINY_RANKS) for rank in range(TINY_RANKS)]
    for writer in writers:
        writer.open()
    for index in range(datasets):
        samples = TINY_SAMPLES + index % TINY_RANKS
        rhat, robs, dfs = synthetic_dataset(TINY_CELLS, samples, SEED + index)
        for rank, writer in enumerate(writers):
            rows = sampler_rows(samples, TINY_RANKS, rank)
            writer.add(f"tiny-{index:04d}", rhat[rows], robs[rows], dfs[rows], sample_idx=rows)
    for writer in writers:
        writer.close()


def write_sessions(run: Path, ranks: int, samples: int) -> None:
    """SESSIONS sessions of SESSION_CELLS cells and `samples` - d samples dealt over `ranks` ranks, one shard each."""
    data = [synthetic_dataset(SESSION_CELLS, samples - index, SEED + index) for index in range(SESSIONS)]
    for rank in range(ranks):
        with ShardWriter(run, rank, ranks) as writer:
            for index, (rhat, robs, dfs) in enumerate(data):
                rows = sampler_rows(len(rhat), ranks, rank)
                writer.add(f"session-{index}", rhat[rows], robs[rows], dfs[rows], sample_idx=rows)


def timed_compute(run: Path, *options: str) -> float:
    """Seconds of one `bpseval compute RUN --no-cache --json /dev/null` subprocess (it must succeed)."""
    child = run_child(bpseval_command("compute", str(run), "--no-cache", "--json", "/dev/null", *options))
    if child.returncode != 0:
        raise SystemExit(f"bpseval compute {' '.join(options)} failed:\n{child.stderr}")
    return child.seconds


def shard_bytes(run: Path) -> tuple[int, int]:
    """Number of shards below `run` and their total size."""
    paths = list(run.rglob("*.h5"))
    return len(paths), sum(path.stat().st_size for path in paths)


def main(repeat: int, data_dir: Path | None, sizes: Sizes = Sizes()) -> dict[str, Any]:
    """Write the three runs of `sizes`, time them `repeat` times (interleaved) and return the JSON document."""
    compile_bytecode()
    base = Path(data_dir or tempfile.mkdtemp(prefix="bpseval-parallel-bench-"))
    many, few = sizes.many_ranks, sizes.few_ranks
    runs = {"tiny": base / "tiny", "many": base / f"ranks-{many}", "few": base / f"ranks-{few}"}
    for run in runs.values():
        shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    write_tiny(runs["tiny"], sizes.tiny_datasets)
    write_sessions(runs["many"], many, sizes.session_samples)
    write_sessions(runs["few"], few, sizes.session_samples)
    written = {name: shard_bytes(run) for name, run in runs.items()}
    print(
        f"written in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{name} {count} shards {size / 1e6:.1f} MB" for name, (count, size) in written.items())
    )
    cases = {
        "tiny --jobs 1": (runs["tiny"], ("--jobs", "1")),
        "tiny --jobs 2": (runs["tiny"], ("--jobs", "2")),
        f"{many} shards": (runs["many"], ()),
        f"{few} shards": (runs["few"], ()),
        f"{many} shards --jobs 2": (runs["many"], ("--jobs", "2")),
        f"{few} shards --jobs 2": (runs["few"], ("--jobs", "2")),
    }
    for run, options in cases.values():  # warm the page cache and the bytecode
        timed_compute(run, *options)
    times: dict[str, list[float]] = {name: [] for name in cases}
    load = MachineLoad()
    for _ in range(repeat):
        for name, (run, options) in cases.items():
            times[name].append(timed_compute(run, *options))
    other = load.report()
    if data_dir is None:
        shutil.rmtree(base)
    seconds = {name: spread(values) for name, values in times.items()}

    def ratio(top: str, bottom: str) -> dict[str, float]:
        paired = [a / b for a, b in zip(times[top], times[bottom], strict=True)]
        return {"value": seconds[top]["median"] / seconds[bottom]["median"], "min": min(paired), "max": max(paired)}

    ratios = {
        "jobs2_over_jobs1": ratio("tiny --jobs 2", "tiny --jobs 1"),
        "many_over_few": ratio(f"{many} shards", f"{few} shards"),
        "many_over_few_jobs2": ratio(f"{many} shards --jobs 2", f"{few} shards --jobs 2"),
    }
    for name, timing in seconds.items():
        print(f"{name:>24}: median {timing['median']:.2f} s (min {timing['min']:.2f}, max {timing['max']:.2f})")
    for name, value in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"; target <= {target}: {'met' if value['value'] <= target else 'NOT met'}"
        print(f"{name}: {value['value']:.2f} (paired {value['min']:.2f}-{value['max']:.2f}){verdict}")
    print_load(other)
    return {
        "repeat": repeat,
        "sizes": asdict(sizes),
        "data": {name: {"shards": count, "bytes": size} for name, (count, size) in written.items()},
        "seconds": seconds,
        "ratios": ratios,
        "targets": TARGETS,
        "met": {name: ratios[name]["value"] <= target for name, target in TARGETS.items()},
        "machine_load": other,
        "environment": environment(),
    }
