"""DistributedBPS.state_dict / load_state_dict: checkpoint, resume mid-validation in a real gloo run, refuse bad states.

Also: the integrations (metric, sampler, Lightning callback) raise ArgumentError for bad arguments.
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bpseval import CellBalancedDistributedSampler
from bpseval.api import Result
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.kernel.cellstats import STAT_FIELDS
from bpseval.torch import STATE_VERSION, DistributedBPS, WithSampleIndex
from tests.gloo import run_gloo

Call = tuple[str, dict[str, Any]]


class Rows(torch.utils.data.Dataset):
    """Dict items from (samples, cells) arrays."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["rhat"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(value[index]) for key, value in self.arrays.items()}


def arrays(seed: int, n_rows: int, n_cells: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rhat = rng.gamma(2.0, 0.5, size=(n_rows, n_cells))
    return {
        "rhat": rhat.astype(np.float32),
        "robs": rng.poisson(rhat).astype(np.float32),
        "dfs": (rng.random((n_rows, n_cells)) > 0.2).astype(np.float32),
    }


def rank_calls(rank: int, world_size: int) -> list[Call]:
    """What one rank gives `update` in a validation pass, in order.

    C: int cell_ids; the rank's first batch comes again after the checkpoint, twice (repeats
    within the rank). A: torch tensors with sample_idx under a shuffled DistributedSampler (23
    samples: a padding copy across ranks). B: numpy arrays without sample_idx, string cell_ids.
    """
    c = arrays(2, 16, 4)
    own = np.arange(rank, 16, world_size)

    def c_call(rows: np.ndarray) -> Call:
        return "C", {
            "rhat": torch.tensor(c["rhat"][rows]),
            "robs": torch.tensor(c["robs"][rows]),
            "sample_idx": torch.tensor(rows),
            "cell_ids": torch.tensor([10, 11, 12, 13]),
        }

    calls = [c_call(own[:3]), c_call(own[3:6])]
    data_a = WithSampleIndex(Rows(arrays(0, 23, 5)))
    sampler = DistributedSampler(data_a, world_size, rank, shuffle=True, seed=4)
    for batch in DataLoader(data_a, batch_size=2, sampler=sampler):
        calls.append(
            (
                "A",
                {"rhat": batch["rhat"], "robs": batch["robs"], "dfs": batch["dfs"], "sample_idx": batch["sample_idx"]},
            )
        )
    b = arrays(1 + rank, 9, 3)
    for start in range(0, 9, 4):
        calls.append(("B", {key: value[start : start + 4] for key, value in b.items()} | {"cell_ids": ["x", "y", "z"]}))
    return [*calls, c_call(own[:3]), c_call(own[6:]), c_call(own[:3])]


def feed(metric: DistributedBPS, calls: list[Call]) -> None:
    for name, kwargs in calls:
        kwargs = dict(kwargs)
        metric.update(name, kwargs.pop("rhat"), kwargs.pop("robs"), **kwargs)


CHECKPOINT_AT = 5
"""Calls made before the checkpoint: two of C, then half of dataset A on every rank (held-back samples pending)."""


def resume_worker(rank: int, world_size: int, out: str) -> None:
    """An uninterrupted pass, then the same pass checkpointed with torch.save half-way and resumed in a fresh metric."""
    torch.set_num_threads(1)
    calls = rank_calls(rank, world_size)
    assert [name for name, _ in calls[: CHECKPOINT_AT + 1]] == ["C", "C", "A", "A", "A", "A"]
    whole = DistributedBPS(dedup_window=4)
    feed(whole, calls)
    first = DistributedBPS(dedup_window=4)
    feed(first, calls[:CHECKPOINT_AT])
    path = Path(out) / f"state-{rank}.pt"
    torch.save(first.state_dict(), path)
    del first
    torch.distributed.barrier()  # every rank's state is saved
    try:  # rank 0's state loaded on every rank: refused on the others, never resumed as theirs
        DistributedBPS(dedup_window=4).load_state_dict(torch.load(Path(out) / "state-0.pt", weights_only=True))
        rank_zero_state = "loaded"
    except ArgumentError as error:
        rank_zero_state = str(error)
    resumed = DistributedBPS(dedup_window=4)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    feed(resumed, calls[CHECKPOINT_AT:])
    results = {"whole": whole.compute(step=3), "resumed": resumed.compute(step=3), "rank 0 state": rank_zero_state}
    (Path(out) / f"rank-{rank}.pkl").write_bytes(pickle.dumps(results))


def assert_same_result(actual: Result, expected: Result) -> None:
    for key in ("bps", "bps_pooled"):
        assert actual.overall.to_dict()[key] == pytest.approx(
            expected.overall.to_dict()[key], rel=0, abs=1e-12, nan_ok=True
        )
    assert actual.overall.cells == expected.overall.cells
    for frame, other in ((actual.datasets, expected.datasets), (actual.cells, expected.cells)):
        pd.testing.assert_frame_equal(frame, other, check_exact=False, rtol=0, atol=1e-12)


def test_resuming_mid_validation_from_a_checkpoint_gives_the_uninterrupted_number_on_every_rank(tmp_path):
    run_gloo(resume_worker, 2, str(tmp_path))
    ranks = [pickle.loads((tmp_path / f"rank-{rank}.pkl").read_bytes()) for rank in range(2)]
    whole = ranks[0]["whole"]
    for results in ranks:
        assert_same_result(results["resumed"], whole)
        assert_same_result(results["whole"], whole)
    # the run has what makes resuming hard: padding copies across ranks and repeats within a rank
    dropped = dict(zip(whole.datasets["name"], whole.datasets["duplicates_dropped"], strict=True))
    assert dropped["A"] == 1 and dropped["C"] == 2 * 2 * 3 and dropped["B"] == 0
    assert np.isfinite(whole.overall.bps)
    state = torch.load(tmp_path / "state-0.pt", weights_only=True)
    assert state["version"] == STATE_VERSION and len(state["datasets"]["A"]["tail_idx"]) > 0
    assert ranks[0]["rank 0 state"] == "loaded"
    assert "state['rank'] is 0, but this process is rank 1 of 2" in ranks[1]["rank 0 state"]


# ----------------------------------------------------------------------------------------------
# One process


def small_metric(numpy_input: bool = False) -> DistributedBPS:
    metric = DistributedBPS(dedup_window=2)
    as_array = np.asarray if numpy_input else torch.as_tensor
    data = arrays(5, 6, 3)
    copies = [0, 1, 0, 2]  # sample 3 given twice, identical both times
    metric.update(
        "A",
        as_array(data["rhat"][copies]),
        as_array(data["robs"][copies]),
        sample_idx=[3, 9, 3, 0],
        cell_ids=["a", "b", "c"],
    )
    metric.update("B", as_array(data["rhat"]), as_array(data["robs"]), as_array(data["dfs"]), cell_ids=[7, 8, 9])
    return metric


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("numpy_input", [False, True], ids=["tensors", "numpy"])
def test_state_survives_torch_save_weights_only_and_resumes_exactly(numpy_input):
    metric = small_metric(numpy_input)
    state = metric.state_dict()
    seen = state["datasets"]["A"]["seen"]
    assert seen.dtype == torch.int64 and seen.tolist() == [0, 3, 9]  # sorted indices, not a bitmap
    assert state["datasets"]["A"]["skipped"] == 1 and state["datasets"]["A"]["cell_ids"] == ["a", "b", "c"]
    resumed = DistributedBPS(dedup_window=2)
    resumed.load_state_dict(round_trip(state))
    first, later = arrays(5, 6, 3), arrays(6, 3, 3)
    data = {key: np.concatenate([first[key][1:2], later[key][1:]]) for key in ("rhat", "robs")}  # sample 9 as before
    for target in (metric, resumed):  # sample 9 again: skipped only if the seen samples were restored
        as_array = np.asarray if numpy_input else torch.as_tensor
        target.update("A", as_array(data["rhat"]), as_array(data["robs"]), sample_idx=[9, 1, 2])
    assert_same_result(resumed.compute(), metric.compute())
    assert resumed.compute().datasets["duplicates_dropped"].tolist() == [2, 0]
    # the state is a copy: later updates of the metric do not change it
    assert state["datasets"]["A"]["rows"] == 4 and state["datasets"]["A"]["seen"].tolist() == [0, 3, 9]


def test_an_empty_metric_round_trips():
    resumed = small_metric()
    resumed.load_state_dict(round_trip(DistributedBPS().state_dict()))
    assert resumed.compute().datasets.empty


def mutate(path: tuple[str, ...], value: Any) -> Any:
    def apply(state: dict[str, Any]) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return apply


def four_statistics(state: dict) -> None:
    """The state as version 1 saved it: n_valid, weight, spikes and model_ll only."""
    state["version"] = 1
    for dataset in state["datasets"].values():
        for part in ("total", "tail"):
            for field in STAT_FIELDS[4:]:
                del dataset[part][field]


A = ("datasets", "A")
BAD_STATES = {
    "newer version": (mutate(("version",), STATE_VERSION + 1), f"state['version'] is {STATE_VERSION + 1}, but"),
    "four statistics of version 1": (
        four_statistics,
        "state['version'] is 1 (without spike_log_spikes, rate_sum, rate_m2, count_m2, co_m2, rate_min, count_min,"
        " rate_max, count_max: saved before pseudo_r2 and corr), but this bpseval reads version 3; resume with the"
        " bpseval that saved it, or restart the validation pass",
    ),
    "a new field missing": (mutate((*A, "tail", "co_m2"), KeyError), "['A']['tail']['co_m2'] is missing"),
    "version as text": (mutate(("version",), "1"), "state['version'] must be int"),
    "foreign dict": (mutate(("format",), "torchmetrics"), "state['format'] is 'torchmetrics'"),
    "no datasets": (mutate(("datasets",), KeyError), "state['datasets'] is missing"),
    "bad dataset name": (
        lambda s: s["datasets"].update({"a/b": s["datasets"]["A"]}),
        "state['datasets']['a/b'] is not a dataset name",
    ),
    "unknown rate_kind": (mutate((*A, "rate_kind"), "log"), "['A']['rate_kind'] must be one of"),
    "sample_idx as int": (mutate((*A, "sample_idx"), 1), "['A']['sample_idx'] must be bool"),
    "missing field": (mutate((*A, "total", "weight"), KeyError), "['A']['total']['weight'] is missing"),
    "float counts": (mutate((*A, "total", "n_valid"), lambda t: t.double()), "['A']['total']['n_valid'] must be a 1-D"),
    "ndarray instead of tensor": (mutate((*A, "total", "spikes"), lambda t: t.numpy()), "['spikes'] must be Tensor"),
    "cells differ": (mutate((*A, "tail", "model_ll"), lambda t: t[:, :2]), "['A']['tail']['model_ll'] has shape"),
    "tail without index": (mutate((*A, "tail_idx"), lambda t: t[:1]), "['A']['tail_idx'] holds 1 sample indices"),
    "unsorted seen": (mutate((*A, "seen"), lambda t: t.flip(0)), "['A']['seen'] must be the sorted"),
    "negative index": (mutate((*A, "seen"), lambda t: t - 5), "['A']['seen'] holds negative"),
    "skipped beyond rows": (mutate((*A, "skipped"), 99), "['A']['skipped'] must be between 0 and rows (4)"),
    "rows as float": (mutate((*A, "rows"), 4.0), "['A']['rows'] must be int"),
    "cell_ids length": (mutate(("datasets", "B", "cell_ids"), lambda t: t[:2]), "['B']['cell_ids'] holds 2 ids"),
    "arrays kind": (mutate((*A, "arrays"), "jax"), "['A']['arrays'] must be 'torch' or 'numpy'"),
    "not a dict": (lambda s: s["datasets"].update({"A": [1, 2]}), "state['datasets']['A'] must be Mapping"),
    "another rank": (mutate(("rank",), 1), "state['rank'] is 1, but this process is rank 0 of 1"),
    "another world size": (mutate(("world_size",), 3), "state['world_size'] is 3, but this process is rank 0 of 1"),
    "weight zeroed": (
        mutate((*A, "total", "weight"), lambda t: t * 0),
        "['A']['total'] holds impossible statistics: weight is 0 while n_valid > 0",
    ),
    "spikes negated": (mutate((*A, "total", "spikes"), lambda t: -t - 1), "['A']['total'] holds impossible statistics"),
    "negative n_valid": (mutate((*A, "total", "n_valid"), lambda t: t - 9), "n_valid is negative"),
    "held-back row of two samples": (mutate((*A, "tail", "n_valid"), lambda t: t + 1), "exceeds the 1 samples"),
    "seen emptied": (
        lambda s: s["datasets"]["A"].update(seen=s["datasets"]["A"]["seen"][:0], tail_idx=torch.zeros(0, dtype=int)),
        "['A']['tail_idx'] holds 0 sample indices",
    ),
    "seen and tail emptied": (
        lambda s: s["datasets"]["A"].update(
            {key: s["datasets"]["A"][key][:0] for key in ("seen", "fingerprints", "tail_idx")}
            | {"tail": {field: value[:0] for field, value in s["datasets"]["A"]["tail"].items()}}
        ),
        "['A']['seen'] holds 0 samples, but rows - skipped is 3",
    ),
    "fingerprints dropped": (
        mutate((*A, "fingerprints"), lambda t: t[:1]),
        "['A']['fingerprints'] holds 1 fingerprints for 3 samples seen",
    ),
}


@pytest.mark.parametrize("case", BAD_STATES, ids=list(BAD_STATES))
def test_bad_states_are_refused_naming_the_key_and_leave_the_metric_unchanged(case):
    change, message = BAD_STATES[case]
    state = copy.deepcopy(small_metric().state_dict())
    change(state)
    metric = DistributedBPS()
    metric.update("Z", torch.ones(2, 2), torch.ones(2, 2))
    before = metric.compute()
    with pytest.raises(ArgumentError, match=r"DistributedBPS\.load_state_dict: ") as raised:
        metric.load_state_dict(state)
    assert message in str(raised.value) and "state_dict() made" in str(raised.value)
    assert_same_result(metric.compute(), before)


# ----------------------------------------------------------------------------------------------
# ArgumentError from the integrations


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: DistributedBPS(dedup_window=0), "dedup_window must be an int >= 1"),
        (lambda: DistributedBPS().update("a/b", torch.ones(2, 2), torch.ones(2, 2)), "dataset name must be"),
        (lambda: DistributedBPS().update("A", torch.ones(2, 2), torch.ones(2, 3)), "must both have shape"),
        (lambda: DistributedBPS().update("A", torch.ones(2, 2), torch.ones(2, 2), rate_kind="x"), "rate_kind must be"),
        (lambda: DistributedBPS().update("A", torch.ones(2, 2), torch.ones(2, 2), torch.ones(3)), "dataset 'A'"),
        (lambda: DistributedBPS(validate="eager").update("A", -torch.ones(2, 2), torch.ones(2, 2)), "dataset 'A'"),
        (lambda: DistributedBPS(validate="lazy"), "validate must be one of"),
        (lambda: WithSampleIndex([{"sample_idx": 1}])[0], "already has a 'sample_idx'"),
        (lambda: CellBalancedDistributedSampler(np.ones((4, 1))), "pass num_replicas and rank"),
        (lambda: CellBalancedDistributedSampler(np.ones((4, 1)), num_replicas=2, rank=2), "outside 0..1"),
        (lambda: CellBalancedDistributedSampler(np.array([["a"]]), num_replicas=1, rank=0), "real numbers"),
    ],
)
def test_the_metric_and_the_sampler_raise_argument_error(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


def test_a_dataset_of_items_that_are_not_dicts_is_a_type_error():
    with pytest.raises(TypeError, match="needs dict items"):
        WithSampleIndex([1, 2])[0]


def test_the_lightning_callback_raises_argument_error():
    pytest.importorskip("lightning")
    from bpseval.lightning import BPSShardCallback, dataset_name

    with pytest.raises(ArgumentError, match="every_n_epochs must be"):
        BPSShardCallback("run", every_n_epochs=-1)
    with pytest.raises(ArgumentError, match="must hold one dataset"):
        dataset_name(["A", "B"])
    with pytest.raises(ArgumentError, match="must be a name"):
        dataset_name(1.5)
    with pytest.raises(ArgumentError, match="validation_step must return a dict"):
        BPSShardCallback("run").batch_outputs(None, None, {"rhat": 1}, None, 0, 0)
    assert issubclass(ArgumentError, BpsevalError) and issubclass(ArgumentError, ValueError)
