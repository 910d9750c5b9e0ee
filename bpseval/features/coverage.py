"""Coverage of a merged run: valid samples per cell, in total and per rank (`bpseval coverage`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bpseval._json import plain
from bpseval.features.groups import load_exclusions
from bpseval.kernel.stats import EXCLUDED, SILENT, UNCOVERED
from bpseval.run.merge import merge_run
from bpseval.run.scored import ScoredDataset, ScoredRun, ScoreSettings, score_run

if TYPE_CHECKING:
    import pandas as pd

DATASET_COLUMNS = ["name", "cells", "below", "uncovered", "silent", "excluded", "min_n_valid"]
CELL_COLUMNS = ["dataset", "cell", "cell_id", "n_valid", "spikes", "per_rank", "status", "reasons"]
ZERO_RANK_COLUMNS = ["dataset", "cell", "cell_id", "n_valid", "per_rank", "ranks_without"]
EXCLUDED_COLUMNS = ["dataset", "cell", "cell_id", "n_valid", "per_rank", "reason"]


@dataclass
class CoverageReport:
    """Per-dataset coverage summary, the cells that fail the thresholds, and the cells with no valid sample on
    some rank (`zero_on_some_rank`: what crashed legacy per-rank validation loops, listed whatever the thresholds)."""

    min_samples: int
    min_spikes: float | None
    step: int
    world_size: int
    datasets: pd.DataFrame
    cells: pd.DataFrame
    zero_on_some_rank: pd.DataFrame
    excluded: pd.DataFrame | None = None
    """The cells left out on purpose (`--exclude-cells`), with their reasons: in no threshold and no list above."""
    warnings: list[str] = field(default_factory=list)
    """What the merge said (steps passed over, files skipped, ...): said, never dropped."""

    @property
    def passed(self) -> bool:
        """True when no cell falls below the thresholds."""
        return self.cells.empty

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `bpseval coverage --json`."""
        return plain(
            {
                "min_samples": self.min_samples,
                "min_spikes": self.min_spikes,
                "step": self.step,
                "world_size": self.world_size,
                "datasets": self.datasets.to_dict(orient="records"),
                "cells": self.cells.to_dict(orient="records"),
                "zero_on_some_rank": self.zero_on_some_rank.to_dict(orient="records"),
                "excluded": [] if self.excluded is None else self.excluded.to_dict(orient="records"),
                "warnings": self.warnings,
            }
        )


