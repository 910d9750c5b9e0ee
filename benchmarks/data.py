"""Synthetic shards: scales, per-dataset specs, generation with `ShardWriter` and the reusable cache dir."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bpseval import ShardWriter
from bpseval.shard.format import CHUNK_BYTES, DATASETS_GROUP, FORMAT_VERSION

GENERATOR_VERSION = 1
"""Bump when the synthetic data changes, so that stale data directories are regenerated."""
SEED = 20240601
BATCH_ROWS = 256
"""Rows per `ShardWriter.add`, as a validation loop with batch size 256 would write them."""
MIB = 1 << 20


@dataclass(frozen=True)
class Scale:
    """How much synthetic data: `cells` in all, spread from `cells_min` to `cells_max` per dataset."""

    datasets: int
    cells: int
    cells_min: int
    cells_max: int
    samples: int
    ranks: int


SCALES = {
    "small": Scale(datasets=5, cells=200, cells_min=20, cells_max=60, samples=5_000, ranks=2),
    "realistic": Scale(datasets=30, cells=2_800, cells_min=23, cells_max=181, samples=50_000, ranks=4),
    "large": Scale(datasets=30, cells=2_800, cells_min=23, cells_max=181, samples=200_000, ranks=4),
}


def resolve_scale(
    base: Scale, datasets: int | None, cells: int | None, samples: int | None, ranks: int | None
) -> Scale:
    """`base` with explicit overrides; the per-dataset cell range follows the mean cells per dataset."""
    scale = replace(
        base,
        datasets=datasets or base.datasets,
        cells=cells or base.cells,
        samples=samples or base.samples,
        ranks=ranks or base.ranks,
    )
    if scale.cells < scale.datasets:
        raise SystemExit(f"--cells ({scale.cells}) must be at least --datasets ({scale.datasets})")
    factor = (scale.cells / scale.datasets) / (base.cells / base.datasets)
    return replace(
        scale,
        cells_min=max(1, round(base.cells_min * factor)),
        cells_max=max(1, round(base.cells_max * factor)),
    )


def cell_counts(scale: Scale) -> list[int]:
    """Deterministic cells per dataset from cells_min to cells_max summing to `scale.cells`.

    Dataset d gets cells_min + (cells_max - cells_min)·(d/(D-1))^p, with p chosen by bisection
    so that the counts add up; rounding leftovers go to the middle datasets.
    """
    n, lo, hi = scale.datasets, scale.cells_min, scale.cells_max
    if n == 1:
        return [scale.cells]
    lo, hi = min(lo, scale.cells // n), max(hi, -(-scale.cells // n))
    x = np.arange(n) / (n - 1)
    low_p, high_p = 1e-3, 1e3
    for _ in range(200):
        p = math.sqrt(low_p * high_p)
        if (lo + (hi - lo) * x**p).sum() > scale.cells:
            low_p = p
        else:
            high_p = p
    counts = np.rint(lo + (hi - lo) * x**p).astype(int)
    order = np.argsort(np.abs(np.arange(n) - (n - 1) / 2), kind="stable")
    position = 0
    while (missing := scale.cells - int(counts.sum())) != 0:
        index = order[position % n]
        step = 1 if missing > 0 else -1
        if lo <= counts[index] + step <= hi:
            counts[index] += step
        position += 1
    return counts.tolist()


@dataclass(frozen=True)
class DatasetSpec:
    """One synthetic recording session."""

    name: str
    cells: int
    samples: int


def dataset_specs(scale: Scale) -> list[DatasetSpec]:
    """The sessions of a scale. Dataset d has samples + (d mod ranks) samples, so that
    DistributedSampler pads (repeats) up to ranks - 1 samples in most datasets."""
    return [
        DatasetSpec(f"session-{index:03d}", cells, scale.samples + index % scale.ranks)
        for index, cells in enumerate(cell_counts(scale))
    ]


def synthetic_dataset(cells: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (samples, cells) rhat, robs and dfs of one session.

    True rates are lognormal per cell (median 0.08 spikes per bin) modulated per sample; robs is
    Poisson; rhat is the true rate with multiplicative model error. dfs is a 0/1 mask: 2% of the
    rows are invalid for every cell (blinks), and 30% of the cells drop out over 1-3 contiguous
    stretches of 2-10% of the samples. Every value is finite, also where dfs = 0.
    """
    rng = np.random.default_rng(seed)
    base = np.clip(rng.lognormal(math.log(0.08), 0.8, size=cells), 0.002, 2.0).astype(np.float32)
    rate = base * np.exp(np.float32(0.5) * rng.standard_normal((samples, cells), dtype=np.float32))
    robs = rng.poisson(rate).astype(np.float32)
    rate *= np.exp(np.float32(0.3) * rng.standard_normal((samples, cells), dtype=np.float32) - np.float32(0.045))
    dfs = np.ones((samples, cells), dtype=np.float32)
    for start in rng.integers(0, samples, size=max(1, samples // 500)):
        dfs[start : start + 10] = 0.0
    for cell in np.flatnonzero(rng.random(cells) < 0.3):
        for _ in range(rng.integers(1, 4)):
            length = int(samples * rng.uniform(0.02, 0.10))
            start = int(rng.integers(0, max(1, samples - length)))
            dfs[start : start + length, cell] = 0.0
    return rate, robs, dfs


def sampler_rows(samples: int, ranks: int, rank: int) -> np.ndarray:
    """The sample indices `DistributedSampler(shuffle=False)` gives `rank`, padding included."""
    padded = np.concatenate([np.arange(samples), np.arange((-samples) % ranks)])
    return padded[rank::ranks]


def manifest_for(scale: Scale) -> dict[str, Any]:
    """What identifies a data directory's content; equal manifests mean the data can be reused."""
    return {
        "generator_version": GENERATOR_VERSION,
        "shard_format_version": FORMAT_VERSION,
        "shard_chunk_bytes": repr(CHUNK_BYTES),
        "seed": SEED,
        "batch_rows": BATCH_ROWS,
        "ranks": scale.ranks,
        "datasets": [asdict(spec) for spec in dataset_specs(scale)],
    }


def default_data_dir(scale: Scale) -> Path:
    """A reusable directory under the system temp dir, named after the scale."""
    name = f"{scale.datasets}d-{scale.cells}c-{scale.samples}s-{scale.ranks}r"
    return Path(tempfile.gettempdir()) / "bpseval-bench" / name


def ensure_shards(scale: Scale, data_dir: Path) -> Path:
    """Generate the shards of `scale` under data_dir/run (or reuse them); returns that run dir.

    A manifest is written last, so an interrupted generation is never reused.
    """
    run_dir, manifest_path = data_dir / "run", data_dir / "manifest.json"
    manifest = manifest_for(scale)
    complete = len(list(run_dir.rglob("rank-*.h5"))) == scale.ranks
    if complete and manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        print(f"reusing shards in {run_dir}")
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    manifest_path.unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"generating shards in {run_dir} ...", flush=True)
    started = time.perf_counter()
    writers = [ShardWriter(run_dir, rank, scale.ranks) for rank in range(scale.ranks)]
    for writer in writers:
        writer.open()
    for index, spec in enumerate(dataset_specs(scale)):
        rhat, robs, dfs = synthetic_dataset(spec.cells, spec.samples, SEED + index)
        for rank, writer in enumerate(writers):
            rows = sampler_rows(spec.samples, scale.ranks, rank)
            for start in range(0, len(rows), BATCH_ROWS):
                batch = rows[start : start + BATCH_ROWS]
                ids = np.arange(spec.cells) if start == 0 else None
                writer.add(spec.name, rhat[batch], robs[batch], dfs[batch], sample_idx=batch, cell_ids=ids)
    for writer in writers:
        writer.close()
    manifest_path.write_text(json.dumps(manifest, indent=1))
    size = sum(path.stat().st_size for path in shard_paths(run_dir))
    print(f"  {size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def shard_paths(run_dir: Path) -> list[Path]:
    """The shards of a generated run, in rank order."""
    return sorted(run_dir.rglob("rank-*.h5"))


def load_dataset(paths: list[Path], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One dataset's rhat, robs, dfs and sample_idx from all ranks, padding copies dropped."""
    parts: dict[str, list[np.ndarray]] = {"rhat": [], "robs": [], "dfs": [], "sample_idx": []}
    for path in paths:
        with h5py.File(path, "r") as handle:
            group = handle[DATASETS_GROUP].get(name)
            if group is not None:
                for key, values in parts.items():
                    values.append(group[key][()])
    rhat, robs, dfs, index = (np.concatenate(values) for values in parts.values())
    first = np.sort(np.unique(index, return_index=True)[1])
    return rhat[first], robs[first], dfs[first], index[first]


def warm_page_cache(paths: list[Path]) -> None:
    """Read every byte of the files once so that timings start from a warm page cache."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 * MIB):
                pass
