"""DistributedBPS.update never waits on the device, checks values there, and costs at most 2x a fused reduction.

The CPU has no sync-debug mode, so `update` runs with every torch.Tensor method that moves a
value to the host (`item`, `tolist`, `__bool__`, `__float__`, `__int__`, `__index__`, `cpu`,
`numpy`, `__array__`) replaced by one that raises: that patches torch, not bpseval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import bpseval
from bpseval.errors import ArgumentError
from bpseval.torch import DistributedBPS

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__array__")


class HostRead(AssertionError):
    """A tensor's value was moved to the host inside update."""


@contextlib.contextmanager
def no_host_reads(allowed: torch.Tensor | None = None) -> Iterator[None]:
    """Make every host read of a tensor raise HostRead, except of `allowed` (sample indices already on the CPU)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name: str):
        def read(self: torch.Tensor, *args, **kwargs):
            if allowed is not None and self.dtype == allowed.dtype and self.data_ptr() == allowed.data_ptr():
                return originals[name](self, *args, **kwargs)
            raise HostRead(f"Tensor.{name} called inside update")

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def test_the_guard_catches_host_reads():
    with no_host_reads(), pytest.raises(HostRead):
        bool(torch.ones(1) > 0)
    with no_host_reads(), pytest.raises(HostRead):
        DistributedBPS(validate="eager").update("x", torch.ones(4, 3), torch.ones(4, 3))  # eager waits, by design


@pytest.mark.parametrize("index_kind", ["numpy", "cpu tensor", "none"])
@pytest.mark.parametrize("rate_kind", ["rate", "log_rate"])
def test_update_makes_no_host_read_and_still_equals_the_offline_merge(tmp_path, index_kind, rate_kind):
    rng = np.random.default_rng(2)
    rhat = torch.tensor(rng.gamma(2.0, 0.5, size=(60, 7)), dtype=torch.bfloat16)
    if rate_kind == "log_rate":
        rhat = rhat.float().log().to(torch.bfloat16)
    robs = torch.tensor(rng.poisson(1.0, size=(60, 7)), dtype=torch.float32)
    dfs = torch.tensor(rng.random((60, 7)) > 0.2)
    dfs[5, 3] = False
    rhat[5, 3] = float("nan")  # masked: ignored, and must not poison the sums
    metric = DistributedBPS(dedup_window=4)
    batches = [list(range(20)), [18, 19, 20, 21], list(range(22, 60)), [0, 59]]  # repeats within the rank
    for rows in batches:
        index = {"numpy": np.array(rows), "cpu tensor": torch.tensor(rows), "none": None}[index_kind]
        with no_host_reads(allowed=index if isinstance(index, torch.Tensor) else None):
            metric.update("s", rhat[rows], robs[rows], dfs[rows], sample_idx=index, rate_kind=rate_kind)
    with bpseval.ShardWriter(tmp_path, 0, 1) as writer:
        for rows in batches:
            index = None if index_kind == "none" else np.array(rows)
            writer.add("s", rhat[rows], robs[rows], dfs[rows], sample_idx=index, rate_kind=rate_kind)
    online_cells, offline_cells = metric.compute().cells, bpseval.evaluate(tmp_path).cells
    assert online_cells["n_valid"].tolist() == offline_cells["n_valid"].tolist()
    np.testing.assert_allclose(online_cells["bps"], offline_cells["bps"], rtol=1e-12)
    for metric in ("pseudo_r2", "corr"):  # defined (the masked NaN poisons no sum), and the same online
        assert offline_cells[metric].notna().all()
        np.testing.assert_allclose(online_cells[metric], offline_cells[metric], rtol=1e-9)


@pytest.mark.parametrize(
    ("array", "value", "named"),
    [
        ("rhat", float("nan"), "rhat NaN or infinite in 1 batch"),
        ("rhat", -1.0, "rhat negative in 1 batch"),
        ("robs", float("inf"), "robs NaN or infinite in 1 batch"),
        ("robs", -2.0, "robs negative in 1 batch"),
        ("dfs", 1.5, "dfs outside [0, 1] or NaN in 1 batch"),
    ],
)
def test_invalid_values_are_found_on_the_device_and_raised_by_compute(array, value, named):
    arrays = {"rhat": torch.ones(8, 3), "robs": torch.ones(8, 3), "dfs": torch.ones(8, 3)}
    metric = DistributedBPS()
    metric.update("good", **arrays)
    metric.update("x", **arrays, sample_idx=np.arange(8))
    bad = {key: tensor.clone() for key, tensor in arrays.items()}
    bad[array][6, 1] = value
    with no_host_reads():
        metric.update("x", **bad, sample_idx=np.arange(8, 16))
    metric.update("x", **arrays, sample_idx=np.arange(16, 24))
    for call in (metric.compute, metric.state_dict):
        with pytest.raises(ArgumentError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith("dataset 'x': DistributedBPS.update was given invalid values on rank 0")
        assert "first in batch 1 of that dataset" in message and named in message
        assert "validate='eager'" in message and "reset()" in message
    metric.reset()
    metric.update("x", **arrays)
    assert metric.compute().datasets["ok"].tolist() == [3]


def test_values_at_masked_entries_are_not_invalid():
    rhat, robs, dfs = torch.ones(4, 2), torch.ones(4, 2), torch.ones(4, 2)
    rhat[0, 0], robs[1, 1], rhat[2, 1] = float("nan"), -1.0, float("inf")
    dfs[0, 0] = dfs[1, 1] = dfs[2, 1] = 0.0
    deferred, eager = DistributedBPS(), DistributedBPS(validate="eager")
    for metric in (deferred, eager):
        metric.update("x", rhat, robs, dfs)
    assert deferred.compute().cells["n_valid"].tolist() == [3, 2]
    np.testing.assert_array_equal(deferred.compute().cells["bps"], eager.compute().cells["bps"])
