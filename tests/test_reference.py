"""bpseval agrees with an independent, deliberately naive reference implementation of the spec.

Shard sets are written here with plain h5py, the way another program following the format
would (never with ShardWriter), and every per-cell, per-dataset and overall number that
`bpseval.evaluate` reports, both in its DataFrames and in its JSON, is compared with a
reference computed from the same arrays by Python loops in float64: `math.log` per entry, a
Python set to drop repeated `sample_idx`. Agreement is to 1e-5 relative; the only absolute
slack is 1e-12 of the magnitude of the log-likelihood terms that were summed, for values
that are a near-cancellation of large terms.

`bpseval.bits_per_spike` is checked against the same reference on numpy arrays and on torch
tensors (float32, float16, bfloat16).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import bpseval

LN2 = math.log(2.0)
MIN_RATE = 1e-9
REL = 1e-5
CANCELLATION = 1e-12
"""Absolute slack, relative to the summed magnitude of the log-likelihood terms of a value."""


# ----------------------------------------------------------------------------------------------
# Shard sets as plain data


@dataclass
class DatasetSpec:
    """One dataset group of one shard, exactly as stored (arrays in their on-disk dtypes)."""

    rhat: np.ndarray
    robs: np.ndarray
    dfs: np.ndarray | None = None
    sample_idx: np.ndarray | None = None
    cell_ids: list[Any] | None = None
    cell_ids_storage: str = "vlen-utf8"  # "vlen-utf8", "fixed-utf8" or "int64"
    rate_kind: Any = None  # None: attribute absent (means "rate"); str or bytes otherwise


@dataclass
class ShardSpec:
    """One file of a run directory."""

    relpath: str
    rank: int
    world_size: int
    step: int
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    text_as_bytes: bool = False  # store the `format` attribute as fixed-length bytes
    int_type: Any = int  # type of the integer root attributes


def write_shard(root: Path, spec: ShardSpec) -> Path:
    """Write `spec` under `root` with plain h5py."""
    path = root / spec.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.attrs["format"] = np.bytes_(b"bpseval-shard") if spec.text_as_bytes else "bpseval-shard"
        handle.attrs["format_version"] = spec.int_type(1)
        handle.attrs["rank"] = spec.int_type(spec.rank)
        handle.attrs["world_size"] = spec.int_type(spec.world_size)
        handle.attrs["step"] = spec.int_type(spec.step)
        handle.create_group("datasets")
        for name, data in spec.datasets.items():
            group = handle.create_group(f"datasets/{name}")
            if data.rate_kind is not None:
                group.attrs["rate_kind"] = data.rate_kind
            group.create_dataset("rhat", data=data.rhat)
            group.create_dataset("robs", data=data.robs)
            if data.dfs is not None:
                group.create_dataset("dfs", data=data.dfs)
            if data.sample_idx is not None:
                group.create_dataset("sample_idx", data=data.sample_idx)
            if data.cell_ids is not None:
                _write_cell_ids(group, data.cell_ids, data.cell_ids_storage)
    return path


def _write_cell_ids(group: h5py.Group, ids: list[Any], storage: str) -> None:
    if storage == "int64":
        group.create_dataset("cell_ids", data=np.asarray(ids, dtype=np.int64))
    elif storage == "vlen-utf8":
        group.create_dataset("cell_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    elif storage == "fixed-utf8":
        encoded = [str(i).encode("utf-8") for i in ids]
        width = max(len(e) for e in encoded)
        group.create_dataset("cell_ids", data=np.asarray(encoded, dtype=h5py.string_dtype("utf-8", width)))
    elif storage == "fixed-bytes":  # numpy 'S' array of UTF-8 bytes, h5py's default for bytes
        group.create_dataset("cell_ids", data=np.asarray([str(i).encode("utf-8") for i in ids]))
    else:
        raise AssertionError(storage)


def write_run(root: Path, shards: list[ShardSpec]) -> Path:
    for spec in shards:
        write_shard(root, spec)
    return root


# ----------------------------------------------------------------------------------------------
# The reference implementation: plain Python, float64, one cell and one entry at a time


def _is_rate_log(rate_kind: Any) -> bool:
    if isinstance(rate_kind, bytes):
        rate_kind = rate_kind.decode()
    return rate_kind == "log_rate"


def reference_rows(data: DatasetSpec, rows: range | None = None) -> list[tuple[list[float], list[float], list[float]]]:
    """Each sample row of a dataset as Python floats (rhat, robs, one weight per cell)."""
    n_rows, n_cells = data.rhat.shape
    out = []
    for i in range(n_rows) if rows is None else rows:
        rhat = [float(v) for v in data.rhat[i]]
        robs = [float(v) for v in data.robs[i]]
        if data.dfs is None:
            weights = [1.0] * n_cells
        elif data.dfs.ndim == 1:
            weights = [float(data.dfs[i])] * n_cells
        elif data.dfs.shape[1] == 1:
            weights = [float(data.dfs[i, 0])] * n_cells
        else:
            weights = [float(v) for v in data.dfs[i]]
        out.append((rhat, robs, weights))
    return out


def reference_cells(
    rows: list[tuple[list[float], list[float], list[float]]], n_cells: int, log_rate: bool
) -> list[dict]:
    """Per-cell n_valid, n, spikes, ll_gain, bps, status (None where undefined) and a magnitude."""
    cells = []
    for c in range(n_cells):
        n_valid, n, spikes, model_ll, magnitude = 0, 0.0, 0.0, 0.0, 0.0
        for rhat, robs, weights in rows:
            w = weights[c]
            if w == 0.0:
                continue  # ignored entirely, whatever rhat and robs hold (NaN included)
            x, y = rhat[c], robs[c]
            if log_rate:
                rate, log_rate_value = math.exp(x), x
            else:
                rate = x if x > MIN_RATE else MIN_RATE
                log_rate_value = math.log(rate)
            n_valid += 1
            n += w
            spikes += w * y
            model_ll += w * (y * log_rate_value - rate)
            magnitude += w * (abs(y * log_rate_value) + rate)
        if n_valid == 0:
            cells.append(
                {
                    "n_valid": 0,
                    "n": n,
                    "spikes": spikes,
                    "ll_gain": None,
                    "bps": None,
                    "status": "uncovered",
                    "magnitude": 0.0,
                }
            )
            continue
        if spikes == 0.0:
            cells.append(
                {
                    "n_valid": n_valid,
                    "n": n,
                    "spikes": spikes,
                    "ll_gain": model_ll,
                    "bps": None,
                    "status": "silent",
                    "magnitude": magnitude,
                }
            )
            continue
        null_ll = spikes * math.log(spikes / n) - spikes
        ll_gain = model_ll - null_ll
        magnitude += abs(spikes * math.log(spikes / n)) + spikes
        cells.append(
            {
                "n_valid": n_valid,
                "n": n,
                "spikes": spikes,
                "ll_gain": ll_gain,
                "bps": ll_gain / (spikes * LN2),
                "status": "ok",
                "magnitude": magnitude,
            }
        )
    return cells


def reference_summary(cells: list[dict]) -> dict:
    """bps (mean over ok cells), bps_pooled (covered cells), status counts, and a magnitude."""
    ok = [cell["bps"] for cell in cells if cell["status"] == "ok"]
    covered = [cell for cell in cells if cell["status"] != "uncovered"]
    gain = sum(cell["ll_gain"] for cell in covered)
    spikes = sum(cell["spikes"] for cell in covered)
    return {
        "bps": sum(ok) / len(ok) if ok else None,
        "bps_pooled": gain / (LN2 * spikes) if spikes > 0 else None,
        "pooled_slack": sum(cell["magnitude"] for cell in covered) / (LN2 * spikes) if spikes > 0 else 0.0,
        "bps_slack": (sum(c["magnitude"] / (c["spikes"] * LN2) for c in cells if c["status"] == "ok") / len(ok))
        if ok
        else 0.0,
        "ok": len(ok),
        "silent": sum(cell["status"] == "silent" for cell in cells),
        "uncovered": sum(cell["status"] == "uncovered" for cell in cells),
    }


def reference_run(shards: list[ShardSpec], step: int | None = None) -> dict:
    """What the spec says `evaluate` must report for these files."""
    visible = []
    for spec in shards:
        name = spec.relpath.rsplit("/", 1)[-1]
        if name.endswith(".h5") and not name.startswith("."):
            visible.append(spec)
    if step is None:
        step = max(spec.step for spec in visible)
    chosen = sorted((spec for spec in visible if spec.step == step), key=lambda spec: spec.rank)
    assert [spec.rank for spec in chosen] == list(range(chosen[0].world_size)), "bad test scenario"

    names = sorted({name for spec in chosen for name in spec.datasets})
    datasets, all_cells = {}, []
    for name in names:
        seen: set[int] = set()
        rows, duplicates, cell_ids, log_rate, n_cells = [], 0, None, False, None
        for spec in chosen:  # rank order
            data = spec.datasets.get(name)
            if data is None:
                continue
            n_cells = data.rhat.shape[1]
            log_rate = _is_rate_log(data.rate_kind)
            cell_ids = data.cell_ids if data.cell_ids is not None else cell_ids
            for i, row in enumerate(reference_rows(data)):
                if data.sample_idx is not None:
                    sample = int(data.sample_idx[i])
                    if sample in seen:
                        duplicates += 1
                        continue
                    seen.add(sample)
                rows.append(row)
        cells = reference_cells(rows, n_cells, log_rate)
        for c, cell in enumerate(cells):
            cell["cell_id"] = None if cell_ids is None else cell_ids[c]
        all_cells.extend(cells)
        datasets[name] = dict(cells=cells, samples=len(rows), duplicates_dropped=duplicates, **reference_summary(cells))
    scored = [d for d in datasets.values() if d["ok"] > 0]
    overall_pooled = reference_summary(all_cells)
    overall = {
        "bps": sum(d["bps"] for d in scored) / len(scored) if scored else None,
        "bps_slack": max((d["bps_slack"] for d in scored), default=0.0),
        "bps_pooled": overall_pooled["bps_pooled"],
        "pooled_slack": overall_pooled["pooled_slack"],
    }
    return {"step": step, "world_size": len(chosen), "datasets": datasets, "overall": overall}


# ----------------------------------------------------------------------------------------------
# bpseval's output in one plain shape, from the DataFrames or from the JSON


def _value(x: Any) -> Any:
    """NaN (how the DataFrames mark undefined) becomes None; numbers become Python floats."""
    if x is None:
        return None
    if isinstance(x, (float, np.floating)) and math.isnan(x):
        return None
    return x


def report_from_result(result: bpseval.Result) -> dict:
    datasets = {
        row["name"]: {
            key: _value(row[key])
            for key in ("samples", "duplicates_dropped", "bps", "bps_pooled", "ok", "silent", "uncovered")
        }
        for row in result.datasets.to_dict("records")
    }
    cells = {
        (row["dataset"], int(row["cell"])): {
            key: _value(row[key]) for key in ("cell_id", "n_valid", "n", "spikes", "ll_gain", "bps", "status")
        }
        for row in result.cells.to_dict("records")
    }
    overall = {key: _value(result.overall.to_dict()[key]) for key in ("bps", "bps_pooled")}
    return {
        "step": result.step,
        "datasets": datasets,
        "cells": cells,
        "overall": overall,
        "n_cell_rows": len(result.cells),
    }


def report_from_json(document: dict) -> dict:
    datasets = {
        entry["name"]: {
            "samples": entry["samples"],
            "duplicates_dropped": entry["duplicates_dropped"],
            "bps": entry["bps"],
            "bps_pooled": entry["bps_pooled"],
            **entry["cells"],
        }
        for entry in document["datasets"]
    }
    cells = {
        (entry["dataset"], entry["cell"]): {
            key: entry[key] for key in ("cell_id", "n_valid", "n", "spikes", "ll_gain", "bps", "status")
        }
        for entry in document["cells"]
    }
    overall = {key: document["overall"][key] for key in ("bps", "bps_pooled")}
    return {
        "step": document["step"],
        "datasets": datasets,
        "cells": cells,
        "overall": overall,
        "n_cell_rows": len(document["cells"]),
    }


def _close(got: Any, want: Any, slack: float = 0.0) -> bool:
    if want is None:
        return got is None
    if got is None:
        return False
    return math.isclose(float(got), want, rel_tol=REL, abs_tol=CANCELLATION * slack)


def cell_mismatches(name: str, got_cells: dict[int, dict], want_cells: list[dict]) -> list[str]:
    """Differences between one dataset's reported cells (by cell index) and the reference cells."""
    problems = []
    if sorted(got_cells) != list(range(len(want_cells))):
        problems.append(f"{name}: cells {sorted(got_cells)} reported, expected 0..{len(want_cells) - 1}")
    for c, cell in enumerate(want_cells):
        where = f"{name}[{c}]"
        row = got_cells.get(c)
        if row is None:
            continue
        if row["n_valid"] != cell["n_valid"]:
            problems.append(f"{where}.n_valid: {row['n_valid']} != {cell['n_valid']}")
        if row["status"] != cell["status"]:
            problems.append(f"{where}.status: {row['status']} != {cell['status']}")
        for key in ("n", "spikes"):
            if not _close(row[key], cell[key]):
                problems.append(f"{where}.{key}: {row[key]} != {cell[key]}")
        if not _close(row["ll_gain"], cell["ll_gain"], cell["magnitude"]):
            problems.append(f"{where}.ll_gain: {row['ll_gain']} != {cell['ll_gain']}")
        bps_slack = cell["magnitude"] / (cell["spikes"] * LN2) if cell["spikes"] > 0 else 0.0
        if not _close(row["bps"], cell["bps"], bps_slack):
            problems.append(f"{where}.bps: {row['bps']} != {cell['bps']}")
        if cell.get("cell_id") is not None and row["cell_id"] != cell["cell_id"]:
            problems.append(f"{where}.cell_id: {row['cell_id']!r} != {cell['cell_id']!r}")
    return problems


