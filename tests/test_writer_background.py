"""ShardWriter(background=True): the same shard as the synchronous writer, copies of the caller's buffers, a
bounded queue, and a failed write raised at the next `add` with the shard discarded.

The disk-full and misuse tests of test_writer_faults.py run with `background=True` too.
"""

from __future__ import annotations

import errno
import tempfile
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bpseval import ShardWriter
from bpseval.errors import ArgumentError
from bpseval.shard._writer_thread import WriterThread
from tests.conftest import poisson_dataset
from tests.test_writer_faults import DATASET, earlier_shard, small_disk  # noqa: F401 - small_disk is a fixture


def writer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("bpseval ShardWriter")]


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as handle:
        found: dict[str, np.ndarray] = {}
        handle.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
        return found


@settings(max_examples=20, deadline=None)
@given(
    batches=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 300)), min_size=1, max_size=15),
    store=st.sampled_from(["raw", "stats"]),
)
def test_background_writes_the_same_shard_as_the_synchronous_writer(batches, store):
    """Interleaved datasets of 0 to 300 rows: every batch, in order, and the thread is gone after the block."""
    cells = {"a": 3, "b": 181, "c": 0}
    with tempfile.TemporaryDirectory() as tmp:
        shards = {}
        for background in (False, True):
            starts = dict.fromkeys(cells, 0)
            with ShardWriter(Path(tmp, str(background)), 0, 1, store=store, background=background) as writer:
                for index, (name, rows) in enumerate(batches):
                    data = poisson_dataset(index, n_rows=rows, n_cells=cells[name])
                    writer.add(name, **data, sample_idx=np.arange(starts[name], starts[name] + rows))
                    starts[name] += rows
            shards[background] = arrays_of(writer.path)
        assert writer_threads() == []
    assert shards[True].keys() == shards[False].keys()
    for key, array in shards[False].items():
        np.testing.assert_array_equal(shards[True][key], array, err_msg=key)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("n_cells", [23, 181])
def test_the_caller_may_reuse_its_buffers_as_soon_as_add_returns(tmp_path, background, kind, n_cells):
    """A loop writing into one preallocated buffer: every batch is stored as it was when given.

    3840 rows: at 23 cells one chunk and staged rows; at 181, ten chunks, whose stages the background
    writer hands to its thread and, once written, stages into again.
    """
    rng = np.random.default_rng(0)
    batches = [rng.random((64, n_cells), dtype=np.float32) for _ in range(60)]
    buffer = np.empty((64, n_cells), np.float32)
    given_buffer = torch.from_numpy(buffer) if kind == "torch" else buffer  # a CPU tensor shares the memory
    index = np.empty(64, np.int64)
    with ShardWriter(tmp_path, 0, 1, background=background) as writer:
        for number, batch in enumerate(batches):
            buffer[:] = batch
            index[:] = np.arange(number * 64, (number + 1) * 64)
            writer.add(DATASET, given_buffer, given_buffer, given_buffer, sample_idx=index)
            buffer[:] = np.nan  # reused at once, while the thread may still be writing
            index[:] = -1
    stored = arrays_of(writer.path)
    expected = np.concatenate(batches)
    for name in ("rhat", "robs", "dfs"):
        np.testing.assert_array_equal(stored[f"datasets/{DATASET}/{name}"], expected)
    np.testing.assert_array_equal(stored[f"datasets/{DATASET}/sample_idx"], np.arange(60 * 64))


def test_a_failed_background_write_is_raised_at_the_next_add_and_nothing_is_left(small_disk):  # noqa: F811
    """The disk fills while the thread writes a 32 MB batch; a later add raises that OSError (not a later one)."""
    run_dir = small_disk / "run"
    shard, before = earlier_shard(run_dir)
    rng = np.random.default_rng(0)
    big = rng.random((40_000, 100), dtype=np.float32)
    writer = ShardWriter(run_dir, 0, 1, background=True, overwrite=True)
    with pytest.raises(OSError) as caught, writer:
        writer.add(DATASET, big, big, sample_idx=np.arange(40_000))
        for start in range(40_000, 10**9, 4):  # the loop goes on until the thread's error reaches it
            writer.add(DATASET, big[:4], big[:4], sample_idx=np.arange(start, start + 4))
        pytest.fail("the failed write was never raised by add()")
    error = caught.value
    assert error.errno == errno.ENOSPC and str(shard) in str(error)
    assert f"while adding a batch of dataset '{DATASET}'" in str(error) and "temporary file was removed" in str(error)
    called = [entry.name for entry in caught.traceback]
    assert "add" in called and "close" not in called  # raised by add(), not by the end of the block
    assert writer_threads() == []
    assert [p.name for p in small_disk.rglob("*") if p.name.endswith(".tmp")] == []
    assert shard.read_bytes() == before
    with pytest.raises(ArgumentError, match="discarded"):
        writer.add(DATASET, big[:4], big[:4], sample_idx=np.arange(4))


