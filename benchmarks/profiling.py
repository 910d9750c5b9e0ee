"""The `profile` mode: `bpseval.evaluate(...).to_json()` under cProfile, time by part of the merge.

Not named profile.py: that would shadow the standard library's `profile`, which cProfile imports.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any

import bpseval
from benchmarks.data import Scale, default_data_dir, ensure_shards, shard_paths, warm_page_cache
from benchmarks.timing import MachineLoad, environment, print_load

PROFILE_GROUPS = (
    ("h5py reads of rhat, robs, dfs (DatasetReader.rows)", ("rows@shard/reader.py",)),
    ("batch_stats", ("batch_stats",)),
    (
        "dedup (reading sample_idx, begin, filter)",
        ("sample_idx@shard/reader.py", "begin@run/dedup.py", "filter@run/dedup.py"),
    ),
    ("shard headers (read_headers, in forked children)", ("read_headers",)),
    ("identity checksum", ("dataset_identity",)),
    ("scoring (score_run)", ("score_run",)),
    ("JSON (to_json)", ("to_json",)),
)
"""Parts of the run and the functions ("name" or "name@path suffix") whose cumulative time is theirs."""


def cumulative_time(stats: pstats.Stats, key: str) -> float:
    """Cumulative seconds of the functions named `key` ("name" or "name@file")."""
    name, _, filename = key.partition("@")
    return sum(
        entry[3]
        for (path, _, function), entry in stats.stats.items()  # type: ignore[attr-defined]
        if function == name and (not filename or Path(path).as_posix().endswith(filename))
    )


def main(scale: Scale, data_dir: Path | None) -> dict[str, Any]:
    """Profile bpseval.evaluate plus Result.to_json in-process; print where the time goes and return the JSON."""
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
    document = {
        "mode": "profile",
        "total_s": total,
        "groups_s": groups,
        "environment": environment(),
        "machine_load": load.report(),
    }
    print_load(document["machine_load"])
    return document
