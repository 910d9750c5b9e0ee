"""The benchmark scripts still run against the library: a refactor of bpseval that breaks them fails here.

Everything runs on two tiny synthetic datasets; the only subprocesses are one `bpseval compute`
and `benchmarks/run.py --help`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import profiling, run, writer
from benchmarks.baselines import legacy_run, numpy_floor, read_shards, time_kernels
from benchmarks.data import (
    SCALES,
    Scale,
    cell_counts,
    dataset_specs,
    ensure_shards,
    resolve_scale,
    shard_paths,
)
from benchmarks.hdf5_settings import measure_case, write_with_shard_writer
from benchmarks.shards import sampled_bpseval_run
from bpseval.kernel.cellstats import STAT_FIELDS
from bpseval.kernel.stats import batch_stats
from bpseval.run.cache import CACHE_DIRECTORY
from bpseval.shard.format import CHUNK_BYTES

REPO = Path(__file__).resolve().parents[1]
TINY = resolve_scale(SCALES["small"], datasets=2, cells=12, samples=301, ranks=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shards of two tiny datasets written by the benchmark's generator (through ShardWriter)."""
    return ensure_shards(TINY, tmp_path_factory.mktemp("bench"))


def test_kernel_measurement_times_both_kernels_and_the_floor(tiny_run: Path) -> None:
    paths, names = shard_paths(tiny_run), [spec.name for spec in dataset_specs(TINY)]
    timings, reference = time_kernels(paths, names, repeat=1)
    assert [timing.name for timing in timings] == ["kernel", "kernel (numpy)", "numpy floor"]
    assert all(len(timing.times) == 1 and timing.times[0] > 0 for timing in timings)
    assert sorted(reference) == names
    assert int(sum(stats.n_valid.sum() for stats in reference.values())) > 0
    arrays_bytes = read_shards(paths, chunked=True)
    assert arrays_bytes == read_shards(paths, chunked=False) > 0
    assert np.isfinite(legacy_run(paths, names))


def test_bpseval_compute_matches_the_floor_and_reports_its_memory(tiny_run: Path) -> None:
    _, reference = time_kernels(shard_paths(tiny_run), [spec.name for spec in dataset_specs(TINY)], repeat=1)
    shutil.rmtree(tiny_run / CACHE_DIRECTORY, ignore_errors=True)
    verdict, tree_pss_mb = sampled_bpseval_run(tiny_run, [], reference)
    assert not (tiny_run / CACHE_DIRECTORY).exists()  # every run merges the shards: no merge cache read or written
    assert "matches the numpy floor" in verdict
    assert tree_pss_mb > 0 or np.isnan(tree_pss_mb)


def test_profile_groups_name_functions_that_still_exist(tiny_run: Path) -> None:
    document = profiling.main(TINY, tiny_run.parent)
    groups = document["groups_s"]
    for part in ("h5py reads", "batch_stats", "dedup", "scoring", "JSON"):
        assert next(seconds for label, seconds in groups.items() if label.startswith(part)) > 0, part


def test_hdf5_settings_reads_shard_writer_chunks_from_the_file(tmp_path: Path) -> None:
    cells, samples = 23, 3000  # more rows than one 256 KiB chunk: a smaller array is written contiguous
    rng = np.random.default_rng(0)
    arrays = {key: rng.random((samples, cells), dtype=np.float32) for key in ("rhat", "robs", "dfs")}
    arrays["sample_idx"] = np.arange(samples, dtype=np.int64)
    row = measure_case("ShardWriter itself", partial(write_with_shard_writer, arrays=arrays), arrays, tmp_path, 1)
    assert row["chunk"] == f"{CHUNK_BYTES // (cells * 4)} rows"
    assert row["raw_bytes"] == sum(array.nbytes for array in arrays.values()) and row["file_bytes"] > 0


def test_writer_mode_times_every_variant_and_its_ratios(tmp_path: Path) -> None:
    document = writer.main([7], 600, 1, tmp_path)
    (result,) = document["results"]
    assert result["cells"] == 7 and all(timing["median"] > 0 for timing in result["timings"].values())
    assert result["ratios"]["ShardWriter / plain h5py throughput"]["target"] == ">= 0.8"
    assert list(tmp_path.iterdir()) == []


