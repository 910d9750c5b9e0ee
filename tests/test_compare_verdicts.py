"""`bpseval compare`: the four verdicts of the gate, and the attribution of a failed metric to cells and groups."""

from __future__ import annotations

import json
import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from bpseval.cli import app
from bpseval.features.attribution import attribute, contributions
from bpseval.features.compare import (
    IMPROVED,
    INCONCLUSIVE,
    REGRESSED,
    UNCHANGED,
    UNDEFINED,
    CompareSettings,
    Side,
    compare,
    verdict_of,
)
from bpseval.kernel.stats import OK, batch_stats
from bpseval.run.merge import MergedDataset, MergedRun
from bpseval.run.scored import ScoreSettings, overall_of, score_run
from bpseval.views.documents import compare_markdown
from bpseval.views.terminal import render_compare
from tests.conftest import table_rows
from tests.test_compare_gate import SESSIONS, assert_exit, model, run_of

# ----------------------------------------------------------------------------------------------
# The four verdicts


@pytest.mark.parametrize(
    ("delta", "interval", "verdict"),
    [
        (-0.025, (-0.03, -0.02), REGRESSED),  # all of the interval below -tolerance
        (-0.015, (-0.03, 0.0), INCONCLUSIVE),  # straddles -tolerance
        (-0.002, (-0.011, 0.004), INCONCLUSIVE),  # a sliver below -tolerance is enough
        (-0.011, (-0.009, 0.002), INCONCLUSIVE),  # the point below -tolerance, the interval not
        (-0.002, (-0.01, 0.004), UNCHANGED),  # touching -tolerance is not below it
        (0.012, (0.005, 0.03), UNCHANGED),  # straddling +tolerance is not an improvement
        (0.025, (0.02, 0.03), IMPROVED),  # all of it above +tolerance
        (-0.02, None, REGRESSED),  # no interval: the point change decides, as without --significance
        (-0.005, None, UNCHANGED),
        (0.02, None, IMPROVED),
    ],
)
def test_the_interval_against_the_tolerance_decides_the_verdict(delta, interval, verdict):
    assert verdict_of(1.0, 1.0 + delta, 0.01, interval) == verdict


def test_undefined_values_keep_their_verdicts_whatever_the_interval():
    assert verdict_of(1.0, math.nan, 0.01, (0.1, 0.2)) == REGRESSED
    assert verdict_of(math.nan, 1.0, math.nan, (-0.2, -0.1)) == UNDEFINED


