"""Names from the data printed safely: CSV cells inert for spreadsheets, `_names` in legends, markup in the report."""

from __future__ import annotations

import csv
import io
import re
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpseval
from bpseval import ShardWriter
from bpseval.features.compare import CompareSettings, compare
from bpseval.views.documents import compare_markdown
from bpseval.views.files import FORMULA_STARTS, write_csv
from tests.conftest import poisson_dataset
from tests.test_compare_gate import in_memory_side


def write_run(
    run_dir: Path,
    datasets: dict[str, list[str] | None],
    steps: tuple[int, ...] = (0,),
    seed: int = 0,
    uncovered: tuple[int, ...] = (3,),
) -> Path:
    """One rank per step; each dataset has 4 cells (cell_ids as given), cell 0 with a bad model (negative bps)."""
    for step in steps:
        with ShardWriter(run_dir, 0, 1, step=step) as writer:
            for index, (name, cell_ids) in enumerate(datasets.items()):
                arrays = poisson_dataset(seed + 10 * step + index, n_cells=4)
                arrays["dfs"][:, list(uncovered)] = 0.0
                arrays["rhat"][:, 0] = 40.0  # far too high: a negative bps
                writer.add(name, **arrays, cell_ids=cell_ids)
    return run_dir


def read_csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# ----------------------------------------------------------------------------------------------
# CSV


FORMULA_NAMES = {"=1+2": ["=A1", "+cell", "-3", "\t@SUM(A1)"], "@session": None, "+plus": None, "-minus": None}


def test_compute_csv_neutralises_text_that_starts_like_a_formula_and_keeps_negative_numbers(invoke, tmp_path):
    run = write_run(tmp_path / "run", FORMULA_NAMES)
    result = invoke("compute", run, "--csv", tmp_path / "cells.csv")
    assert result.exit_code == 0, result.output
    rows = read_csv_rows((tmp_path / "cells.csv").read_text(encoding="utf-8"))
    assert sorted({row["dataset"] for row in rows}) == sorted("'" + name for name in FORMULA_NAMES)
    assert [row["cell_id"] for row in rows if row["dataset"] == "'=1+2"] == ["'=A1", "'+cell", "'-3", "'\t@SUM(A1)"]
    assert [row["cell_id"] for row in rows if row["dataset"] == "'@session"] == ["0", "1", "2", "3"]
    negative = [row["bps"] for row in rows if row["cell"] == "0"]
    assert negative and all(value.startswith("-") and float(value) < 0 for value in negative)  # numbers stay numbers
    cells = bpseval.evaluate(run).cells
    assert [float(row["bps"]) for row in rows if row["bps"]] == cells["bps"].dropna().tolist()


def test_coverage_csv_and_several_runs_are_neutralised_too(invoke, tmp_path):
    write_run(tmp_path / "=runs" / "=HYPERLINK(x)", {"-pilot": ["=c0", "c1", "c2", "c3"]})
    coverage = invoke("coverage", tmp_path / "=runs" / "=HYPERLINK(x)", "--csv", tmp_path / "coverage.csv")
    assert coverage.exit_code == 1, coverage.output  # cell 3 is uncovered: the gate fails, the CSV is written
    rows = read_csv_rows((tmp_path / "coverage.csv").read_text(encoding="utf-8"))
    assert {row["dataset"] for row in rows} == {"'-pilot"} and "c3" in {row["cell_id"] for row in rows}
    write_run(tmp_path / "=runs" / "plain", {"V1": None})
    runs_dir = tmp_path / "=runs"
    runs = invoke("compute", runs_dir / "=HYPERLINK(x)", runs_dir / "plain", "--csv", tmp_path / "runs.csv")
    assert runs.exit_code == 0, runs.output
    rows = read_csv_rows((tmp_path / "runs.csv").read_text(encoding="utf-8"))
    assert len(rows) == 2 and not any(row["run"].startswith(FORMULA_STARTS) for row in rows)
    assert any("=HYPERLINK(x)" in row["run"] for row in rows)


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=5),
    numbers=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=5),
)
def test_every_text_cell_is_inert_and_every_number_reads_back_unchanged(texts, numbers):
    size = min(len(texts), len(numbers))
    frame = pd.DataFrame({"name": texts[:size], "bps": numbers[:size], "count": np.arange(size)})
    buffer = io.StringIO()
    write_csv(frame, "-", stdout=buffer)
    back = read_csv_rows(buffer.getvalue())
    for row, text, number in zip(back, texts, numbers, strict=False):
        assert row["name"] == ("'" + text if text.startswith(FORMULA_STARTS) else text)
        assert not row["name"].startswith(FORMULA_STARTS)
        assert float(row["bps"]) == number and not row["bps"].startswith("'")


# ----------------------------------------------------------------------------------------------
# Plot legends


