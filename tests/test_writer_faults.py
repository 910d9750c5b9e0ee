"""ShardWriter under faults and misuse: full disks, failed renames, reuse, two shards at one path, bad input, run_id.

The fault and misuse tests run with the synchronous writer and with `background=True`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import bpseval
from bpseval import ShardWriter
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.shard.format import CHUNK_BYTES
from bpseval.shard.reader import read_header
from bpseval.shard.writer import SYNC_BYTES
from tests.conftest import poisson_dataset
from tests.gloo import _free_port as free_port
from tests.gloo import run_gloo

REPO = Path(__file__).resolve().parents[1]
DATASET = "Allen_2022-04-13"


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture(params=[False, True], ids=["sync", "background"])
def background(request: pytest.FixtureRequest) -> bool:
    """ShardWriter's `background` option: every test taking it runs both ways."""
    return request.param


@contextmanager
def small_tmpfs(disk: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `disk` (created) for the block. Needs root (the tests and CI run as root)."""
    disk.mkdir()
    try:
        mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk))
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a small tmpfs here ({getattr(error, 'stderr', '') or error}); needs root")
    try:
        yield disk
    finally:
        shard = disk / "run" / "step-000000" / "rank-0000.h5"
        subprocess.run(["umount", str(shard)], capture_output=True, check=False)  # the bind mount, if any
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: room for one small shard and not much more."""
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


def earlier_shard(run_dir: Path) -> tuple[Path, bytes]:
    """A complete shard of rank 0, step 0, written before the failing write; returns its path and bytes."""
    with ShardWriter(run_dir, 0, 1) as writer:
        writer.add(DATASET, **poisson_dataset(0))
    return writer.path, writer.path.read_bytes()


def run_training_process(
    run_dir: Path, mode: str, elsewhere: Path, background: bool
) -> tuple[dict, subprocess.CompletedProcess]:
    process = subprocess.run(
        [sys.executable, "-m", "tests.writer_fault_process", str(run_dir), mode, str(elsewhere)]
        + (["bg"] if background else []),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = process.stdout.splitlines()
    return (json.loads(lines[0]) if lines else {}), process


@pytest.mark.parametrize(
    ("mode", "code", "words"),
    [
        ("add", errno.ENOSPC, ["No space left on device", "while adding a batch of dataset 'Allen_2022-04-13'"]),
        ("close", errno.ENOSPC, ["No space left on device", "while finishing the shard"]),
        ("rename", errno.EBUSY, ["while renaming it into place"]),
    ],
)
def test_a_failed_write_raises_oserror_removes_its_file_and_keeps_the_earlier_shard(
    small_disk, tmp_path, mode, code, words, background
):
    run_dir = small_disk / "run"
    shard, before = earlier_shard(run_dir)
    if mode == "rename":  # a mount point cannot be replaced by rename(2): EBUSY, as on some network filesystems
        mount("--bind", str(shard), str(shard))
    report, process = run_training_process(run_dir, mode, tmp_path / "elsewhere", background)
    assert process.returncode == 0, process.stderr  # alive: no crash, no segfault (a negative code)
    assert process.stderr == ""  # no "Exception ignored", no HDF5 diagnostics, no traceback
    assert process.stdout.splitlines()[1:] == ["alive"]
    assert report["errno"] == code and report["error"] == type(OSError(code, "")).__name__
    assert str(shard) in report["message"] and "temporary file was removed" in report["message"]
    assert all(word in report["message"] for word in words), report["message"]
    assert [p.name for p in small_disk.rglob("*") if p.name.endswith(".tmp")] == []
    assert shard.read_bytes() == before
    assert read_header(tmp_path / "elsewhere" / "step-000000" / "rank-0000.h5").datasets[DATASET].n_rows == 64


def test_a_full_disk_when_the_file_is_created_is_an_oserror_and_leaves_nothing(small_disk, background):
    from tests.writer_fault_process import fill_disk

    fill_disk(small_disk / "filler")
    writer = ShardWriter(small_disk / "run", 0, 1, background=background)
    with pytest.raises(OSError, match="No space left on device") as caught, writer:
        writer.add(DATASET, **poisson_dataset(0))
    assert caught.value.errno == errno.ENOSPC and str(writer.path) in str(caught.value)
    assert [p for p in (small_disk / "run").rglob("*") if p.is_file()] == []
    with pytest.raises(ArgumentError, match="discarded"):
        writer.add(DATASET, **poisson_dataset(0))


# ------------------------------------------------------------------------------------------------
# misuse


def test_a_writer_is_used_in_one_with_block_and_refuses_later_use(tmp_path, background):
    writer = ShardWriter(tmp_path, 0, 1, background=background)
    with writer:
        writer.add(DATASET, **poisson_dataset(0))
        with pytest.raises(ArgumentError, match="one `with` block only"), writer:
            pass
    finished = writer.path.read_bytes()
    with pytest.raises(ArgumentError, match=r"add\(\) after the shard was finished"):
        writer.add(DATASET, **poisson_dataset(1))
    with pytest.raises(ArgumentError, match="one `with` block only"), writer:
        pass
    assert writer.close() == writer.path  # closing again changes nothing
    assert writer.path.read_bytes() == finished
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["rank-0000.h5"]  # no stray temp file


def test_add_after_an_exception_is_refused_and_writes_nothing(tmp_path, background):
    writer = ShardWriter(tmp_path, 0, 1, background=background)
    with pytest.raises(RuntimeError), writer:
        writer.add(DATASET, **poisson_dataset(0))
        raise RuntimeError("validation crashed")
    with pytest.raises(ArgumentError, match="discarded"):
        writer.add(DATASET, **poisson_dataset(0))
    with pytest.raises(ArgumentError, match="discarded"):
        writer.close()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_one_with_block_per_loader_is_refused_and_keeps_the_first_shard(tmp_path, background):
    with ShardWriter(tmp_path, 0, 1, step=3, background=background) as writer:
        writer.add("loader_a", **poisson_dataset(0))
    first = writer.path.read_bytes()
    with pytest.raises(ArgumentError) as caught, ShardWriter(tmp_path, 0, 1, step=3, background=background) as again:
        again.add("loader_b", **poisson_dataset(1))
    message = str(caught.value)
    assert str(writer.path) in message and "already wrote" in message
    assert "one ShardWriter for the whole validation pass" in message and "add(dataset=" in message
    assert "overwrite=True" in message
    assert writer.path.read_bytes() == first
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["rank-0000.h5"]
    # Other steps and ranks are fine, and overwrite=True replaces the shard on purpose.
    with ShardWriter(tmp_path, 0, 1, step=4) as other:
        other.add("loader_a", **poisson_dataset(0))
    with ShardWriter(tmp_path, 0, 1, step=3, overwrite=True) as replacing:
        replacing.add("loader_b", **poisson_dataset(1))
    assert list(read_header(writer.path).datasets) == ["loader_b"]


def test_two_writers_of_one_path_open_at_once_in_one_process_are_refused(tmp_path, background):
    with ShardWriter(tmp_path, 1, 2, background=background) as first:
        with pytest.raises(ArgumentError, match="already wrote \\(or is writing\\)"):
            ShardWriter(tmp_path, 1, 2, background=background).open()
        first.add(DATASET, **poisson_dataset(0))
    assert read_header(first.path).datasets[DATASET].n_rows == 40


def test_a_shard_deleted_since_or_written_by_another_process_can_be_written_again(tmp_path):
    """A re-run after the run directory was cleared, or a restarted job (another process): the last rename wins."""
    run = tmp_path / "run"
    with ShardWriter(run, 0, 1) as writer:
        writer.add(DATASET, **poisson_dataset(0))
    shutil.rmtree(run)
    with ShardWriter(run, 0, 1) as writer:
        writer.add(DATASET, **poisson_dataset(0))
    script = "from tests.writer_process import write_rank; import sys; write_rank(sys.argv[1], 0, 1, 0)"
    subprocess.run([sys.executable, "-c", script, str(run)], cwd=REPO, check=True, timeout=120)
    assert read_header(writer.path).datasets[DATASET].n_rows == 400  # the other process's shard replaced it


# ------------------------------------------------------------------------------------------------
# input checks


def written(tmp_path: Path, **arrays) -> h5py.File:
    with ShardWriter(tmp_path, 0, 1) as writer:
        writer.add(DATASET, **{**poisson_dataset(0, n_rows=4, n_cells=3), **arrays})
    return h5py.File(writer.path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"cell_ids": np.array([1.5, 2.0, 3.0])}, "cell_ids must be integers or strings"),
        ({"cell_ids": np.array([1.0, np.nan, 3.0])}, "cell_ids must be integers or strings"),
        ({"cell_ids": np.array([2.0**70, 1.0, 2.0])}, "cell_ids must fit in int64"),
        ({"sample_idx": np.array([0, 1, 2, 2**63], dtype=np.uint64)}, r"sample_idx must be in \[0, 922\d+\]"),
        ({"sample_idx": [0, 1, 2, 2**63]}, "sample_idx must be in"),
        ({"sample_idx": [0, 1, 2, 2**64]}, "sample_idx must be in"),
        ({"sample_idx": np.array([0.0, 1.0, 2.0, 3.0])}, "sample_idx must be integers"),
        ({"sample_idx": np.array([0, -1, 2, 3])}, "sample_idx must be in .*got 1 value.* outside, e.g. -1"),
    ],
)
def test_bad_identities_are_refused_when_written_and_leave_no_trace(tmp_path, arrays, message):
    with ShardWriter(tmp_path, 0, 1) as writer, pytest.raises(ArgumentError, match=f"dataset '{DATASET}': {message}"):
        writer.add(DATASET, **{**poisson_dataset(0, n_rows=4, n_cells=3), **arrays})
    assert read_header(writer.path).datasets == {}


