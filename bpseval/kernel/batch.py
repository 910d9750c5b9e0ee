"""The batch contract: what every path that takes a batch of predictions checks, in one place.

`ShardWriter.add`, `DistributedBPS.update`, `bits_per_spike` and the Lightning callback take the
same arguments: a dataset name, rhat and robs (samples, cells), an optional mask dfs, sample
indices and cell ids, and a rate kind. Each of them converts and checks those here, so that a
batch one path refuses is refused by every path, with the same message:

- names: printable, no path separators, not `.` or `..`;
- shapes: rhat and robs (samples, cells), dfs (samples, cells), (samples, 1) or (samples,);
- dtypes: rhat floating point (or integer), robs and dfs numeric;
- sample_idx: integers in [0, 2^63 − 1], never wrapped or truncated;
- cell_ids: integers (whole floats accepted) or strings, never truncated;
- values (`check_values`): finite non-negative rates (finite log-rates up to `MAX_LOG_RATE`),
  finite non-negative counts, dfs in [0, 1], at every valid entry;
- a dataset's later batches follow its first (`BatchLayout.check_follows`).

Numpy arrays and torch tensors (on any device) alike; nothing here imports torch or waits for a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from bpseval._arrays import is_tensor, to_numpy
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.kernel.stats import RATE_KINDS, InvalidValuesError, as_weights, validated_values

INT64_MAX = int(np.iinfo(np.int64).max)


def check_dataset_name(name: Any) -> None:
    """Dataset names become HDF5 group names and table rows: no path separators, no control characters.

    `.` and `..` are refused too: in HDF5 they name the group itself and its parent, not a new group.

    Raises:
        ArgumentError: naming the name and the rule.
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or not name.isprintable():
        raise ArgumentError(f"dataset name must be a non-empty printable string without '/' or '\\', not {name!r}")
    if name in (".", ".."):
        raise ArgumentError(f"dataset name {name!r} is not allowed: HDF5 reads it as a path; give the session's name")


def check_rate_kind(dataset: str, rate_kind: Any) -> None:
    """Raise ArgumentError unless `rate_kind` is one of `RATE_KINDS`."""
    if rate_kind not in RATE_KINDS:
        raise ArgumentError(f"dataset {dataset!r}: rate_kind must be one of {RATE_KINDS}, not {rate_kind!r}")


def check_shapes(dataset: str, rhat: Any, robs: Any) -> tuple[int, int]:
    """(samples, cells) of a batch whose rhat and robs are both 2-D of one shape; else ArgumentError."""
    if len(rhat.shape) != 2 or tuple(robs.shape) != tuple(rhat.shape):
        raise ArgumentError(
            f"dataset {dataset!r}: rhat and robs must both have shape (samples, cells);"
            f" got {tuple(rhat.shape)} and {tuple(robs.shape)}"
        )
    return int(rhat.shape[0]), int(rhat.shape[1])


def weights_of(dataset: str, dfs: Any, n_rows: int, n_cells: int) -> Any:
    """The mask as (rows, cells) or (rows, 1) weights (`as_weights`), None when there is none; ArgumentError else."""
    try:
        return as_weights(dfs, n_rows, n_cells)
    except BpsevalError as error:
        raise ArgumentError(f"dataset {dataset!r}: {error}") from None


def dtype_kind(array: Any) -> str:
    """numpy's dtype kind letter ('f', 'i', 'u', 'b', 'c', ...) of a numpy array or a torch tensor."""
    if is_tensor(array):
        dtype = array.dtype
        if dtype.is_floating_point:
            return "f"
        if dtype.is_complex:
            return "c"
        if str(dtype) == "torch.bool":
            return "b"
        return "i" if dtype.is_signed else "u"
    return np.asarray(array).dtype.kind


def check_rates_dtype(dataset: str, rhat: Any) -> None:
    """rhat must be floating point or integer (integer predictions are taken as exact rates)."""
    if dtype_kind(rhat) not in "fiu":
        raise ArgumentError(f"dataset {dataset!r}: rhat must be floating point, got dtype {rhat.dtype}")


def check_numeric(dataset: str, name: str, array: Any) -> None:
    """robs and dfs must be numbers (bool counts as a number for dfs only)."""
    if dtype_kind(array) not in ("fiub" if name == "dfs" else "fiu"):
        raise ArgumentError(f"dataset {dataset!r}: {name} must be numeric, got dtype {array.dtype}")


