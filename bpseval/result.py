"""The scored result of a merged run: per-cell, per-dataset and overall bits per spike."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bpseval._version import __version__
from bpseval.merge import RHAT_COPY_RTOL, MergedRun, merge_run
from bpseval.stats import MIN_RATE, OK, cells_frame, mean_bps, pooled_bps, status_counts

DATASET_COLUMNS = ["name", "samples", "duplicates_dropped", "bps", "bps_pooled", "ok", "silent", "uncovered"]
CELL_COLUMNS = ["dataset", "cell", "cell_id", "n_valid", "n", "spikes", "ll_gain", "bps", "status"]


@dataclass
class Result:
    """What `bpseval compute` reports. Undefined values are NaN here and null in JSON."""

    step: int
    world_size: int
    files: list[str]
    settings: dict[str, Any]
    overall: dict[str, Any]
    datasets: pd.DataFrame
    cells: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.world_size))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `bpseval compute --json`, with None where a value is undefined."""
        datasets = [
            {
                "name": row.name,
                "samples": int(row.samples),
                "duplicates_dropped": int(row.duplicates_dropped),
                "bps": _number(row.bps),
                "bps_pooled": _number(row.bps_pooled),
                "cells": {"ok": int(row.ok), "silent": int(row.silent), "uncovered": int(row.uncovered)},
            }
            for row in self.datasets.itertuples(index=False)
        ]
        cells = [
            {
                "dataset": row.dataset,
                "cell": int(row.cell),
                "cell_id": _plain(row.cell_id),
                "n_valid": int(row.n_valid),
                "n": _number(row.n),
                "spikes": _number(row.spikes),
                "ll_gain": _number(row.ll_gain),
                "bps": _number(row.bps),
                "status": row.status,
            }
            for row in self.cells.itertuples(index=False)
        ]
        return {
            "bpseval_version": __version__,
            "step": self.step,
            "world_size": self.world_size,
            "ranks": self.ranks,
            "files": self.files,
            "settings": self.settings,
            "overall": {key: _plain(value) for key, value in self.overall.items()},
            "datasets": datasets,
            "cells": cells,
            "warnings": self.warnings,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """`to_dict` as strict JSON (no NaN or Infinity)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """A JSON-ready version of a numpy scalar or container."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _number(value)
    if isinstance(value, np.str_):
        return str(value)
    return value


def evaluate(run_dir: str | os.PathLike[str], step: int | None = None, *, clamp_negative: bool = False) -> Result:
    """Merge the shards of one step of `run_dir` (default: the latest step) and score them exactly."""
    return build_result(merge_run(run_dir, step), clamp_negative=clamp_negative)


def build_result(run: MergedRun, clamp_negative: bool = False) -> Result:
    """Score every cell and summarise each dataset and the whole run.

    Dataset bps is the mean over its ok cells; overall bps the mean over datasets that have an
    ok cell (the others are listed in overall["datasets_without_ok_cells"]). bps_pooled pools
    ll_gain and spikes over covered cells. `clamp_negative` reproduces legacy numbers.
    """
    cell_tables = []
    dataset_rows = []
    for dataset in run.datasets:
        cells = cells_frame(dataset.total)
        cells.insert(0, "dataset", dataset.name)
        cells.insert(2, "cell_id", pd.Series(list(dataset.cell_ids), dtype=object))
        cell_tables.append(cells)
        status = cells["status"].to_numpy()
        dataset_rows.append(
            {
                "name": dataset.name,
                "samples": dataset.samples,
                "duplicates_dropped": dataset.duplicates_dropped,
                "bps": mean_bps(cells["bps"].to_numpy(), status, clamp_negative),
                "bps_pooled": pooled_bps(cells["ll_gain"].to_numpy(), cells["spikes"].to_numpy(), status),
                **status_counts(status),
            }
        )
    all_cells = pd.concat(cell_tables, ignore_index=True) if cell_tables else pd.DataFrame(columns=CELL_COLUMNS)
    datasets = pd.DataFrame(dataset_rows, columns=DATASET_COLUMNS)
    scored = datasets[datasets[OK] > 0]
    overall_bps = float(scored["bps"].mean()) if len(scored) else math.nan
    if clamp_negative and math.isfinite(overall_bps):
        overall_bps = max(overall_bps, 0.0)
    status = all_cells["status"].to_numpy()
    overall = {
        "bps": overall_bps,
        "bps_pooled": pooled_bps(all_cells["ll_gain"].to_numpy(float), all_cells["spikes"].to_numpy(float), status),
        "datasets": int(len(scored)),
        "datasets_without_ok_cells": [str(name) for name in datasets.loc[datasets[OK] == 0, "name"]],
        "cells": status_counts(status),
    }
    return Result(
        step=run.step,
        world_size=run.world_size,
        files=[str(path) for path in run.files],
        settings={"clamp_negative": clamp_negative, "min_rate": MIN_RATE, "duplicate_rhat_rtol": RHAT_COPY_RTOL},
        overall=overall,
        datasets=datasets,
        cells=all_cells[CELL_COLUMNS],
        warnings=list(run.warnings),
    )
