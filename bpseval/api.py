"""The Python entry points: `Result`, what they return; `evaluate` a run directory; `bits_per_spike` in memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bpseval._arrays import to_numpy
from bpseval.errors import ArgumentError
from bpseval.features.groups import group_run, grouping_table, load_exclusions
from bpseval.features.uncertainty import DEFAULT_BLOCKS, DEFAULT_RESAMPLES, DEFAULT_SEED, IntervalSettings, intervals
from bpseval.kernel.batch import Batch
from bpseval.kernel.stats import InvalidValuesError, batch_stats, cell_scores
from bpseval.run.document import check_document, scored_from_document
from bpseval.run.merge import merge_run
from bpseval.run.scored import ScoreSettings, score_run
from bpseval.views.dashboards import PREFIX, dashboard_metrics
from bpseval.views.frames import RunFrames

if TYPE_CHECKING:
    import pandas as pd


class Result(RunFrames):
    """What `bpseval compute` reports: `overall` (typed), and the `datasets` and `cells` frames.

    Returned by `evaluate`, `DistributedBPS.compute` and the Lightning callback. Undefined values are NaN in
    the frames and null in JSON. `groups` (`--cells` and `--group-by`) adds the `groups` frame and the JSON
    `groups` list; `intervals`, the bootstrap intervals of `compute --ci` (`evaluate(ci=...)`), None when not
    asked for. Every figure of `bpseval.views.plot` takes one.

    Args:
        scored: the scored run.
        groups: every metric per group of cells, when asked for.
        intervals: the bootstrap intervals, when asked for.

    Example:
        >>> import numpy as np
        >>> from bpseval.torch import DistributedBPS
        >>> metric = DistributedBPS()
        >>> metric.update("session", np.ones((2, 2)), np.array([[0.0, 2.0], [1.0, 0.0]]))
        >>> result = metric.compute(step=3)
        >>> result.step, list(result.datasets["name"]), sorted(result.metrics("val_"))[:2]
        (3, ['session'], ['val_bps/session', 'val_bps_overall'])
    """

    def __repr__(self) -> str:
        return f"Result(step={self.step}, datasets={len(self.scored.datasets)}, bps={self.overall.bps:.4f})"

    def metrics(self, prefix: str = PREFIX, *, keep_undefined: bool = False) -> dict[str, float]:
        """The headline numbers as one flat dict for dashboards and loggers, under the Lightning callback's names.

        Args:
            prefix: put before every key.
            keep_undefined: keep undefined values as NaN (for a logger whose monitors expect every key every
                epoch), instead of leaving them out (a dashboard would draw NaN as a gap or zero).

        Returns:
            `bpseval.views.dashboards.metric_keys` of this run's datasets and their values:
            `{prefix}<metric>_overall` for each summary metric, then `{prefix}<metric>/<dataset>`.
        """
        return dashboard_metrics(self.scored, prefix, keep_undefined=keep_undefined)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Result:
        """A Result back from its JSON document (`to_dict`), numbers as they were written; null becomes NaN.

        Args:
            document: the JSON document of `bpseval compute --json` (or a baseline).

        Returns:
            The Result, without per-rank or per-block statistics.

        Raises:
            BaselineError: a document that no run could produce, naming what is wrong.
        """
        check_document(document, Path("the document given to Result.from_dict"))
        return cls(scored_from_document(document))


def evaluate(
    run_dir: str | os.PathLike[str],
    step: int | None = None,
    *,
    clamp_negative: bool = False,
    min_samples: int = 0,
    cells: str | os.PathLike[str] | None = None,
    group_by: str | None = None,
    ci: float | None = None,
    ci_over: str = "blocks",
    ci_resamples: int = DEFAULT_RESAMPLES,
    ci_seed: int = DEFAULT_SEED,
    exclude_cells: str | os.PathLike[str] | None = None,
    **merge_options: Any,
) -> Result:
    """Merge the shards of one step of `run_dir` (default: the latest complete one) and score them exactly.

    Args:
        run_dir: the run directory; shards are found in it and below it.
        step: the step to merge (None: the latest complete one, passing over a newer incomplete step).
        clamp_negative: reproduce legacy loops, which clamped each cell's bps at 0 before the means.
        min_samples: cells that would be ok with fewer valid samples are `low`: left out of the means,
            kept in bps_pooled.
        cells: a cell table (CSV) whose column `group_by` groups the cells (`Result.groups`).
        group_by: that column.
        ci: a level (e.g. 0.95): bootstrap intervals of every summary number (`Result.intervals`).
        ci_over: resample "blocks" of samples (`blocks` per dataset of raw shards, default 100) or "cells".
        ci_resamples: how many resamples.
        ci_seed: their seed.
        exclude_cells: a table of cells (CSV: dataset, cell or cell_id, and an optional reason) to leave out of
            every number; they are `excluded` in the cells frame, and the warnings name them.
        merge_options: to `merge_run`: `jobs`, `scheduler`, `on_progress`, `blocks`, `cache`.

    Returns:
        The scored step: its numbers per cell, per dataset and overall, as frames and as JSON.

    Raises:
        BpsevalError: for a run that cannot be scored exactly (a rank missing, a damaged shard, ...),
            naming what is wrong.

    Example:
        >>> from pathlib import Path
        >>> import bpseval
        >>> run = Path(bpseval.__file__).parents[1] / "examples" / "runs" / "exp1"
        >>> result = bpseval.evaluate(run, cache=False)
        >>> result.step, result.world_size, round(result.overall.bps, 6)
        (4, 2, 0.182477)
    """
    exclusions = load_exclusions(exclude_cells)  # checked before the merge
    settings = ScoreSettings(clamp_negative=clamp_negative, min_samples=min_samples, exclusions=exclusions)
    table = grouping_table(cells, group_by)
    wanted = None if ci is None else IntervalSettings(ci, ci_over, ci_resamples, ci_seed)
    if wanted is not None and wanted.over == "blocks":
        merge_options.setdefault("blocks", DEFAULT_BLOCKS)
    scored = score_run(merge_run(run_dir, step, **merge_options), settings)
    return Result(
        scored,
        None if table is None or group_by is None else group_run(scored, table, group_by),
        None if wanted is None else intervals(scored, wanted),
    )


IN_MEMORY = "in-memory arrays"
"""The dataset name that `bits_per_spike`'s messages give its arrays."""


