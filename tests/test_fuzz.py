"""Fuzzed shards: mutated files give the right answer or exit 2 naming the file, quickly, in bounded memory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bpseval.cli import app
from tests.conftest import poisson_dataset, write_raw_shard

SECONDS = 10.0
PEAK_BYTES = 200 * 2**20
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RUNNER = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def valid_shard(path: Path) -> None:
    data = poisson_dataset(0, n_rows=64, n_cells=5)
    write_raw_shard(
        path,
        {"Allen_2022-04-13": {**data, "sample_idx": np.arange(64), "cell_ids": np.arange(5) + 100}},
    )


def run_compute(run: Path) -> tuple[int, str, str]:
    """`bpseval compute RUN --json -` in-process; checks the time and memory bounds on the way."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = RUNNER.invoke(app, ["compute", str(run), "--json", "-"])
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def assert_answer_or_named_error(run: Path, shard: Path) -> None:
    code, stdout, stderr = run_compute(run)
    assert code in (0, 2), (code, stderr)
    if code == 0:
        document = json.loads(stdout)  # strict JSON: never NaN
        assert all(cell["status"] in ("ok", "silent", "uncovered") for cell in document["cells"])
    else:
        assert stderr.startswith("Error: ") and str(shard) in stderr, stderr


@FUZZ
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_at_any_offset(cut):
    with TemporaryDirectory() as directory:
        shard = Path(directory) / "rank0.h5"
        valid_shard(shard)
        data = shard.read_bytes()
        shard.write_bytes(data[: int(cut * len(data))])
        assert_answer_or_named_error(Path(directory), shard)


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes(flips):
    with TemporaryDirectory() as directory:
        shard = Path(directory) / "rank0.h5"
        valid_shard(shard)
        data = bytearray(shard.read_bytes())
        for where, mask in flips:
            data[int(where * len(data))] ^= mask
        shard.write_bytes(bytes(data))
        assert_answer_or_named_error(Path(directory), shard)


def _replace(group: h5py.Group, key: str, value: object, **options: object) -> None:
    del group[key]
    group.create_dataset(key, data=value, **options)


STRUCTURAL: dict[str, tuple[Callable[[h5py.File], None], int]] = {
    # name: (mutation applied to the open file, expected exit code)
    "drop rhat": (lambda f: f["datasets/Allen_2022-04-13"].__delitem__("rhat"), 2),
    "drop robs": (lambda f: f["datasets/Allen_2022-04-13"].__delitem__("robs"), 2),
    "drop dfs": (lambda f: f["datasets/Allen_2022-04-13"].__delitem__("dfs"), 0),
    "drop sample_idx": (lambda f: f["datasets/Allen_2022-04-13"].__delitem__("sample_idx"), 0),
    "drop cell_ids": (lambda f: f["datasets/Allen_2022-04-13"].__delitem__("cell_ids"), 0),
    "drop the datasets group": (lambda f: f.__delitem__("datasets"), 0),
    "drop format": (lambda f: f.attrs.__delitem__("format"), 2),
    "drop rank": (lambda f: f.attrs.__delitem__("rank"), 2),
    "drop step": (lambda f: f.attrs.__delitem__("step"), 2),
    "rank as text": (lambda f: f.attrs.__setitem__("rank", "zero"), 2),
    "world_size as float": (lambda f: f.attrs.__setitem__("world_size", 1.5), 2),
    "step as array": (lambda f: f.attrs.__setitem__("step", np.arange(3)), 2),
    "format_version as text": (lambda f: f.attrs.__setitem__("format_version", "1"), 2),
    "rank beyond world size": (lambda f: f.attrs.__setitem__("rank", 3), 2),
    "rhat as text": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "rhat", np.full((64, 5), "x", dtype="S1")), 2),
    "rhat complex": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "rhat", np.ones((64, 5), dtype=complex)), 2),
    "rhat 3-D": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "rhat", np.ones((64, 5, 1))), 2),
    "robs one row short": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "robs", np.ones((63, 5))), 2),
    "dfs of another width": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "dfs", np.ones((64, 4))), 2),
    "dfs as a group": (
        lambda f: (
            f["datasets/Allen_2022-04-13"].__delitem__("dfs"),
            f["datasets/Allen_2022-04-13"].create_group("dfs"),
        ),
        2,
    ),
    "sample_idx float": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "sample_idx", np.arange(64.0)), 2),
    "sample_idx negative": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "sample_idx", -np.arange(64)), 2),
    "cell_ids too short": (lambda f: _replace(f["datasets/Allen_2022-04-13"], "cell_ids", np.arange(4)), 2),
    "rate_kind unknown": (lambda f: f["datasets/Allen_2022-04-13"].attrs.__setitem__("rate_kind", "probability"), 2),
    "dataset is an array": (
        lambda f: (f.__delitem__("datasets"), f.create_dataset("datasets/Allen_2022-04-13", data=np.ones(3))),
        2,
    ),
    "datasets is an array": (lambda f: (f.__delitem__("datasets"), f.create_dataset("datasets", data=np.ones(3))), 2),
    "huge declared shape": (
        lambda f: [
            _replace(f["datasets/Allen_2022-04-13"], key, None, shape=(10**10, 5), dtype="f4", chunks=(1024, 5))
            for key in ("rhat", "robs")
        ],
        2,
    ),
    "empty datasets (N = 0)": (
        lambda f: [
            _replace(
                f["datasets/Allen_2022-04-13"],
                key,
                np.zeros((0, 5) if key != "sample_idx" else (0,), dtype="f4" if key != "sample_idx" else "i8"),
            )
            for key in ("rhat", "robs", "dfs", "sample_idx")
        ],
        0,
    ),
}


