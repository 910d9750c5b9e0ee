"""Merging helpers: reading shard headers in parallel children, finding the first copy of every sample as the
shards are read."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpseval.kernel.cellstats import CellStats
from bpseval.kernel.stats import add_by_block, as_weights, batch_stats
from bpseval.run.headers import SHARDS_PER_CHILD
from bpseval.run.merge import dataset_identity, merge_run, sample_blocks
from tests.conftest import poisson_dataset, write_raw_shard

HANGS_HDF5 = Path(__file__).parent / "data" / "hangs_hdf5_global_heap.h5"


READ_HEADERS = """
import sys
from pathlib import Path
from bpseval.run.headers import read_headers
headers = read_headers([Path(p) for p in sys.argv[2:]], timeout=2.0, jobs=int(sys.argv[1]))
for header in headers:
    print(getattr(header, "rank", None), str(header) if isinstance(header, Exception) else "")
"""


def assert_headers_in_order_with_a_hang(tmp_path: Path, count: int, hanging: int, jobs: int) -> None:
    """`count` shards, the one at `hanging` a file on which libhdf5 loops forever, read by `read_headers` in a
    fresh interpreter (as `bpseval compute` runs): every header in order, the hanging file reported after the
    timeout, the files after it still read."""
    paths = [
        write_raw_shard(
            tmp_path / f"rank-{rank:04d}.h5", {"d": poisson_dataset(rank, n_rows=4)}, rank=rank, world_size=count
        )
        for rank in range(count)
    ]
    shutil.copy(HANGS_HDF5, paths[hanging])
    completed = subprocess.run(
        [sys.executable, "-c", READ_HEADERS, str(jobs), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == [str(r) if r != hanging else "None" for r in range(count)]
    assert f"{paths[hanging]}: reading its metadata did not finish within 2 s" in lines[hanging]


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_headers_come_back_in_order_with_a_hanging_file_reported_whatever_the_children(tmp_path, jobs):
    """Five shards, the middle one hanging: each child reads a share."""
    assert_headers_in_order_with_a_hang(tmp_path, 5, 2, jobs)


def test_many_shards_are_read_by_several_children_with_a_hang_in_any_share(tmp_path):
    """2 x SHARDS_PER_CHILD + 3 shards with jobs=1 (one child per SHARDS_PER_CHILD shards on a machine with
    several CPUs), received from every child at once, a hanging file in the last share."""
    count = 2 * SHARDS_PER_CHILD + 3
    assert_headers_in_order_with_a_hang(tmp_path, count, count - 2, 1)


RANK_VALUES = st.lists(st.one_of(st.integers(0, 12), st.integers(2**40, 2**40 + 2)), max_size=9)


@settings(max_examples=60, deadline=None)
@given(st.lists(RANK_VALUES, min_size=1, max_size=4), st.sampled_from([None, 3]))
def test_duplicates_found_while_streaming_keep_the_first_copy_in_rank_order_bit_for_bit(
    tmp_path_factory, ranks: list[list[int]], blocks: int | None
) -> None:
    """Ranks whose sample_idx overlap in any pattern (repeats within a rank, across ranks, sparse values,
    ranks without rows): each rank's statistics are those of its rows that no earlier rank (or earlier row)
    holds, to the last bit; with blocks (sample_idx read before the rows) too."""
    run = tmp_path_factory.mktemp("run")
    cells = 3
    by_value: dict[int, dict[str, np.ndarray]] = {}
    for value in sorted({value for values in ranks for value in values}):
        rng = np.random.default_rng(value % 1000 + len(by_value))
        rhat = rng.gamma(2.0, 0.5, size=(1, cells)).astype(np.float32)
        dfs = (rng.random((1, cells)) > 0.2).astype(np.float32)
        by_value[value] = {"rhat": rhat, "robs": rng.poisson(rhat).astype(np.float32), "dfs": dfs}
    for rank, values in enumerate(ranks):
        arrays = {
            key: np.concatenate([by_value[value][key] for value in values] + [np.zeros((0, cells), np.float32)])
            for key in ("rhat", "robs", "dfs")
        }
        write_raw_shard(
            run / f"rank-{rank:04d}.h5",
            {"d": {**arrays, "sample_idx": np.asarray(values, dtype=np.int64)}},
            rank=rank,
            world_size=len(ranks),
        )
    merged = merge_run(run, blocks=blocks).datasets[0]
    unique = np.array(sorted({value for values in ranks for value in values}), dtype=np.int64)
    per_block = CellStats.zeros((blocks, cells)) if blocks else None
    seen: set[int] = set()
    for rank, values in enumerate(ranks):
        kept = []
        for value in values:
            if value not in seen:
                kept.append(value)
            seen.add(value)
        expected = CellStats.zeros(cells)
        if kept:
            rhat, robs, dfs = (
                np.concatenate([by_value[value][key] for value in kept]) for key in ("rhat", "robs", "dfs")
            )
            weights = as_weights(dfs, *rhat.shape)
            if per_block is None:
                expected = batch_stats(rhat, robs, weights, "rate")
            else:  # as the merge adds a chunk with blocks: its total comes with the blocks
                block_ids = sample_blocks(unique, np.asarray(kept, dtype=np.int64), blocks)
                per_block, expected = add_by_block(per_block, block_ids, rhat, robs, weights, "rate")
        for key, value in expected.fields().items():
            assert np.array_equal(getattr(merged.per_rank[rank], key), value, equal_nan=True), (rank, key)
    if per_block is not None:
        for key, value in per_block.fields().items():
            assert np.array_equal(getattr(merged.per_block, key), value, equal_nan=True), key
    total_rows = sum(len(values) for values in ranks)
    assert (merged.samples, merged.duplicates_dropped) == (len(seen), total_rows - len(seen))
    assert merged.identity == dataset_identity("d", np.arange(cells), unique, 0)
    assert merged.warnings == []


def test_headers_are_read_in_forked_children_with_torch_loaded_too(tmp_path):
    """In-process callers (a training script, these tests) take the path `bpseval compute` takes:
    a hanging file is reported after the timeout, not waited on forever."""
    import torch  # noqa: F401 - loaded in this process, as in a training script

    from bpseval.run.headers import read_headers

    good = write_raw_shard(tmp_path / "rank-0000.h5", {"d": poisson_dataset(0)}, world_size=2)
    hanging = tmp_path / "rank-0001.h5"
    shutil.copy(HANGS_HDF5, hanging)
    started = time.perf_counter()
    headers = read_headers([good, hanging], timeout=2.0)
    assert time.perf_counter() - started < 20
    assert headers[0].rank == 0 and "did not finish within 2 s" in str(headers[1])