def sample_indices(dataset: str, sample_idx: Any, n_rows: int) -> np.ndarray:
    """sample_idx as an int64 numpy array of shape (n_rows,), values in [0, 2^63 − 1].

    A CPU tensor or numpy array is read in place; a CUDA tensor is copied to the host (which waits for
    the device). Floats, booleans, and values outside the range (negative, uint64 above 2^63 − 1,
    Python ints beyond int64) are refused, never wrapped or truncated.

    Raises:
        ArgumentError: naming the dataset, the dtype and shape, or how many values are out of range.
    """
    if is_tensor(sample_idx) and sample_idx.device.type == "cpu":
        index = sample_idx.detach().numpy()
    elif isinstance(sample_idx, np.ndarray):
        index = sample_idx
    elif is_tensor(sample_idx):
        index = to_numpy(sample_idx)
    else:
        try:
            index = np.asarray(sample_idx)
        except OverflowError:  # Python ints beyond every integer dtype
            index = np.asarray(sample_idx, dtype=object)
    if index.dtype == object and index.shape == (n_rows,) and all(isinstance(value, int) for value in index.tolist()):
        _refuse_out_of_range(dataset, index.tolist())  # only ints beyond every integer dtype make an object array
    if index.shape != (n_rows,) or index.dtype.kind not in "iu":
        raise ArgumentError(
            f"dataset {dataset!r}: sample_idx must be integers of shape ({n_rows},), got {index.dtype} {index.shape}"
        )
    return check_index_range(dataset, index).astype(np.int64, copy=False)


def _refuse_out_of_range(dataset: str, values: list[int]) -> NoReturn:
    """Python ints, some beyond int64: refused naming the first out of range."""
    outside = [value for value in values if not 0 <= value <= INT64_MAX]
    raise ArgumentError(
        f"dataset {dataset!r}: sample_idx must be in [0, {INT64_MAX}] (an index into the dataset's validation"
        f" set), got {len(outside)} value(s) outside, e.g. {outside[0]}"
    )


def check_index_range(dataset: str, index: np.ndarray) -> np.ndarray:
    """`index` (integers) if its values are in [0, 2^63 − 1], else ArgumentError naming how many are not."""
    # only the bound its dtype can cross is looked at; argmin and argmax cost less than min and max
    if len(index) and not 0 <= index.item(index.argmin() if index.dtype.kind != "u" else index.argmax()) <= INT64_MAX:
        bad = index[(index < 0) | (index > INT64_MAX)]
        raise ArgumentError(
            f"dataset {dataset!r}: sample_idx must be in [0, {INT64_MAX}] (an index into the dataset's validation"
            f" set), got {len(bad)} value(s) outside, e.g. {bad[0]}"
        )
    return index


def checked_cell_ids(dataset: str, cell_ids: Any, n_cells: int, earlier: np.ndarray | None = None) -> np.ndarray:
    """cell_ids as stored: UTF-8 strings or int64 (floats only when whole), the same as `earlier` when given.

    Raises:
        ArgumentError: for the wrong shape, ids that are not whole numbers or strings, ids outside int64,
            or ids that differ from the earlier batches'.
    """
    ids = to_numpy(cell_ids) if is_tensor(cell_ids) else np.asarray(cell_ids)
    if ids.shape != (n_cells,):
        raise ArgumentError(f"dataset {dataset!r}: cell_ids must have shape ({n_cells},), got {ids.shape}")
    if ids.dtype.kind in "USO":
        values = ids.astype(str)
    elif ids.dtype.kind in "iub" or (ids.dtype.kind == "f" and np.isfinite(ids).all() and (ids == np.round(ids)).all()):
        if len(ids) and not (ids.min() >= np.iinfo(np.int64).min and ids.max() <= INT64_MAX):
            raise ArgumentError(f"dataset {dataset!r}: cell_ids must fit in int64, got values up to {ids.max()}")
        values = ids.astype(np.int64)
    else:
        raise ArgumentError(
            f"dataset {dataset!r}: cell_ids must be integers or strings; got {ids.dtype} values that are not whole"
            " numbers (e.g. 1.5 or NaN), which would be truncated. Give the ids as integers or strings."
        )
    if earlier is not None and (earlier.dtype.kind != values.dtype.kind or not np.array_equal(earlier, values)):
        raise ArgumentError(f"dataset {dataset!r}: cell_ids differ from the ones given with an earlier batch")
    return values


def check_values(dataset: str, rhat: Any, robs: Any, weights: Any, rate_kind: str) -> None:
    """Raise ArgumentError, naming the dataset and the first bad row and cell, for values no likelihood takes.

    Values at masked entries (weight 0) are ignored, NaN or not. The same checks as `batch_stats`, whose
    message this is; numpy arrays only (the online metric screens tensors on their device).
    """
    try:
        validated_values(rhat, robs, weights, rate_kind)
    except InvalidValuesError as error:
        raise ArgumentError(f"dataset {dataset!r}: {error}") from None


