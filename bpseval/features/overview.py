"""Everything the pictures and the HTML report show about a run, merged and scored once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bpseval.errors import RunError
from bpseval.features.compare import (
    CompareSettings,
    Comparison,
    Side,
    compare,
    load_baseline,
)
from bpseval.features.groups import GroupScores, group_run, grouping_table, load_exclusions
from bpseval.features.steps import StepResults, merge_steps
from bpseval.run.catalog import RunCatalog
from bpseval.run.scored import ScoredRun, ScoreSettings, score_run


@dataclass
class RunOverview:
    """One step of a run merged and scored, every complete step scored, and optionally a baseline."""

    scored: ScoredRun
    steps: StepResults
    min_samples: int = 10
    baseline: ScoredRun | None = None
    comparison: Comparison | None = None
    groups: GroupScores | None = None
    """Every metric per group of cells (`cells` and `group_by`)."""


def load_overview(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    *,
    baseline: str | os.PathLike[str] | None = None,
    min_samples: int = 10,
    settings: CompareSettings | None = None,
    cells: str | os.PathLike[str] | None = None,
    group_by: str | None = None,
    pass_over: bool = True,
    exclude_cells: str | os.PathLike[str] | None = None,
    **merge_options: Any,
) -> RunOverview:
    """Merge every complete step of `run_dir` once; `step` is the one pictured (default: as `bpseval compute`,
    or with `pass_over` False, as `bpseval report`, the latest step only when it is complete: `RunCatalog.select`).

    The pictured step must be complete, as for `bpseval compute`; other steps that cannot be
    scored are listed in `steps` (see `StepResults.bad`). With `baseline` (a baseline
    JSON or a run directory), the run is compared with it as `bpseval compare` does with `settings`. With `cells`
    (a cell table) and `group_by` (one of its columns), every metric per group, as `bpseval compute --group-by`.
    The cells of the table `exclude_cells` are excluded, in the run and in the baseline.
    """
    table = grouping_table(cells, group_by)
    exclusions = load_exclusions(exclude_cells)
    catalog = RunCatalog.scan(run_dir, jobs=merge_options.get("jobs", 1))
    chosen = catalog.select(step, pass_over=pass_over).entry.step  # the step the one rule picks, or its error
    runs, steps = merge_steps(catalog, **merge_options)
    if chosen not in runs:
        raise RunError(f"{catalog.root}: {steps.failed[chosen]}")
    steps.results = {number: score_run(merged, ScoreSettings(exclusions=exclusions)) for number, merged in runs.items()}
    scored = steps.results[chosen]
    inputs = RunOverview(scored=scored, steps=steps, min_samples=min_samples)
    if table is not None and group_by is not None:
        inputs.groups = group_run(scored, table, group_by)
    if baseline is not None:
        base = load_baseline(baseline, exclusions=exclusions, **merge_options)
        inputs.baseline = base.scored
        inputs.comparison = compare(Side(str(run_dir), scored), base, settings or CompareSettings())
    return inputs
