"""Every validation step of a run: which steps are complete, and their scores (`compute --all-steps`).

A step is complete when its shards agree on the world size and launch and hold ranks
0..world_size-1 exactly once, as `bpseval compute --step N` requires. Steps whose ranks are
still missing (a crashed rank, a step being written) are listed as incomplete; steps that cannot
be scored for any other reason (damaged files, mixed launches or world sizes, invalid values) are
listed as failed, and make the command exit 2 once every other step is scored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from bpseval._json import plain
from bpseval.errors import BpsevalError, RunError
from bpseval.features.groups import load_exclusions
from bpseval.run.catalog import RunCatalog, StepSelection
from bpseval.run.merge import MergedRun, merge_selection
from bpseval.run.scored import SUMMARY_METRICS, ScoredRun, ScoreSettings, score_run


@dataclass
class StepResults:
    """The scores of every complete step (ascending) and every step that could not be scored, with why."""

    results: dict[int, ScoredRun]
    incomplete: dict[int, str] = field(default_factory=dict)
    """Steps with ranks missing and nothing else wrong (their writers may still be running)."""
    failed: dict[int, str] = field(default_factory=dict)
    """Steps that cannot be scored for another reason: bad input."""
    problems: list[str] = field(default_factory=list)
    """Unreadable files whose step is unknown: bad input."""
    notes: list[str] = field(default_factory=list)
    """About the run as a whole, said once (e.g. files skipped as not shards)."""

    @property
    def steps(self) -> list[int]:
        return list(self.results)

    @property
    def bad(self) -> bool:
        """Some step failed or some file could not be read: the command exits 2 after reporting the rest."""
        return bool(self.failed or self.problems)

    def to_dict(self, run: str | None = None) -> dict[str, Any]:
        """The JSON document of `bpseval compute --all-steps --json` (null where a value is undefined)."""
        document: dict[str, Any] = {} if run is None else {"run": run}
        document["steps"] = [_step_entry(result) for result in self.results.values()]
        document["incomplete_steps"] = [{"step": step, "reason": reason} for step, reason in self.incomplete.items()]
        document["failed_steps"] = [{"step": step, "reason": reason} for step, reason in self.failed.items()]
        document["problems"] = self.problems
        document["notes"] = self.notes
        return document


def merge_steps(catalog: RunCatalog, **merge_options: Any) -> tuple[dict[int, MergedRun], StepResults]:
    """Merge every complete step of a scanned run (ascending), each shard header read once for all of them.

    Returns the merged steps and a `StepResults` (without scores yet) listing the steps that were
    not merged. `merge_options` go to `merge_selection` (`jobs`, `scheduler`, `blocks`). Raises
    RunError when no step could be merged.
    """
    runs: dict[int, MergedRun] = {}
    skipped = StepResults(
        {},
        problems=[str(problem.error) for problem in catalog.run_problems],
        notes=[catalog.skipped_note] if catalog.skipped else [],
    )
    for step, entry in catalog.steps.items():
        if entry.only_incomplete:
            skipped.incomplete[step] = entry.reason
        elif not entry.complete:
            skipped.failed[step] = entry.reason
        else:
            try:
                runs[step] = merge_selection(catalog, StepSelection(entry, []), **merge_options)
            except BpsevalError as error:
                skipped.failed[step] = f"step {step}: {error}"
    if not runs:
        listed = "; ".join(
            incomplete_text(step, reason) for step, reason in {**skipped.incomplete, **skipped.failed}.items()
        )
        raise RunError(f"{catalog.root}: no complete step could be scored. {listed}".strip())
    return runs, skipped


def evaluate_steps(
    run_dir: str | os.PathLike[str] | RunCatalog,
    *,
    clamp_negative: bool = False,
    min_samples: int = 0,
    exclude_cells: str | os.PathLike[str] | None = None,
    **merge_options: Any,
) -> StepResults:
    """Score every complete step of a run exactly, as `evaluate(run_dir, step)` would, step by step.

    Steps that cannot be scored are listed in the result (`incomplete`, `failed`), not raised:
    one bad step does not hide the good ones. The cells of the table `exclude_cells` are excluded in every step.
    """
    exclusions = load_exclusions(exclude_cells)
    settings = ScoreSettings(clamp_negative=clamp_negative, min_samples=min_samples, exclusions=exclusions)
    catalog = (
        run_dir if isinstance(run_dir, RunCatalog) else RunCatalog.scan(run_dir, jobs=merge_options.get("jobs", 1))
    )
    runs, steps = merge_steps(catalog, **merge_options)
    steps.results = {step: score_run(run, settings) for step, run in runs.items()}
    return steps


def _step_entry(scored: ScoredRun) -> dict[str, Any]:
    return plain(
        {
            "step": scored.step,
            "world_size": scored.world_size,
            "files": scored.files,
            **{metric: getattr(scored.overall, metric) for metric in SUMMARY_METRICS},
            "cells": scored.overall.cells,
            "settings": scored.settings.to_dict(),
            "datasets": [
                {
                    "name": dataset.name,
                    **{metric: getattr(dataset, metric) for metric in SUMMARY_METRICS},
                    "cells": dataset.cells,
                }
                for dataset in scored.datasets
            ],
            "warnings": scored.warnings,
        }
    )


def incomplete_text(step: int, reason: str) -> str:
    """One line about an incomplete step: its reason, led by the step number unless the reason starts with it."""
    return reason if reason.startswith((f"step {step} ", f"step {step}:")) else f"step {step}: {reason}"
