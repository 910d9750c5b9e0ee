"""`SeenSamples` is the set of the indices added, whatever the batches, their order and their repeats."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bpseval.kernel.samples import SeenSamples

batches = st.lists(st.lists(st.integers(0, 5000), max_size=300), max_size=40)


@settings(max_examples=200, deadline=None)
@given(batches=batches, probe=st.lists(st.integers(0, 5001), max_size=50))
def test_the_set_holds_every_index_added_once_in_order(batches: list[list[int]], probe: list[int]) -> None:
    seen, expected = SeenSamples(), set()
    for batch in batches:
        index = np.array(batch, dtype=np.int64)
        new = seen.first_sightings(index)
        assert new.tolist() == [value not in expected and value not in batch[:row] for row, value in enumerate(batch)]
        seen.add(index)
        expected.update(batch)
        assert len(seen) == len(expected)
    queries = np.array(probe, dtype=np.int64)
    assert seen.contains(queries).tolist() == [value in expected for value in probe]
    assert seen.indices().tolist() == sorted(expected)
    assert SeenSamples.from_indices(seen.indices()).indices().tolist() == sorted(expected)


def test_many_batches_past_the_merge_threshold_keep_the_set_exact() -> None:
    """Thousands of batches: `recent` is merged into `sorted` many times (past 1,024 and a quarter of it)."""
    rng = np.random.default_rng(3)
    seen, expected = SeenSamples(), set()
    for _ in range(2000):
        index = rng.integers(0, 200_000, size=256)
        seen.add(index)
        expected.update(index.tolist())
    assert len(seen.recent) <= max(1024, len(seen.sorted) // 4)
    assert seen.indices().tolist() == sorted(expected)


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
