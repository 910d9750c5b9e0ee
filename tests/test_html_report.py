"""`bpseval report`: one self-contained HTML page, checked with a parser and rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import bpseval
from bpseval import ShardWriter
from bpseval.cli import app
from bpseval.features.compare import CompareSettings, compare_paths
from tests.conftest import poisson_dataset

pytest.importorskip("matplotlib", reason="the HTML report embeds matplotlib pictures (the plot extra)")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "runs" / "exp1"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
MARKUP_NAME = 'V1 <b>&"x"'


class PageChecker(HTMLParser):
    """Collects images, links, text and nesting errors of a page whose every non-void element is closed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str]] = []
        self.references: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = {name: value or "" for name, value in attrs}
        if tag == "img":
            self.images.append(values)
        for name in ("src", "href", "srcset", "poster", "action"):
            if name in values:
                self.references.append((tag, name, values[name]))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_page(html: str) -> PageChecker:
    """Parse the page and assert it is well formed and self-contained; returns the parser for more checks."""
    checker = PageChecker()
    checker.feed(html)
    checker.close()
    assert checker.doctype.lower() == "doctype html"
    assert checker.errors == [] and checker.stack == []
    assert checker.tags[:3] == ["html", "head", "meta"] and checker.tags.count("body") == 1
    assert "script" not in checker.tags and "iframe" not in checker.tags
    assert re.search(r"https?://", html) is None, "the page must not reach the network"
    for tag, attribute, value in checker.references:
        assert value.startswith(("data:", "#")), (tag, attribute, value[:80])
    assert checker.images, "no picture in the report"
    for image in checker.images:
        assert image["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(image["src"].split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert (image["width"], image["height"]) == (str(width), str(height))
        assert image["alt"]
    return checker


def page_text(checker: PageChecker) -> str:
    return re.sub(r"\s+", " ", " ".join(checker.text))


@pytest.fixture(scope="module")
def cli() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


@pytest.fixture(scope="module")
def example_report(cli, tmp_path_factory) -> Path:
    """The report of the committed example run, made by the command line."""
    output = tmp_path_factory.mktemp("report") / "report.html"
    result = cli.invoke(app, ["report", str(EXAMPLE), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert f"report of step 4 written to {output}" in result.stdout
    return output


def test_example_report_is_self_contained_and_complete(example_report):
    html = example_report.read_text(encoding="utf-8")
    assert len(html) < 2_000_000
    checker = check_page(html)
    text = page_text(checker)
    result = bpseval.evaluate(EXAMPLE)
    metrics = ("bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr")
    overall = result.overall
    assert " ".join(f"{getattr(overall, metric):.4f}" for metric in metrics) in text  # the overall row
    for metric in metrics:
        assert f"overall {metric} {getattr(overall, metric):.4f}" in text  # its card
    for row in result.datasets.itertuples(index=False):
        numbers = " ".join(f"{getattr(row, metric):.4f}" for metric in metrics)
        assert (
            f"{row.name} {row.ok} {row.silent} {row.uncovered} {row.samples} {row.duplicates_dropped} {numbers}" in text
        )
    # the unscored cells, and the thinly covered ones with their per-rank counts
    assert "1 uncovered cell (no valid sample on any rank)" in text
    assert "Allen_2022-05-02 1 0 (id 1000)" in text
    assert "0 silent cells" in text
    assert "4 cells below 10 valid samples" in text
    assert "Allen_2022-06-17 20 1020 1 5 ok 0 ✗ 1" in text
    # pictures: the overview, bps against rate, coverage, one histogram per dataset; one step: no picture over steps
    assert len(checker.images) == 3 + len(result.datasets)
    assert 'id="steps"' not in html and 'id="comparison"' not in html
    # how it was made
    assert f"Made by bpseval report {EXAMPLE} -o {example_report}" in text
    assert f"bpseval {bpseval.__version__}" in text


def markup_run(run_dir: Path) -> Path:
    """Two complete steps and an incomplete one; one dataset's name is full of HTML."""
    for step, ranks in ((0, (0, 1)), (1, (0, 1)), (2, (0,))):
        for rank in ranks:
            with ShardWriter(run_dir, rank, 2, step=step) as writer:
                for index, name in enumerate(("A", MARKUP_NAME)):
                    arrays = poisson_dataset(7 * step + 3 * rank + index)
                    arrays["robs"][:, 3] = 0.0  # a silent cell
                    writer.add(name, **arrays, sample_idx=np.arange(40) + 40 * rank)
    return run_dir


def test_report_with_baseline_steps_and_markup_in_names(cli, tmp_path):
    run = markup_run(tmp_path / "run")
    baseline = tmp_path / "baseline.json"
    assert cli.invoke(app, ["baseline", str(run), "--step", "0", "-o", str(baseline)]).exit_code == 0
    output = tmp_path / "report.html"
    result = cli.invoke(
        app, ["report", str(run), "-o", str(output), "--baseline", str(baseline), "--step", "1", "--min-samples", "20"]
    )
    assert result.exit_code == 0, result.output
    html = output.read_text(encoding="utf-8")
    checker = check_page(html)
    text = page_text(checker)
    # user strings are escaped: the name shows as text and adds no element
    assert "V1 &lt;b&gt;&amp;&quot;x&quot;" in html and "<b>" not in html
    assert MARKUP_NAME in text and "b" not in checker.tags
    # the verdict is the one `bpseval compare` reaches
    comparison = compare_paths(run, baseline, CompareSettings(), step=1)
    assert ("No regression against the baseline" in text) == comparison.passed
    assert ("Regression against the baseline" in text) == (not comparison.passed)
    assert 'id="comparison"' in html and "Comparison with the baseline" in text
    for metric in comparison.metrics:
        assert f"{metric.delta:+.4f}" in text
    # steps: both complete ones, the pictured one highlighted, the incomplete one listed
    assert 'id="steps"' in html and '<tr class="chosen"><td class="num">1</td>' in html
    assert "1 incomplete step (not scored)" in text and "step 2 has world size 2 but no shard for rank 1" in text
    # overview, rate, coverage, steps, run vs baseline, and the two datasets' histograms
    assert len(checker.images) == 7
    assert "2 silent cells" in text
    assert f"Made by bpseval report {run} -o {output} --baseline {baseline} --step 1 --min-samples 20" in text


def test_report_of_an_older_step_highlights_that_step_only(cli, tmp_path):
    run = markup_run(tmp_path / "run")
    output = tmp_path / "report.html"
    assert cli.invoke(app, ["report", str(run), "-o", str(output), "--step", "0"]).exit_code == 0
    html = output.read_text(encoding="utf-8")
    assert '<tr class="chosen"><td class="num">0</td>' in html and '<tr><td class="num">1</td>' in html
    assert "The highlighted step (0) is the one the rest of this page shows." in page_text(check_page(html))


def test_report_lists_the_cells_that_carry_a_failed_metric(cli, tmp_path):
    from tests.test_compare_gate import SESSIONS, model, run_of

    rates, _ = SESSIONS["A"]
    rhat = model(rates, 0.2, seed=1)
    rhat[:, 3] *= 4.0  # one cell of A badly miscalibrated
    base, new = run_of(tmp_path, "base"), run_of(tmp_path, "new", A={"rhat": rhat})
    output = tmp_path / "report.html"
    assert cli.invoke(app, ["report", str(new), "-o", str(output), "--baseline", str(base)]).exit_code == 0
    text = page_text(check_page(output.read_text(encoding="utf-8")))
    comparison = compare_paths(new, base, CompareSettings())
    assert [m.label for m in comparison.failed_metrics] == ["overall bps", "overall bps_pooled", "dataset 'A' bps"]
    for metric in comparison.failed_metrics:
        first = metric.attribution.cells[0]
        cells = 10 if metric.scope == "overall" else 5  # two datasets of 5 ok cells
        assert f"{metric.label}: the {cells} of {cells} cells contributing most to Δ {metric.delta:+.4f}" in text
        assert f"A 3 ok {first.value_base:.4f} {first.value_new:.4f} {first.delta:+.6f}" in text


def test_report_bad_input_exits_2(cli, tmp_path):
    missing = cli.invoke(app, ["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")])
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    bad_baseline = tmp_path / "baseline.json"
    bad_baseline.write_text("{not json")
    result = cli.invoke(app, ["report", str(EXAMPLE), "-o", str(tmp_path / "r.html"), "--baseline", str(bad_baseline)])
    assert result.exit_code == 2 and "cannot read the baseline" in result.stderr
    assert not (tmp_path / "r.html").exists()


# ----------------------------------------------------------------------------------------------
# A real browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no Chromium on PATH (Debian: apt-get install -y chromium): the report is not rendered in a browser here"
    )


def run_chromium(browser: str, page: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *arguments,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def console_messages(stderr: str) -> list[str]:
    """What the page logged to the browser console (errors, uncaught exceptions, anything)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_chromium_renders_the_example_report(example_report, tmp_path):
    browser = chromium()
    import matplotlib.image

    # the console check sees what a broken page logs
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>console.error('boom'); missing();</script></body></html>")
    probe = run_chromium(browser, broken, tmp_path / "probe", "--dump-dom")
    assert len(console_messages(probe.stderr)) == 2, probe.stderr

    dom = run_chromium(browser, example_report, tmp_path / "dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    assert "<h1>bpseval report</h1>" in dom.stdout and dom.stdout.count("<img ") == 6
    assert console_messages(dom.stderr) == []

    shot = tmp_path / "report.png"
    rendered = run_chromium(
        browser, example_report, tmp_path / "shot", f"--screenshot={shot}", "--window-size=1280,2000"
    )
    assert rendered.returncode == 0 and shot.exists(), rendered.stderr
    assert console_messages(rendered.stderr) == []
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 0.1  # not a blank page
    ink = (pixels < 0.9).any(axis=2).mean()
    assert 0.05 < ink < 0.9, ink  # text and pictures on a white page
    top = pixels[:400]  # the title, the key numbers and the first picture are above the fold
    assert (top < 0.5).any(axis=2).mean() > 0.005
    artifacts = os.environ.get("BPSEVAL_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "report-screenshot.png")
        shutil.copy(example_report, Path(artifacts) / "report.html")


def test_command_line_is_the_one_typed_or_rebuilt_from_the_options(monkeypatch):
    from bpseval.cli import _command_line

    options = ["runs/a b", "-o", "r.html"]
    monkeypatch.setattr("sys.argv", ["/venv/bin/bpseval", "report", "runs/a b", "--output=r.html", "-j", "2"])
    assert _command_line("report", options) == ["bpseval", "report", "runs/a b", "--output=r.html", "-j", "2"]
    monkeypatch.setattr("sys.argv", ["/usr/bin/pytest", "-q"])  # not this command line: rebuilt
    assert _command_line("report", options) == ["bpseval", "report", "runs/a b", "-o", "r.html"]
    from bpseval.views.html import command_text

    assert command_text(["bpseval", "report", "runs/a b", "-o", "r.html"]) == "bpseval report 'runs/a b' -o r.html"
