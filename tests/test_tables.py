"""Terminal tables never cut a number, at any width from 60 columns up, on a terminal or a pipe.

Each command is run with `--json` and the table in one invocation; every number the JSON gives, formatted as the
table formats it, must appear whole in the text, no line may be wider than the console, and nothing is ellipsized.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from bpseval.cli import app
from bpseval.views.terminal import Column, name_column, print_table
from bpseval.views.text import UNDEFINED_TEXT, VERDICT_MARKS, format_bps
from tests.conftest import poisson_dataset, table_rows, write_raw_shard

METRICS = ["bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr"]
NAMES = [f"Allen_2022-{1 + i % 12:02d}-{1 + i:02d}_V1_probe{i % 4}" for i in range(30)]
WIDTHS = (60, 80, 120)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
BPSEVAL = shutil.which("bpseval") or str(Path(sys.executable).with_name("bpseval"))


def write_run(run_dir: Path, *, world_size: int = 2, noise: float = 0.0, seed: int = 0, n_rows: int = 24) -> Path:
    """30 datasets of 5 cells, rows dealt round-robin to the ranks. Every run holds the same samples and spike
    counts (so runs pair in `compare`); `noise` moves the predictions. Rank 3 (with 8 ranks) never sees a valid
    sample of cell 0 in every third dataset."""
    rng = np.random.default_rng(seed)
    datasets = {}
    for index, name in enumerate(NAMES):
        arrays = poisson_dataset(index, n_rows=n_rows, n_cells=5)
        arrays["rhat"] = (arrays["rhat"] * np.exp(noise * rng.normal(size=arrays["rhat"].shape))).astype(np.float32)
        if world_size > 3 and index % 3 == 0:
            arrays["dfs"][3::world_size, 0] = 0.0
        datasets[name] = arrays
    for rank in range(world_size):
        rows = np.arange(rank, n_rows, world_size)
        shard = {name: {**{k: v[rows] for k, v in data.items()}, "sample_idx": rows} for name, data in datasets.items()}
        write_raw_shard(run_dir / f"rank-{rank}.h5", shard, rank=rank, world_size=world_size, step=3)
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_run(root / "toy")
    write_run(root / "toy_worse", noise=0.9, seed=1)
    write_run(root / "toy_noisy", noise=0.3, seed=2)
    write_run(root / "eight_ranks", world_size=8, n_rows=40)
    return root


def compute_numbers(document: dict) -> list[str]:
    """What the compute tables show of a `compute --json` document: per dataset every metric of one run, or the
    dataset bps of each run ({"runs": [...]}); the overall metrics and cell counts. Undefined values are left out
    (they are shown as UNDEFINED_TEXT, not as a number)."""
    numbers = []
    for run in document.get("runs", [document]):
        overall = run["overall"]
        numbers += [format_bps(overall[metric]) for metric in METRICS] + [str(run["step"])]
        numbers += [str(count) for count in overall["cells"].values()]
        for dataset in run["datasets"]:
            numbers += [format_bps(dataset[metric]) for metric in (METRICS if "runs" not in document else ["bps"])]
    return [number for number in numbers if number != UNDEFINED_TEXT]


def compare_numbers(document: dict) -> list[str]:
    numbers = []
    for metric in document["metrics"]:
        numbers += [format_bps(metric[key]) for key in ("baseline", "new", "tolerance")]
        numbers += [f"{value:+.4f}" for value in [metric["delta"], *(metric["interval"] or [])]]
    return numbers


def coverage_numbers(document: dict) -> list[str]:
    numbers = [str(row[key]) for row in document["datasets"] for key in ("cells", "below", "uncovered", "min_n_valid")]
    for row in document["cells"] + document["zero_on_some_rank"]:
        numbers += [str(row["cell"]), str(row["cell_id"]), str(row["n_valid"]), *map(str, row["per_rank"])]
        numbers += [f"{row['spikes']:g}"] if "spikes" in row else []
    return numbers


def assert_whole(text: str, numbers: list[str], width: int) -> None:
    """Every number is a whole token of `text`; no line is wider than `width`; nothing is ellipsized."""
    too_wide = [line for line in text.splitlines() if cell_len(line) > width]
    assert not too_wide, f"lines wider than {width}: {too_wide[:3]}"
    assert "…" not in text, text
    tokens = set(NUMBER.findall(text))
    missing = sorted(set(numbers) - tokens)
    assert not missing, f"numbers cut or missing at width {width}: {missing[:10]}\n{text}"


def assert_verdicts_whole(text: str, document: dict) -> None:
    for verdict in {metric["verdict"] for metric in document["metrics"]}:
        expected = sum(metric["verdict"] == verdict for metric in document["metrics"])
        assert text.count(VERDICT_MARKS[verdict]) >= expected, (verdict, text)


def invoke_at(width: int, *args: object):
    runner = CliRunner(env={"COLUMNS": str(width), "NO_COLOR": "1", "TERM": "dumb"})
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.mark.parametrize(("width", "metric"), [(60, "bps"), (80, "corr"), (120, "pseudo_r2_pooled"), (80, "pseudo_r2")])
def test_compute_of_several_runs_sorted_keeps_every_number_whole(sweep, tmp_path, width, metric):
    runs = [sweep / "toy", sweep / "toy_worse", sweep / "toy_noisy"]
    result = invoke_at(width, "compute", *runs, "--sort", metric, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert_whole(result.stdout, compute_numbers(document), width)
    ranked = [run["run"] for run in sorted(document["runs"], key=lambda run: -run["overall"][metric])]
    assert len({run["overall"][metric] for run in document["runs"]}) == 3, "the runs differ in the sorted metric"
    positions = [result.stdout.index(Path(run).name) for run in ranked]
    assert positions == sorted(positions), "runs are printed best first"


@pytest.mark.parametrize("width", WIDTHS)
def test_compute_of_thirty_datasets_keeps_every_number_whole(sweep, tmp_path, width):
    result = invoke_at(width, "compute", sweep / "toy", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert_whole(result.stdout, compute_numbers(json.loads((tmp_path / "r.json").read_text())), width)


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_with_significance_keeps_intervals_and_verdicts_whole(sweep, tmp_path, width):
    result = invoke_at(
        width,
        "compare",
        sweep / "toy_worse",
        "--baseline",
        sweep / "toy",
        "--significance",
        "0.05",
        "--bootstrap",
        "200",
        "--json",
        tmp_path / "c.json",
    )
    document = json.loads((tmp_path / "c.json").read_text())
    assert result.exit_code == 1, result.output
    assert any(metric["verdict"] == "regressed" for metric in document["metrics"])
    assert all(metric["interval"] is not None for metric in document["metrics"])
    assert_whole(result.stdout, compare_numbers(document), width)
    assert_verdicts_whole(result.stdout, document)


@pytest.mark.parametrize("width", WIDTHS)
def test_coverage_with_eight_ranks_keeps_numbers_and_headers_whole(sweep, tmp_path, width):
    result = invoke_at(width, "coverage", sweep / "eight_ranks", "--min-samples", "36", "--json", tmp_path / "v.json")
    assert result.exit_code == 1, result.output
    document = json.loads((tmp_path / "v.json").read_text())
    assert document["cells"] and document["zero_on_some_rank"]
    assert_whole(result.stdout, coverage_numbers(document), width)
    for header in ("cell_id", "n_valid", "uncovered", "spikes"):  # the dataset is the label in the long layout
        assert re.search(rf"(?<![\w.-]){header}(?![\w.-])", result.stdout), header


def test_wide_terminals_keep_the_table_with_names_whole(sweep):
    result = invoke_at(120, "compute", sweep / "toy")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    headers = [line.split() for line, below in zip(lines, [*lines[1:], ""], strict=True) if "┿" in below]
    assert len(headers) == 2 and all(header[0] == "dataset" for header in headers), headers  # led by the names
    shown = [word for header in headers for word in header if word not in ("dataset", "│")]
    assert shown == ["ok", "silent", "uncovered", "samples", *METRICS], "every column once, in order"
    assert all(name in result.stdout for name in NAMES)


def test_a_terminal_wide_enough_shows_every_metric_in_one_table(sweep):
    result = invoke_at(200, "compute", sweep / "toy")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "bps_pooled" in line)
    assert all(word in header.split() for word in ("dataset", "uncovered", *METRICS)), header
    assert result.stdout.count("dataset") == 1 and "Deviance explained" not in result.stdout


def constant_counts_run(run_dir: Path) -> Path:
    """Dataset "flat": every count is 1 (bps defined; pseudo_r2, pseudo_r2_pooled and corr undefined); "varied":
    Poisson counts."""
    varied = poisson_dataset(7, n_rows=30, n_cells=4)
    flat = poisson_dataset(8, n_rows=30, n_cells=4, with_dfs=False)
    flat["robs"] = np.ones_like(flat["robs"])
    write_raw_shard(run_dir / "rank-0.h5", {"flat": flat, "varied": varied})
    return run_dir


@pytest.mark.parametrize("width", [80, 200])
def test_undefined_metrics_are_the_undefined_marker_never_a_number(tmp_path, width):
    run = constant_counts_run(tmp_path / "run")
    result = invoke_at(width, "compute", run, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    flat, varied = document["datasets"]
    assert flat["bps"] is not None and [flat[m] for m in ("pseudo_r2", "pseudo_r2_pooled", "corr")] == [None] * 3
    assert document["overall"]["pseudo_r2"] == varied["pseudo_r2"] and document["overall"]["corr"] == varied["corr"]
    values = [value for row in table_rows(result.stdout) if row[0] == "flat" for value in row[1:]]
    assert values[-3:] == [UNDEFINED_TEXT] * 3, result.stdout
    assert format_bps(flat["bps"]) in values and values.count(UNDEFINED_TEXT) == 3
    assert_whole(result.stdout, compute_numbers(document), width)


def piped(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command with its stdout piped and COLUMNS unset: Rich falls back to 80 columns."""
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES", "GITHUB_STEP_SUMMARY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    return subprocess.run(
        [BPSEVAL, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_readme_sweep_example_piped_at_80_columns(sweep, tmp_path):
    runs = sorted(str(path.relative_to(sweep)) for path in sweep.glob("toy*"))  # `bpseval compute runs/*`
    result = piped("compute", *runs, "--sort", "bps", "--json", tmp_path / "r.json", cwd=sweep)
    assert result.returncode == 0, result.stderr
    assert_whole(result.stdout, compute_numbers(json.loads((tmp_path / "r.json").read_text())), 80)


def test_readme_ci_example_piped_at_80_columns(sweep, tmp_path):
    baseline = piped("baseline", sweep / "toy", "-o", tmp_path / "baseline.json", cwd=tmp_path)
    assert baseline.returncode == 0, baseline.stderr
    result = piped(
        "compare",
        sweep / "toy_worse",
        "--baseline",
        tmp_path / "baseline.json",
        "--significance",
        "0.05",
        "--bootstrap",
        "200",
        "--markdown",
        tmp_path / "summary.md",
        "--junit",
        tmp_path / "junit.xml",
        "--json",
        tmp_path / "c.json",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    document = json.loads((tmp_path / "c.json").read_text())
    assert_whole(result.stdout, compare_numbers(document), 80)
    assert_verdicts_whole(result.stdout, document)


@pytest.mark.parametrize("run", ["examples/runs/exp1", "eight_ranks"])
def test_coverage_piped_at_80_columns(sweep, tmp_path, run):
    run_dir = Path(__file__).parents[1] / run if run.startswith("examples") else sweep / run
    result = piped("coverage", run_dir, "--min-samples", "10", "--json", tmp_path / "v.json", cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr
    document = json.loads((tmp_path / "v.json").read_text())
    assert_whole(result.stdout, coverage_numbers(document), 80)
    if run.startswith("examples"):
        assert all(name in result.stdout for name in ("Allen_2022-04-13", "Allen_2022-05-02", "Allen_2022-06-17"))


NAME_TEXT = st.text(alphabet="abcdefghij_-0123456789 ", min_size=1, max_size=40).filter(str.strip)
VALUE = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False).map(format_bps),
    st.integers(0, 10**9).map(str),
    st.sampled_from(list(VERDICT_MARKS.values())),
)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(60, 200),
    headers=st.lists(
        st.sampled_from(["bps", "bps_pooled", "95% interval of Δ", "min n_valid", "rank 12", "Δ"]),
        min_size=1,
        max_size=14,
    ),
    data=st.data(),
)
def test_print_table_never_cuts_a_value_nor_exceeds_the_width(width, headers, data):
    rows = data.draw(
        st.lists(
            st.tuples(NAME_TEXT, st.lists(VALUE, min_size=len(headers), max_size=len(headers))), min_size=1, max_size=6
        )
    )
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False)
    print_table(console, "title", [name_column("name"), *map(Column, headers)], [[n, *values] for n, values in rows])
    lines = out.getvalue().splitlines()
    assert all(cell_len(line) <= width for line in lines)
    assert "…" not in out.getvalue()
    for _, values in rows:
        for value in values:
            assert any(value in line for line in lines), (value, out.getvalue())
