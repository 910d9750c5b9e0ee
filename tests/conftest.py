"""Shared fixtures: real HDF5 shards built in tmp_path, and a CLI runner with a wide terminal."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from bpseval.cli import app


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """One hypothesis seed for the whole run, shown in its header, so that any failure can be run again with
    `--hypothesis-seed=N`: the one given, else a random one; xdist workers take the one of the run."""
    if config.getoption("hypothesis_seed") is None:
        given = getattr(config, "workerinput", {}).get("hypothesis_seed")
        config.option.hypothesis_seed = given if given is not None else str(secrets.randbelow(2**32))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Hand the run's hypothesis seed to an xdist worker (its options are parsed afresh, without it)."""
    node.workerinput["hypothesis_seed"] = node.config.getoption("hypothesis_seed")


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed")
    return f"hypothesis seed: {seed} (run a failure again with: python -m pytest --hypothesis-seed={seed} ...)"


def write_raw_shard(
    path: Path,
    datasets: dict[str, dict[str, Any]],
    *,
    rank: int = 0,
    world_size: int = 1,
    step: int = 0,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a shard with plain h5py, as another program following the format would.

    Each dataset maps array names (rhat, robs, dfs, sample_idx, cell_ids) to arrays and may set
    "rate_kind". `attrs` overrides or adds root attributes (None values delete them).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    root = {"format": "bpseval-shard", "format_version": 1, "rank": rank, "world_size": world_size, "step": step}
    root.update(attrs or {})
    with h5py.File(path, "w") as handle:
        for key, value in root.items():
            if value is not None:
                handle.attrs[key] = value
        for name, arrays in datasets.items():
            group = handle.create_group(f"datasets/{name}")
            for key, value in arrays.items():
                if key == "rate_kind":
                    group.attrs[key] = value
                else:
                    group.create_dataset(key, data=value)
    return path


def poisson_dataset(seed: int, n_rows: int = 40, n_cells: int = 6, *, with_dfs: bool = True) -> dict[str, np.ndarray]:
    """A small dataset of predicted rates, Poisson counts and a random mask, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    rhat = rng.gamma(2.0, 0.5, size=(n_rows, n_cells)).astype(np.float32)
    arrays = {"rhat": rhat, "robs": rng.poisson(rhat).astype(np.float32)}
    if with_dfs:
        arrays["dfs"] = (rng.random((n_rows, n_cells)) > 0.2).astype(np.float32)
    return arrays


@pytest.fixture
def runner() -> CliRunner:
    """A CliRunner whose Rich output is wide enough not to wrap table rows or messages."""
    return CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})


@pytest.fixture
def invoke(runner: CliRunner):
    """Run `bpseval ARGS...` in-process and return the click Result."""

    def run(*args: str):
        return runner.invoke(app, [str(arg) for arg in args])

    return run


def table_rows(text: str) -> list[list[str]]:
    """The rows of the tables in `text` (as `--format table` prints them), each the list of its stripped values;
    header rows (those over a rule) left out. A table split in parts gives each row once per part."""
    lines = text.splitlines()
    return [
        [value.strip() for value in line.split("│")]
        for line, below in zip(lines, [*lines[1:], ""], strict=True)
        if " │ " in line and "┿" not in below
    ]


def peak_bytes(function: Callable[[], object]) -> int:
    """The peak of Python allocations while `function()` runs (tracemalloc)."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def as_unprivileged(command: list[str], environment: dict[str, str], why: str) -> list[str]:
    """`command` run as user nobody when the tests run as root (root reads and lists anything).

    Skips the test, saying `why`, when nobody cannot import bpseval here (a checkout or
    environment only root can read).
    """
    if os.geteuid() != 0:
        return command
    wrapped = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    probe = subprocess.run(
        [*wrapped[:4], sys.executable, "-c", "import bpseval"],
        capture_output=True,
        cwd="/",
        env=environment,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"{why}, and user nobody cannot import bpseval here")
    return wrapped
