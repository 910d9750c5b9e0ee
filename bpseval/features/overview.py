"""Everything the pictures and the HTML report show about a run, merged and scored once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bpseval.features.compare import CompareSettings, Comparison, Side, compare, load_baseline
from bpseval.features.steps import StepResults, _merge_scanned, scan_steps
from bpseval.run.merge import MergedRun
from bpseval.run.result import Result, build_result


@dataclass
class RunOverview:
    """One step of a run merged and scored, every complete step scored, and optionally a baseline."""

    run: MergedRun
    result: Result
    steps: StepResults
    min_samples: int = 10
    baseline: Result | None = None
    comparison: Comparison | None = None


def load_overview(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    *,
    baseline: str | os.PathLike[str] | None = None,
    min_samples: int = 10,
    settings: CompareSettings | None = None,
    **merge_options: Any,
) -> RunOverview:
    """Merge every complete step of `run_dir` once; `step` is the one pictured (default: as `bpseval compute`).

    The pictured step must be complete, as for `bpseval compute`. With `baseline` (a baseline
    JSON or a run directory), the run is compared with it as `bpseval compare` does with `settings`.
    """
    scan = scan_steps(run_dir)
    chosen = scan.choose(step)  # the step `bpseval compute --step` merges, or its error
    runs = _merge_scanned(run_dir, scan, **merge_options)
    steps = StepResults({s: build_result(run) for s, run in runs.items()}, scan.incomplete)
    run, result = runs[chosen], steps.results[chosen]
    inputs = RunOverview(run=run, result=result, steps=steps, min_samples=min_samples)
    if baseline is not None:
        base = load_baseline(baseline, **merge_options)
        inputs.baseline = base.result
        inputs.comparison = compare(Side(str(run_dir), result, run), base, settings or CompareSettings())
    return inputs
