"""Check a run directory without computing anything (`bpseval doctor`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpseval.errors import BpsevalError
from bpseval.run.catalog import FileProblem, RunCatalog, StepEntry
from bpseval.shard.format import FORMAT_VERSION

HEALTHY, PROBLEMS, UNUSABLE = 0, 1, 2


@dataclass(frozen=True)
class DefaultStep:
    """What a command does without `--step`, by the rule every command follows (`RunCatalog.select`)."""

    step: int | None
    """The step it merges; None when it fails."""
    error: str | None = None
    """Why it fails (its `Error:` line), when it does."""
    notes: list[str] = field(default_factory=list)
    """Its `Warning:` lines about the run: newer incomplete steps passed over, files skipped."""

    @classmethod
    def of(cls, catalog: RunCatalog, *, pass_over: bool) -> DefaultStep:
        try:
            selection = catalog.select(pass_over=pass_over)
        except BpsevalError as error:
            return cls(None, str(error))
        return cls(selection.entry.step, None, selection.notes)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "error": self.error, "notes": self.notes}


@dataclass
class Diagnosis:
    """What `bpseval doctor` found; `status` is the exit code (0 healthy, 1 problems, 2 unusable)."""

    run_dir: Path
    steps: list[StepEntry]
    leftovers: list[tuple[Path, bool]]
    """Temporary files of unfinished writes, and whether each is stale (older than the newest shard)."""
    compute: DefaultStep
    """What `compute` (also `coverage`, `baseline`, `plot`) does without --step."""
    compare: DefaultStep
    """What `compare` and `report` do without --step: the latest step, only when it is complete."""
    usable: list[int]
    """The steps `--step` can merge (`RunCatalog.usable_steps`)."""
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
        """UNUSABLE when no step can be merged, even with --step; PROBLEMS when anything is wrong."""
        if not self.usable:
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
            "compute": self.compute.to_dict(),
            "compare": self.compare.to_dict(),
            "usable_steps": self.usable,
        }


def _step_text(step: StepEntry) -> str:
    if step.shards:
        parts = [f"world size {'/'.join(map(str, step.world_sizes))}", f"ranks present {step.ranks}"]
    else:  # only files that could not be read (or listed): nothing says its world size
        parts = ["no shard of it could be read"]
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
        count = len(step.problems)
        parts.append(f"{count} {'paths' if count > 1 else 'path'} that cannot be read")
    return ", ".join(parts)


def diagnose(run_dir: str | os.PathLike[str]) -> Diagnosis:
    """Read every shard's header (no arrays) and report steps, ranks, launches, leftovers, unusable and skipped files,
    and which step each command would merge without --step, or its error (the rule of `RunCatalog.select`).

    Raises RunError when the directory cannot be used at all (missing, no shard, a sweep of
    several runs, or a symlink out of it). Leftover temporary files are reported, never deleted.
    """
    catalog = RunCatalog.scan(run_dir)
    newest = max((header.path.stat().st_mtime for header in catalog.shards), default=None)
    leftovers = [(path, newest is not None and _mtime(path) < newest) for path in catalog.leftovers]
    return Diagnosis(
        catalog.root,
        list(catalog.steps.values()),
        leftovers,
        compute=DefaultStep.of(catalog, pass_over=True),
        compare=DefaultStep.of(catalog, pass_over=False),
        usable=catalog.usable_steps,
        file_problems=catalog.problems,
        skipped=catalog.skipped,
    )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # the writer finished (renamed it) meanwhile
        return float("inf")
