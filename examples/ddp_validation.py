"""Exact bits per spike after a 2-process DDP validation pass, next to the legacy per-rank number.

What it demonstrates: a small Poisson encoding model is trained with DistributedDataParallel
(gloo, CPU) on simulated recordings of three sessions, then validated the way a Lightning
`limit_val_batches=0.05` run does it: every rank scores only its first few batches of a
`DistributedSampler(shuffle=False)` split. Each rank writes what it saw with
`bpseval.ShardWriter`; `bpseval compute` merges the shards into one exact score per cell.

Two cells are recorded only on a short stretch around the start of the validation split (a
unit lost right after it starts, one picked up late), so in this pass each of them has valid
samples on one rank and none on the other. The legacy training-loop metric (per-rank null rates,
uncovered cells counted as 0, clamping at 0, averaging over ranks) is printed for comparison.

Run from the repository root (about 15 s on 2 CPU cores):

    python examples/ddp_validation.py --out examples/runs/exp1
    bpseval compute examples/runs/exp1

The output is deterministic for a given --seed, --epochs and --world-size.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.functional import softplus
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import bpseval

SESSION_CELLS = {"Allen_2022-04-13": 23, "Allen_2022-05-02": 41, "Allen_2022-06-17": 60}
N_FEATURES, N_HIDDEN = 16, 32
N_TRAIN, N_VAL = 2560, 1280
"""Samples per session: the training split comes first in time, the validation split after it."""
TRAIN_BATCH, VAL_BATCH = 64, 16
LIMIT_VAL_BATCHES = 0.05
"""Fraction of each rank's validation batches that is scored, as Lightning's limit_val_batches."""
SHORT_STRETCHES = {
    ("Allen_2022-05-02", 7): (N_TRAIN - 300, N_TRAIN + 1),
    ("Allen_2022-06-17", 20): (N_TRAIN + 63, N_TRAIN + 400),
}
"""(session, cell) -> [start, stop) in session samples: the only samples where that cell is valid."""


@dataclass
class Session:
    """One simulated recording: stimulus features, spike counts, validity mask and cell ids."""

    stim: np.ndarray  # (samples, features) float32
    robs: np.ndarray  # (samples, cells) float32 spike counts
    dfs: np.ndarray  # (samples, cells) float32, 1 = valid
    cell_ids: np.ndarray  # (cells,) int64


def simulate_sessions(seed: int) -> dict[str, Session]:
    """Linear-nonlinear Poisson cells (softplus of a linear map of the stimulus) with dropouts."""
    rng = np.random.default_rng(seed)
    n_samples = N_TRAIN + N_VAL
    sessions = {}
    for name, n_cells in SESSION_CELLS.items():
        stim = rng.standard_normal((n_samples, N_FEATURES)).astype(np.float32)
        weights = rng.normal(0.0, 0.8 / math.sqrt(N_FEATURES), size=(N_FEATURES, n_cells))
        bias = rng.uniform(-1.5, 0.5, size=n_cells)
        short = {cell: stretch for (session, cell), stretch in SHORT_STRETCHES.items() if session == name}
        bias[list(short)] = 2.0  # strongly firing, so that their few valid samples hold spikes
        rates = np.logaddexp(0.0, stim @ weights + bias)  # softplus
        robs = rng.poisson(rates).astype(np.float32)
        dfs = np.ones((n_samples, n_cells), dtype=np.float32)
        for cell in range(n_cells):
            for _ in range(rng.integers(0, 3)):  # recording dropouts
                start = rng.integers(0, n_samples)
                dfs[start : start + rng.integers(50, 400), cell] = 0.0
            if cell in short:
                start, stop = short[cell]
                dfs[:start, cell] = dfs[stop:, cell] = 0.0
                dfs[start:stop, cell] = 1.0
        sessions[name] = Session(stim, robs, dfs, 1000 + np.arange(n_cells, dtype=np.int64))
    return sessions


class SessionSplit(Dataset):
    """Samples [start, stop) of a session as dicts; `sample_idx` is the index within the split."""

    def __init__(self, session: Session, start: int, stop: int) -> None:
        self.stim = torch.from_numpy(session.stim[start:stop])
        self.robs = torch.from_numpy(session.robs[start:stop])
        self.dfs = torch.from_numpy(session.dfs[start:stop])

    def __len__(self) -> int:
        return len(self.stim)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"stim": self.stim[index], "robs": self.robs[index], "dfs": self.dfs[index], "sample_idx": index}


class SharedCoreModel(nn.Module):
    """A linear core shared by all sessions and one softplus readout per session."""

    def __init__(self, session_cells: dict[str, int]) -> None:
        super().__init__()
        self.core = nn.Linear(N_FEATURES, N_HIDDEN)
        self.readouts = nn.ModuleDict({name: nn.Linear(N_HIDDEN, n) for name, n in session_cells.items()})

    def rates(self, session: str, stim: torch.Tensor) -> torch.Tensor:
        """Predicted spike counts per sample, shape (samples, cells of `session`)."""
        return softplus(self.readouts[session](self.core(stim)))

    def forward(self, stims: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {session: self.rates(session, stim) for session, stim in stims.items()}


def masked_poisson_loss(rates: torch.Tensor, robs: torch.Tensor, dfs: torch.Tensor) -> torch.Tensor:
    """Mean Poisson negative log-likelihood over the valid entries."""
    loss = nn.PoissonNLLLoss(log_input=False, reduction="none")(rates, robs)
    return (loss * dfs).sum() / dfs.sum().clamp_min(1.0)


def train(model: DistributedDataParallel, sessions: dict[str, Session], epochs: int, seed: int) -> None:
    """Every step takes one batch of each session and sums their losses; DDP averages gradients."""
    loaders = {}
    for name, session in sessions.items():
        split = SessionSplit(session, 0, N_TRAIN)
        loaders[name] = DataLoader(split, batch_size=TRAIN_BATCH, sampler=DistributedSampler(split, seed=seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for epoch in range(epochs):
        for loader in loaders.values():
            loader.sampler.set_epoch(epoch)
        for batches in zip(*loaders.values(), strict=True):
            batch = dict(zip(loaders, batches, strict=True))
            rates = model({name: b["stim"] for name, b in batch.items()})
            loss = sum(masked_poisson_loss(rates[name], b["robs"], b["dfs"]) for name, b in batch.items())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def validate(model: SharedCoreModel, sessions: dict[str, Session], out: Path, step: int) -> float:
    """Score the first batches of each session's validation split on this rank and write a shard.

    Returns this rank's legacy bits per spike.
    """
    model.eval()
    legacy = []
    with torch.no_grad(), bpseval.ShardWriter.from_process_group(out, step=step) as writer:
        for name, session in sessions.items():
            split = SessionSplit(session, N_TRAIN, N_TRAIN + N_VAL)
            loader = DataLoader(split, batch_size=VAL_BATCH, sampler=DistributedSampler(split, shuffle=False))
            seen = []
            for batch in islice(loader, max(1, int(LIMIT_VAL_BATCHES * len(loader)))):
                rhat = model.rates(name, batch["stim"])
                writer.add(
                    name, rhat, batch["robs"], batch["dfs"], sample_idx=batch["sample_idx"], cell_ids=session.cell_ids
                )
                seen.append((rhat, batch["robs"], batch["dfs"]))
            legacy.append(legacy_bps(*(torch.cat(parts) for parts in zip(*seen, strict=True))))
    return sum(legacy) / len(legacy)


def legacy_bps(rhat: torch.Tensor, robs: torch.Tensor, dfs: torch.Tensor) -> float:
    """THE WRONG APPROACH, kept for comparison: the metric of the old training loop on one rank.

    The null model is this rank's mean rate, cells without spikes here (no valid sample included)
    count as 0 bps, and every cell is clamped at 0 before the mean over cells.
    """
    spikes = (dfs * robs).sum(0)
    null_rate = spikes / dfs.sum(0)
    ll_model = (dfs * (robs * torch.log(rhat.clamp_min(1e-9)) - rhat)).sum(0)
    ll_null = (dfs * (robs * torch.log(null_rate.clamp_min(1e-9)) - null_rate)).sum(0)
    bps = torch.where(spikes > 0, (ll_model - ll_null) / (spikes * math.log(2)), torch.zeros_like(spikes))
    return bps.clamp_min(0.0).mean().item()


def worker(rank: int, world_size: int, port: int, sessions: dict[str, Session], args: argparse.Namespace) -> None:
    """One DDP process: train, validate, write this rank's shard, and report the legacy number."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(args.seed)
        model = DistributedDataParallel(SharedCoreModel({name: s.robs.shape[1] for name, s in sessions.items()}))
        train(model, sessions, args.epochs, args.seed)
        legacy = torch.tensor([validate(model.module, sessions, args.out, step=args.epochs - 1)])
        dist.all_reduce(legacy)  # the old loop's sync_dist=True: the mean of the per-rank numbers
        if rank == 0:
            print(
                "legacy bps (WRONG: per-rank null rates, uncovered cells as 0, clamped, mean of"
                f" {world_size} ranks): {legacy.item() / world_size:.4f}"
            )
            print(f"exact bps of the same validation pass: bpseval compute {args.out}")
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory for the shards (must be new or empty)")
    parser.add_argument("--world-size", type=int, default=2, help="number of DDP processes (default: 2)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the sampler (default: 0)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; delete it or pick another --out")
    if args.world_size < 1 or args.epochs < 1:
        parser.error("--world-size and --epochs must be at least 1")
    sessions = simulate_sessions(args.seed)
    mp.spawn(worker, args=(args.world_size, free_port(), sessions, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
