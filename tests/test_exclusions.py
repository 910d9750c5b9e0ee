"""`--exclude-cells`: cells left out on purpose are in no number and no gate, and every output lists them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bpseval import ShardWriter, evaluate
from bpseval.kernel.stats import OK

DATASETS = ("Allen_2022-04-13", "Allen_2022-05-02")
DEAD = ("Allen_2022-05-02", 3)
"""A unit masked on purpose: no valid sample on any rank."""
N_SAMPLES, N_CELLS = 400, 6


def dataset_arrays(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rates = rng.gamma(2.0, 0.5, (N_SAMPLES, N_CELLS))
    robs = rng.poisson(rates).astype(np.float64)
    dfs = np.ones((N_SAMPLES, N_CELLS))
    if name == DEAD[0]:
        dfs[:, DEAD[1]] = 0.0
    return rates * rng.uniform(0.7, 1.3, N_CELLS), robs, dfs


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Two ranks, two datasets of 400 samples (even sample_idx on rank 0, odd on rank 1); one dead unit."""
    arrays = {name: dataset_arrays(name, seed) for seed, name in enumerate(DATASETS)}
    for rank in range(2):
        with ShardWriter(tmp_path / "run", rank=rank, world_size=2) as shards:
            for name, (rhat, robs, dfs) in arrays.items():
                rows = np.arange(rank, N_SAMPLES, 2)
                shards.add(name, rhat[rows], robs[rows], dfs[rows], sample_idx=rows)
    (tmp_path / "dead.csv").write_text(f"dataset,cell,reason\n{DEAD[0]},{DEAD[1]},unit masked on purpose\n")
    return tmp_path / "run"


def bpseval(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "bpseval", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment, check=False)


