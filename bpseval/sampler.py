"""A validation sampler that spreads every cell's valid samples evenly over the ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from bpseval._distributed import missing_torch
from bpseval.errors import ArgumentError
from bpseval.features.planning import valid_mask

try:
    import torch
    import torch.distributed as dist
    from torch.utils.data import Sampler
except ImportError as error:
    raise missing_torch("bpseval.CellBalancedDistributedSampler", error) from error


def spread_order(n_samples: int) -> np.ndarray:
    """0..n-1 in bit-reversed order: every prefix samples the whole range evenly (van der Corput)."""
    if n_samples <= 1:
        return np.arange(n_samples)
    bits = int(n_samples - 1).bit_length()
    positions = np.arange(1 << bits)
    reversed_bits = np.zeros_like(positions)
    for bit in range(bits):
        reversed_bits |= ((positions >> bit) & 1) << (bits - 1 - bit)
    return reversed_bits[reversed_bits < n_samples]


def balanced_assignment(mask: np.ndarray, order: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Deal `order` to ranks in rounds of one sample per rank, balancing each cell's valid samples.

    Within a round, samples are placed in decreasing order of how much their placement matters,
    each on the free rank where its valid cells have the fewest samples so far (relative to the
    least-served rank). For a single cell, or cells sharing one mask, this keeps every prefix of
    rounds within one sample per rank; for several cells it is a greedy balance.
    """
    counts = np.zeros((world_size, mask.shape[1]), dtype=np.float64)
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for round_index, start in enumerate(range(0, len(order), world_size)):
        samples = order[start : start + world_size]
        rows = mask[samples].astype(np.float64)
        cost = rows @ (counts - counts.min(axis=0)).T
        regret = cost.max(axis=1) - cost.min(axis=1)
        free = [(round_index + offset) % world_size for offset in range(world_size)]
        for position in np.argsort(-regret, kind="stable"):
            rank = min(free, key=lambda r: cost[position, r])
            free.remove(rank)
            assigned[rank].append(int(samples[position]))
            counts[rank] += rows[position]
    return [np.asarray(indices, dtype=np.int64) for indices in assigned]


class CellBalancedDistributedSampler(Sampler[int]):
    """Drop-in for `DistributedSampler` in validation, for datasets with per-cell masks.

    Every sample is used at most once overall (no padding duplicates; ranks may differ by one
    sample), and for any prefix of the batches (what `limit_val_batches` keeps) the samples are
    spread over the whole validation set and each cell's valid samples over the ranks. Without
    `shuffle` the order is the same every epoch; with it, it changes with `set_epoch`.

    Ranks may get one sample fewer: avoid collectives inside the validation loop (compute
    metrics after it, e.g. with shards or `DistributedBPS`), or wrap it in
    `torch.distributed.algorithms.Join`.

    Args:
        dfs: the dataset's validation mask, (samples, cells) (numpy or torch); entries > 0 are valid.
        num_replicas: the ranks (None: from the initialised process group).
        rank: this rank (None: from the process group).
        shuffle: a new order every epoch (`set_epoch`).
        seed: the shuffle's seed.

    Example:
        >>> import numpy as np
        >>> from bpseval import CellBalancedDistributedSampler
        >>> dfs = np.array([[1, 0], [1, 1], [0, 1], [1, 1], [1, 0]])
        >>> [list(CellBalancedDistributedSampler(dfs, num_replicas=2, rank=rank)) for rank in range(2)]
        [[0, 1], [4, 2, 3]]
    """

    def __init__(
        self,
        dfs: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ArgumentError(
                    "CellBalancedDistributedSampler: pass num_replicas and rank, or initialise torch.distributed first"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ArgumentError(
                f"CellBalancedDistributedSampler: rank {rank} is outside 0..{num_replicas - 1}"
                f" (num_replicas {num_replicas})"
            )
        self.mask = valid_mask(dfs)
        self.num_replicas, self.rank, self.shuffle, self.seed = num_replicas, rank, shuffle, seed
        self.epoch = 0
        self._indices = self._rank_indices()

    def _rank_indices(self) -> np.ndarray:
        n_samples = len(self.mask)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n_samples, generator=generator).numpy()
        else:
            order = spread_order(n_samples)
        return balanced_assignment(self.mask, order, self.num_replicas)[self.rank]

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next epoch (no effect without `shuffle`)."""
        if self.shuffle and epoch != self.epoch:
            self.epoch = epoch
            self._indices = self._rank_indices()
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)
