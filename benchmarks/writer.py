"""The `writer` mode: what `ShardWriter` costs a validation loop, against plain h5py and `torch.save`.

For each of --hdf5-cells, one session of `samples` rows (float32 rhat, robs, dfs; int64 sample_idx)
is written BATCH_ROWS rows per call, every variant once per repetition, repetitions interleaved:

- `plain h5py`: the same appends with h5py alone, as hdf5-settings writes them (256 KiB row chunks,
  one resize and write per batch and array, HDF5's own file driver), no fsync; `+ fsync` adds one;
- `ShardWriter`: `add` per batch, then the end of the `with` block (staging, checks, fsync, rename);
- `ShardWriter background`: the same with `background=True`; the loop's time in `add` and at the
  end of the block (where it waits for the queue to drain) is what the loop is blocked;
- `torch.save`: each batch's four tensors saved to a file of their own, as the legacy loop did;
- `... with forward`: the loop first waits a forward pass per batch (time.sleep: a GPU-bound
  forward pass, during which the CPU thread waits for the device), as long as the synchronous
  ShardWriter's median time per batch; timed are the loop's time in `add` and, apart, at the end
  of the `with` block (the last chunks, HDF5's metadata, fsync and rename: the same work in both
  modes, and in background mode also the wait for the queue to drain). The background `add`s with
  forward are also split by batch: those that only copy rows into the stages, and those that fill
  a chunk and hand it to the thread (median per batch and total).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data import BATCH_ROWS, MIB, SEED, synthetic_dataset
from benchmarks.hdf5_settings import Layout, write_layout
from benchmarks.timing import MachineLoad, Timing, environment, print_load, ratio
from bpseval import ShardWriter
from bpseval.shard._writer_thread import QUEUE_BYTES
from bpseval.shard.format import CHUNK_BYTES

TARGETS = {"ShardWriter / plain h5py throughput": (">=", 0.8), "background add / sync add, with forward": ("<=", 0.25)}
"""Issue #17: at least 0.8x plain h5py's throughput; the loop blocked at most 25% of the synchronous time."""


def plain_h5py(target: Path, arrays: dict[str, np.ndarray], fsync: bool) -> float:
    """Seconds to append `arrays` with plain h5py (and fsync the file when asked)."""
    started = time.perf_counter()
    path = write_layout(target, arrays, Layout(CHUNK_BYTES, "none"))
    if fsync:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - started


def shard_writer(
    target: Path,
    arrays: dict[str, np.ndarray],
    background: bool,
    forward: float = 0.0,
    per_add: list[float] | None = None,
) -> tuple[float, float]:
    """Seconds the loop spends in every `add` and at the end of the block, with `forward` seconds before each add.

    Each add's seconds are appended to `per_add` when given.
    """
    rows = len(arrays["rhat"])
    in_writer = 0.0
    writer = ShardWriter(target, 0, 1, background=background)
    with writer:
        for start in range(0, rows, BATCH_ROWS):
            if forward:
                time.sleep(forward)
            batch = {name: array[start : start + BATCH_ROWS] for name, array in arrays.items()}
            started = time.perf_counter()
            writer.add("session", batch["rhat"], batch["robs"], batch["dfs"], sample_idx=batch["sample_idx"])
            seconds = time.perf_counter() - started
            in_writer += seconds
            if per_add is not None:
                per_add.append(seconds)
        started = time.perf_counter()
    return in_writer, time.perf_counter() - started


