"""Printed tables in a CI log (80 columns, piped) and in the three `--format`s: tables split by columns rather than
turned into lines of "header value", every number whole and equal to the JSON's, no trailing space, markdown that
parses as GitHub tables, a row per run of a sweep (a broken one with its reason)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console

from bpseval import ShardWriter
from bpseval.views.tables import Column, name_column, print_table
from bpseval.views.text import UNDEFINED_TEXT, format_bps
from tests.test_tables import METRICS, assert_whole, compute_numbers

NAMES = ("Allen_2022-04-13", "Allen_2022-05-02", "Allen_2022-06-17")
CELLS = (23, 41, 60)
FORMATS = ("table", "plain", "markdown")
BOX = re.compile("[│┃━┿┏┓┗┛┡┩╇┼─]")


def write_run(run: Path, *, noise: float = 0.0, seed: int = 0, ranks: tuple[int, ...] = (0, 1), names=NAMES) -> Path:
    """Three datasets over two ranks with ShardWriter: the same counts in every run, predictions moved by `noise`."""
    rng = np.random.default_rng(seed)
    for rank in ranks:
        with ShardWriter(run, rank, 2, step=4) as writer:
            for index, (name, cells) in enumerate(zip(names, CELLS, strict=True)):
                data = np.random.default_rng(100 + index)
                rhat = data.gamma(3.0, 1.0, size=(64, cells))
                robs = data.poisson(rhat).astype(np.float32)
                rhat = (rhat * np.exp(noise * rng.normal(size=rhat.shape))).astype(np.float32)
                rows = np.arange(rank, 64, 2)
                writer.add(name, rhat[rows], robs[rows], sample_idx=rows, cell_ids=np.arange(cells) + 1000)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ci-log")
    write_run(root / "lr-1e-3")
    write_run(root / "lr-3e-4", noise=0.3, seed=1)
    write_run(root / "lr-1e-4", noise=0.8, seed=2)
    write_run(root / "lr-3e-3", ranks=(0,))  # rank 1 never wrote: cannot be scored
    write_run(root / "marked", names=("V1|*new*", "www.x.org_<b>", "4. area"))
    with open(root / "cells.csv", "w", encoding="utf-8") as table:
        table.write("dataset,cell,area\n")
        table.writelines(f"{name},{cell},{['V1', 'LM', 'AL'][cell % 3]}\n" for name in NAMES for cell in range(23))
    np.save(root / "mask.npy", np.random.default_rng(0).random((40, 6)) > 0.9)  # cells below 10
    return root


def bpseval(*args: object, width: int = 80, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command, its stdout piped as in a CI log, `width` columns."""
    env = {key: value for key, value in os.environ.items() if key not in ("GITHUB_STEP_SUMMARY", "FORCE_COLOR")}
    env.update(COLUMNS=str(width), NO_COLOR="1", TERM="dumb")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "bpseval", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False)


