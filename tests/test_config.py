"""Settings files (`bpseval.config`): where they are found, precedence of flags, command tables and common keys,
and every bad key or value as exit 2 naming the file and the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bpseval import config
from bpseval.cli import GatedMetric
from bpseval.errors import ArgumentError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "runs" / "exp1"


def folder(root: Path, files: dict[str, str], repository: bool = True) -> Path:
    """`root` holding `files` (relative path: text), and a `.git` folder when `repository` (the search stops there)."""
    if repository:
        (root / ".git").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def bpseval_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`bpseval ARGS...` as a process run in `cwd` (settings are found from the current directory)."""
    environment = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    command = [sys.executable, "-m", "bpseval", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=environment, check=False)


def test_the_nearest_folder_with_settings_is_used_and_bpseval_toml_wins_over_pyproject(tmp_path):
    root = folder(
        tmp_path,
        {
            "pyproject.toml": "[tool.bpseval]\nmin-samples = 1\n",
            "a/bpseval.toml": "min-samples = 2\n",
            "a/pyproject.toml": "[tool.bpseval]\nmin-samples = 3\n",
            "a/b/pyproject.toml": "[project]\nname = 'other'\n",  # no [tool.bpseval]: passed over
            "a/b/c/.keep": "",
        },
    )
    assert config.find(root / "a" / "b" / "c") == root / "a" / "bpseval.toml"
    assert config.load(root / "a" / "b" / "c").value("min-samples") == 2
    assert config.find(root) == root / "pyproject.toml"
    assert config.load(root).value("min-samples") == 1


def test_the_search_stops_at_the_repository_top(tmp_path):
    folder(tmp_path, {"pyproject.toml": "[tool.bpseval]\nmin-samples = 1\n"}, repository=False)
    checkout = folder(tmp_path / "checkout", {"pyproject.toml": "[project]\nname = 'x'\n", "src/.keep": ""})
    assert config.find(checkout / "src") is None
    assert config.load(checkout / "src") == config.Settings()
    (checkout / ".git").rmdir()
    (checkout / ".git").write_text("gitdir: elsewhere\n")  # a worktree's .git is a file: the top all the same
    assert config.find(checkout / "src") is None


def test_flags_win_over_the_command_table_which_wins_over_common_keys(tmp_path):
    root = folder(
        tmp_path,
        {"bpseval.toml": "min-samples = 5\n[coverage]\nmin-samples = 8\n[compare]\nrtol = 0.5\nmetric = 'bps'\n"},
    )
    coverage = bpseval_in(root, "coverage", str(EXAMPLE), "--json", "-")
    assert json.loads(coverage.stdout)["min_samples"] == 8
    assert coverage.stderr.splitlines()[0] == f"using settings from {root / 'bpseval.toml'} (min-samples)"
    flagged = bpseval_in(root, "coverage", str(EXAMPLE), "--json", "-", "--min-samples", "3")
    assert json.loads(flagged.stdout)["min_samples"] == 3
    plan_input = root / "mask.npy"
    np.save(plan_input, np.ones((40, 2)))
    plan = bpseval_in(root, "plan", str(plan_input), "--json", "-")
    assert plan.returncode == 0 and json.loads(plan.stdout)["min_samples"] == 5  # the common key
    compare = bpseval_in(root, "compare", str(EXAMPLE), "--baseline", str(EXAMPLE), "--json", "-", "--atol", "0.25")
    assert compare.returncode == 0, compare.stderr
    settings = json.loads(compare.stdout)["settings"]
    assert (settings["rtol"], settings["metric"], settings["atol"]) == (0.5, "bps", 0.25)
    assert f"using settings from {root / 'bpseval.toml'} (rtol, metric)" in compare.stderr


def test_help_shows_the_defaults_the_settings_give(tmp_path):
    root = folder(tmp_path, {"pyproject.toml": "[tool.bpseval.compare]\nrtol = 0.375\n"})
    shown = bpseval_in(root, "compare", "--help")
    assert shown.returncode == 0 and "[default: 0.375]" in shown.stdout


