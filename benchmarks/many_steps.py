"""The `steps` mode: `compute --all-steps` on many small steps against merging one step that many times.

Every shard header is read once per command whatever the number of steps, so scoring S steps of
R ranks should cost about S merges of one step, not S scans of the whole directory. This mode
writes S steps x R ranks of small shards, times `evaluate_steps` on them (in-process), and times
`evaluate` on a run holding one such step; the target is all-steps <= 3 x S x one step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import bpseval
from bpseval.features.steps import evaluate_steps

CELLS, SAMPLES_PER_RANK = 20, 64


def write_steps(run: Path, steps: int, ranks: int) -> None:
    """`steps` validation passes of `ranks` ranks, each shard one small dataset with sample_idx."""
    rng = np.random.default_rng(0)
    for step in range(steps):
        for rank in range(ranks):
            rhat = rng.gamma(2.0, 0.5, size=(SAMPLES_PER_RANK, CELLS)).astype(np.float32)
            with bpseval.ShardWriter(run, rank, ranks, step=step) as writer:
                writer.add(
                    "d",
                    rhat,
                    rng.poisson(rhat).astype(np.float32),
                    sample_idx=np.arange(SAMPLES_PER_RANK) * ranks + rank,
                )


def main(steps: int, ranks: int, repeat: int) -> dict[str, Any]:
    """Time both and print the ratio; returns the JSON document."""
    with tempfile.TemporaryDirectory() as directory:
        many, one = Path(directory) / "many", Path(directory) / "one"
        write_steps(many, steps, ranks)
        write_steps(one, 1, ranks)
        all_steps, single = [], []
        for _ in range(repeat):
            started = time.perf_counter()
            scored = evaluate_steps(many)
            all_steps.append(time.perf_counter() - started)
            started = time.perf_counter()
            bpseval.evaluate(one)
            single.append(time.perf_counter() - started)
        assert len(scored.results) == steps
    all_median, single_median = statistics.median(all_steps), statistics.median(single)
    ratio = all_median / (steps * single_median)
    print(f"compute --all-steps, {steps} steps x {ranks} ranks: {all_median:.3f} s (median of {repeat})")
    print(f"one step of {ranks} ranks: {single_median * 1e3:.1f} ms; x {steps} = {steps * single_median:.3f} s")
    print(f"ratio all-steps / ({steps} x one step): {ratio:.2f} (target <= 3)")
    return {
        "steps": steps,
        "ranks": ranks,
        "repeat": repeat,
        "all_steps_seconds": all_steps,
        "one_step_seconds": single,
        "ratio": ratio,
        "target": 3.0,
        "met": ratio <= 3.0,
    }