def mismatches(report: dict, reference: dict) -> list[str]:
    """Every difference between a bpseval report and the reference, described; empty when they agree."""
    problems = []
    if report["step"] != reference["step"]:
        problems.append(f"step {report['step']} != {reference['step']}")
    if set(report["datasets"]) != set(reference["datasets"]):
        problems.append(f"datasets {sorted(report['datasets'])} != {sorted(reference['datasets'])}")
        return problems
    if {name for name, _ in report["cells"]} != set(reference["datasets"]):
        problems.append(f"cells of datasets {sorted({name for name, _ in report['cells']})} reported")
    for name, want in reference["datasets"].items():
        got = report["datasets"][name]
        for key in ("samples", "duplicates_dropped", "ok", "silent", "uncovered"):
            if got[key] != want[key]:
                problems.append(f"{name}.{key}: {got[key]} != {want[key]}")
        if not _close(got["bps"], want["bps"], want["bps_slack"]):
            problems.append(f"{name}.bps: {got['bps']} != {want['bps']}")
        if not _close(got["bps_pooled"], want["bps_pooled"], want["pooled_slack"]):
            problems.append(f"{name}.bps_pooled: {got['bps_pooled']} != {want['bps_pooled']}")
        got_cells = {c: row for (dataset, c), row in report["cells"].items() if dataset == name}
        problems += cell_mismatches(name, got_cells, want["cells"])
    if report["n_cell_rows"] != len(report["cells"]):
        problems.append(f"{report['n_cell_rows']} cell rows for {len(report['cells'])} distinct (dataset, cell)")
    for key in ("bps", "bps_pooled"):
        slack = reference["overall"]["bps_slack" if key == "bps" else "pooled_slack"]
        if not _close(report["overall"][key], reference["overall"][key], slack):
            problems.append(f"overall.{key}: {report['overall'][key]} != {reference['overall'][key]}")
    return problems


