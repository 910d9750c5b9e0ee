"""`bpseval baseline` and `bpseval compare`: tolerances, coverage, statistics and CI outputs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

import bpseval
from bpseval.features.compare import CompareSettings, Side, compare
from bpseval.features.planning import distributed_sampler_indices
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.stats import LN2, batch_stats
from bpseval.run.merge import MergedDataset, MergedRun
from bpseval.run.scored import ScoredRun, score_run
from bpseval.views.text import ATTRIBUTED_METRICS_LISTED

SESSIONS = {"Allen_2022-04-13": 30, "Allen_2022-05-02": 20}


def simulate(seed: int, n_samples: int = 2000, sessions: dict[str, int] = SESSIONS):
    """Per session: stimulus drive, true rates and Poisson counts."""
    rng = np.random.default_rng(seed)
    data = {}
    for name, n_cells in sessions.items():
        drive = rng.normal(0.0, 0.6, size=(n_samples, n_cells)) + rng.uniform(-1.0, 0.5, n_cells)
        rates = np.exp(drive)
        data[name] = {"drive": drive, "rates": rates, "robs": rng.poisson(rates).astype(np.float32)}
    return data


def predictions(data, noise: float, seed: int, gain: float = 1.0):
    """A model's rates: the true rates with multiplicative noise (and a miscalibration `gain`)."""
    rng = np.random.default_rng(seed)
    return {
        name: (gain * d["rates"] * np.exp(rng.normal(0, noise, d["rates"].shape))).astype(np.float32)
        for name, d in data.items()
    }


def write_run(run_dir: Path, data, rhat, world_size: int = 2, shuffle_seed: int | None = None, drop=()) -> Path:
    """Shards of one validation pass split like DistributedSampler (padding included)."""
    for rank in range(world_size):
        with bpseval.ShardWriter(run_dir, rank, world_size) as writer:
            for name, session in data.items():
                if name in drop:
                    continue
                index = distributed_sampler_indices(len(session["robs"]), world_size, rank, seed=shuffle_seed)
                for start in range(0, len(index), 256):
                    rows = index[start : start + 256]
                    dfs = session.get("dfs")
                    writer.add(
                        name,
                        rhat[name][rows],
                        session["robs"][rows],
                        None if dfs is None else dfs[rows],
                        sample_idx=rows,
                    )
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = simulate(0)
    good = predictions(data, 0.2, seed=1)
    base = write_run(root / "base", data, good)
    rerun = write_run(root / "rerun", data, good, world_size=3, shuffle_seed=7)
    degraded_rhat = dict(good)
    degraded_rhat["Allen_2022-05-02"] = predictions({"Allen_2022-05-02": data["Allen_2022-05-02"]}, 0.8, seed=2)[
        "Allen_2022-05-02"
    ]
    degraded = write_run(root / "degraded", data, degraded_rhat)
    slightly = write_run(root / "slightly", data, {name: r * np.float32(1.01) for name, r in good.items()})
    baseline = root / "baseline.json"
    return {
        "root": root,
        "data": data,
        "good": good,
        "base": base,
        "rerun": rerun,
        "degraded": degraded,
        "slightly": slightly,
        "baseline": baseline,
    }


@pytest.fixture(scope="module")
def baseline_file(runs):
    from typer.testing import CliRunner

    result = CliRunner().invoke(bpseval.cli.app, ["baseline", str(runs["base"]), "-o", str(runs["baseline"])])
    assert result.exit_code == 0, result.output
    return runs["baseline"]


def test_baseline_is_the_compute_json_with_statistics_and_identity(baseline_file, runs):
    document = json.loads(baseline_file.read_text())
    computed = bpseval.evaluate(runs["base"]).to_dict()
    assert document["format"] == "bpseval-baseline" and document["format_version"] == 1
    assert {key: value for key, value in document.items() if key not in ("format", "format_version")} == computed
    assert set(document["cells"][0]) >= {"n_valid", "n", "spikes", "model_ll"}
    assert document["identity"] == bpseval.evaluate(runs["rerun"]).identity


