"""Regression attribution: each cell's part in the change of a metric between a run and its baseline.

Every metric is a sum over cells of a per-cell contribution, as its declaration in `kernel.metrics` says:

- a mean over a dataset's cells (bps, pseudo_r2, corr): value / n, over the n `ok` cells where the value is
  defined (the cell's clamped bps with `clamp_negative`);
- the overall mean of the datasets' means: value / (n_d · D), over the D datasets where it is defined;
- a pooled ratio over the covered cells: numerator / Σ denominator (ll_gain / (ln 2 · Σ spikes) for
  bps_pooled, (D_null − D_model) / Σ D_null for pseudo_r2_pooled).

The cells of the two sides are matched by dataset and cell id; the change of a cell's contribution is its
contribution in the run minus that in the baseline, and these changes add up to the change of the metric
(to rounding) whenever the metric is defined on both sides, whatever the cells' statuses: a cell that
takes part on one side only (it became silent, uncovered or low, or it is new) contributes on that side
only, and the change of n that it causes is spread over the other cells' contributions. A side whose
metric is undefined contributes nothing (the overall clamp of `clamp_negative` at 0 is not attributed).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bpseval.kernel.metrics import METRICS
from bpseval.run.scored import ScoredDataset, cell_pairs


@dataclass(frozen=True)
class CellContribution:
    """One cell's part in a metric on each side (0 where it takes no part)."""

    dataset: str
    cell: int | None
    """The cell's index in the run (None: only in the baseline)."""
    cell_id: Hashable
    status_base: str | None
    """None: the cell is not in the baseline."""
    status_new: str | None
    value_base: float
    """The cell's own score (bps, pseudo_r2 or corr; NaN where undefined)."""
    value_new: float
    base: float
    new: float

    @property
    def delta(self) -> float:
        return self.new - self.base

    @property
    def change(self) -> str | None:
        """What happened to the cell's status ("became silent", "only in the run", ...); None when unchanged."""
        if self.status_base == self.status_new:
            return None
        if self.status_new is None:
            return "only in the baseline"
        if self.status_base is None:
            return "only in the run"
        return f"became {self.status_new}"


@dataclass(frozen=True)
class GroupContribution:
    """The summed part of the cells of one group value (in one dataset, or in all: dataset None)."""

    dataset: str | None
    value: Hashable
    cells: int
    base: float
    new: float

    @property
    def delta(self) -> float:
        return self.new - self.base


@dataclass(frozen=True)
class Attribution:
    """The cells (and groups) of a metric's change, the most negative change first."""

    delta: float
    """The metric's change (NaN when it is undefined on a side: the shares are then undefined)."""
    cells: list[CellContribution]
    groups: list[GroupContribution]

    def share(self, part: CellContribution | GroupContribution) -> float:
        """The part's fraction of the metric's change (the shares add up to 1); NaN when that change is 0 or undefined."""
        return part.delta / self.delta if math.isfinite(self.delta) and self.delta != 0 else math.nan

    def to_dict(self) -> dict[str, object]:
        cells = [
            {
                "dataset": c.dataset,
                "cell": c.cell,
                "cell_id": c.cell_id,
                "status_baseline": c.status_base,
                "status_new": c.status_new,
                "change": c.change,
                "value_baseline": c.value_base,
                "value_new": c.value_new,
                "contribution_baseline": c.base,
                "contribution_new": c.new,
                "delta": c.delta,
                "share": self.share(c),
            }
            for c in self.cells
        ]
        groups = [
            {
                "dataset": g.dataset,
                "value": g.value,
                "cells": g.cells,
                "contribution_baseline": g.base,
                "contribution_new": g.new,
                "delta": g.delta,
                "share": self.share(g),
            }
            for g in self.groups
        ]
        return {"delta": self.delta, "cells": cells, "groups": groups}


def contributions(
    datasets: Sequence[ScoredDataset], metric: str, clamp_negative: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per dataset, each cell's contribution to `metric` over `datasets` and whether it takes part, as the metric's
    declaration (`kernel.metrics.METRICS`) defines them: they add up to the metric (to rounding), and nothing takes
    part where it is undefined."""
    return METRICS[metric].contributions([(dataset.scores, dataset.stats) for dataset in datasets], clamp_negative)


def attribute(
    new: Sequence[ScoredDataset],
    base: Sequence[ScoredDataset],
    metric: str,
    values: tuple[float, float],
    clamp_negative: tuple[bool, bool] = (False, False),
    groups: Mapping[tuple[str, str], Hashable] | None = None,
) -> Attribution:
    """Each cell's change of contribution to `metric` over the datasets `new` and `base` (the same names, in order).

    `values` is the metric on each side (new, base), `clamp_negative` each side's setting. Listed: every cell that takes part on either side or whose
    status changed. `groups` maps (dataset, str(cell_id)) to a group value (a cell it lacks is in the group
    None): the contributions are then also summed per (dataset, value), and per value over all datasets when
    there are several.
    """
    metric_value_of = METRICS[metric].cell_score
    sides = {
        "new": contributions(new, metric, clamp_negative[0]),
        "base": contributions(base, metric, clamp_negative[1]),
    }
    cells: list[CellContribution] = []
    for index, (dataset_new, dataset_base) in enumerate(zip(new, base, strict=True)):
        (part_new, in_new), (part_base, in_base) = sides["new"][index], sides["base"][index]
        ids_new, ids_base = dataset_new.cell_ids.tolist(), dataset_base.cell_ids.tolist()
        for j, i in cell_pairs(dataset_base, dataset_new):
            status_new = None if i is None else str(dataset_new.scores.status[i])
            status_base = None if j is None else str(dataset_base.scores.status[j])
            takes_part = (i is not None and in_new[i]) or (j is not None and in_base[j])
            if not takes_part and status_new == status_base:
                continue
            cells.append(
                CellContribution(
                    dataset=dataset_new.name,
                    cell=i,
                    cell_id=ids_new[i] if i is not None else ids_base[j],
                    status_base=status_base,
                    status_new=status_new,
                    value_base=math.nan if j is None else float(getattr(dataset_base.scores, metric_value_of)[j]),
                    value_new=math.nan if i is None else float(getattr(dataset_new.scores, metric_value_of)[i]),
                    base=0.0 if j is None else float(part_base[j]),
                    new=0.0 if i is None else float(part_new[i]),
                )
            )
    cells.sort(key=lambda cell: cell.delta)
    summed = [] if groups is None else _by_group(cells, groups, several=len(new) > 1)
    return Attribution(values[0] - values[1], cells, summed)


def _by_group(
    cells: list[CellContribution], groups: Mapping[tuple[str, str], Hashable], several: bool
) -> list[GroupContribution]:
    """The cells' contributions summed per (dataset, group value), and per value over all datasets when `several`."""
    sums: dict[tuple[str | None, Hashable], list[float]] = {}
    for cell in cells:
        value = groups.get((cell.dataset, str(cell.cell_id)))
        for dataset in (cell.dataset, None) if several else (cell.dataset,):
            entry = sums.setdefault((dataset, value), [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += cell.base
            entry[2] += cell.new
    summed = [GroupContribution(dataset, value, int(n), base, new) for (dataset, value), (n, base, new) in sums.items()]
    return sorted(summed, key=lambda group: group.delta)
