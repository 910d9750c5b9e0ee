"""`bpseval compare` fails closed: undefined values, other populations, bad baselines, block arithmetic, escaping."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bpseval import Result, ShardWriter
from bpseval.cli import app
from bpseval.errors import ArgumentError, BaselineError
from bpseval.features.compare import CompareSettings, Side, compare
from bpseval.kernel.stats import batch_stats
from bpseval.run.merge import MergedDataset, MergedRun, sample_blocks
from bpseval.run.scored import score_run
from bpseval.views.documents import compare_junit, compare_markdown
from bpseval.views.text import printable
from tests.conftest import write_raw_shard

N_SAMPLES, N_CELLS = 400, 5
TOP = 2**63 - 1


def session(seed: int, n_samples: int = N_SAMPLES, n_cells: int = N_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """True rates and Poisson counts of one recording session."""
    rng = np.random.default_rng(seed)
    rates = np.exp(rng.normal(0.0, 0.5, (n_samples, n_cells)))
    return rates, rng.poisson(rates).astype(np.float64)


def model(rates: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """A model's predicted rates: the true rates with multiplicative noise."""
    return rates * np.exp(np.random.default_rng(seed).normal(0.0, noise, rates.shape))


def write_run(run_dir: Path, datasets: dict[str, dict[str, np.ndarray]], first_index: int = 0) -> Path:
    """A one-rank run whose datasets carry sample_idx first_index, first_index + 1, ..."""
    arrays = {
        name: {**data, "sample_idx": np.arange(len(data["robs"]), dtype=np.int64) + np.int64(first_index)}
        for name, data in datasets.items()
    }
    write_raw_shard(run_dir / "step-000000" / "rank-0000.h5", arrays)
    return run_dir


SESSIONS = {name: session(seed) for seed, name in enumerate(("A", "B", "C"))}


def run_of(tmp_path: Path, label: str, names=("A", "B"), noise: float = 0.2, **changes: dict[str, np.ndarray]) -> Path:
    """A run of the model with `noise` on the sessions `names`; `changes` replace a session's arrays."""
    datasets = {}
    for name in names:
        rates, robs = SESSIONS[name]
        datasets[name] = {"rhat": model(rates, noise, seed=len(name)), "robs": robs, **changes.get(name, {})}
    return write_run(tmp_path / label, datasets)


