"""Predict per-cell coverage of a validation split before training (`bpseval plan`).

`check_cell_coverage` replays what `torch.utils.data.DistributedSampler` (padding, stride over
ranks, optional seeded shuffle) and a Lightning-style `limit_val_batches` fraction select, and
counts the valid samples each cell gets, in total and on each rank.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from bpseval._arrays import to_numpy
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.run.scored import Exclusions
from bpseval.shard.format import FORMAT

if TYPE_CHECKING:
    import pandas as pd

MAX_WORLD_SIZE = 1 << 16
"""Largest world size `plan` predicts for: the per-rank table has one column per rank, so far beyond
any real validation job it would only exhaust memory (a typo such as 10**9 must fail at once)."""
MASK_KINDS = "biuf"
"""numpy dtype kinds a mask may have: bool, integers, floats."""
KIND_NAMES = {
    "c": "complex numbers",
    "U": "text",
    "S": "bytes",
    "O": "Python objects",
    "V": "records",
    "M": "dates",
    "m": "durations",
}


def distributed_sampler_indices(
    n_samples: int, world_size: int, rank: int, *, seed: int | None = None, epoch: int = 0
) -> np.ndarray:
    """The indices `DistributedSampler(num_replicas=world_size, rank=rank, drop_last=False)` yields.

    `seed=None` means `shuffle=False`; otherwise `shuffle=True` with that seed (torch's own
    generator is used, so torch is imported only then).
    """
    return _padded_order(n_samples, world_size, seed, epoch)[rank::world_size]


def _padded_order(n_samples: int, world_size: int, seed: int | None, epoch: int) -> np.ndarray:
    """The order `DistributedSampler` deals out, padded to a multiple of `world_size`: rank r gets `[r::world_size]`."""
    if seed is None:
        order = np.arange(n_samples)
    else:
        from bpseval._distributed import require_torch

        torch = require_torch("DistributedSampler(shuffle=True) order (plan --seed)")
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(n_samples, generator=generator).numpy()
    total = math.ceil(n_samples / world_size) * world_size
    if n_samples and total > n_samples:
        order = np.resize(order, total)  # padding repeats from the start, as DistributedSampler does
    return order


def limited_batches(n_batches: int, fraction: float) -> int:
    """How many batches Lightning's `limit_val_batches=fraction` keeps (it refuses 0 of a non-empty loader)."""
    kept = int(n_batches * fraction)
    if kept == 0 and n_batches > 0:
        raise BpsevalError(
            f"--fraction {fraction} of {n_batches} batches per rank keeps no batch (Lightning refuses this);"
            f" use a fraction of at least {1.0 / n_batches:.4g} or smaller batches."
        )
    return kept


