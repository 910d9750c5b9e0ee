"""`bpseval compare` holds the run and the baseline to the same samples (one identity rule, whatever the baseline's
kind), and a change with fewer than two units to resample is inconclusive, never read from an interval [Δ, Δ]."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from tests.conftest import table_rows
from tests.test_compare_gate import N_CELLS, N_SAMPLES, SESSIONS, assert_exit, model, run_of

DIFFERENT_MARK = "(different samples)"
UNKNOWN_MARK = "(samples unknown)"


def other_data_runs(tmp_path: Path, degraded: bool = False) -> tuple[Path, Path]:
    """A run of sessions A and B, and a baseline run that validated B on its first 300 samples only (A the same)."""
    rates, robs = SESSIONS["B"]
    base = run_of(tmp_path, "base", B={"rhat": model(rates, 0.2, seed=1)[:300], "robs": robs[:300]})
    changes = {"B": {"rhat": model(rates, 0.8, seed=1)}} if degraded else {}
    return run_of(tmp_path, "new", **changes), base


@pytest.fixture(params=["baseline JSON", "run directory"])
def baseline_kind(request) -> str:
    return request.param


def baseline_of(invoke, run: Path, kind: str, tmp_path: Path) -> Path:
    """The baseline of `run` as `kind`: the document `bpseval baseline` writes, or the run directory itself."""
    if kind == "run directory":
        return run
    path = tmp_path / "baseline.json"
    assert_exit(invoke("baseline", run, "-o", path), 0)
    return path


@pytest.mark.parametrize(
    "significance", [[], ["--significance", "0.05", "--bootstrap", "200"]], ids=["tolerance", "bootstrap"]
)
def test_a_baseline_of_other_validation_data_exits_2_naming_the_dataset(invoke, tmp_path, baseline_kind, significance):
    new, base_run = other_data_runs(tmp_path)
    base = baseline_of(invoke, base_run, baseline_kind, tmp_path)
    result = invoke("compare", new, "--baseline", base, *significance)
    assert_exit(result, 2)
    assert result.stderr == (
        f"Error: {new} and the baseline {base} did not score the same samples of dataset 'B' (their identity"
        " checksums of the cell ids and sample_idx differ): compare with a baseline of the same validation data, or"
        " pass --allow-different-samples to compare anyway (every verdict is then marked as made on different"
        " samples).\n"
    )


@pytest.mark.parametrize(("degraded", "code"), [(False, 0), (True, 1)], ids=["passes", "regressed"])
def test_allowed_different_samples_exit_per_the_metrics_and_every_output_marks_the_verdicts(
    invoke, tmp_path, baseline_kind, degraded, code, monkeypatch
):
    new, base_run = other_data_runs(tmp_path, degraded)
    base = baseline_of(invoke, base_run, baseline_kind, tmp_path)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    paths = {"json": tmp_path / "c.json", "markdown": tmp_path / "c.md", "junit": tmp_path / "c.xml"}
    outputs = [arg for kind, path in paths.items() for arg in (f"--{kind}", path)]
    tolerances = ["--atol", "0.05", "--dataset-atol", "0.05"]
    result = invoke("compare", new, "--baseline", base, "--allow-different-samples", *tolerances, *outputs)
    assert_exit(result, code)
    warning = (
        "Warning: the run and the baseline scored different samples of dataset 'B' (--allow-different-samples): the"
        " verdicts on them, and overall, are made on different samples\n"
    )
    assert warning in result.stderr
    marked = {row[0].rsplit(" ", 1)[0] for row in table_rows(result.stdout) if row[5].endswith(DIFFERENT_MARK)}
    assert marked == {"overall", "B"}
    assert "(verdicts made on different samples)" in result.stdout.splitlines()[-1]

    document = json.loads(paths["json"].read_text())
    assert document["samples"] == {"A": "same", "B": "different"} and document["passed"] == (code == 0)
    assert {(m["scope"], m["metric"]): m["samples"] for m in document["metrics"]} == {
        ("overall", "bps"): "different",
        ("overall", "bps_pooled"): "different",
        ("A", "bps"): "same",
        ("B", "bps"): "different",
    }
    assert document["settings"]["allow_different_samples"] is True
    assert warning.removeprefix("Warning: ").rstrip("\n") in document["warnings"]

    markdown = paths["markdown"].read_text()
    table = markdown.split("\n\n")[2].splitlines()[2:]  # the metrics' rows; the attribution follows
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table}
    assert DIFFERENT_MARK in rows["overall"] and DIFFERENT_MARK in rows["B"] and DIFFERENT_MARK not in rows["A"]
    assert "(verdicts made on different samples)" in markdown.splitlines()[2]
    assert "- warning: the run and the baseline scored different samples of dataset 'B'" in markdown
    assert summary.read_text() == "\n" + markdown

    suite = ElementTree.parse(paths["junit"]).getroot()
    (prop,) = suite.find("properties").findall("property")
    assert prop.get("name") == "samples" and "different samples of dataset 'B'" in prop.get("value")
    outputs_of = {case.get("name"): case.findtext("system-out") for case in suite.iter("testcase")}
    assert outputs_of == {
        "bps": f"overall bps: verdict {DIFFERENT_MARK}",
        "bps_pooled": f"overall bps_pooled: verdict {DIFFERENT_MARK}",
        "A.bps": None,
        "B.bps": f"dataset 'B' bps: verdict {DIFFERENT_MARK}",
    }
    if degraded:
        failure = next(case for case in suite.iter("testcase") if case.get("name") == "B.bps").find("failure")
        assert failure.get("message").endswith(f"; verdict {DIFFERENT_MARK}")


def test_the_report_marks_verdicts_on_different_samples(invoke, tmp_path):
    pytest.importorskip("matplotlib")
    new, base = other_data_runs(tmp_path)
    assert_exit(invoke("report", new, "--baseline", base, "-o", tmp_path / "r.html"), 2)
    result = invoke("report", new, "--baseline", base, "--allow-different-samples", "-o", tmp_path / "r.html")
    assert_exit(result, 0)
    assert "Warning: the run and the baseline scored different samples of dataset 'B'" in result.stderr
    page = (tmp_path / "r.html").read_text()
    assert "(verdicts made on different samples)</div>" not in page  # the mark is inside the verdict banner
    banner = page[page.index('<div class="verdict') :]
    assert "(verdicts made on different samples)" in banner[: banner.index("</div>")]
    section = page[page.index('<section id="comparison">') :]
    section = section[: section.index("</section>")]
    assert section.count(DIFFERENT_MARK) == 3  # overall bps, overall bps_pooled, B
    assert "the run and the baseline scored different samples of dataset &#x27;B&#x27;" in section
    from bpseval.api import Result
    from bpseval.features.compare import CompareSettings
    from bpseval.features.overview import load_overview
    from bpseval.views.plot import compare_figure

    inputs = load_overview(new, baseline=base, settings=CompareSettings(allow_different_samples=True))
    figure = compare_figure(Result(inputs.scored), Result(inputs.baseline), inputs.comparison)
    assert figure.axes[0].get_title(loc="left").endswith("(verdicts made on different samples)")


def test_a_baseline_without_sample_identity_is_unknown_never_the_same(invoke, tmp_path):
    new = run_of(tmp_path, "new")
    path = tmp_path / "old.json"
    assert_exit(invoke("baseline", run_of(tmp_path, "base"), "-o", path), 0)
    document = json.loads(path.read_text())
    del document["datasets"][1]["identity"]  # B, as a baseline written before identities were stored
    path.write_text(json.dumps(document))
    result = invoke("compare", new, "--baseline", path, "--json", tmp_path / "c.json", "--markdown", tmp_path / "c.md")
    assert_exit(result, 0)
    assert (
        f"Warning: the baseline {path} holds no identity of the samples of dataset 'B' (written before bpseval stored"
        " it), so whether the run scored the same samples is unknown: the verdicts on them, and overall, are marked"
        " so; recreate the baseline with `bpseval baseline RUN -o FILE`\n" in result.stderr
    )
    marked = {row[0].rsplit(" ", 1)[0] for row in table_rows(result.stdout) if row[5].endswith(UNKNOWN_MARK)}
    assert marked == {"overall", "B"} and UNKNOWN_MARK in result.stdout.splitlines()[-1]
    compared = json.loads((tmp_path / "c.json").read_text())
    assert compared["samples"] == {"A": "same", "B": "unknown"}
    assert [m["samples"] for m in compared["metrics"]] == ["unknown", "unknown", "same", "unknown"]
    assert (tmp_path / "c.md").read_text().count(UNKNOWN_MARK) == 3 + 1  # three verdicts and the status line


# ----------------------------------------------------------------------------------------------
# Fewer than two units to resample


def test_a_dataset_with_a_single_block_is_inconclusive_not_an_interval_of_its_point(invoke, tmp_path):
    mask = np.ones((N_SAMPLES, N_CELLS), dtype=np.float32)
    mask[N_SAMPLES // 4 :] = 0.0  # only the first of 4 blocks holds a valid entry: B has one block to resample
    rates, _ = SESSIONS["B"]
    base = run_of(tmp_path, "base", B={"dfs": mask})
    other = {"rhat": model(SESSIONS["A"][0], 0.2, seed=7)}  # another draw of the model on A
    new = run_of(tmp_path, "new", A=other, B={"dfs": mask, "rhat": model(rates, 0.8, seed=1)})  # B far worse
    options = ["--significance", "0.05", "--bootstrap", "200", "--blocks", "4", "--json", tmp_path / "c.json"]
    result = invoke("compare", new, "--baseline", base, *options, "--junit", tmp_path / "c.xml")
    assert_exit(result, 0)  # inconclusive passes with a warning
    document = json.loads((tmp_path / "c.json").read_text())
    assert document["mode"] == "paired"
    verdicts = {(m["scope"], m["metric"]): (m["verdict"], m["interval"]) for m in document["metrics"]}
    assert verdicts[("B", "bps")] == ("inconclusive", None)
    assert verdicts[("overall", "bps")] == verdicts[("overall", "bps_pooled")] == ("inconclusive", None)
    low, high = verdicts[("A", "bps")][1]
    assert low < high
    reason = "dataset 'B' has 1 block of samples to resample, fewer than 2"
    assert "dataset 'B' bps is inconclusive: Δ" in result.stderr and f"has no 95% interval ({reason})" in result.stderr
    assert f"no interval: {reason}; overall resamples dataset 'B'" in " ".join(document["notes"])
    skipped = {
        case.get("name"): case.find("skipped") for case in ElementTree.parse(tmp_path / "c.xml").iter("testcase")
    }
    assert f"no interval: {reason}" in skipped["B.bps"].get("message")
    failing = invoke("compare", new, "--baseline", base, *options, "--fail-on-inconclusive")
    assert_exit(failing, 1)
    assert "dataset 'B' bps (inconclusive)" in failing.stderr


def test_a_dataset_of_one_cell_against_a_baseline_json_is_inconclusive(invoke, tmp_path):
    rates, robs = SESSIONS["B"]
    one = {"robs": robs[:, :1]}
    base = run_of(tmp_path, "base", B={**one, "rhat": model(rates, 0.2, seed=1)[:, :1]})
    new = run_of(tmp_path, "new", B={**one, "rhat": model(rates, 0.8, seed=1)[:, :1]})
    assert_exit(invoke("baseline", base, "-o", tmp_path / "b.json"), 0)
    options = ["--significance", "0.05", "--bootstrap", "200", "--json", "-"]
    result = invoke("compare", new, "--baseline", tmp_path / "b.json", *options)
    assert_exit(result, 0)
    document = json.loads(result.stdout)
    assert document["mode"] == "cells"
    b = next(m for m in document["metrics"] if m["scope"] == "B")
    assert (b["verdict"], b["interval"]) == ("inconclusive", None) and b["delta"] < -0.1
    assert "has no 95% interval (dataset 'B' has 1 cell to resample, fewer than 2)" in result.stderr


def test_a_test_level_its_bootstrap_cannot_support_exits_2_before_any_shard_is_read(invoke, tmp_path):
    refused = invoke("compare", tmp_path / "none", "--significance", "0.001", "--bootstrap", "100")
    assert_exit(refused, 2)
    assert refused.stderr == (
        "Error: significance (--significance) 0.001 needs bootstrap (--bootstrap) >= 1999: with 100 resamples the"
        " 0.05% tails of a 99.9% interval lie beyond the most extreme replicate; give at least 1999 resamples, or a"
        " lower level.\n"
    )
    enough = invoke("compare", tmp_path / "none", "--significance", "0.001", "--bootstrap", "1999")
    assert_exit(enough, 2)
    assert "--bootstrap" not in enough.stderr  # refused for the missing run only