def test_integral_float_cell_ids_are_stored_as_integers(tmp_path):
    with written(tmp_path, cell_ids=np.array([7.0, 8.0, 9.0])) as handle:
        stored = handle[f"datasets/{DATASET}/cell_ids"]
        assert stored.dtype == np.int64 and list(stored[()]) == [7, 8, 9]


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_names_are_refused_naming_them(tmp_path, name):
    with ShardWriter(tmp_path, 0, 1) as writer, pytest.raises(ArgumentError, match=f"dataset name '{name}'"):
        writer.add(name, np.ones((1, 1)), np.ones((1, 1)))


def test_a_refused_batch_leaves_every_array_of_the_dataset_with_the_same_rows(tmp_path, background):
    """robs is refused after rhat would have been appended: nothing of the batch is written."""
    with ShardWriter(tmp_path, 0, 1, background=background) as writer:
        writer.add("d", np.ones((2, 3), np.float32), np.ones((2, 3), np.float32))
        with pytest.raises(ArgumentError, match="robs dtype float64 cannot be stored without loss"):
            writer.add("d", np.ones((5, 3), np.float32), np.ones((5, 3), np.float64))
    layout = read_header(writer.path).datasets["d"]
    assert layout.n_rows == 2
    assert bpseval.evaluate(tmp_path).datasets["samples"].tolist() == [2]