@pytest.mark.parametrize("against", ["json", "run"])
def test_identical_and_rerun_with_another_sampler_order_pass(invoke, runs, baseline_file, against):
    base = baseline_file if against == "json" else runs["base"]
    for run in ("base", "rerun"):
        result = invoke("compare", runs[run], "--baseline", base, "--significance", "0.05", "--bootstrap", "500")
        assert result.exit_code == 0, result.output
        assert "✓ no regression" in result.stdout
    paired = invoke("compare", runs["rerun"], "--baseline", runs["base"], "--significance", "0.05", "--json", "-")
    document = json.loads(paired.stdout)
    assert document["mode"] == "paired" and document["passed"]
    assert all(abs(bound) < 1e-12 for m in document["metrics"] for bound in m["interval"])


def test_degraded_model_fails_and_names_the_dataset(invoke, runs, baseline_file):
    result = invoke("compare", runs["degraded"], "--baseline", baseline_file)
    assert result.exit_code == 1
    assert "Regression: overall bps; overall bps_pooled; dataset 'Allen_2022-05-02' bps" in result.stderr
    assert "Traceback" not in result.output
    verdicts = {
        (m["scope"], m["verdict"])
        for m in json.loads(invoke("compare", runs["degraded"], "--baseline", baseline_file, "--json", "-").stdout)[
            "metrics"
        ]
    }
    assert ("Allen_2022-04-13", "unchanged") in verdicts and ("Allen_2022-05-02", "regressed") in verdicts


def test_change_inside_tolerance_passes_and_outside_fails(invoke, runs, baseline_file):
    document = json.loads(invoke("compare", runs["slightly"], "--baseline", baseline_file, "--json", "-").stdout)
    drop = -min(m["delta"] for m in document["metrics"])
    assert 0 < drop < 0.01, drop
    assert (
        invoke("compare", runs["slightly"], "--baseline", baseline_file, "--atol", "0.01", "--rtol", "0").exit_code == 0
    )
    failing = invoke("compare", runs["slightly"], "--baseline", baseline_file, "--atol", "0", "--rtol", "0")
    assert failing.exit_code == 1


def test_metric_option_chooses_the_gated_overall_metrics(invoke, runs, baseline_file):
    args = ("compare", runs["degraded"], "--baseline", baseline_file, "--dataset-atol", "1", "--json", "-")
    only_pooled = json.loads(invoke(*args, "--metric", "bps_pooled").stdout)
    gated = {m["metric"] for m in only_pooled["metrics"] if m["scope"] == "overall" and m["gated"]}
    assert gated == {"bps_pooled"} and only_pooled["reasons"] == ["overall bps_pooled"]


def test_paired_bootstrap_detects_a_small_degradation_that_cells_bootstrap_misses(invoke, tmp_path):
    """Per-cell changes of both signs with a small net loss: across cells it is noise, on the data it is not."""
    data = simulate(3, n_samples=20000, sessions={"Allen_2022-04-13": 40})
    good = predictions(data, 0.2, seed=4)
    rng = np.random.default_rng(5)
    noise = rng.uniform(0.1, 0.3, 40)  # some cells predicted better than by `good`, most worse
    worse = {
        name: (d["rates"] * np.exp(rng.normal(0, 1, d["rates"].shape) * noise)).astype(np.float32)
        for name, d in data.items()
    }
    base, new = write_run(tmp_path / "base", data, good), write_run(tmp_path / "new", data, worse)
    invoke("baseline", base, "-o", tmp_path / "base.json")
    args = ("--significance", "0.05", "--rtol", "0", "--json", "-", "--bootstrap", "1000")
    paired = json.loads(invoke("compare", new, "--baseline", base, *args).stdout)
    unpaired = json.loads(invoke("compare", new, "--baseline", tmp_path / "base.json", *args).stdout)
    assert (paired["mode"], unpaired["mode"]) == ("paired", "cells")
    overall = {
        doc["mode"]: next(m for m in doc["metrics"] if m["scope"] == "overall" and m["metric"] == "bps")
        for doc in (paired, unpaired)
    }
    assert (
        overall["paired"]["delta"] == pytest.approx(overall["cells"]["delta"])
        and -0.01 < overall["paired"]["delta"] < 0
    )
    assert overall["paired"]["interval"][1] < 0 and overall["paired"]["verdict"] == "regressed"
    assert (
        overall["cells"]["interval"][0] < 0 < overall["cells"]["interval"][1]
        and overall["cells"]["verdict"] == "inconclusive"  # the tolerance is 0: the interval straddles it
    )
    assert not paired["passed"] and unpaired["passed"]
    assert any(w.startswith("overall bps is inconclusive") for w in unpaired["warnings"])


