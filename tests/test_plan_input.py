"""`bpseval plan` input: masks that are not real numbers, shards, and absurd world sizes are refused with exit 2."""

from __future__ import annotations

import math
import time

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpseval import ShardWriter
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.features.planning import (
    MAX_WORLD_SIZE,
    check_cell_coverage,
    distributed_sampler_indices,
    load_masks,
)
from tests.conftest import poisson_dataset


def assert_refused(result, *words: str) -> None:
    """Exit 2, one `Error:` line on stderr holding every word, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error:") and "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (np.array([["1", "0"], ["0", "1"]]), ["holds text", "bool, int or float"]),
        (np.array([[1 + 1j, 0], [0, 1]]), ["holds complex numbers"]),
        (np.array([[{"valid": 1}, 0]], dtype=object), ["cannot be read as a .npy array of numbers", "np.save"]),
        (np.array([b"ab", b"cd"]), ["holds bytes"]),
    ],
    ids=["strings", "complex", "objects", "bytes"],
)
def test_npy_masks_that_are_not_real_numbers_exit_2(invoke, tmp_path, values, words):
    path = tmp_path / "masks.npy"
    np.save(path, values, allow_pickle=True)
    assert_refused(invoke("plan", path), str(path), *words)


def test_hdf5_masks_complex_or_without_real_numbers_exit_2(invoke, tmp_path):
    complex_file = tmp_path / "complex.h5"
    with h5py.File(complex_file, "w") as handle:
        handle["ok"] = np.ones((10, 2))
        handle["session/dfs"] = np.ones((10, 2), dtype=np.complex64)
    assert_refused(invoke("plan", complex_file), str(complex_file), "'session/dfs'", "complex numbers")
    text_file = tmp_path / "text.h5"
    with h5py.File(text_file, "w") as handle:
        handle["names"] = np.array(["a", "b"], dtype=h5py.string_dtype())
    assert_refused(invoke("plan", text_file), str(text_file), "no 1-D or 2-D array of real numbers")


def test_a_shard_given_to_plan_points_to_coverage(invoke, tmp_path):
    with ShardWriter(tmp_path / "run", 0, 1) as writer:
        writer.add("A", **poisson_dataset(0))
    shard = next((tmp_path / "run").rglob("*.h5"))
    assert_refused(invoke("plan", shard), str(shard), "is a bpseval shard", "bpseval coverage")
    with pytest.raises(BpsevalError, match="bpseval coverage"):
        load_masks(shard)


@pytest.mark.parametrize("world_size", [str(10**9), str(MAX_WORLD_SIZE + 1)])
def test_absurd_world_size_exits_2_at_once(invoke, tmp_path, world_size):
    np.save(tmp_path / "m.npy", np.ones((100, 2)))
    start = time.perf_counter()
    result = invoke("plan", tmp_path / "m.npy", "--world-size", world_size)
    assert time.perf_counter() - start < 5  # generous: it is refused before any work
    assert result.exit_code == 2 and "--world-size" in result.stderr and str(MAX_WORLD_SIZE) in result.stderr


def test_library_refuses_world_sizes_beyond_the_bound_and_non_real_masks():
    start = time.perf_counter()
    with pytest.raises(ArgumentError, match=f"--world-size 1000000000 is out of range.* and {MAX_WORLD_SIZE}"):
        check_cell_coverage(np.ones((100, 2)), world_size=10**9)
    assert time.perf_counter() - start < 1
    with pytest.raises(ArgumentError, match="--world-size 0 is out of range"):
        check_cell_coverage(np.ones((100, 2)), world_size=0)
    for values, kind in ((np.ones((4, 2), dtype=complex), "complex numbers"), (np.array(["1", "0"]), "text")):
        with pytest.raises(ArgumentError, match=f"real numbers .* not {kind}"):
            check_cell_coverage(values)


def test_the_largest_world_size_is_computed_quickly():
    mask = np.zeros((300, 2))
    mask[::7, 0] = 1
    start = time.perf_counter()
    frame = check_cell_coverage(mask, world_size=MAX_WORLD_SIZE, min_samples=1)
    assert time.perf_counter() - start < 10
    assert frame["n_valid"].tolist() == [43, 0] and frame.shape[1] == 2 + MAX_WORLD_SIZE + 2
    assert frame[[f"rank_{rank}" for rank in range(300)]].sum(axis=1).tolist() == [43, 0]


def naive_counts(mask: np.ndarray, world_size: int, fraction: float, batch_size: int, seed: int | None):
    """Per-rank counts and n_valid, rank by rank, from the indices each rank's DistributedSampler yields."""
    per_rank, seen = [], np.zeros(len(mask), dtype=bool)
    for rank in range(world_size):
        indices = distributed_sampler_indices(len(mask), world_size, rank, seed=seed)
        kept = indices[: int(math.ceil(len(indices) / batch_size) * fraction) * batch_size]
        per_rank.append(mask[kept].sum(axis=0))
        seen[kept] = True
    return np.array(per_rank), mask[seen].sum(axis=0)


@settings(max_examples=60, deadline=None)
@given(
    n_samples=st.integers(0, 60),
    world_size=st.integers(1, 70),
    batch_size=st.integers(1, 8),
    fraction=st.sampled_from([1.0, 0.5, 0.3]),
    seed=st.sampled_from([None, 0, 5]),
    data=st.data(),
)
def test_all_ranks_at_once_equal_rank_by_rank(n_samples, world_size, batch_size, fraction, seed, data):
    mask = np.array(
        data.draw(st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=n_samples, max_size=n_samples)),
        dtype=bool,
    ).reshape(n_samples, 3)
    n_batches = math.ceil(math.ceil(n_samples / world_size) / batch_size)
    if n_batches and int(n_batches * fraction) == 0:
        with pytest.raises(BpsevalError, match="keeps no batch"):
            check_cell_coverage(mask, world_size=world_size, fraction=fraction, batch_size=batch_size, seed=seed)
        return
    frame = check_cell_coverage(mask, world_size=world_size, fraction=fraction, batch_size=batch_size, seed=seed)
    per_rank, n_valid = naive_counts(mask, world_size, fraction, batch_size, seed)
    assert frame["n_valid"].tolist() == n_valid.tolist()
    assert frame[[f"rank_{rank}" for rank in range(world_size)]].to_numpy().T.tolist() == per_rank.tolist()
