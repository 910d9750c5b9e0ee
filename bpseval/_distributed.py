"""torch.distributed helpers; torch is imported only when these are called."""

from __future__ import annotations

from typing import Any

from bpseval.errors import BpsevalError


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (default: the whole job).

    Raises BpsevalError when torch.distributed is not initialised: a writer that guessed
    rank 0 of 1 on every GPU would produce shards that cannot be merged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise BpsevalError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first,"
            " or pass rank and world_size to ShardWriter yourself (0 and 1 for a single process)."
        )
    return dist.get_rank(group), dist.get_world_size(group)
