"""The merge cache (`bpseval.run.cache`): re-scoring merges only changed steps, and a cached number is the merged one.

Everything runs on real shards in tmp_path; "fresh" always means the same merge with `cache=False`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bpseval import ShardWriter
from bpseval.features.steps import merge_steps
from bpseval.kernel.cellstats import STAT_FIELDS
from bpseval.run.cache import CACHE_DIRECTORY, CACHE_FORMAT, META, cache_directory, content_digest
from bpseval.run.catalog import RunCatalog
from bpseval.run.merge import MergedRun, merge_run
from tests.conftest import peak_bytes, poisson_dataset, write_raw_shard
from tests.test_extreme_inputs import overflowing_arrays
from tests.test_steps import write_step

REPO = Path(__file__).resolve().parents[1]


def assert_same_merge(cached: MergedRun, fresh: MergedRun) -> None:
    """Every field of two merges equal, arrays to the last bit and of the same dtype."""
    assert (cached.step, cached.world_size, cached.files, cached.warnings) == (
        fresh.step,
        fresh.world_size,
        fresh.files,
        fresh.warnings,
    )
    assert len(cached.datasets) == len(fresh.datasets)
    for a, b in zip(cached.datasets, fresh.datasets, strict=True):
        assert (a.name, a.rate_kind, a.samples, a.duplicates_dropped, a.identity, a.warnings) == (
            b.name,
            b.rate_kind,
            b.samples,
            b.duplicates_dropped,
            b.identity,
            b.warnings,
        )
        assert a.cell_ids.dtype == b.cell_ids.dtype and np.array_equal(a.cell_ids, b.cell_ids)
        assert (a.per_block is None) == (b.per_block is None)
        assert (a.copies_valid is None) == (b.copies_valid is None)
        assert b.copies_valid is None or (a.copies_valid.dtype == b.copies_valid.dtype == np.int64)
        assert np.array_equal(a.rank_valid, b.rank_valid)
        pairs = list(zip(a.per_rank, b.per_rank, strict=True)) + ([(a.per_block, b.per_block)] if b.per_block else [])
        for x, y in pairs:
            for field in STAT_FIELDS:
                u, v = getattr(x, field), getattr(y, field)
                assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()


def write_messy_step(run: Path, step: int, seed: int = 0, store: str = "raw") -> None:
    """Two ranks: dataset "a" with string cell ids and sample_idx, rank 1 repeating sample 0 with another rhat
    (dropped, with a warning naming both shards); dataset "b" without sample_idx on rank 0 only."""
    base = poisson_dataset(seed, n_rows=40, n_cells=5)
    for rank in (0, 1):
        arrays = {key: values[20 * rank : 20 * rank + 20] for key, values in base.items()}
        sample_idx = np.arange(20 * rank, 20 * rank + 20)
        if rank == 1 and store == "raw":
            arrays = {
                key: np.concatenate([values, base[key][:1] * (1.5 if key == "rhat" else 1)])
                for key, values in arrays.items()
            }
            sample_idx = np.append(sample_idx, 0)
        with ShardWriter(run, rank, 2, step=step, store=store, block_size=8) as writer:
            writer.add("a", **arrays, sample_idx=sample_idx, cell_ids=np.array([f"unit {i}" for i in range(5)]))
            if rank == 0:
                writer.add("b", **poisson_dataset(seed + 1, n_rows=10, n_cells=3))


def entries(run: Path) -> list[Path]:
    return sorted((run / CACHE_DIRECTORY).glob("*.npz"))


# ----------------------------------------------------------------------------------------------
# Bit-identical numbers


@pytest.mark.parametrize("store", ["raw", "stats"])
@pytest.mark.parametrize("blocks", [None, 4])
def test_cached_numbers_are_bit_identical_to_a_fresh_merge(tmp_path, store, blocks):
    run = tmp_path / "run"
    write_messy_step(run, 3, store=store)
    first = merge_run(run, blocks=blocks, cache=True)
    second = merge_run(run, blocks=blocks, cache=True)
    assert (first.cached, second.cached) == (False, True)
    assert_same_merge(second, merge_run(run, blocks=blocks))
    if store == "raw":
        assert any("rhat differs beyond rounding" in warning for warning in second.warnings)


def test_entries_are_deflated_and_keep_each_ranks_padding_copies(tmp_path):
    """The messy step's rank 1 repeats sample 0 of rank 0: its copy is kept, as a count, through the cache."""
    run = tmp_path / "run"
    write_messy_step(run, 0)
    fresh = merge_run(run, blocks=4, cache=True)
    with zipfile.ZipFile(entries(run)[0]) as archive:
        infos = archive.infolist()
    assert {info.compress_type for info in infos} == {zipfile.ZIP_DEFLATED}
    assert "0/copies_valid.npy" in {info.filename for info in infos}
    assert sum(info.compress_size for info in infos) < 0.6 * sum(info.file_size for info in infos)
    cached = merge_run(run, blocks=4, cache=True)
    assert cached.cached and fresh.datasets[0].copies_valid is not None
    assert_same_merge(cached, fresh)
    assert cached.datasets[0].copies_valid[1].sum() > 0 and not cached.datasets[0].copies_valid[0].any()


