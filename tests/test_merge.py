"""Merging helpers: reading shard headers in parallel children, finding the first copy of every sample."""

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

from bpseval.run.dedup import first_copies
from tests.conftest import poisson_dataset, write_raw_shard

HANGS_HDF5 = Path(__file__).parent / "data" / "hangs_hdf5_global_heap.h5"


READ_HEADERS = """
import sys
from pathlib import Path
from bpseval.run.catalog import read_headers
headers = read_headers([Path(p) for p in sys.argv[2:]], timeout=2.0, jobs=int(sys.argv[1]))
for header in headers:
    print(getattr(header, "rank", None), str(header) if isinstance(header, Exception) else "")
"""


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_headers_come_back_in_order_with_a_hanging_file_reported_whatever_the_children(tmp_path, jobs):
    """Five shards with one on which libhdf5 loops forever in the middle: each child reads a share,
    the hanging file is reported after the timeout, and the files after it are still read.

    Run in a fresh interpreter, as `bpseval compute` runs."""
    paths = [
        write_raw_shard(tmp_path / f"rank-{rank:04d}.h5", {"d": poisson_dataset(rank)}, rank=rank, world_size=5)
        for rank in range(5)
    ]
    shutil.copy(HANGS_HDF5, paths[2])
    completed = subprocess.run(
        [sys.executable, "-c", READ_HEADERS, str(jobs), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["0", "1", "None", "3", "4"]
    assert f"{paths[2]}: reading its metadata did not finish within 2 s" in lines[2]


DENSE = st.lists(st.integers(0, 60), max_size=200)
SPARSE = st.lists(st.one_of(st.integers(0, 60), st.integers(2**40, 2**40 + 5)), max_size=200)


def reference_first_copies(values: list[int]) -> tuple[list[int], list[bool], list[bool]]:
    """The same answer by walking the values once in Python."""
    seen: set[int] = set()
    keep = []
    for value in values:
        keep.append(value not in seen)
        seen.add(value)
    repeated = [values.count(value) > 1 for value in values]
    return sorted(seen), keep, repeated


@settings(max_examples=200, deadline=None)
@given(st.one_of(DENSE, SPARSE))
def test_first_copies_matches_a_walk_over_the_values(values: list[int]) -> None:
    unique, keep, repeated = first_copies(np.asarray(values, dtype=np.int64))
    expected_unique, expected_keep, expected_repeated = reference_first_copies(values)
    assert unique.tolist() == expected_unique
    assert keep.tolist() == expected_keep
    assert repeated.tolist() == expected_repeated


def test_first_copies_sorts_sparse_values_without_a_table_of_their_span() -> None:
    values = np.array([2**62, 5, 2**62, 7, 5], dtype=np.int64)  # a counting table would need 2^62 entries
    unique, keep, repeated = first_copies(values)
    assert unique.tolist() == [5, 7, 2**62]
    assert keep.tolist() == [True, True, False, True, False]
    assert repeated.tolist() == [True, True, True, False, True]


def test_headers_are_read_in_forked_children_with_torch_loaded_too(tmp_path):
    """In-process callers (a training script, these tests) take the path `bpseval compute` takes:
    a hanging file is reported after the timeout, not waited on forever."""
    import torch  # noqa: F401 - loaded in this process, as in a training script

    from bpseval.run.catalog import read_headers

    good = write_raw_shard(tmp_path / "rank-0000.h5", {"d": poisson_dataset(0)}, world_size=2)
    hanging = tmp_path / "rank-0001.h5"
    shutil.copy(HANGS_HDF5, hanging)
    started = time.perf_counter()
    headers = read_headers([good, hanging], timeout=2.0)
    assert time.perf_counter() - started < 20
    assert headers[0].rank == 0 and "did not finish within 2 s" in str(headers[1])
