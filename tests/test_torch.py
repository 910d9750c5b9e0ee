"""DistributedBPS and WithSampleIndex: real gloo runs with 2 and 3 processes, checked against the offline merge."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import bpseval
from bpseval import BpsevalError, ShardWriter
from bpseval.api import Result
from bpseval.torch import DistributedBPS, WithSampleIndex
from tests.gloo import run_gloo

BATCH = 4
LATE_CELL, LATE_SAMPLE = 4, 7
"""Cell 4 of dataset A is valid at sample 7 only: after one batch per rank, most ranks have none."""


def sessions() -> dict[str, dict[str, torch.Tensor]]:
    """Three small datasets, the same on every rank: N not divisible by 2 or 3, N < world size, bfloat16."""
    rng = np.random.default_rng(0)
    rhat = rng.gamma(2.0, 0.5, size=(23, 5))
    dfs = rng.random((23, 5)) > 0.2
    dfs[:, LATE_CELL] = False
    dfs[LATE_SAMPLE, LATE_CELL] = True
    robs = rng.poisson(rhat)
    robs[LATE_SAMPLE, LATE_CELL] = 2
    rhat_b = rng.gamma(2.0, 0.5, size=(10, 3))
    rhat_c = rng.gamma(2.0, 0.5, size=(2, 2))
    return {
        "A": {
            "rhat": torch.tensor(rhat, dtype=torch.float32),
            "robs": torch.tensor(robs, dtype=torch.float32),
            "dfs": torch.tensor(dfs, dtype=torch.float32),
        },
        "B": {
            "rhat": torch.tensor(rhat_b, dtype=torch.bfloat16),
            "robs": torch.tensor(rng.poisson(rhat_b)),
            "dfs": torch.tensor(rng.random((10, 1)) > 0.3),
        },
        "C": {
            "rhat": torch.tensor(rhat_c, dtype=torch.float64),
            "robs": torch.tensor(rng.poisson(rhat_c), dtype=torch.float64),
        },
    }


class DictDataset(torch.utils.data.Dataset):
    """A user's dataset of dict items, without sample_idx."""

    def __init__(self, arrays: dict[str, torch.Tensor]) -> None:
        self.arrays = arrays
        self.n_cells = arrays["rhat"].shape[1]

    def __len__(self) -> int:
        return len(self.arrays["rhat"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.arrays.items()}


@dataclass(frozen=True)
class Case:
    """One validation pass: the sampler's settings, what is given, and who scores what."""

    name: str
    shuffle: bool = False
    drop_last: bool = False
    with_sample_idx: bool = True
    batches: int | None = None  # per rank and dataset; None = all (limit_val_batches=1.0)
    dedup_window: int = 8
    empty_rank: bool = False  # the last rank scores no batch at all


CASES = {
    0: Case("in order"),
    1: Case("shuffled, window of 1", shuffle=True, dedup_window=1),
    2: Case("without sample_idx", with_sample_idx=False),
    3: Case("drop_last", drop_last=True),
    4: Case("first batch only", batches=1),
    5: Case("a rank without data", empty_rank=True),
}
"""Shard step -> case. Dataset B is never scored on rank 1."""


def validation_pass(rank: int, world_size: int, case: Case, run_dir: Path, step: int) -> Result:
    """Score every dataset the way a training loop does, writing shards and updating the metric alike."""
    metric = DistributedBPS(dedup_window=case.dedup_window)
    with ShardWriter(run_dir, rank, world_size, step=step) as writer:
        for name, arrays in sessions().items():
            if (name == "B" and rank == 1) or (case.empty_rank and rank == world_size - 1):
                continue
            dataset = WithSampleIndex(DictDataset(arrays))
            sampler = DistributedSampler(
                dataset, world_size, rank, shuffle=case.shuffle, seed=3, drop_last=case.drop_last
            )
            for number, batch in enumerate(DataLoader(dataset, batch_size=BATCH, sampler=sampler)):
                if case.batches is not None and number == case.batches:
                    break
                index = batch["sample_idx"] if case.with_sample_idx else None
                writer.add(name, batch["rhat"], batch["robs"], batch.get("dfs"), sample_idx=index)
                metric.update(name, batch["rhat"], batch["robs"], batch.get("dfs"), sample_idx=index)
    return metric.compute(step=step)


def failing_pass(rank: int, world_size: int, kind: str) -> str:
    """A pass that compute() must refuse on every rank alike; returns the message."""
    arrays = sessions()["A"]
    metric = DistributedBPS(dedup_window=2)
    if kind == "late duplicate":  # rank 1 scores sample 0 (also on rank 0) first, then 3 more samples
        rows = {0: [0, 2, 4], 1: [0, 1, 3, 5]}.get(rank, [6])
        metric.update("A", arrays["rhat"][rows], arrays["robs"][rows], arrays["dfs"][rows], sample_idx=rows)
    elif kind == "position in batch":  # each rank numbers its own rows 0, 1, 2
        rows = np.arange(3) + 3 * rank
        metric.update("A", arrays["rhat"][rows], arrays["robs"][rows], arrays["dfs"][rows], sample_idx=np.arange(3))
    else:  # "cell mismatch": rank 1 gives one cell fewer
        cells = 4 if rank == 1 else 5
        metric.update("A", arrays["rhat"][:3, :cells], arrays["robs"][:3, :cells])
    try:
        metric.compute()
    except BpsevalError as error:
        return str(error)
    return "no error"


def worker(rank: int, world_size: int, out: str) -> None:
    torch.set_num_threads(1)
    run_dir = Path(out) / "run"
    results = {step: validation_pass(rank, world_size, case, run_dir, step) for step, case in CASES.items()}
    results["errors"] = {
        kind: failing_pass(rank, world_size, kind) for kind in ("late duplicate", "position in batch", "cell mismatch")
    }
    (Path(out) / f"rank-{rank}.pkl").write_bytes(pickle.dumps(results))


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def gloo_run(request, tmp_path_factory) -> tuple[int, Path, list[dict]]:
    """One real gloo run per world size: every case, every rank's results, and the shards."""
    out = tmp_path_factory.mktemp(f"world{request.param}")
    run_gloo(worker, request.param, str(out))
    ranks = [pickle.loads((out / f"rank-{rank}.pkl").read_bytes()) for rank in range(request.param)]
    return request.param, out / "run", ranks


CELL_EXACT = ["dataset", "cell", "cell_id", "n_valid", "status"]
CELL_CLOSE = ["n", "spikes", "ll_gain", "bps", "pseudo_r2", "corr"]
DATASET_EXACT = ["name", "samples", "duplicates_dropped", "ok", "silent", "uncovered", "identity"]
DATASET_CLOSE = ["bps", "bps_pooled", "pseudo_r2", "pseudo_r2_pooled", "corr"]


def assert_same_scores(online: Result, offline: Result, rtol: float = 1e-9) -> None:
    """The documented per-cell, per-dataset and overall values agree: counts exactly, values to rtol."""
    pd.testing.assert_frame_equal(online.cells[CELL_EXACT], offline.cells[CELL_EXACT])
    np.testing.assert_allclose(
        online.cells[CELL_CLOSE].to_numpy(float), offline.cells[CELL_CLOSE].to_numpy(float), rtol=rtol
    )
    pd.testing.assert_frame_equal(online.datasets[DATASET_EXACT], offline.datasets[DATASET_EXACT])
    np.testing.assert_allclose(
        online.datasets[DATASET_CLOSE].to_numpy(float), offline.datasets[DATASET_CLOSE].to_numpy(float), rtol=rtol
    )
    for key, value in offline.overall.to_dict().items():
        if isinstance(value, float):
            assert online.overall.to_dict()[key] == pytest.approx(value, rel=rtol, nan_ok=True), key
        else:
            assert online.overall.to_dict()[key] == value, key
    assert (online.step, online.world_size, online.files) == (offline.step, offline.world_size, [])


@pytest.mark.parametrize("step", list(CASES), ids=[case.name for case in CASES.values()])
def test_compute_equals_bpseval_compute_on_the_shards_of_the_same_run(gloo_run, step):
    _world_size, run_dir, ranks = gloo_run
    offline = bpseval.evaluate(run_dir, step=step)
    for results in ranks:
        assert_same_scores(results[step], offline)
        pd.testing.assert_frame_equal(results[step].cells, ranks[0][step].cells)  # bitwise equal on every rank


def padding(n_samples: int, world_size: int) -> int:
    return math.ceil(n_samples / world_size) * world_size - n_samples


def test_padding_copies_count_once_with_sample_idx_and_twice_without(gloo_run):
    world_size, _, ranks = gloo_run
    for step in (0, 1):  # in order and shuffled
        frame = ranks[0][step].datasets.set_index("name")
        for name, n_samples in (("A", 23), ("C", 2)):
            assert frame.loc[name, ["samples", "duplicates_dropped"]].tolist() == [
                n_samples,
                padding(n_samples, world_size),
            ]
    without = ranks[0][2].datasets.set_index("name")
    assert without.loc["A", "samples"] == 23 + padding(23, world_size)
    assert (without["duplicates_dropped"] == 0).all()
    assert (ranks[0][3].datasets["duplicates_dropped"] == 0).all()


def test_seed_scenario_a_cell_without_valid_samples_on_some_ranks_is_scored_from_the_others(gloo_run):
    world_size, run_dir, ranks = gloo_run
    per_rank = bpseval.check_coverage(run_dir, min_samples=10**6, step=4).cells.set_index(["dataset", "cell"])
    counts = per_rank.loc[("A", LATE_CELL), "per_rank"]
    assert sorted(counts) == [0] * (world_size - 1) + [1]
    cell = ranks[0][4].cells.set_index(["dataset", "cell"]).loc[("A", LATE_CELL)]
    assert cell["status"] == "ok" and cell["n_valid"] == 1


def test_a_rank_without_any_batch_takes_part(gloo_run):
    world_size, _, ranks = gloo_run
    result = ranks[-1][5]
    assert result.world_size == world_size and set(result.datasets["name"]) == {"A", "B", "C"}


def test_a_duplicate_outside_the_window_or_disagreeing_ranks_raise_the_same_error_on_every_rank(gloo_run):
    _, _, ranks = gloo_run
    messages = [results["errors"] for results in ranks]
    assert all(message == messages[0] for message in messages)
    assert "sample_idx 0 was scored on rank 0 and again on rank 1" in messages[0]["late duplicate"]
    assert "not among the last 2 samples" in messages[0]["late duplicate"]
    assert "has 4 cells but 5 in rank 0" in messages[0]["cell mismatch"]
    position = messages[0]["position in batch"]
    assert "sample_idx 0 was given on rank 0 and on rank 1 with different robs or dfs" in position
    assert "dedup_window" not in position


# ----------------------------------------------------------------------------------------------
# The duplicate rule holds for every DistributedSampler split (no processes needed).


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_distributed_sampler_duplicate_is_the_last_sample_of_a_higher_rank(world_size, shuffle, drop_last):
    for n_samples in range(1, 40):
        orders = [
            list(
                DistributedSampler(
                    range(n_samples), world_size, rank, shuffle=shuffle, seed=n_samples, drop_last=drop_last
                )
            )
            for rank in range(world_size)
        ]
        seen_below: set[int] = set()
        for order in orders:
            repeated = [position for position, sample in enumerate(order) if sample in seen_below]
            assert repeated in ([], [len(order) - 1]), (n_samples, orders)
            seen_below |= set(order)


# ----------------------------------------------------------------------------------------------
# A single process, without torch.distributed.


def shards_result(tmp_path: Path, batches: list[tuple]) -> Result:
    with ShardWriter(tmp_path, 0, 1) as writer:
        for batch in batches:
            writer.add(*batch)
    return bpseval.evaluate(tmp_path)


def test_without_a_process_group_compute_treats_the_process_as_the_only_rank(tmp_path):
    data = sessions()["A"]
    batches = [
        ("A", data["rhat"][rows], data["robs"][rows], data["dfs"][rows], torch.tensor(rows))
        for rows in ([0, 1, 2, 1], [3, 4, 0], list(range(5, 23)), [22, 5])
    ]
    metric = DistributedBPS()
    for batch in batches:
        metric.update(*batch)
    result = metric.compute()
    assert_same_scores(result, shards_result(tmp_path, batches))
    assert result.datasets["duplicates_dropped"].tolist() == [4] and result.world_size == 1
    assert_same_scores(metric.compute(), result, rtol=0)  # compute leaves the state as it was
    metric.reset()
    assert metric.compute().datasets.empty


@pytest.mark.parametrize("dedup_window", [8, 64])
def test_sample_idx_that_is_the_position_in_the_batch_is_refused_not_taken_for_duplicates(dedup_window):
    """torch.arange(B) as sample_idx: every batch repeats 0..B-1 with other data; never scored as duplicates."""
    rng = np.random.default_rng(9)
    metric = DistributedBPS(dedup_window=dedup_window)
    for _ in range(10):
        rhat = torch.tensor(rng.gamma(2.0, 0.5, size=(32, 4)), dtype=torch.float32)
        metric.update("s", rhat, torch.poisson(rhat), sample_idx=torch.arange(32))
    with pytest.raises(
        BpsevalError, match="sample_idx 0 was given twice on rank 0 with different robs or dfs"
    ) as error:
        metric.compute()
    assert "not its position in the batch" in str(error.value) and "dedup_window" not in str(error.value)
    with pytest.raises(BpsevalError, match="different robs or dfs"):
        metric.state_dict()


def test_identical_copies_on_one_rank_are_dropped_and_copies_that_differ_in_dfs_are_refused():
    rhat, robs = torch.rand(4, 3) + 0.1, torch.ones(4, 3)
    metric = DistributedBPS()
    metric.update("s", rhat, robs, torch.ones(4, 3), sample_idx=[0, 1, 2, 3])
    metric.update("s", rhat[:2], robs[:2], None, sample_idx=[0, 1])  # no dfs: every weight 1, as before
    assert metric.compute().datasets["duplicates_dropped"].tolist() == [2]
    masked = torch.ones(2, 3)
    masked[1, 2] = 0.0
    metric.update("s", rhat[:2], robs[:2], masked, sample_idx=[0, 1])
    with pytest.raises(BpsevalError, match="sample_idx 1 was given twice on rank 0 with different robs or dfs"):
        metric.compute()


def test_held_back_rows_of_batches_with_other_dtypes_and_masks_score_as_without_sample_idx():
    """The held-back rows are joined to the next batch's: float32, bfloat16 and float16, full, per-row and no dfs."""
    rng = np.random.default_rng(5)
    rhat = torch.tensor(rng.gamma(2.0, 0.5, size=(40, 5)), dtype=torch.float32)
    robs = torch.tensor(rng.poisson(1.0, size=(40, 5)), dtype=torch.float32)
    dfs = torch.tensor(rng.random((40, 5)) > 0.3).float()
    masks = {"full": lambda rows: dfs[rows], "per row": lambda rows: dfs[rows][:, :1], "none": lambda rows: None}
    batches = [  # batches shorter than the window, too
        (range(10), torch.float32, "full"),
        (range(10, 13), torch.bfloat16, "none"),
        (range(13, 25), torch.float16, "per row"),
        (range(25, 27), torch.float32, "full"),
        (range(27, 40), torch.bfloat16, "none"),
    ]
    with_index, without = DistributedBPS(dedup_window=6), DistributedBPS()
    for rows, dtype, mask in batches:
        rows = list(rows)
        with_index.update("s", rhat[rows].to(dtype), robs[rows], masks[mask](rows), sample_idx=torch.tensor(rows))
        without.update("s", rhat[rows].to(dtype), robs[rows], masks[mask](rows))
    held, reference = with_index.compute().cells, without.compute().cells
    pd.testing.assert_frame_equal(held[CELL_EXACT], reference[CELL_EXACT])
    np.testing.assert_allclose(held[CELL_CLOSE].to_numpy(float), reference[CELL_CLOSE].to_numpy(float), rtol=1e-12)


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_the_caller_may_reuse_its_buffers_as_soon_as_update_returns(kind):
    """Held-back rows are copies: a loop refilling one buffer (no dfs, so no masked copy is made) scores every batch."""
    rng = np.random.default_rng(6)
    batches = [(rng.gamma(2.0, 0.5, size=(10, 4)), rng.poisson(1.0, size=(10, 4)).astype(float)) for _ in range(6)]
    rates, counts = np.empty((10, 4)), np.empty((10, 4))
    given = (torch.from_numpy(rates), torch.from_numpy(counts)) if kind == "tensor" else (rates, counts)
    reused, fresh = DistributedBPS(dedup_window=4), DistributedBPS(dedup_window=4)
    for number, (rate, count) in enumerate(batches):
        rates[:], counts[:] = rate, count
        index = np.arange(number * 10, (number + 1) * 10)
        reused.update("s", *given, sample_idx=index)
        copies = (rate.copy(), count.copy())
        fresh.update("s", *(map(torch.from_numpy, copies) if kind == "tensor" else copies), sample_idx=index)
        rates[:], counts[:] = np.nan, -1.0  # reused at once
    assert_same_scores(reused.compute(), fresh.compute(), rtol=0)


def test_numpy_input_and_cell_ids_give_the_same_result_as_tensors():
    data = sessions()["B"]
    ids = np.array(["u1", "u2", "u3"])
    as_tensors, as_numpy = DistributedBPS(), DistributedBPS()
    as_tensors.update("B", data["rhat"], data["robs"], data["dfs"], cell_ids=ids)
    as_numpy.update("B", data["rhat"].float().numpy(), data["robs"].numpy(), data["dfs"].numpy(), cell_ids=ids)
    assert_same_scores(as_numpy.compute(), as_tensors.compute(), rtol=1e-12)  # numpy and torch sum in different orders
    assert as_tensors.compute().cells["cell_id"].tolist() == ["u1", "u2", "u3"]


def test_held_back_statistics_stay_within_the_window():
    """Memory is O(cells): only `dedup_window` samples' per-cell contributions are held per dataset."""
    metric = DistributedBPS(dedup_window=3)
    rhat = torch.rand(1000, 7) + 0.1
    for start in range(0, 1000, 64):
        rows = torch.arange(start, min(start + 64, 1000))
        metric.update("x", rhat[rows], torch.poisson(rhat[rows]), sample_idx=rows)
    state = metric._datasets["x"]
    assert state.tail.n_valid.shape == (3, 7) and state.total.n_valid.shape == (7,)
    assert state.total.model_ll.dtype == torch.float64 and len(state.seen) == 1000


def test_eager_validation_names_the_dataset_and_the_row_of_the_batch_and_leaves_the_metric_unchanged():
    metric = DistributedBPS(validate="eager")
    rhat, robs = torch.ones(4, 3), torch.ones(4, 3)
    metric.update("x", rhat[:2], robs[:2], sample_idx=[0, 1])
    before = metric.compute()
    bad = rhat.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(
        BpsevalError, match=r"dataset 'x': rhat has 1 NaN or infinite value \(first at sample row 3, cell 2\)"
    ):
        metric.update("x", bad, robs, sample_idx=[1, 2, 3, 4])  # row 0 is a repeat and is skipped
    assert_same_scores(metric.compute(), before, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"rhat": torch.ones(2, 4), "robs": torch.ones(2, 4), "cell_ids": None},
            "this batch has 4 cells, earlier batches had 3",
        ),
        ({"sample_idx": None}, "give sample_idx on every batch or on none"),
        ({"sample_idx": [0, -1]}, "sample_idx must be in"),
        ({"dfs": torch.ones(3)}, r"dfs has shape \(3,\)"),
        ({"rate_kind": "log_rate"}, "rate_kind 'log_rate' differs"),
        ({"cell_ids": [7, 8, 9]}, "cell_ids differ"),
    ],
)
def test_inconsistent_batches_are_refused(kwargs, message):
    metric = DistributedBPS()
    first = {"rhat": torch.ones(2, 3), "robs": torch.ones(2, 3), "sample_idx": [0, 1], "cell_ids": [1, 2, 3]}
    metric.update("x", **first)
    with pytest.raises(ValueError, match=message):
        metric.update("x", **{**first, **kwargs})


