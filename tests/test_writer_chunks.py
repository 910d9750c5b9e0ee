"""Small shards stay small, large arrays keep 256 KiB chunks, and every row is stored whatever the batch sizes.

ShardWriter stages each array's rows until they fill a chunk of about CHUNK_BYTES. An array that
never fills one is written at the end as one contiguous block of its own size; a larger one gets
row-aligned chunks of about CHUNK_BYTES (what the read benchmarks chose).

HDF5's own overhead, measured with this writer (h5py 3.16, HDF5 2.0, default file format): an
empty shard (root attributes, `/datasets`, a 40-character run_id) is 6.4 KiB; each dataset group
with rhat, robs, dfs, sample_idx, cell_ids and its attribute adds 2.3-2.7 KiB. The bound below
allows 8 KiB per file and 3 KiB per dataset.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpseval
from bpseval import ShardWriter
from bpseval.shard.format import CHUNK_BYTES
from tests.conftest import poisson_dataset

FILE_OVERHEAD = 8 * 1024
"""Bytes a shard may take beyond its data, once per file (measured: 6.4 KiB)."""
DATASET_OVERHEAD = 3 * 1024
"""Bytes a shard may take beyond its data, per dataset group (measured: 2.3-2.7 KiB)."""
RUN_ID = "x" * 40


def stored_bytes(path: Path) -> int:
    """Bytes of every array the shard holds (its data, without HDF5's structures)."""
    sizes: list[int] = []
    with h5py.File(path) as handle:
        handle.visititems(lambda _, item: sizes.append(item.nbytes) if isinstance(item, h5py.Dataset) else None)
    return sum(sizes)


def size_bound(path: Path, datasets: int) -> float:
    """What a shard of small arrays may take: 1.5x its data plus the fixed overheads."""
    return 1.5 * stored_bytes(path) + FILE_OVERHEAD + datasets * DATASET_OVERHEAD


def test_a_toy_shard_is_about_its_data_size(tmp_path):
    """Four sessions of 48 rows in three batches: 41 KB of data, once 4 MiB on disk (16 arrays x 256 KiB)."""
    with ShardWriter(tmp_path, 0, 1, run_id=RUN_ID) as writer:
        for start in range(0, 48, 16):
            for session, cells in enumerate((5, 12, 20, 31)):
                data = poisson_dataset(session, n_rows=16, n_cells=cells)
                writer.add(
                    f"session_{session}", **data, sample_idx=np.arange(start, start + 16), cell_ids=np.arange(cells)
                )
    size, data = writer.path.stat().st_size, stored_bytes(writer.path)
    assert 30_000 < data < 50_000
    assert size <= size_bound(writer.path, 4), (size, data)
    print(f"toy shard: {data} bytes of data, {size} bytes on disk")
    assert bpseval.evaluate(tmp_path).datasets["samples"].tolist() == [48, 48, 48, 48]


def test_hdf5_overhead_per_file_and_per_dataset_is_within_the_stated_bound(tmp_path):
    """The constants of the size bound are measured here: an empty shard, then one dataset more at a time."""
    sizes = []
    for datasets in range(3):
        with ShardWriter(tmp_path / str(datasets), 0, 1, run_id=RUN_ID) as writer:
            for index in range(datasets):
                data = poisson_dataset(index, n_rows=2, n_cells=3)
                writer.add(f"Allen_2022-04-13_{index}", **data, sample_idx=[0, 1], cell_ids=["a", "b", "c"])
        sizes.append(writer.path.stat().st_size - stored_bytes(writer.path))
    assert sizes[0] <= FILE_OVERHEAD
    assert 0 < sizes[1] - sizes[0] <= DATASET_OVERHEAD and 0 < sizes[2] - sizes[1] <= DATASET_OVERHEAD


@settings(max_examples=25, deadline=None)
@given(
    sessions=st.lists(
        st.tuples(
            st.integers(0, 40),  # cells
            st.lists(st.integers(0, 50), min_size=1, max_size=4),  # rows per batch
            st.sampled_from([np.float16, np.float32, np.float64]),
            st.sampled_from(["cells", "column", "none"]),  # dfs
            st.booleans(),  # sample_idx
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_shards_of_small_arrays_stay_within_the_bound_and_hold_every_row(sessions):
    expected: dict[str, dict[str, list[np.ndarray]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, 0, 1, run_id=RUN_ID) as writer:
            for index, (cells, batches, dtype, dfs_kind, with_index) in enumerate(sessions):
                name, seen = f"d{index}", expected.setdefault(f"d{index}", {})
                rng = np.random.default_rng(index)
                for start, rows in zip(np.cumsum([0, *batches]), batches, strict=False):
                    arrays = {"rhat": rng.random((rows, cells)).astype(dtype), "robs": rng.poisson(1.0, (rows, cells))}
                    if dfs_kind != "none":
                        arrays["dfs"] = rng.random((rows, cells if dfs_kind == "cells" else 1))
                    if with_index:
                        arrays["sample_idx"] = np.arange(start, start + rows)
                    writer.add(name, **arrays)
                    for key, array in arrays.items():
                        seen.setdefault(key, []).append(array)
        assert writer.path.stat().st_size <= size_bound(writer.path, len(sessions))
        with h5py.File(writer.path) as handle:
            for name, arrays in expected.items():
                group = handle["datasets"][name]
                assert sorted(group) == sorted(arrays)
                for key, batches in arrays.items():
                    assert group[key].chunks is None  # every array here is smaller than one chunk
                    np.testing.assert_array_equal(group[key][()], np.concatenate(batches))


@pytest.mark.parametrize(
    ("cells", "rows", "dtype"), [(23, 3000, np.float32), (181, 1000, np.float32), (2, 40_000, np.int64)]
)
def test_large_arrays_keep_chunks_of_about_256_kib(tmp_path, cells, rows, dtype):
    rng = np.random.default_rng(0)
    rhat = rng.random((rows, cells)).astype(dtype) if dtype != np.int64 else rng.integers(0, 9, (rows, cells))
    with ShardWriter(tmp_path, 0, 1) as writer:
        for start in range(0, rows, 256):
            batch = slice(start, start + 256)
            writer.add("d", rhat[batch], rhat[batch], sample_idx=np.arange(rows)[batch])
    row_bytes = cells * np.dtype(dtype).itemsize
    with h5py.File(writer.path) as handle:
        group = handle["datasets/d"]
        assert group["rhat"].chunks == group["robs"].chunks == (CHUNK_BYTES // row_bytes, cells)
        assert group["sample_idx"].chunks == ((CHUNK_BYTES // 8,) if rows * 8 >= CHUNK_BYTES else None)
        np.testing.assert_array_equal(group["rhat"][()], rhat)
        np.testing.assert_array_equal(group["sample_idx"][()], np.arange(rows))


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.integers(0, 40), min_size=1, max_size=12), with_cells=st.booleans())
def test_rows_crossing_chunk_boundaries_are_stored_in_order(batches, with_cells):
    """Rows of 32 KiB make chunks of 8 rows: batches of 0 to 40 rows fill, cross and skip whole chunks."""
    cells = CHUNK_BYTES // 8 // 4 if with_cells else 0
    rng = np.random.default_rng(len(batches))
    given_rows = [rng.random((rows, cells), dtype=np.float32) for rows in batches]
    expected = np.concatenate(given_rows)
    with tempfile.TemporaryDirectory() as tmp, ShardWriter(tmp, 0, 1) as writer:
        for rows in given_rows:
            writer.add("wide", rows, rows, dfs=np.ones((len(rows), 1)))
            rows[:] = -1.0  # the caller reuses its buffer: what was given is what is stored
        writer.close()
        with h5py.File(writer.path) as handle:
            stored = handle["datasets/wide/rhat"]
            if with_cells and len(expected) >= 8:
                assert stored.chunks == (8, cells)
            np.testing.assert_array_equal(stored[()], expected)
            assert handle["datasets/wide/dfs"].shape == (len(expected), 1)
