"""A scored run as pandas frames and as the JSON document of `bpseval compute --json`: what the views show.

`RunFrames` is a view of a `ScoredRun` (with its groups and intervals, when asked for); the public
`bpseval.Result` (`api.py`) is a `RunFrames` with the methods a user calls. The frames are built on
first use, so a command that only prints tables or JSON never imports pandas.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from bpseval._json import json_text, plain
from bpseval.features.groups import GroupScores
from bpseval.features.steps import StepResults
from bpseval.features.uncertainty import Intervals
from bpseval.kernel.stats import STATUSES
from bpseval.run.document import run_document
from bpseval.run.scored import SUMMARY_METRICS, Overall, ScoredRun

if TYPE_CHECKING:
    import pandas as pd

DATASET_METRICS = list(SUMMARY_METRICS)
"""Every summary number of a dataset (and of the run), in the order the outputs show them."""
CELL_METRICS = ["bps", "pseudo_r2", "corr"]
DATASET_COLUMNS = ["name", "samples", "duplicates_dropped", *DATASET_METRICS, *STATUSES, "identity"]
CELL_COLUMNS = ["dataset", "cell", "cell_id", "n_valid", "n", "spikes", "model_ll", "ll_gain", *CELL_METRICS, "status"]
GROUP_COLUMNS = ["dataset", "column", "value", *DATASET_METRICS, *STATUSES]


class RunFrames:
    """A scored run as frames: `overall` (typed), and the `datasets`, `cells` and `groups` frames, and its JSON.

    Undefined values are NaN in the frames and null in JSON. `groups` (`--cells` and `--group-by`) adds the
    `groups` frame and the JSON `groups` list; `intervals`, the bootstrap intervals of `compute --ci`
    (`evaluate(ci=...)`), None when not asked for.

    Args:
        scored: the scored run.
        groups: every metric per group of cells, when asked for.
        intervals: the bootstrap intervals, when asked for.
    """

    def __init__(
        self, scored: ScoredRun, groups: GroupScores | None = None, intervals: Intervals | None = None
    ) -> None:
        self.scored = scored
        self.group_scores = groups
        self.intervals = intervals

    @property
    def step(self) -> int:
        return self.scored.step

    @property
    def world_size(self) -> int:
        return self.scored.world_size

    @property
    def ranks(self) -> list[int]:
        return list(range(self.world_size))

    @property
    def files(self) -> list[str]:
        return self.scored.files

    @property
    def settings(self) -> dict[str, Any]:
        return self.scored.settings.to_dict()

    @property
    def overall(self) -> Overall:
        return self.scored.overall

    @property
    def warnings(self) -> list[str]:
        return self.scored.warnings + (self.group_scores.warnings if self.group_scores is not None else [])

    @property
    def identity(self) -> str:
        """Checksum of what was scored (datasets, cells, sample_idx): equal for runs that scored the same samples."""
        return self.scored.identity

    @cached_property
    def datasets(self) -> pd.DataFrame:
        """One row per dataset: samples, duplicates dropped, DATASET_METRICS, cells per status, identity."""
        import pandas as pd

        rows = [
            {
                "name": dataset.name,
                "samples": dataset.samples,
                "duplicates_dropped": dataset.duplicates_dropped,
                **{metric: getattr(dataset, metric) for metric in DATASET_METRICS},
                **dataset.cells,
                "identity": dataset.identity,
            }
            for dataset in self.scored.datasets
        ]
        return pd.DataFrame(rows, columns=DATASET_COLUMNS)

    @cached_property
    def cells(self) -> pd.DataFrame:
        """One row per cell of every dataset: its sums, ll_gain, CELL_METRICS and status."""
        import pandas as pd

        datasets = self.scored.datasets
        sizes = [dataset.n_cells for dataset in datasets]

        def joined(values: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(values).astype(dtype) if values else np.zeros(0, dtype=dtype)

        return pd.DataFrame(
            {
                "dataset": np.repeat([dataset.name for dataset in datasets], sizes).astype(object),
                "cell": joined([np.arange(size) for size in sizes], np.int64),
                "cell_id": pd.Series(
                    [cell for dataset in datasets for cell in dataset.cell_ids.tolist()], dtype=object
                ),
                "n_valid": joined([dataset.stats.n_valid for dataset in datasets], np.int64),
                "n": joined([dataset.stats.weight for dataset in datasets], np.float64),
                "spikes": joined([dataset.stats.spikes for dataset in datasets], np.float64),
                "model_ll": joined([dataset.stats.model_ll for dataset in datasets], np.float64),
                "ll_gain": joined([dataset.scores.ll_gain for dataset in datasets], np.float64),
                **{
                    metric: joined([getattr(dataset.scores, metric) for dataset in datasets], np.float64)
                    for metric in CELL_METRICS
                },
                "status": joined([dataset.scores.status for dataset in datasets], object),
            },
            columns=CELL_COLUMNS,
        )

    @cached_property
    def groups(self) -> pd.DataFrame:
        """One row per group (`dataset` missing: over all datasets; `value` missing: the group null), every metric
        and the cells per status; empty without groups."""
        import pandas as pd

        rows = [{**record, **record["cells"]} for record in self._group_records()]
        return pd.DataFrame(rows, columns=GROUP_COLUMNS)

    def _group_records(self) -> list[dict[str, Any]]:
        """The JSON `groups` entries: dataset, column, value, cells per status, then every metric of a dataset."""
        if self.group_scores is None:
            return []
        return [
            {
                "dataset": group.dataset,
                "column": group.column,
                "value": group.value,
                "cells": dict(group.cells),
                **{metric: getattr(group.numbers, metric) for metric in DATASET_METRICS},
            }
            for group in self.group_scores.groups
        ]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `bpseval compute --json` (`run.document.run_document`), with None where a value is
        undefined, and the intervals and `groups` when the run has them."""
        document = run_document(self.scored, self.warnings)
        warnings = document.pop("warnings")  # groups come before the warnings, the interval settings after
        if self.group_scores is not None:
            document["groups"] = plain(self._group_records())
        document["warnings"] = warnings
        if self.intervals is not None:
            for entry in document["datasets"]:
                entry.update(plain(self.intervals.scope(entry["name"])))
            document["overall"].update(plain(self.intervals.scope(None)))
            document["ci"] = plain(self.intervals.settings.to_dict())
        return document

    def to_json(self) -> str:
        """`to_dict` as strict JSON (no NaN or Infinity), one line per dataset and per cell."""
        return json_text(self.to_dict())


