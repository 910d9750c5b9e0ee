"""Every step of a run: `evaluate_steps` and `bpseval compute --all-steps` (table, JSON, CSV, incomplete steps)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

import bpseval
from bpseval import ShardWriter
from bpseval.features.steps import evaluate_steps
from bpseval.run.catalog import RunCatalog
from bpseval.views.frames import steps_frame
from tests.conftest import poisson_dataset, table_rows

DATASETS = ("Allen_2022-04-13", "Allen_2022-05-02")


def write_step(run_dir: Path, step: int, ranks=(0, 1), world_size: int = 2, n_cells: int = 6) -> None:
    """One validation pass: every rank in `ranks` writes its shard; cell 0 of the second dataset is uncovered."""
    for rank in ranks:
        with ShardWriter(run_dir, rank, world_size, step=step) as writer:
            for index, name in enumerate(DATASETS):
                arrays = poisson_dataset(100 * step + 10 * rank + index, n_cells=n_cells)
                if index == 1:
                    arrays["dfs"][:, 0] = 0.0
                writer.add(name, **arrays, sample_idx=np.arange(40) + 40 * rank)


def multi_step_run(run_dir: Path, steps=(0, 1, 2), incomplete: int | None = 3) -> Path:
    """Complete steps `steps`, and one step whose rank 1 never wrote its shard."""
    for step in steps:
        write_step(run_dir, step)
    if incomplete is not None:
        write_step(run_dir, incomplete, ranks=(0,))
    return run_dir


def test_evaluate_steps_scores_each_complete_step_like_evaluate(tmp_path):
    run = multi_step_run(tmp_path / "run")
    steps = evaluate_steps(run)
    assert steps.steps == [0, 1, 2]
    assert list(steps.incomplete) == [3]
    assert "no shard for rank 1" in steps.incomplete[3]
    for step, result in steps.results.items():
        alone = bpseval.evaluate(run, step)
        assert result.step == step
        assert result.overall.bps == alone.overall.bps
        assert result.overall.bps_pooled == alone.overall.bps_pooled
        assert result.overall.cells == {"ok": 11, "silent": 0, "uncovered": 1, "overflow": 0, "low": 0, "excluded": 0}
    frame = steps_frame(steps)
    assert list(frame.columns[:10]) == [
        "step",
        "world_size",
        *("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr"),
        *("ok", "silent", "uncovered"),
    ]
    assert list(frame["step"]) == [0, 1, 2]
    assert [f"bps[{name}]" in frame.columns for name in DATASETS] == [True, True]
    assert len({round(value, 12) for value in frame["bps"]}) == 3  # the steps really differ


def test_catalog_reports_mixed_world_sizes_and_repeated_ranks(tmp_path):
    run = tmp_path / "run"
    write_step(run, 0)
    write_step(run, 1)
    write_step(run / "stale", 1, ranks=(0,), world_size=3)  # a leftover of a 3-GPU run at step 1
    write_step(run, 2)
    write_step(run / "copy", 2, ranks=(1,))  # rank 1 of step 2 twice
    catalog = RunCatalog.scan(run)
    assert catalog.complete_steps == [0]
    assert "mixes world sizes [2, 3]" in catalog.skipped_steps[1]
    assert "rank 1 of step 2 appears twice" in catalog.skipped_steps[2]
    assert not catalog.skipped_steps[1].startswith(str(run))  # the run directory is said once, not per step
    steps = evaluate_steps(catalog)
    assert list(steps.results) == [0] and list(steps.failed) == [1, 2] and steps.bad


def test_no_complete_step_is_bad_input(tmp_path):
    run = tmp_path / "run"
    write_step(run, 5, ranks=(1,))
    with pytest.raises(bpseval.BpsevalError, match=r"no complete step .*step 5 .*no shard for rank 0"):
        evaluate_steps(run)


def test_cli_all_steps_table_lists_steps_and_skipped_ones(invoke, tmp_path):
    run = multi_step_run(tmp_path / "run")
    result = invoke("compute", run, "--all-steps")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Bits per spike by step" in out
    steps = evaluate_steps(run)
    rows = table_rows(out)
    metrics = ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr")
    assert rows == [
        [str(step), "2", "11", "0", "1", *(f"{getattr(scored.overall, metric):.4f}" for metric in metrics)]
        for step, scored in steps.results.items()
    ]
    assert "1 incomplete step skipped:" in out
    assert "  step 3 has world size 2 but no shard for rank 1" in out


def test_cli_all_steps_json_and_csv(invoke, tmp_path):
    run = multi_step_run(tmp_path / "run")
    result = invoke("compute", run, "--all-steps", "--json", "-", "--csv", tmp_path / "steps.csv")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # nothing else on stdout
    assert document["run"] == str(run)
    assert [entry["step"] for entry in document["steps"]] == [0, 1, 2]
    assert [entry["step"] for entry in document["incomplete_steps"]] == [3]
    assert "no shard for rank 1" in document["incomplete_steps"][0]["reason"]
    expected = bpseval.evaluate(run, 1)
    entry = document["steps"][1]
    for metric in ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr"):
        assert entry[metric] == getattr(expected.overall, metric), metric
        assert [d[metric] for d in entry["datasets"]] == [getattr(d, metric) for d in expected.scored.datasets]
    assert entry["cells"] == {"ok": 11, "silent": 0, "uncovered": 1, "overflow": 0, "low": 0, "excluded": 0}
    assert entry["world_size"] == 2 and len(entry["files"]) == 2
    assert [d["name"] for d in entry["datasets"]] == list(DATASETS)
    assert "Skipped incomplete step: step 3 has world size 2" in result.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "steps.csv").read_text())))
    assert [row["step"] for row in rows] == ["0", "1", "2"]
    for metric in ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr"):
        assert math.isclose(float(rows[1][metric]), getattr(expected.overall, metric), rel_tol=1e-12), metric
    assert rows[1]["uncovered"] == "1" and rows[1][f"bps[{DATASETS[0]}]"]


def test_cli_all_steps_refuses_step_and_several_runs(invoke, tmp_path):
    run = multi_step_run(tmp_path / "run", steps=(0,), incomplete=None)
    with_step = invoke("compute", run, "--all-steps", "--step", "0")
    assert with_step.exit_code == 2 and "leave out --step" in with_step.stderr
    several = invoke("compute", run, run, "--all-steps")
    assert several.exit_code == 2 and "--all-steps takes one run directory, not 2" in several.stderr
    nothing = invoke("compute", tmp_path / "missing", "--all-steps")
    assert nothing.exit_code == 2 and "no such directory" in nothing.stderr
