"""pseudo_r2, pseudo_r2_pooled and corr in the documents: CSV, baseline files, and the baseline check (issue #16)."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bpseval
from bpseval.api import Result
from bpseval.cli import app
from bpseval.errors import BaselineError
from tests.conftest import poisson_dataset, write_raw_shard

DATASET_KEYS = ("pseudo_r2", "pseudo_r2_pooled", "corr")
CELL_KEYS = ("pseudo_r2", "corr")


def write_run(run: Path, scale: float = 1.0) -> Path:
    """One rank, datasets A and B of 5 cells; `scale` multiplies the predictions (another model)."""
    datasets = {}
    for index, name in enumerate(("A", "B")):
        arrays = poisson_dataset(index, n_rows=40, n_cells=5)
        datasets[name] = {**arrays, "rhat": arrays["rhat"] * scale}
    write_raw_shard(run / "rank-0.h5", datasets)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("metric_outputs")
    return write_run(root / "good"), write_run(root / "worse", scale=1.7)


@pytest.fixture(scope="module")
def baseline(runs, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("baseline") / "baseline.json"
    result = CliRunner().invoke(app, ["baseline", str(runs[0]), "-o", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def test_the_cells_csv_carries_pseudo_r2_and_corr_as_the_json_does(invoke, runs, tmp_path):
    result = invoke("compute", runs[0], "--json", tmp_path / "r.json", "--csv", tmp_path / "cells.csv")
    assert result.exit_code == 0, result.output
    cells = json.loads((tmp_path / "r.json").read_text())["cells"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cells.csv").read_text())))
    assert list(rows[0])[-4:] == ["bps", "pseudo_r2", "corr", "status"]
    for row, cell in zip(rows, cells, strict=True):
        for key in CELL_KEYS:
            assert (row[key] == "") == (cell[key] is None)
            assert cell[key] is None or float(row[key]) == cell[key], (key, row, cell)
    assert all(row["pseudo_r2"] and row["corr"] for row in rows)  # Poisson counts: every cell has both


def test_the_runs_csv_carries_the_overall_metrics(invoke, runs, tmp_path):
    result = invoke("compute", *runs, "--json", tmp_path / "r.json", "--csv", tmp_path / "runs.csv")
    assert result.exit_code == 0, result.output
    documents = {run["run"]: run for run in json.loads((tmp_path / "r.json").read_text())["runs"]}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert list(rows[0])[:7] == ["run", "step", "bps", "bps_pooled", *DATASET_KEYS]
    for row in rows:
        overall = documents[row["run"]]["overall"]
        assert [float(row[key]) for key in DATASET_KEYS] == [overall[key] for key in DATASET_KEYS]


def test_a_baseline_holds_the_new_metrics_per_cell_dataset_and_overall(runs, baseline):
    result = bpseval.evaluate(runs[0])
    for key in DATASET_KEYS:
        assert baseline["overall"][key] == getattr(result.overall, key)
        assert [entry[key] for entry in baseline["datasets"]] == [getattr(d, key) for d in result.scored.datasets]
    for key in CELL_KEYS:
        assert [cell[key] for cell in baseline["cells"]] == list(result.cells[key])
    again = Result.from_dict(copy.deepcopy(baseline))
    assert [getattr(again.overall, key) for key in DATASET_KEYS] == [baseline["overall"][key] for key in DATASET_KEYS]


def _without_new_metrics(document: dict) -> dict:
    """The document as a bpseval from before the new metrics wrote it."""
    older = copy.deepcopy(document)
    for entry in (older["overall"], *older["datasets"]):
        for key in DATASET_KEYS:
            del entry[key]
    for cell in older["cells"]:
        for key in CELL_KEYS:
            del cell[key]
    return older


def test_a_baseline_written_before_the_new_metrics_is_accepted_and_compared(invoke, runs, baseline, tmp_path):
    older = _without_new_metrics(baseline)
    (tmp_path / "older.json").write_text(json.dumps(older))
    same = invoke("compare", runs[0], "--baseline", tmp_path / "older.json")
    assert same.exit_code == 0, same.output
    worse = invoke("compare", runs[1], "--baseline", tmp_path / "older.json")
    assert worse.exit_code == 1, worse.output
    result = Result.from_dict(older)
    assert all(math.isnan(getattr(result.overall, key)) for key in DATASET_KEYS)
    assert result.cells["corr"].isna().all() and result.datasets["pseudo_r2"].isna().all()


def test_null_new_metrics_are_accepted(invoke, runs, baseline, tmp_path):
    nulls = copy.deepcopy(baseline)
    for entry in (nulls["overall"], *nulls["datasets"]):
        entry.update(dict.fromkeys(DATASET_KEYS))
    for cell in nulls["cells"]:
        cell.update(dict.fromkeys(CELL_KEYS))
    (tmp_path / "nulls.json").write_text(json.dumps(nulls))
    result = invoke("compare", runs[0], "--baseline", tmp_path / "nulls.json")
    assert result.exit_code == 0, result.output


MISTYPED = {
    "cell pseudo_r2 text": (
        ("cells", 0, "pseudo_r2"),
        "high",
        'cells[0].pseudo_r2 must be a finite number or null, not text "high"',
    ),
    "cell corr a boolean": (
        ("cells", 3, "corr"),
        True,
        "cells[3].corr must be a number in [-1, 1] or null, not a boolean true",
    ),
    "cell corr above 1": (
        ("cells", 2, "corr"),
        1.5,
        "cells[2].corr must be a number in [-1, 1] or null, not a number 1.5",
    ),
    "dataset pseudo_r2_pooled a list": (
        ("datasets", 1, "pseudo_r2_pooled"),
        [0.2],
        "datasets[1].pseudo_r2_pooled must be a finite number or null, not a list",
    ),
    "dataset corr below -1": (
        ("datasets", 0, "corr"),
        -2,
        "datasets[0].corr must be a number in [-1, 1] or null, not a number -2",
    ),
    "overall pseudo_r2 text": (
        ("overall", "pseudo_r2"),
        "0.3",
        'overall.pseudo_r2 must be a finite number or null, not text "0.3"',
    ),
    "overall corr an object": (
        ("overall", "corr"),
        {"mean": 0.5},
        "overall.corr must be a number in [-1, 1] or null, not an object",
    ),
}


@pytest.mark.parametrize("case", MISTYPED, ids=list(MISTYPED))
def test_a_mistyped_new_metric_in_a_baseline_exits_2_naming_the_field(invoke, runs, baseline, tmp_path, case):
    path, value, problem = MISTYPED[case]
    broken = copy.deepcopy(baseline)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    source = tmp_path / "broken.json"
    source.write_text(json.dumps(broken))
    result = invoke("compare", runs[0], "--baseline", source)
    assert result.exit_code == 2, result.output
    message = f"{source}: {problem}; recreate the baseline with `bpseval baseline RUN -o FILE`."
    assert result.stderr == f"Error: {message}\n"
    with pytest.raises(BaselineError) as raised:
        Result.from_dict(broken)
    assert str(raised.value) == message.replace(str(source), "the document given to Result.from_dict")


@pytest.mark.parametrize(("token", "field"), [("NaN", "overall.corr"), ("Infinity", "cells[1].pseudo_r2")])
def test_non_finite_new_metrics_in_a_baseline_exit_2(invoke, runs, baseline, tmp_path, token, field):
    marked = copy.deepcopy(baseline)
    if field.startswith("overall"):
        marked["overall"]["corr"] = "__MARK__"
    else:
        marked["cells"][1]["pseudo_r2"] = "__MARK__"
    source = tmp_path / "marked.json"
    source.write_text(json.dumps(marked).replace('"__MARK__"', token))
    result = invoke("compare", runs[0], "--baseline", source)
    assert result.exit_code == 2, result.output
    problem = f"is {token}, which a baseline never holds (an undefined value is null)"
    assert (
        result.stderr
        == f"Error: {source}: {field} {problem}; recreate the baseline with `bpseval baseline RUN -o FILE`.\n"
    )
