"""Deviance explained and correlation equal a plain per-cell float64 reference (issue 16, "Done when").

The reference below is written from the definitions, independently of the kernel: for each cell,
numpy on its valid entries (dfs > 0), in float64,

    D = 2 Σ w [y ln(y/λ) − (y − λ)]  (y ln y = 0 at y = 0),  pseudo_r2 = 1 − D_model / D_null,
    null λ the cell's weighted mean count;  corr = weighted Pearson correlation of λ and y (weights dfs),

pseudo_r2 undefined where the valid counts are all equal, corr also where the valid rates are.
Per dataset: pseudo_r2 and corr the means over ok cells where defined, pseudo_r2_pooled
1 − ΣD_model / ΣD_null over every covered cell (silent ones included); overall: the means of the
datasets' values, and the pooled ratio over every covered cell of every dataset.

bpseval must match it to 1e-9 relative on sharded, duplicated (sample_idx repeated across ranks),
weighted (fractional dfs) and bfloat16 inputs, through `bpseval compute` on real shards,
`evaluate()`, `bits_per_spike` and `DistributedBPS` (gloo, 2 processes), whose result is also the
offline one of the shards written in the same pass.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bpseval
from bpseval import ShardWriter
from bpseval.features.planning import distributed_sampler_indices
from bpseval.kernel.cellstats import GREATEST_FIELDS, LEAST_FIELDS, STAT_FIELDS, CellStats
from bpseval.kernel.stats import batch_stats, reduce_rows
from bpseval.torch import DistributedBPS
from tests.gloo import run_gloo

REL = 1e-9
N_ROWS, N_CELLS, BATCH = 61, 8, 8
SILENT_CELL, CONSTANT_COUNTS_CELL, CONSTANT_RATE_CELL, UNCOVERED_CELL = 4, 5, 6, 7


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Variant:
    """One kind of input: how the validation set is dealt to ranks, weighted and typed."""

    name: str
    world_size: int = 3
    padding: bool = False
    """DistributedSampler padding: the first samples repeated on other ranks, with their sample_idx."""
    weighted: bool = False
    """Fractional dfs in (0, 1] besides 0."""
    bf16: bool = False
    """rhat given as bfloat16 tensors."""


VARIANTS = [
    Variant("sharded"),
    Variant("duplicated", padding=True, world_size=3),
    Variant("weighted", weighted=True),
    Variant("bf16", bf16=True, weighted=True, padding=True),
]


def validation_set(seed: int, variant: Variant) -> dict[str, np.ndarray]:
    """A dataset's whole validation set: ordinary cells 0-3, a silent cell, a cell of constant counts, one of
    constant rate (0.1) and an uncovered one. rhat holds exactly the values the model gives (bf16 ones if so)."""
    rng = np.random.default_rng(seed)
    signal = rng.gamma(2.0, 0.5, size=(N_ROWS, 1))
    truth = signal * rng.gamma(3.0, 0.3, size=(1, N_CELLS))
    rhat = (truth * rng.lognormal(0.0, 0.3, size=truth.shape)).astype(np.float32)
    robs = rng.poisson(truth).astype(np.float32)
    rhat[:, CONSTANT_RATE_CELL] = 0.1
    robs[:, SILENT_CELL] = 0.0
    robs[:, CONSTANT_COUNTS_CELL] = 2.0
    if variant.bf16:
        rhat = torch.from_numpy(rhat).to(torch.bfloat16).to(torch.float32).numpy()
    if variant.weighted:
        dfs = rng.choice(np.array([0.0, 0.25, 0.5, 0.9, 1.0], dtype=np.float32), size=(N_ROWS, N_CELLS))
    else:
        dfs = (rng.random((N_ROWS, N_CELLS)) > 0.2).astype(np.float32)
    dfs[:, UNCOVERED_CELL] = 0.0
    return {"rhat": rhat, "robs": robs, "dfs": dfs}


def datasets_of(variant: Variant) -> dict[str, dict[str, np.ndarray]]:
    return {"A": validation_set(1, variant), "B": validation_set(2, variant)}


def rank_rows(variant: Variant, rank: int, world_size: int) -> np.ndarray:
    """The sample indices a rank scores: every world_size-th, padded as DistributedSampler pads when asked."""
    if variant.padding:
        return distributed_sampler_indices(N_ROWS, world_size, rank)
    return np.arange(rank, N_ROWS, world_size)


def batches(variant: Variant, arrays: dict[str, np.ndarray], rows: np.ndarray) -> list[dict[str, Any]]:
    """The rank's batches as a training loop gives them: torch tensors (rhat bfloat16 if so) and sample_idx."""
    out = []
    for start in range(0, len(rows), BATCH):
        index = rows[start : start + BATCH]
        rhat = torch.from_numpy(arrays["rhat"][index])
        out.append(
            {
                "rhat": rhat.to(torch.bfloat16) if variant.bf16 else rhat,
                "robs": torch.from_numpy(arrays["robs"][index]),
                "dfs": torch.from_numpy(arrays["dfs"][index]),
                "sample_idx": torch.from_numpy(index),
            }
        )
    return out


