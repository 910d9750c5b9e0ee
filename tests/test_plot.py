"""Pictures: every file of `bpseval plot`, their sizes, readability with 30 datasets, and matplotlib being optional."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

import bpseval
from bpseval.api import Result
from bpseval.errors import install_hint
from bpseval.features.compare import CompareSettings, Side, compare
from bpseval.features.overview import RunOverview, load_overview
from bpseval.features.steps import StepResults
from bpseval.kernel.cellstats import CellStats
from bpseval.kernel.stats import batch_stats
from bpseval.run.merge import MergedDataset, MergedRun
from bpseval.run.scored import score_run
from tests.test_steps import DATASETS, multi_step_run

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "runs" / "exp1"
MISSING = f"plots need matplotlib: {install_hint('plot')}"


# ----------------------------------------------------------------------------------------------
# matplotlib is optional


def test_import_bpseval_does_not_import_matplotlib():
    code = (
        "import sys, bpseval, bpseval.cli, bpseval.features.steps, bpseval.views.plot, bpseval.views.html\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] == 'matplotlib')\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_without_matplotlib_plot_and_report_exit_2_saying_how_to_install(invoke, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    for command, target in (("plot", tmp_path / "pictures"), ("report", tmp_path / "report.html")):
        result = invoke(command, EXAMPLE, "-o", target)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"Error: {MISSING}"
        assert "Traceback" not in result.output
        assert not target.exists()  # it failed before merging anything
    from bpseval.views.plot import bps_strip_figure

    with pytest.raises(bpseval.BpsevalError, match=re.escape(install_hint("plot"))):
        bps_strip_figure(bpseval.evaluate(EXAMPLE))


# ----------------------------------------------------------------------------------------------
# The files of `bpseval plot`


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    return multi_step_run(tmp_path_factory.mktemp("plot") / "run", steps=(0, 1), incomplete=None)


def test_plot_writes_every_picture_at_its_size(invoke, two_step_run, tmp_path):
    pytest.importorskip("matplotlib")
    from bpseval.views.plot import DPI, HISTOGRAM_SIZE, WIDE

    out = tmp_path / "pictures"
    result = invoke("plot", two_step_run, "-o", out)
    assert result.exit_code == 0, result.output
    expected = {"bps-by-dataset.png", "bps-vs-rate.png", "coverage.png", "bps-over-steps.png"}
    expected |= {f"dataset-{name}.png" for name in DATASETS}
    assert {path.name for path in out.iterdir()} == expected
    assert "6 pictures of step 1 written to" in result.stdout
    for path in out.iterdir():
        assert path.stat().st_size > 10_000, path  # a real picture, not an empty canvas
        width, height = png_size(path)
        if path.name.startswith("dataset-"):
            assert (width, height) == (round(HISTOGRAM_SIZE[0] * DPI), round(HISTOGRAM_SIZE[1] * DPI)), path
        else:
            assert width == round(WIDE * DPI) and 3 * DPI <= height <= 14 * DPI, (path, width, height)

    import matplotlib.image

    pixels = matplotlib.image.imread(out / "coverage.png")
    assert pixels.shape[:2] == png_size(out / "coverage.png")[::-1]
    assert pixels[..., :3].std() > 0.1  # not blank


def test_plot_one_step_svg_and_baseline(invoke, two_step_run, tmp_path):
    pytest.importorskip("matplotlib")
    baseline = tmp_path / "baseline.json"
    assert invoke("baseline", two_step_run, "--step", "0", "-o", baseline).exit_code == 0
    out = tmp_path / "svg"
    result = invoke("plot", two_step_run, "-o", out, "--step", "1", "--format", "svg", "--baseline", baseline)
    assert result.exit_code == 0, result.output
    names = {path.name for path in out.iterdir()}
    assert names == {
        "bps-by-dataset.svg",
        "bps-vs-rate.svg",
        "coverage.svg",
        "bps-over-steps.svg",
        "compare-cells.svg",
    } | {f"dataset-{name}.svg" for name in DATASETS}
    for path in out.iterdir():
        root = ElementTree.parse(path).getroot()
        assert root.tag.endswith("svg") and root.get("width", "").endswith("pt")


def test_plot_bad_input_exits_2(invoke, tmp_path):
    pytest.importorskip("matplotlib")
    missing = invoke("plot", tmp_path / "nope", "-o", tmp_path / "out")
    assert missing.exit_code == 2 and "no such directory" in missing.stderr
    (tmp_path / "file").write_text("x")
    not_a_folder = invoke("plot", EXAMPLE, "-o", tmp_path / "file")
    assert not_a_folder.exit_code == 2 and "is not a directory" in not_a_folder.stderr
    no_step = invoke("plot", EXAMPLE, "-o", tmp_path / "out", "--step", "7")
    assert no_step.exit_code == 2 and "no shard has step 7" in no_step.stderr


# ----------------------------------------------------------------------------------------------
# Readable with 30 datasets


def synthetic_run(
    n_datasets: int = 30, world_size: int = 2, seed: int = 0, step: int = 0, scale: float = 0.3
) -> MergedRun:
    """A merged run of `n_datasets` datasets of 20 to 180 cells, with uncovered, silent and thinly sampled cells."""
    rng = np.random.default_rng(seed)
    datasets = []
    for index in range(n_datasets):
        cells = int(rng.integers(20, 181))
        per_rank: list[CellStats] = []
        for _rank in range(world_size):
            rate = rng.gamma(1.5, 0.3, size=cells)
            robs = rng.poisson(np.broadcast_to(rate, (30, cells))).astype(float)
            rhat = np.clip(rate * rng.lognormal(0.0, scale, size=(30, cells)), 1e-3, None)
            dfs = (rng.random((30, cells)) > 0.1).astype(float)
            dfs[:, 0] *= index % 7 != 0  # uncovered
            dfs[1:, 1] *= index % 5 != 1  # one valid sample
            robs[:, 2] *= index % 9 != 2  # silent
            per_rank.append(batch_stats(rhat, robs, dfs))
        name = f"Session_{2020 + index % 4}-{index % 12 + 1:02d}-{index + 1:02d}_mouse{index:02d}"
        if index == 3:
            name = "V1 <b>&$x$"  # markup and mathtext characters
        datasets.append(
            MergedDataset(name, np.arange(cells) + 1000, "rate", per_rank, 30 * world_size, 0, f"id{index}")
        )
    files = [Path(f"step-{step}/rank-{rank}.h5") for rank in range(world_size)]
    return MergedRun(Path("synthetic"), step, world_size, files, datasets)


def _overlap(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def readability_problems(figure) -> list[str]:
    """Overlapping tick labels, text outside the figure, and legends over an axes."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    inside = figure.bbox.padded(1.0)
    problems = []
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            labels = [
                label
                for tick in axis.get_major_ticks()
                if low - 1e-9 * abs(high - low) <= tick.get_loc() <= high + 1e-9 * abs(high - low)
                for label in (tick.label1, tick.label2)
                if label.get_visible() and label.get_text()
            ]
            boxes = [label.get_window_extent(renderer) for label in labels]
            for (la, a), (lb, b) in itertools.combinations(zip(labels, boxes, strict=True), 2):
                if _overlap(a, b) > 0.5:
                    problems.append(f"tick labels {la.get_text()!r} and {lb.get_text()!r} overlap")
            problems += [
                f"tick label {label.get_text()!r} outside the figure"
                for label, box in zip(labels, boxes, strict=True)
                if not inside.contains(box.x0, box.y0) or not inside.contains(box.x1, box.y1)
            ]
        for text in (axes.title, axes._left_title, axes.xaxis.label, axes.yaxis.label):
            if text.get_text():
                box = text.get_window_extent(renderer)
                if not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)):
                    problems.append(f"{text.get_text()!r} is outside the figure")
    main_axes = [axes for axes in figure.axes if axes.get_label() != "<colorbar>"]
    for legend in figure.legends:
        box = legend.get_window_extent(renderer)
        if not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)):
            problems.append("a legend is cut off")
        if any(_overlap(box, axes.get_window_extent(renderer)) > 0.5 for axes in main_axes):
            problems.append("a legend covers an axes")
    return problems