def bits_per_spike(rhat: Any, robs: Any, dfs: Any = None, *, rate_kind: str = "rate") -> pd.DataFrame:
    """Exact per-cell bits per spike of in-memory arrays (numpy or torch, shape (samples, cells)).

    Same code path as `bpseval compute`; the arguments are checked by the batch contract
    (`bpseval.kernel.batch`) as the writer and the online metric check them, and messages name the
    data `IN_MEMORY`.

    Args:
        rhat: predicted rates (log-rates with `rate_kind="log_rate"`), (samples, cells).
        robs: observed spike counts, the same shape.
        dfs: the validity mask, (samples, cells), (samples, 1) or (samples,); None: every entry is valid.
        rate_kind: "rate" or "log_rate".

    Returns:
        One row per cell: cell, n_valid, n, spikes, model_ll, ll_gain, bps, pseudo_r2, corr, status.
        bps is NaN for silent, uncovered and overflow cells; pseudo_r2 and corr also where a side is constant.

    Raises:
        ArgumentError: for arguments the batch contract refuses, or values no likelihood takes (at a valid entry).

    Example:
        >>> import numpy as np
        >>> from bpseval import bits_per_spike
        >>> robs = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
        >>> cells = bits_per_spike(np.array([[0.5, 0.9], [1.5, 0.1], [1.0, 0.1]]), robs)
        >>> cells["status"].tolist(), cells["bps"].round(4).tolist()
        (['ok', 'ok'], [0.39, 1.2887])
    """
    import pandas as pd

    batch = Batch.of(IN_MEMORY, rhat, robs, dfs, rate_kind=rate_kind)
    rhat_np, robs_np = to_numpy(batch.rhat), to_numpy(batch.robs)
    weights = None if batch.weights is None else to_numpy(batch.weights)
    try:
        stats = batch_stats(rhat_np, robs_np, weights, rate_kind)
    except InvalidValuesError as error:
        raise ArgumentError(f"dataset {IN_MEMORY!r}: {error}") from None
    scores = cell_scores(stats)
    return pd.DataFrame(
        {
            "cell": np.arange(stats.n_cells),
            "n_valid": stats.n_valid,
            "n": stats.weight,
            "spikes": stats.spikes,
            "model_ll": stats.model_ll,
            "ll_gain": scores.ll_gain,
            "bps": scores.bps,
            "pseudo_r2": scores.pseudo_r2,
            "corr": scores.corr,
            "status": scores.status.astype(object),
        }
    )