def assert_exit(result, code: int) -> None:
    """The exit code, and never a traceback (CliRunner keeps an unhandled exception in `exception`)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# 1. Undefined is not a pass


SILENT = {"robs": np.zeros((N_SAMPLES, N_CELLS))}
UNCOVERED = {"dfs": np.zeros((N_SAMPLES, N_CELLS), dtype=np.float32)}
OVERFLOW = {"rhat": np.full((N_SAMPLES, N_CELLS), 1e307)}  # Σ λ overflows: ll_gain and bps are -inf


@pytest.mark.parametrize("change", [SILENT, UNCOVERED, OVERFLOW], ids=["silent", "uncovered", "overflow"])
@pytest.mark.parametrize(
    "significance", [[], ["--significance", "0.05", "--bootstrap", "200"]], ids=["tolerance", "bootstrap"]
)
def test_dataset_bps_undefined_in_the_run_is_a_regression_in_every_output(invoke, tmp_path, change, significance):
    base = run_of(tmp_path, "base")
    new = run_of(tmp_path, "new", B=change)
    paths = {"json": tmp_path / "c.json", "markdown": tmp_path / "c.md", "junit": tmp_path / "c.xml"}
    outputs = [arg for kind, path in paths.items() for arg in (f"--{kind}", path)]
    result = invoke("compare", new, "--baseline", base, "--dataset-atol", "10", *significance, *outputs)
    assert_exit(result, 1)
    assert "dataset 'B' bps (undefined in the run)" in result.stderr
    assert "✗ regressed (now undefined)" in result.stdout
    document = json.loads(paths["json"].read_text())
    b = next(m for m in document["metrics"] if m["scope"] == "B")
    assert (b["verdict"], b["new"], b["gated"]) == ("regressed", None, True) and b["baseline"] is not None
    assert not document["passed"] and "dataset 'B' bps (undefined in the run)" in document["reasons"]
    assert any(
        line.startswith("| B | bps |") and "✗ regressed (now undefined)" in line
        for line in paths["markdown"].read_text().splitlines()
    )
    cases = {case.get("name"): case for case in ElementTree.parse(paths["junit"]).getroot().iter("testcase")}
    assert "undefined in the run" in cases["B.bps"].find("failure").get("message")


@pytest.mark.parametrize("change", [SILENT, UNCOVERED], ids=["silent", "uncovered"])
def test_overall_metrics_undefined_in_the_run_fail_the_gate(invoke, tmp_path, change):
    base = run_of(tmp_path, "base", names=("A",))
    new = run_of(tmp_path, "new", names=("A",), A=change)
    result = invoke("compare", new, "--baseline", base, "--json", "-")
    assert_exit(result, 1)
    reasons = json.loads(result.stdout)["reasons"]
    assert reasons[:3] == [
        "overall bps (undefined in the run)",
        "overall bps_pooled (undefined in the run)",
        "dataset 'A' bps (undefined in the run)",
    ]


def test_metric_undefined_in_the_baseline_does_not_gate_and_is_skipped_in_junit(invoke, tmp_path):
    base = run_of(tmp_path, "base", B=SILENT)
    new = run_of(tmp_path, "new")
    result = invoke("compare", new, "--baseline", base, "--json", "-", "--junit", tmp_path / "c.xml")
    assert_exit(result, 0)
    b = next(m for m in json.loads(result.stdout)["metrics"] if m["scope"] == "B")
    assert (b["baseline"], b["verdict"]) == (None, "undefined")
    suite = ElementTree.parse(tmp_path / "c.xml").getroot()
    assert suite.get("skipped") == "1" and suite.get("failures") == "0"


def test_missing_dataset_fails_in_every_output_unless_allowed(invoke, tmp_path):
    base = run_of(tmp_path, "base", names=("A", "B", "C"))
    new = run_of(tmp_path, "new", names=("A", "B"))
    result = invoke("compare", new, "--baseline", base, "--json", tmp_path / "c.json", "--junit", tmp_path / "c.xml")
    assert_exit(result, 1)
    assert (
        "dataset missing: C" in result.stderr
        and "missing datasets (in the baseline, not in the run): C" in result.stdout
    )
    assert json.loads((tmp_path / "c.json").read_text())["missing_datasets"] == ["C"]
    cases = {case.get("name"): case for case in ElementTree.parse(tmp_path / "c.xml").getroot().iter("testcase")}
    assert cases["C"].find("failure") is not None
    allowed = invoke("compare", new, "--baseline", base, "--allow-missing-datasets", "--json", "-")
    assert_exit(allowed, 0)
    assert json.loads(allowed.stdout)["missing_datasets"] == ["C"]
    # allowing a missing dataset does not allow a present one to become undefined
    silent = run_of(tmp_path, "silent", names=("A", "B"), B=SILENT)
    assert_exit(invoke("compare", silent, "--baseline", base, "--allow-missing-datasets"), 1)


# ----------------------------------------------------------------------------------------------
# 2. Like with like


def test_overall_metrics_compare_the_datasets_both_sides_hold(invoke, tmp_path):
    """A baseline of A against a run of A, B, C (B and C scored far lower): the overall is A's on both sides."""
    base = run_of(tmp_path, "base", names=("A",))
    worse = {name: {"rhat": model(SESSIONS[name][0], 1.5, seed=9)} for name in ("B", "C")}
    new = run_of(tmp_path, "new", names=("A", "B", "C"), **worse)
    result = invoke("compare", new, "--baseline", base, "--rtol", "0", "--json", "-")
    assert_exit(result, 0)
    document = json.loads(result.stdout)
    assert (document["population"], document["shared_datasets"], document["new_datasets"]) == (
        "shared",
        ["A"],
        ["B", "C"],
    )
    overall = {m["metric"]: m for m in document["metrics"] if m["scope"] == "overall"}
    a = next(m for m in document["metrics"] if m["scope"] == "A")
    assert overall["bps"]["new"] == a["new"] and overall["bps"]["baseline"] == a["baseline"]
    assert all(m["verdict"] == "unchanged" for m in overall.values())
    whole = json.loads(invoke("compute", new, "--json", "-").stdout)["overall"]
    assert whole["bps"] < a["new"] - 0.1  # the unrestricted overall would have been a regression
    assert any("over the 1 dataset both sides hold" in note for note in document["notes"])
    assert (
        "note: overall metrics over the 1 dataset both sides hold" in invoke("compare", new, "--baseline", base).stdout
    )


