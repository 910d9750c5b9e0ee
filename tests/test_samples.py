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
