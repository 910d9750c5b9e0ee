"""Flat metrics for dashboards: JSON for one step, JSON Lines for every step, and TensorBoard event files.

Every format holds the same scalars, `Result.metrics` (the Lightning callback's names), so a
dashboard fed from shards after training shows what the callback logged during it.
"""

from __future__ import annotations

from collections.abc import Iterable

from bpseval._json import json_text
from bpseval.errors import ArgumentError, MissingExtraError
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

    TensorBoard's own writer (`tensorboard.summary.Writer`) stores them as float32 scalars, in
    a file of its own naming: the one command output not written through `write_output`. Raises
    ArgumentError naming `folder` when it cannot be written.
    """
    from tensorboard.summary import Writer

    points = 0
    try:
        writer = Writer(str(folder))
        try:
            for scored in runs:
                for tag, value in Result(scored).metrics(PREFIX).items():
                    writer.add_scalar(tag, value, step=scored.step)
                    points += 1
        finally:
            writer.close()
    except OSError as error:
        raise ArgumentError(
            f"{folder}: TensorBoard event files cannot be written there ({error.strerror or error}); pass a folder"
            " you can write to."
        ) from None
    return points