def test_shared_overall_pools_only_the_shared_datasets_and_bootstraps_them(invoke, tmp_path):
    base = run_of(tmp_path, "base", names=("A", "B", "C"))
    new = run_of(tmp_path, "new", names=("A", "B"), noise=0.25)
    args = ("--allow-missing-datasets", "--significance", "0.05", "--bootstrap", "300", "--json", "-")
    document = json.loads(invoke("compare", new, "--baseline", base, *args).stdout)
    assert document["population"] == "shared" and document["mode"] == "paired"
    restricted = run_of(tmp_path, "base_ab", names=("A", "B"))
    same_population = json.loads(invoke("compare", new, "--baseline", restricted, *args).stdout)
    assert same_population["population"] == "all"
    overall = {m["metric"]: m for m in document["metrics"] if m["scope"] == "overall"}
    expected = {m["metric"]: m for m in same_population["metrics"] if m["scope"] == "overall"}
    for metric in ("bps", "bps_pooled"):
        assert overall[metric]["baseline"] == pytest.approx(expected[metric]["baseline"], rel=1e-12)
        assert overall[metric]["new"] == pytest.approx(expected[metric]["new"], rel=1e-12)
        assert overall[metric]["interval"] == expected[metric]["interval"]


# ----------------------------------------------------------------------------------------------
# 3. A bad baseline is bad input


@pytest.fixture(scope="module")
def gate_runs(tmp_path_factory):
    """A small run, and its baseline document."""
    root = tmp_path_factory.mktemp("gate")
    rng = np.random.default_rng(0)
    datasets = {}
    for name in ("A", "B"):
        rates = np.exp(rng.normal(0.0, 0.5, (60, 3)))
        datasets[name] = {"rhat": rates, "robs": rng.poisson(rates).astype(np.float64)}
    run = write_run(root / "run", datasets)
    result = CliRunner().invoke(app, ["baseline", str(run), "-o", str(root / "baseline.json")])
    assert result.exit_code == 0, result.output
    return run, json.loads((root / "baseline.json").read_text())


DELETE = object()


def _edit(path: tuple, value=DELETE):
    """A change of a document: set the value at `path`, or delete it."""

    def change(document):
        *parents, last = path
        for key in parents:
            document = document[key]
        if value is DELETE:
            del document[last]
        else:
            document[last] = value

    return change


def _drop_cells_of_b(document):
    document["cells"] = [cell for cell in document["cells"] if cell["dataset"] != "B"]


