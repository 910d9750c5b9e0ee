"""The shard format: ShardWriter (appending, precision, atomic finish, checks) and the reader."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import bpseval
from bpseval import BpsevalError, ShardWriter
from bpseval.run.catalog import RunCatalog
from bpseval.shard.reader import read_header
from tests.conftest import poisson_dataset, write_raw_shard

REPO = Path(__file__).resolve().parents[1]


def test_batches_are_appended_with_attributes_and_identities(tmp_path):
    data = poisson_dataset(0, n_rows=30)
    with ShardWriter(tmp_path, rank=1, world_size=2, step=7, run_id="exp1") as writer:
        for start in range(0, 30, 8):
            rows = slice(start, start + 8)
            writer.add(
                "Allen_2022-04-13",
                data["rhat"][rows],
                data["robs"][rows],
                data["dfs"][rows],
                sample_idx=np.arange(30)[rows],
                cell_ids=["a", "b", "c", "d", "e", "f"],
            )
    assert writer.path == tmp_path / "step-000007" / "rank-0001.h5"
    with h5py.File(writer.path) as handle:
        assert handle.attrs["format"] == "bpseval-shard" and handle.attrs["format_version"] == 1
        assert (handle.attrs["rank"], handle.attrs["world_size"], handle.attrs["step"]) == (1, 2, 7)
        assert handle.attrs["run_id"] == "exp1" and handle.attrs["bpseval_version"] == bpseval.__version__
        group = handle["datasets/Allen_2022-04-13"]
        assert group.attrs["rate_kind"] == "rate"
        np.testing.assert_array_equal(group["rhat"][()], data["rhat"])
        np.testing.assert_array_equal(group["dfs"][()], data["dfs"])
        np.testing.assert_array_equal(group["sample_idx"][()], np.arange(30))
        assert group["rhat"].chunks is None  # smaller than one chunk: contiguous, its own size
    header = read_header(writer.path)
    assert list(header.datasets["Allen_2022-04-13"].cell_ids) == ["a", "b", "c", "d", "e", "f"]


@pytest.mark.parametrize(
    ("n_cells", "dtype", "rhat_rows"), [(23, np.float32, 2849), (181, np.float32, 362), (1000, np.float64, 32)]
)
def test_chunks_hold_whole_rows_of_about_256_kib(tmp_path, n_cells, dtype, rhat_rows):
    rng = np.random.default_rng(0)
    n_rows = 2 * rhat_rows + 7  # more than one chunk of rhat; sample_idx (8 bytes a row) fills none
    with ShardWriter(tmp_path, 0, 1) as writer:
        for start in range(0, n_rows, 200):
            rhat = rng.random((min(200, n_rows - start), n_cells)).astype(dtype)
            index = np.arange(start, start + len(rhat))
            writer.add("d", rhat, np.ones_like(rhat), np.ones_like(rhat), sample_idx=index)
    with h5py.File(writer.path) as handle:
        group = handle["datasets/d"]
        assert group["rhat"].chunks == group["dfs"].chunks == (rhat_rows, n_cells)
        assert group["sample_idx"].chunks is None and group["sample_idx"][()].tolist() == list(range(n_rows))
        assert group["rhat"].compression is None


def test_torch_tensors_keep_their_precision(tmp_path):
    values = torch.rand(5, 3) * 4
    with ShardWriter(tmp_path, 0, 1) as writer:
        writer.add("bf16", values.to(torch.bfloat16), values.round())
        writer.add("f16", values.to(torch.float16), values.round(), dfs=torch.ones(5, 1, dtype=torch.bool))
        writer.add("f64", values.double(), values.round())
    with h5py.File(writer.path) as handle:
        bf16 = handle["datasets/bf16/rhat"]
        assert bf16.dtype == np.float32
        np.testing.assert_array_equal(bf16[()], values.to(torch.bfloat16).float().numpy())
        assert handle["datasets/f16/rhat"].dtype == np.float16
        assert handle["datasets/f16/dfs"].shape == (5, 1)
        assert handle["datasets/f64/rhat"].dtype == np.float64


def test_lossless_upcast_is_accepted_and_lossy_downcast_refused(tmp_path):
    with ShardWriter(tmp_path, 0, 1) as writer:
        writer.add("d", np.ones((2, 3), np.float32), np.ones((2, 3)))
        writer.add("d", np.ones((2, 3), np.float16), np.ones((2, 3)))
        with pytest.raises(ValueError, match="dataset 'd': rhat dtype float64 cannot be stored without loss"):
            writer.add("d", np.ones((2, 3), np.float64), np.ones((2, 3)))


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ({}, {"rhat": np.ones((2, 4)), "robs": np.ones((2, 4))}, "this batch has 4 cells, earlier batches had 3"),
        ({}, {"dfs": np.ones((2, 3))}, "dfs must be given with the same shape on every batch"),
        ({"dfs": np.ones((2, 1))}, {"dfs": np.ones((2, 3))}, r"earlier: \(N, 1\), now: \(N, 3\)"),
        ({}, {"sample_idx": np.arange(2)}, "give sample_idx on every batch or on none"),
        ({}, {"rate_kind": "log_rate"}, "rate_kind 'log_rate' differs from earlier 'rate'"),
        ({"cell_ids": [1, 2, 3]}, {"cell_ids": [1, 2, 4]}, "cell_ids differ"),
    ],
)
def test_batches_must_agree_with_earlier_ones(tmp_path, first, second, message):
    base = {"rhat": np.ones((2, 3)), "robs": np.ones((2, 3))}
    with ShardWriter(tmp_path, 0, 1) as writer:
        writer.add("Allen_2022-04-13", **{**base, **first})
        with pytest.raises(ValueError, match=f"dataset 'Allen_2022-04-13': .*{message}"):
            writer.add("Allen_2022-04-13", **{**base, **first, **second})


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"robs": np.ones((2, 4))}, r"got \(2, 3\) and \(2, 4\)"),
        ({"rhat": np.ones(3), "robs": np.ones(3)}, "must both have shape"),
        ({"dfs": np.ones((3, 3))}, r"dfs has shape \(3, 3\)"),
        ({"sample_idx": np.arange(3)}, r"sample_idx must be integers of shape \(2,\)"),
        ({"sample_idx": np.ones(2)}, r"sample_idx must be integers"),
        ({"cell_ids": [1, 2]}, r"cell_ids must have shape \(3,\)"),
    ],
)
def test_inconsistent_batch_is_refused(tmp_path, arrays, message):
    base = {"rhat": np.ones((2, 3)), "robs": np.ones((2, 3))}
    with ShardWriter(tmp_path, 0, 1) as writer, pytest.raises(ValueError, match=f"dataset 'd': .*{message}"):
        writer.add("d", **{**base, **arrays})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 2, "world_size": 2}, "need 0 <= rank < world_size"),
        ({"rank": 0, "world_size": 1, "step": -1}, "step must be >= 0"),
        ({"rank": 0.0, "world_size": 1}, "rank must be an int"),
    ],
)
def test_writer_arguments_are_checked(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardWriter(tmp_path, **kwargs)


def test_dataset_names_cannot_contain_a_slash(tmp_path):
    with ShardWriter(tmp_path, 0, 1) as writer, pytest.raises(ValueError, match="without '/'"):
        writer.add("a/b", np.ones((1, 1)), np.ones((1, 1)))


def test_shard_appears_only_when_finished(tmp_path):
    writer = ShardWriter(tmp_path / "run", 0, 1)
    writer.open()
    writer.add("d", np.ones((2, 3)), np.ones((2, 3)))
    in_progress = list((tmp_path / "run").rglob("*"))
    names = [path.name for path in in_progress if path.is_file()]
    assert len(names) == 1 and names[0].startswith(".rank-0000.h5.") and names[0].endswith(".tmp")
    with pytest.raises(BpsevalError, match="no shards found"):
        RunCatalog.scan(tmp_path / "run")
    writer.close()
    assert [header.path for header in RunCatalog.scan(tmp_path / "run").shards] == [writer.path]


def test_failed_validation_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 0, 1) as writer:
        writer.add("d", np.ones((2, 3)), np.ones((2, 3)))
        raise RuntimeError("validation crashed")
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_crashed_writer_process_leaves_no_complete_looking_file(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from bpseval import ShardWriter
        writer = ShardWriter({str(tmp_path)!r}, 0, 1)
        writer.open()
        writer.add("d", np.ones((100, 3)), np.ones((100, 3)))
        os._exit(1)
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=False)
    with pytest.raises(BpsevalError, match="no shards found"):
        RunCatalog.scan(tmp_path)


def test_reader_accepts_fixed_length_byte_string_attributes(tmp_path):
    write_raw_shard(
        tmp_path / "r.h5",
        {"d": {**poisson_dataset(0), "rate_kind": np.bytes_(b"rate"), "cell_ids": np.array([b"x", b"y"] * 3)}},
        attrs={"format": np.bytes_(b"bpseval-shard")},
    )
    header = read_header(tmp_path / "r.h5")
    assert header.datasets["d"].rate_kind == "rate"
    assert list(header.datasets["d"].cell_ids) == ["x", "y"] * 3


def test_from_process_group_needs_an_initialised_group(tmp_path):
    with pytest.raises(BpsevalError, match=r"torch\.distributed is not initialised"):
        ShardWriter.from_process_group(tmp_path)
