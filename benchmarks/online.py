"""The `online` mode: the cost of `DistributedBPS.update` on the CPU against one fused torch reduction of the same sums.

    python benchmarks/run.py online [--repeat 5] [--json benchmarks/results/online.json]

One (256, 300) float32 batch (rates, Poisson counts, a 0/1 mask), the issue's size. The floor
is the least torch code that yields the 13 float64 statistics `update` keeps (the sums of
`CellStats`, its centred moments and its extremes over valid entries): casts, the clamp, two logs,
one reduction of the stacked sums, one of the stacked centred products, and four min/max.
`update` is timed as a training loop calls it: with host sample indices (deduplication and the
held-back window), without them, and with `validate="eager"`. With one torch thread everything
runs on the calling thread, so the CPU time of that thread is timed (`time.thread_time`): other
processes on a shared machine then barely move the numbers, as wall time would. Every timing is
the best of interleaved rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.timing import environment
from bpseval.kernel.stats import MIN_RATE
from bpseval.torch import DistributedBPS

ROWS, CELLS = 256, 300
TARGET = 2.0
"""The issue's bound: `update` costs at most this many times the fused reduction."""


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rhat, robs, dfs of one validation batch, float32 on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    rhat = torch.rand(ROWS, CELLS, generator=generator) * 2 + 0.01
    robs = torch.poisson(rhat, generator=generator)
    dfs = (torch.rand(ROWS, CELLS, generator=generator) > 0.1).float()
    return rhat, robs, dfs


def fused_reduction(rhat: torch.Tensor, robs: torch.Tensor, dfs: torch.Tensor) -> torch.Tensor:
    """The floor: the 13 per-cell statistics `update` keeps, in float64, from as few reductions as torch allows.

    The sums in one stacked reduction, the centred moments around this batch's means in a second, and
    the extremes over valid entries; no validation, no bookkeeping.
    """
    w, r = dfs.double(), robs.double()
    rate = rhat.double().clamp_min(MIN_RATE)
    valid = w > 0
    log_counts = torch.where(r > 0, r, torch.ones_like(r)).log()
    sums = torch.stack([valid.double(), w, w * r, w * (r * rate.log() - rate), w * r * log_counts, w * rate]).sum(dim=1)
    weight = sums[1].clamp_min(torch.finfo(torch.float64).tiny)
    rate_step, count_step = rate - sums[5] / weight, r - sums[2] / weight
    moments = torch.stack([w * rate_step * rate_step, w * count_step * count_step, w * rate_step * count_step]).sum(
        dim=1
    )
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    extremes = torch.stack(
        [
            torch.where(valid, rate, inf).amin(dim=0),
            torch.where(valid, r, inf).amin(dim=0),
            torch.where(valid, rate, -inf).amax(dim=0),
            torch.where(valid, r, -inf).amax(dim=0),
        ]
    )
    return torch.cat([sums, moments, extremes])


def updates(rhat: torch.Tensor, robs: torch.Tensor, dfs: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """`update` as a loop calls it, each call with new sample indices (so none is skipped as a repeat)."""
    calls = {
        "with sample_idx": DistributedBPS(),
        "without sample_idx": DistributedBPS(),
        "validate='eager'": DistributedBPS(validate="eager"),
    }
    counter = iter(range(1 << 40))

    def call(name: str, metric: DistributedBPS) -> Callable[[], None]:
        def run() -> None:
            index = None if name == "without sample_idx" else np.arange(ROWS) + ROWS * next(counter)
            metric.update("session", rhat, robs, dfs, sample_idx=index)

        return run

    return {name: call(name, metric) for name, metric in calls.items()}


def best_times(functions: dict[str, Callable[[], Any]], rounds: int, number: int) -> dict[str, float]:
    """CPU seconds of this thread per call of each function: best of `rounds` interleaved rounds of `number` calls."""
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.thread_time()
            for _ in range(number):
                function()
            best[name] = min(best[name], (time.thread_time() - start) / number)
    return best


def measure(repeat: int = 5, number: int = 20) -> dict[str, Any]:
    """Times of the floor and of `update` (1 torch thread), their ratios and whether the target is met."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rhat, robs, dfs = batch()
        functions = {"fused reduction": lambda: fused_reduction(rhat, robs, dfs), **updates(rhat, robs, dfs)}
        best_times(functions, 1, 3)  # warm-up: allocator, dispatch caches
        times = best_times(functions, 10 * repeat, number)
    finally:
        torch.set_num_threads(threads)
    floor = times["fused reduction"]
    ratios = {name: seconds / floor for name, seconds in times.items() if name != "fused reduction"}
    return {
        "batch": [ROWS, CELLS],
        "torch_threads": 1,
        "clock": "time.thread_time (CPU time of the calling thread)",
        "times_us": {name: round(seconds * 1e6, 1) for name, seconds in times.items()},
        "ratio_to_fused_reduction": {name: round(ratio, 2) for name, ratio in ratios.items()},
        "target": f"update (default validation) <= {TARGET}x the fused reduction",
        "target_met": max(ratios["with sample_idx"], ratios["without sample_idx"]) <= TARGET,
    }


def main(repeat: int, number: int = 20) -> dict[str, Any]:
    """The `online` mode: measure (`number` calls per round), print a short table, return the JSON document."""
    document = {**measure(repeat, number), "environment": environment()}
    for name, micros in document["times_us"].items():
        ratio = document["ratio_to_fused_reduction"].get(name)
        print(f"{name:20s} {micros:8.1f} us" + ("" if ratio is None else f"   {ratio:.2f}x the fused reduction"))
    print(f"target: {document['target']}: {'met' if document['target_met'] else 'NOT met'}")
    return document
