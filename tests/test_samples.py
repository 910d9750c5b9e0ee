"""`SeenSamples`, the one set of sample indices: against a Python set (the online metric's use) and a dict of
first positions (the merge's), whatever the batches, their order, their repeats and the span of the indices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpseval.kernel.samples import TABLE_BYTES_PER_SAMPLE, TABLE_FLOOR, SeenSamples

DENSE = st.lists(st.integers(0, 5000), max_size=300)
"""Indices below TABLE_FLOOR and past it: the table, grown."""
SPARSE = st.lists(st.one_of(st.integers(0, 60), st.integers(2**40, 2**40 + 5), st.integers(2**62, 2**62 + 2)))
"""A few indices far apart: the sorted arrays, reached from the table when one comes."""
BATCHES = st.lists(st.one_of(DENSE, SPARSE), max_size=40)


@settings(max_examples=300, deadline=None)
@given(batches=BATCHES, probe=st.lists(st.one_of(st.integers(0, 5001), st.integers(2**40 - 1, 2**40 + 6))))
def test_the_set_holds_every_index_added_once_in_order(batches: list[list[int]], probe: list[int]) -> None:
    seen, expected = SeenSamples(), set()
    for batch in batches:
        index = np.array(batch, dtype=np.int64)
        new = seen.first_sightings(index)
        assert new.tolist() == [value not in expected and value not in batch[:row] for row, value in enumerate(batch)]
        assert seen.contains(index).tolist() == [value in expected for value in batch]
        seen.add(index)
        expected.update(batch)
        assert len(seen) == len(expected)
    queries = np.array(probe, dtype=np.int64)
    assert seen.contains(queries).tolist() == [value in expected for value in probe]
    assert seen.indices().tolist() == sorted(expected)
    assert SeenSamples.from_indices(seen.indices()).indices().tolist() == sorted(expected)
    assert SeenSamples.from_indices(seen.indices()).contains(queries).tolist() == [value in expected for value in probe]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(DENSE, SPARSE), max_size=8), st.integers(0, 6000))
def test_first_positions_match_a_walk_over_the_indices_batch_by_batch(batches: list[list[int]], span: int) -> None:
    """Batch after batch (the parts of a dataset in rank order), each index's first position is that of its first
    copy in all batches so far: in the table, after growing it, after leaving it for the sorted arrays (an index
    reaching the span), and in those, recent additions merged or not."""
    seen, first, position = SeenSamples(span, positions=True), {}, 0
    for values in batches:
        positions = np.arange(position, position + len(values), dtype=np.int64)
        found = seen.first_positions(np.asarray(values, dtype=np.int64), positions)
        for value, at in zip(values, positions.tolist(), strict=True):
            first.setdefault(value, at)
        assert found.tolist() == [first[value] for value in values]
        assert len(seen) == len(first)
        position += len(values)
    assert seen.indices().tolist() == sorted(first)
    assert seen.contains(np.array([*sorted(first), 2**41], dtype=np.int64)).tolist() == [True] * len(first) + [False]


def test_dense_indices_end_in_the_table_and_sparse_ones_in_the_sorted_arrays_at_8_bytes_an_index() -> None:
    """0..N-1 and every 4th index (a sampler over 4 ranks), both shuffled, start in the sorted arrays and end in
    the table; random indices below 2^40, and two near 2·10^9, stay in the sorted arrays; either way at most 8 bytes
    per index seen past the floor (1 byte per index for 0..N-1)."""
    rng = np.random.default_rng(5)
    n = 200_000
    cases = {"dense": rng.permutation(n), "every 4th": 4 * rng.permutation(n) + 3, "sparse": rng.integers(0, 2**40, n)}
    for name, values in cases.items():
        seen = SeenSamples()
        for batch in np.array_split(values, 800):
            seen.add(batch[seen.first_sightings(batch)])
        assert len(seen) == len(np.unique(values)), name
        assert (seen.table is None) == (name == "sparse"), name
        assert seen.nbytes <= TABLE_BYTES_PER_SAMPLE * len(seen) + TABLE_FLOOR, name
    dense = SeenSamples()
    dense.add(np.arange(n))
    assert dense.nbytes == n
    huge = SeenSamples()
    huge.add(np.array([2 * 10**9, 2 * 10**9 + 1]))
    assert huge.table is None and huge.nbytes == 16


def test_first_positions_keep_sparse_indices_without_a_table_of_their_span() -> None:
    seen = SeenSamples(1024, positions=True)
    assert seen.first_positions(np.array([5, 7, 5]), np.arange(3)).tolist() == [0, 1, 0]
    assert seen.table is not None
    assert seen.first_positions(np.array([2**62, 7, 2**62]), np.arange(3, 6)).tolist() == [3, 1, 3]
    assert seen.table is None  # a table would need 2^62 entries
    assert seen.indices().tolist() == [5, 7, 2**62]
    assert seen.nbytes == 16 * 3


def test_many_batches_past_the_merge_threshold_keep_the_set_and_the_positions_exact() -> None:
    """Thousands of sparse batches: the recent additions are merged into the sorted array many times."""
    rng = np.random.default_rng(3)
    seen, positioned, expected, first = SeenSamples(), SeenSamples(positions=True), set(), {}
    for batch in range(2000):
        index = rng.integers(0, 200_000, size=256) * 2**20
        seen.add(index)
        positions = np.arange(256 * batch, 256 * (batch + 1))
        found = positioned.first_positions(index, positions)
        for value, at in zip(index.tolist(), positions.tolist(), strict=True):
            first.setdefault(value, at)
        assert found.tolist() == [first[value] for value in index.tolist()]
        expected.update(index.tolist())
    assert seen.table is None and len(seen.recent) <= max(1024, len(seen.sorted) // 4)
    assert seen.indices().tolist() == sorted(expected) == positioned.indices().tolist()


def test_a_set_records_with_add_and_a_positioned_one_with_first_positions() -> None:
    with pytest.raises(TypeError, match="first_positions"):
        SeenSamples(positions=True).add(np.array([1]))
    with pytest.raises(TypeError, match="add"):
        SeenSamples().first_positions(np.array([1]), np.array([0]))


def test_row_fingerprints_agree_across_arrays_dtypes_and_mask_forms_and_change_no_input():
    import torch

    from bpseval.kernel.samples import row_fingerprints

    rng = np.random.default_rng(4)
    robs = rng.poisson(1.0, size=(50, 9)).astype(np.float64)
    full = np.ones((50, 9))
    prints = row_fingerprints(robs, None)
    same = [
        row_fingerprints(robs.astype(np.float32), full[:, :1]),
        row_fingerprints(robs, full),
        np.asarray(row_fingerprints(torch.tensor(robs, dtype=torch.float32), None)),
        np.asarray(row_fingerprints(torch.tensor(robs), torch.tensor(full))),
    ]
    for other in same:
        np.testing.assert_array_equal(other, prints)
    masked = full.copy()
    masked[3, 4] = 0.0
    changed = robs.copy()
    changed[3, 4] += 7.0  # at a masked entry: not part of the sample
    tensor_robs, tensor_mask = torch.tensor(changed), torch.tensor(masked)
    given = (tensor_robs.clone(), tensor_mask.clone())
    np.testing.assert_array_equal(
        np.asarray(row_fingerprints(tensor_robs, tensor_mask)), row_fingerprints(robs, masked)
    )
    assert torch.equal(tensor_robs, given[0]) and torch.equal(tensor_mask, given[1])  # computed on copies
    differs = row_fingerprints(robs, masked) != prints  # a weight differs: row 3 only
    assert differs.tolist() == [row == 3 for row in range(50)]
    rows = rng.poisson(0.5, size=(20000, 20)).astype(np.float32)  # many rows differing in one or two small counts
    assert len(np.unique(row_fingerprints(rows, None))) == len(np.unique(rows, axis=0))


def test_fingerprints_asked_for_twice_keep_one_per_sample_and_every_conflict():
    from bpseval.kernel.samples import SampleFingerprints

    prints = SampleFingerprints()
    prints.add(np.array([3, 1, 3]), np.array([30, 10, 30]))
    first = prints.by_sample()
    assert [part.tolist() for part in first[:2]] == [[1, 3], [10, 30]] and first[2] is None
    assert [part.tolist() for part in prints.by_sample()[:2]] == [[1, 3], [10, 30]]  # the same, asked again
    prints.add(np.array([1, 5]), np.array([11, 50]))  # sample 1 again, different: against the kept one
    assert prints.by_sample()[2] == 1
    prints.add(np.array([0, 0]), np.array([1, 2]))
    assert prints.by_sample()[2] == 0 and prints.by_sample()[0].tolist() == [0, 1, 3, 5]
