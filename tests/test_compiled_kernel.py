"""The compiled kernel (`bpseval[fast]`, numba) computes what the numpy reference computes, and is chosen,
cached and refused as documented in `bpseval/kernel/compiled.py`.

The property tests compare the two kernels on the same batch; their sums may differ only by the order of
summation, so each is checked to 1e-12 relative to the sum of the absolute values of its terms (the
condition of a sum: model_ll adds terms of both signs; a centred moment is compared with the
uncentred one, whose rounding it carries). Counts and extremes must be identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpseval.errors import install_hint
from bpseval.kernel import compiled
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.stats import BLOCK_ENTRIES, MIN_RATE, InvalidValuesError, as_weights, batch_stats
from tests.conftest import poisson_dataset, write_raw_shard

REPO = Path(__file__).resolve().parents[1]
RELATIVE = 1e-12


@contextmanager
def kernel(name: str) -> Iterator[None]:
    """Run the block with BPSEVAL_KERNEL=name."""
    with mock.patch.dict(os.environ, {compiled.ENVIRONMENT_VARIABLE: name}):
        yield


def magnitudes(rhat: np.ndarray, robs: np.ndarray, weights: np.ndarray | None, rate_kind: str) -> dict[str, np.ndarray]:
    """Per cell, the sum of the absolute values of the terms of each float statistic (float64, valid entries only)."""
    w = np.ones(rhat.shape) if weights is None else np.broadcast_to(weights.astype(np.float64), rhat.shape)
    valid = w > 0
    w = np.where(valid, w, 0.0)
    counts = np.where(valid, robs.astype(np.float64), 0.0)
    values = np.where(valid, rhat.astype(np.float64), 0.0 if rate_kind == "log_rate" else 1.0)
    with np.errstate(all="ignore"):
        rates = np.exp(values) if rate_kind == "log_rate" else np.maximum(values, MIN_RATE)
        log_rates = values if rate_kind == "log_rate" else np.log(rates)
        log_counts = np.log(np.where(counts > 0, counts, 1.0))
    rate_squares, count_squares = (w * rates * rates).sum(axis=0), (w * counts * counts).sum(axis=0)
    return {
        "weight": w.sum(axis=0),
        "spikes": (w * counts).sum(axis=0),
        "model_ll": (w * (np.abs(counts * log_rates) + rates)).sum(axis=0),
        "spike_log_spikes": (w * counts * log_counts).sum(axis=0),
        "rate_sum": (w * rates).sum(axis=0),
        "rate_m2": rate_squares,
        "count_m2": count_squares,
        "co_m2": np.sqrt(rate_squares * count_squares),
    }


EXACT_FIELDS = ("n_valid", "count_min", "count_max")
RATE_EXTREMES = ("rate_min", "rate_max")
"""Identical for rates; for log-rates, exp of the same values by numpy's and by libm's exp: to 1e-12 relative."""


def assert_agree(got: CellStats, expected: CellStats, scale: dict[str, np.ndarray], rate_kind: str) -> None:
    for name in EXACT_FIELDS + (RATE_EXTREMES if rate_kind == "rate" else ()):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    if rate_kind == "log_rate":
        for name in RATE_EXTREMES:
            np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=RELATIVE, err_msg=name)
    for name, size in scale.items():
        difference = np.abs(getattr(got, name) - getattr(expected, name))
        assert np.all(difference <= RELATIVE * size), (name, difference, size)


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """A batch of any size (empty included) and kind, with garbage (NaN, inf, negative) at masked entries only."""
    rows, cells = draw(st.integers(0, 40)), draw(st.integers(0, 9))
    rate_kind = draw(st.sampled_from(["rate", "log_rate"]))
    rhat_dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    robs_dtype = draw(st.sampled_from([np.int32, np.float32]))
    mask = draw(st.sampled_from([None, "(N, C)", "(N, 1)", "(N,)"]))
    mask_dtype = draw(st.sampled_from([np.float32, np.bool_]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rates = rng.gamma(0.5, 0.6, size=(rows, cells)) * (rng.random((rows, cells)) > 0.1)  # some exact zeros
    robs = rng.poisson(rates * 3).astype(robs_dtype)
    rhat = np.log(rates + 1e-3) if rate_kind == "log_rate" else rates
    rhat = rhat.astype(rhat_dtype)
    if mask is None:
        return rhat, robs, None, rate_kind
    shape = {"(N, C)": (rows, cells), "(N, 1)": (rows, 1), "(N,)": (rows,)}[mask]
    dfs = rng.random(shape)
    dfs[dfs < 0.3] = 0.0
    dfs = dfs > 0 if mask_dtype is np.bool_ else dfs.astype(mask_dtype)
    if mask == "(N, C)" and cells:  # an all-masked cell
        dfs[:, draw(st.integers(0, cells - 1))] = 0
    weights = as_weights(dfs, rows, cells)
    masked = np.broadcast_to(weights == 0, (rows, cells))
    garbage = rng.choice(np.array([np.nan, np.inf, -np.inf, -1.0]), size=(rows, cells))
    rhat[masked] = garbage[masked].astype(rhat_dtype)
    if robs_dtype is np.float32:
        robs[masked] = garbage[masked]
    return rhat, robs, weights, rate_kind


@settings(max_examples=150, deadline=None)
@given(batch=batches())
def test_compiled_kernel_agrees_with_the_numpy_reference(batch) -> None:
    rhat, robs, weights, rate_kind = batch
    with kernel("compiled"):
        fast = compiled.batch_sums(rhat, robs, weights, rate_kind)
        through_batch_stats = batch_stats(rhat, robs, weights, rate_kind)
    with kernel("numpy"):
        reference = batch_stats(rhat, robs, weights, rate_kind)
    assert fast is not None, "masked garbage must not send the batch to the reference"
    assert_agree(fast, reference, magnitudes(rhat, robs, weights, rate_kind), rate_kind)
    for name in STAT_FIELDS:  # batch_stats dispatches to the compiled kernel: the very same numbers
        np.testing.assert_array_equal(getattr(through_batch_stats, name), getattr(fast, name))


def test_many_blocks_with_a_shifting_mean_merge_like_the_reference() -> None:
    """Many runs of rows whose means jump by orders of magnitude; cells first valid late, never valid, and
    near-constant at 1e6 (whose centred moments are what the shifts are for)."""
    rng = np.random.default_rng(7)
    rows, cells = 5 * BLOCK_ENTRIES // 200 + 17, 200
    level = np.repeat(10.0 ** rng.integers(-3, 4, size=(rows // 100 + 1, cells)), 100, axis=0)[:rows]
    rhat = (level * rng.gamma(2.0, 0.5, size=(rows, cells))).astype(np.float32)
    robs = rng.poisson(np.minimum(rhat, 50.0)).astype(np.float32)
    dfs = (rng.random((rows, cells)) > 0.2).astype(np.float32) * rng.choice([0.5, 1.0], size=(rows, cells))
    dfs[:500, 0] = 0.0  # first valid many runs of rows later: its shift is set there
    dfs[:, 1] = 0.0  # never valid
    rhat[:, 2] = 1e6 + rng.random(rows).astype(np.float32)  # near-constant and large: the shifted sums cancel
    dfs[:300, 2] = 0.0
    with kernel("auto"), compiled.work(compiled.WORTH_ENTRIES):  # the default, for work worth loading numba
        fast = batch_stats(rhat, robs, dfs)
        assert compiled.batch_sums(rhat, robs, dfs, "rate") is not None
    with kernel("numpy"):
        reference = batch_stats(rhat, robs, dfs)
    assert_agree(fast, reference, magnitudes(rhat, robs, dfs, "rate"), "rate")
    # the scale above is the uncentred Σwλ², blind to cancellation: the near-constant cell's own moment
    np.testing.assert_allclose(fast.rate_m2[2], reference.rate_m2[2], rtol=1e-9)
    np.testing.assert_allclose(fast.co_m2[2], reference.co_m2[2], rtol=1e-6, atol=1e-9 * reference.rate_m2[2])


@given(rows=st.integers(0, 10**7), cells=st.integers(1, 2000))
def test_a_batch_is_cut_into_parts_of_whole_rows_by_its_shape_alone(rows: int, cells: int) -> None:
    bounds = compiled.part_bounds(rows, cells)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == rows
    assert 1 <= len(sizes) <= compiled.MAX_PARTS
    assert sizes.max() - sizes.min() <= 1
    if len(sizes) > 1:  # cut only when each part holds about PART_ENTRIES entries
        assert sizes.min() * cells >= compiled.PART_ENTRIES // 2


def test_a_large_batch_gives_the_same_numbers_on_any_number_of_threads() -> None:
    """Cut into MAX_PARTS parts, reduced on 1, 2 or 5 threads: identical to the last bit (the parts and the
    order of their merge depend only on the shape), and equal to the reference like a batch of one part.
    An invalid value in the last part sends the batch to the reference, which names it."""
    rng = np.random.default_rng(11)
    rows, cells = compiled.MAX_PARTS * compiled.PART_ENTRIES // 97 + 5, 97
    rhat = rng.gamma(2.0, 0.5, size=(rows, cells)).astype(np.float32)
    robs = rng.poisson(rhat).astype(np.float32)
    dfs = (rng.random((rows, 1)) > 0.1).astype(np.float32)
    assert len(compiled.part_bounds(rows, cells)) == compiled.MAX_PARTS + 1
    with kernel("compiled"):
        with compiled.work(0, 1):
            one = batch_stats(rhat, robs, dfs)
        for threads in (2, 5):
            with compiled.work(0, threads):
                several = batch_stats(rhat, robs, dfs)
            for name in STAT_FIELDS:
                np.testing.assert_array_equal(getattr(several, name), getattr(one, name), err_msg=name)
    # the threads belong to the call that started them: none is left once it returns
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("bpseval-kernel")]
    with kernel("numpy"):
        reference = batch_stats(rhat, robs, dfs)
    assert_agree(one, reference, magnitudes(rhat, robs, dfs, "rate"), "rate")
    rhat[-1, 3], dfs[-1] = np.nan, 1.0
    message = re.escape(f"rhat has 1 NaN or infinite value (first at sample row {rows - 1}, cell 3). Fix")
    with kernel("compiled"), compiled.work(0, 2), pytest.raises(InvalidValuesError, match=message):
        batch_stats(rhat, robs, dfs)


def test_auto_takes_the_compiled_kernel_only_for_work_worth_loading_it() -> None:
    rhat = np.full((10, 3), 0.5, np.float32)
    with kernel("auto"):
        assert compiled.batch_sums(rhat, rhat, None, "rate") is None  # a small batch on its own
        with compiled.work(compiled.WORTH_ENTRIES - 1):
            assert compiled.batch_sums(rhat, rhat, None, "rate") is None
        with compiled.work(compiled.WORTH_ENTRIES):
            assert compiled.batch_sums(rhat, rhat, None, "rate") is not None
            assert compiled.batch_sums(rhat, rhat, None, "log_rate") is None  # log-rates: numpy's vectorised exp
        assert compiled.batch_sums(rhat, rhat, None, "rate") is None  # the work ended with its block
    with kernel("compiled"):
        assert compiled.batch_sums(rhat, rhat, None, "log_rate") is not None  # forced, whatever the work


MERGE_PROBE = """
import sys
from bpseval.run.merge import merge_run
merge_run(sys.argv[1])
print("numba" in sys.modules)
"""


@pytest.mark.parametrize(("setting", "loaded"), [("auto", "False"), ("compiled", "True")])
def test_a_small_step_is_merged_without_loading_numba(tmp_path: Path, setting: str, loaded: str) -> None:
    """The merge tells the kernel the size of the whole step: a small one does not pay for importing numba."""
    for rank in range(2):
        write_raw_shard(
            tmp_path / "run" / f"shard_rank{rank}.h5", {"v1": poisson_dataset(rank, 300, 7)}, rank=rank, world_size=2
        )
    env = {key: value for key, value in os.environ.items() if not key.startswith("BPSEVAL_")}
    env |= {"PYTHONPATH": str(REPO), compiled.ENVIRONMENT_VARIABLE: setting}
    completed = subprocess.run(
        [sys.executable, "-c", MERGE_PROBE, str(tmp_path / "run")], capture_output=True, text=True, env=env, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == loaded


INVALID = {
    "rate": [("rhat", np.nan), ("rhat", np.inf), ("rhat", -1.0)],
    "log_rate": [("rhat", np.nan), ("rhat", -np.inf), ("rhat", 800.0)],
}
"""Bad values of rhat per rate kind; robs and dfs have the same ones for both."""
INVALID_EITHER = [("robs", np.nan), ("robs", np.inf), ("robs", -2.0), ("dfs", 1.5), ("dfs", np.nan), ("dfs", -0.5)]


@settings(max_examples=100, deadline=None)
@given(batch=batches(), pick=st.integers(0, 8), where=st.integers(0, 10**6))
def test_an_invalid_value_raises_the_reference_message(batch, pick: int, where: int) -> None:
    rhat, robs, weights, rate_kind = batch
    array, value = (INVALID[rate_kind] + INVALID_EITHER)[pick]
    if rhat.size == 0 or (array == "robs" and robs.dtype.kind != "f" and not value < 0):
        return
    weights = np.ones((rhat.shape[0], 1), np.float32) if weights is None else weights.astype(np.float32)
    target = {"rhat": rhat, "robs": robs, "dfs": weights}[array]
    row, cell = divmod(where % rhat.size, rhat.shape[1])
    if array != "dfs":  # at a valid entry: masked ones may hold anything
        weights[row, min(cell, weights.shape[1] - 1)] = 1.0
    target[row, min(cell, target.shape[1] - 1)] = value
    messages = []
    for name in ("compiled", "numpy"):
        with kernel(name), pytest.raises(InvalidValuesError) as error:
            batch_stats(rhat, robs, weights, rate_kind)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert array in messages[0]


PROBE = """
import json, sys
import numpy as np
import bpseval
assert "numba" not in sys.modules, "import bpseval must not import numba"
from bpseval.kernel import compiled
from bpseval.kernel.stats import batch_stats
rng = np.random.default_rng(0)
rhat = rng.gamma(1.0, 0.2, size=(300, 20)).astype(np.float32)
with compiled.work(compiled.WORTH_ENTRIES):  # part of work large enough for the compiled kernel
    stats = batch_stats(rhat, rng.poisson(rhat).astype(np.float32), (rng.random((300, 20)) > 0.2).astype(np.float32))