def straddling_run(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A run a bit worse than its baseline, and the options that put overall bps's interval across -tolerance."""
    base = run_of(tmp_path, "base", noise=0.2)
    rates, _ = SESSIONS["A"]
    new = run_of(tmp_path, "new", noise=0.2, A={"rhat": model(rates, 0.25, seed=1)})
    options = ["--significance", "0.05", "--bootstrap", "300", "--metric", "bps", "--dataset-atol", "10"]
    probe = json.loads(
        CliRunner().invoke(app, ["compare", str(new), "--baseline", str(base), *options, "--json", "-"]).stdout
    )
    low, high = next(m["interval"] for m in probe["metrics"] if (m["scope"], m["metric"]) == ("overall", "bps"))
    assert high < 0, (low, high)
    return new, base, [*options, "--rtol", "0", "--atol", repr(-(low + high) / 2)]


def test_an_inconclusive_change_passes_with_a_warning_in_every_output(invoke, tmp_path):
    new, base, options = straddling_run(tmp_path)
    outputs = ["--json", tmp_path / "c.json", "--markdown", tmp_path / "c.md", "--junit", tmp_path / "c.xml"]
    result = invoke("compare", new, "--baseline", base, *options, *outputs)
    assert_exit(result, 0)
    document = json.loads((tmp_path / "c.json").read_text())
    overall = next(m for m in document["metrics"] if (m["scope"], m["metric"]) == ("overall", "bps"))
    assert (overall["verdict"], overall["gated"], overall["attribution"]) == (INCONCLUSIVE, True, None)
    assert document["passed"] and document["reasons"] == []
    warning = next(w for w in document["warnings"] if "inconclusive" in w)
    assert warning.startswith("overall bps is inconclusive: Δ ") and warning.endswith(
        "; it passes (--fail-on-inconclusive fails it)"
    )
    assert f"Warning: {warning}" in " ".join(result.stderr.split())
    assert "~ inconclusive" in result.stdout and "1 inconclusive, passed" in result.stdout
    markdown = (tmp_path / "c.md").read_text()
    assert "~ inconclusive |" in markdown and "- warning: overall bps is inconclusive" in markdown
    case = ElementTree.parse(tmp_path / "c.xml").getroot().find("testcase[@name='bps']")
    assert case.find("skipped").get("message").startswith("overall bps is inconclusive: ")
    assert case.find("failure") is None


def test_fail_on_inconclusive_fails_the_gate_and_attributes_the_change(invoke, tmp_path):
    new, base, options = straddling_run(tmp_path)
    outputs = ["--json", tmp_path / "c.json", "--junit", tmp_path / "c.xml"]
    result = invoke("compare", new, "--baseline", base, *options, "--fail-on-inconclusive", *outputs)
    assert_exit(result, 1)
    assert "Regression: overall bps (inconclusive)" in result.stderr
    document = json.loads((tmp_path / "c.json").read_text())
    assert document["reasons"] == ["overall bps (inconclusive)"] and document["settings"]["fail_on_inconclusive"]
    assert not any("inconclusive" in w for w in document["warnings"])
    overall = next(m for m in document["metrics"] if (m["scope"], m["metric"]) == ("overall", "bps"))
    cells = overall["attribution"]["cells"]
    assert len(cells) == 10 and {c["dataset"] for c in cells} == {"A", "B"}  # every ok cell of both datasets
    assert sum(c["delta"] for c in cells) == pytest.approx(overall["delta"], abs=1e-12)
    assert sum(c["share"] for c in cells) == pytest.approx(1.0, abs=1e-9)
    assert all(c["dataset"] == "A" for c in cells[:5])  # B did not change: its cells are the 5 with Δ 0
    case = ElementTree.parse(tmp_path / "c.xml").getroot().find("testcase[@name='bps']")
    assert case.find("failure").get("message").startswith("overall bps (inconclusive): ")


# ----------------------------------------------------------------------------------------------
# Attribution: the contributions add up to the change


def side_of(label: str, datasets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list]], clamp: bool) -> Side:
    """A side built from arrays: per dataset rhat, robs, dfs and the cell ids (of the same samples as every other)."""
    merged = [
        MergedDataset(name, np.array(ids), "rate", [batch_stats(rhat, robs, dfs)], len(robs), 0, identity="same")
        for name, (rhat, robs, dfs, ids) in datasets.items()
    ]
    return Side(label, score_run(MergedRun(Path(label), 0, 1, [], merged), ScoreSettings(clamp_negative=clamp)))


def random_datasets(seed: int, n_cells: list[int], fates: list[int], shuffle: bool) -> dict[str, tuple]:
    """Poisson data per dataset; fate 1 makes a cell silent, 2 uncovered; `shuffle` reorders the cells (and ids)."""
    rng = np.random.default_rng(seed)
    datasets, fate = {}, iter(fates)
    for index, cells in enumerate(n_cells):
        rates = np.exp(rng.normal(0.0, 0.7, (60, cells)) + rng.uniform(-1.5, 0.5, cells))
        robs = rng.poisson(rates).astype(np.float64)
        rhat = rates * np.exp(rng.normal(0.0, rng.uniform(0.1, 1.0), rates.shape))
        dfs = np.ones_like(robs)
        for cell in range(cells):
            kind = next(fate, 0)
            robs[:, cell] *= kind != 1
            dfs[:, cell] *= kind != 2
        order = rng.permutation(cells) if shuffle else np.arange(cells)
        datasets[f"d{index}"] = (rhat[:, order], robs[:, order], dfs[:, order], [f"n{c}" for c in order])
    return datasets