@FUZZ
@given(mutations=st.lists(st.sampled_from(sorted(STRUCTURAL)), min_size=1, max_size=3, unique=True))
def test_structural_mutations(mutations):
    with TemporaryDirectory() as directory:
        shard = Path(directory) / "rank0.h5"
        valid_shard(shard)
        with h5py.File(shard, "a") as handle:
            for name in mutations:
                # an earlier mutation may have removed or replaced what this one changes
                with contextlib.suppress(KeyError, ValueError, TypeError, AttributeError):
                    STRUCTURAL[name][0](handle)
        # later mutations may undo earlier ones, so only the general promise is checked here;
        # each mutation's own exit code is checked below
        assert_answer_or_named_error(Path(directory), shard)


def test_every_structural_mutation_alone_gives_its_expected_exit_code(tmp_path):
    for name, (mutate, expected) in STRUCTURAL.items():
        run = tmp_path / name.replace(" ", "_")
        shard = run / "rank0.h5"
        valid_shard(shard)
        with h5py.File(shard, "a") as handle:
            mutate(handle)
        code, _, stderr = run_compute(run)
        if name == "drop the datasets group":
            expected = 0  # a rank that saw nothing: valid, and nothing to score
        assert code == expected, (name, stderr)
        if code == 2:
            assert str(shard) in stderr, (name, stderr)


def test_file_on_which_hdf5_loops_forever_is_reported_within_the_time_bound(tmp_path):
    """Found by atheris (tests/fuzz_shard_reader.py): a corrupt global heap behind a string attribute
    makes libhdf5 loop forever inside H5Aread. Headers are read in a child process with a timeout."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "hangs_hdf5_global_heap.h5", run / "rank-0000.h5")
    for command in ("compute", "doctor"):
        start = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "-m", "bpseval", command, str(run)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BPSEVAL_METADATA_TIMEOUT": "3"},
            cwd=Path(__file__).parents[1],
            check=False,
        )
        assert time.perf_counter() - start < 30
        assert completed.returncode == 2, completed.stderr
        output = completed.stdout + completed.stderr
        assert "rank-0000.h5: reading its metadata did not finish within 3 s" in output
        assert "Traceback" not in output
