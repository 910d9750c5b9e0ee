"""A shard writer run as its own process by the reliability tests: `python -m tests.writer_process RUN RANK WORLD STEP PAUSE`.

It prints "writing" once its temporary file is open, then writes 20 batches, pausing between them.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bpseval import ShardWriter

ROWS, CELLS, BATCH = 400, 30, 20


def write_rank(run_dir: str, rank: int, world_size: int, step: int, pause: float = 0.0, announce: bool = False) -> None:
    """The same data for a given rank every time, so a re-run reproduces the shard exactly."""
    rng = np.random.default_rng(rank)
    rhat = rng.gamma(2.0, 0.5, size=(ROWS, CELLS)).astype(np.float32)
    robs = rng.poisson(rhat).astype(np.float32)
    with ShardWriter(run_dir, rank, world_size, step=step) as writer:
        writer.open()
        if announce:
            print("writing", flush=True)
        for start in range(0, ROWS, BATCH):
            rows = np.arange(start, start + BATCH)
            writer.add("Allen_2022-04-13", rhat[rows], robs[rows], sample_idx=rows * world_size + rank)
            time.sleep(pause)


if __name__ == "__main__":
    run, rank, world, step, pause = sys.argv[1:6]
    write_rank(run, int(rank), int(world), int(step), float(pause), announce=True)
