"""Check a run directory without computing anything (`bpseval doctor`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpseval.errors import BpsevalError
from bpseval.run.catalog import read_headers, scan_run_dir, step_ranks
from bpseval.shard.format import FORMAT_VERSION, ShardHeader

HEALTHY, PROBLEMS, UNUSABLE = 0, 1, 2


@dataclass
class StepReport:
    """One step: its world size(s), the ranks present, missing and repeated, and how it was stored."""

    step: int
    world_sizes: list[int]
    ranks: list[int]
    missing: list[int]
    repeated: list[int]
    stores: list[str]

    @property
    def complete(self) -> bool:
        return len(self.world_sizes) == 1 and not self.missing and not self.repeated


@dataclass
class Diagnosis:
    """What `bpseval doctor` found; `status` is the exit code (0 healthy, 1 problems, 2 unusable)."""

    run_dir: Path
    steps: list[StepReport]
    leftovers: list[tuple[Path, bool]]
    """Temporary files of unfinished writes, and whether each is stale (older than the newest shard)."""
    file_problems: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = [f"{path}: {message}" for path, message in self.file_problems]
        found += [f"step {s.step} is incomplete: {_step_text(s)}" for s in self.steps if not s.complete]
        found += [f"{path}: {'stale ' if stale else ''}temporary file of an unfinished write" for path, stale in self.leftovers]
        return found

    @property
    def status(self) -> int:
        if not any(step.complete for step in self.steps):
            return UNUSABLE
        return PROBLEMS if self.problems else HEALTHY

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "status": ["healthy", "problems", "unusable"][self.status],
            "format_version": FORMAT_VERSION,
            "steps": [
                {
                    "step": s.step,
                    "complete": s.complete,
                    "world_sizes": s.world_sizes,
                    "ranks": s.ranks,
                    "missing": s.missing,
                    "repeated": s.repeated,
                    "stores": s.stores,
                }
                for s in self.steps
            ],
            "leftovers": [{"path": str(path), "stale": stale} for path, stale in self.leftovers],
            "file_problems": [{"path": str(path), "problem": message} for path, message in self.file_problems],
            "problems": self.problems,
        }


def _step_text(step: StepReport) -> str:
    parts = [f"world size {'/'.join(map(str, step.world_sizes))}", f"ranks present {step.ranks}"]
    if step.missing:
        parts.append(f"missing {step.missing}")
    if step.repeated:
        parts.append(f"twice {step.repeated}")
    return ", ".join(parts)


def diagnose(run_dir: str | os.PathLike[str]) -> Diagnosis:
    """Read every shard's header (no arrays) and report steps, ranks, leftovers and damaged files.

    Raises BpsevalError when the directory cannot be used at all (missing, or a symlink out of it).
    Leftover temporary files are reported, never deleted.
    """
    root = Path(run_dir)
    files = scan_run_dir(root)
    headers: list[ShardHeader] = []
    problems: list[tuple[Path, str]] = []
    for path, header in zip(files.shards, read_headers(files.shards)):
        if isinstance(header, BpsevalError):
            problems.append((path, str(header).removeprefix(f"{path}: ")))
        else:
            headers.append(header)
    by_step: dict[int, list[ShardHeader]] = {}
    for header in headers:
        by_step.setdefault(header.step, []).append(header)
    steps = []
    for step, group in sorted(by_step.items()):
        sizes, missing, repeated = step_ranks(group)
        ranks = sorted(header.rank for header in group)
        steps.append(StepReport(step, sizes, ranks, missing, repeated, sorted({header.store for header in group})))
    newest = max((header.path.stat().st_mtime for header in headers), default=None)
    leftovers = [(path, newest is not None and _mtime(path) < newest) for path in files.leftovers]
    return Diagnosis(root, steps, leftovers, problems)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # the writer finished (renamed it) meanwhile
        return float("inf")