def check_cell_coverage(
    dfs: Any,
    *,
    world_size: int = 1,
    fraction: float = 1.0,
    batch_size: int | None = None,
    min_samples: int = 10,
    seed: int | None = None,
    epoch: int = 0,
) -> pd.DataFrame:
    """Predict how many valid samples each cell gets in a distributed validation pass.

    `dfs` is one dataset's validation mask ((N, C), (N, 1) or (N,); numpy or torch); entries
    > 0 are valid. The split is the standard `DistributedSampler` (`seed=None`: no shuffle),
    batched by `batch_size` (None: one batch per sample) and limited to the first
    `int(fraction * batches)` batches per rank, as Lightning's `limit_val_batches` does.

    Args:
        dfs: the mask.
        world_size: ranks of the validation job.
        fraction: the share of the batches kept (`limit_val_batches` as a fraction).
        batch_size: the validation batch size (None: one sample per batch).
        min_samples: a cell with fewer valid samples than this is `below`.
        seed: the sampler's seed (None: no shuffle).
        epoch: the sampler's epoch (with a seed).

    Returns:
        One row per cell: `n_valid` (distinct samples, padding duplicates counted once, as `bpseval
        compute` counts them), `rank_<r>` (the valid samples rank r sees, its padding copies included: the
        count `bpseval coverage` reports per rank, `MergedDataset.rank_valid`), `zero_ranks`
        (ranks with no valid sample: the condition that crashed legacy loops) and `below` (n_valid <
        min_samples). The cells below are `frame[frame.below]`.

    Example:
        >>> import numpy as np
        >>> from bpseval import check_cell_coverage
        >>> cells = check_cell_coverage(np.array([[1, 1], [1, 0], [1, 0], [1, 1]]), world_size=2, min_samples=3)
        >>> cells[["n_valid", "rank_0", "rank_1", "below"]].values.tolist()
        [[4, 2, 2, False], [2, 1, 1, True]]
    """
    import pandas as pd

    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ArgumentError(
            f"--world-size {world_size} is out of range: give the number of ranks of the validation job,"
            f" between 1 and {MAX_WORLD_SIZE}."
        )
    if not 0.0 < fraction <= 1.0:
        raise ArgumentError(f"fraction must be in (0, 1], got {fraction}")
    if batch_size is not None and batch_size < 1:
        raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
    mask = valid_mask(dfs)
    n_samples, n_cells = mask.shape
    order = _padded_order(n_samples, world_size, seed, epoch)
    per_rank = len(order) // world_size  # every rank gets as many indices, so keeps as many batches
    n_batches = math.ceil(per_rank / (batch_size or 1))
    kept_rows = min(per_rank, limited_batches(n_batches, fraction) * (batch_size or 1))
    kept = order[: kept_rows * world_size].reshape(kept_rows, world_size)  # column r: what rank r sees, in order
    per_rank_counts = mask[kept].sum(axis=0, dtype=np.int64)  # (ranks, cells)
    seen = np.zeros(n_samples, dtype=bool)
    seen[kept] = True
    ranks = {f"rank_{rank}": per_rank_counts[rank] for rank in range(world_size)}
    frame = pd.DataFrame({"cell": np.arange(n_cells), "n_valid": mask[seen].sum(axis=0), **ranks})
    frame["zero_ranks"] = [list(np.flatnonzero(per_rank_counts[:, cell] == 0)) for cell in range(n_cells)]
    frame["below"] = frame["n_valid"] < min_samples
    return frame


def valid_mask(dfs: Any) -> np.ndarray:
    """A boolean (N, C) mask of valid entries from an (N, C), (N, 1) or (N,) array of weights."""
    values = to_numpy(dfs)
    if values.dtype.kind not in MASK_KINDS:
        raise ArgumentError(f"a mask must hold real numbers (bool, int or float), not {_kind_name(values.dtype)}")
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    if values.ndim != 2:
        raise ArgumentError(f"a mask must have shape (samples, cells), (samples, 1) or (samples,); got {values.shape}")
    with np.errstate(invalid="ignore"):
        return np.asarray(values > 0)


def _kind_name(dtype: np.dtype) -> str:
    return KIND_NAMES.get(dtype.kind, f"dtype {dtype}")