def test_warnings_of_a_cached_step_name_the_shards_as_this_command_reached_them(tmp_path):
    run = tmp_path / "run"
    write_messy_step(run, 0)
    merge_run(run, cache=True)
    link = tmp_path / "link"
    link.symlink_to(run)
    through_link = merge_run(link, cache=True)
    assert through_link.cached
    assert_same_merge(through_link, merge_run(link))
    assert str(link / "step-000000" / "rank-0001.h5") in " ".join(through_link.warnings)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world_size=st.integers(1, 3),
    cells=st.integers(0, 4),
    rows=st.integers(0, 30),
    indexed=st.booleans(),
    blocks=st.sampled_from([None, 3]),
    log_rate=st.booleans(),
    seed=st.integers(0, 2**16),
)
# found by the seeds 7 and 12: a rank whose only row holds no spike gave int64 sums (numpy's bincount of nothing),
# which the cache gave back as float64 (3 ranks) or refused every time (1 rank)
@example(world_size=3, cells=1, rows=1, indexed=False, blocks=None, log_rate=False, seed=0)
@example(world_size=1, cells=1, rows=1, indexed=False, blocks=None, log_rate=False, seed=0)
def test_any_run_comes_back_from_the_cache_bit_for_bit(world_size, cells, rows, indexed, blocks, log_rate, seed):
    with tempfile.TemporaryDirectory() as directory:
        run = Path(directory) / "run"
        for rank in range(world_size):
            arrays = poisson_dataset(seed + rank, n_rows=rows, n_cells=cells)
            if log_rate:
                arrays["rhat"] = np.log(arrays["rhat"])
            with ShardWriter(run, rank, world_size, step=seed) as writer:
                sample_idx = np.arange(rows) * world_size + rank if indexed else None
                writer.add("d", **arrays, sample_idx=sample_idx, rate_kind="log_rate" if log_rate else "rate")
        merge_run(run, blocks=blocks, cache=True)
        cached = merge_run(run, blocks=blocks, cache=True)
        assert cached.cached
        assert_same_merge(cached, merge_run(run, blocks=blocks))


def test_an_entry_without_blocks_does_not_serve_a_request_with_blocks(tmp_path):
    run = tmp_path / "run"
    write_messy_step(run, 0)
    merge_run(run, cache=True)
    with_blocks = merge_run(run, blocks=5, cache=True)
    assert not with_blocks.cached and with_blocks.datasets[0].per_block is not None
    assert_same_merge(with_blocks, merge_run(run, blocks=5))
    assert merge_run(run, cache=True).cached and merge_run(run, blocks=5, cache=True).cached  # both kept
    assert merge_run(run, blocks=6, cache=True).cached is False


# ----------------------------------------------------------------------------------------------
# Only what changed is merged again


def test_a_second_pass_merges_nothing_and_a_new_step_only_itself(tmp_path):
    run = tmp_path / "run"
    for step in range(30):
        write_step(run, step, n_cells=3)
    first, _ = merge_steps(RunCatalog.scan(run), cache=True)
    second, _ = merge_steps(RunCatalog.scan(run), cache=True)
    assert not any(merged.cached for merged in first.values())
    assert all(merged.cached for merged in second.values()) and len(second) == 30
    write_step(run, 30, n_cells=3)
    third, _ = merge_steps(RunCatalog.scan(run), cache=True)
    assert [step for step, merged in third.items() if not merged.cached] == [30]
    fresh, _ = merge_steps(RunCatalog.scan(run))
    for step in fresh:
        assert_same_merge(third[step], fresh[step])


