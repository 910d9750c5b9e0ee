"""A CI install without torch: every command runs in a process where torch cannot be imported.

torch is the `bpseval[torch]` extra (pulled in by `[lightning]` and `[test]`). The shards here are
written by ShardWriter from torch tensors (bfloat16 predictions, stored as float32) in the test
process; each command then runs in a fresh `python -c` process whose prelude makes every import
of `torch` fail as it does when torch is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bpseval import ShardWriter
from bpseval.errors import install_hint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]

WITHOUT_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
"""
"""The prelude: `import torch` (or any torch.*) raises ModuleNotFoundError, as without torch installed."""


def run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` after the prelude in a fresh interpreter that imports this checkout of bpseval."""
    env = {"PYTHONPATH": str(REPO), "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH + code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`bpseval ARGS...` (the console script's entry point) without torch."""
    return run_without_torch(f"sys.argv = ['bpseval', *{list(args)!r}]\nfrom bpseval.cli import main\nmain()", cwd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of a 2-rank run written from torch tensors (bfloat16 rhat, bool dfs), and a mask file for plan."""
    root = tmp_path_factory.mktemp("notorch")
    generator = torch.Generator().manual_seed(0)
    for step in (0, 1):
        for rank in (0, 1):
            with ShardWriter(root / "run", rank, 2, step=step) as writer:
                for name, cells in (("A", 5), ("B", 3)):
                    rhat = (torch.rand(30, cells, generator=generator) * 2 + 0.1).to(torch.bfloat16)
                    robs = torch.poisson(rhat.float(), generator=generator)
                    dfs = torch.rand(30, cells, generator=generator) > 0.2
                    writer.add(name, rhat, robs, dfs, sample_idx=torch.arange(rank, 60, 2))
    np.save(root / "masks.npy", np.ones((40, 4), dtype=np.float32))
    return root


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--version"], 0, "bpseval"),
        (["compute", "run"], 0, "overall"),
        (["compute", "run", "--all-steps"], 0, "by step"),
        (["coverage", "run"], 0, "A"),
        (["plan", "masks.npy", "--world-size", "2"], 0, "predicted below"),
        (["baseline", "run", "-o", "baseline.json"], 0, ""),
        (["compare", "run", "--baseline", "run"], 0, "bps"),
        (["doctor", "run"], 0, "step"),
        (["plot", "run", "-o", "figures"], 0, ""),
        (["report", "run", "-o", "report.html"], 0, ""),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_every_command_runs_without_torch_on_torch_written_shards(workdir, args, code, expected):
    done = run_cli(*args, cwd=workdir)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert expected.lower() in done.stdout.lower()


def test_the_outputs_without_torch_are_complete(workdir):
    """The files the commands wrote without torch hold what they hold with it."""
    done = run_cli("compute", "run", "--json", "-", cwd=workdir)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [dataset["name"] for dataset in result["datasets"]] == ["A", "B"] and result["step"] == 1
    assert run_cli("baseline", "run", "-o", "baseline.json", cwd=workdir).returncode == 0
    assert json.loads((workdir / "baseline.json").read_text())["step"] == 1
    assert run_cli("plot", "run", "-o", "figures", cwd=workdir).returncode == 0
    assert any(path.suffix == ".png" for path in (workdir / "figures").iterdir())
    assert run_cli("report", "run", "-o", "report.html", cwd=workdir).returncode == 0
    assert "<html" in (workdir / "report.html").read_text().lower()


def test_plan_with_a_seed_needs_torch_and_says_which_extra(workdir):
    """DistributedSampler's shuffled order comes from torch's generator: without torch, one line and exit 2."""
    done = run_cli("plan", "masks.npy", "--world-size", "2", "--seed", "3", cwd=workdir)
    assert done.returncode == 2
    assert done.stderr.startswith("Error: ") and "Traceback" not in done.stderr
    assert install_hint("torch") in done.stderr and "--seed" in done.stderr


def test_the_torch_parts_say_which_extra_to_install(tmp_path):
    """import bpseval works; the torch parts raise an ImportError (also a BpsevalError) naming the extra."""
    done = run_without_torch(
        """
import bpseval, numpy as np
from bpseval.errors import BpsevalError, MissingExtraError
print(bpseval.bits_per_spike(np.ones((3, 2)), np.ones((3, 2)))["bps"].tolist())

def report(label, call):
    try:
        call()
    except ImportError as error:
        print(label, "|", type(error).__name__, isinstance(error, BpsevalError), error.name, "|", error)
    else:
        print(label, "| no error")

report("torch", lambda: __import__("bpseval.torch"))
report("torch again", lambda: __import__("bpseval.torch"))
report("sampler", lambda: bpseval.CellBalancedDistributedSampler)
report("sampler module", lambda: __import__("bpseval.sampler"))
report("lightning", lambda: __import__("bpseval.lightning"))
report("writer", lambda: bpseval.ShardWriter.from_process_group("run", step=0))
print("torch imported:", "torch" in sys.modules)
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "[0.0, 0.0]" and lines[-1] == "torch imported: False"
    reports = {line.split(" | ")[0]: line.split(" | ")[1:] for line in lines[1:-1]}
    assert set(reports) == {"torch", "torch again", "sampler", "sampler module", "lightning", "writer"}
    for label, (kind, message) in reports.items():
        assert kind == "MissingExtraError True torch", label
        extra = "lightning" if label == "lightning" else "torch"
        assert install_hint(extra) in message, label
    assert reports["writer"][1].startswith("ShardWriter.from_process_group needs PyTorch")
    assert reports["sampler"][1].startswith("bpseval.CellBalancedDistributedSampler needs PyTorch")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(tomllib is None, reason="tomllib is Python 3.11+")
def test_torch_is_an_extra_that_lightning_and_test_pull_in():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [requirement.split(">")[0].split("[")[0].strip() for requirement in project["dependencies"]]
    assert "torch" not in names and {"numpy", "h5py", "typer"} <= set(names)
    extras = project["optional-dependencies"]
    assert extras["torch"] == ["torch>=2.1"]
    assert "bpseval[torch]" in extras["lightning"]
    test_extras = next(req for req in extras["test"] if req.startswith("bpseval["))
    assert {"lightning", "dask", "plot"} <= set(test_extras[len("bpseval[") : -1].split(","))