def load_masks(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Validation masks from a `.npy` file (one dataset, named after the file) or an HDF5 file.

    In an HDF5 file every 1-D or 2-D array of real numbers is one dataset's mask, named by its
    path; other arrays are passed over, except complex ones, which can only be a mistake. A
    bpseval shard is refused: its coverage is what `bpseval coverage` measures.
    """
    source = Path(path)
    if source.is_dir():
        raise BpsevalError(
            f"{source}: is a directory, not a file. Pass the mask file (.npy or HDF5); for the shards of a run,"
            " use `bpseval coverage RUN_DIR`."
        )
    if not source.is_file():
        what = "no such file" if not source.exists() else "not a regular file"
        raise BpsevalError(f"{source}: {what}. Pass a .npy or HDF5 file of validation masks.")
    if source.suffix == ".npy":
        try:
            mask = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise BpsevalError(
                f"{source}: cannot be read as a .npy array of numbers ({error}). Save the mask with"
                " np.save as a bool, int or float array."
            ) from None
        if mask.dtype.kind not in MASK_KINDS:
            raise BpsevalError(
                f"{source}: holds {_kind_name(mask.dtype)}, not a mask; save it as a bool, int or float array"
                " (entries > 0 are valid)."
            )
        return {source.stem: mask}
    masks: dict[str, np.ndarray] = {}

    def collect(name: str, item: Any) -> None:
        if not isinstance(item, h5py.Dataset) or item.ndim not in (1, 2):
            return
        if item.dtype.kind == "c":
            raise BpsevalError(f"{source}: array {name!r} holds complex numbers; a mask holds real numbers.")
        if item.dtype.kind in MASK_KINDS:
            masks[name] = item[()]

    try:
        with h5py.File(source, "r") as handle:
            declared = handle.attrs.get("format")
            if isinstance(declared, (str, bytes)) and declared in (FORMAT, FORMAT.encode()):
                raise BpsevalError(
                    f"{source}: is a bpseval shard, not a file of validation masks. `bpseval plan` predicts coverage"
                    " before training; to measure the coverage of shards, use `bpseval coverage RUN_DIR`."
                )
            handle.visititems(collect)
    except OSError as error:
        raise BpsevalError(f"{source}: cannot be read as .npy or HDF5 ({str(error).splitlines()[0]}).") from None
    if not masks:
        raise BpsevalError(f"{source}: holds no 1-D or 2-D array of real numbers to use as a mask.")
    return masks


def exclude_from_plans(plans: dict[str, pd.DataFrame], exclusions: Exclusions) -> list[str]:
    """Mark the cells of `exclusions` in `plans` (in place): their `excluded` column holds the reason ("" for none,
    None for a cell not excluded), and they are never `below` nor flagged for a rank without samples.

    Returns:
        The lines that say which cells were excluded, and which rows of the table name no cell of the masks.

    Raises:
        ArgumentError: a table of cell ids, which masks do not have (they know cells by index).
    """
    if exclusions.by != "cell":
        raise ArgumentError(
            f"--exclude-cells {exclusions.source}: plan knows the cells of a mask by their index; give the table a"
            " 'cell' column (0-based index within its dataset) instead of 'cell_id'."
        )
    for name, frame in plans.items():
        reasons = exclusions.reasons(name, frame["cell"].to_numpy())
        excluded = frame["cell"].isin(list(reasons))
        frame["excluded"] = [reasons.get(cell) for cell in frame["cell"].tolist()]
        frame.loc[excluded, "below"] = False
        frame["zero_ranks"] = [[] if out else ranks for out, ranks in zip(excluded, frame["zero_ranks"], strict=True)]
    return exclusions.lines([(name, frame["cell"].to_numpy()) for name, frame in plans.items()])


def plan_to_dict(plans: dict[str, pd.DataFrame], settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of `bpseval plan --json`: settings, then per mask its flagged cells."""
    datasets = []
    for name, frame in plans.items():
        rank_columns = [column for column in frame.columns if column.startswith("rank_")]
        flagged = frame[frame["below"] | (frame["zero_ranks"].map(len) > 0)]
        datasets.append(
            {
                "name": name,
                "cells": len(frame),
                "below": int(frame["below"].sum()),
                "min_n_valid": int(frame["n_valid"].min()) if len(frame) else 0,
                "flagged": [
                    {
                        "cell": int(row["cell"]),
                        "n_valid": int(row["n_valid"]),
                        "per_rank": [int(row[column]) for column in rank_columns],
                        "zero_ranks": [int(rank) for rank in row["zero_ranks"]],
                        "below": bool(row["below"]),
                    }
                    for _, row in flagged.iterrows()
                ],
                "excluded": [
                    {"cell": int(row["cell"]), "reason": row["excluded"]}
                    for _, row in frame.iterrows()
                    if isinstance(row.get("excluded"), str)
                ],
            }
        )
    return {**settings, "datasets": datasets}