def test_an_exception_in_the_block_drops_the_queue_and_ends_the_thread(tmp_path):
    writer = ShardWriter(tmp_path, 0, 1, background=True)
    with pytest.raises(RuntimeError, match="validation crashed"), writer:
        for index in range(20):
            writer.add(DATASET, **poisson_dataset(index, n_rows=500, n_cells=50))
        raise RuntimeError("validation crashed")
    assert writer_threads() == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_queue_holds_at_most_its_limit_and_submit_waits_until_there_is_room():
    """Jobs of 60 bytes against a limit of 100: the second waits until the first is done; one larger job goes alone."""
    release, started, order = threading.Event(), threading.Event(), []

    def slow() -> None:
        started.set()
        release.wait(timeout=30)
        order.append("slow")

    worker = WriterThread("bpseval ShardWriter test", limit=100)
    worker.submit(slow, 60)
    assert started.wait(timeout=30)
    waiting = threading.Thread(target=worker.submit, args=(lambda: order.append("next"), 60))
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive() and order == []  # 60 + 60 > 100: submit waits while the first job runs
    release.set()
    waiting.join(timeout=30)
    worker.submit(lambda: order.append("large"), 1000)  # larger than the limit: taken when the queue is empty
    assert worker.stop(drop=False) is None
    assert order == ["slow", "next", "large"]


def test_the_first_error_stops_the_worker_and_unblocks_a_waiting_submit():
    release = threading.Event()
    failure = OSError(errno.EIO, "Input/output error")
    ran = []
    worker = WriterThread("bpseval ShardWriter test", limit=100)
    worker.submit(lambda: release.wait(timeout=30) and failure, 80)
    waiting = threading.Thread(target=worker.submit, args=(lambda: ran.append("never"), 80))
    waiting.start()
    release.set()
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert worker.stop(drop=False) is failure and ran == []


FORMS = ["contiguous", "fortran", "strided", "float16 rhat", "int32 sample_idx", "bool dfs"]


def given_as(form: str, rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray, sample_idx: np.ndarray) -> dict:
    """One batch in one of FORMS: laid out in memory, or typed, unlike the first batch (which is contiguous)."""
    if form == "fortran":
        rhat, robs, dfs = (np.asfortranarray(array) for array in (rhat, robs, dfs))
    elif form == "strided":  # every other row of a larger buffer
        rhat, robs, dfs = (np.repeat(array, 2, axis=0)[::2] for array in (rhat, robs, dfs))
        sample_idx = np.repeat(sample_idx, 2)[::2]
    elif form == "float16 rhat":
        rhat = rhat.astype(np.float16)
    elif form == "int32 sample_idx":
        sample_idx = sample_idx.astype(np.int32)
    elif form == "bool dfs":
        dfs = dfs.astype(bool)
    return {"rhat": rhat, "robs": robs, "dfs": dfs, "sample_idx": sample_idx}


@settings(max_examples=25, deadline=None)
@given(
    batches=st.lists(st.tuples(st.sampled_from(FORMS), st.sampled_from([0, 7, 64, 300])), min_size=1, max_size=16),
    background=st.booleans(),
)
def test_every_batch_is_stored_as_given_whatever_its_layout_and_the_batch_before(batches, background):
    """181 cells (chunks of 362 rows): batches like the last one stored unconverted (taken as given, copied
    into the stages) alternate with converted and non-contiguous ones, filling and crossing chunks."""
    rng = np.random.default_rng(len(batches))
    first = poisson_dataset(0, n_rows=5, n_cells=181)
    plain = [{**first, "sample_idx": np.arange(5)}]
    start = 5
    for _, rows in batches:
        data = poisson_dataset(int(rng.integers(1 << 30)), n_rows=rows, n_cells=181)
        plain.append({**data, "sample_idx": np.arange(start, start + rows)})
        start += rows
    forms = ["contiguous"] + [form for form, _ in batches]
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, 0, 1, background=background) as writer:
            for form, batch in zip(forms, plain, strict=True):
                writer.add("d", **given_as(form, **{key: value.copy() for key, value in batch.items()}))
        stored = arrays_of(writer.path)
    for name in ("rhat", "robs", "dfs", "sample_idx"):
        expected = np.concatenate([batch[name] for batch in plain])
        if name == "rhat":  # float16 batches were rounded before they were given
            expected = np.concatenate(
                [given_as(form, **batch)["rhat"].astype(np.float32) for form, batch in zip(forms, plain, strict=True)]
            )
        np.testing.assert_array_equal(stored[f"datasets/d/{name}"], expected, err_msg=name)
        assert stored[f"datasets/d/{name}"].dtype == (np.int64 if name == "sample_idx" else np.float32)