def test_coverage_passes_with_the_dead_unit_excluded_and_says_so(run):
    tables = run.parent
    assert bpseval("coverage", run, "--min-samples", "10", cwd=tables).returncode == 1
    result = bpseval(
        "coverage", run, "--min-samples", "10", "--exclude-cells", "dead.csv", "--json", "c.json", cwd=tables
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((tables / "c.json").read_text())
    assert document["cells"] == [] and document["zero_on_some_rank"] == []
    assert [(row["dataset"], row["cell"], row["reason"]) for row in document["excluded"]] == [
        (*DEAD, "unit masked on purpose")
    ]
    assert {row["name"]: row["excluded"] for row in document["datasets"]} == {DATASETS[0]: 0, DATASETS[1]: 1}
    assert f"dataset '{DEAD[0]}': 1 cell excluded by dead.csv: cell {DEAD[1]} (unit masked on purpose)" in result.stderr
    assert "Cells excluded" in result.stdout and "unit masked on purpose" in result.stdout


def reference_numbers(result, name: str, left_out: int | None) -> dict[str, float]:
    """bps and bps_pooled of a dataset from its cells' own numbers, without the cell `left_out`."""
    cells = result.cells[(result.cells.dataset == name) & (result.cells.cell != left_out)]
    ok = cells[cells.status == OK]
    covered = cells[cells.status != "uncovered"]
    return {
        "bps": float(ok.bps.mean()),
        "bps_pooled": float(covered.ll_gain.sum() / (math.log(2) * covered.spikes.sum())),
    }


@pytest.mark.parametrize("dead_cell", [DEAD[1], 0], ids=["uncovered cell", "covered cell"])
def test_an_excluded_cell_is_in_no_number_and_listed_as_excluded(run, dead_cell):
    table = run.parent / "out.csv"
    table.write_text(f"dataset,cell\n{DEAD[0]},{dead_cell}\n")
    plain, excluded = evaluate(run, cache=False), evaluate(run, cache=False, exclude_cells=table)
    row = excluded.cells[(excluded.cells.dataset == DEAD[0]) & (excluded.cells.cell == dead_cell)]
    assert row.status.tolist() == ["excluded"]
    for name in DATASETS:
        expected = reference_numbers(plain, name, dead_cell if name == DEAD[0] else None)
        dataset = excluded.scored.dataset(name)
        assert dataset.bps == pytest.approx(expected["bps"], rel=1e-12)
        assert dataset.bps_pooled == pytest.approx(expected["bps_pooled"], rel=1e-12)
    assert excluded.overall.bps == pytest.approx(np.mean([d.bps for d in excluded.scored.datasets]), rel=1e-12)
    assert excluded.overall.cells["excluded"] == 1
    assert excluded.to_dict()["settings"]["exclude_cells"] == str(table)
    assert any("excluded by" in line for line in excluded.warnings)


def test_compare_excludes_the_cells_on_both_sides_of_a_baseline_document(run):
    folder = run.parent
    assert bpseval("compute", run, "--json", "baseline.json", cwd=folder).returncode == 0
    result = bpseval(
        "compare", run, "--baseline", "baseline.json", "--exclude-cells", "dead.csv", "--json", "c.json", cwd=folder
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((folder / "c.json").read_text())["metrics"]
    assert all(metric["delta"] == pytest.approx(0.0, abs=1e-12) for metric in metrics)
    assert "excluded by dead.csv" in result.stderr


def test_the_intervals_and_the_paired_bootstrap_keep_the_cell_excluded(run):
    folder = run.parent
    result = evaluate(run, cache=False, exclude_cells=folder / "dead.csv", ci=0.9, ci_resamples=200)
    low, high = result.intervals.datasets[DEAD[0]]["bps"]
    assert low <= result.scored.dataset(DEAD[0]).bps <= high
    compared = bpseval(
        "compare", run, "--baseline", run, "--exclude-cells", "dead.csv", "--significance", "0.1", "--bootstrap", "200",
        "--json", "-", cwd=folder,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert json.loads(compared.stdout)["mode"] == "paired"


def test_plan_lists_the_excluded_cell_instead_of_failing_on_it(run):
    folder = run.parent
    with h5py.File(folder / "masks.h5", "w") as masks:
        for name in DATASETS:
            masks[name] = dataset_arrays(name, 0)[2]
    assert bpseval("plan", "masks.h5", "--world-size", "2", cwd=folder).returncode == 1
    result = bpseval(
        "plan", "masks.h5", "--world-size", "2", "--exclude-cells", "dead.csv", "--json", "p.json", cwd=folder
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((folder / "p.json").read_text())
    by_name = {entry["name"]: entry for entry in document["datasets"]}
    assert by_name[DEAD[0]]["excluded"] == [{"cell": DEAD[1], "reason": "unit masked on purpose"}]
    assert by_name[DEAD[0]]["below"] == 0 and by_name[DEAD[0]]["flagged"] == []
    (folder / "ids.csv").write_text(f"dataset,cell_id\n{DEAD[0]},3\n")
    refused = bpseval("plan", "masks.h5", "--exclude-cells", "ids.csv", cwd=folder)
    assert refused.returncode == 2 and "give the table a 'cell' column" in refused.stderr


def test_report_and_the_settings_file_take_the_exclusions_too(run):
    folder = run.parent
    (folder / "bpseval.toml").write_text('exclude-cells = "dead.csv"\nmin-samples = 10\n')
    (folder / ".git").mkdir()  # the settings search stops here
    result = bpseval("coverage", run, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "using settings from" in result.stderr and "excluded by" in result.stderr
    report = bpseval("report", run, "-o", "r.html", cwd=folder)
    assert report.returncode == 0, report.stderr
    assert "excluded" in (folder / "r.html").read_text()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("dataset,cell,why\nAllen_2022-05-02,3,x\n", "names the column 'why'"),
        ("dataset,reason\nAllen_2022-05-02,x\n", "neither a 'cell' column"),
        ("dataset,cell\nAllen_2022-05-02,-1\n", "is not a cell index"),
    ],
)
def test_a_bad_exclusion_table_is_exit_2_naming_the_problem(run, text, problem):
    (run.parent / "bad.csv").write_text(text)
    result = bpseval("compute", run, "--exclude-cells", "bad.csv", cwd=run.parent)
    assert result.returncode == 2, result.stderr
    assert "--exclude-cells bad.csv" in result.stderr and problem in result.stderr
    assert "Traceback" not in result.stderr


def test_a_row_that_names_no_cell_of_the_run_is_said(run):
    (run.parent / "other.csv").write_text("dataset,cell\nAllen_2099-01-01,0\n")
    result = bpseval("compute", run, "--exclude-cells", "other.csv", cwd=run.parent)
    assert result.returncode == 0, result.stderr
    assert "other.csv names 1 cell that the run does not hold: dataset 'Allen_2099-01-01' cell 0" in result.stderr