METRICS = ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    fates=st.tuples(
        st.lists(st.sampled_from([0, 0, 0, 1, 2]), max_size=18), st.lists(st.sampled_from([0, 0, 0, 1, 2]), max_size=18)
    ),
    clamp=st.booleans(),
)
def test_contributions_add_up_to_the_change_whatever_the_statuses_and_the_cell_order(seed, n_cells, fates, clamp):
    new = side_of("new", random_datasets(seed, n_cells, fates[0], shuffle=True), clamp)
    base = side_of("base", random_datasets(seed + 1, n_cells, fates[1], shuffle=False), clamp)
    for metric in METRICS:
        scopes = [(new.scored.datasets, base.scored.datasets)]
        if metric in ("bps", "pseudo_r2", "corr"):
            scopes += [([n], [b]) for n, b in zip(new.scored.datasets, base.scored.datasets, strict=True)]
        for datasets_new, datasets_base in scopes:
            values = tuple(float(getattr(overall_of(d, clamp), metric)) for d in (datasets_new, datasets_base))
            for datasets, value in zip((datasets_new, datasets_base), values, strict=True):
                parts = contributions(datasets, metric, clamp)
                total = sum(float(part.sum()) for part, _ in parts)
                assert total == pytest.approx(value if math.isfinite(value) else 0.0, abs=1e-12), metric
            attribution = attribute(datasets_new, datasets_base, metric, values, (clamp, clamp))
            if all(map(math.isfinite, values)):
                assert math.fsum(c.delta for c in attribution.cells) == pytest.approx(values[0] - values[1], abs=1e-12)
            deltas = [c.delta for c in attribution.cells]
            assert deltas == sorted(deltas)
            for cell in attribution.cells:  # matched by id, whatever the order
                ids = {d.name: d.cell_ids.tolist() for d in datasets_new}
                if cell.cell is not None:
                    assert ids[cell.dataset][cell.cell] == cell.cell_id


def test_a_cell_of_a_mean_contributes_its_value_over_the_count_and_a_status_change_is_named():
    rng = np.random.default_rng(3)
    rates = np.exp(rng.normal(0.0, 0.5, (200, 4)))
    robs = rng.poisson(rates).astype(np.float64)
    silent = robs.copy()
    silent[:, 1] = 0
    ids = [10, 11, 12, 13]
    ones = np.ones_like(robs)
    base = side_of("base", {"d": (rates, robs, ones, ids)}, clamp=False)
    new = side_of("new", {"d": (rates * 1.2, silent, ones, ids)}, clamp=False)
    comparison = compare(new, base, CompareSettings())
    metric = next(m for m in comparison.metrics if m.scope == "d")
    assert metric.verdict == REGRESSED and metric.attribution is not None
    by_id = {c.cell_id: c for c in metric.attribution.cells}
    before, after = base.scored.datasets[0].scores, new.scored.datasets[0].scores
    assert by_id[12].base == before.bps[2] / 4 and by_id[12].new == after.bps[2] / 3  # 3 ok cells are left
    assert (by_id[11].status_base, by_id[11].status_new, by_id[11].change) == (OK, "silent", "became silent")
    assert (by_id[11].base, by_id[11].new) == (before.bps[1] / 4, 0.0)
    assert math.fsum(c.delta for c in by_id.values()) == pytest.approx(metric.delta, abs=1e-12)