@pytest.mark.parametrize("how", ["replaced", "in place"])
def test_a_rewritten_shard_of_an_earlier_step_is_merged_again_even_with_its_old_times(tmp_path, how):
    """Same size, mtime set back: the new inode (replaced) or the new ctime (written in place) changes the key."""
    run = tmp_path / "run"
    write_step(run, 0)
    write_step(run, 1)
    before, _ = merge_steps(RunCatalog.scan(run), cache=True)
    shard = run / "step-000000" / "rank-0000.h5"
    old = shard.stat()
    if how == "replaced":
        with ShardWriter(run, 0, 2, step=0, overwrite=True) as writer:
            for index, name in enumerate(("Allen_2022-04-13", "Allen_2022-05-02")):
                arrays = poisson_dataset(999 + index)
                if index == 1:
                    arrays["dfs"][:, 0] = 0.0
                writer.add(name, **arrays, sample_idx=np.arange(40))
    else:
        with h5py.File(shard, "r+") as handle:
            rhat = handle["datasets/Allen_2022-04-13/rhat"]
            rhat[...] = rhat[...] * np.float32(1.7)
    os.utime(shard, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = shard.stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert (new.st_ino != old.st_ino) == (how == "replaced")
    after, _ = merge_steps(RunCatalog.scan(run), cache=True)
    assert not after[0].cached and after[1].cached
    fresh, _ = merge_steps(RunCatalog.scan(run))
    assert_same_merge(after[0], fresh[0])
    old_ll = before[0].datasets[0].total.model_ll
    assert not np.array_equal(after[0].datasets[0].total.model_ll, old_ll)


# ----------------------------------------------------------------------------------------------
# Corrupt, mismatched, unwritable, concurrent


def rewrite_entry(path: Path, change, compression: int = zipfile.ZIP_STORED) -> None:
    """Rewrite a cache entry's members through `change(name, data) -> data` (None drops it), as a valid zip."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            if (changed := change(name, data)) is not None:
                archive.writestr(name, changed)


def forged(change):
    """A corruption: the entry's arrays rewritten through `change(name, data)` and its digest recomputed, as by
    someone who knows the format (the digest then matches: the checks behind it must refuse the entry)."""

    def rewrite(path: Path) -> None:
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        meta = json.loads(members.pop(META))
        members = {name: change(name, data) for name, data in members.items()}
        meta["digest"] = content_digest({"key": meta["key"], "datasets": meta["datasets"]}, members)
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(META, json.dumps(meta))
            for name, data in members.items():
                archive.writestr(name, data)

    return rewrite


def changed(member: str, change):
    """A change for `rewrite_entry` or `forged`: the array `member` through `change(array) -> array`."""

    def rewrite(name: str, data: bytes) -> bytes:
        if name != member:
            return data
        buffer = io.BytesIO()
        np.save(buffer, change(np.load(io.BytesIO(data))))
        return buffer.getvalue()

    return rewrite


def older_format(name: str, data: bytes) -> bytes:
    if name != "meta.json":
        return data
    meta = json.loads(data)
    meta["key"]["cache_format"] = 0
    return json.dumps(meta).encode()


def four_fields(cache_format: int):
    """An entry as cache format 1 wrote it: n_valid, weight, spikes and model_ll only, under `cache_format`."""

    def change(name: str, data: bytes) -> bytes | None:
        if name == "meta.json":
            meta = json.loads(data)
            meta["key"]["cache_format"] = cache_format
            return json.dumps(meta).encode()
        field = name.rsplit("/", 1)[-1].removesuffix(".npy")
        return None if field in STAT_FIELDS[4:] else data

    return change


def fewer_cells(name: str, data: bytes) -> bytes:
    """A forged entry whose key matches but whose statistics lack a cell."""
    if not name.startswith("0/per_rank/"):
        return data
    buffer = io.BytesIO()
    np.save(buffer, np.load(io.BytesIO(data))[:, :-1])
    return buffer.getvalue()


def flip_a_data_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("0/per_rank/model_ll.npy")
    data = bytearray(path.read_bytes())
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 3
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "empty": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(os.urandom(5000)),
    "a pickle": lambda path: path.write_bytes(b"\x80\x04\x95" + os.urandom(100)),
    "a .npy array": lambda path: np.save(open(path, "wb"), np.arange(3)),  # noqa: SIM115 - closed by np.save's caller
    "a flipped data byte": flip_a_data_byte,
    "an older cache format": lambda path: rewrite_entry(path, older_format),
    "a four-field entry of cache format 1": lambda path: rewrite_entry(path, four_fields(1)),
    "a four-field entry claiming the current format": lambda path: rewrite_entry(path, four_fields(CACHE_FORMAT)),
    "a header that is not an object": lambda path: rewrite_entry(path, lambda n, d: b"[1]" if n == "meta.json" else d),
    "statistics of the wrong shape": lambda path: rewrite_entry(path, fewer_cells),
    "another step's entry": lambda path: shutil.copy(path.with_name("step-000001.blocks-3.npz"), path),
    "a directory": lambda path: (path.unlink(), path.mkdir()),
    "model_ll halved": lambda path: rewrite_entry(path, changed("0/per_rank/model_ll.npy", lambda a: a * 0.5)),
    "a member compressed otherwise than deflated": lambda path: rewrite_entry(path, lambda n, d: d, zipfile.ZIP_BZIP2),
    "a header nested 100,000 deep": lambda path: rewrite_entry(
        path, lambda n, d: b"[" * 100_000 + b"]" * 100_000 if n == META else d
    ),
    "negative spikes under a recomputed digest": forged(changed("0/per_rank/spikes.npy", lambda a: -a - 1)),
    "blocks that do not add up under a recomputed digest": forged(changed("0/per_block/weight.npy", lambda a: a * 0.5)),
    "statistics of the wrong shape under a recomputed digest": forged(fewer_cells),
    "float32 sums under a recomputed digest": forged(changed("0/per_rank/model_ll.npy", lambda a: a.astype("f4"))),
    "a .npy header declaring 10^12 cells under a recomputed digest": forged(
        lambda n, d: d.replace(b"'shape': (2, 5)", b"'shape': (2, 1000000000000)") if n.startswith("0/") else d
    ),
}
MISSES = {"an older cache format", "a four-field entry of cache format 1", "another step's entry"}
"""Entries made for another key: a plain miss, without a warning."""


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_or_mismatched_entry_is_ignored_and_rebuilt(tmp_path, corruption, caplog):
    run = tmp_path / "run"
    write_messy_step(run, 0)
    write_messy_step(run, 1, seed=5)
    merge_steps(RunCatalog.scan(run), blocks=3, cache=True)
    entry = run / CACHE_DIRECTORY / "step-000000.blocks-3.npz"
    CORRUPTIONS[corruption](entry)
    with caplog.at_level(logging.WARNING, logger="bpseval.run.cache"):
        rebuilt = merge_run(run, step=0, blocks=3, cache=True)
    assert not rebuilt.cached
    assert_same_merge(rebuilt, merge_run(run, step=0, blocks=3))
    refused = [record.getMessage() for record in caplog.records if "cannot be used" in record.getMessage()]
    assert len(refused) == (corruption not in MISSES), refused
    assert all(str(entry) in message and "merged afresh" in message for message in refused)
    if corruption != "a directory":  # a directory in its place cannot be replaced: the merge goes on uncached
        assert merge_run(run, step=0, blocks=3, cache=True).cached


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make `directory` unwritable, even for root (who ignores permissions but not the immutable flag)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if (
        not shutil.which("chattr")
        or subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False).returncode
    ):
        pytest.skip("running as root, and the immutable flag cannot be set here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_read_only_run_directory_caches_in_the_user_cache_directory(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_messy_step(run, 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with read_only(run):
        assert not merge_run(run, cache=True).cached
        cached = merge_run(run, cache=True)
        assert cached.cached
        assert_same_merge(cached, merge_run(run))
        where = cache_directory(run)
    assert not (run / CACHE_DIRECTORY).exists()
    assert where.parent == tmp_path / "xdg" / "bpseval" and [p.name for p in where.iterdir()] == ["step-000000.npz"]


def bpseval_cli(*arguments: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `bpseval ARGUMENTS` in a process of its own (a hang fails the test after 5 minutes)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    command = [sys.executable, "-m", "bpseval", *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, check=False, timeout=300)


def refusals(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Warning: merge cache entry")]


def test_a_changed_number_in_an_entry_is_one_warning_and_the_numbers_of_a_fresh_merge(tmp_path):
    """model_ll halved in an entry whose zip is valid: it was scored (bps 0.886 instead of 0.347, exit 0)."""
    run = tmp_path / "run"
    write_step(run, 0)
    fresh = bpseval_cli("compute", run, "--no-cache", "--json", "-")
    assert bpseval_cli("compute", run).returncode == 0 and entries(run)
    for name in ("0/per_rank/model_ll.npy", "1/per_rank/model_ll.npy"):
        rewrite_entry(entries(run)[0], changed(name, lambda values: values * 0.5))
    result = bpseval_cli("compute", run, "--json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(fresh.stdout)
    assert len(refusals(result.stderr)) == 1 and "digest" in result.stderr and "Traceback" not in result.stderr
    assert merge_run(run, cache=True).cached  # the entry was rewritten


def test_a_fifo_in_place_of_an_entry_is_never_opened(tmp_path):
    """It hung `compute` (opening a FIFO waits for a writer)."""
    run = tmp_path / "run"
    write_step(run, 0)
    fresh = bpseval_cli("compute", run, "--no-cache", "--json", "-")
    assert bpseval_cli("compute", run).returncode == 0
    entry = entries(run)[0]
    entry.unlink()
    os.mkfifo(entry)
    result = bpseval_cli("compute", run, "--json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(fresh.stdout)
    assert len(refusals(result.stderr)) == 1 and "not a regular file (a FIFO)" in result.stderr
    assert entry.is_file() and merge_run(run, cache=True).cached  # rebuilt in its place


def test_a_compressed_entry_is_refused_before_it_is_decompressed(tmp_path, caplog):
    """A 256 KiB entry whose header inflates to 256 MiB of spaces (valid JSON): it was read whole, then parsed."""
    run = tmp_path / "run"
    write_messy_step(run, 0)
    merge_run(run, cache=True)
    entry = entries(run)[0]
    with zipfile.ZipFile(entry) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(entry, "w") as archive:
        header = zipfile.ZipInfo(META)
        header.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(header, "w", force_zip64=True) as stream:
            stream.write(members.pop(META))
            for _ in range(256):
                stream.write(b" " * (1 << 20))
        for name, data in members.items():
            archive.writestr(name, data)
    assert entry.stat().st_size < 2 << 20
    with caplog.at_level(logging.WARNING, logger="bpseval.run.cache"):
        peak = peak_bytes(lambda: merge_run(run, cache=True))
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1
    assert merge_run(run, cache=True).cached


def test_a_step_whose_sums_overflow_is_merged_every_time_without_a_warning(tmp_path, caplog):
    """Infinite sums are numbers no entry may hold (the sums contract): such a step is not stored, so it is never
    refused either."""
    rhat, robs = overflowing_arrays()
    write_raw_shard(tmp_path / "run" / "rank-0.h5", {"extreme": {"rhat": rhat, "robs": robs}})
    with caplog.at_level(logging.DEBUG, logger="bpseval.run.cache"):
        assert [merge_run(tmp_path / "run", cache=True).cached for _ in range(2)] == [False, False]
    assert [record.levelno for record in caplog.records] == [logging.DEBUG] * 2
    assert "not cached" in caplog.records[0].getMessage() and entries(tmp_path / "run") == []


def test_changing_the_kernel_makes_the_entry_miss(tmp_path, monkeypatch):
    """BPSEVAL_KERNEL chooses code whose sums differ in rounding: an entry of one kernel is not the other's merge."""
    run = tmp_path / "run"
    write_messy_step(run, 0)
    kernels = ["numpy", "numpy", "compiled", "compiled", "numpy"]
    served = []
    for kernel in kernels:
        monkeypatch.setenv("BPSEVAL_KERNEL", kernel)
        merged = merge_run(run, cache=True)
        served.append(merged.cached)
        assert_same_merge(merged, merge_run(run))
    assert served == [False, True, False, True, False]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give a folder away")
def test_a_run_directory_of_another_user_gets_no_cache_folder(tmp_path, monkeypatch):
    """root merging a user's run left a root-owned `.bpseval-cache` in it: the cache goes to root's own directory."""
    run = tmp_path / "run"
    write_messy_step(run, 0)
    os.chown(run, 65534, 65534)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert not merge_run(run, cache=True).cached
    cached = merge_run(run, cache=True)
    assert cached.cached
    assert_same_merge(cached, merge_run(run))
    assert not (run / CACHE_DIRECTORY).exists()
    where = cache_directory(run)
    assert where.parent == tmp_path / "xdg" / "bpseval" and [p.name for p in where.iterdir()] == ["step-000000.npz"]


def test_a_cache_that_cannot_be_written_is_one_warning_and_the_command_goes_on(tmp_path):
    run = tmp_path / "run"
    for step in range(3):
        write_step(run, step)
    (tmp_path / "not-a-folder").write_text("")
    with read_only(run):
        result = bpseval_cli("compute", str(run), "--all-steps", env={"XDG_CACHE_HOME": str(tmp_path / "not-a-folder")})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "merge cache" in line]
    assert len(warnings) == 1 and warnings[0].startswith("Warning: cannot write the merge cache"), result.stderr
    assert "--no-cache" in warnings[0] and "Traceback" not in result.stderr


