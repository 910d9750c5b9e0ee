"""The `hdf5-settings` mode: writer throughput, file size and reader throughput of one dataset's
arrays per chunk layout and compression, through plain h5py and through ShardWriter itself."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from benchmarks.baselines import read_shards
from benchmarks.data import BATCH_ROWS, MIB, SEED, Scale, synthetic_dataset
from benchmarks.timing import MachineLoad, environment, print_load, timed
from bpseval import ShardWriter
from bpseval.shard.format import CHUNK_BYTES, DATASETS_GROUP

COMPRESSIONS = {
    "none": {},
    "lzf": {"compression": "lzf"},
    "gzip-1": {"compression": "gzip", "compression_opts": 1},
    "shuffle+gzip-1": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
}
"""h5py create_dataset keyword arguments of each compression tried."""
CHUNK_TARGETS = (0, 64 * 1024, CHUNK_BYTES, MIB)
"""Chunk byte targets tried, ShardWriter's own among them; 0 is one batch per chunk within 16-256 KiB
(ShardWriter's rule before row-aligned chunks)."""


@dataclass(frozen=True)
class Layout:
    """A chunk size target (0 = one batch per chunk, within 16-256 KiB) and a compression of COMPRESSIONS."""

    chunk_bytes: int
    compression: str

    @property
    def label(self) -> str:
        if self.chunk_bytes == 0:
            size = "one batch (16-256 KiB)"
        elif self.chunk_bytes >= MIB:
            size = f"{self.chunk_bytes // MIB} MiB"
        else:
            size = f"{self.chunk_bytes // 1024} KiB"
        return f"{size}, {self.compression}"

    def chunk_rows(self, array: np.ndarray) -> int:
        """Rows per chunk of `array`: whole rows, about chunk_bytes (or one batch, within 16-256 KiB)."""
        row_bytes = max(1, array[0].nbytes)
        if self.chunk_bytes == 0:
            smallest, largest = (max(1, limit // row_bytes) for limit in (1 << 14, 1 << 18))
            return min(max(BATCH_ROWS, smallest), largest)
        return max(1, self.chunk_bytes // row_bytes)


def write_layout(target: Path, arrays: dict[str, np.ndarray], layout: Layout) -> Path:
    """Write `arrays` into a fresh directory `target` the way ShardWriter appends them (BATCH_ROWS rows
    per resize and write) with plain h5py; returns the file path."""
    target.mkdir()
    path = target / "rank-0000.h5"
    with h5py.File(path, "w") as handle:
        group = handle.create_group(f"{DATASETS_GROUP}/session")
        datasets = {
            name: group.create_dataset(
                name,
                shape=(0, *array.shape[1:]),
                maxshape=(None, *array.shape[1:]),
                dtype=array.dtype,
                chunks=(layout.chunk_rows(array), *array.shape[1:]),
                **COMPRESSIONS[layout.compression],
            )
            for name, array in arrays.items()
        }
        for start in range(0, len(arrays["rhat"]), BATCH_ROWS):
            for name, dataset in datasets.items():
                batch = arrays[name][start : start + BATCH_ROWS]
                dataset.resize(start + len(batch), axis=0)
                dataset[start:] = batch
    return path


def write_with_shard_writer(target: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` through ShardWriter itself, BATCH_ROWS rows per add; returns the shard path."""
    with ShardWriter(target, 0, 1) as writer:
        for start in range(0, len(arrays["rhat"]), BATCH_ROWS):
            rows = slice(start, start + BATCH_ROWS)
            writer.add(
                "session",
                arrays["rhat"][rows],
                arrays["robs"][rows],
                arrays["dfs"][rows],
                sample_idx=arrays["sample_idx"][rows],
            )
    return writer.path


def rhat_chunk_rows(path: Path) -> int:
    """Rows per HDF5 chunk of the rhat array written at `path`."""
    with h5py.File(path, "r") as handle:
        return handle[DATASETS_GROUP]["session"]["rhat"].chunks[0]


def measure_case(
    label: str, write: Callable[[Path], Path], arrays: dict[str, np.ndarray], scratch: Path, repeat: int
) -> dict[str, Any]:
    """Write and read one layout `repeat` times; prints and returns its row of the table."""
    raw = sum(array.nbytes for array in arrays.values())
    write_times, read_times, size, chunk_rows = [], [], 0, 0
    for _ in range(repeat):
        target = scratch / "case"
        elapsed, path = timed(write, target)
        write_times.append(elapsed)
        size, chunk_rows = path.stat().st_size, rhat_chunk_rows(path)
        read_times.append(timed(read_shards, [path], True)[0])
        shutil.rmtree(target)
    writes, reads = [raw / MIB / t for t in write_times], [raw / MIB / t for t in read_times]
    chunk = f"{chunk_rows} rows"
    print(
        f"{label:<34}{chunk:>12}{statistics.median(writes):11.0f}{f'[{min(writes):.0f}-{max(writes):.0f}]':>14}"
        f"{size / MIB:10.1f}{raw / size:7.2f}{statistics.median(reads):10.0f}"
        f"{f'[{min(reads):.0f}-{max(reads):.0f}]':>14}"
    )
    return {
        "cells": arrays["rhat"].shape[1],
        "layout": label,
        "chunk": chunk,
        "raw_bytes": raw,
        "file_bytes": size,
        "write_s": write_times,
        "read_s": read_times,
    }


def main(args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    """Every layout for each of --hdf5-cells; prints the tables and returns the JSON document."""
    load = MachineLoad()
    rows: list[dict[str, Any]] = []
    cases: dict[str, Callable[..., Path]] = {"ShardWriter itself": write_with_shard_writer}
    for chunk_bytes in CHUNK_TARGETS:
        for compression in COMPRESSIONS:
            layout = Layout(chunk_bytes, compression)
            cases[layout.label] = partial(write_layout, layout=layout)
    with tempfile.TemporaryDirectory(dir=args.data_dir) as scratch:
        for cells in args.hdf5_cells:
            rhat, robs, dfs = synthetic_dataset(cells, scale.samples, SEED)
            arrays = {"rhat": rhat, "robs": robs, "dfs": dfs, "sample_idx": np.arange(scale.samples, dtype=np.int64)}
            raw = sum(array.nbytes for array in arrays.values())
            print(
                f"\n{scale.samples} samples x {cells} cells, float32 rhat/robs/dfs + int64 sample_idx:"
                f" {raw / MIB:.0f} MiB raw; {args.repeat} repetitions, page cache warm"
            )
            print(
                f"{'layout':<34}{'rhat chunk':>12}{'write MB/s':>11}{'[min-max]':>14}{'size MiB':>10}"
                f"{'ratio':>7}{'read MB/s':>10}{'[min-max]':>14}"
            )
            for label, write in cases.items():
                rows.append(measure_case(label, partial(write, arrays=arrays), arrays, Path(scratch), args.repeat))
    document = {
        "mode": "hdf5-settings",
        "samples": scale.samples,
        "environment": environment(),
        "machine_load": load.report(),
        "results": rows,
    }
    print_load(document["machine_load"])
    return document
