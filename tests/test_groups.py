"""Cell groups (`--cells TABLE --group-by COLUMN`): co-bps against nlb_tools, every metric per group from the
per-cell scores, bad tables refused, unmatched cells named, user text escaped in every output."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nlb_tools.evaluation import bits_per_spike as nlb_bits_per_spike

import bpseval
from bpseval.features.groups import cell_groups, group_run, load_cell_table, score_groups
from bpseval.kernel.stats import LN2, OK, STATUSES, UNCOVERED
from tests.conftest import poisson_dataset, table_rows, write_raw_shard
from tests.test_tables import WIDTHS, assert_whole, invoke_at

N_ROWS, N_CELLS = 60, 7
NAMES = ("sessionA", "sessionB")
HELDOUT = {"sessionA": {1, 4, 5}, "sessionB": {0, 2, 6}}


def write_grouped_run(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Two datasets over two ranks with masks; rank 1 repeats rows 20-29 of rank 0 (duplicates, dropped once)."""
    arrays = {name: poisson_dataset(10 + index, n_rows=N_ROWS, n_cells=N_CELLS) for index, name in enumerate(NAMES)}
    halves = (np.arange(0, 30), np.arange(20, N_ROWS))
    for rank, rows in enumerate(halves):
        shard = {name: {**{k: v[rows] for k, v in data.items()}, "sample_idx": rows} for name, data in arrays.items()}
        write_raw_shard(run_dir / f"rank-{rank}.h5", shard, rank=rank, world_size=2, step=1)
    return arrays


