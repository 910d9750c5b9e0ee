"""Flat metrics for dashboards: JSON for one step, JSON Lines for every step, and TensorBoard event files.

Every format holds the same scalars as the Lightning callback logs, under the names `metric_keys`
declares (one list, used by `Result.metrics`, `compute --metrics`, `compute --tensorboard` and
`bpseval.lightning`), so a dashboard fed from shards after training shows what the callback logged
during it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from bpseval._json import json_text
from bpseval.errors import ArgumentError, MissingExtraError, install_hint
from bpseval.run.scored import SUMMARY_METRICS, ScoredRun

PREFIX = "val_"
"""The prefix of every dashboard metric: the Lightning callback logs validation numbers."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest magnitude a TensorBoard scalar (float32) holds."""
EVENT_FILE = "events.out.tfevents.bpseval.step-{step:06d}"
"""The one TensorBoard event file of a step in a `--tensorboard` folder: rewritten whole when the step is written
again, so that a step is never there twice. TensorBoard reads every file whose name holds `tfevents`."""


def metric_keys(datasets: Iterable[str], prefix: str = PREFIX) -> list[str]:
    """The names of the dashboard metrics of a run with these datasets, in the order they are written.

    `{prefix}<metric>_overall` for each summary metric (bps, bps_pooled, pseudo_r2, pseudo_r2_pooled,
    corr), then `{prefix}<metric>/<dataset>` for each dataset in turn. The Lightning callback logs
    exactly these keys every validation epoch (an undefined value as NaN); `--metrics`,
    `--tensorboard` and `Result.metrics()` write these keys, leaving out those whose value is undefined.

    Args:
        datasets: the dataset names, in the run's order (`["<dataset>"]` gives the patterns, for docs).
        prefix: put before every name.

    Returns:
        The keys.

    Example:
        >>> metric_keys(["A"])[:2], metric_keys(["A"])[5]
        (['val_bps_overall', 'val_bps_pooled_overall'], 'val_bps/A')
    """
    keys = [f"{prefix}{metric}_overall" for metric in SUMMARY_METRICS]
    for dataset in datasets:
        keys += [f"{prefix}{metric}/{dataset}" for metric in SUMMARY_METRICS]
    return keys


def dashboard_metrics(scored: ScoredRun, prefix: str = PREFIX, *, keep_undefined: bool = False) -> dict[str, float]:
    """A scored run's values under `metric_keys`, in that order.

    Args:
        scored: the run.
        prefix: as for `metric_keys`.
        keep_undefined: keep undefined values as NaN (for a logger whose monitors expect every key every epoch);
            by default they are left out (a dashboard would draw NaN as a gap or zero).

    Returns:
        Key to value, as Python floats.
    """
    sources = [scored.overall, *scored.datasets]
    values = [float(getattr(source, metric)) for source in sources for metric in SUMMARY_METRICS]
    keys = metric_keys((dataset.name for dataset in scored.datasets), prefix)
    return {key: value for key, value in zip(keys, values, strict=True) if keep_undefined or math.isfinite(value)}


def metrics_json(scored: ScoredRun) -> str:
    """One step's metrics as one JSON object (undefined values left out)."""
    return json_text(dashboard_metrics(scored))


def metrics_lines(runs: Iterable[ScoredRun]) -> str:
    """JSON Lines: one object per step, `{"step": ..., <metrics>}`, in the order given."""
    return "\n".join(json_text({"step": scored.step, **dashboard_metrics(scored)}) for scored in runs)


def require_tensorboard() -> None:
    """Refuse `--tensorboard` before any work when the `tensorboard` package is missing, naming the extra."""
    try:
        import tensorboard.summary  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            f"--tensorboard needs the tensorboard package, which cannot be imported ({error}):"
            f" {install_hint('tensorboard')}"
        ) from None


def write_tensorboard(runs: Iterable[ScoredRun], folder: str) -> list[str]:
    """Write each run's metrics to TensorBoard event files in `folder`, at its step; returns a warning line per
    point left out.

    Each step has one event file of its own (`EVENT_FILE`), written by TensorBoard's own writer
    (`tensorboard.summary.Writer`) in a hidden folder beside it and renamed into place: writing a step
    again replaces its points, so re-running `--tensorboard` on the same folder leaves every step once.
    Event files of other names (other programs', or written before this rule) are left as they are.
    Scalars are float32, which would make a value beyond float32's range (|value| > 3.4e38) ±inf: such
    a point is left out and named in the warnings, as an undefined value is left out (an undefined
    number is never shown as one).

    Raises:
        ArgumentError: naming `folder` when it cannot be written.
    """
    from tensorboard.summary import Writer

    warnings = []
    try:
        os.makedirs(folder, exist_ok=True)
        for scored in runs:
            staging = tempfile.mkdtemp(prefix=".bpseval-tensorboard-", dir=folder)
            try:
                writer = Writer(staging)
                try:
                    for tag, value in dashboard_metrics(scored).items():
                        if abs(value) > FLOAT32_MAX:
                            warnings.append(
                                f"--tensorboard: {tag} = {value:.6g} at step {scored.step} is beyond the float32"
                                " range of TensorBoard's scalars, so it is not written there (--metrics and --json"
                                " hold it)"
                            )
                            continue
                        writer.add_scalar(tag, value, step=scored.step)
                finally:
                    writer.close()
                (written,) = Path(staging).iterdir()  # the writer's one file, named by time, host and process
                os.replace(written, Path(folder) / EVENT_FILE.format(step=scored.step))
            finally:
                with contextlib.suppress(OSError):
                    shutil.rmtree(staging)
    except OSError as error:
        raise ArgumentError(
            f"{folder}: TensorBoard event files cannot be written there ({error.strerror or error}); pass a folder"
            " you can write to."
        ) from None
    return warnings