def test_with_sample_index_adds_the_index_and_keeps_the_wrapped_dataset():
    dataset = WithSampleIndex(DictDataset(sessions()["A"]))
    assert len(dataset) == 23 and dataset.n_cells == 5
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    assert batch["sample_idx"].tolist() == [0, 1, 2, 3, 4] and set(batch) == {"rhat", "robs", "dfs", "sample_idx"}
    copy = pickle.loads(pickle.dumps(dataset))  # DataLoader workers and ddp_spawn pickle it
    assert copy[3]["sample_idx"] == 3
    with pytest.raises(TypeError, match="needs dict items"):
        WithSampleIndex([1, 2])[0]
    with pytest.raises(ValueError, match="already has a 'sample_idx'"):
        WithSampleIndex([{"sample_idx": 5}])[0]


# ----------------------------------------------------------------------------------------------
# Precision: low-precision predictions are scored as given, never rounded further.


def test_bfloat16_and_float16_predictions_are_scored_at_the_values_the_loss_sees(tmp_path):
    rng = np.random.default_rng(1)
    exact = torch.tensor(rng.gamma(2.0, 0.5, size=(500, 6)))
    robs = torch.poisson(exact)
    for step, dtype in enumerate((torch.bfloat16, torch.float16)):
        rounded = exact.to(dtype)  # what the model emits under autocast
        loss_input = rounded.float()  # what a float32 loss computes with: the same values
        given, upcast = DistributedBPS(), DistributedBPS()
        given.update("s", rounded, robs)
        upcast.update("s", loss_input, robs)
        assert_same_scores(given.compute(), upcast.compute(), rtol=0)
        with ShardWriter(tmp_path, 0, 1, step=step) as writer:
            writer.add("s", rounded, robs)
        assert_same_scores(given.compute(step=step), bpseval.evaluate(tmp_path, step=step), rtol=1e-12)
        # The rounding itself moves each cell by at most u * sum|robs - rhat| / (spikes ln 2), u = 2^-8 or 2^-11.
        unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        reference = bpseval.bits_per_spike(exact, robs)
        shift = (given.compute().cells["bps"] - reference["bps"]).abs().to_numpy()
        bound = unit * (robs - exact).abs().sum(0).numpy() / (reference["spikes"].to_numpy() * math.log(2))
        assert (shift <= 1.01 * bound).all() and shift.max() > 0