def test_cell_that_lost_its_coverage_is_a_regression(invoke, runs, baseline_file, tmp_path):
    data = {name: dict(session) for name, session in runs["data"].items()}
    dfs = np.ones_like(data["Allen_2022-04-13"]["robs"])
    dfs[:, 5] = 0
    data["Allen_2022-04-13"]["dfs"] = dfs
    run = write_run(tmp_path / "lost", data, runs["good"])
    result = invoke("compare", run, "--baseline", baseline_file, "--json", "-")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["coverage_regressions"] == [{"dataset": "Allen_2022-04-13", "cell": 5, "cell_id": 5}]
    assert document["reasons"] == ["1 cell ok in the baseline now uncovered"]


def test_missing_dataset_fails_unless_allowed(invoke, runs, baseline_file, tmp_path):
    run = write_run(tmp_path / "partial", runs["data"], runs["good"], drop=("Allen_2022-05-02",))
    result = invoke("compare", run, "--baseline", baseline_file)
    assert result.exit_code == 1 and "dataset missing: Allen_2022-05-02" in result.stderr
    assert invoke("compare", run, "--baseline", baseline_file, "--allow-missing-datasets").exit_code == 0


def test_junit_and_markdown_outputs_parse(invoke, runs, baseline_file, tmp_path):
    result = invoke(
        "compare",
        runs["degraded"],
        "--baseline",
        baseline_file,
        "--significance",
        "0.05",
        "--bootstrap",
        "300",
        "--junit",
        tmp_path / "compare.xml",
        "--markdown",
        tmp_path / "summary.md",
    )
    assert result.exit_code == 1
    suite = ElementTree.parse(tmp_path / "compare.xml").getroot()
    cases = suite.findall("testcase")
    assert suite.get("tests") == str(len(cases)) == "4"
    failed = [case.get("name") for case in cases if case.find("failure") is not None]
    assert failed == ["bps", "bps_pooled", "Allen_2022-05-02.bps"] and suite.get("failures") == "3"
    lines = (tmp_path / "summary.md").read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))  # the attribution follows
    assert table[0] == "| scope | metric | baseline | new | Δ | tolerance | 95% interval | verdict |"
    assert len(table) == 2 + 4 and all(line.count("|") == 9 for line in table)
    assert lines[2].startswith("**✗ regression: overall bps; overall bps_pooled; dataset 'Allen_2022-05-02' bps**")


def test_markdown_stays_under_1_mb_with_many_datasets():
    def result_with(n_datasets: int, shift: float) -> ScoredRun:
        rng = np.random.default_rng(0)
        stats = [
            batch_stats(rng.gamma(2, 0.5, (50, 3)) * (1 + shift), rng.poisson(1.0, (50, 3))) for _ in range(n_datasets)
        ]
        datasets = [
            MergedDataset(f"Session_{i:05d}_with_a_long_name", np.arange(3), "rate", [s], 50, 0)
            for i, s in enumerate(stats)
        ]
        return score_run(MergedRun(Path("."), 0, 1, [], datasets))

    comparison = compare(Side("new", result_with(5000, 0.3)), Side("base", result_with(5000, 0.0)), CompareSettings())
    markdown = bpseval.views.documents.compare_markdown(comparison)
    assert markdown.count(" | bps | ") == 1 + 5000  # overall and a row per dataset; then a few attributions
    assert markdown.count("contributing most to Δ") == ATTRIBUTED_METRICS_LISTED
    assert len(markdown.encode()) < 1_000_000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read the baseline"),
        (
            '{"format": "bpseval-baseline", "format_version": 2, "overall": {}, "datasets": []}',
            "version 2 is not supported",
        ),
        ('{"step": 1}', "not a bpseval baseline"),
    ],
)
def test_broken_baseline_exits_2(invoke, runs, tmp_path, content, message):
    (tmp_path / "baseline.json").write_text(content)
    result = invoke("compare", runs["base"], "--baseline", tmp_path / "baseline.json")
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_runs_without_a_shared_dataset_exit_2(invoke, runs, tmp_path):
    other = write_run(
        tmp_path / "other", {"Other": runs["data"]["Allen_2022-04-13"]}, {"Other": runs["good"]["Allen_2022-04-13"]}
    )
    result = invoke("compare", other, "--baseline", runs["base"])
    assert result.exit_code == 2 and "share no dataset" in result.stderr