BROKEN = {
    "not an object": (lambda d: d.clear() or d.update({"runs": []}), "not a bpseval baseline"),
    "overall.bps missing": (_edit(("overall", "bps")), "overall.bps is missing"),
    "overall.cells.excluded null": (_edit(("overall", "cells", "excluded"), None), "overall.cells.excluded must be"),
    "datasets[0].cells.excluded text": (_edit(("datasets", 0, "cells", "excluded"), "1"), "cells.excluded must be"),
    "overall a list": (_edit(("overall",), [0.1, 0.2]), "overall must be an object, not a list"),
    "datasets an object": (_edit(("datasets",), {"A": {}}), "datasets must be a non-empty list, not an object"),
    "datasets[1] a list": (_edit(("datasets", 1), ["B"]), "datasets[1] must be an object, not a list"),
    "datasets[1].name missing": (_edit(("datasets", 1, "name")), "datasets[1].name is missing"),
    "datasets[1].name a number": (
        _edit(("datasets", 1, "name"), 3),
        "datasets[1].name must be non-empty text, not a number 3",
    ),
    "datasets[1].name repeated": (_edit(("datasets", 1, "name"), "A"), "datasets[1].name repeats datasets[0].name 'A'"),
    "datasets[0].cells.ok text": (
        _edit(("datasets", 0, "cells", "ok"), "3"),
        'datasets[0].cells.ok must be a whole number >= 0, not text "3"',
    ),
    "datasets[0].cells.ok wrong": (
        _edit(("datasets", 0, "cells", "ok"), 2),
        "datasets[0].cells does not match its entries in cells",
    ),
    "step a boolean": (_edit(("step",), True), "step must be a whole number >= 0, not a boolean true"),
    "world_size zero": (_edit(("world_size",), 0), "world_size must be a whole number > 0"),
    "empty cells": (_edit(("cells",), []), "cells must be a non-empty list, not an empty list"),
    "cells[2].status a number": (
        _edit(("cells", 2, "status"), 1),
        "cells[2].status must be one of ok, silent, uncovered",
    ),
    "cells[2].status unknown": (_edit(("cells", 2, "status"), "great"), "cells[2].status must be one of"),
    "cells[2].cell_id a float": (
        _edit(("cells", 2, "cell_id"), 2.5),
        "cells[2].cell_id must be a whole number or text",
    ),
    "cells[0].dataset unknown": (
        _edit(("cells", 0, "dataset"), "Z"),
        "cells[0].dataset 'Z' is not the name of any entry",
    ),
    "cells numbered twice": (_edit(("cells", 1, "cell"), 0), "datasets[0] ('A') needs its cells, numbered 0, 1, 2"),
    "a dataset without cells": (_drop_cells_of_b, "datasets[1] ('B') needs its cells"),
    "files a number": (_edit(("files",), 3), "files must be a list of text"),
    "format_version text": (_edit(("format_version",), "1"), "version '1' is not supported"),
    "overall.pseudo_r2 text": (
        _edit(("overall", "pseudo_r2"), ""),
        'overall.pseudo_r2 must be a finite number or null, not text ""',
    ),
    "datasets[1].corr an object": (
        _edit(("datasets", 1, "corr"), {}),
        "datasets[1].corr must be a number in [-1, 1] or null, not an object",
    ),
    "cells[2].pseudo_r2 a boolean": (
        _edit(("cells", 2, "pseudo_r2"), True),
        "cells[2].pseudo_r2 must be a finite number or null, not a boolean true",
    ),
    # the sums contract: n_valid, n, spikes, model_ll some data gives; ll_gain, bps and status what they score
    "cells[1] model_ll halved": (
        lambda d: d["cells"][1].update(model_ll=d["cells"][1]["model_ll"] * 0.5),
        "cells[1].ll_gain is",
    ),
    "cells[1] spikes negative": (_edit(("cells", 1, "spikes"), -3.0), "hold impossible sums: spikes is negative"),
    "cells[1] n_valid above the samples": (_edit(("cells", 1, "n_valid"), 10**6), "n_valid exceeds the 60 samples"),
    "cells[1] n above n_valid": (
        lambda d: d["cells"][1].update(n=d["cells"][1]["n_valid"] + 5.0),
        "weight exceeds n_valid",
    ),
    "cells[1] bps edited": (lambda d: d["cells"][1].update(bps=d["cells"][1]["bps"] + 0.25), "cells[1].bps is"),
    "cells[1] ok without spikes": (
        lambda d: d["cells"][1].update(spikes=0.0),
        "cells[1].status is 'ok', but its sums score 'silent'",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_baseline_documents_exit_2_naming_the_field(invoke, gate_runs, tmp_path, case):
    run, document = gate_runs
    change, message = BROKEN[case]
    broken = copy.deepcopy(document)
    change(broken)
    (tmp_path / "baseline.json").write_text(json.dumps(broken))
    result = invoke("compare", run, "--baseline", tmp_path / "baseline.json")
    assert_exit(result, 2)
    assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr


def test_a_baseline_written_before_pseudo_r2_and_corr_is_compared(invoke, gate_runs, tmp_path):
    run, document = gate_runs
    older = copy.deepcopy(document)
    for entry in (older["overall"], *older["datasets"], *older["cells"]):
        for key in ("pseudo_r2", "pseudo_r2_pooled", "corr"):
            entry.pop(key, None)
    (tmp_path / "baseline.json").write_text(json.dumps(older))
    result = invoke("compare", run, "--baseline", tmp_path / "baseline.json")
    assert_exit(result, 0)


@pytest.mark.parametrize(
    ("token", "field"),
    [
        ("NaN", "overall.bps"),
        ("Infinity", "datasets[0].bps"),
        ("-Infinity", "cells[1].ll_gain"),
        ("1e999", "cells[0].spikes"),
        ("NaN", "settings.min_rate"),
    ],
)
def test_non_finite_numbers_in_a_baseline_exit_2(invoke, gate_runs, tmp_path, token, field):
    run, document = gate_runs
    marked = copy.deepcopy(document)
    parts = [int(p) if p.isdigit() else p for p in field.replace("[", ".").replace("]", "").split(".")]
    _edit(tuple(parts), "__MARK__")(marked)
    (tmp_path / "baseline.json").write_text(json.dumps(marked).replace('"__MARK__"', token))
    result = invoke("compare", run, "--baseline", tmp_path / "baseline.json")
    assert_exit(result, 2)
    assert f"{field} is " in result.stderr and "null" in result.stderr


def _paths(value, prefix=()):
    """Every key and index path in a JSON document."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield (*prefix, key)
        yield from _paths(item, (*prefix, key))


REPLACEMENTS = [None, True, 0, -1, 2.5, 1e300, "", "ok", "A", [], [1], {}, {"a": 1}, math.nan, math.inf]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_a_mutated_baseline_is_compared_or_refused_never_a_traceback(invoke, gate_runs, tmp_path, data):
    run, document = gate_runs
    paths = sorted(_paths(document), key=repr)
    path = data.draw(st.sampled_from(paths), label="path")
    mutated = copy.deepcopy(document)
    if isinstance(path[-1], str) and data.draw(st.booleans(), label="delete"):
        _edit(path)(mutated)
    else:
        _edit(path, data.draw(st.sampled_from(REPLACEMENTS), label="value"))(mutated)
    (tmp_path / "baseline.json").write_text(json.dumps(mutated, allow_nan=True))
    result = invoke("compare", run, "--baseline", tmp_path / "baseline.json", "--json", "-")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    else:
        assert json.loads(result.stdout)["passed"] == (result.exit_code == 0)


# ----------------------------------------------------------------------------------------------
# 6. Bootstrap blocks do not depend on where sample_idx starts


def test_paired_interval_does_not_depend_on_where_sample_idx_starts(invoke, tmp_path):
    rates, robs = session(7, n_samples=4000, n_cells=4)
    base = {"A": {"rhat": model(rates, 0.2, seed=1), "robs": robs}}
    new = {"A": {"rhat": model(rates, 0.3, seed=2), "robs": robs}}
    intervals = {}
    for first in (0, 10**6, TOP - 3999):
        base_run = write_run(tmp_path / f"base{first}", base, first_index=first)
        new_run = write_run(tmp_path / f"new{first}", new, first_index=first)
        result = invoke(
            "compare", new_run, "--baseline", base_run, "--significance", "0.05", "--bootstrap", "300", "--json", "-"
        )
        assert_exit(result, 1)
        document = json.loads(result.stdout)
        assert document["mode"] == "paired"
        intervals[first] = [m["interval"] for m in document["metrics"]]
    assert intervals[0] == intervals[10**6] == intervals[TOP - 3999]
    assert intervals[0][0][1] < 0  # a real interval, not a degenerate one


def test_stats_only_shards_interval_does_not_depend_on_where_sample_idx_starts(invoke, tmp_path):
    """The writer numbers blocks sample_idx // block_size from 0; the merge drops the empty ones before the start."""
    rates, robs = session(8, n_samples=3000, n_cells=4)
    intervals = {}
    for first in (0, 10**6):
        runs = {}
        for label, noise in (("base", 0.2), ("new", 0.3)):
            with ShardWriter(tmp_path / f"{label}{first}", 0, 1, store="stats", block_size=100) as writer:
                writer.add("A", model(rates, noise, seed=len(label)), robs, sample_idx=np.arange(3000) + first)
            runs[label] = tmp_path / f"{label}{first}"
        args = ("--significance", "0.05", "--bootstrap", "300", "--json", "-")
        result = invoke("compare", runs["new"], "--baseline", runs["base"], *args)
        assert result.exit_code in (0, 1), result.output
        document = json.loads(result.stdout)
        assert document["mode"] == "paired"
        intervals[first] = [m["interval"] for m in document["metrics"]]
    assert intervals[0] == intervals[10**6]


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.integers(0, 2**40), min_size=1, max_size=300, unique=True),
    shift=st.integers(0, 2**62),
    blocks=st.integers(2, 400),
)
def test_blocks_are_equal_contiguous_runs_of_the_sorted_indices_whatever_their_start(values, shift, blocks):
    unique = np.sort(np.array(values, dtype=np.int64))
    ids = sample_blocks(unique, unique, blocks)
    shifted = unique + np.int64(TOP - int(unique[-1]) if shift % 2 else shift)
    assert np.array_equal(sample_blocks(shifted, shifted, blocks), ids)
    assert ids.min() >= 0 and ids.max() < blocks and np.all(np.diff(ids) >= 0)
    sizes = np.bincount(ids)
    assert sizes.max() - sizes[sizes > 0].min() <= 1
    shuffled = np.random.default_rng(0).permutation(len(unique))
    assert np.array_equal(sample_blocks(unique, unique[shuffled], blocks), ids[shuffled])