def parts(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each table of `text` (`--format table`): its headers and its rows (a prose value wrapped over lines joined)."""
    lines = text.splitlines()
    found: list[tuple[list[str], list[list[str]]]] = []
    for index, line in enumerate(lines[1:], start=1):
        if "┿" in line:
            found.append(([header.strip() for header in lines[index - 1].split("│")], []))
        elif " │ " in line and found and (found[-1][1] or "┿" in lines[index - 1]):
            values = [value.strip() for value in line.split("│")]
            if values[0] or not found[-1][1]:
                found[-1][1].append(values)
            else:  # a prose value wrapped onto the next line
                found[-1][1][-1] = [f"{a} {b}".strip() for a, b in zip(found[-1][1][-1], values, strict=True)]
        elif found and found[-1][1] and " │ " not in line:
            found.append(([], []))  # the table ended
    return [part for part in found if part[0]]


def values_by_header(text: str, keys: int = 1) -> dict[tuple[str, ...], dict[str, str]]:
    """Per row (its keys), every value by header, gathered over the tables the row is split in."""
    gathered: dict[tuple[str, ...], dict[str, str]] = {}
    for headers, rows in parts(text):
        for row in rows:
            gathered.setdefault(tuple(row[:keys]), {}).update(zip(headers[keys:], row[keys:], strict=True))
    return gathered


def test_compute_of_three_datasets_fits_15_lines_of_80_columns_as_a_table_of_the_json_numbers(runs, tmp_path):
    result = bpseval("compute", runs / "lr-1e-3", "--json", tmp_path / "r.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 15, result.stdout
    assert all(cell_len(line) <= 80 for line in lines)
    assert [len(headers) for headers, _ in parts(result.stdout)] == [7, 4], "two tables, each led by dataset"
    document = json.loads((tmp_path / "r.json").read_text())
    shown = values_by_header(result.stdout)
    expected = {
        (dataset["name"],): {
            **{
                status: str(count)
                for status, count in dataset["cells"].items()
                if status in ("ok", "silent", "uncovered")
            },
            "samples": str(dataset["samples"]),
            **{metric: format_bps(dataset[metric]) for metric in METRICS},
        }
        for dataset in document["datasets"]
    }
    overall = document["overall"]
    expected[("overall",)] = {
        **{status: str(overall["cells"][status]) for status in ("ok", "silent", "uncovered")},
        "samples": str(sum(dataset["samples"] for dataset in document["datasets"])),
        **{metric: format_bps(overall[metric]) for metric in METRICS},
    }
    assert shown == expected


def test_compare_at_80_columns_is_one_line_per_gated_metric_and_three_cells_per_failed_one(runs, tmp_path):
    args = ("compare", runs / "lr-1e-4", "--baseline", runs / "lr-1e-3", "--json", tmp_path / "c.json")
    result = bpseval(*args, "--markdown", tmp_path / "c.md", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    document = json.loads((tmp_path / "c.json").read_text())
    gated = [metric for metric in document["metrics"] if metric["gated"]]
    assert len(gated) == 5 and all(metric["verdict"] == "regressed" for metric in gated)
    verdicts, *attributions = parts(result.stdout)
    assert verdicts[0] == ["metric", "baseline", "new", "Δ", "tolerance", "verdict"]
    assert verdicts[1] == [
        [
            f"{metric['scope']} {metric['metric']}",
            format_bps(metric["baseline"]),
            format_bps(metric["new"]),
            f"{metric['delta']:+.4f}",
            format_bps(metric["tolerance"]),
            "✗ regressed",
        ]
        for metric in document["metrics"]
    ]
    assert len([line for line in result.stdout.splitlines() if "✗ regressed" in line]) == len(gated)
    assert result.stdout.count("the 3 of ") == len(gated)
    listed = {len({tuple(row[:2]) for row in rows}) for _, rows in attributions}
    assert listed == {3}, "the top 3 cells of each failed metric"
    markdown = (tmp_path / "c.md").read_text()
    assert markdown.count("the 10 of ") == len(gated), "the summary keeps its 10 cells"
    five = bpseval(*args, "--top", "5", cwd=tmp_path)
    assert five.stdout.count("the 5 of ") == len(gated)
    assert all(cell_len(line) <= 80 for line in result.stdout.splitlines() + five.stdout.splitlines())


def test_a_sweep_of_four_runs_has_a_row_per_run_and_the_broken_one_says_why(runs, tmp_path):
    names = ["lr-1e-3", "lr-3e-4", "lr-1e-4", "lr-3e-3"]
    result = bpseval("compute", *names, "--json", tmp_path / "s.json", cwd=runs)
    assert result.returncode == 2, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    reason = error.split("not scored: ", 1)[1]
    shown = values_by_header(result.stdout)
    assert sorted(shown) == sorted((name,) for name in names), result.stdout
    assert shown[("lr-3e-3",)]["not scored"] == reason
    assert {value for header, value in shown[("lr-3e-3",)].items() if header != "not scored"} == {UNDEFINED_TEXT}
    document = json.loads((tmp_path / "s.json").read_text())
    for run in document["runs"]:
        if "error" in run:
            continue
        row = shown[(run["run"],)]
        assert row["not scored"] == ""
        assert [row[metric] for metric in METRICS] == [format_bps(run["overall"][metric]) for metric in METRICS]
        assert [row[f"bps[{dataset['name']}]"] for dataset in run["datasets"]] == [
            format_bps(dataset["bps"]) for dataset in run["datasets"]
        ]
    assert all(cell_len(line) <= 80 for line in result.stdout.splitlines())


COMMANDS = {
    "compute": ("compute", "lr-1e-3"),
    "low cells": ("compute", "lr-1e-3", "--min-samples", "40"),
    "sweep": ("compute", "lr-1e-3", "lr-3e-4", "lr-1e-4", "lr-3e-3"),
    "group-by": ("compute", "lr-1e-3", "--cells", "cells.csv", "--group-by", "area"),
    "intervals": ("compute", "lr-1e-3", "--ci", "0.9", "--ci-resamples", "100"),
    "all steps": ("compute", "lr-1e-3", "--all-steps"),
    "coverage": ("coverage", "lr-1e-3", "--min-samples", "40"),
    "compare": ("compare", "lr-1e-4", "--baseline", "lr-1e-3", "--significance", "0.05", "--bootstrap", "200"),
    "doctor": ("doctor", "lr-3e-3"),
    "plan": ("plan", "mask.npy", "--world-size", "4"),
    "markdown syntax in names": ("compute", "marked"),
}


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("command", COMMANDS)
def test_no_line_ends_in_a_space_and_each_format_keeps_its_promise(runs, command, form):
    result = bpseval(*COMMANDS[command], "--format", form, cwd=runs)
    assert result.returncode in (0, 1, 2), result.stderr
    lines = result.stdout.splitlines()
    assert lines and not [line for line in lines if line != line.rstrip()], "trailing spaces"
    if form != "markdown":  # doctor's messages stay whole on their lines, for grep
        assert all(cell_len(line) <= 80 for line in (lines[:3] if command == "doctor" else lines))
    if form == "plain":
        assert not BOX.search(result.stdout)
    if form == "markdown":
        assert_markdown_tables(result.stdout)


def assert_markdown_tables(text: str) -> None:
    """Every block of `|` lines is a GitHub table: a blank line before and after, a delimiter row, and as many
    cells in every row as in the header (escaped pipes, `\\|`, are text)."""
    lines = text.splitlines()
    blocks, start = [], None
    for index, line in enumerate([*lines, ""]):
        if line.startswith("|") and start is None:
            start = index
        elif not line.startswith("|") and start is not None:
            blocks.append((start, index))
            start = None
    assert blocks, text
    for start, end in blocks:
        assert start == 0 or lines[start - 1] == "", f"no blank line before the table: {lines[start - 1]!r}"
        assert end == len(lines) or lines[end] == "", f"no blank line after the table: {lines[end]!r}"
        table = lines[start:end]
        cells = [len(re.findall(r"(?<!\\)\|", row)) - 1 for row in table]
        assert len(table) >= 3 and len(set(cells)) == 1, table
        assert re.fullmatch(r"\|( *-{2,}[-:] *\|)+", table[1].replace(" ", "")), table[1]


def test_markdown_escapes_the_names_of_the_shards(runs):
    result = bpseval("compute", "marked", "--format", "markdown", cwd=runs)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| V1\\|\\*new\\* ") for line in rows), rows
    assert any(line.startswith("| www\\.x.org\\_&lt;b&gt; ") for line in rows), rows
    assert "<b>" not in result.stdout and "**new**" not in result.stdout


def test_plain_columns_are_aligned_with_spaces(runs):
    result = bpseval("compute", "lr-1e-3", "--format", "plain", cwd=runs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("dataset "))
    rows = [line for line in lines if line.startswith(NAMES) or line.startswith("overall ")][:4]
    for word in header.split()[1:]:  # numbers are right-justified under the end of their header
        end = header.index(f" {word}") + 1 + len(word)
        assert all(row[end - 1].isdigit() and (len(row) == end or row[end] == " ") for row in rows), (word, rows)


def test_json_on_stdout_is_only_json_whatever_the_format(runs):
    for form in FORMATS:
        result = bpseval("compute", "lr-1e-3", "--json", "-", "--format", form, cwd=runs)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["overall"]["bps"] is not None


@pytest.mark.parametrize("width", [40, 80, 200])
def test_no_width_cuts_a_number(runs, tmp_path, width):
    result = bpseval("compute", "lr-1e-3", "lr-3e-4", "--json", tmp_path / "r.json", width=width, cwd=runs)
    assert result.returncode == 0, result.stderr
    assert_whole(result.stdout, compute_numbers(json.loads((tmp_path / "r.json").read_text())), width)
    if width == 200:
        assert len(parts(result.stdout)) == 1, "one table when it fits"


NUMBER = st.one_of(st.floats(-1e4, 1e4, allow_nan=False).map(format_bps), st.integers(0, 10**9).map(str))


@settings(max_examples=80, deadline=None)
@given(
    width=st.integers(40, 200),
    form=st.sampled_from(["table", "plain"]),
    keys=st.integers(1, 2),
    headers=st.lists(st.sampled_from(["bps", "bps_pooled", "pseudo_r2_pooled", "rank 12", "Δ", "n"]), max_size=16),
    data=st.data(),
)
def test_any_width_keeps_every_number_whole_on_one_line(width, form, keys, headers, data):
    names = st.text(alphabet="abcdefghij_-0123456789", min_size=1, max_size=30)
    rows = data.draw(
        st.lists(
            st.tuples(
                st.lists(names, min_size=keys, max_size=keys),
                st.lists(NUMBER, min_size=len(headers), max_size=len(headers)),
            ),
            min_size=1,
            max_size=5,
        )
    )
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False)
    columns = [*(name_column(f"key{i}") for i in range(keys)), *map(Column, headers)]
    print_table(console, "title", columns, [[*names_, *values] for names_, values in rows], keys=keys, form=form)
    lines = out.getvalue().splitlines()
    assert all(cell_len(line) <= width and line == line.rstrip() for line in lines)
    tokens = {token for line in lines for token in re.split(r"[\s│]+", line)}
    assert {value for _, values in rows for value in values} <= tokens
