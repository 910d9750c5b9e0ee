"""A training process stand-in whose shard write fails: `python -m tests.writer_fault_process RUN MODE ELSEWHERE [bg]`.

MODE `add`: one batch larger than the free space; `close`: a batch that fits, then the disk is
filled by someone else before the `with` block ends; `rename`: the shard's final path cannot be
replaced (the test makes it a mount point). The error is caught as a training loop would, printed
as one JSON line, and the process goes on: it writes a shard to ELSEWHERE and prints "alive".
With a fourth argument `bg`, both writers use `background=True`.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import numpy as np

from bpseval import ShardWriter


def fill_disk(path: Path) -> None:
    """Write to `path` until the filesystem is full, as another process might."""
    with open(path, "wb", buffering=0) as handle:
        for block in (1 << 16, 1 << 12, 1 << 9):
            try:
                while True:
                    handle.write(bytes(block))
            except OSError as error:
                assert error.errno == errno.ENOSPC, error


def validation_pass(run_dir: str, mode: str, background: bool) -> None:
    rows = 40_000 if mode == "add" else 64  # 16 MB per array: more than the disk
    rng = np.random.default_rng(0)
    rhat = rng.gamma(2.0, 0.5, size=(rows, 100)).astype(np.float32)
    with ShardWriter(run_dir, 0, 1, background=background) as writer:
        writer.add("Allen_2022-04-13", rhat, rng.poisson(rhat).astype(np.float32), sample_idx=np.arange(rows))
        if mode == "close":
            fill_disk(Path(run_dir) / "filler")


if __name__ == "__main__":
    run, mode, elsewhere = sys.argv[1:4]
    background = sys.argv[4:] == ["bg"]
    try:
        validation_pass(run, mode, background)
        print(json.dumps({"error": None}), flush=True)
    except OSError as error:
        print(json.dumps({"error": type(error).__name__, "errno": error.errno, "message": str(error)}), flush=True)
    validation_pass(elsewhere, "after", background)  # training goes on, and the next shard is written normally
    print("alive", flush=True)
