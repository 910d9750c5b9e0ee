"""torch helpers: the error when torch is missing, torch.distributed look-ups; torch is imported only when called."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import secrets
from types import ModuleType
from typing import Any

from bpseval.errors import BpsevalError, MissingExtraError, install_hint


def missing_torch(feature: str, error: ImportError, extra: str = "torch") -> MissingExtraError:
    """The error for `feature` used without torch installed: names the extra to install and where a CPU-only torch comes from."""
    missing = MissingExtraError(
        f"{feature} needs PyTorch, which cannot be imported ({error}): {install_hint(extra)}"
        " (for a CPU-only torch, without the multi-GB CUDA libraries, first:"
        " pip install torch --index-url https://download.pytorch.org/whl/cpu)."
        " The command line and the numpy API work without it."
    )
    missing.name = "torch"
    return missing


def require_torch(feature: str, module: str = "torch") -> ModuleType:
    """`module` (torch or one of its submodules), or MissingExtraError saying that `feature` needs the torch extra.

    Only ImportError is caught: a torch that is installed but fails to load for another reason
    surfaces as itself.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing_torch(feature, error) from error


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (default: the whole job).

    Raises BpsevalError when torch.distributed is not initialised: a writer that guessed
    rank 0 of 1 on every GPU would produce shards that cannot be merged.
    """
    dist = require_torch("ShardWriter.from_process_group", "torch.distributed")
    if not (dist.is_available() and dist.is_initialized()):
        raise BpsevalError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first,"
            " or pass rank and world_size to ShardWriter yourself (0 and 1 for a single process)."
        )
    return dist.get_rank(group), dist.get_world_size(group)


_RUN_IDS: dict[Any, str] = {}
"""The id made for each process group, so that every shard of one launch records the same one."""


def shared_run_id(group: Any = None) -> str:
    """An id that every rank of this launch records, so that shards of different launches can be told apart.

    torchrun's TORCHELASTIC_RUN_ID when it is set (its default "none" is no id: every launch has
    it); otherwise one made on the first rank of `group` and broadcast, which works for gloo and
    NCCL alike, once per process group: the first call is a collective that every rank of `group`
    must make, later ones return the same id.
    """
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if elastic not in ("", "none"):
        return elastic
    import torch.distributed as dist

    key = group if group is not None else dist.group.WORLD
    if key not in _RUN_IDS:
        made: list[str | None] = [None]
        if dist.get_rank(group) == 0:
            made[0] = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"
        dist.broadcast_object_list(made, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
        _RUN_IDS[key] = str(made[0])
    return _RUN_IDS[key]
