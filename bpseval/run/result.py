"""The scored result of a merged run: per-cell, per-dataset and overall bits per spike."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bpseval._json import json_text
from bpseval._lazy import pandas as pd
from bpseval._lazy import preload_pandas
from bpseval._version import __version__
from bpseval.kernel.stats import (
    MIN_RATE,
    OK,
    OVERFLOW,
    STAT_FIELDS,
    STATUSES,
    CellStats,
    cells_frame,
    mean_bps,
    pooled_bps,
    status_counts,
)
from bpseval.run.dedup import RHAT_COPY_RTOL
from bpseval.run.merge import MergedRun, merge_run

DATASET_COLUMNS = ["name", "samples", "duplicates_dropped", "bps", "bps_pooled", *STATUSES, "identity"]
CELL_COLUMNS = ["dataset", "cell", "cell_id", "n_valid", "n", "spikes", "model_ll", "ll_gain", "bps", "status"]


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
                "cells": {status: int(getattr(row, status)) for status in STATUSES},
                "identity": row.identity,
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
                "model_ll": _number(row.model_ll),
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
            "identity": self.identity,
            "overall": {key: _plain(value) for key, value in self.overall.items()},
            "datasets": datasets,
            "cells": cells,
            "warnings": self.warnings,
        }

    @property
    def identity(self) -> str:
        """Checksum of what was scored (datasets, cells, sample_idx): equal for runs that scored the same samples."""
        digest = hashlib.sha256()
        for name, identity in sorted(zip(self.datasets["name"], self.datasets["identity"])):
            digest.update(f"{name}={identity};".encode())
        return digest.hexdigest()

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Result:
        """A Result back from its JSON document (`to_dict`); null values become NaN."""
        datasets = pd.DataFrame(
            [
                {**{key: entry.get(key) for key in DATASET_COLUMNS if key not in STATUSES}, OVERFLOW: 0}
                | entry["cells"]
                for entry in document["datasets"]
            ],
            columns=DATASET_COLUMNS,
        )
        cells = pd.DataFrame([{key: cell.get(key) for key in CELL_COLUMNS} for cell in document["cells"]], columns=CELL_COLUMNS)
        for frame, columns in ((datasets, ("bps", "bps_pooled")), (cells, ("n", "spikes", "model_ll", "ll_gain", "bps"))):
            for column in columns:
                frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
        overall = {key: (math.nan if value is None else value) for key, value in document["overall"].items()}
        return cls(
            step=document["step"],
            world_size=document["world_size"],
            files=list(document.get("files", [])),
            settings=dict(document.get("settings", {})),
            overall=overall,
            datasets=datasets,
            cells=cells,
            warnings=list(document.get("warnings", [])),
        )

    def to_json(self) -> str:
        """`to_dict` as strict JSON (no NaN or Infinity), one line per dataset and per cell."""
        return json_text(self.to_dict())


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


def evaluate(
    run_dir: str | os.PathLike[str], step: int | None = None, *, clamp_negative: bool = False, **merge_options: Any
) -> Result:
    """Merge the shards of one step of `run_dir` (default: the latest step) and score them exactly.

    `merge_options` go to `merge_run`: `jobs`, `scheduler`, `on_progress`. pandas, which the
    result needs and the merge does not, is imported while the merge waits on other processes.
    """
    merged = merge_run(run_dir, step, meanwhile=preload_pandas, **merge_options)
    return build_result(merged, clamp_negative=clamp_negative)


def build_result(run: MergedRun, clamp_negative: bool = False) -> Result:
    """Score every cell and summarise each dataset and the whole run.

    Dataset bps is the mean over its ok cells; overall bps the mean over datasets that have an
    ok cell (the others are listed in overall["datasets_without_ok_cells"]). bps_pooled pools
    ll_gain and spikes over covered cells. `clamp_negative` reproduces legacy numbers.
    """
    sizes = [len(dataset.cell_ids) for dataset in run.datasets]
    totals = [dataset.total for dataset in run.datasets]
    stats = CellStats(*(np.concatenate([getattr(t, name) for t in totals]) for name in STAT_FIELDS)) if totals else CellStats.zeros(0)
    all_cells = cells_frame(stats)
    all_cells["cell"] = np.concatenate([np.arange(size) for size in sizes]) if sizes else np.zeros(0, dtype=np.int64)
    all_cells.insert(0, "dataset", np.repeat([dataset.name for dataset in run.datasets], sizes).astype(object))
    all_cells.insert(2, "cell_id", pd.Series([cell for d in run.datasets for cell in d.cell_ids.tolist()], dtype=object))
    bps, ll_gain, spikes = (all_cells[column].to_numpy(float) for column in ("bps", "ll_gain", "spikes"))
    status = all_cells["status"].to_numpy()
    dataset_rows = []
    for dataset, start, stop in zip(run.datasets, np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes)):
        cells = slice(start, stop)
        dataset_rows.append(
            {
                "name": dataset.name,
                "samples": dataset.samples,
                "duplicates_dropped": dataset.duplicates_dropped,
                "identity": dataset.identity,
                "bps": mean_bps(bps[cells], status[cells], clamp_negative),
                "bps_pooled": pooled_bps(ll_gain[cells], spikes[cells], status[cells]),
                **status_counts(status[cells]),
            }
        )
    datasets = pd.DataFrame(dataset_rows, columns=DATASET_COLUMNS)
    scored = datasets[datasets[OK] > 0]
    overall_bps = float(scored["bps"].mean()) if len(scored) and not (status == OVERFLOW).any() else math.nan
    if clamp_negative and math.isfinite(overall_bps):
        overall_bps = max(overall_bps, 0.0)
    overall = {
        "bps": overall_bps,
        "bps_pooled": pooled_bps(ll_gain, spikes, status),
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
        warnings=list(run.warnings) + _overflow_warnings(all_cells),
    )


def _overflow_warnings(cells: pd.DataFrame) -> list[str]:
    """One warning per dataset with `overflow` cells: why its numbers and the overall ones are undefined."""
    overflowed = cells[cells["status"] == OVERFLOW]
    return [
        f"dataset {name!r}: {len(group)} cell{'s' if len(group) != 1 else ''}"
        f" (first: cell_id {group['cell_id'].iloc[0]}) with float64 sums, ll_gain or bps that are not finite"
        " (status overflow: spike counts or log-rates too large, or spike counts too small to divide by);"
        " bps and bps_pooled of the dataset and of the run are undefined."
        for name, group in overflowed.groupby("dataset", sort=False)
    ]


def runs_frame(results: dict[str, Result], sort: str = "run") -> pd.DataFrame:
    """One row per run: step, overall bps and bps_pooled, cell counts, then each dataset's bps.

    `sort` is "run" (by name) or a metric ("bps", "bps_pooled": best first).
    """
    frame = results_frame(results, key="run").drop(columns="world_size")
    if sort == "run":
        return frame.sort_values("run", kind="stable").reset_index(drop=True)
    return frame.sort_values(sort, ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def results_frame(results: dict[Any, Result], key: str) -> pd.DataFrame:
    """One row per result, labelled `key` (run or step): its step, world size, overall numbers and dataset bps."""
    rows = []
    for label, result in results.items():
        row = {key: label, "step": result.step, "world_size": result.world_size}  # key "step" keeps one column
        row.update({"bps": result.overall["bps"], "bps_pooled": result.overall["bps_pooled"], **result.overall["cells"]})
        row.update({f"bps[{name}]": bps for name, bps in zip(result.datasets["name"], result.datasets["bps"])})
        rows.append(row)
    return pd.DataFrame(rows)