def assert_evaluate_matches_reference(
    run_dir: Path, shards: list[ShardSpec], step: int | None = None
) -> bpseval.Result:
    reference = reference_run(shards, step)
    result = bpseval.evaluate(run_dir, step=step)
    assert mismatches(report_from_result(result), reference) == []
    assert mismatches(report_from_json(json.loads(result.to_json())), reference) == []
    return result


# ----------------------------------------------------------------------------------------------
# The scenario: five datasets covering every shape and dtype of the format, split over ranks


def sampler_indices(n_samples: int, world_size: int, rank: int, permutation: np.ndarray | None = None) -> list[int]:
    """The indices a rank sees: padded by repeating from the start to a multiple of world_size."""
    indices = list(range(n_samples)) if permutation is None else [int(i) for i in permutation]
    total = -(-n_samples // world_size) * world_size
    while len(indices) < total:
        indices += indices[: total - len(indices)]
    return indices[rank::world_size]


def _take(full: DatasetSpec, rows: list[int], with_sample_idx: bool) -> DatasetSpec:
    index = np.asarray(rows, dtype=np.int64)
    return DatasetSpec(
        rhat=full.rhat[index],
        robs=full.robs[index],
        dfs=None if full.dfs is None else full.dfs[index],
        sample_idx=index.copy() if with_sample_idx else None,
        cell_ids=full.cell_ids,
        cell_ids_storage=full.cell_ids_storage,
        rate_kind=full.rate_kind,
    )


def make_alpha(rng: np.random.Generator) -> DatasetSpec:
    """7 cells; (N, C) fractional weights; NaN rhat where dfs = 0; rhat zeros; integer robs;
    float32 rhat; cell 5 uncovered, cell 6 silent; non-ASCII string cell_ids."""
    n, c = 53, 7
    rhat = rng.gamma(2.0, 0.6, (n, c)).astype(np.float32)
    robs = rng.poisson(rhat.astype(np.float64) * 1.4).astype(np.int64)
    dfs = rng.choice([0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0, 1.0], size=(n, c))
    fractional = rng.random((n, c)) < 0.2
    dfs[fractional] = rng.uniform(0.01, 0.99, fractional.sum())
    dfs[:, 5] = 0.0
    robs[:, 6] = 0
    dfs[3, :3] = 1.0
    rhat[3, :3] = 0.0  # hits the 1e-9 floor
    robs[3, 0] = 2  # ... with spikes, so the floor enters the log
    rhat[(dfs == 0.0) & (rng.random((n, c)) < 0.6)] = np.nan
    rhat[10, 5] = np.inf  # invalid values anywhere in an uncovered cell
    return DatasetSpec(rhat, robs, dfs.astype(np.float32), cell_ids=[f"céllule-{i}-ü" for i in range(c)])


def make_beta(rng: np.random.Generator) -> DatasetSpec:
    """3 cells; float16 rhat (zeros included); non-integer float32 robs; (N, 1) weights with NaN
    rhat and robs on zero-weight rows; int64 cell_ids."""
    n, c = 40, 3
    rhat = rng.gamma(2.0, 0.8, (n, c)).astype(np.float16)
    rhat[5, 1] = 0.0
    rhat[7, :] = 0.0
    robs = (rng.gamma(1.5, 1.0, (n, c)) * (rng.random((n, c)) < 0.7)).astype(np.float32)
    dfs = rng.choice([0.0, 0.5, 1.0, 1.0, 1.0], size=(n, 1))
    dfs[rng.random((n, 1)) < 0.2] = 0.3
    dfs[7, 0] = 1.0
    zero_rows = np.flatnonzero(dfs[:, 0] == 0.0)
    rhat[zero_rows[::2]] = np.nan
    robs[zero_rows[1::2]] = np.nan
    return DatasetSpec(rhat, robs, dfs.astype(np.float64), cell_ids=[101, 205, 999], cell_ids_storage="int64")


def make_gamma(rng: np.random.Generator) -> DatasetSpec:
    """12 cells; float64 log-rates (rate_kind stored as bytes); int32 robs; (N,) weights with NaN
    log-rates where dfs = 0; fixed-length UTF-8 cell_ids."""
    n, c = 29, 12
    rhat = rng.normal(-0.5, 1.2, (n, c))
    robs = rng.poisson(np.exp(rhat) * 1.2).astype(np.int32)
    dfs = rng.choice([0.0, 0.7, 1.0, 1.0], size=n)
    rhat[dfs == 0.0, ::3] = np.nan
    return DatasetSpec(
        rhat, robs, dfs, cell_ids=[f"g{i:02d}" for i in range(c)], cell_ids_storage="fixed-utf8", rate_kind=b"log_rate"
    )


def make_delta(rng: np.random.Generator) -> DatasetSpec:
    """5 cells; float64 rhat with zeros; uint16 robs; no dfs; cell 4 silent."""
    n, c = 17, 5
    rhat = rng.gamma(3.0, 0.4, (n, c))
    rhat[::4, 1] = 0.0
    robs = rng.poisson(rhat + 0.3).astype(np.uint16)
    robs[:, 4] = 0
    return DatasetSpec(rhat, robs, None, rate_kind="rate")


def make_epsilon(rng: np.random.Generator) -> DatasetSpec:
    """2 cells and no ok cell: cell 0 silent, cell 1 uncovered. Left out of the overall mean."""
    n, c = 11, 2
    rhat = rng.gamma(2.0, 0.5, (n, c)).astype(np.float32)
    robs = np.zeros((n, c))
    robs[:, 1] = 3.0  # spikes that nobody may count: dfs is 0 there
    dfs = np.ones((n, c), dtype=np.float32)
    dfs[:, 1] = 0.0
    dfs[::3, 0] = 0.5
    return DatasetSpec(rhat, robs, dfs)


def scenario(world_size: int, seed: int = 0) -> list[ShardSpec]:
    """Every file of a run directory for `world_size` ranks at step 7, plus files to ignore."""
    rng = np.random.default_rng(seed + 100 * world_size)
    full = {
        "alpha": make_alpha(rng),
        "beta": make_beta(rng),
        "gamma": make_gamma(rng),
        "delta": make_delta(rng),
        "epsilon": make_epsilon(rng),
    }
    perm_beta = rng.permutation(full["beta"].rhat.shape[0])
    last = world_size - 1
    shards = []
    for rank in range(world_size):
        datasets = {
            "alpha": _take(full["alpha"], sampler_indices(53, world_size, rank), True),
            "beta": _take(full["beta"], sampler_indices(40, world_size, rank, perm_beta), True),
            "delta": _take(full["delta"], sampler_indices(17, world_size, rank), True),
            "epsilon": _take(full["epsilon"], sampler_indices(11, world_size, rank), True),
        }
        # gamma has no sample_idx: contiguous blocks, and the last rank omits it (unless alone).
        blocks = np.array_split(np.arange(29), world_size)
        if world_size == 1 or rank < last:
            datasets["gamma"] = _take(full["gamma"], list(blocks[rank]), False)
        # Ranks named in reverse order, nested at different depths, so path order is not rank order.
        relpath = "final-rank.h5" if rank == last and world_size > 1 else f"val/step7/host{last - rank}/out.h5"
        shards.append(
            ShardSpec(
                relpath,
                rank,
                world_size,
                step=7,
                datasets=datasets,
                text_as_bytes=rank % 2 == 1,
                int_type=np.int32 if rank % 2 else np.int64,
            )
        )
    # An older step, with another world size and a dataset that no longer exists.
    old = make_alpha(rng)
    for rank in range(world_size + 1):
        rows = sampler_indices(53, world_size + 1, rank)
        shards.append(
            ShardSpec(
                f"old/step3/rank{rank}.h5",
                rank,
                world_size + 1,
                step=3,
                datasets={"alpha": _take(old, rows, True), "stale": _take(make_delta(rng), list(range(17)), False)},
            )
        )
    # A hidden shard (would duplicate rank 0) and a .tmp shard (a complete later step) to ignore.
    junk = _take(make_delta(rng), list(range(17)), False)
    shards.append(ShardSpec("val/step7/.rank-0.h5", 0, world_size, step=7, datasets={"alpha": junk}))
    shards.append(ShardSpec("val/step7/x.h5.tmp", 0, 1, step=99, datasets={"junk": junk}))
    return shards


# ----------------------------------------------------------------------------------------------
# evaluate() against the reference


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_number_matches_reference_on_latest_step(tmp_path, world_size):
    shards = scenario(world_size)
    result = assert_evaluate_matches_reference(write_run(tmp_path, shards), shards)
    assert result.step == 7
    assert result.world_size == world_size


@pytest.mark.parametrize("world_size", [1, 3])
def test_explicit_older_step_matches_reference(tmp_path, world_size):
    shards = scenario(world_size, seed=1)
    result = assert_evaluate_matches_reference(write_run(tmp_path, shards), shards, step=3)
    assert set(result.datasets["name"]) == {"alpha", "stale"}


def test_scenario_exercises_every_status_and_edge():
    """Guards the scenario itself: the reference sees padding, all statuses and a dataset without ok cells."""
    reference = reference_run(scenario(3))
    datasets = reference["datasets"]
    assert datasets["alpha"]["duplicates_dropped"] == 1 and datasets["beta"]["duplicates_dropped"] == 2
    assert datasets["alpha"]["uncovered"] == 1 and datasets["alpha"]["silent"] == 1
    assert datasets["delta"]["silent"] == 1
    assert datasets["epsilon"]["ok"] == 0 and datasets["epsilon"]["bps"] is None
    assert datasets["epsilon"]["bps_pooled"] is None
    assert datasets["gamma"]["samples"] < 29  # the last rank omitted its share
    assert all(d["bps"] is not None for name, d in datasets.items() if name != "epsilon")


def test_undefined_values_are_null_in_json(tmp_path):
    shards = scenario(2)
    document = json.loads(bpseval.evaluate(write_run(tmp_path, shards)).to_json())
    cells = {(c["dataset"], c["cell"]): c for c in document["cells"]}
    uncovered, silent = cells[("alpha", 5)], cells[("alpha", 6)]
    assert uncovered["status"] == "uncovered" and uncovered["ll_gain"] is None and uncovered["bps"] is None
    assert silent["status"] == "silent" and silent["bps"] is None and silent["ll_gain"] is not None
    epsilon = next(d for d in document["datasets"] if d["name"] == "epsilon")
    assert epsilon["bps"] is None and epsilon["bps_pooled"] is None


def test_differing_copies_of_a_sample_keep_the_first_in_rank_order(tmp_path):
    """Sample 0 is on both ranks (and twice on rank 1) with different rhat; rank 0's copy counts.

    Rank 1's file sorts first on disk, so the rank attribute, not the path, must decide.
    """
    rng = np.random.default_rng(5)
    base = rng.gamma(2.0, 0.5, (6, 3)).astype(np.float32)
    robs = rng.poisson(base * 2.0).astype(np.float32)
    robs[0] = [4.0, 0.0, 2.0]
    dfs = np.ones((6, 3), dtype=np.float32)
    dfs[0, 1] = 0.5
    rank0 = DatasetSpec(base[[0, 1, 2]], robs[[0, 1, 2]], dfs[[0, 1, 2]], np.array([0, 1, 2]))
    later = base[[3, 4, 0, 5, 0]].copy()
    later[2] *= 3.0  # a copy of sample 0 whose rhat differs far beyond rounding
    later[4] *= 0.25
    rank1 = DatasetSpec(later, robs[[3, 4, 0, 5, 0]], dfs[[3, 4, 0, 5, 0]], np.array([3, 4, 0, 5, 0]))
    shards = [
        ShardSpec("b/rank0.h5", 0, 2, 0, {"ds": rank0}),
        ShardSpec("a/rank1.h5", 1, 2, 0, {"ds": rank1}),
    ]
    result = assert_evaluate_matches_reference(write_run(tmp_path, shards), shards)
    assert result.datasets.set_index("name").loc["ds", "duplicates_dropped"] == 2


def test_fixed_length_byte_string_cell_ids_are_read_as_utf8(tmp_path):
    """cell_ids stored as a numpy 'S' array of UTF-8 bytes (what h5py writes for bytes)."""
    rng = np.random.default_rng(9)
    data = DatasetSpec(
        rng.gamma(2.0, 0.5, (8, 2)),
        rng.poisson(1.0, (8, 2)).astype(np.float64) + 1.0,
        cell_ids=["Zelle-ä", "cell-β"],
        cell_ids_storage="fixed-bytes",
    )
    shards = [ShardSpec("rank0.h5", 0, 1, 0, {"ds": data})]
    assert_evaluate_matches_reference(write_run(tmp_path, shards), shards)


# ----------------------------------------------------------------------------------------------
# bits_per_spike against the reference


def frame_mismatches(frame: Any, cells: list[dict]) -> list[str]:
    """Differences between a `bits_per_spike` frame and the reference cells."""
    got = {int(row["cell"]): {key: _value(value) for key, value in row.items()} for row in frame.to_dict("records")}
    if len(got) != len(frame):
        return [f"{len(frame)} rows for {len(got)} distinct cells"]
    return cell_mismatches("frame", got, cells)


def _numpy_case(dfs_form: str, rate_kind: str, seed: int = 3) -> DatasetSpec:
    rng = np.random.default_rng(seed)
    n, c = 37, 6
    if rate_kind == "log_rate":
        rhat = rng.normal(-0.3, 1.0, (n, c)).astype(np.float32)
        robs = rng.poisson(np.exp(rhat.astype(np.float64))).astype(np.int64)
    else:
        rhat = rng.gamma(2.0, 0.5, (n, c)).astype(np.float32)
        rhat[::7, 2] = 0.0
        robs = rng.poisson(rhat.astype(np.float64) + 0.2).astype(np.int64)
    robs[:, 4] = 0  # silent unless masked away entirely
    if dfs_form == "cells":
        dfs = rng.choice([0.0, 0.4, 1.0, 1.0], size=(n, c))
        dfs[:, 5] = 0.0  # uncovered
        rhat = rhat.copy()
        rhat[(dfs == 0.0) & (rng.random((n, c)) < 0.5)] = np.nan
    elif dfs_form == "column":
        dfs = rng.choice([0.0, 0.6, 1.0], size=(n, 1))
        rhat[dfs[:, 0] == 0.0, 1] = np.nan
    elif dfs_form == "rows":
        dfs = rng.choice([0.0, 0.6, 1.0], size=n)
        rhat[dfs == 0.0, 3] = np.nan
    else:
        dfs = None
    return DatasetSpec(rhat, robs, dfs, rate_kind=rate_kind)


@pytest.mark.parametrize("rate_kind", ["rate", "log_rate"])
@pytest.mark.parametrize("dfs_form", ["cells", "column", "rows", "absent"])
def test_bits_per_spike_numpy_matches_reference(dfs_form, rate_kind):
    data = _numpy_case(dfs_form, rate_kind)
    frame = bpseval.bits_per_spike(data.rhat, data.robs, data.dfs, rate_kind=rate_kind)
    cells = reference_cells(reference_rows(data), data.rhat.shape[1], rate_kind == "log_rate")
    assert list(frame["cell"]) == list(range(data.rhat.shape[1]))
    assert frame_mismatches(frame, cells) == []


def _torch_values(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n, c = 45, 5
    rhat = torch.rand((n, c), generator=generator) * 3.0 + 0.01
    robs = torch.poisson(rhat * 1.3, generator=generator)
    if dtype == torch.bfloat16:
        # Values float16 cannot hold: a conversion through float16 would overflow or flush them.
        rhat[0, 0], robs[0, 0] = 3.0e5, 250.0
        rhat[1, 1], robs[1, 1] = 2.0e-8, 1.0
    dfs = (torch.rand((n, c), generator=generator) > 0.25).to(torch.float32) * 0.75
    dfs[0, 0] = dfs[1, 1] = 1.0
    return rhat.to(dtype), robs.to(dtype), dfs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_bits_per_spike_torch_matches_reference_on_exact_tensor_values(dtype):
    rhat, robs, dfs = _torch_values(dtype, seed=11)
    frame = bpseval.bits_per_spike(rhat, robs, dfs)
    data = DatasetSpec(
        rhat.to(torch.float64).numpy(), robs.to(torch.float64).numpy(), dfs.to(torch.float64).numpy()
    )  # float64 holds every float32/float16/bfloat16 value exactly
    cells = reference_cells(reference_rows(data), data.rhat.shape[1], False)
    assert frame_mismatches(frame, cells) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bits_per_spike_torch_log_rates_and_bool_mask_match_reference(dtype):
    generator = torch.Generator().manual_seed(4)
    log_rate = (torch.randn((30, 4), generator=generator) * 0.8 - 0.2).to(dtype)
    robs = torch.poisson(log_rate.float().exp(), generator=generator).to(torch.int64)
    mask = torch.rand((30, 1), generator=generator) > 0.3
    frame = bpseval.bits_per_spike(log_rate, robs, mask, rate_kind="log_rate")
    data = DatasetSpec(log_rate.to(torch.float64).numpy(), robs.numpy(), mask.to(torch.float64).numpy())
    cells = reference_cells(reference_rows(data), 4, True)
    assert frame_mismatches(frame, cells) == []


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize("masked", [False, True])
def test_centred_sums_of_counts_near_1e15_with_a_spread_of_10_are_exact(namespace, masked, monkeypatch):
    """Means of values near 1e15 are off by a tenth in float64; the centred sums must not inherit that."""
    monkeypatch.setenv("BPSEVAL_KERNEL", "numpy")
    rng = np.random.default_rng(12)
    rates = 1e15 + rng.normal(0.0, 10.0, size=(3000, 2))
    counts = np.round(rates + rng.normal(0.0, 2.0, size=rates.shape))
    weights = (rng.random((3000, 1)) > 0.3).astype(np.float32) if masked else None
    convert = torch.as_tensor if namespace == "torch" else np.asarray
    stats = bpseval.kernel.stats.batch_stats(
        convert(rates), convert(counts), None if weights is None else convert(weights)
    ).map(lambda values: np.asarray(values))
    corr = bpseval.kernel.stats.cell_scores(stats).corr
    valid = np.ones(3000, dtype=bool) if weights is None else weights[:, 0] > 0
    for cell in range(2):  # differences from 1e15 are exact: both sides are multiples of 0.125 there
        rate, count = rates[valid, cell] - 1e15, counts[valid, cell] - 1e15
        assert corr[cell] == pytest.approx(np.corrcoef(rate, count)[0, 1], rel=1e-9)
        assert stats.count_m2[cell] == pytest.approx(((count - count.mean()) ** 2).sum(), rel=1e-9)