def completes_a_chunk(arrays: dict[str, np.ndarray], start: int) -> bool:
    """Whether the batch at row `start` fills an array's chunk of about CHUNK_BYTES (ShardWriter then hands it over)."""
    for array in arrays.values():
        chunk_rows = max(1, CHUNK_BYTES // (array[:1].nbytes or 1))
        if (start + BATCH_ROWS) // chunk_rows > start // chunk_rows:
            return True
    return False


def per_batch(arrays: dict[str, np.ndarray], per_add: list[float]) -> dict[str, Any]:
    """The background `add`'s median microseconds per batch, apart for the batches that only copy and those that hand chunks over."""
    starts = range(0, len(arrays["rhat"]), BATCH_ROWS)
    handing = [completes_a_chunk(arrays, start) for start in starts] * (len(per_add) // len(starts))
    parts = {"only copying": [t for t, h in zip(per_add, handing, strict=True) if not h]}
    parts["handing chunks over"] = [t for t, h in zip(per_add, handing, strict=True) if h]
    return {
        name: {
            "batches": len(times),
            "median_us": float(np.median(times)) * 1e6 if times else None,
            "sum_s": sum(times),
        }
        for name, times in parts.items()
    }


def torch_save(target: Path, arrays: dict[str, np.ndarray]) -> float:
    """Seconds to `torch.save` every batch's tensors to a file of its own."""
    import torch

    target.mkdir()
    started = time.perf_counter()
    for number, start in enumerate(range(0, len(arrays["rhat"]), BATCH_ROWS)):
        batch = {name: torch.from_numpy(array[start : start + BATCH_ROWS]) for name, array in arrays.items()}
        torch.save(batch, target / f"batch-{number:05d}.pt")
    return time.perf_counter() - started


def measure(cells: int, samples: int, repeat: int, scratch: Path) -> dict[str, Any]:
    """Every variant `repeat` times, interleaved; prints and returns the times and ratios of one session."""
    rate, robs, dfs = synthetic_dataset(cells, samples, SEED)
    arrays = {"rhat": rate, "robs": robs, "dfs": dfs, "sample_idx": np.arange(samples, dtype=np.int64)}
    raw = sum(array.nbytes for array in arrays.values())
    batches = -(-samples // BATCH_ROWS)
    variants: dict[str, Callable[[Path], float]] = {
        "plain h5py": lambda target: plain_h5py(target, arrays, fsync=False),
        "plain h5py + fsync": lambda target: plain_h5py(target, arrays, fsync=True),
        "ShardWriter": lambda target: sum(shard_writer(target, arrays, background=False)),
        "ShardWriter background": lambda target: sum(shard_writer(target, arrays, background=True)),
        "torch.save": lambda target: torch_save(target, arrays),
    }
    looped = [f"ShardWriter{mode} with forward: {part}" for mode in ("", " background") for part in ("add", "end")]
    timings = {name: Timing(name, [], bytes=raw) for name in [*variants, *looped]}
    target = scratch / "written"
    background_adds: list[float] = []
    for _ in range(repeat):
        for name, variant in variants.items():
            timings[name].times.append(variant(target))
            shutil.rmtree(target)
        forward = timings["ShardWriter"].median / batches
        for mode, background in (("", False), (" background", True)):
            in_add, at_end = shard_writer(target, arrays, background, forward, background_adds if background else None)
            timings[f"ShardWriter{mode} with forward: add"].times.append(in_add)
            timings[f"ShardWriter{mode} with forward: end"].times.append(at_end)
            shutil.rmtree(target)
    ratios = {
        "ShardWriter / plain h5py throughput": ratio(timings["plain h5py"], [timings["ShardWriter"]]),
        "ShardWriter / (plain h5py + fsync) throughput": ratio(timings["plain h5py + fsync"], [timings["ShardWriter"]]),
        "ShardWriter / torch.save throughput": ratio(timings["torch.save"], [timings["ShardWriter"]]),
        "background blocked / sync, tight loop": ratio(timings["ShardWriter background"], [timings["ShardWriter"]]),
        "background add / sync add, with forward": ratio(
            timings["ShardWriter background with forward: add"], [timings["ShardWriter with forward: add"]]
        ),
    }
    blocked, synchronous = (
        Timing(name, list(np.add(timings[f"{name}: add"].times, timings[f"{name}: end"].times)))
        for name in ("ShardWriter background with forward", "ShardWriter with forward")
    )
    ratios["background (add + end) / sync (add + end), with forward"] = ratio(blocked, [synchronous])
    print(
        f"\n{samples} samples x {cells} cells, {BATCH_ROWS} rows per batch: {raw / MIB:.0f} MiB raw;"
        f" medians of {repeat} repetitions, [min-max]"
    )
    print(f"{'variant':<44}{'seconds':>9}{'MB/s':>8}{'[min-max] MB/s':>18}")
    for timing in timings.values():
        speeds = [raw / MIB / seconds for seconds in timing.times]
        print(
            f"{timing.name:<44}{timing.median:9.3f}{raw / MIB / timing.median:8.0f}"
            f"{f'[{min(speeds):.0f}-{max(speeds):.0f}]':>18}"
        )
    split = per_batch(arrays, background_adds)
    print(
        "background add per batch, with forward (median): "
        + "; ".join(
            f"{part['median_us']:.0f} us {name} ({part['batches'] // repeat} batches, {part['sum_s'] / repeat * 1e3:.1f} ms)"
            for name, part in split.items()
            if part["batches"]
        )
    )
    for name, value in ratios.items():
        verdict = ""
        if name in TARGETS:
            sign, bound = TARGETS[name]
            met = value["value"] >= bound if sign == ">=" else value["value"] <= bound
            value["target"], value["met"] = f"{sign} {bound}", met
            verdict = f"  (target {sign} {bound}: {'met' if met else 'NOT met'})"
        print(f"{name:<58}{value['value']:6.2f} [{value['min']:.2f}-{value['max']:.2f}]{verdict}")
    return {
        "cells": cells,
        "raw_bytes": raw,
        "batches": batches,
        "timings": {name: timing.summary() for name, timing in timings.items()},
        "background_add_per_batch": split,
        "ratios": ratios,
    }


def main(cells: list[int], samples: int, repeat: int, data_dir: Path | None) -> dict[str, Any]:
    """The writer measurements of one session of `samples` rows for each of `cells`; returns the JSON document."""
    load = MachineLoad()
    with tempfile.TemporaryDirectory(dir=data_dir) as scratch:
        results = [measure(count, samples, repeat, Path(scratch)) for count in cells]
    document = {
        "mode": "writer",
        "samples": samples,
        "batch_rows": BATCH_ROWS,
        "queue_bytes": QUEUE_BYTES,
        "repeat": repeat,
        "environment": environment(),
        "machine_load": load.report(),
        "results": results,
    }
    print_load(document["machine_load"])
    return document
