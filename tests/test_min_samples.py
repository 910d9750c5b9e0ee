"""`min_samples`: ok cells scored on too few valid samples get the status `low` and leave the means (issue #15.4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpseval
from bpseval.errors import ArgumentError
from bpseval.kernel.stats import LOW, OK, STATUSES, batch_stats
from bpseval.run.merge import MergedDataset
from bpseval.run.scored import ScoreSettings, score
from tests.conftest import write_raw_shard

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "runs" / "exp1"
FEW_SAMPLE_CELLS = [("Allen_2022-05-02", 7), ("Allen_2022-06-17", 20), ("Allen_2022-06-17", 45)]
"""The ok cells of the shipped example scored on fewer than 10 valid samples (each on 1)."""


def merged(name: str, rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> MergedDataset:
    stats = batch_stats(rhat, robs, dfs)
    return MergedDataset(name, np.arange(rhat.shape[1]), "rate", [stats], len(rhat), 0)


@st.composite
def datasets(draw) -> list[MergedDataset]:
    """1-3 datasets of random rates, counts and masks, with cells from uncovered to fully covered."""
    found = []
    for index in range(draw(st.integers(1, 3))):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        rows, cells = draw(st.integers(1, 30)), draw(st.integers(1, 8))
        rhat = rng.gamma(2.0, 0.5, (rows, cells))
        robs = rng.poisson(rhat * rng.choice([0.0, 1.0], size=cells, p=[0.1, 0.9])).astype(float)
        dfs = (rng.random((rows, cells)) < rng.random(cells)).astype(float)
        found.append(merged(f"d{index}", rhat, robs, dfs))
    return found


@settings(max_examples=60, deadline=None)
@given(datasets(), st.integers(0, 35))
def test_low_cells_are_the_ok_cells_below_n_and_only_the_means_change(data, min_samples):
    plain = score(data, step=0, world_size=1)
    marked = score(data, step=0, world_size=1, settings=ScoreSettings(min_samples=min_samples))
    for before, after in zip(plain.datasets, marked.datasets, strict=True):
        expected_low = (before.scores.status == OK) & (before.stats.n_valid < min_samples)
        assert np.array_equal(after.scores.status == LOW, expected_low)
        assert np.array_equal(after.scores.status[~expected_low], before.scores.status[~expected_low])
        np.testing.assert_array_equal(after.scores.bps, before.scores.bps)  # a low cell keeps its number
        kept = after.scores.bps[after.scores.status == OK]
        assert same(after.bps, float(kept.mean()) if len(kept) else math.nan)
        assert same(after.bps_pooled, before.bps_pooled)
        assert after.cells[LOW] == int(expected_low.sum()) and sum(after.cells.values()) == after.n_cells
    assert marked.overall.cells[LOW] == sum(dataset.cells[LOW] for dataset in marked.datasets)
    assert same(marked.overall.bps_pooled, plain.overall.bps_pooled)
    with_ok = [dataset.bps for dataset in marked.datasets if dataset.cells[OK]]
    assert same(marked.overall.bps, float(np.mean(with_ok)) if with_ok else math.nan)
    if min_samples <= 1:
        assert same(marked.overall.bps, plain.overall.bps)


def same(a: float, b: float) -> bool:
    """Equal to 1e-12 relative, or both undefined."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_the_default_keeps_todays_numbers_and_the_setting_is_recorded():
    default, zero, one = (bpseval.evaluate(EXAMPLE, min_samples=n) for n in (0, 0, 1))
    assert default.to_dict()["overall"] == one.to_dict()["overall"] == zero.to_dict()["overall"]
    assert default.overall.cells == {"ok": 123, "silent": 0, "uncovered": 1, "overflow": 0, "low": 0, "excluded": 0}
    assert default.settings["min_samples"] == 0
    marked = bpseval.evaluate(EXAMPLE, min_samples=10)
    assert marked.settings["min_samples"] == 10
    assert bpseval.Result.from_dict(json.loads(marked.to_json())).settings["min_samples"] == 10


def test_the_example_without_its_one_sample_cells(tmp_path):
    """--min-samples 10 on the shipped example: its 3 one-sample cells are low, means without them, pooled as before."""
    plain, marked = bpseval.evaluate(EXAMPLE), bpseval.evaluate(EXAMPLE, min_samples=10)
    cells = marked.cells
    low = cells[cells["status"] == LOW]
    assert list(zip(low["dataset"], low["cell"], strict=True)) == FEW_SAMPLE_CELLS
    assert low["n_valid"].tolist() == [1, 1, 1] and low["bps"].notna().all()
    ok = cells[cells["status"] == OK]
    per_dataset = ok.groupby("dataset")["bps"].mean()
    assert marked.datasets.set_index("name")["bps"].to_dict() == pytest.approx(per_dataset.to_dict(), rel=1e-12)
    assert marked.overall.bps == pytest.approx(per_dataset.mean(), rel=1e-12)
    assert marked.overall.bps > plain.overall.bps  # cell 20 (bps -1.49) no longer pulls the mean down
    assert marked.overall.bps_pooled == plain.overall.bps_pooled  # NLB pools every covered cell, low ones too
    assert marked.overall.cells == {"ok": 120, "silent": 0, "uncovered": 1, "overflow": 0, "low": 3, "excluded": 0}


def test_compute_names_the_few_sample_cells_of_the_example_and_the_option(invoke, tmp_path):
    write_raw_shard(tmp_path / "rank0.h5", {"a": {"rhat": np.full((12, 2), 0.5), "robs": np.ones((12, 2))}})
    enough = invoke("compute", tmp_path, "--no-cache")  # every ok cell has 12 valid samples: no note
    assert enough.exit_code == 0 and "fewer than" not in enough.output and "low" not in enough.stdout
    result = invoke("compute", EXAMPLE, "--no-cache")
    assert result.exit_code == 0, result.output
    note = " ".join(line for line in result.stdout.splitlines() if "fewer than 10" in line or "(n_valid" in line)
    assert "3 ok cells were scored on fewer than 10 valid samples" in note
    for name, cell in FEW_SAMPLE_CELLS:
        assert f"{name} cell {cell} (n_valid 1)" in note
    assert "--min-samples 10" in result.stdout