def test_a_bad_stats_batch_does_not_mark_its_samples_as_seen(tmp_path):
    with ShardWriter(tmp_path, 0, 1, store="stats") as writer:
        with pytest.raises(BpsevalError, match="NaN"):
            writer.add("d", np.array([[np.nan, 1.0]]), np.ones((1, 2)), sample_idx=[0])
        writer.add("d", np.array([[1.0, 1.0]]), np.ones((1, 2)), sample_idx=[0])  # the corrected batch counts
    assert bpseval.evaluate(tmp_path).datasets[["samples", "duplicates_dropped"]].values.tolist() == [[1, 0]]


@pytest.mark.parametrize("store", ["raw", "stats"])
def test_a_dataset_without_cells_is_written_read_and_scored_as_one_with_no_cells(tmp_path, store):
    with ShardWriter(tmp_path, 0, 1, store=store) as writer:
        for start in (0, 3):
            rows = np.arange(start, start + 3)
            writer.add("empty", np.ones((3, 0), np.float32), np.ones((3, 0)), np.ones((3, 1)), sample_idx=rows)
        writer.add("full", **poisson_dataset(0))
    layout = read_header(writer.path).datasets["empty"]
    assert (layout.n_cells, layout.n_rows if store == "raw" else 6) == (0, 6)
    result = bpseval.evaluate(tmp_path)
    rows = result.datasets.set_index("name")
    assert rows.loc["empty", "samples"] == 6 and result.overall.datasets_without_ok_cells == ["empty"]
    assert set(result.cells["dataset"]) == {"full"}


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5))
def test_unsigned_sample_idx_is_stored_exactly_or_refused(values):
    index = np.array(values, dtype=np.uint64)
    with tempfile.TemporaryDirectory() as tmp, ShardWriter(tmp, 0, 1) as writer:
        arrays = poisson_dataset(0, n_rows=len(values), n_cells=2)
        if max(values) > 2**63 - 1:
            with pytest.raises(ArgumentError, match="sample_idx must be in"):
                writer.add("d", **arrays, sample_idx=index)
        else:
            writer.add("d", **arrays, sample_idx=index)
            writer.close()
            with h5py.File(writer.path) as handle:
                assert handle["datasets/d/sample_idx"][()].tolist() == values