def write_shards(
    run: Path, variant: Variant, store: str = "raw", ranks: range | None = None, world_size: int = 0
) -> Path:
    """Shards of `variant` as ShardWriter writes them during validation, one per rank."""
    world_size = world_size or variant.world_size
    for rank in ranks if ranks is not None else range(world_size):
        with ShardWriter(run, rank, world_size, store=store) as writer:
            for name, arrays in datasets_of(variant).items():
                for batch in batches(variant, arrays, rank_rows(variant, rank, world_size)):
                    writer.add(name, batch["rhat"], batch["robs"], batch["dfs"], sample_idx=batch["sample_idx"])
    return run


# ----------------------------------------------------------------------------------------------
# The reference: per cell, numpy on the valid entries, float64


@dataclass(frozen=True)
class CellReference:
    status: str
    pseudo_r2: float | None
    corr: float | None
    model_deviance: float
    null_deviance: float


def reference_cell(rhat: np.ndarray, robs: np.ndarray, dfs: np.ndarray) -> CellReference:
    valid = dfs > 0
    w = dfs[valid].astype(np.float64)
    y = robs[valid].astype(np.float64)
    rate = np.maximum(rhat[valid].astype(np.float64), 1e-9)
    if not len(w):
        return CellReference("uncovered", None, None, 0.0, 0.0)
    y_log_y = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0)
    model_deviance = 2.0 * np.sum(w * (y_log_y - y * np.log(rate) - (y - rate)))
    mean_count = np.sum(w * y) / np.sum(w)
    constant_counts = bool(np.all(y == y[0]))
    null_deviance = 0.0 if constant_counts else 2.0 * np.sum(w * (y_log_y - y * np.log(mean_count)))
    if mean_count == 0:
        return CellReference("silent", None, None, float(model_deviance), 0.0)
    pseudo_r2 = None if constant_counts else float(1.0 - model_deviance / null_deviance)
    corr = None
    if not constant_counts and not np.all(rate == rate[0]):
        rate_step, count_step = rate - np.sum(w * rate) / np.sum(w), y - mean_count
        corr = float(
            np.sum(w * rate_step * count_step) / math.sqrt(np.sum(w * rate_step**2) * np.sum(w * count_step**2))
        )
    return CellReference("ok", pseudo_r2, corr, float(model_deviance), float(null_deviance))


