"""The README's code runs as written: its blocks are executed in a temporary folder, as a user would.

A fenced block is run when its language is python or bash, unless the HTML comment on the line
before it says why not (`<!-- not run: needs 2 GPUs -->`); `<!-- file: NAME -->` saves the block
as NAME in the folder instead (a script a later block runs), and `<!-- expect exit N -->` expects
that exit code. `text` blocks (outputs, synopses, schemas) are not code. The blocks of one page
run in order in one folder, which holds a copy of `examples/` and `runs/exp1` (the shipped run).
`tests/test_docs.py` runs the docs pages the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUNNABLE = {"python", "bash"}
"""Languages whose blocks are executed; any other language but `text` must say why it is not run."""
NOT_CODE = {"text"}
MARK = re.compile(r"^<!--\s*(?P<mark>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)")
BLOCK_TIMEOUT = 300
"""Seconds one block may take (the quickstart trains a small model: a few seconds here)."""
FALSE_INSTALL = re.compile(r"pip install\s+(?:-U\s+|--upgrade\s+)?['\"]?bpseval\b")
"""An install from a package index, where bpseval is not published."""


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown page."""

    page: Path
    line: int  # 1-based, the opening fence
    lang: str
    body: str
    mark: str | None  # the HTML comment on the line before the fence, without <!-- -->

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def reason_not_run(self) -> str | None:
        """The reason given for not running it, or None."""
        if self.mark and self.mark.startswith("not run:"):
            return self.mark.removeprefix("not run:").strip()
        return None

    @property
    def file_name(self) -> str | None:
        if self.mark and self.mark.startswith("file:"):
            return self.mark.removeprefix("file:").strip()
        return None

    @property
    def expected_exit(self) -> int:
        if self.mark and self.mark.startswith("expect exit"):
            return int(self.mark.removeprefix("expect exit").strip())
        return 0


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of `page`, in order, with the comment before each (indented fences too)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        indent, start = len(fence.group("indent")), index
        previous = lines[index - 1].strip() if index else ""
        mark = MARK.match(previous)
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][indent:])
            index += 1
        assert index < len(lines), f"{page}:{start + 1}: a code block is never closed"
        blocks.append(Block(page, start + 1, fence.group("lang"), "\n".join(body) + "\n", mark and mark.group("mark")))
        index += 1
    return blocks


def unexplained_blocks(page: Path) -> list[str]:
    """Blocks that are neither run nor text, and say nothing of why not."""
    return [
        f"{block.where} ({block.lang or 'no language'})"
        for block in code_blocks(page)
        if block.lang not in RUNNABLE | NOT_CODE and not block.reason_not_run and not block.file_name
    ]


def environment(folder: Path) -> dict[str, str]:
    """This interpreter and this checkout's bpseval; caches in the folder; not under GitHub Actions."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GITHUB_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env["XDG_CACHE_HOME"] = str(folder / ".cache")
    env["COLUMNS"] = "100"
    return env


def prepared_folder(folder: Path) -> Path:
    """A folder as a checkout's user has it: `examples/` and the shipped run at `runs/exp1`."""
    shutil.copytree(REPO / "examples", folder / "examples")
    shutil.copytree(REPO / "examples" / "runs" / "exp1", folder / "runs" / "exp1")
    return folder


def run_blocks(page: Path, folder: Path) -> dict[Block, subprocess.CompletedProcess[str]]:
    """Run the page's runnable blocks in order in `folder`; each must exit as its mark expects."""
    done = {}
    env = environment(folder)
    for number, block in enumerate(code_blocks(page)):
        if block.file_name:
            (folder / block.file_name).write_text(block.body, encoding="utf-8")
            continue
        if block.lang not in RUNNABLE or block.reason_not_run:
            continue
        if block.lang == "python":
            script = folder / f".block-{number}.py"
            script.write_text(block.body, encoding="utf-8")
            command = [sys.executable, str(script)]
        else:
            command = ["bash", "-e", "-o", "pipefail", "-c", block.body]
        process = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, check=False
        )
        assert process.returncode == block.expected_exit, (
            f"{block.where} exited {process.returncode}, not {block.expected_exit}:\n"
            f"{block.body}\n--- stdout\n{process.stdout}\n--- stderr\n{process.stderr}"
        )
        done[block] = process
    return done


def test_readme_is_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_every_readme_block_runs_or_says_why_not() -> None:
    blocks = code_blocks(README)
    assert {block.lang for block in blocks} >= {"python", "bash"}
    assert unexplained_blocks(README) == []


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    """Train, write shards of 2 ranks, compute, coverage, a baseline and compare: all exit 0."""
    folder = prepared_folder(tmp_path)
    done = run_blocks(README, folder)
    commands = "\n".join(block.body for block in done)
    for step in ("python train.py", "bpseval compute runs/exp", "bpseval coverage runs/exp --min-samples"):
        assert step in commands, step
    assert "bpseval compare runs/exp --baseline baseline.json" in commands
    shards = sorted(path.relative_to(folder).as_posix() for path in (folder / "runs" / "exp").rglob("*.h5"))
    assert shards == [f"runs/exp/step-00000{step}/rank-000{rank}.h5" for step in range(3) for rank in range(2)]
    baseline = json.loads((folder / "baseline.json").read_text(encoding="utf-8"))
    assert baseline["step"] == 0 and baseline["world_size"] == 2
    assert [dataset["name"] for dataset in baseline["datasets"]] == ["session-A"]
    quickstart = next(process for block, process in done.items() if "bpseval compare" in block.body)
    assert "✓ no regression" in quickstart.stdout, quickstart.stdout
    assert "step 2 · world size 2 · 2 shards" in quickstart.stdout  # compute of the latest step
    shipped = next(process for block, process in done.items() if "examples/runs/exp1" in block.body)
    assert "Allen_2022-04-13" in shipped.stdout and "overall" in shipped.stdout


def test_readme_links_point_at_files_of_the_checkout() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?:|#)([^)#]+)", text)
    assert targets
    assert [target for target in targets if not (REPO / target).exists()] == []


@pytest.mark.parametrize("path", [README, *sorted((REPO / "docs").rglob("*.md"))], ids=lambda path: path.name)
def test_no_install_from_an_index_where_bpseval_is_not_published(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [f"{path.name}:{n}: {line}" for n, line in enumerate(lines, 1) if FALSE_INSTALL.search(line)] == []