# ------------------------------------------------------------------------------------------------
# run_id


def write_two_launches(rank: int, world_size: int, run_dir: str, second_port: int) -> None:
    """Two steps per launch, then the group torn down and made anew (a second launch), then torchrun's id."""
    for launch in ("first", "second"):
        if launch == "second":
            dist.destroy_process_group()
            os.environ["MASTER_PORT"] = str(second_port)
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        for step in range(2):
            with ShardWriter.from_process_group(Path(run_dir, launch), step=step) as writer:
                writer.add(DATASET, **poisson_dataset(rank, n_rows=4, n_cells=2))
    for step, elastic in ((2, "none"), (3, "job-42")):  # torchrun's default "none" is no id
        os.environ["TORCHELASTIC_RUN_ID"] = elastic
        with ShardWriter.from_process_group(Path(run_dir, "second"), step=step) as writer:
            writer.add(DATASET, **poisson_dataset(rank, n_rows=4, n_cells=2))


@pytest.mark.parametrize("run_id", ["job\x0042", "job-\ud800", "", "line\nbreak", 42, b"job-42"])
def test_a_run_id_that_cannot_be_stored_as_text_is_refused_when_the_writer_is_made(tmp_path, run_id):
    """A NUL or a lone surrogate used to raise ValueError / UnicodeEncodeError from h5py when the file was made."""
    with pytest.raises(ArgumentError, match=r"ShardWriter: run_id must be a non-empty printable string.*not "):
        ShardWriter(tmp_path, 0, 1, run_id=run_id)
    assert list(tmp_path.iterdir()) == []


def test_from_process_group_records_one_run_id_per_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    run_gloo(write_two_launches, 2, str(tmp_path), free_port())
    ids = {}
    for launch, steps in (("first", 2), ("second", 4)):
        for step in range(steps):
            found = {read_header(tmp_path / launch / f"step-{step:06d}" / f"rank-{r:04d}.h5").run_id for r in range(2)}
            assert len(found) == 1 and None not in found and "" not in found  # every rank: the same, non-empty
            ids[launch, step] = found.pop()
    assert ids["first", 0] == ids["first", 1] != ids["second", 0] == ids["second", 1] == ids["second", 2]
    assert ids["second", 3] == "job-42"