def _mean(values: list[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else None


def _pooled(cells: list[CellReference]) -> float | None:
    covered = [cell for cell in cells if cell.status != "uncovered"]
    null = sum(cell.null_deviance for cell in covered)
    return 1.0 - sum(cell.model_deviance for cell in covered) / null if null > 0 else None


def reference(datasets: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per cell, per dataset and overall pseudo_r2, pseudo_r2_pooled and corr of the validation sets."""
    cells = {
        name: [reference_cell(a["rhat"][:, c], a["robs"][:, c], a["dfs"][:, c]) for c in range(N_CELLS)]
        for name, a in datasets.items()
    }
    per_dataset = {
        name: {
            "pseudo_r2": _mean([cell.pseudo_r2 for cell in of if cell.status == "ok"]),
            "pseudo_r2_pooled": _pooled(of),
            "corr": _mean([cell.corr for cell in of if cell.status == "ok"]),
        }
        for name, of in cells.items()
    }
    overall = {
        "pseudo_r2": _mean([entry["pseudo_r2"] for entry in per_dataset.values()]),
        "pseudo_r2_pooled": _pooled([cell for of in cells.values() for cell in of]),
        "corr": _mean([entry["corr"] for entry in per_dataset.values()]),
    }
    return {"cells": cells, "datasets": per_dataset, "overall": overall}


def test_the_reference_covers_every_case_it_must():
    """Ordinary cells defined, the special cells undefined as the definitions say: the checks below are not empty."""
    for variant in VARIANTS:
        for of in reference(datasets_of(variant))["cells"].values():
            assert all(cell.pseudo_r2 is not None and cell.corr is not None for cell in of[:SILENT_CELL])
            assert [cell.status for cell in of[SILENT_CELL:]] == ["silent", "ok", "ok", "uncovered"]
            assert of[CONSTANT_COUNTS_CELL].pseudo_r2 is None and of[CONSTANT_COUNTS_CELL].corr is None
            assert of[CONSTANT_RATE_CELL].pseudo_r2 is not None and of[CONSTANT_RATE_CELL].corr is None


# ----------------------------------------------------------------------------------------------
# Comparison


def _value(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def assert_close(got: Any, want: float | None, what: str) -> None:
    got = _value(got)
    if want is None or got is None:
        assert got == want, f"{what}: {got} != {want}"
    else:
        assert abs(got - want) <= REL * abs(want), f"{what}: {got!r} != {want!r} (relative {abs(got / want - 1):.3g})"


def assert_document_matches(document: dict[str, Any], want: dict[str, Any]) -> None:
    """A `compute --json` / `Result.to_dict()` document holds the reference's numbers, per cell and above."""
    for cell in document["cells"]:
        expected = want["cells"][cell["dataset"]][cell["cell"]]
        assert cell["status"] == expected.status
        for metric in ("pseudo_r2", "corr"):
            assert_close(cell[metric], getattr(expected, metric), f"{cell['dataset']} cell {cell['cell']} {metric}")
    assert len(document["cells"]) == 2 * N_CELLS
    for entry in document["datasets"]:
        for metric, expected in want["datasets"][entry["name"]].items():
            assert_close(entry[metric], expected, f"dataset {entry['name']} {metric}")
    for metric, expected in want["overall"].items():
        assert_close(document["overall"][metric], expected, f"overall {metric}")


# ----------------------------------------------------------------------------------------------
# Offline: bpseval compute, evaluate(), bits_per_spike

CASES = [
    (variant, store) for variant in VARIANTS for store in ("raw", "stats") if not (store == "stats" and variant.padding)
]
"""Stats-only shards cannot drop a sample repeated across ranks (they keep no rows; `compute` says so), so
padded runs are checked with raw shards only."""


@pytest.mark.parametrize(("variant", "store"), CASES, ids=[f"{v.name}-{store}" for v, store in CASES])
def test_compute_and_evaluate_on_real_shards_match_the_reference(invoke, tmp_path, variant, store):
    run = write_shards(tmp_path / "run", variant, store)
    want = reference(datasets_of(variant))
    result = invoke("compute", run, "--json", "-", "--no-cache")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    repeats = len(np.concatenate([rank_rows(variant, rank, variant.world_size) for rank in range(3)])) - N_ROWS
    assert [entry["duplicates_dropped"] for entry in document["datasets"]] == [repeats, repeats]
    assert repeats == (2 if variant.padding else 0)
    assert_document_matches(document, want)
    assert_document_matches(bpseval.evaluate(run).to_dict(), want)


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant.name for variant in VARIANTS])
def test_bits_per_spike_in_memory_matches_the_reference(variant):
    datasets = datasets_of(variant)
    for arrays, cells in zip(datasets.values(), reference(datasets)["cells"].values(), strict=True):
        rhat = torch.from_numpy(arrays["rhat"]).to(torch.bfloat16) if variant.bf16 else arrays["rhat"]
        frame = bpseval.bits_per_spike(rhat, arrays["robs"], arrays["dfs"])
        for cell, expected in enumerate(cells):
            assert frame["status"][cell] == expected.status
            for metric in ("pseudo_r2", "corr"):
                assert_close(frame[metric][cell], getattr(expected, metric), f"cell {cell} {metric}")


# ----------------------------------------------------------------------------------------------
# Online: DistributedBPS on 2 gloo processes, and the shards written in the same pass


def online_worker(rank: int, world_size: int, out: str) -> None:
    """Each variant: update the metric and write a shard from the same batches; save compute()'s document."""
    torch.set_num_threads(1)
    documents = {}
    for step, variant in enumerate(VARIANTS):
        metric = DistributedBPS(dedup_window=2)
        with ShardWriter(Path(out) / "run", rank, world_size, step=step) as writer:
            for name, arrays in datasets_of(variant).items():
                for batch in batches(variant, arrays, rank_rows(variant, rank, world_size)):
                    metric.update(name, batch["rhat"], batch["robs"], batch["dfs"], sample_idx=batch["sample_idx"])
                    writer.add(name, batch["rhat"], batch["robs"], batch["dfs"], sample_idx=batch["sample_idx"])
        documents[variant.name] = metric.compute(step=step).to_dict()
    (Path(out) / f"rank-{rank}.pkl").write_bytes(pickle.dumps(documents))


@pytest.fixture(scope="module")
def online_run(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("online")
    run_gloo(online_worker, 2, str(out))
    return out / "run", [pickle.loads((out / f"rank-{rank}.pkl").read_bytes()) for rank in range(2)]


@pytest.mark.parametrize("step", range(len(VARIANTS)), ids=[variant.name for variant in VARIANTS])
def test_distributed_bps_matches_the_reference_and_the_offline_merge_on_every_rank(online_run, step):
    run, ranks = online_run
    variant = VARIANTS[step]
    offline = bpseval.evaluate(run, step).to_dict()
    want = reference(datasets_of(variant))
    assert_document_matches(offline, want)
    for documents in ranks:
        online = documents[variant.name]
        assert_document_matches(online, want)
        for key in ("pseudo_r2", "pseudo_r2_pooled", "corr"):
            assert_close(online["overall"][key], offline["overall"][key], f"online overall {key}")
        for got, expected in zip(online["cells"], offline["cells"], strict=True):
            for key in ("pseudo_r2", "corr"):
                assert_close(got[key], _value(expected[key]), f"online {got['dataset']} cell {got['cell']} {key}")


# ----------------------------------------------------------------------------------------------
# Exact constancy, and merges in any order


def test_a_constant_rate_over_three_shards_has_no_corr_although_its_centred_sum_is_not_zero(tmp_path):
    rng = np.random.default_rng(4)
    robs = rng.poisson(1.0, size=(30, 1)).astype(np.float32)
    dfs = rng.choice(np.array([0.3, 0.7, 1.0], dtype=np.float32), size=(30, 1))
    for rank, rows in enumerate((slice(0, 7), slice(7, 19), slice(19, 30))):
        with ShardWriter(tmp_path, rank, 3) as writer:
            writer.add("d", np.full((30, 1), 0.1)[rows], robs[rows], dfs[rows], sample_idx=np.arange(30)[rows])
    result = bpseval.evaluate(tmp_path)
    stats = result.scored.dataset("d").stats
    assert stats.rate_m2[0] > 0  # rounding leaves the centred sum of a constant just above 0
    assert stats.rate_min[0] == stats.rate_max[0] == 0.1
    assert result.cells["status"].tolist() == ["ok"] and math.isnan(result.cells["corr"][0])
    assert math.isfinite(result.cells["pseudo_r2"][0])
    assert math.isnan(result.datasets["corr"][0]) and math.isnan(result.overall.corr)


def test_constant_counts_have_neither_pseudo_r2_nor_corr_and_count_zero_in_the_pooled_null_deviance():
    rhat = np.random.default_rng(5).gamma(2.0, 0.5, size=(20, 2))
    robs = np.stack([np.full(20, 3.0), np.arange(20.0) % 4], axis=1)
    frame = bpseval.bits_per_spike(rhat, robs, np.full((20, 1), 0.3))
    assert frame["status"].tolist() == ["ok", "ok"]
    assert frame["pseudo_r2"].isna().tolist() == [True, False] and frame["corr"].isna().tolist() == [True, False]


@st.composite
def rows_and_split(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], list[int]]:
    n_rows = draw(st.integers(1, 30))
    values = st.floats(0.0, 50.0, allow_subnormal=False)
    rhat = np.array(draw(st.lists(values, min_size=3 * n_rows, max_size=3 * n_rows))).reshape(n_rows, 3)
    counts = st.sampled_from([0.0, 1.0, 2.0, 3.0, 7.0, 0.5])
    robs = np.array(draw(st.lists(counts, min_size=3 * n_rows, max_size=3 * n_rows))).reshape(n_rows, 3)
    weights = st.sampled_from([0.0, 0.1, 0.5, 1.0])
    dfs = np.array(draw(st.lists(weights, min_size=3 * n_rows, max_size=3 * n_rows))).reshape(n_rows, 3)
    cuts = sorted(draw(st.lists(st.integers(0, n_rows), max_size=5)))
    parts = [0, *cuts, n_rows]
    order = draw(st.permutations(range(len(parts) - 1)))
    return rhat, robs, dfs, parts, order


def assert_same_statistics(merged: CellStats, whole: CellStats) -> None:
    for name in STAT_FIELDS:
        got, want = getattr(merged, name), getattr(whole, name)
        if name == "n_valid" or name in LEAST_FIELDS + GREATEST_FIELDS:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=name)