def test_run_py_starts_as_a_script_and_rejects_unknown_measurements() -> None:
    started = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--help"], capture_output=True, text=True, check=False
    )
    assert started.returncode == 0, started.stderr
    assert "hdf5-settings" in started.stdout and "--measure" in started.stdout
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--measure", "read,bogus"])
    assert exit_info.value.code == 2


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 400), cells=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_numpy_floor_agrees_with_batch_stats(rows: int, cells: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rhat = rng.gamma(1.0, 0.2, size=(rows, cells)).astype(np.float32)
    robs = rng.poisson(rhat).astype(np.float32)
    dfs = (rng.random((rows, cells)) > 0.3).astype(np.float32)
    floor, kernel = numpy_floor(rhat, robs, dfs), batch_stats(rhat, robs, dfs)
    np.testing.assert_array_equal(floor.n_valid, kernel.n_valid)
    for key in ("rate_min", "count_min", "rate_max", "count_max"):
        np.testing.assert_array_equal(getattr(floor, key), getattr(kernel, key), err_msg=key)
    co_scale = np.sqrt(floor.rate_m2 * floor.count_m2)  # the co-moment may be near 0: its largest possible size
    for key in STAT_FIELDS[1:9]:
        want, got = getattr(floor, key), getattr(kernel, key)
        allowed = 1e-12 + 1e-9 * (co_scale if key == "co_m2" else np.abs(want))
        assert (np.abs(got - want) <= allowed).all(), (key, got, want)


@given(datasets=st.integers(1, 40), extra=st.integers(0, 3000), mean_cells=st.integers(1, 200))
def test_cell_counts_add_up_to_the_scale(datasets: int, extra: int, mean_cells: int) -> None:
    base = Scale(datasets=5, cells=200, cells_min=20, cells_max=60, samples=10, ranks=2)
    scale = resolve_scale(base, datasets, datasets * mean_cells + extra, None, None)
    counts = cell_counts(scale)
    assert len(counts) == datasets and sum(counts) == scale.cells and min(counts) >= 1


def test_online_mode_times_update_and_the_fused_reduction() -> None:
    """A smoke run of the `online` mode: it runs and reports every ratio (the timing itself is the benchmark's)."""
    from benchmarks import online

    document = online.measure(repeat=1, number=1)
    assert set(document["ratio_to_fused_reduction"]) >= {"with sample_idx", "without sample_idx"}
    assert all(ratio > 0 for ratio in document["ratio_to_fused_reduction"].values())


ISSUE_17_RATIOS = [
    ("cache", "second --all-steps / first, unchanged run"),
    ("cache", "one more step: (run - all cached) / (first / 2)"),
    ("writer", "ShardWriter / plain h5py throughput (181 cells)"),
    ("writer", "background add / sync add, with forward (181 cells)"),
    ("writer", "ShardWriter / plain h5py throughput (23 cells)"),
    ("writer", "background add / sync add, with forward (23 cells)"),
    ("online", "update with sample_idx / fused reduction (256, 300)"),
    ("online", "update without sample_idx / fused reduction (256, 300)"),
    ("kernel", "in-memory bits_per_spike speed-up over the per-cell loop, 1000 cells"),
    ("kernel", "compute / plain h5py read, same shards"),
    ("kernel", "peak RSS of compute, MB"),
    ("kernel", "the same speed-up, numpy kernel"),
    ("kernel", "compute / read, numpy kernel"),
    ("kernel", "peak RSS of compute, compiled / numpy kernel"),
    ("kernel", "start-up, compiled kernel: warm cache / cold cache"),
    ("parallel", "--jobs 2 / --jobs 1, 20 tiny datasets"),
    ("parallel", "8 shards / 2 shards, same data"),
]
"""Every ratio of issue #17's items 1-5, as the `all` mode names them at --quick sizes (the extra bpseval[fast]
is installed for the tests, so the compiled kernel's rows are there)."""


def test_all_quick_reports_every_ratio_of_issue_17_with_its_target_and_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "all.json"
    run.main(["all", "--quick", "--repeat", "1", "--data-dir", str(tmp_path / "data"), "--json", str(output)])
    document = json.loads(output.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert [(entry["area"], entry["ratio"]) for entry in document["ratios"]] == ISSUE_17_RATIOS
    for entry in document["ratios"]:
        assert re.fullmatch(r"(<=|>=) \d+(\.\d+)?", entry["target"]), entry
        sign, limit = entry["target"].split()
        assert entry["met"] is (entry["value"] >= float(limit) if sign == ">=" else entry["value"] <= float(limit))
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert document["commit"]["sha"] == sha and isinstance(document["commit"]["dirty"], bool)
    assert document["quick"] is True and document["machine_load"]["wall_s"] > 0
    assert set(document["modes"]) == {"cache", "writer", "online", "shards", "startup", "parallel"}
    printed = capsys.readouterr().out
    assert f"issue #17 ratios at {sha}" in printed and "QUICK smoke run" in printed
    assert "area      ratio" in printed and f"of {len(ISSUE_17_RATIOS)} targets met" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["writer", "--quick"], "--quick applies to the all mode only"),
        (["all", "--scale", "large", "--steps", "3"], "all: --scale, --steps do not apply"),
    ],
)
def test_run_py_refuses_options_that_do_not_apply(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_online_floor_computes_the_statistics_update_keeps() -> None:
    import torch

    from benchmarks.online import fused_reduction

    generator = torch.Generator().manual_seed(0)
    rhat = torch.rand(64, 30, generator=generator)
    robs = torch.poisson(rhat * 2.0, generator=generator)
    dfs = (torch.rand(64, 30, generator=generator) > 0.2).float()
    dfs[:, 3] = 0.0  # an uncovered cell: its extremes are +inf / -inf
    floor, kernel = fused_reduction(rhat, robs, dfs).numpy(), batch_stats(rhat.numpy(), robs.numpy(), dfs.numpy())
    assert floor.shape == (len(STAT_FIELDS), 30)
    for row, key in enumerate(STAT_FIELDS):
        np.testing.assert_allclose(floor[row], getattr(kernel, key), rtol=1e-9, atol=1e-9, err_msg=key)


def test_compare_significance_times_the_paired_bootstrap_of_the_change(monkeypatch, capsys) -> None:
    from benchmarks import compare_significance

    monkeypatch.setattr(compare_significance, "DATASETS", 2)
    monkeypatch.setattr("sys.argv", ["compare_significance.py", "--repeat", "1", "--bootstrap", "100"])
    compare_significance.main()
    line = capsys.readouterr().out.strip()
    assert line.startswith("compare --significance 0.05 --bootstrap 100 (paired), 2 datasets x 93 cells")
    assert float(line.rsplit("best ", 1)[1].split(" s")[0]) > 0