def coverage_report(
    run: ScoredRun,
    min_samples: int,
    min_spikes: float | None = None,
) -> CoverageReport:
    """Flag every cell with fewer than `min_samples` valid samples (or `min_spikes` spikes), and list every cell
    that some rank saw no valid sample of. Per rank, the valid samples it saw, padding copies included
    (`ScoredDataset.rank_valid`, what `bpseval plan` predicts); where that is not known, each rank's scored samples.

    Args:
        run: the scored step.
        min_samples: a cell with fewer valid samples (in total, each sample once) is below.
        min_spikes: also below: a cell with fewer spikes than this.

    Returns:
        The report.
    """
    import pandas as pd

    summaries, flagged, zero_ranks, excluded = [], [], [], []
    exclusions = run.settings.exclusions
    for dataset in run.datasets:
        total = dataset.stats
        status = dataset.scores.status
        left_out = status == EXCLUDED
        if dataset.rank_valid is not None:
            per_rank = dataset.rank_valid.T
        else:
            per_rank = np.stack([stats.n_valid for stats in dataset.per_rank], axis=1)
        below = (total.n_valid < min_samples) & ~left_out
        few_spikes = (total.spikes < min_spikes) & ~left_out if min_spikes is not None else np.zeros_like(below)
        summaries.append(
            {
                "name": dataset.name,
                "cells": len(status),
                "below": int(below.sum()),
                "uncovered": int((status == UNCOVERED).sum()),
                "silent": int((status == SILENT).sum()),
                "excluded": int(left_out.sum()),
                "min_n_valid": int(total.n_valid[~left_out].min()) if (~left_out).any() else 0,
            }
        )
        for cell in np.flatnonzero(below | few_spikes).tolist():
            reasons = ["below_min_samples"] * bool(below[cell]) + ["below_min_spikes"] * bool(few_spikes[cell])
            fields = {"spikes": float(total.spikes[cell]), "status": str(status[cell]), "reasons": reasons}
            flagged.append(_cell_row(dataset, cell, per_rank, **fields))
        why = {} if exclusions is None else exclusions.reasons(dataset.name, dataset.cell_ids)
        excluded += [
            _cell_row(dataset, cell, per_rank, reason=why.get(cell, "")) for cell in np.flatnonzero(left_out).tolist()
        ]
        without = (per_rank == 0) & ~left_out[:, None]
        for cell in np.flatnonzero(without.any(axis=1)).tolist():
            zero_ranks.append(_cell_row(dataset, cell, per_rank, ranks_without=np.flatnonzero(without[cell]).tolist()))
    return CoverageReport(
        min_samples=min_samples,
        min_spikes=min_spikes,
        step=run.step,
        world_size=run.world_size,
        datasets=pd.DataFrame(summaries, columns=DATASET_COLUMNS),
        cells=pd.DataFrame(flagged, columns=CELL_COLUMNS),
        zero_on_some_rank=pd.DataFrame(zero_ranks, columns=ZERO_RANK_COLUMNS),
        excluded=pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS),
        warnings=list(run.warnings),
    )


def _cell_row(dataset: ScoredDataset, cell: int, per_rank: np.ndarray, **fields: Any) -> dict[str, Any]:
    """The fields every listed cell has (which cell, its valid samples in total and per rank), plus `fields`."""
    return {
        "dataset": dataset.name,
        "cell": cell,
        "cell_id": dataset.cell_ids[cell],
        "n_valid": int(dataset.stats.n_valid[cell]),
        "per_rank": per_rank[cell].tolist(),
        **fields,
    }


def check_coverage(
    run_dir: str | os.PathLike[str],
    min_samples: int,
    *,
    step: int | None = None,
    min_spikes: float | None = None,
    exclude_cells: str | os.PathLike[str] | None = None,
    **merge_options: Any,
) -> CoverageReport:
    """Merge one step of `run_dir` (default: the latest) and report which cells have too few valid samples.

    Args:
        run_dir: the run directory.
        min_samples: a cell with fewer valid samples than this is below.
        step: the step (None: the latest complete one).
        min_spikes: also below: a cell with fewer spikes than this.
        exclude_cells: a table of cells to leave out (`--exclude-cells`): listed as excluded, never below.
        merge_options: to `merge_run` (`jobs`, `scheduler`, `cache`, ...).

    Returns:
        Per dataset the cells below, uncovered and silent; the cells below; those without a valid
        sample on some rank (the legacy crash), with their per-rank counts: the valid samples each rank
        saw, padding copies included, as `bpseval plan` predicts them (`MergedDataset.rank_valid`).

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from bpseval import ShardWriter, check_coverage
        >>> with tempfile.TemporaryDirectory() as run:
        ...     for rank in range(2):
        ...         with ShardWriter(run, rank=rank, world_size=2) as shards:
        ...             shards.add("session", np.full((3, 2), 0.5), np.ones((3, 2)), sample_idx=np.arange(rank, 6, 2))
        ...     report = check_coverage(run, min_samples=10, cache=False)
        >>> report.datasets[["name", "cells", "below", "min_n_valid"]].values.tolist()
        [['session', 2, 2, 6]]
    """
    settings = ScoreSettings(exclusions=load_exclusions(exclude_cells))
    merged = merge_run(run_dir, step, **merge_options)
    return coverage_report(score_run(merged, settings), min_samples, min_spikes)
