"""Memory follows the samples seen, not the largest sample index nor the replication of the validation set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import bpseval
from bpseval.torch import DistributedBPS
from tests.conftest import peak_bytes
from tests.gloo import run_gloo

HUGE_INDEX = 2 * 10**9
PEAK_BYTES = 8 << 20
"""A few MB: a bitmap up to index 2·10^9 would take 250 MB."""


def test_stats_only_writer_with_two_samples_of_index_2e9_uses_a_few_mb(tmp_path) -> None:
    def write() -> None:
        with bpseval.ShardWriter(tmp_path, 0, 1, store="stats") as writer:
            writer.add("d", np.ones((2, 3)), np.ones((2, 3)), sample_idx=np.array([HUGE_INDEX, HUGE_INDEX + 1]))
            writer.add("d", np.ones((1, 3)), np.ones((1, 3)), sample_idx=np.array([HUGE_INDEX]))  # a repeat

    assert peak_bytes(write) < PEAK_BYTES
    assert bpseval.evaluate(tmp_path).datasets[["samples", "duplicates_dropped"]].values.tolist() == [[2, 1]]


def _online_huge_indices(rank: int, world_size: int) -> None:
    rhat = torch.ones(2, 3)
    warm_up = DistributedBPS()  # imports and first-call caches are not what is measured
    warm_up.update("d", rhat, torch.ones(2, 3), sample_idx=torch.tensor([0, 1 + rank]))
    warm_up.compute().datasets  # noqa: B018 - builds the frames once: importing pandas is not what is measured
    metric = DistributedBPS()

    def update_and_compute() -> None:
        index = torch.tensor([HUGE_INDEX, HUGE_INDEX + 1 + rank])  # HUGE_INDEX on both ranks: one duplicate
        metric.update("d", rhat, torch.ones(2, 3), sample_idx=index)
        result = metric.compute()
        assert result.datasets[["samples", "duplicates_dropped"]].values.tolist() == [[3, 1]]

    peak = peak_bytes(update_and_compute)
    assert peak < PEAK_BYTES, f"rank {rank}: peak {peak} bytes"


def test_online_metric_with_two_samples_of_index_2e9_uses_a_few_mb_in_a_2_process_run() -> None:
    run_gloo(_online_huge_indices, 2)


MERGE = """
import re, sys
from pathlib import Path
import bpseval
result = bpseval.evaluate(sys.argv[1])
print(result.datasets[["samples", "duplicates_dropped"]].values.tolist())
# VmHWM is this program's own peak: ru_maxrss would also count the (large) test process it was forked from
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024)
"""


def test_offline_dedup_of_a_fully_replicated_validation_set_stays_under_400_mb(tmp_path) -> None:
    """Both ranks saw all 100,000 samples × 400 cells: every row of rank 1 is a copy to check."""
    n_rows, n_cells = 100_000, 400
    for rank in range(2):
        with bpseval.ShardWriter(tmp_path, rank, 2) as writer:
            for start in range(0, n_rows, 5000):
                rows = np.arange(start, start + 5000)
                batch = np.random.default_rng(start)
                rhat = batch.gamma(2.0, 0.5, size=(5000, n_cells)).astype(np.float16)
                writer.add("d", rhat, batch.poisson(rhat.astype(np.float32)).astype(np.uint8), sample_idx=rows)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", MERGE, str(tmp_path)], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    counts, peak_mb = out.stdout.strip().split("\n")
    assert counts == f"[[{n_rows}, {n_rows}]]"
    assert float(peak_mb) < 400, peak_mb