@pytest.fixture(scope="module")
def thirty():
    pytest.importorskip("matplotlib")
    run = score_run(synthetic_run())
    steps = StepResults(
        {step: score_run(synthetic_run(step=step, seed=step, scale=0.2 + 0.05 * step)) for step in range(4)}
    )
    baseline = score_run(synthetic_run(seed=0, scale=0.1))  # a better model: the run regresses
    comparison = compare(Side("run", run), Side("baseline.json", baseline), CompareSettings())
    assert not comparison.passed and len(comparison.reasons) > 20  # a long list of regressed datasets
    return run, Result(run), steps, Result(baseline), comparison


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. "constrained_layout not applied"
def test_thirty_datasets_are_readable(thirty):
    from bpseval.views import plot

    run, result, steps, baseline, comparison = thirty
    assert len(result.datasets) == 30 and result.datasets[["ok", "silent", "uncovered"]].sum(axis=1).min() >= 20
    assert result.overall.cells["silent"] > 0 and result.overall.cells["uncovered"] > 0
    made = {
        "strip": plot.bps_strip_figure(result),
        "rate": plot.bps_rate_figure(result, 10),
        "coverage": plot.coverage_figure(run, 10),
        "steps": plot.steps_figure(steps),
        "compare": plot.compare_figure(result, baseline, comparison),
        "histogram": plot.bps_histogram_figure(result, "V1 <b>&$x$"),
    }
    for name, figure in made.items():
        assert readability_problems(figure) == [], name
    # every dataset is named on the y axis of the strip plot and the coverage map, the markup one verbatim
    for figure in (made["strip"], made["coverage"]):
        labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
        assert len(labels) == 30 and r"V1 <b>&\$x\$" in labels
    # units on the axes
    assert made["strip"].axes[0].get_xlabel() == "bits/spike (per cell)"
    assert made["rate"].axes[0].get_xlabel() == "mean rate (spikes/bin)" and made["rate"].axes[0].get_xscale() == "log"
    assert made["coverage"].axes[1].get_ylabel().startswith("valid samples")
    # one legend entry per dataset in the pictures coloured by dataset
    for name in ("rate", "steps", "compare"):
        entries = [text.get_text() for text in made[name].legends[0].get_texts()]
        assert len([entry for entry in entries if entry.startswith(("Session_", "V1"))]) == 30, name