def test_contributions_summed_per_group_per_dataset_and_over_all():
    rng = np.random.default_rng(5)
    datasets = {}
    for name in ("d0", "d1"):
        rates = np.exp(rng.normal(0.0, 0.5, (300, 6)) + np.linspace(-2, 1, 6))
        datasets[name] = (rates, rng.poisson(rates).astype(np.float64), np.ones_like(rates), list(range(6)))
    worse = {
        name: (rates * np.exp(rng.normal(0, 0.5, rates.shape)), *rest) for name, (rates, *rest) in datasets.items()
    }
    new, base = side_of("new", worse, clamp=False), side_of("base", datasets, clamp=False)
    groups = {(name, str(cell)): "low" if cell < 3 else "high" for name in datasets for cell in range(6)}
    del groups[("d1", "5")]  # a cell the table lacks: group None
    values = (new.scored.overall.bps_pooled, base.scored.overall.bps_pooled)
    attribution = attribute(new.scored.datasets, base.scored.datasets, "bps_pooled", values, groups=groups)
    found = {(g.dataset, g.value): g for g in attribution.groups}
    assert set(found) == {(d, v) for d in ("d0", "d1", None) for v in ("low", "high")} | {("d1", None), (None, None)}
    for (dataset, value), group in found.items():
        members = [
            c
            for c in attribution.cells
            if (dataset is None or c.dataset == dataset) and groups.get((c.dataset, str(c.cell_id))) == value
        ]
        assert group.cells == len(members)
        assert group.delta == pytest.approx(math.fsum(c.delta for c in members), abs=1e-12)
    per_dataset = [g for g in attribution.groups if g.dataset is not None]
    assert math.fsum(g.delta for g in per_dataset) == pytest.approx(values[0] - values[1], abs=1e-12)
    assert math.fsum(attribution.share(g) for g in per_dataset) == pytest.approx(1.0, abs=1e-9)
    unlisted = [g for g in attribution.to_dict()["groups"] if g["value"] is None]
    assert [(g["dataset"], g["cells"]) for g in unlisted] in ([("d1", 1), (None, 1)], [(None, 1), ("d1", 1)])


# ----------------------------------------------------------------------------------------------
# Attribution in every output


def test_a_regression_names_the_cell_that_carries_it_in_every_output(tmp_path):
    base = run_of(tmp_path, "base")
    rates, _ = SESSIONS["A"]
    rhat = model(rates, 0.2, seed=1)
    rhat[:, 3] *= 4.0  # one cell of A badly miscalibrated
    new = run_of(tmp_path, "new", A={"rhat": rhat})
    outputs = ["--json", tmp_path / "c.json", "--markdown", tmp_path / "c.md", "--junit", tmp_path / "c.xml"]
    runner = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})
    result = runner.invoke(app, [str(a) for a in ("compare", new, "--baseline", base, "--top", "2", *outputs)])
    assert_exit(result, 1)
    document = json.loads((tmp_path / "c.json").read_text())
    metric = next(m for m in document["metrics"] if (m["scope"], m["metric"]) == ("A", "bps"))
    assert metric["verdict"] == REGRESSED
    cells = metric["attribution"]["cells"]
    assert len(cells) == 5 and cells[0]["cell"] == 3 and cells[0]["share"] > 0.9  # all cells in the JSON
    assert cells[0]["change"] is None and (cells[0]["status_baseline"], cells[0]["status_new"]) == (OK, OK)
    assert math.fsum(c["delta"] for c in cells) == pytest.approx(metric["delta"], abs=1e-12)
    assert next(m for m in document["metrics"] if m["scope"] == "B")["attribution"] is None  # B passed
    stdout = result.stdout
    assert all(cell_len(line) <= 80 for line in stdout.splitlines()) and "…" not in stdout
    assert f"{cells[0]['delta']:+.6f}" in stdout and f"{100 * cells[0]['share']:.1f}%" in stdout
    listed = stdout.split("dataset 'A' bps: the 2 of 5 cells")[1].split("✗ regression")[0]  # --top 2
    assert [row[1] for row in table_rows(listed)] == ["3", "0"]
    markdown = (tmp_path / "c.md").read_text()
    table = markdown.split("contributing most to Δ")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| dataset | cell | status | baseline | new | Δ contribution | share |" and len(table) == 4
    assert table[2].startswith("| A | 3 | ok | ")
    case = ElementTree.parse(tmp_path / "c.xml").getroot().find("testcase[@name='A.bps']")
    share = f"{100 * cells[0]['share']:.1f}%"
    assert (
        case.find("failure").get("message").endswith(f"; most of it: A cell 3 ({cells[0]['delta']:+.6f}, {share} of Δ)")
    )


def test_an_undefined_run_value_is_attributed_without_shares(invoke, tmp_path):
    base = run_of(tmp_path, "base")
    new = run_of(tmp_path, "new", A={"robs": np.zeros_like(SESSIONS["A"][1])})
    result = invoke("compare", new, "--baseline", base, "--json", "-")
    assert_exit(result, 1)
    metric = next(m for m in json.loads(result.stdout)["metrics"] if m["scope"] == "A")
    attribution = metric["attribution"]
    assert attribution["delta"] is None and all(c["share"] is None for c in attribution["cells"])
    assert {c["change"] for c in attribution["cells"]} == {"became silent"}
    assert all(c["contribution_new"] == 0 for c in attribution["cells"])


