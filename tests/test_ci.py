"""`bpseval compute --ci`: bootstrap intervals of one run, in the JSON, the table and `evaluate()`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bpseval import evaluate
from bpseval.cli import app
from bpseval.errors import ArgumentError
from bpseval.features.uncertainty import GROUPS, METRICS, IntervalSettings, Units, estimates, intervals, units_of
from bpseval.kernel.cellstats import CellStats
from bpseval.kernel.stats import batch_stats, block_stats, reduce_rows
from bpseval.run.merge import MergedDataset
from bpseval.run.scored import (
    ScoreSettings,
    marked_scores,
    metric_partials,
    metric_values,
    overall_of,
    overall_values,
    score,
    score_dataset,
)
from bpseval.shard.writer import ShardWriter
from tests.conftest import peak_bytes, poisson_dataset, write_raw_shard

CI_KEYS = [f"{metric}_ci" for metric in METRICS]


def _run(tmp_path, *, sample_idx: bool = True, name: str = "session_a"):
    """Two ranks, two datasets of 300 samples each (with sample_idx unless told otherwise)."""
    for rank in range(2):
        datasets = {}
        for index, dataset in enumerate((name, "session_b")):
            arrays = poisson_dataset(10 * rank + index, n_rows=150, n_cells=5)
            if sample_idx:
                arrays["sample_idx"] = np.arange(rank * 150, rank * 150 + 150)
            datasets[dataset] = arrays
        write_raw_shard(tmp_path / "run" / f"rank-{rank:04d}.h5", datasets, rank=rank, world_size=2)
    return tmp_path / "run"


def test_compute_ci_adds_intervals_to_every_dataset_and_overall_reproducibly(invoke, tmp_path):
    run = _run(tmp_path)
    plain = json.loads(invoke("compute", run, "--json", "-").stdout)
    assert "ci" not in plain and not any(key in plain["overall"] for key in CI_KEYS)
    assert not any(key in entry for entry in plain["datasets"] for key in CI_KEYS)
    first = invoke("compute", run, "--ci", "0.95", "--json", "-")
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert document["ci"] == {
        "level": 0.95,
        "over": "blocks",
        "resamples": 1000,
        "seed": 0,
        "method": "studentized bootstrap (bootstrap-t), standard errors by a grouped jackknife (at most 20 groups)",
    }
    for entry in [*document["datasets"], document["overall"]]:
        for metric in METRICS:
            low, high = entry[f"{metric}_ci"]
            assert low < high and high - low < 1.0
        assert entry["bps_ci"][0] < entry["bps"] < entry["bps_ci"][1]
    again = json.loads(invoke("compute", run, "--ci", "0.95", "--json", "-").stdout)
    assert again == document
    other = json.loads(invoke("compute", run, "--ci", "0.95", "--ci-seed", "1", "--json", "-").stdout)
    assert other["overall"]["bps_ci"] != document["overall"]["bps_ci"]
    assert other["overall"]["bps"] == document["overall"]["bps"]
    cells = json.loads(invoke("compute", run, "--ci", "0.9", "--ci-over", "cells", "--json", "-").stdout)
    assert cells["ci"]["over"] == "cells" and cells["ci"]["level"] == 0.9
    assert cells["overall"]["bps_ci"] != document["overall"]["bps_ci"]


def test_evaluate_gives_the_same_intervals_as_the_command(invoke, tmp_path):
    run = _run(tmp_path)
    document = json.loads(invoke("compute", run, "--ci", "0.95", "--ci-resamples", "300", "--json", "-").stdout)
    result = evaluate(run, ci=0.95, ci_resamples=300)
    assert result.to_dict()["overall"]["bps_ci"] == document["overall"]["bps_ci"]
    assert list(result.intervals.overall["bps"]) == document["overall"]["bps_ci"]
    assert evaluate(run).intervals is None


def test_ci_over_blocks_without_sample_idx_exits_2_naming_the_dataset_and_the_ways_out(invoke, tmp_path):
    run = _run(tmp_path, sample_idx=False)
    result = invoke("compute", run, "--ci", "0.95")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: dataset 'session_a' has no sample_idx, so --ci-over blocks cannot resample its samples: write"
        " sample_idx with its rows, or use --ci-over cells."
    )
    cells = invoke("compute", run, "--ci", "0.95", "--ci-over", "cells", "--json", "-")
    assert cells.exit_code == 0 and json.loads(cells.stdout)["overall"]["bps_ci"] is not None


def test_bad_ci_options_exit_2_before_any_shard_is_read(invoke, tmp_path):
    missing = tmp_path / "nothing here"
    for args, message in (
        (["--ci", "1.5"], "Error: ci must be a level between 0 and 1 (exclusive), e.g. 0.95, not 1.5"),
        (["--ci", "0.95", "--all-steps"], "Error: --ci gives intervals on one step: leave out --all-steps."),
    ):
        result = invoke("compute", missing, *args)
        assert result.exit_code == 2 and result.stderr.strip() == message
    assert invoke("compute", missing, "--ci", "0.95", "--ci-resamples", "10").exit_code == 2
    try:
        evaluate(missing, ci=0.95, ci_over="samples")
    except ArgumentError as error:
        assert str(error) == "ci_over must be one of blocks, cells, not 'samples'"
    else:
        raise AssertionError("evaluate accepted ci_over='samples'")


@pytest.mark.parametrize(("level", "needed"), [(0.99, 199), (0.999, 1999), (0.9999, 19999)])
def test_a_level_the_resamples_cannot_support_exits_2_naming_both_options(invoke, tmp_path, level, needed):
    """With 100 resamples, the 0.99, 0.999 and 0.9999 intervals would all be the extreme replicates."""
    result = invoke("compute", tmp_path / "nothing here", "--ci", str(level), "--ci-resamples", "100")
    assert result.exit_code == 2
    tail = f"{50 * (1 - level):g}"
    assert result.stderr == (
        f"Error: ci (--ci) {level:g} needs ci_resamples (--ci-resamples) >= {needed}: with 100 resamples the {tail}%"
        f" tails of a {100 * level:g}% interval lie beyond the most extreme replicate; give at least {needed}"
        " resamples, or a lower level.\n"
    )
    with pytest.raises(ArgumentError, match=f"ci_resamples \\(--ci-resamples\\) >= {needed}:"):
        evaluate(tmp_path / "nothing here", ci=level, ci_resamples=needed - 1)
    assert IntervalSettings(level, resamples=needed).resamples == needed


def test_a_higher_level_with_enough_resamples_gives_a_wider_interval(tmp_path):
    run = _run(tmp_path)
    widths = []
    for level in (0.95, 0.99):
        low, high = evaluate(run, ci=level, ci_resamples=199).intervals.overall["bps"]
        widths.append(high - low)
    assert widths[0] < widths[1]


def test_interval_table_keeps_every_number_whole_at_80_columns(tmp_path):
    run = _run(tmp_path, name="a_rather_long_session_name_2024_06_01")
    document = json.loads(CliRunner().invoke(app, ["compute", str(run), "--ci", "0.95", "--json", "-"]).stdout)
    result = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}).invoke(
        app, ["compute", str(run), "--ci", "0.95"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("Bootstrap intervals · over blocks of samples · 1000 resamples, seed 0" in line for line in lines)
    for entry in [*document["datasets"], document["overall"]]:
        for metric in ("bps_ci", "bps_pooled_ci"):
            low, high = entry[metric]
            row = f"[{low:.4f}, {high:.4f}]"
            assert any(row in line for line in lines), row
    table_rows = [line for line in lines if "overall" in line and "[" in line]
    assert len(table_rows) == 1  # the narrow table, not the one-block-per-row layout


def test_stats_only_shards_resample_their_own_blocks(invoke, tmp_path):
    rng = np.random.default_rng(3)
    rates = np.exp(rng.normal(0.0, 0.5, (400, 4)))
    with ShardWriter(tmp_path / "run", 0, 1, store="stats", block_size=10) as writer:
        writer.add("d", rates, rng.poisson(rates).astype(np.float64), sample_idx=np.arange(400))
    result = invoke("compute", tmp_path / "run", "--ci", "0.95", "--json", "-")
    assert result.exit_code == 0, result.output
    low, high = json.loads(result.stdout)["datasets"][0]["bps_pooled_ci"]
    assert low < high


def test_too_few_blocks_give_no_interval(tmp_path):
    rng = np.random.default_rng(4)
    rates = np.full((20, 3), 0.7)
    per_block = block_stats(np.zeros(20, dtype=np.int64), rates, rng.poisson(rates).astype(np.float64))
    merged = MergedDataset("one", np.arange(3), "rate", [per_block.total()], 20, 0, "", per_block.stats)
    found = intervals(score([merged], step=0, world_size=1), IntervalSettings(resamples=100))
    assert found.datasets["one"] == dict.fromkeys(METRICS) and found.overall == dict.fromkeys(METRICS)


def test_replicates_of_many_blocks_and_cells_stay_within_the_memory_bound():
    """100 replicates of 1000 blocks × 200 cells, each merged once whole and once per left-out jackknife group (21
    rows), would take 3.4 GB at once in reduce_rows; chunks keep it small."""
    rng = np.random.default_rng(5)
    rates = rng.gamma(2.0, 0.5, (2000, 200))
    per_block = block_stats(np.arange(2000) // 2, rates, rng.poisson(rates).astype(np.float64))
    merged = MergedDataset("big", np.arange(200), "rate", [per_block.total()], 2000, 0, "", per_block.stats)
    scored = score([merged], step=0, world_size=1)
    assert peak_bytes(lambda: intervals(scored, IntervalSettings(resamples=100))) < 300 << 20


def test_standard_errors_are_the_grouped_jackknife_of_the_cells_by_hand():
    """The estimate's standard error over cells: drawn position j in group j mod 20 (7 groups of one cell for 7 cells),
    each group left out; the overall one adds the datasets' jackknife variances (they are drawn independently)."""
    rng = np.random.default_rng(6)
    merged = []
    for name, cells in (("many", 45), ("few", 7)):
        rates = rng.gamma(2.0, 0.5, (300, cells))
        stats = batch_stats(rates, rng.poisson(rates * rng.uniform(0.5, 1.5, cells)).astype(np.float64))
        merged.append(MergedDataset(name, np.arange(cells), "rate", [stats], 300, 0))
    scored = score(merged, step=0, world_size=1)
    bps = [dataset.scores.bps for dataset in scored.datasets]
    assert all((dataset.scores.status == "ok").all() for dataset in scored.datasets)

    def jackknife(values: list[float]) -> float:
        groups = len(values)
        return (groups - 1) / groups * float(np.sum((np.array(values) - np.mean(values)) ** 2))

    def left_out(cells: np.ndarray) -> list[np.ndarray]:
        groups = min(len(cells), GROUPS)
        return [cells[np.arange(len(cells)) % groups != group] for group in range(groups)]

    variances = [jackknife([kept.mean() for kept in left_out(values)]) for values in bps]
    overall = [
        jackknife([(kept.mean() + bps[1].mean()) / 2 for kept in left_out(bps[0])]),
        jackknife([(bps[0].mean() + kept.mean()) / 2 for kept in left_out(bps[1])]),
    ]
    units = [units_of(dataset, "cells") for dataset in scored.datasets]
    datasets, whole = estimates(units, [np.arange(unit.count)[None, :] for unit in units], scored.settings)
    for found, variance, dataset in zip(datasets, variances, scored.datasets, strict=True):
        assert math.isclose(found.values["bps"][0], dataset.bps, rel_tol=1e-12)
        assert math.isclose(found.errors()["bps"][0], math.sqrt(variance), rel_tol=1e-9)
    assert math.isclose(whole.errors()["bps"][0], math.sqrt(sum(overall)), rel_tol=1e-9)


