"""Datasets merged in batches: the numbers do not depend on the grouping or the number of processes.

`merge_selection` groups datasets into tasks of roughly equal cost (`bpseval.run.parallel.batches`)
and each task opens every shard once to read all of its datasets (`_merge_datasets`, `ShardFile`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpseval
from bpseval.errors import BpsevalError, ShardError
from bpseval.kernel.cellstats import STAT_FIELDS
from bpseval.run.catalog import RunCatalog
from bpseval.run.merge import PART_COST, MergedDataset, _dataset_parts, _merge_datasets, merge_run, merge_step
from bpseval.run.parallel import MAX_BATCH_COST, MIN_BATCH_COST, batches, run_tasks
from tests.conftest import poisson_dataset

RANKS = 3
BLOCKS = 4


def write_run(root: Path, datasets: int, *, n_rows: int = 30) -> Path:
    """`datasets` small datasets on RANKS ranks, dealt as DistributedSampler does (padding copies), every
    third one without sample_idx."""
    arrays = {f"d{i:03d}": poisson_dataset(i, n_rows=n_rows + i % 7, n_cells=3 + i % 5) for i in range(datasets)}
    for rank in range(RANKS):
        with bpseval.ShardWriter(root, rank, RANKS) as writer:
            for index, (name, data) in enumerate(arrays.items()):
                rows = np.resize(np.arange(len(data["rhat"])), RANKS * -(-len(data["rhat"]) // RANKS))[rank::RANKS]
                index_kw = {} if index % 3 == 2 else {"sample_idx": rows}
                writer.add(name, *(data[key][rows] for key in ("rhat", "robs", "dfs")), **index_kw)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("batching"), 9)


@pytest.fixture(scope="module")
def reference(run_dir: Path) -> tuple[list, list[MergedDataset]]:
    """The datasets' parts and each dataset merged alone, as one task of its own."""
    items = list(_dataset_parts(RunCatalog.scan(run_dir).select().shards).items())
    return items, [_merge_datasets([item], RANKS, BLOCKS)[0] for item in items]


def assert_identical(got: list[MergedDataset], expected: list[MergedDataset]) -> None:
    """Equal to the last bit: every statistic of every rank and block, counts, identities, warnings."""
    assert [dataset.name for dataset in got] == [dataset.name for dataset in expected]
    for a, b in zip(got, expected, strict=True):
        assert (a.samples, a.duplicates_dropped, a.identity, a.warnings) == (
            b.samples,
            b.duplicates_dropped,
            b.identity,
            b.warnings,
        )
        assert np.array_equal(a.cell_ids, b.cell_ids)
        pairs = list(zip(a.per_rank, b.per_rank, strict=True))
        if b.per_block is not None:
            pairs.append((a.per_block, b.per_block))
        else:
            assert a.per_block is None
        for x, y in pairs:
            for key in STAT_FIELDS:
                assert getattr(x, key).tobytes() == getattr(y, key).tobytes(), (a.name, key)


@st.composite
def groupings(draw: st.DrawFn, n: int) -> list[list[int]]:
    """A partition of range(n) into consecutive runs (the shape `batches` produces)."""
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1)))
    bounds = [0, *cuts, n]
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), jobs=st.integers(1, 3))
def test_numbers_are_bit_identical_whatever_the_grouping_and_the_processes(reference, data, jobs) -> None:
    items, alone = reference
    grouping = data.draw(groupings(len(items)))
    tasks = [([items[i] for i in group], RANKS, BLOCKS) for group in grouping]
    results = run_tasks(_merge_datasets, tasks, jobs=jobs, costs=[len(group) for group in grouping])
    assert_identical([dataset for result in results for dataset in result], alone)


def test_merge_run_gives_the_same_json_with_any_jobs(run_dir) -> None:
    serial = bpseval.evaluate(run_dir, blocks=BLOCKS).to_json()
    for jobs in (2, 3):
        assert bpseval.evaluate(run_dir, jobs=jobs, blocks=BLOCKS).to_json() == serial


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(0, 2 * MAX_BATCH_COST), max_size=60) | st.lists(st.integers(0, 4 << 20), max_size=3000),
    jobs=st.integers(1, 8),
)
def test_batches_are_consecutive_runs_of_the_right_size(costs, jobs) -> None:
    runs = batches(costs, jobs)
    assert [index for run in runs for index in run] == list(range(len(costs)))
    assert all(run for run in runs)
    target = MAX_BATCH_COST if jobs == 1 else min(MAX_BATCH_COST, max(MIN_BATCH_COST, sum(costs) / (4 * jobs)))
    for run in runs[:-1]:
        assert sum(costs[i] for i in run) >= target  # big enough to amortise a task
        assert sum(costs[i] for i in run[:-1]) < target  # and no bigger than needed
    assert len(runs) <= sum(costs) / target + 1


