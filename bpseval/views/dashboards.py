"""Flat metrics for dashboards: JSON for one step, JSON Lines for every step, and TensorBoard event files.

Every format holds the same scalars, `Result.metrics` (the Lightning callback's names), so a
dashboard fed from shards after training shows what the callback logged during it.
"""

from __future__ import annotations

from collections.abc import Iterable

from bpseval._json import json_text
from bpseval.errors import MissingExtraError
from bpseval.run.scored import ScoredRun
from bpseval.views.result import Result

PREFIX = "val_"


def metrics_json(scored: ScoredRun) -> str:
    """One step's metrics as one JSON object (undefined values left out)."""
    return json_text(Result(scored).metrics(PREFIX))


def metrics_lines(runs: Iterable[ScoredRun]) -> str:
    """JSON Lines: one object per step, `{"step": ..., <metrics>}`, in the order given."""
    return "\n".join(json_text({"step": scored.step, **Result(scored).metrics(PREFIX)}) for scored in runs)


def require_tensorboard() -> None:
    """Refuse `--tensorboard` before any work when the `tensorboard` package is missing, naming the extra."""
    try:
        import tensorboard.summary  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            f"--tensorboard needs the tensorboard package, which cannot be imported ({error}):"
            " pip install 'bpseval[tensorboard]'"
        ) from None


def write_tensorboard(runs: Iterable[ScoredRun], folder: str) -> int:
    """Add each run's metrics to a new TensorBoard event file in `folder`, at its step; returns the points written.

    TensorBoard's own writer (`tensorboard.summary.Writer`) stores them as float32 scalars.
    """
    from tensorboard.summary import Writer

    writer = Writer(str(folder))
    points = 0
    try:
        for scored in runs:
            for tag, value in Result(scored).metrics(PREFIX).items():
                writer.add_scalar(tag, value, step=scored.step)
                points += 1
    finally:
        writer.close()
    return points