def test_groups_are_shown_in_the_terminal_and_the_markdown():
    rng = np.random.default_rng(8)
    rates = np.exp(rng.normal(0.0, 0.5, (300, 6)) + np.linspace(-2, 1, 6))
    robs = rng.poisson(rates).astype(np.float64)
    base = side_of("base", {"d0": (rates, robs, np.ones_like(rates), list(range(6)))}, clamp=False)
    worse = rates.copy()
    worse[:, :3] *= 3.0  # the low-rate cells get worse
    new = side_of("new", {"d0": (worse, robs, np.ones_like(rates), list(range(6)))}, clamp=False)
    groups = {("d0", str(cell)): "low-rate" if cell < 3 else "high-rate" for cell in range(6)}
    comparison = compare(new, base, CompareSettings(), groups=groups)
    metric = next(m for m in comparison.metrics if m.scope == "d0")
    low, high = metric.attribution.groups  # most negative first
    assert (low.value, low.cells, high.value, high.cells) == ("low-rate", 3, "high-rate", 3)
    assert low.delta == pytest.approx(metric.delta, abs=1e-12) and high.delta == 0.0
    console = Console(width=80, record=True, color_system=None)
    render_compare(comparison, console)
    text = console.export_text()
    assert "dataset 'd0' bps: Δ per group" in text and all(cell_len(line) <= 80 for line in text.splitlines())
    assert ["d0", "low-rate", "3", f"{low.delta:+.6f}", "100.0%"] in table_rows(text)
    markdown = compare_markdown(comparison)
    assert f"| d0 | low-rate | 3 | {low.delta:+.6f} | 100.0% |" in markdown


def test_compare_with_a_cell_table_sums_the_change_per_group(invoke, tmp_path):
    base = run_of(tmp_path, "base")
    rates, _ = SESSIONS["A"]
    rhat = model(rates, 0.2, seed=1)
    rhat[:, 3] *= 4.0  # cell 3 of A, in group "bad", carries the drop
    new = run_of(tmp_path, "new", A={"rhat": rhat})
    table = tmp_path / "cells.csv"
    table.write_text("dataset,cell,area\nA,3,bad\nA,0,good\nA,1,good\nA,9,good\n")
    result = invoke(
        "compare", new, "--baseline", base, "--cells", table, "--group-by", "area", "--json", tmp_path / "c.json"
    )
    assert_exit(result, 1)
    document = json.loads((tmp_path / "c.json").read_text())
    metric = next(m for m in document["metrics"] if (m["scope"], m["metric"]) == ("A", "bps"))
    groups = {(g["dataset"], g["value"]): g for g in metric["attribution"]["groups"]}
    cells = {c["cell"]: c["delta"] for c in metric["attribution"]["cells"]}
    assert groups[("A", "bad")]["delta"] == pytest.approx(cells[3], abs=1e-15)
    assert groups[("A", "good")]["delta"] == pytest.approx(cells[0] + cells[1], abs=1e-15)
    assert groups[("A", None)]["cells"] == 2  # cells 2 and 4: not in the table
    assert math.fsum(g["delta"] for (dataset, _), g in groups.items() if dataset == "A") == pytest.approx(
        metric["delta"], abs=1e-12
    )
    warnings = " ".join(document["warnings"])
    assert "dataset 'A' cell 9" in warnings and "not in the run" in warnings
    assert "in the group null of 'area'" in warnings


def test_compare_refuses_a_cell_table_without_the_group_column_before_merging(invoke, tmp_path):
    table = tmp_path / "cells.csv"
    table.write_text("dataset,cell,area\nA,3,bad\n")
    result = invoke(
        "compare", tmp_path / "nowhere", "--baseline", tmp_path / "b.json", "--cells", table, "--group-by", "depth"
    )
    assert_exit(result, 2)
    assert f"--group-by 'depth': --cells {table} has no such column to group by (its columns: " in result.stderr