def write_table(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def heldout_table(path: Path) -> Path:
    rows = [[name, cell, "true" if cell in HELDOUT[name] else "false"] for name in NAMES for cell in range(N_CELLS)]
    return write_table(path, ["dataset", "cell", "heldout"], rows)


def nlb_arrays(data: dict[str, np.ndarray], cells: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The (samples, 1, cells) rates and spikes nlb_tools takes; masked entries are NaN spikes, as NLB masks."""
    rates = data["rhat"][:, cells].astype(np.float64)
    spikes = np.where(data["dfs"][:, cells] > 0, data["robs"][:, cells].astype(np.float64), np.nan)
    return rates[:, None, :], spikes[:, None, :]


def group(document: dict, dataset: str | None, value: str | None) -> dict:
    (entry,) = [g for g in document["groups"] if g["dataset"] == dataset and g["value"] == value]
    return entry


def test_heldout_group_bps_pooled_is_nlb_co_bps(invoke, tmp_path):
    arrays = write_grouped_run(tmp_path / "run")
    table = heldout_table(tmp_path / "cells.csv")
    result = invoke("compute", tmp_path / "run", "--cells", table, "--group-by", "heldout", "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    for name in NAMES:
        rates, spikes = nlb_arrays(arrays[name], sorted(HELDOUT[name]))
        expected = nlb_bits_per_spike(rates, spikes)
        assert group(document, name, "true")["bps_pooled"] == pytest.approx(expected, rel=1e-9, abs=0)
    parts = [nlb_arrays(arrays[name], sorted(HELDOUT[name])) for name in NAMES]
    rates, spikes = (np.concatenate([part[i] for part in parts], axis=2) for i in (0, 1))
    co_bps = nlb_bits_per_spike(rates, spikes)
    assert group(document, None, "true")["bps_pooled"] == pytest.approx(co_bps, rel=1e-9, abs=0)
    held_in = [[c for c in range(N_CELLS) if c not in HELDOUT[name]] for name in NAMES]
    parts = [nlb_arrays(arrays[name], cells) for name, cells in zip(NAMES, held_in, strict=True)]
    rates, spikes = (np.concatenate([part[i] for part in parts], axis=2) for i in (0, 1))
    assert group(document, None, "false")["bps_pooled"] == pytest.approx(nlb_bits_per_spike(rates, spikes), rel=1e-9)
    assert [(g["dataset"], g["value"]) for g in document["groups"]] == [
        ("sessionA", "false"),
        ("sessionA", "true"),
        ("sessionB", "false"),
        ("sessionB", "true"),
        (None, "false"),
        (None, "true"),
    ]
    assert group(document, None, "true")["cells"] == {**dict.fromkeys(STATUSES, 0), OK: 6}
    assert {g["column"] for g in document["groups"]} == {"heldout"}


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> bpseval.Result:
    run = tmp_path_factory.mktemp("grouped") / "run"
    arrays = write_grouped_run(run)
    arrays["sessionB"]["dfs"][:, 3] = 0.0  # an uncovered cell
    write_raw_shard(
        run / "rank-0.h5",
        {name: {**data, "sample_idx": np.arange(N_ROWS)} for name, data in arrays.items()},
        rank=0,
        world_size=1,
        step=2,
    )
    return bpseval.evaluate(run, step=2)


def reference(cells: list[dict]) -> dict[str, float]:
    """A group's numbers straight from its cells' JSON records, in plain float64."""
    ok = [cell for cell in cells if cell["status"] == OK]
    covered = [cell for cell in cells if cell["status"] != UNCOVERED]

    def mean(key: str) -> float:
        values = [cell[key] for cell in ok if cell[key] is not None]
        return float(np.mean(values)) if values else math.nan

    spikes = sum(cell["spikes"] for cell in covered)
    return {
        "bps": mean("bps") if ok else math.nan,
        "bps_pooled": sum(cell["ll_gain"] for cell in covered) / (LN2 * spikes) if spikes else math.nan,
        "pseudo_r2": mean("pseudo_r2"),
        "corr": mean("corr"),
    }


def same(actual: float | None, expected: float) -> bool:
    if actual is None:
        return math.isnan(expected)
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-15)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.lists(st.sampled_from(["a", "b", "10", ""]), min_size=2 * N_CELLS, max_size=2 * N_CELLS))
def test_every_group_metric_is_its_cells_numbers(scored_run, tmp_path, labels):
    rows = [[name, cell, labels[i * N_CELLS + cell]] for i, name in enumerate(NAMES) for cell in range(N_CELLS)]
    table = write_table(tmp_path / "cells.csv", ["dataset", "cell", "kind"], rows)
    result = bpseval.Result(scored_run.scored, group_run(scored_run.scored, table, "kind"))
    document = json.loads(result.to_json())
    cells = document["cells"]
    values = {(row[0], row[1]): row[2] or None for row in rows}
    for entry in document["groups"]:
        if entry["dataset"] is not None:
            members = [
                c
                for c in cells
                if c["dataset"] == entry["dataset"] and values[c["dataset"], c["cell"]] == entry["value"]
            ]
            expected = reference(members)
            for key, value in expected.items():
                assert same(entry[key], value), (entry, key, value)
            assert entry["cells"] == {s: sum(c["status"] == s for c in members) for s in STATUSES}
        else:
            parts = [g for g in document["groups"] if g["dataset"] is not None and g["value"] == entry["value"]]
            members = [c for c in cells if values[c["dataset"], c["cell"]] == entry["value"]]
            pooled = reference(members)["bps_pooled"]
            assert same(entry["bps_pooled"], pooled)
            means = [g["bps"] for g in parts if g["cells"][OK]]
            assert same(entry["bps"], float(np.mean(means)) if means else math.nan)
    order = [g["value"] for g in document["groups"] if g["dataset"] is None]
    present = set(values.values())
    assert order == [v for v in ("10", "a", "b") if v in present] + [None] * (None in present)


def test_a_group_of_every_cell_has_the_numbers_of_its_dataset_and_of_the_run(scored_run, tmp_path):
    rows = [[name, cell, "all"] for name in NAMES for cell in range(N_CELLS)]
    table = write_table(tmp_path / "cells.csv", ["dataset", "cell", "everything"], rows)
    result = bpseval.Result(scored_run.scored, group_run(scored_run.scored, table, "everything"))
    document = json.loads(result.to_json())
    for dataset in document["datasets"]:
        entry = group(document, dataset["name"], "all")
        assert {k: entry[k] for k in ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr", "cells")} == {
            k: dataset[k] for k in ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr", "cells")
        }
    entry, overall = group(document, None, "all"), document["overall"]
    for key in ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr", "cells"):
        assert entry[key] == overall[key], key
    assert result.groups.columns.tolist() == [
        "dataset",
        "column",
        "value",
        "bps",
        "bps_pooled",
        "pseudo_r2",
        "pseudo_r2_pooled",
        "corr",
        *STATUSES,
    ]
    assert len(result.groups) == 3 and result.groups["uncovered"].tolist() == [0, 1, 1]


def test_cells_missing_on_either_side_are_named_and_the_shards_ones_are_null(invoke, tmp_path):
    write_grouped_run(tmp_path / "run")
    rows = [[name, cell, "x"] for name in NAMES for cell in range(N_CELLS) if (name, cell) != ("sessionB", 2)]
    rows += [["sessionA", 9, "x"], ["sessionC", 0, "y"]]
    table = write_table(tmp_path / "cells.csv", ["dataset", "cell", "kind"], rows)
    result = invoke("compute", tmp_path / "run", "--cells", table, "--group-by", "kind", "--json", "-")
    assert result.exit_code == 0, result.output
    assert (
        f"Warning: --cells {table}: 2 cells of the table are not in the run, so not used: dataset 'sessionA' cell 9,"
        " dataset 'sessionC' cell 0.\n" in result.stderr
    )
    assert (
        f"Warning: --cells {table}: 1 cell of the run is not in the table, so in the group null of 'kind': dataset"
        " 'sessionB' cell 2.\n" in result.stderr
    )
    document = json.loads(result.stdout)
    assert group(document, "sessionB", None)["cells"][OK] == 1
    assert group(document, None, None)["cells"][OK] == 1
    assert "y" not in {g["value"] for g in document["groups"]}
    assert len([w for w in document["warnings"] if w.startswith("--cells")]) == 2


def test_cells_matched_by_cell_id_as_exact_text(invoke, tmp_path):
    arrays = poisson_dataset(3, n_rows=30, n_cells=4)
    numbers = {**arrays, "cell_ids": np.array([10, 11, 105, 13])}
    texts = {**arrays, "cell_ids": np.array([b"u1", b"u2", b"007", b"u4"])}
    write_raw_shard(tmp_path / "run" / "rank-0.h5", {"numbers": numbers, "texts": texts})
    rows = [["numbers", "010", "L5"], ["numbers", "13", "L2/3"], ["numbers", "1_05", "L5"], ["numbers", " 11", "L5"]]
    rows += [["texts", "007", "L5"], ["texts", "7", "L2/3"]]
    table = write_table(tmp_path / "cells.csv", ["dataset", "cell_id", "layer"], rows)
    result = invoke("compute", tmp_path / "run", "--cells", table, "--group-by", "layer", "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    counts = {(g["dataset"], g["value"]): g["cells"][OK] for g in document["groups"]}
    assert counts == {
        ("numbers", "L2/3"): 1,
        ("numbers", None): 3,
        ("texts", "L5"): 1,
        ("texts", None): 3,
        (None, "L2/3"): 1,
        (None, "L5"): 1,
        (None, None): 6,
    }
    assert (
        "4 cells of the table are not in the run, so not used: dataset 'numbers' cell_id 010, dataset 'numbers'"
        " cell_id 1_05, dataset 'numbers' cell_id  11, dataset 'texts' cell_id 7." in result.stderr
    )


BAD_TABLES = {
    "empty file": (
        "",
        "area",
        "the file is empty; give a CSV table with a header row (dataset, cell or cell_id, and the columns to group by)"
        " and one row per cell.",
    ),
    "header only": ("dataset,cell,area\n", "area", "the table has a header but no row; add one row per cell."),
    "no dataset column": (
        "session,cell,area\ns,0,V1\n",
        "area",
        "line 1 has no column 'dataset' (columns: 'session', 'cell', 'area'); add the dataset name of each cell.",
    ),
    "no cell column": (
        "dataset,unit,area\ns,0,V1\n",
        "area",
        "line 1 has neither a 'cell' column (0-based index of the cell within its dataset) nor a 'cell_id' column"
        " (the shards' cell_ids); add one of them.",
    ),
    "non-integer cell": (
        "dataset,cell,area\ns,0,V1\ns,1.5,V1\n",
        "area",
        "line 3, column 'cell': '1.5' is not a cell index (a whole number >= 0 in the digits 0-9 alone, the cell's"
        " position within its dataset, from 0); fix the value, or use a 'cell_id' column instead.",
    ),
    **{
        f"cell {label}": (
            f"dataset,cell,area\ns,0,V1\ns,{text},V1\n",
            "area",
            f"line 3, column 'cell': {text!r} is not a cell index (a whole number >= 0 in the digits 0-9 alone, the"
            " cell's position within its dataset, from 0); fix the value, or use a 'cell_id' column instead.",
        )
        for label, text in {
            "with an underscore": "1_0",
            "with a plus sign": "+3",
            "with spaces": " 4 ",
            "with a trailing space": "4 ",
            "in Arabic-Indic digits": "\u0663",
            "in full-width digits": "\uff13",
            "in superscript": "\u00b2",
        }.items()
    },
    "negative cell": (
        "dataset,cell,area\ns,-1,V1\n",
        "area",
        "line 2, column 'cell': '-1' is not a cell index (a whole number >= 0 in the digits 0-9 alone, the cell's"
        " position within its dataset, from 0); fix the value, or use a 'cell_id' column instead.",
    ),
    "conflicting duplicate": (
        "dataset,cell,area\ns,0,V1\ns,1,V1\ns,00,LM\n",
        "area",
        "lines 2 and 4 both describe dataset 's' cell 0 with different values (column 'area': 'V1' and 'LM'); keep"
        " one row per cell.",
    ),
    "short row": (
        "dataset,cell,area\ns,0\n",
        "area",
        "line 2 has 2 fields, the header 3; give every row one value per column (empty for none).",
    ),
    "empty dataset": (
        "dataset,cell,area\n,0,V1\n",
        "area",
        "line 2, column 'dataset' is empty; every row names its cell.",
    ),
    "repeated column": (
        "dataset,cell,area,area\ns,0,V1,V1\n",
        "area",
        "line 1 names the column 'area' twice; name each column once.",
    ),
    "unknown group column": (
        "dataset,cell,area,depth\ns,0,V1,3\n",
        "layer",
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_cell_tables_exit_2_naming_file_line_and_column(invoke, tmp_path, case):
    text, column, message = BAD_TABLES[case]
    table = tmp_path / "cells.csv"
    table.write_text(text, encoding="utf-8")
    result = invoke("compute", tmp_path / "missing-run", "--cells", table, "--group-by", column)
    assert result.exit_code == 2, result.output
    if message is None:
        expected = f"Error: --group-by 'layer': --cells {table} has no such column to group by (its columns: 'area', 'depth').\n"
    else:
        expected = f"Error: --cells {table}: {message}\n"
    assert result.stderr == expected


def test_options_that_do_not_go_together_exit_2(invoke, tmp_path):
    write_grouped_run(tmp_path / "run")
    table = heldout_table(tmp_path / "cells.csv")
    cases = {
        ("--cells", table): "Error: cells and group_by (--cells and --group-by) go together: the cell table, and the"
        " column of it to group by.\n",
        ("--cells", table, "--group-by", "heldout", "--all-steps"): "Error: --cells, --group-by and --groups-csv take"
        " one run directory and one step.\n",
        ("--groups-csv", tmp_path / "g.csv"): "Error: --groups-csv writes the --group-by table: give --cells and"
        " --group-by too.\n",
        ("--cells", tmp_path / "none.csv", "--group-by", "x"): f"Error: --cells {tmp_path / 'none.csv'}: cannot be"
        " read as a UTF-8 CSV table (No such file or directory).\n",
    }
    for options, message in cases.items():
        result = invoke("compute", tmp_path / "run", *options)
        assert (result.exit_code, result.stderr) == (2, message), options
    result = invoke("compute", tmp_path / "run", tmp_path / "run", "--cells", table, "--group-by", "heldout")
    assert result.stderr == "Error: --cells, --group-by and --groups-csv take one run directory and one step.\n"


def test_a_cell_id_that_contradicts_the_cell_index_exits_2(invoke, tmp_path):
    write_raw_shard(
        tmp_path / "run" / "rank-0.h5", {"s": {**poisson_dataset(1, n_cells=3), "cell_ids": np.array([5, 6, 7])}}
    )
    table = write_table(
        tmp_path / "cells.csv", ["dataset", "cell", "cell_id", "area"], [["s", 0, 5, "V1"], ["s", 1, 7, "V1"]]
    )
    result = invoke("compute", tmp_path / "run", "--cells", table, "--group-by", "area")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: --cells {table}: line 3, column 'cell_id': '7', but cell 1 of dataset 's' has cell_id '6' in the"
        " shards; fix the row, or leave out one of the columns 'cell' and 'cell_id'.\n"
    )
    table = write_table(
        tmp_path / "both.csv", ["dataset", "cell", "cell_id", "area"], [["s", 0, 5, "V1"], ["s", 1, "06", "V1"]]
    )
    result = invoke("compute", tmp_path / "run", "--cells", table, "--group-by", "area")
    assert (result.exit_code, result.stderr) == (
        2,
        f"Error: --cells {table}: line 3, column 'cell_id': '06', but cell 1 of dataset 's' has cell_id '6' in the"
        " shards; fix the row, or leave out one of the columns 'cell' and 'cell_id'.\n",
    )


MARKUP = "=cmd|' /C calc'!A0 [bold]x[/] <b>"


def test_values_from_the_table_are_escaped_in_every_output(invoke, tmp_path):
    write_grouped_run(tmp_path / "run")
    rows = [[name, cell, MARKUP if cell % 2 else "\x1b[31mred"] for name in NAMES for cell in range(N_CELLS)]
    table = write_table(tmp_path / "cells.csv", ["dataset", "cell", "=kind"], rows)
    out = tmp_path / "out"
    result = invoke(
        "compute",
        tmp_path / "run",
        "--cells",
        table,
        "--group-by",
        "=kind",
        "--groups-csv",
        out / "g.csv",
        "--json",
        out / "r.json",
    )
    assert result.exit_code == 0, result.output
    assert "[bold]x[/]" in result.stdout and "\\x1b[31mred" in result.stdout and "\x1b" not in result.stdout
    document = json.loads((out / "r.json").read_text())
    assert {g["value"] for g in document["groups"]} == {MARKUP, "\x1b[31mred"}
    records = list(csv.DictReader(io.StringIO((out / "g.csv").read_text(), newline="")))
    assert {r["value"] for r in records} == {"'" + MARKUP, "\x1b[31mred"}
    assert {r["column"] for r in records} == {"'=kind"}
    assert len(records) == 6 and all(r["bps_pooled"] for r in records)


def test_a_group_named_null_is_told_apart_from_the_cells_without_a_value_in_every_output(invoke, tmp_path):
    pytest.importorskip("matplotlib")
    write_grouped_run(tmp_path / "run")
    rows = [[name, cell, "null" if cell < 3 else ('"null"' if cell < 5 else "")] for name in NAMES for cell in range(6)]
    table = write_table(tmp_path / "cells.csv", ["dataset", "cell", "kind"], rows)  # cell 6: not in the table
    grouping = ["--cells", table, "--group-by", "kind"]
    result = invoke("compute", tmp_path / "run", *grouping, "--groups-csv", tmp_path / "g.csv", "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert {g["value"] for g in document["groups"]} == {"null", '"null"', None}
    records = list(csv.DictReader(io.StringIO((tmp_path / "g.csv").read_text(), newline="")))
    assert [r["value"] for r in records if r["dataset"] == ""] == ['"null"', "null", ""]
    terminal = invoke("compute", tmp_path / "run", *grouping)
    assert terminal.exit_code == 0, terminal.output
    cells = [row[1] for row in table_rows(terminal.stdout) if row[0] == "all datasets"]
    assert cells == ['"\\"null\\""', '"null"', "null"]  # the group "null" quoted, the group null bare
    assert invoke("report", tmp_path / "run", *grouping, "-o", tmp_path / "r.html").exit_code == 0
    page = (tmp_path / "r.html").read_text()
    section = page[page.index('<section id="groups">') : page.index("</section>", page.index('<section id="groups">'))]
    assert section.count("<td>&quot;null&quot;</td>") == 3 and section.count('<span class="muted">null</span>') == 3
    assert section.count("<td>&quot;\\&quot;null\\&quot;&quot;</td>") == 3


@pytest.mark.parametrize("width", WIDTHS)
def test_the_groups_table_keeps_every_number_whole(invoke, tmp_path, width):
    write_grouped_run(tmp_path / "run")
    table = heldout_table(tmp_path / "cells.csv")
    result = invoke_at(
        width, "compute", tmp_path / "run", "--cells", table, "--group-by", "heldout", "--json", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    numbers = [
        text
        for entry in document["groups"]
        for text in (
            *(f"{entry[key]:.4f}" for key in ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr")),
            str(entry["cells"][OK]),
        )
    ]
    assert_whole(result.stdout, numbers, width)
    assert result.stdout.count("all datasets") >= 2


def test_cell_groups_gives_each_dataset_its_cells_values(scored_run, tmp_path):
    table = load_cell_table(heldout_table(tmp_path / "cells.csv"))
    groups = cell_groups(table, scored_run.scored, "heldout")
    assert groups.values["sessionA"].tolist() == ["false", "true", "false", "false", "true", "true", "false"]
    assert groups.order == ["false", "true"] and groups.warnings == []
    scores = score_groups(scored_run.scored, groups)
    assert [(g.dataset, g.value) for g in scores.groups][-2:] == [(None, "false"), (None, "true")]


def test_report_has_a_section_per_group_with_values_escaped(invoke, tmp_path):
    write_grouped_run(tmp_path / "run")
    rows = [[name, cell, "<b>x</b>" if cell % 2 else "plain"] for name in NAMES for cell in range(N_CELLS)]
    table = write_table(tmp_path / "cells.csv", ["dataset", "cell", "<i>kind"], rows)
    result = invoke("report", tmp_path / "run", "-o", tmp_path / "r.html", "--cells", table, "--group-by", "<i>kind")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    section = page[page.index('<section id="groups">') :]
    section = section[: section.index("</section>")]
    assert "<h2>By &lt;i&gt;kind</h2>" in section and "<b>" not in section and "<i>" not in section
    assert section.count("&lt;b&gt;x&lt;/b&gt;") == 3 and section.count("<td>all datasets</td>") == 2
    assert f"--cells {table} --group-by '<i>kind'" in page.replace("&#x27;", "'").replace("&lt;", "<").replace(
        "&gt;", ">"
    )