def test_block_standard_errors_are_the_grouped_jackknife_of_the_blocks_left_out():
    """Over blocks, a left-out group is merged with multiplicity 0: the same numbers as scoring the other blocks."""
    rng = np.random.default_rng(8)
    rates = rng.gamma(2.0, 0.5, (600, 6))
    per_block = block_stats(np.arange(600) // 20, rates, rng.poisson(rates).astype(np.float64))
    merged = MergedDataset("d", np.arange(6), "rate", [per_block.total()], 600, 0, "", per_block.stats)
    scored = score([merged], step=0, world_size=1)
    blocks = per_block.stats
    left_out = []
    for group in range(GROUPS):
        kept = blocks.map(lambda values, group=group: values[np.arange(30) % GROUPS != group])
        left_out.append(
            score([MergedDataset("d", np.arange(6), "rate", [reduce_rows(kept)], 600, 0)], step=0, world_size=1)
        )
    datasets, whole = estimates([Units(blocks)], [np.arange(30)[None, :]], scored.settings)
    for metric in METRICS:
        values = np.array([run.datasets[0].numbers[metric] for run in left_out])
        expected = math.sqrt((GROUPS - 1) / GROUPS * float(np.sum((values - values.mean()) ** 2)))
        assert math.isclose(datasets[0].errors()[metric][0], expected, rel_tol=1e-9), metric
        assert math.isclose(whole.errors()[metric][0], expected, rel_tol=1e-9), metric


def _stats(draw, rows: int, cells: int) -> CellStats:
    """(rows, cells) statistics of Poisson batches, some cells silent or uncovered in some rows."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(rows):
        rhat = rng.gamma(2.0, 0.5, (12, cells))
        robs = rng.poisson(rhat * rng.uniform(0.2, 1.5, cells)).astype(np.float64)
        robs[:, rng.random(cells) < 0.15] = 0.0
        weights = np.broadcast_to(rng.random(cells) > 0.15, (12, cells)).astype(np.float64)
        parts.append(batch_stats(rhat, robs, weights))
    return CellStats(**{name: np.stack([getattr(part, name) for part in parts]) for name in parts[0].fields()})


@settings(max_examples=40, deadline=None)
@given(data=st.data(), clamp=st.booleans(), min_samples=st.sampled_from([0, 10]), datasets=st.integers(1, 3))
def test_row_wise_summaries_equal_score_dataset_and_overall_of_row_by_row(data, clamp, min_samples, datasets):
    scoring = ScoreSettings(clamp_negative=clamp, min_samples=min_samples)
    rows = 4
    parts, per_row = [], [[] for _ in range(rows)]
    for index in range(datasets):
        stats = _stats(data.draw, rows, data.draw(st.integers(1, 6)))
        scores = marked_scores(stats, scoring)
        parts.append(metric_partials(scores, stats, clamp))
        for row in range(rows):
            stats_row = stats.map(lambda values, row=row: values[row])
            merged = MergedDataset(f"d{index}", np.arange(stats.n_cells), "rate", [stats_row], 12, 0)
            per_row[row].append(score_dataset(merged, scoring))
    overall = overall_values(parts)
    for row in range(rows):
        expected = overall_of(per_row[row], clamp)
        for metric in METRICS:
            assert _same(overall[metric][row], getattr(expected, metric)), (metric, row)
            for index, part in enumerate(parts):
                value = metric_values(part)[metric][row]
                assert _same(value, getattr(per_row[row][index], metric)), (metric, row, index)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def test_the_table_says_in_one_line_when_the_intervals_are_asymmetric_and_why(tmp_path):
    """The shipped run's overall bps_pooled interval is lopsided around its number: one line names the most
    lopsided interval, with the numbers of the JSON, and says why."""
    run = Path(__file__).resolve().parents[1] / "examples" / "runs" / "exp1"
    command = [sys.executable, "-m", "bpseval", "compute", str(run), "--ci", "0.95", "--no-cache"]
    command += ["--json", str(tmp_path / "ci.json")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, check=False)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("Asymmetric intervals")]
    document = json.loads((tmp_path / "ci.json").read_text())
    label, metric = line.split("(")[1].split(" in ")[0].rsplit(" ", 2)[:2]
    scope = (
        document["overall"]
        if label == "overall"
        else next(entry for entry in document["datasets"] if f"dataset {entry['name']}" == label)
    )
    point, (low, high) = scope[metric], scope[f"{metric}_ci"]
    assert f"{metric} {point:.4f} in [{low:.4f}, {high:.4f}]" in line
    assert abs((high - point) - (point - low)) > 0.2 * (high - low)
    assert "skew" in line