accumulate = compiled._compiled()
print(json.dumps({"numba": "numba" in sys.modules, "compiled": accumulate is not None,
                  "hits": sum(accumulate.stats.cache_hits.values()) if accumulate else 0,
                  "misses": sum(accumulate.stats.cache_misses.values()) if accumulate else 0,
                  "spikes": float(stats.spikes.sum())}))
"""


def run_probe(environment: dict[str, str], package_root: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run PROBE in a fresh interpreter that imports bpseval from `package_root`, without NUMBA_/BPSEVAL_ settings
    but `environment`'s."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("NUMBA_", "BPSEVAL_"))}
    env |= {"PYTHONPATH": str(package_root), **environment}
    return subprocess.run(  # run from package_root: `-c` puts the working directory first on sys.path
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=package_root, check=False
    )


def probe(environment: dict[str, str], package_root: Path = REPO) -> dict:
    """PROBE's JSON line; it must succeed."""
    completed = run_probe(environment, package_root)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_compiled_code_is_cached_on_disk_so_the_next_process_does_not_compile(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    cold = probe({"NUMBA_CACHE_DIR": str(cache)})
    assert cold["numba"] and cold["compiled"] and cold["misses"] >= 1 and cold["hits"] == 0
    assert list(cache.rglob("numba_loops.accumulate-*.nbi")), "numba wrote no index to NUMBA_CACHE_DIR"
    warm = probe({"NUMBA_CACHE_DIR": str(cache)})
    assert warm["hits"] >= 1 and warm["misses"] == 0
    assert warm["spikes"] == cold["spikes"]
    with kernel("numpy"):  # the reference, in this process
        rng = np.random.default_rng(0)
        rhat = rng.gamma(1.0, 0.2, size=(300, 20)).astype(np.float32)
        robs = rng.poisson(rhat).astype(np.float32)
        assert (
            float(batch_stats(rhat, robs, (rng.random((300, 20)) > 0.2).astype(np.float32)).spikes.sum())
            == (cold["spikes"])
        )


TRAINING = """
import numpy as np
from bpseval import bits_per_spike
rng = np.random.default_rng(5)
rhat = rng.gamma(1.0, 0.3, size=(3000, 40)).astype(np.float32)
robs = rng.poisson(rhat).astype(np.float32)
print(bits_per_spike(rhat, robs, (rng.random(rhat.shape) > 0.2).astype(np.float32)).to_json(double_precision=15))
"""
"""A training process scoring a batch in memory (BPSEVAL_KERNEL=compiled stands for one large enough)."""


def training(kernel: str, numba_cache: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("NUMBA_", "BPSEVAL_"))}
    env |= {"PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(numba_cache), compiled.ENVIRONMENT_VARIABLE: kernel}
    return subprocess.run(  # a hang fails the test after 5 minutes
        [sys.executable, "-c", TRAINING], capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=300
    )


@pytest.fixture(scope="module")
def numba_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A numba cache of the compiled kernel, written by a training process; that process's output, and the numpy
    kernel's."""
    cache = tmp_path_factory.mktemp("numba") / "cache"
    fast, reference = training("compiled", cache), training("numpy", cache)
    assert fast.returncode == reference.returncode == 0, fast.stderr + reference.stderr
    assert fast.stderr == "" and list(cache.rglob("numba_loops.accumulate-*.nbc")), fast.stderr
    return cache, fast.stdout, reference.stdout


def flip_a_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


NUMBA_CORRUPTIONS = {
    "a garbage index": ("nbi", lambda path: path.write_bytes(os.urandom(500))),  # UnpicklingError, exit 1
    "an empty index": ("nbi", lambda path: path.write_bytes(b"")),  # EOFError, exit 1
    "a byte flipped in the object code's header": ("nbc", lambda path: flip_a_byte(path, 200)),  # LLVM abort, exit 134
    "a byte flipped near the end": ("nbc", lambda path: flip_a_byte(path, path.stat().st_size - 300)),
    "a FIFO in place of the index": ("nbi", lambda path: (path.unlink(), os.mkfifo(path))),  # a hang
    "data cut short": ("nbc", lambda path: path.write_bytes(path.read_bytes()[:1000])),  # EOFError, exit 1
}


@pytest.mark.parametrize("corruption", list(NUMBA_CORRUPTIONS))
def test_a_damaged_numba_cache_falls_back_to_the_numpy_kernel_with_one_warning(
    tmp_path: Path, numba_cache: tuple[Path, str, str], corruption: str
) -> None:
    """numba unpickles its cache and runs the machine code in it: each damage was an exception, an abort or a crash."""
    good, fast, reference = numba_cache
    cache = tmp_path / "cache"
    shutil.copytree(good, cache)
    suffix, damage = NUMBA_CORRUPTIONS[corruption]
    (target,) = cache.rglob(f"numba_loops.accumulate-*.{suffix}")
    damage(target)
    result = training("compiled", cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: the compiled kernel's cache in "), result.stderr
    assert target.name in lines[0] and "numpy kernel" in lines[0]
    if corruption == "a garbage index":  # the damaged files were removed: the next process compiles them afresh
        again = training("compiled", cache)
        assert (again.returncode, again.stderr, again.stdout) == (0, "", fast)


def read_only_install(tmp_path: Path) -> Path:
    """A copy of the package whose kernel directory cannot hold `__pycache__` (a file is in its place):
    numba's in-tree cache is unusable, as in a read-only site-packages (root ignores permissions)."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "bpseval", site / "bpseval", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "bpseval" / "kernel" / "__pycache__").write_text("not a directory")
    return site


def test_a_read_only_install_caches_in_the_user_cache_directory(tmp_path: Path) -> None:
    user_cache = tmp_path / "xdg-cache"
    first = probe({"XDG_CACHE_HOME": str(user_cache)}, read_only_install(tmp_path))
    assert first["compiled"] and first["misses"] >= 1
    assert list((user_cache / "numba").rglob("numba_loops.accumulate-*.nbi"))
    assert probe({"XDG_CACHE_HOME": str(user_cache)}, tmp_path / "site")["hits"] >= 1


def test_without_a_writable_cache_the_numpy_reference_is_used(tmp_path: Path) -> None:
    blocked = tmp_path / "xdg-cache"
    blocked.write_text("not a directory")  # neither the install nor the user cache directory can take files
    site = read_only_install(tmp_path)
    result = probe({"XDG_CACHE_HOME": str(blocked)}, site)
    assert result["numba"] and not result["compiled"]
    completed = run_probe({"XDG_CACHE_HOME": str(blocked), "BPSEVAL_KERNEL": "compiled"}, site)
    assert completed.returncode == 1
    assert "MissingExtraError" in completed.stderr and "NUMBA_CACHE_DIR" in completed.stderr


def test_without_numba_the_reference_runs_and_compiled_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['numba'] = None\n"  # import numba raises ImportError, as when not installed
        "import numpy as np\n"
        "from bpseval.kernel.stats import batch_stats\n"
        "print(batch_stats(np.ones((3, 2)), np.ones((3, 2))).n_valid.tolist())\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("BPSEVAL_")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "[3, 3]", run.stderr
    env["BPSEVAL_KERNEL"] = "compiled"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 1 and install_hint("fast") in run.stderr


def test_compute_refuses_an_unknown_kernel_in_one_line(tmp_path: Path, invoke) -> None:
    write_raw_shard(tmp_path / "run" / "shard_rank0.h5", {"v1": poisson_dataset(1)})
    with mock.patch.dict(os.environ, {compiled.ENVIRONMENT_VARIABLE: "fortran"}):
        result = invoke("compute", tmp_path / "run", "--no-cache")
    assert result.exit_code == 2
    assert "Error:" in result.output and "BPSEVAL_KERNEL='fortran'" in result.output and "numpy" in result.output
    assert "Traceback" not in result.output


def test_compute_gives_the_same_numbers_with_either_kernel(tmp_path: Path, invoke) -> None:
    for rank in range(2):
        write_raw_shard(
            tmp_path / "run" / f"shard_rank{rank}.h5", {"v1": poisson_dataset(rank, 300, 7)}, rank=rank, world_size=2
        )
    documents = {}
    for name in ("compiled", "numpy"):
        out = tmp_path / f"{name}.json"
        with kernel(name):
            result = invoke("compute", tmp_path / "run", "--no-cache", "--json", out)
        assert result.exit_code == 0, result.output
        documents[name] = json.loads(out.read_text())
    fast, reference = documents["compiled"]["cells"], documents["numpy"]["cells"]
    assert [cell["n_valid"] for cell in fast] == [cell["n_valid"] for cell in reference]
    np.testing.assert_allclose([cell["bps"] for cell in fast], [cell["bps"] for cell in reference], rtol=1e-10)