STEP_COLUMNS = ["step", "world_size", *DATASET_METRICS, *STATUSES]


def steps_frame(steps: StepResults) -> pd.DataFrame:
    """One row per scored step: world size, the overall metrics, cells per status, then bps[dataset]."""
    import pandas as pd

    if not steps.results:
        return pd.DataFrame(columns=STEP_COLUMNS)
    return scored_frame(steps.results, key="step").sort_values("step", kind="stable").reset_index(drop=True)


def runs_frame(runs: dict[str, ScoredRun], sort: str = "run") -> pd.DataFrame:
    """One row per run: step, the overall metrics, cells per status, then each dataset's bps.

    `sort` is "run" (by name) or one of DATASET_METRICS (best first: the highest).
    """
    frame = scored_frame(runs, key="run").drop(columns="world_size")
    if sort == "run":
        return frame.sort_values("run", kind="stable").reset_index(drop=True)
    return frame.sort_values(sort, ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def scored_frame(runs: dict[Any, ScoredRun], key: str) -> pd.DataFrame:
    """One row per scored run, labelled `key` (run or step): step, world size, overall metrics and dataset bps."""
    import pandas as pd

    rows = []
    for label, scored in runs.items():
        row = {key: label, "step": scored.step, "world_size": scored.world_size}  # key "step" keeps one column
        row.update({metric: getattr(scored.overall, metric) for metric in DATASET_METRICS})
        row.update(scored.overall.cells)
        row.update({f"bps[{dataset.name}]": dataset.bps for dataset in scored.datasets})
        rows.append(row)
    return pd.DataFrame(rows)