# ----------------------------------------------------------------------------------------------
# The statistics, over repeated simulated validation sets (in memory: no files needed).


def blocked_side(label: str, rhat: np.ndarray, robs: np.ndarray, blocks: int) -> Side:
    """A run directory's side built directly from arrays: per-block statistics of contiguous samples."""
    edges = np.linspace(0, len(robs), blocks + 1).astype(int)
    per_block = CellStats.zeros((blocks, robs.shape[1]))
    for block in range(blocks):
        stats = batch_stats(rhat[edges[block] : edges[block + 1]], robs[edges[block] : edges[block + 1]])
        for name in STAT_FIELDS:
            getattr(per_block, name)[block] = getattr(stats, name)
    total = batch_stats(rhat, robs)
    dataset = MergedDataset(
        "d", np.arange(robs.shape[1]), "rate", [total], len(robs), 0, identity="same", per_block=per_block
    )
    run = MergedRun(Path(label), 0, 1, [], [dataset])
    return Side(label, score_run(run))


def true_delta(rates: np.ndarray, rhat_new: np.ndarray, rhat_base: np.ndarray) -> float:
    """Expected change of dataset bps over Poisson draws: E[y] = rate, so y can be replaced by it."""
    gain = (rates * np.log(rhat_new) - rhat_new - rates * np.log(rhat_base) + rhat_base).mean(axis=0)
    return float((gain / (rates.mean(axis=0) * LN2)).mean())


@pytest.mark.parametrize(("gain", "label"), [(1.0, "equally good models"), (1.03, "slightly miscalibrated model")])
def test_paired_interval_covers_the_true_change_at_the_nominal_rate(gain, label):
    rng = np.random.default_rng(11)
    n_samples, n_cells, trials = 2000, 20, 100
    drive_scale = rng.uniform(-1.0, 0.5, n_cells)
    population = np.exp(rng.normal(0, 0.6, (400_000, n_cells)) + drive_scale)
    noise_base, noise_new = (rng.normal(0, 0.3, population.shape) for _ in range(2))
    truth = true_delta(population, gain * population * np.exp(noise_new), population * np.exp(noise_base))
    settings = CompareSettings(significance=0.05, bootstrap=300, blocks=50, rtol=0.0)
    covered = flagged = 0
    for trial in range(trials):
        rows = rng.integers(0, len(population), n_samples)
        rates = population[rows]
        robs = rng.poisson(rates).astype(float)
        base = blocked_side("base", rates * np.exp(noise_base[rows]), robs, settings.blocks)
        new = blocked_side("new", gain * rates * np.exp(noise_new[rows]), robs, settings.blocks)
        result = compare(new, base, CompareSettings(**{**settings.__dict__, "seed": trial}))
        metric = next(m for m in result.metrics if m.scope == "d")
        covered += metric.interval[0] <= truth <= metric.interval[1]
        flagged += metric.verdict == "regressed"
    coverage = covered / trials
    assert 0.90 <= coverage <= 0.99, (label, truth, coverage)
    if gain == 1.0:
        assert flagged / trials <= 0.05, (label, flagged)
