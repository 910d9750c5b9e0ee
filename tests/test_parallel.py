"""Parallel merging: processes and a real Dask cluster give the numbers of the serial merge, bit for bit."""

from __future__ import annotations

import contextvars
import functools
import json
import threading

import numpy as np
import pytest

import bpseval
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.compiled import ENVIRONMENT_VARIABLE, uses_compiled
from bpseval.kernel.stats import batch_stats
from bpseval.run.merge import CHUNK_ELEMENTS, OVERLAP_ENTRIES, merge_run
from bpseval.run.parallel import one_ahead
from tests.conftest import poisson_dataset, table_rows, write_raw_shard


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Three ranks, five datasets of different sizes, with padding duplicates."""
    root = tmp_path_factory.mktemp("parallel")
    datasets = {f"Allen_2022-0{i}-01": poisson_dataset(i, n_rows=300 + 50 * i, n_cells=10 + 7 * i) for i in range(1, 6)}
    for rank in range(3):
        with bpseval.ShardWriter(root, rank, 3, step=2) as writer:
            for name, arrays in datasets.items():
                rows = np.resize(np.arange(len(arrays["rhat"])), 3 * -(-len(arrays["rhat"]) // 3))[rank::3]
                writer.add(name, *(arrays[key][rows] for key in ("rhat", "robs", "dfs")), sample_idx=rows)
    return root


def as_json(result: bpseval.Result) -> str:
    return result.to_json()


def test_jobs_give_identical_results(run_dir):
    serial = bpseval.evaluate(run_dir)
    assert as_json(bpseval.evaluate(run_dir, jobs=2)) == as_json(serial)
    assert as_json(bpseval.evaluate(run_dir, jobs=4)) == as_json(serial)


def test_cli_jobs_option_prints_the_same_json(invoke, run_dir):
    one, two = (invoke("compute", run_dir, "--jobs", jobs, "--json", "-", "--no-cache") for jobs in ("1", "2"))
    assert one.exit_code == two.exit_code == 0
    assert one.stdout == two.stdout


def test_progress_reports_bytes_up_to_the_total(run_dir):
    seen = []
    merge_run(run_dir, on_progress=lambda done, total: seen.append((done, total)))
    totals = {total for _, total in seen}
    assert len(seen) == 5 and len(totals) == 1
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1][0] == totals.pop() > 0


def test_dask_local_cluster_gives_identical_results(invoke, run_dir):
    serial = invoke("compute", run_dir, "--json", "-")
    on_dask = invoke("compute", run_dir, "--scheduler", "local", "--jobs", "2", "--json", "-", "--no-cache")
    assert on_dask.exit_code == 0, on_dask.output
    assert on_dask.stdout == serial.stdout


def test_dask_scheduler_address_on_loopback(run_dir):
    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        result = bpseval.evaluate(run_dir, scheduler=cluster.scheduler_address)
    assert as_json(result) == as_json(bpseval.evaluate(run_dir))


def test_unreachable_scheduler_exits_2(invoke, run_dir):
    result = invoke(
        "compute", run_dir, "--scheduler", "tcp://127.0.0.1:1", "--no-cache"
    )  # a cached step needs no scheduler
    assert result.exit_code == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in result.stderr


def test_several_runs_give_one_row_each_and_sort(invoke, run_dir, tmp_path):
    worse = tmp_path / "worse"
    for rank in range(1):
        with bpseval.ShardWriter(worse, rank, 1) as writer:
            arrays = poisson_dataset(1, n_rows=350, n_cells=17)
            writer.add("Allen_2022-01-01", arrays["rhat"] * 3, arrays["robs"], arrays["dfs"])
    result = invoke("compute", worse, run_dir, "--sort", "bps", "--json", "-")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [run["run"] for run in runs] == [str(worse), str(run_dir)]
    table = invoke("compute", worse, run_dir, "--sort", "bps")
    names = [row[0] for row in table_rows(table.stdout)]
    assert names.index(str(run_dir)) < names.index(str(worse))  # best first
    invoke("compute", worse, run_dir, "--csv", tmp_path / "runs.csv")
    header = (tmp_path / "runs.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["run", "step", "bps", "bps_pooled"] and "bps[Allen_2022-05-01]" in header


SCALE: contextvars.ContextVar[int] = contextvars.ContextVar("scale", default=1)


def scaled_or_refused(item: int) -> tuple[int, str]:
    """item x the caller's SCALE, with the thread it ran on; negative items are refused."""
    if item < 0:
        raise ValueError(f"refused {item}")
    return item * SCALE.get(), threading.current_thread().name


def test_one_ahead_gives_each_result_in_order_on_the_thread_it_was_worth() -> None:
    items = [3, 40, 50, 4, 60, -70, 80, -5]
    token = SCALE.set(10)  # seen by the background calls too
    try:
        outcomes = []
        for item, result in one_ahead(iter(items), scaled_or_refused, lambda item: abs(item) >= 10):
            try:
                outcomes.append((item, *result()))
            except ValueError as error:
                outcomes.append((item, str(error), None))
    finally:
        SCALE.reset(token)
    assert [item for item, *_ in outcomes] == items
    for item, value, thread in outcomes:
        if item < 0:
            assert value == f"refused {item}" and thread is None
        else:
            assert value == 10 * item
            assert thread.startswith("bpseval-merge-") == (item >= 10), (item, thread)


def test_large_chunks_reduced_while_the_next_is_read_add_up_in_order(invoke, tmp_path, monkeypatch) -> None:
    """Chunks large enough to be reduced on the background thread (by the compiled kernel): the dataset's
    statistics are the in-order sum of its chunks' to the last bit, and a bad value in a later chunk is
    named at its row of the shard."""
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "compiled")
    n_cells = 300
    chunk_rows = CHUNK_ELEMENTS // n_cells
    assert chunk_rows * n_cells >= OVERLAP_ENTRIES and uses_compiled("rate", chunk_rows * n_cells)
    arrays = poisson_dataset(5, n_rows=4 * chunk_rows + 17, n_cells=n_cells)
    write_raw_shard(tmp_path / "run" / "rank0.h5", {"big": arrays})
    merged = merge_run(tmp_path / "run").datasets[0].total
    chunks = [
        batch_stats(*(arrays[name][start : start + chunk_rows] for name in ("rhat", "robs", "dfs")))
        for start in range(0, len(arrays["rhat"]), chunk_rows)
    ]
    expected = functools.reduce(CellStats.__add__, chunks)
    for name in STAT_FIELDS:
        np.testing.assert_array_equal(getattr(merged, name), getattr(expected, name), err_msg=name)
    row = 3 * chunk_rows + 5
    arrays["rhat"][row, 7], arrays["dfs"][row, 7] = np.nan, 1.0
    write_raw_shard(tmp_path / "bad" / "rank0.h5", {"big": arrays})
    result = invoke("compute", tmp_path / "bad", "--no-cache")
    assert result.exit_code == 2
    assert f"rhat has 1 NaN or infinite value (first at sample row {row}, cell 7)" in result.output


def test_the_background_thread_ends_with_its_items_and_when_the_caller_stops_early() -> None:
    def merge_threads() -> list[str]:
        return [thread.name for thread in threading.enumerate() if thread.name.startswith("bpseval-merge-")]

    assert [item for item, result in one_ahead(iter([20, 30]), scaled_or_refused, lambda item: True)] == [20, 30]
    assert merge_threads() == []
    stopped = one_ahead(iter([20, 30, 40]), scaled_or_refused, lambda item: True)
    next(stopped)
    assert merge_threads() != []
    stopped.close()
    assert merge_threads() == []