def test_without_settings_nothing_is_said_and_the_options_keep_their_defaults(tmp_path):
    root = folder(tmp_path, {"pyproject.toml": "[project]\nname = 'x'\n[tool.other]\nmin-samples = 99\n"})
    result = bpseval_in(root, "coverage", str(EXAMPLE), "--json", "-")
    assert "using settings" not in result.stderr
    assert json.loads(result.stdout)["min_samples"] == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[tool.bpseval]\nmin_sample = 3\n",
            "unknown setting [tool.bpseval] 'min_sample'. Known settings: min-samples",
        ),
        ("[tool.bpseval.comparre]\nrtol = 0.1\n", "unknown setting [tool.bpseval] 'comparre'"),
        (
            "[tool.bpseval.coverage]\natol = 0.1\n",
            "[tool.bpseval.coverage] 'atol': bpseval coverage has no --atol option",
        ),
        ("[tool.bpseval]\nrtol = 'high'\n", "[tool.bpseval] rtol must be a number >= 0, not text 'high'"),
        ("[tool.bpseval]\nmin-samples = 2.5\n", "[tool.bpseval] min-samples must be an integer >= 0, not a number 2.5"),
        ("[tool.bpseval]\nmin-samples = true\n", "min-samples must be an integer >= 0, not a boolean True"),
        ("[tool.bpseval.compare]\nsignificance = 1\n", "significance must be a number between 0 and 1 (exclusive)"),
        ("[tool.bpseval.compare]\nmetric = 'auc'\n", "metric must be one of bps, bps_pooled, both, not text 'auc'"),
        ("[tool.bpseval]\nexclude-cells = 3\n", "exclude-cells must be a path to a CSV file"),
        ("[tool.bpseval]\nrtol = \n", "settings cannot be read: not TOML"),
        ("[tool]\nbpseval = 3\n", "[tool.bpseval] must be a table of settings, not an integer 3"),
        ("#" * (1 << 20) + "\n", "settings cannot be read: 1.0 MiB, more than the 1.0 MiB this file can hold"),
        (
            "[tool.bpseval]\nrtol = " + "[" * 5000 + "]" * 5000 + "\n",
            "not TOML this parser can read (nested too deeply)",
        ),
    ],
    ids=[
        "unknown key",
        "unknown table",
        "option the command lacks",
        "text",
        "float",
        "bool",
        "range",
        "choice",
        "path",
        "not toml",
        "not a table",
        "too large",
        "too deep",
    ],
)
def test_a_bad_key_or_value_exits_2_naming_the_file_and_the_key(tmp_path, text, message):
    root = folder(tmp_path, {"pyproject.toml": text, "run/.keep": ""})
    result = bpseval_in(root / "run", "coverage", str(EXAMPLE))
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: {root / 'pyproject.toml'}: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_exclude_cells_is_a_path_relative_to_the_settings_file(tmp_path):
    root = folder(
        tmp_path / "project", {"bpseval.toml": "exclude-cells = 'lists/bad.csv'\n[compare]\nexclude-cells = 'c.csv'\n"}
    )
    (root / "deeper").mkdir()
    assert config.value("exclude-cells", start=root / "deeper") == root / "lists" / "bad.csv"
    assert config.value("exclude-cells", "compare", start=root / "deeper") == root / "c.csv"
    assert config.value("exclude-cells", start=folder(tmp_path / "other", {})) is None
    with pytest.raises(KeyError):
        config.value("exclude_cells", start=root)
    with pytest.raises(ArgumentError, match="exclude-cells must be a path"):
        folder(root, {"bpseval.toml": "exclude-cells = ''\n"})
        config.value("exclude-cells", start=root)


def test_the_metric_setting_takes_the_values_of_compares_option():
    assert [metric.value for metric in GatedMetric] == list(config.GATED_METRICS)