@settings(max_examples=200, deadline=None)
@given(rows_and_split())
def test_merging_in_any_order_and_any_sharding_gives_the_same_moments_and_identical_extremes(case):
    rhat, robs, dfs, parts, order = case
    whole = batch_stats(rhat, robs, dfs)
    pieces = [batch_stats(rhat[a:b], robs[a:b], dfs[a:b]) for a, b in itertools.pairwise(parts)]
    folded = CellStats.zeros(3)
    for index in order:
        folded = folded + pieces[index]
    assert_same_statistics(folded, whole)
    stacked = CellStats(**{name: np.stack([getattr(pieces[i], name) for i in order]) for name in STAT_FIELDS})
    assert_same_statistics(reduce_rows(stacked), whole)
    halves = reduce_rows(stacked.map(lambda values: values[: len(order) // 2]))
    assert_same_statistics(halves + reduce_rows(stacked.map(lambda values: values[len(order) // 2 :])), whole)


@pytest.mark.parametrize("counts", [None, np.zeros(0), np.zeros((4, 0))], ids=["no counts", "1-D", "2-D"])
def test_merging_no_row_gives_the_statistics_of_no_sample(counts):
    merged = reduce_rows(CellStats.zeros((0, 3)), counts)
    shape = (3,) if counts is None or counts.ndim == 1 else (4, 3)
    assert_same_statistics(merged, CellStats.zeros(shape))
