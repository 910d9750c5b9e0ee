"""The memory a ShardWriter holds per dataset: `python -m tests.writer_memory_process RUN DATASETS ROWS [bg]`.

DATASETS sessions of ROWS rows of 180 cells (float32 rhat, robs, dfs; int64 sample_idx), written one
after the other in batches of 256 rows, as Lightning runs its validation loaders. Prints one JSON
line: the resident memory (VmRSS) before the sessions, the peak (VmHWM) after them, and before the
shard is closed; from /proc/self/status (Linux).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from bpseval import ShardWriter

CELLS, BATCH = 180, 256


def memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found


def write_sessions(run_dir: str, datasets: int, rows: int, background: bool) -> dict[str, int]:
    rng = np.random.default_rng(0)
    rhat = rng.gamma(2.0, 0.05, size=(BATCH, CELLS)).astype(np.float32)
    robs = rng.poisson(rhat).astype(np.float32)
    dfs = (rng.random((BATCH, CELLS)) > 0.1).astype(np.float32)
    index = np.arange(rows)
    with ShardWriter(run_dir, 0, 1, background=background) as writer:
        writer.add("warm-up", rhat, robs, dfs, sample_idx=index[:BATCH])  # h5py and the file set up
        before = memory()["VmRSS"]
        for dataset in range(datasets):
            for start in range(0, rows, BATCH):
                stop = min(rows, start + BATCH)
                n = stop - start
                writer.add(f"session_{dataset:02d}", rhat[:n], robs[:n], dfs[:n], sample_idx=index[start:stop])
        after = memory()
    return {"before": before, "peak": after["VmHWM"], "after": after["VmRSS"]}


if __name__ == "__main__":
    run, datasets, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(write_sessions(run, datasets, rows, sys.argv[4:] == ["bg"])), flush=True)