def test_a_batch_like_the_last_one_is_still_checked_and_a_refused_one_leaves_the_writer_usable(tmp_path, background):
    """Batches with the dtypes and shapes of the last one skip the checks they passed, not their sample_idx values."""
    batches = [
        {**poisson_dataset(seed, n_rows=8, n_cells=3), "sample_idx": np.arange(8 * seed, 8 * seed + 8)}
        for seed in range(4)
    ]
    negative = {**batches[2], "sample_idx": np.array([16, 17, -1, 19, 20, 21, 22, 23])}
    with ShardWriter(tmp_path, 0, 1, background=background) as writer:
        writer.add("d", **batches[0])
        writer.add("d", **batches[1])  # like the last one
        with pytest.raises(
            ArgumentError, match=r"dataset 'd': sample_idx must be in \[0, .*1 value\(s\) outside, e.g. -1"
        ):
            writer.add("d", **negative)
        with pytest.raises(ArgumentError, match="dataset 'd': robs dtype float64 cannot be stored without loss"):
            writer.add("d", **{**batches[2], "robs": batches[2]["robs"].astype(np.float64)})
        with pytest.raises(ArgumentError, match="dataset 'd': this batch has 4 cells, earlier batches had 3"):
            writer.add(
                "d",
                **{**batches[2], "rhat": np.ones((8, 4), np.float32), "robs": np.ones((8, 4), np.float32), "dfs": None},
            )
        with pytest.raises(ArgumentError, match="dataset 'd': give sample_idx on every batch or on none"):
            writer.add("d", **{**batches[2], "sample_idx": None})
        writer.add("d", **batches[2])
        writer.add("d", **batches[3])
    with h5py.File(writer.path) as handle:
        for name in ("rhat", "robs", "dfs", "sample_idx"):
            expected = np.concatenate([batch[name] for batch in batches])
            np.testing.assert_array_equal(handle[f"datasets/d/{name}"][()], expected, err_msg=name)


def test_a_shard_larger_than_the_writeback_interval_is_stored_whole(tmp_path, background):
    """Three times SYNC_BYTES: the kernel is asked to start writing back the file while it grows."""
    rows = 3 * SYNC_BYTES // (3 * 4 * 181) + 100
    data = {**poisson_dataset(1, n_rows=rows, n_cells=181), "sample_idx": np.arange(rows)}
    with ShardWriter(tmp_path, 0, 1, background=background) as writer:
        for start in range(0, rows, 256):
            writer.add(DATASET, **{name: array[start : start + 256] for name, array in data.items()})
    with h5py.File(writer.path) as handle:
        for name, array in data.items():
            np.testing.assert_array_equal(handle[f"datasets/{DATASET}/{name}"][()], array, err_msg=name)


def test_a_full_disk_is_raised_by_the_add_whose_chunk_does_not_fit(tmp_path, background):
    """Chunks reach the file as they fill: a 2 MiB disk fails within one chunk per array of the data given.

    HDF5's default chunk cache (8 MiB per array) used to hold the chunks until the file was closed.
    A background writer raises the error at a later add (its queue may hold more by then).
    """
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        data = {**poisson_dataset(3, n_rows=256, n_cells=181), "sample_idx": np.arange(256)}
        per_batch = sum(array.nbytes for array in data.values())
        writer = ShardWriter(disk / "run", 0, 1, background=background)
        given = 0
        with pytest.raises(OSError, match="No space left on device") as caught, writer:
            for number in range(200):  # 136 MiB of batches
                writer.add(DATASET, **{**data, "sample_idx": data["sample_idx"] + number * 256})
                given += per_batch
        assert "close" not in [entry.name for entry in caught.traceback]  # raised by add()
        assert caught.value.errno == errno.ENOSPC and str(writer.path) in str(caught.value)
        if not background:  # the disk's 2 MiB, less than one chunk staged per array, the failing batch
            assert given <= 2 * 1024 * 1024 + 4 * CHUNK_BYTES + per_batch, given
        assert [p for p in disk.rglob("*") if p.is_file()] == []


def test_a_disk_filling_after_writeback_started_is_an_oserror_and_leaves_nothing(tmp_path, background):
    """A 6 MiB tmpfs and 12 MiB of batches: the writes fail after the first SYNC_BYTES were handed to writeback."""
    with small_tmpfs(tmp_path / "disk", "6m") as disk:
        data = poisson_dataset(2, n_rows=6000, n_cells=181)
        writer = ShardWriter(disk / "run", 0, 1, background=background)
        with pytest.raises(OSError, match="No space left on device") as caught, writer:
            for _ in range(3):
                for start in range(0, 6000, 256):
                    writer.add(DATASET, **{name: array[start : start + 256] for name, array in data.items()})
        assert caught.value.errno == errno.ENOSPC and str(writer.path) in str(caught.value)
        assert [p for p in disk.rglob("*") if p.is_file()] == []
