"""kernel/metrics.py: each summary metric is declared once, and every path that reports it follows the declaration."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bpseval.features.attribution import attribute
from bpseval.features.compare import CompareSettings, Side, compare
from bpseval.features.groups import CellGroups, score_groups
from bpseval.features.uncertainty import IntervalSettings, intervals
from bpseval.kernel.cellstats import STAT_FIELDS
from bpseval.kernel.metrics import METRICS, sums_needed
from bpseval.kernel.stats import OK, block_stats, cell_scores, reduce_rows
from bpseval.run.document import run_document
from bpseval.run.merge import MergedDataset, MergedRun
from bpseval.run.scored import score_run

N_SAMPLES, BLOCKS = 600, 30


def merged_run(label: str, gain: float) -> MergedRun:
    """Two datasets of 600 samples in 30 blocks of sample_idx; the model's rates are the truth times `gain`."""
    rng = np.random.default_rng(5)
    datasets = []
    for name, cells in (("a", 9), ("b", 6)):
        rates = rng.gamma(2.0, 0.5, (N_SAMPLES, cells))
        robs = rng.poisson(rates).astype(np.float64)
        robs[:, 0] = 0.0  # a silent cell, which takes part in the pooled numbers only
        model = rates * gain * np.exp(np.random.default_rng(1).normal(0, 0.3, rates.shape))
        blocks = block_stats(np.arange(N_SAMPLES) // (N_SAMPLES // BLOCKS), model, robs)
        datasets.append(
            MergedDataset(name, np.arange(cells), "rate", [blocks.total()], N_SAMPLES, 0, "same", blocks.stats)
        )
    return MergedRun(Path(label), 0, 1, [], datasets)


def doubled_plus_one(scores, stats):
    return 2.0 * scores.bps + 1.0


@pytest.fixture
def changed_bps(monkeypatch):
    """The bps declaration with another per-cell value: 2 · bps + 1."""
    monkeypatch.setitem(METRICS, "bps", replace(METRICS["bps"], value=doubled_plus_one))


def expected_bps(dataset) -> float:
    ok = dataset.scores.status == OK
    return float(np.mean(2.0 * dataset.scores.bps[ok] + 1.0))


def test_changing_one_declaration_changes_every_path_that_reports_the_metric(changed_bps):
    new, base = score_run(merged_run("new", 1.0)), score_run(merged_run("base", 0.9))
    # the point numbers: each dataset's, and the run's (the mean of the datasets')
    for dataset in new.datasets:
        assert dataset.bps == pytest.approx(expected_bps(dataset), rel=1e-12)
        assert dataset.bps > 1.0  # 2 · bps + 1, not bps
    assert new.overall.bps == pytest.approx(np.mean([expected_bps(d) for d in new.datasets]), rel=1e-12)
    assert run_document(new, [])["overall"]["bps"] == new.overall.bps
    # groups: a group of a dataset's cells is scored as a dataset of them
    groups = CellGroups(
        "half",
        {d.name: np.array(["x" if cell % 2 else "y" for cell in range(d.n_cells)], dtype=object) for d in new.datasets},
        [],
    )
    for group in score_groups(new, groups).groups:
        if group.dataset is not None:
            cells = [
                cell for cell in range(new.dataset(group.dataset).n_cells) if (cell % 2 == 1) == (group.value == "x")
            ]
            chosen = new.dataset(group.dataset).scores
            ok = chosen.status[cells] == OK
            assert group.numbers.bps == pytest.approx(np.mean(2.0 * chosen.bps[cells][ok] + 1.0), rel=1e-12)
    # --ci: the interval is around the declared number
    found = intervals(new, IntervalSettings(resamples=200))
    for dataset in new.datasets:
        low, high = found.datasets[dataset.name]["bps"]
        assert low < dataset.bps < high and low > 1.0
    # compare, in both bootstraps: the change and its interval are of the declared number
    for blocks in (BLOCKS, None):
        sides = [Side(run.source or "", run) for run in (new, base)]
        if blocks is None:  # no blocks: the bootstrap over cells
            sides = [
                Side(
                    side.label,
                    replace(side.scored, datasets=[replace(d, per_block=None) for d in side.scored.datasets]),
                )
                for side in sides
            ]
        comparison = compare(*sides, CompareSettings(significance=0.05, bootstrap=200, blocks=BLOCKS))
        assert comparison.mode == ("paired" if blocks else "cells")
        for metric in comparison.metrics:
            if metric.metric != "bps":
                continue
            scored = [new, base]
            if metric.scope == "overall":
                expected = [np.mean([expected_bps(d) for d in run.datasets]) for run in scored]
            else:
                expected = [expected_bps(run.dataset(metric.scope)) for run in scored]
            assert metric.delta == pytest.approx(expected[0] - expected[1], rel=1e-9)
            assert metric.interval is not None and metric.interval[0] <= metric.delta <= metric.interval[1]
    # attribution: the cells' changes add up to the change of the declared number
    attribution = attribute(new.datasets, base.datasets, "bps", (new.overall.bps, base.overall.bps))
    assert math.fsum(cell.delta for cell in attribution.cells) == pytest.approx(
        new.overall.bps - base.overall.bps, abs=1e-12
    )


@pytest.mark.parametrize("name", list(METRICS))
def test_a_metric_reads_only_the_sums_it_declares(name):
    """`needs`: merged with only those sums (the others NaN), a metric is the same, so a bootstrap may merge only
    them."""
    run = merged_run("new", 1.0)
    for dataset in run.datasets:
        blocks = dataset.per_block
        counts = np.random.default_rng(2).integers(0, 3, (8, BLOCKS)).astype(np.float64)
        every, needed = reduce_rows(blocks, counts), reduce_rows(blocks, counts, sums_needed([name]))
        assert {field for field in STAT_FIELDS if np.isnan(getattr(needed, field)).all()} >= set(STAT_FIELDS) - {
            "n_valid",
            "weight",
            "spikes",
            *sums_needed([name]),
        }
        metric = METRICS[name]
        whole = metric.of_dataset(cell_scores(every), every)
        assert np.isfinite(whole).all()
        np.testing.assert_allclose(metric.of_dataset(cell_scores(needed), needed), whole, rtol=1e-12)
