"""Run a function in real torch.distributed processes (gloo backend, CPU) for tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, function: Callable[..., Any], args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        function(rank, world_size, *args)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def run_gloo(function: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call `function(rank, world_size, *args)` in `world_size` spawned processes of one gloo group.

    `function` must be importable (defined at module level); an exception in any process fails
    the call.
    """
    mp.spawn(_entry, args=(world_size, _free_port(), function, args), nprocs=world_size, join=True)
