"""ShardWriter checks the values of every batch at `add`: what no likelihood takes never reaches a shard.

The synchronous writer refuses the batch at its own `add` (nothing of it written, the writer goes
on), on the repeat-batch fast path too. The background writer checks on its thread, on its own copy
of the rows, and raises at the next `add` or at the end of the `with` block, with the shard discarded.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import bpseval
from bpseval import ShardWriter
from bpseval.errors import ArgumentError
from bpseval.shard.reader import read_header
from tests.conftest import poisson_dataset
from tests.test_writer_background import arrays_of, writer_threads
from tests.test_writer_faults import DATASET

ROWS, CELLS = 16, 5


def good(number: int) -> dict[str, np.ndarray]:
    """Batch `number` of a dataset: float32 rates, counts and mask, sample_idx following the batches before."""
    return {
        **poisson_dataset(number, n_rows=ROWS, n_cells=CELLS),
        "sample_idx": np.arange(number * ROWS, (number + 1) * ROWS),
    }


def spoiled(batch: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    """The batch with one kind of bad value at valid entries (dfs = 1 there), in the same dtypes and shapes."""
    batch = {name: array.copy() for name, array in batch.items()}
    batch["dfs"][2:4] = 1.0
    if how == "NaN rhat":
        batch["rhat"][3, 1] = np.nan
    elif how == "log-rates as rates":
        batch["rhat"][:] = np.log(batch["rhat"])  # gamma(2, 0.5) rates: many below 1, so negative
    elif how == "dfs = 2":
        batch["dfs"][2, 0] = 2.0
    elif how == "negative robs":
        batch["robs"][2, 4] = -1.0
    elif how == "infinite robs":
        batch["robs"][3, 2] = np.inf
    return batch


BAD = {
    "NaN rhat": "rhat has 1 NaN or infinite value",
    "log-rates as rates": r"rhat has \d+ negative values",
    "dfs = 2": r"dfs has 1 outside \[0, 1\] or NaN value",
    "negative robs": "robs has 1 negative value",
    "infinite robs": "robs has 1 NaN or infinite value",
}


@pytest.mark.parametrize("how", sorted(BAD))
@pytest.mark.parametrize("position", ["first batch", "like the last batch", "after a converted batch"])
def test_bad_values_are_refused_at_their_own_add_and_the_writer_goes_on(tmp_path, how, position):
    """Synchronous: refused before anything of the batch is staged, on every path through `add`.

    "like the last batch": the dtypes and shapes of the batch before, stored as given (the fast path);
    "after a converted batch": the batch before was float64 rhat stored as float32 (the full path).
    """
    earlier = [] if position == "first batch" else [good(0)]
    if position == "after a converted batch":
        earlier = [good(0), {**good(1), "robs": good(1)["robs"].astype(np.int16)}]
    with ShardWriter(tmp_path, 0, 1) as writer:
        for batch in earlier:
            writer.add(DATASET, **batch)
        number = len(earlier)
        with pytest.raises(ArgumentError, match=f"dataset '{DATASET}': {BAD[how]}"):
            writer.add(DATASET, **spoiled(good(number), how))
        writer.add(DATASET, **good(number))  # the corrected batch is taken: the writer is usable
    stored = arrays_of(writer.path)
    expected = [*earlier, good(number)]
    for name in ("rhat", "robs", "dfs", "sample_idx"):
        np.testing.assert_array_equal(
            stored[f"datasets/{DATASET}/{name}"], np.concatenate([batch[name] for batch in expected]), err_msg=name
        )


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_values_are_refused_by_the_stats_only_writer(tmp_path, how):
    with ShardWriter(tmp_path, 0, 1, store="stats") as writer:
        writer.add(DATASET, **good(0))
        with pytest.raises(ArgumentError, match=f"dataset '{DATASET}': {BAD[how]}"):
            writer.add(DATASET, **spoiled(good(1), how))
    assert bpseval.evaluate(tmp_path).datasets["samples"].tolist() == [ROWS]


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_any_value_at_a_masked_entry_is_taken(tmp_path, background):
    """dfs = 0 marks an entry invalid: its rhat and robs may be anything, NaN and negative included."""
    batches = [good(number) for number in range(3)]
    for batch in batches[1:]:
        batch["dfs"][5] = 0.0
        batch["rhat"][5] = np.nan
        batch["robs"][5] = -3.0
    with ShardWriter(tmp_path, 0, 1, background=background) as writer:
        for batch in batches:
            writer.add(DATASET, **batch)
    assert read_header(writer.path).datasets[DATASET].n_rows == 3 * ROWS


@pytest.mark.parametrize("how", sorted(BAD))
@pytest.mark.parametrize("position", ["first batch", "like the last batch"])
def test_background_bad_values_are_raised_by_the_next_add_naming_the_batch_and_the_shard_is_discarded(
    tmp_path, how, position
):
    """The thread finds them; the next add raises (the loop goes on until the thread's error reaches it)."""
    earlier = [] if position == "first batch" else [good(0), good(1)]
    writer = ShardWriter(tmp_path, 0, 1, background=True)
    with pytest.raises(ArgumentError) as caught, writer:
        for batch in earlier:
            writer.add(DATASET, **batch)
        writer.add(DATASET, **spoiled(good(len(earlier)), how))  # taken: the thread checks it
        for number in range(len(earlier) + 1, 10_000):
            writer.add(DATASET, **good(number))
        pytest.fail("the thread's error never reached add()")
    message = str(caught.value)
    first = len(earlier) * ROWS
    assert message.startswith(f"{writer.path}: batch {len(earlier) + 1} of dataset '{DATASET}'"), message
    assert f"the dataset's rows {first} to {first + ROWS - 1} on this rank" in message
    assert "checked on the writer's thread" in message and "The shard was discarded" in message
    assert len(re.findall(BAD[how], message)) == 1 and message.count(f"dataset '{DATASET}'") == 1
    assert "close" not in [entry.name for entry in caught.traceback]  # raised by add(), not the end of the block
    assert writer_threads() == []
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []
    with pytest.raises(ArgumentError, match="discarded"):
        writer.add(DATASET, **good(0))


def test_background_bad_values_of_the_last_batch_are_raised_at_the_end_of_the_block(tmp_path):
    writer = ShardWriter(tmp_path, 0, 1, background=True)
    with pytest.raises(ArgumentError, match=f"batch 2 of dataset '{DATASET}'.*rhat has 1 NaN") as caught, writer:
        writer.add(DATASET, **good(0))
        writer.add(DATASET, **spoiled(good(1), "NaN rhat"))
    assert "close" in [entry.name for entry in caught.traceback]
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_background_checks_the_rows_it_staged_not_the_callers_buffer(tmp_path):
    """The caller writes NaN into its buffer right after each add: the thread checks its own copy, and takes it."""
    buffer = good(0)
    with ShardWriter(tmp_path, 0, 1, background=True) as writer:
        for number in range(40):
            batch = good(number)
            for name, array in batch.items():
                buffer[name][:] = array
            writer.add(DATASET, **buffer)
            buffer["rhat"][:] = np.nan
            buffer["robs"][:] = -1.0
    assert read_header(writer.path).datasets[DATASET].n_rows == 40 * ROWS