@dataclass(frozen=True)
class BatchLayout:
    """What the first batch of a dataset fixes for the later ones."""

    n_cells: int
    rate_kind: str
    dfs_shape_tail: tuple[int, ...] | None
    """dfs's shape after the samples axis: () for (samples,), (1,) or (cells,); None without dfs."""
    has_sample_idx: bool

    def check_follows(self, dataset: str, earlier: BatchLayout | None, *, same_dfs_shape: bool = True) -> None:
        """Raise ArgumentError, naming what differs, unless this batch's layout is that of the `earlier` batches.

        `same_dfs_shape=False` lets dfs change shape between batches (full, per row, none): the online metric
        reduces each batch at once, where a shard stores dfs as one array.
        """
        if earlier is None or earlier == self:
            return
        if earlier.n_cells != self.n_cells:
            raise ArgumentError(
                f"dataset {dataset!r}: this batch has {self.n_cells} cells, earlier batches had {earlier.n_cells}"
            )
        if earlier.rate_kind != self.rate_kind:
            raise ArgumentError(
                f"dataset {dataset!r}: rate_kind {self.rate_kind!r} differs from earlier {earlier.rate_kind!r}"
            )
        if earlier.has_sample_idx != self.has_sample_idx:
            raise ArgumentError(f"dataset {dataset!r}: give sample_idx on every batch or on none")
        if same_dfs_shape and earlier.dfs_shape_tail != self.dfs_shape_tail:
            raise ArgumentError(
                f"dataset {dataset!r}: dfs must be given with the same shape on every batch"
                f" (earlier: {_describe_tail(earlier.dfs_shape_tail)}, now: {_describe_tail(self.dfs_shape_tail)})"
            )


def _describe_tail(tail: tuple[int, ...] | None) -> str:
    return "no dfs" if tail is None else f"(N{''.join(f', {d}' for d in tail)})"


@dataclass(frozen=True)
class Batch:
    """One checked batch of a dataset: arrays as given (numpy or tensors, detached), the rest converted.

    Built by `Batch.of`, the one place every path converts and checks its arguments.
    """

    dataset: str
    rhat: Any
    robs: Any
    dfs: Any
    """The mask as given (None: every entry valid); `weights` is its (rows, cells) or (rows, 1) view."""
    weights: Any
    sample_idx: np.ndarray | None
    cell_ids: np.ndarray | None
    rate_kind: str

    @property
    def n_rows(self) -> int:
        return int(self.rhat.shape[0])

    @property
    def layout(self) -> BatchLayout:
        tail = None if self.dfs is None else tuple(int(d) for d in self.dfs.shape[1:])
        return BatchLayout(int(self.rhat.shape[1]), self.rate_kind, tail, self.sample_idx is not None)

    @classmethod
    def of(
        cls,
        dataset: str,
        rhat: Any,
        robs: Any,
        dfs: Any = None,
        sample_idx: Any = None,
        cell_ids: Any = None,
        rate_kind: str = "rate",
        *,
        earlier: BatchLayout | None = None,
        earlier_cell_ids: np.ndarray | None = None,
        same_dfs_shape: bool = True,
    ) -> Batch:
        """Check a batch's name, shapes, dtypes, sample_idx and cell_ids, and that it follows the `earlier` batches.

        Args:
            dataset: the dataset (recording session) name.
            rhat: predicted rates (or log-rates), (samples, cells): numpy, or a tensor on any device.
            robs: observed counts, same shape.
            dfs: the validity mask, (samples, cells), (samples, 1) or (samples,), or None.
            sample_idx: (samples,) indices into the dataset's validation set, or None.
            cell_ids: (cells,) ids, or None.
            rate_kind: "rate" or "log_rate".
            earlier: the layout the dataset's first batch fixed (None for a first batch).
            earlier_cell_ids: the ids an earlier batch gave, which these must equal.
            same_dfs_shape: whether dfs must keep the shape of the earlier batches' (see `BatchLayout.check_follows`).

        Returns:
            The batch, its arrays detached from autograd; values are not checked here (`check_values`).

        Raises:
            ArgumentError: naming the dataset and what is wrong.
        """
        check_dataset_name(dataset)
        check_rate_kind(dataset, rate_kind)
        rhat, robs, dfs = (_detached(value) for value in (rhat, robs, dfs))
        n_rows, n_cells = check_shapes(dataset, rhat, robs)
        check_rates_dtype(dataset, rhat)
        check_numeric(dataset, "robs", robs)
        if dfs is not None:
            check_numeric(dataset, "dfs", dfs)
        weights = weights_of(dataset, dfs, n_rows, n_cells)
        index = None if sample_idx is None else sample_indices(dataset, sample_idx, n_rows)
        ids = None if cell_ids is None else checked_cell_ids(dataset, cell_ids, n_cells, earlier_cell_ids)
        batch = cls(dataset, rhat, robs, dfs, weights, index, ids, rate_kind)
        batch.layout.check_follows(dataset, earlier, same_dfs_shape=same_dfs_shape)
        return batch


def _detached(value: Any) -> Any:
    """Tensors without autograd history, numpy arrays as they are, other values as numpy arrays; None stays None."""
    if value is None or isinstance(value, np.ndarray):
        return value
    return value.detach() if is_tensor(value) else np.asarray(value)
