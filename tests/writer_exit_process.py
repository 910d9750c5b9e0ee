"""A training script that leaves its ShardWriter open: `python -m tests.writer_exit_process RUN HOW [bg]`.

The writer is opened without a `with` block, and batches of several chunks are written. Then, by
HOW: `end` the script ends; `raise` an exception escapes; `exit` it calls sys.exit(7); `sigterm` it
installs a SIGTERM handler calling sys.exit(143), as jobs preempted by SLURM do, and writes batches
until the signal comes. It prints "ending" (or, for `sigterm`, "writing") before that point. With a
third argument `bg`, the writer uses `background=True`.
"""

from __future__ import annotations

import signal
import sys

import numpy as np

from bpseval import ShardWriter

CELLS, BATCH = 181, 256


def leave_open(run_dir: str, how: str, background: bool) -> None:
    rng = np.random.default_rng(0)
    rhat = rng.gamma(2.0, 0.5, size=(BATCH, CELLS)).astype(np.float32)
    robs = rng.poisson(rhat).astype(np.float32)
    dfs = (rng.random((BATCH, CELLS)) > 0.1).astype(np.float32)
    writer = ShardWriter(run_dir, 0, 1, background=background)
    writer.open()
    if how == "sigterm":
        signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(143))
    for number in range(40 if how != "sigterm" else 10**9):  # 40 batches: 28 chunks of rhat
        writer.add("Allen_2022-04-13", rhat, robs, dfs, sample_idx=np.arange(number * BATCH, (number + 1) * BATCH))
        if number == 20 and how == "sigterm":
            print("writing", flush=True)
    print("ending", flush=True)
    if how == "raise":
        raise RuntimeError("validation crashed")
    if how == "exit":
        sys.exit(7)


if __name__ == "__main__":
    run, how = sys.argv[1:3]
    leave_open(run, how, sys.argv[3:] == ["bg"])