def test_names_starting_with_an_underscore_show_in_every_legend(tmp_path):
    pytest.importorskip("matplotlib")
    from bpseval.features.overview import load_overview
    from bpseval.views.plot import figures

    run = write_run(tmp_path / "run", {"_pilot": None, "__init__": None, "V1": None}, steps=(0, 1))
    inputs = load_overview(run, baseline=write_run(tmp_path / "base", {"_pilot": None, "__init__": None, "V1": None}))
    made = figures(inputs)
    for stem in ("bps-vs-rate", "bps-over-steps", "compare-cells"):
        labels = [text.get_text() for text in made[stem].legends[0].get_texts()]
        assert {"_pilot", "__init__", "V1"} <= set(labels), (stem, labels)


# ----------------------------------------------------------------------------------------------
# HTML report

SCRIPT = "<script>alert(1)"
QUOTED = "a\"b&c'd"
GONE = "<i>gone"
NEW = "&new;<b>"
SCRIPT_IDS = ["</script><script>alert(2)</script>", '"><img src=x onerror=alert(3)>', "&amp;", "<!-- c3 -->"]


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.comments: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += attrs

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_escapes_dataset_names_and_cell_ids_everywhere(tmp_path):
    pytest.importorskip("matplotlib")
    from bpseval.features.overview import load_overview
    from bpseval.views.html import render_report

    base = write_run(tmp_path / "base", {SCRIPT: SCRIPT_IDS, QUOTED: None, GONE: None}, seed=1)
    run = write_run(tmp_path / "run", {SCRIPT: SCRIPT_IDS, QUOTED: None, NEW: None}, steps=(0, 1), uncovered=(1, 3))
    with ShardWriter(run, 0, 2, step=2):  # an incomplete step, listed by name
        pass
    inputs = load_overview(run, 1, baseline=base, min_samples=41)  # every cell is listed as thinly covered
    comparison = inputs.comparison
    assert comparison.missing_datasets == [GONE] and comparison.new_datasets == [NEW]
    assert SCRIPT_IDS[1] in set(comparison.coverage_regressions["cell_id"])  # ok in the baseline, uncovered now
    html = render_report(inputs, ["bpseval", "report", str(run), "--min-samples", "41"], run_label=SCRIPT)
    parser = Tags()
    parser.feed(html)
    parser.close()
    assert "script" not in parser.tags and "i" not in parser.tags and "b" not in parser.tags
    assert parser.tags.count("img") == len(inputs.scored.datasets) + 5  # only the report's own pictures
    assert not any(name.startswith("on") for name, _ in parser.attributes) and parser.comments == []
    text = " ".join(parser.text)
    for value in (SCRIPT, QUOTED, GONE, NEW, *SCRIPT_IDS):
        assert value in text, value  # shown as typed
        if value != "&amp;":
            assert value not in html, value  # never as markup
    assert escape("&amp;") in html  # "&amp;" itself is escaped, not taken as an entity
    # the places cell ids land: unscored cells, thinly covered cells, cells that lost coverage
    assert html.count(escape(SCRIPT_IDS[3])) >= 2 and 'id="unscored"' in html and 'id="coverage"' in html


def test_report_writes_control_characters_of_group_values_as_escapes(invoke, tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", {"s": None})
    table = tmp_path / "cells.csv"
    table.write_text("dataset,cell,kind\ns,0,\x1b[31mred\ns,1,\x07bell\u0085\ns,2,plain\n", encoding="utf-8")
    result = invoke("report", run, "-o", tmp_path / "r.html", "--cells", table, "--group-by", "kind")
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert not any(char in html for char in "\x1b\x07\x85")
    assert "\\x1b[31mred" in html and "\\x07bell\\x85" in html


URL_NAMES = ["https://evil.example/a", "see www.evil.example now", "me@evil.example", "FTP://evil.example"]


def test_markdown_never_turns_a_url_or_an_address_in_a_name_into_a_link():
    """GitHub links http://, https://, ftp://, www. and e-mail addresses in markdown text: names are written so that
    none is one (checked against GitHub's renderer, cmark-gfm, when this was written)."""
    comparison = compare(
        in_memory_side("run at https://evil.example/run", URL_NAMES, 3.0),
        in_memory_side("www.evil.example/base", URL_NAMES, 1.0),
        CompareSettings(),
    )
    assert comparison.failed_metrics  # the attribution tables, with the names and ids, are written too
    markdown = compare_markdown(comparison)
    assert re.search(r"(?<!\\)://", markdown) is None
    assert re.search(r"www(?!\\\.)", markdown) is None
    assert re.search(r"(?<!\u2060)@", markdown) is None
    assert "https\\://evil.example/a" in markdown and "FTP\\://evil.example" in markdown
    assert "see www\\.evil.example now" in markdown and "me\u2060@evil.example" in markdown
    assert "run at https\\://evil.example/run" in markdown and "www\\.evil.example/base" in markdown