def test_concurrent_commands_never_corrupt_the_cache(tmp_path, invoke):
    run = tmp_path / "run"
    for step in range(6):
        write_messy_step(run, step, seed=step)
    outputs = [tmp_path / f"out{i}.json" for i in range(3)]
    processes = []
    for out in outputs:  # started 0.1 s apart: later ones read entries that earlier ones may still be writing
        command = [sys.executable, "-m", "bpseval", "compute", str(run), "--all-steps", "--json", str(out)]
        processes.append(
            subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        )
        time.sleep(0.1)
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    reference = invoke("compute", run, "--all-steps", "--no-cache", "--json", "-")
    assert all(json.loads(out.read_text()) == json.loads(reference.stdout) for out in outputs)
    merged, _ = merge_steps(RunCatalog.scan(run), cache=True)
    assert all(step.cached for step in merged.values())
    assert [path.name for path in (run / CACHE_DIRECTORY).iterdir() if not path.name.endswith(".npz")] == []


# ----------------------------------------------------------------------------------------------
# The catalog and the command line


def test_a_cached_run_scans_the_same(tmp_path, invoke):
    run = tmp_path / "run"
    for step in range(2):
        write_messy_step(run, step, seed=step)

    def scanned() -> tuple:
        catalog = RunCatalog.scan(run)
        return (
            [h.path for h in catalog.shards],
            catalog.leftovers,
            catalog.problems,
            list(catalog.steps),
            catalog.complete_steps,
        )

    before, doctor_before = scanned(), invoke("doctor", run)
    merge_steps(RunCatalog.scan(run), cache=True)
    merge_steps(RunCatalog.scan(run), blocks=3, cache=True)
    (run / CACHE_DIRECTORY / ".step-000000.npz.4242-deadbeef.part").write_bytes(b"a killed cache writer")
    assert len(entries(run)) == 4
    assert scanned() == before
    doctor_after = invoke("doctor", run)
    assert doctor_after.exit_code == doctor_before.exit_code == 0
    assert doctor_after.stdout == doctor_before.stdout and CACHE_DIRECTORY not in doctor_after.stdout


