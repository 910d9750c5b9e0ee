"""Flat metrics for dashboards: JSON for one step, JSON Lines for every step, and TensorBoard event files.

Every format holds the same scalars, `Result.metrics` (the Lightning callback's names), so a
dashboard fed from shards after training shows what the callback logged during it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bpseval._json import json_text
from bpseval.errors import ArgumentError, MissingExtraError
from bpseval.run.scored import ScoredRun
from bpseval.views.result import Result

PREFIX = "val_"
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest magnitude a TensorBoard scalar (float32) holds."""


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


def write_tensorboard(runs: Iterable[ScoredRun], folder: str) -> list[str]:
    """Add each run's metrics to a new TensorBoard event file in `folder`, at its step; returns a warning line per
    point left out.

    TensorBoard's own writer (`tensorboard.summary.Writer`) stores them as float32 scalars, in a file of its
    own naming (the one command output not written through `write_output`), which would make a value beyond
    float32's range (|value| > 3.4e38) ±inf: such a point is left out and named in the warnings, as an
    undefined value is left out (an undefined number is never shown as one). Raises ArgumentError naming
    `folder` when it cannot be written.
    """
    from tensorboard.summary import Writer

    warnings = []
    try:
        writer = Writer(str(folder))
        try:
            for scored in runs:
                for tag, value in Result(scored).metrics(PREFIX).items():
                    if abs(value) > FLOAT32_MAX:
                        warnings.append(
                            f"--tensorboard: {tag} = {value:.6g} at step {scored.step} is beyond the float32 range"
                            " of TensorBoard's scalars, so it is not written there (--metrics and --json hold it)"
                        )
                        continue
                    writer.add_scalar(tag, value, step=scored.step)
        finally:
            writer.close()
    except OSError as error:
        raise ArgumentError(
            f"{folder}: TensorBoard event files cannot be written there ({error.strerror or error}); pass a folder"
            " you can write to."
        ) from None
    return warnings