# ----------------------------------------------------------------------------------------------
# 16. Escaping in the compare documents

NASTY = "V1|`x`<b>*y*_z_[l](u)$m$~s~\\"


def in_memory_side(label: str, names: list[str], scale: float) -> Side:
    rng = np.random.default_rng(3)
    datasets = []
    for name in names:
        rates = rng.gamma(2.0, 0.5, (50, 3))
        stats = batch_stats(rates * scale, rng.poisson(rates))
        datasets.append(MergedDataset(name, np.array([f"id{name}"] * 3, dtype=object), "rate", [stats], 50, 0))
    return Side(label, score_run(MergedRun(Path(label), 0, 1, [], datasets)))


def test_markdown_escapes_names_and_junit_always_parses():
    names = [NASTY, "ctl\x01\x1b\x7f", "surrogate\ud800", "\ufffe"]
    comparison = compare(
        in_memory_side("run`|<i>", names, 3.0),
        in_memory_side("base", [*names, "gone<b>"], 1.0),
        CompareSettings(allow_missing_datasets=True),
    )
    assert comparison.missing_datasets == ["gone<b>"]
    markdown = compare_markdown(comparison)
    markdown.encode("utf-8")  # no lone surrogate left
    assert not any(not char.isprintable() for char in markdown.replace("\n", ""))
    assert "<b>" not in markdown and "<i>" not in markdown and "&lt;b&gt;" in markdown
    assert "V1\\|\\`x\\`&lt;b&gt;\\*y\\*\\_z\\_\\[l\\](u)\\$m\\$\\~s\\~\\\\" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert markdown.split("\n\n")[2].count("\n") + 1 == 2 + 2 + len(names)  # the metrics; the attribution follows
    assert "contributing most to Δ" in markdown and "(id idV1\\|\\`x\\`&lt;b&gt;" in markdown
    assert all(line.replace("\\|", "").count("|") == 8 for line in rows)  # 7 columns in every table
    assert "ctl\\\\x01\\\\x1b\\\\x7f" in markdown
    suite = ElementTree.fromstring(compare_junit(comparison).encode("utf-8"))
    assert {case.get("name") for case in suite.iter("testcase")} >= {printable(f"{name}.bps") for name in names}
    assert "ctl\\x01\\x1b\\x7f.bps" in {case.get("name") for case in suite.iter("testcase")}


