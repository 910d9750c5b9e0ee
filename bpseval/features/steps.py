"""Every validation step of a run: which steps are complete, and their scores (`compute --all-steps`).

A step is complete when its shards agree on the world size and hold ranks 0..world_size-1 exactly
once, as `bpseval compute --step N` requires. Incomplete steps (a crashed rank, a step still being
written, stale shards of another world size) are listed with the reason, never scored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpseval._lazy import pandas as pd
from bpseval.errors import BpsevalError
from bpseval.run.catalog import find_shards, read_headers, select_step
from bpseval.run.merge import MergedRun, merge_run
from bpseval.run.result import Result, build_result, results_frame
from bpseval.shard.format import ShardHeader

STEP_COLUMNS = ["step", "world_size", "bps", "bps_pooled", "ok", "silent", "uncovered"]


@dataclass
class StepScan:
    """The steps found under a run directory: complete ones (ascending) and incomplete ones with why."""

    root: Path
    headers: list[ShardHeader]
    complete: list[int] = field(default_factory=list)
    incomplete: dict[int, str] = field(default_factory=dict)

    def choose(self, step: int | None = None) -> int:
        """The step `bpseval compute --step` would merge (None: its default); raises its BpsevalError if that step is unusable."""
        return int(select_step(self.headers, step, self.root).shards[0].step)


@dataclass
class StepResults:
    """The scores of every complete step, ascending, and the incomplete steps with why they were skipped."""

    results: dict[int, Result]
    incomplete: dict[int, str] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return list(self.results)

    def frame(self) -> pd.DataFrame:
        """One row per complete step: overall bps and bps_pooled, cell counts, then each dataset's bps."""
        return steps_frame(self.results)

    def to_dict(self, run: str | None = None) -> dict[str, Any]:
        """The JSON document of `bpseval compute --all-steps --json` (null where a value is undefined)."""
        document: dict[str, Any] = {} if run is None else {"run": run}
        document["steps"] = [_step_entry(result) for result in self.results.values()]
        document["incomplete_steps"] = [{"step": step, "reason": reason} for step, reason in self.incomplete.items()]
        return document


def scan_steps(run_dir: str | os.PathLike[str]) -> StepScan:
    """Read every shard header below `run_dir` once and sort the steps into complete and incomplete.

    Raises BpsevalError when there is no shard or a shard cannot be read (as `bpseval compute`).
    """
    root = Path(run_dir)
    headers = []
    for header in read_headers(find_shards(root)):
        if isinstance(header, BpsevalError):
            raise header
        headers.append(header)
    scan = StepScan(root, headers)
    for step in sorted({header.step for header in headers}):
        try:
            select_step(headers, step, root)
        except BpsevalError as error:
            scan.incomplete[step] = _reason(str(error), root)
        else:
            scan.complete.append(step)
    return scan


def _reason(message: str, root: Path) -> str:
    """The merge error without the leading run directory (it is the same for every step)."""
    return message.removeprefix(f"{root}: ")


def merge_steps(
    run_dir: str | os.PathLike[str], **merge_options: Any
) -> tuple[dict[int, MergedRun], dict[int, str]]:
    """Merge every complete step of `run_dir` (ascending); also return the incomplete steps with why.

    `merge_options` go to `merge_run` (`jobs`, `scheduler`, `blocks`). Raises BpsevalError when
    no step is complete.
    """
    scan = scan_steps(run_dir)
    return _merge_scanned(run_dir, scan, **merge_options), scan.incomplete


def _merge_scanned(run_dir: str | os.PathLike[str], scan: StepScan, **merge_options: Any) -> dict[int, MergedRun]:
    if not scan.complete:
        listing = "; ".join(f"step {step}: {reason}" for step, reason in scan.incomplete.items())
        raise BpsevalError(f"{run_dir}: no complete step (each step lacks a rank or mixes world sizes). {listing}")
    return {step: merge_run(run_dir, step, **merge_options) for step in scan.complete}


def evaluate_steps(
    run_dir: str | os.PathLike[str], *, clamp_negative: bool = False, **merge_options: Any
) -> StepResults:
    """Score every complete step of `run_dir` exactly, as `evaluate(run_dir, step)` would, step by step."""
    runs, incomplete = merge_steps(run_dir, **merge_options)
    return StepResults(
        {step: build_result(run, clamp_negative=clamp_negative) for step, run in runs.items()}, incomplete
    )


def steps_frame(results: dict[int, Result]) -> pd.DataFrame:
    """One row per step: step, world size, overall bps and bps_pooled, cells ok/silent/uncovered, then bps[dataset]."""
    if not results:
        return pd.DataFrame(columns=STEP_COLUMNS)
    frame = results_frame(results, key="step")
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def _step_entry(result: Result) -> dict[str, Any]:
    document = result.to_dict()
    return {
        "step": result.step,
        "world_size": result.world_size,
        "files": document["files"],
        "bps": document["overall"]["bps"],
        "bps_pooled": document["overall"]["bps_pooled"],
        "cells": document["overall"]["cells"],
        "datasets": [
            {"name": entry["name"], "bps": entry["bps"], "bps_pooled": entry["bps_pooled"], "cells": entry["cells"]}
            for entry in document["datasets"]
        ],
        "warnings": document["warnings"],
    }




def incomplete_text(step: int, reason: str) -> str:
    """One line about an incomplete step: its reason, led by the step number unless the reason starts with it."""
    return reason if reason.startswith(f"step {step} ") else f"step {step}: {reason}"