def test_dataset_colors_are_distinct_for_40_datasets():
    pytest.importorskip("matplotlib")
    from bpseval.views.plot import dataset_colors

    assert len(set(dataset_colors(40))) == 40
    assert dataset_colors(41)[40] == dataset_colors(41)[0]


def test_dataset_file_names_are_safe_and_distinct():
    from bpseval.views.plot import dataset_stems

    stems = dataset_stems(["a b", "a_b", "A_B", "..", "x:y*?", "ok-1.2"])
    assert list(stems.values()) == [
        "dataset-a_b",
        "dataset-a_b-2",
        "dataset-A_B-3",
        "dataset-unnamed",
        "dataset-x_y",
        "dataset-ok-1.2",
    ]


def test_figures_in_memory_from_the_example(tmp_path):
    pytest.importorskip("matplotlib")
    from bpseval.views import plot

    inputs = load_overview(EXAMPLE)
    assert inputs.scored.step == 4 and list(inputs.steps.results) == [4]
    made = plot.figures(inputs)
    assert list(made) == ["bps-by-dataset", "bps-vs-rate", "coverage"]  # one step: no picture over steps
    png = plot.png_bytes(made["bps-by-dataset"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the strip plot marks each dataset's bps (black bar) at the value `compute` prints
    strip = made["bps-by-dataset"].axes[0]
    bars = [line.get_xdata()[0] for line in strip.get_lines() if line.get_linewidth() == pytest.approx(2.2)]
    assert bars == pytest.approx([dataset.bps for dataset in inputs.scored.datasets])


def test_readability_check_sees_crowded_labels_and_covering_legends():
    pytest.importorskip("matplotlib")
    from bpseval.views.plot import new_figure

    crowded = new_figure(4, 2)
    axes = crowded.add_subplot()
    axes.set_yticks(range(30), labels=[f"dataset number {i}" for i in range(30)])
    axes.plot(range(30), label="a line")
    crowded.legend(loc="center")
    problems = readability_problems(crowded)
    assert any("overlap" in problem for problem in problems)
    assert "a legend covers an axes" in problems


@pytest.mark.filterwarnings("error::UserWarning")
def test_runs_without_ok_cells_or_datasets_still_draw():
    pytest.importorskip("matplotlib")
    from bpseval.views import plot

    silent = batch_stats(np.ones((10, 4)), np.zeros((10, 4)), None)
    datasets = [
        MergedDataset("dead", np.arange(5), "rate", [CellStats.zeros(5)], 0, 0, "a"),
        MergedDataset("quiet", np.arange(4), "rate", [silent], 10, 0, "b"),
    ]
    for run in (MergedRun(Path("x"), 0, 1, [Path("a.h5")], datasets), MergedRun(Path("x"), 0, 1, [Path("a.h5")], [])):
        scored = score_run(run)
        result = Result(scored)
        inputs = RunOverview(scored, StepResults({0: scored, 1: scored}), baseline=scored)
        made = plot.figures(inputs)
        assert set(made) == {"bps-by-dataset", "bps-vs-rate", "coverage", "bps-over-steps", "compare-cells"}
        made.update({name: plot.bps_histogram_figure(result, name) for name in result.datasets["name"]})
        for figure in made.values():
            assert plot.png_bytes(figure)[:8] == b"\x89PNG\r\n\x1a\n"