def test_compute_min_samples_lists_low_cells_and_counts_them_in_json(invoke, tmp_path):
    result = invoke("compute", EXAMPLE, "--min-samples", "10", "--json", tmp_path / "r.json", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "3 low cells (fewer than 10 valid samples: left out of the means" in result.stdout
    assert "Allen_2022-06-17: cell 20, 45" in result.stdout
    assert "ok cells were scored on fewer than" not in result.stdout  # no ok cell is left below 10
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["settings"]["min_samples"] == 10
    assert document["overall"]["cells"]["low"] == 3
    assert document["overall"]["bps"] == pytest.approx(bpseval.evaluate(EXAMPLE, min_samples=10).overall.bps, rel=1e-15)
    assert {cell["status"] for cell in document["cells"]} == {OK, LOW, "uncovered"}


def test_the_note_goes_to_stderr_when_stdout_holds_json(invoke):
    result = invoke("compute", EXAMPLE, "--json", "-", "--no-cache")
    assert result.exit_code == 0
    json.loads(result.stdout)
    assert "--min-samples 10" in result.stderr


def test_a_dataset_whose_scored_cells_are_all_low_leaves_the_overall_mean(tmp_path):
    rng = np.random.default_rng(3)
    rhat = rng.gamma(2.0, 0.5, (40, 3))
    robs = rng.poisson(rhat).astype(float) + 1.0
    few = np.zeros((40, 3))
    few[:4] = 1.0  # 4 valid samples per cell
    datasets = {"many": {"rhat": rhat, "robs": robs}, "few": {"rhat": rhat, "robs": robs, "dfs": few}}
    write_raw_shard(tmp_path / "rank0.h5", datasets)
    result = bpseval.evaluate(tmp_path, min_samples=5)
    scored = result.scored
    assert scored.dataset("few").cells[LOW] == 3 and math.isnan(scored.dataset("few").bps)
    assert result.overall.datasets_without_ok_cells == ["few"]
    assert result.overall.bps == scored.dataset("many").bps
    assert math.isfinite(scored.dataset("few").bps_pooled)


def test_all_steps_scores_every_step_with_min_samples(invoke, tmp_path):
    run = tmp_path / "run"
    for step in (0, 1):
        dfs = np.ones((20, 2))
        dfs[step + 1 :, 1] = 0.0  # cell 1: 1 valid sample at step 0, 2 at step 1
        arrays = {"rhat": np.full((20, 2), 0.7), "robs": np.ones((20, 2)), "dfs": dfs}
        write_raw_shard(run / f"step-{step}" / "rank0.h5", {"a": arrays}, step=step)
    outputs = ("--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv")
    result = invoke("compute", run, "--all-steps", "--min-samples", "2", *outputs)
    assert result.exit_code == 0, result.output
    steps = json.loads((tmp_path / "s.json").read_text())["steps"]
    assert [entry["cells"]["low"] for entry in steps] == [1, 0]
    assert [entry["settings"]["min_samples"] for entry in steps] == [2, 2]
    assert "low" in (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert "low" in result.stdout  # the step table shows the column under --min-samples


@pytest.mark.parametrize("value", [-1, 2.5, True, "3"])
def test_a_bad_min_samples_is_refused_by_the_api(value):
    with pytest.raises(ArgumentError, match="min_samples must be a whole number >= 0"):
        bpseval.evaluate(EXAMPLE, min_samples=value)


def test_a_negative_min_samples_exits_2(invoke):
    result = invoke("compute", EXAMPLE, "--min-samples", "-1")
    assert result.exit_code == 2 and "--min-samples" in result.output and "not in the range" in result.output


def test_baselines_with_and_without_low_cells_are_accepted(invoke, tmp_path):
    with_low = tmp_path / "low.json"
    assert invoke("compute", EXAMPLE, "--min-samples", "10", "--json", with_low).exit_code == 0
    old = json.loads(with_low.read_text())  # a baseline from before `low` existed: no key, no such status
    for entry in [old["overall"], *old["datasets"]]:
        entry["cells"]["ok"] += entry["cells"].pop("low")
    for cell in old["cells"]:
        cell["status"] = OK if cell["status"] == LOW else cell["status"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    for baseline in (with_low, tmp_path / "old.json"):
        result = invoke("compare", EXAMPLE, "--baseline", baseline)
        assert result.exit_code in (0, 1), result.output  # compared, never refused as malformed
        assert "Error" not in result.output


def test_a_baseline_whose_low_count_does_not_match_its_cells_exits_2(invoke, tmp_path):
    baseline = tmp_path / "low.json"
    assert invoke("compute", EXAMPLE, "--min-samples", "10", "--json", baseline).exit_code == 0
    document = json.loads(baseline.read_text())
    document["datasets"][2]["cells"]["low"] = 0
    baseline.write_text(json.dumps(document))
    result = invoke("compare", EXAMPLE, "--baseline", baseline)
    assert result.exit_code == 2
    assert "datasets[2].cells" in result.stderr and "2 low" in result.stderr


def test_every_status_is_counted_in_every_document():
    document = bpseval.evaluate(EXAMPLE, min_samples=10).to_dict()
    assert list(document["overall"]["cells"]) == list(STATUSES)
    assert all(list(entry["cells"]) == list(STATUSES) for entry in document["datasets"])
