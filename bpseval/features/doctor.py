"""Check a run directory without computing anything (`bpseval doctor`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpseval.run.catalog import FileProblem, RunCatalog, StepEntry
from bpseval.shard.format import FORMAT_VERSION

HEALTHY, PROBLEMS, UNUSABLE = 0, 1, 2


@dataclass
class Diagnosis:
    """What `bpseval doctor` found; `status` is the exit code (0 healthy, 1 problems, 2 unusable)."""

    run_dir: Path
    steps: list[StepEntry]
    leftovers: list[tuple[Path, bool]]
    """Temporary files of unfinished writes, and whether each is stale (older than the newest shard)."""
    file_problems: list[FileProblem] = field(default_factory=list)
    skipped: list[FileProblem] = field(default_factory=list)
    """Files that are not shards and not named like one: listed, not a problem (`RunCatalog.skipped`)."""

    @property
    def problems(self) -> list[str]:
        found = [f"{problem.path}: {problem.problem}" for problem in self.file_problems]
        found += [f"step {s.step} is incomplete: {_step_text(s)}" for s in self.steps if not s.complete]
        found += [
            f"{path}: {'stale ' if stale else ''}temporary file of an unfinished write"
            for path, stale in self.leftovers
        ]
        return found

    @property
    def notes(self) -> list[str]:
        """What is not a problem but worth a line: the files skipped as not shards."""
        return [f"{problem.path}: skipped, not a bpseval shard ({problem.reason})" for problem in self.skipped]

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
                    "run_ids": s.run_ids,
                    "missing_count": s.missing_count,
                }
                for s in self.steps
            ],
            "leftovers": [{"path": str(path), "stale": stale} for path, stale in self.leftovers],
            "file_problems": [{"path": str(p.path), "problem": p.problem} for p in self.file_problems],
            "skipped": [{"path": str(p.path), "reason": p.reason} for p in self.skipped],
            "problems": self.problems,
        }


def _step_text(step: StepEntry) -> str:
    parts = [f"world size {'/'.join(map(str, step.world_sizes))}", f"ranks present {step.ranks}"]
    if step.missing:
        more = step.missing_count - len(step.missing)
        parts.append(f"missing {step.missing}" + (f" and {more} more" if more else ""))
    if step.repeated:
        parts.append(f"twice {step.repeated}")
    if len(step.run_ids) > 1:
        parts.append(f"{len(step.run_ids)} launches (run_id {', '.join(map(repr, step.run_ids))})")
    if len(step.stores) > 1:
        parts.append(f"stores {'/'.join(step.stores)}")
    if step.problems:
        parts.append(f"{len(step.problems)} unreadable file{'s' if len(step.problems) > 1 else ''}")
    return ", ".join(parts)


def diagnose(run_dir: str | os.PathLike[str]) -> Diagnosis:
    """Read every shard's header (no arrays) and report steps, ranks, launches, leftovers, unusable and skipped files.

    Raises RunError when the directory cannot be used at all (missing, no shard, a sweep of
    several runs, or a symlink out of it). Leftover temporary files are reported, never deleted.
    """
    catalog = RunCatalog.scan(run_dir)
    newest = max((header.path.stat().st_mtime for header in catalog.shards), default=None)
    leftovers = [(path, newest is not None and _mtime(path) < newest) for path in catalog.leftovers]
    return Diagnosis(catalog.root, list(catalog.steps.values()), leftovers, catalog.problems, catalog.skipped)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # the writer finished (renamed it) meanwhile
        return float("inf")