MERGING_COMMANDS = {
    "compute": (["compute", "{run}"], 0),
    "compute --all-steps": (["compute", "{run}", "--all-steps"], 0),
    "coverage": (["coverage", "{run}"], 1),  # cell 0 of the second dataset is uncovered: the gate fails
    "baseline": (["baseline", "{run}", "-o", "{tmp}/base.json"], 0),
    "compare": (["compare", "{run}", "--baseline", "{run}", "--significance", "0.05"], 0),
    "plot": (["plot", "{run}", "-o", "{tmp}/pictures"], 0),
    "report": (["report", "{run}", "-o", "{tmp}/report.html"], 0),
}


@pytest.mark.parametrize("command", list(MERGING_COMMANDS))
def test_every_merging_command_caches_unless_told_not_to(tmp_path, invoke, command):
    run = tmp_path / "run"
    write_step(run, 0)
    write_step(run, 1)
    arguments, code = MERGING_COMMANDS[command]
    arguments = [argument.format(run=run, tmp=tmp_path) for argument in arguments]
    uncached = invoke(*arguments, "--no-cache")
    assert uncached.exit_code == code, uncached.output
    assert not (run / CACHE_DIRECTORY).exists()
    first = invoke(*arguments)
    assert first.exit_code == code and entries(run), first.output
    second = invoke(*arguments)
    assert (second.exit_code, second.stdout) == (code, first.stdout)
