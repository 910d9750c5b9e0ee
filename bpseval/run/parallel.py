"""Run independent per-dataset tasks serially, in local processes, or on a Dask cluster; and, within a
task, reduce each chunk on a thread while the next one is read.

Merging a dataset needs only its shards' paths and layouts, and its statistics add up, so the
datasets of a run are independent tasks. Results come back in task order whatever the backend,
so the numbers do not depend on it.
"""

from __future__ import annotations

import contextvars
import functools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

from bpseval.errors import BpsevalError, install_hint

T = TypeVar("T")
R = TypeVar("R")

START_METHOD = "fork" if sys.platform == "linux" else "spawn"
"""How bpseval starts worker processes, whatever the caller has imported: fork on Linux, where the
children only read HDF5 files and run numpy (safe next to torch's threads, as DataLoader workers
are), spawn elsewhere."""


MIN_BATCH_COST = 64 << 20
"""Smallest cost (bytes to read) worth a task of its own when several processes share the work:
merging 64 MB takes ~0.1 s, far above a task's overhead (pickling, scheduling, opening its shards)."""
MAX_BATCH_COST = 512 << 20
"""Largest cost of a batch of several items: bounds what one task holds at once (its datasets' sums
and duplicate bookkeeping, O(their samples)); an item above it is a task of its own."""


def batches(costs: Sequence[float], jobs: int = 1) -> list[list[int]]:
    """Consecutive runs of the indices of `costs` of roughly equal cost, for tasks of the right size.

    With one job, runs of up to MAX_BATCH_COST: as few tasks as memory allows. With several, each
    run but the last costs at least max(MIN_BATCH_COST, total / (4 * jobs)) (capped at
    MAX_BATCH_COST): few enough tasks that their overhead is amortised, enough (4 per job when the
    work is large) for the largest-first schedule of `run_tasks` to balance the workers. Items stay
    in order, so results concatenated run by run are in item order.
    """
    spread = max(MIN_BATCH_COST, sum(costs) / (4 * jobs)) if jobs > 1 else MAX_BATCH_COST
    target = min(MAX_BATCH_COST, spread)
    runs: list[list[int]] = []
    current: list[int] = []
    cost = 0.0
    for index, item in enumerate(costs):
        current.append(index)
        cost += item
        if cost >= target:
            runs.append(current)
            current, cost = [], 0.0
    if current:
        runs.append(current)
    return runs


def run_tasks(
    function: Callable[..., T],
    tasks: Sequence[tuple[Any, ...]],
    *,
    jobs: int = 1,
    scheduler: str | None = None,
    costs: Sequence[float] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[T]:
    """`[function(*task) for task in tasks]`, computed with `jobs` processes or on a Dask scheduler.

    `scheduler` is a Dask scheduler address or "local" (a LocalCluster of `jobs` workers).
    `costs` orders the work (largest first) for load balance; `on_done(i)` is called in this
    process as task i finishes. Local processes start by START_METHOD; a Dask cluster's workers
    are started by Dask.
    """
    order = sorted(range(len(tasks)), key=lambda i: -(costs[i] if costs else 0))
    results: dict[int, T] = {}
    if scheduler is not None:
        _run_on_dask(function, tasks, order, scheduler, jobs, results, on_done)
    elif jobs <= 1 or len(tasks) <= 1:
        for index in order:
            results[index] = function(*tasks[index])
            if on_done:
                on_done(index)
    else:
        context = multiprocessing.get_context(START_METHOD)
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
            futures = {pool.submit(function, *tasks[index]): index for index in order}
            _gather(futures, as_completed, results, on_done)
    return [results[index] for index in range(len(tasks))]


def _gather(
    futures: dict[Any, int],
    completed: Callable[[Any], Any],
    results: dict[int, Any],
    on_done: Callable[[int], None] | None,
) -> None:
    """Store each future's result under its task index as it completes."""
    for future in completed(futures):
        results[futures[future]] = future.result()
        if on_done:
            on_done(futures[future])


def _run_on_dask(
    function: Callable[..., T],
    tasks: Sequence[tuple[Any, ...]],
    order: list[int],
    scheduler: str,
    jobs: int,
    results: dict[int, T],
    on_done: Callable[[int], None] | None,
) -> None:
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed
    except ImportError:
        raise BpsevalError(f"--scheduler needs Dask: {install_hint('dask')}") from None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=max(jobs, 1), threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        cluster = None
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as error:
            raise BpsevalError(f"cannot reach the Dask scheduler at {scheduler} ({error}).") from None
    try:
        futures = {client.submit(function, *tasks[index], pure=False): index for index in order}
        _gather(futures, dask_completed, results, on_done)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def one_ahead(
    items: Iterable[T], function: Callable[[T], R], worth: Callable[[T], bool]
) -> Iterator[tuple[T, Callable[[], R]]]:
    """`(item, result)` for each item in order, `result()` giving `function(item)` (or raising its error).

    An item `worth` a thread is handed to this process's background thread as soon as it is produced,
    so that `function` runs on it while the caller produces the next (reading a chunk while the last
    one is reduced: both release the GIL in their long calls); any other item is computed when its
    `result()` is asked for. The thread belongs to this call: it ends when the items do, or when the
    caller closes the generator. Results are the same as `function(item)` in the caller's thread: the
    background call runs in a copy of the caller's context (its context variables).
    """
    pending: tuple[T, Callable[[], R]] | None = None
    thread: ThreadPoolExecutor | None = None  # started for the first item worth it, ended with the items
    try:
        for item in items:
            if worth(item):
                if thread is None:
                    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bpseval-merge-{os.getpid()}")
                call = thread.submit(contextvars.copy_context().run, function, item)
                current = (item, call.result)
            else:
                current = (item, functools.partial(function, item))
            if pending is not None:
                yield pending
            pending = current
        if pending is not None:
            yield pending
    finally:  # also when the caller stops early (an error): a queued call is cancelled, a running one waited for
        if thread is not None:
            thread.shutdown(wait=True, cancel_futures=True)