def test_thousands_of_tiny_datasets_make_a_handful_of_tasks() -> None:
    tiny = [2 * (1 << 18) + 4_000] * 3000  # 3,000 datasets of 2 shards: their part cost and a few KB
    assert len(batches(tiny, 1)) == 3  # 1.6 GB of cost in batches of at most MAX_BATCH_COST
    assert len(batches(tiny, 2)) == 8  # 4 per job
    assert [len(run) for run in batches([MAX_BATCH_COST * 2, 10, 10], 2)] == [1, 2]


def test_progress_is_reported_per_dataset_when_datasets_are_batched(run_dir) -> None:
    seen: list[tuple[int, int]] = []
    merged = merge_run(run_dir, jobs=2, on_progress=lambda done, total: seen.append((done, total)))
    assert len(seen) == len(merged.datasets) == 9
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1][0] == seen[-1][1] > 0


def test_bad_values_in_a_later_dataset_of_a_batch_name_its_file_dataset_and_row(tmp_path, invoke) -> None:
    run = write_run(tmp_path / "run", 6)
    bad = run / "step-000000" / "rank-0002.h5"
    with h5py.File(bad, "r+") as handle:
        handle["datasets/d004/rhat"][1, 2] = np.nan
    with pytest.raises(BpsevalError, match=r"rank-0002\.h5: dataset 'd004'.*NaN") as raised:
        merge_run(run)
    assert "row 1" in str(raised.value)
    result = invoke("compute", run, "--no-cache", "--jobs", "2")
    assert result.exit_code == 2
    assert "rank-0002.h5" in result.stderr and "'d004'" in result.stderr and "Traceback" not in result.stderr


def test_a_shard_changed_after_its_header_was_read_is_named(tmp_path) -> None:
    run = write_run(tmp_path / "run", 4)
    catalog = RunCatalog.scan(run)
    with h5py.File(run / "step-000000" / "rank-0001.h5", "r+") as handle:
        del handle["datasets/d003/robs"]
    with pytest.raises(ShardError, match=r"rank-0001\.h5: dataset 'd003' cannot be opened"):
        merge_step(catalog)


def test_cli_json_is_identical_with_one_and_two_jobs_on_many_datasets(tmp_path, invoke) -> None:
    run = write_run(tmp_path / "run", 60, n_rows=8)
    one, two = (invoke("compute", run, "--no-cache", "--jobs", jobs, "--json", "-") for jobs in ("1", "2"))
    assert one.exit_code == two.exit_code == 0, one.output
    assert one.stdout == two.stdout and len(json.loads(one.stdout)["datasets"]) == 60


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("robs", lambda values: np.concatenate([values, values[:, :1]], axis=1)),  # one more cell
        ("rhat", lambda values: np.concatenate([values, values[:1]])),  # one more row: never read silently
    ],
    ids=["a cell added", "a row added"],
)
def test_an_array_whose_shape_changed_after_its_header_was_read_is_refused(tmp_path, key, change) -> None:
    run = write_run(tmp_path / "run", 4)
    catalog = RunCatalog.scan(run)
    with h5py.File(run / "step-000000" / "rank-0001.h5", "r+") as handle:
        values = handle[f"datasets/d003/{key}"][()]
        del handle[f"datasets/d003/{key}"]
        handle[f"datasets/d003/{key}"] = change(values)
    with pytest.raises(
        ShardError, match=rf"rank-0001\.h5: dataset 'd003': {key} has shape .* changed since its header"
    ):
        merge_step(catalog)


@pytest.mark.parametrize("blocks", [None, BLOCKS])
def test_one_job_opens_each_shard_once_however_many_tiny_datasets(tmp_path, monkeypatch, blocks) -> None:
    """More parts than MAX_BATCH_COST holds at PART_COST each still make one task with one job: each shard
    is opened once to read sample_idx and rows together (duplicates dropped as they are met), not once per
    task or dataset; with blocks, once more before, to read every sample_idx that the blocks cut."""
    datasets = MAX_BATCH_COST // PART_COST // 2 + 8
    run = tmp_path / "run"
    data = poisson_dataset(0, n_rows=4, n_cells=2)
    for rank in range(2):
        with bpseval.ShardWriter(run, rank, 2) as writer:
            for index in range(datasets):
                rows = np.arange(rank, 4, 2)  # no padding copies: nothing is read back to compare
                writer.add(f"d{index:04d}", *(data[key][rows] for key in ("rhat", "robs", "dfs")), sample_idx=rows)
    catalog = RunCatalog.scan(run)
    opened: list[bytes] = []
    open_file = h5py.h5f.open

    def counting_open(name: bytes, *args: object, **kwargs: object) -> h5py.h5f.FileID:
        opened.append(name)
        return open_file(name, *args, **kwargs)

    monkeypatch.setattr(h5py.h5f, "open", counting_open)
    merged = merge_step(catalog, blocks=blocks)
    assert len(merged.datasets) == datasets
    assert sorted(opened) == sorted(bytes(path) for path in merged.files for _ in range(1 if blocks is None else 2))
