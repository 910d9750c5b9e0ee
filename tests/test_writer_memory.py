"""The memory a training process spends on its ShardWriter: at most 2 MiB of RSS per dataset with 40 datasets.

HDF5 keeps no chunk cache for the shard (its default was 8 MiB per array, kept until the file was
closed: 17 MB per dataset), and each stage holds less than one chunk. A background writer adds its
queue (QUEUE_BYTES, for all datasets together) and the written chunks it keeps to stage into again.
Measured in a process of its own (`tests/writer_memory_process.py`); memory is a bound the README
states, not a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bpseval.shard._staging import SPARE_CHUNKS
from bpseval.shard._writer_thread import QUEUE_BYTES
from bpseval.shard.format import CHUNK_BYTES
from tests.test_writer_faults import REPO

MIB = 1 << 20
DATASETS, ROWS = 40, 2000
"""40 sessions of 2,000 rows of 180 cells: 5.5 chunks of each of rhat, robs and dfs per session."""
PER_DATASET = 2 * MIB


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_rss_per_dataset_is_at_most_2_mib_with_40_datasets(tmp_path, background):
    command = [sys.executable, "-m", "tests.writer_memory_process", str(tmp_path), str(DATASETS), str(ROWS)]
    process = subprocess.run(
        command + (["bg"] if background else []), cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    measured = json.loads(process.stdout)
    growth = measured["peak"] - measured["before"]
    bound = DATASETS * PER_DATASET + (QUEUE_BYTES + SPARE_CHUNKS * CHUNK_BYTES if background else 0)
    print(f"RSS growth: {growth / DATASETS / MIB:.2f} MiB per dataset ({growth / MIB:.0f} MiB in all)")
    assert growth <= bound, f"{growth / DATASETS / MIB:.2f} MiB per dataset"