def test_cli_documents_of_a_shard_with_control_characters_in_a_name(invoke, tmp_path):
    names = ("V1|<b>*_x_\x01", "plain")
    sessions = {name: session(seed) for seed, name in enumerate(names)}
    base = write_run(
        tmp_path / "base", {name: {"rhat": rates, "robs": robs} for name, (rates, robs) in sessions.items()}
    )
    new = write_run(
        tmp_path / "new", {name: {"rhat": 3 * rates, "robs": robs} for name, (rates, robs) in sessions.items()}
    )
    result = invoke("compare", new, "--baseline", base, "--junit", tmp_path / "c.xml", "--markdown", tmp_path / "c.md")
    assert_exit(result, 1)
    suite = ElementTree.parse(tmp_path / "c.xml").getroot()
    assert "V1|<b>*_x_\\x01.bps" in {case.get("name") for case in suite.iter("testcase")}
    markdown = (tmp_path / "c.md").read_text(encoding="utf-8")
    assert "V1\\|&lt;b&gt;\\*\\_x\\_\\\\x01" in markdown and "\x01" not in markdown


# ----------------------------------------------------------------------------------------------
# --significance is a test level


@pytest.mark.parametrize("level", ["0", "1", "-0.1", "1.5", "nan"])
def test_significance_outside_0_1_exits_2(invoke, gate_runs, level):
    run, _ = gate_runs
    result = invoke("compare", run, "--baseline", run, "--significance", level)
    assert_exit(result, 2)
    assert "--significance" in result.stderr and "0 < LEVEL < 1" in result.stderr
    with pytest.raises(ArgumentError, match="between 0 and 1"):
        CompareSettings(significance=float(level))


def test_significance_help_says_it_is_the_two_sided_level(invoke, gate_runs):
    help_text = " ".join(invoke("compare", "--help").stdout.split())
    assert "two-sided" in help_text and "1 - LEVEL" in help_text
    run, _ = gate_runs
    assert_exit(invoke("compare", run, "--baseline", run, "--significance", "0.5", "--bootstrap", "100"), 0)


def test_result_from_a_broken_document_is_a_baseline_error_naming_the_field(gate_runs):
    _, document = gate_runs
    broken = copy.deepcopy(document)
    broken["datasets"][0]["samples"] = "many"
    with pytest.raises(BaselineError, match=r"datasets\[0\]\.samples"):
        Result.from_dict(broken)
    assert Result.from_dict(copy.deepcopy(document)).overall.bps == pytest.approx(document["overall"]["bps"])
