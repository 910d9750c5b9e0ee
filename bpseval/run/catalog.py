"""The run catalog: the shards under a run directory, their headers, and which steps are complete."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bpseval.errors import BpsevalError
from bpseval.shard.format import ShardHeader, is_shard_name
from bpseval.shard.reader import read_header


@dataclass(frozen=True)
class RunFiles:
    """The files below a run directory: finished shards, and writes in progress or left by a crash."""

    shards: list[Path]
    leftovers: list[Path]


def scan_run_dir(run_dir: str | os.PathLike[str]) -> RunFiles:
    """Walk `run_dir` (following symlinks that stay inside it) for shards and temporary files.

    Raises BpsevalError for a missing directory and for a symlink that leads outside the run:
    bpseval reads nothing outside the directory it is given, and skips nothing silently.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise BpsevalError(f"{root}: no such directory. Pass the run directory that holds the shards.")
    inside = root.resolve()
    shards: dict[Path, Path] = {}
    leftovers: list[Path] = []
    visited: set[Path] = set()
    for directory, subdirectories, files in os.walk(root, followlinks=True):
        here = Path(directory)
        if here.resolve() in visited:
            subdirectories[:] = []
            continue
        visited.add(here.resolve())
        for name in subdirectories + files:
            path = here / name
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise BpsevalError(
                    f"{path}: a symlink to {path.resolve()}, outside the run directory {root}; bpseval reads only"
                    " files inside it. Copy the data in, or pass the directory it lives in."
                )
        for name in files:
            path = here / name
            if is_shard_name(name):
                shards.setdefault(path.resolve(), path)
            elif name.endswith(".tmp") or (name.startswith(".") and ".h5" in name):
                leftovers.append(path)
    return RunFiles(sorted(shards.values()), sorted(leftovers))


def find_shards(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every finished shard below `run_dir`, sorted; raises BpsevalError when there is none."""
    return require_shards(scan_run_dir(run_dir), run_dir)


def require_shards(files: RunFiles, run_dir: str | os.PathLike[str]) -> list[Path]:
    """The shards of a scan; raises BpsevalError, naming any unfinished writes, when there is none."""
    if not files.shards:
        raise BpsevalError(
            f"{run_dir}: no shards found (no *.h5 file below it). Write shards with bpseval.ShardWriter"
            " during validation, or pass the run directory that holds them."
            + _leftover_note(files.leftovers)
        )
    return files.shards


def _leftover_note(leftovers: list[Path]) -> str:
    if not leftovers:
        return ""
    shown = ", ".join(str(path) for path in leftovers[:5]) + (f" (+{len(leftovers) - 5} more)" if len(leftovers) > 5 else "")
    return f" Unfinished writes left behind (a writer was killed?): {shown}."


HEADER_TIMEOUT = 30.0
"""Seconds one shard's metadata may take to read (milliseconds when healthy); BPSEVAL_METADATA_TIMEOUT overrides it."""


def read_headers(
    paths: list[Path], timeout: float | None = None, meanwhile: Callable[[], None] | None = None, jobs: int = 1
) -> list[ShardHeader | BpsevalError]:
    """Every shard's header (or the error that makes it unusable), in the order of `paths`.

    HDF5 can loop forever on some damaged files (a corrupt global heap behind a string
    attribute), which no exception interrupts; so the headers are read in forked children (up
    to `jobs`, each reading a contiguous share of `paths`) and a file that takes longer than
    `timeout` is reported as damaged. Where forking is unsafe (not Linux, or torch loaded in
    this process: fork next to its threads can deadlock), they are read here, without that
    bound. `meanwhile()` is called once, while the children read.
    """
    if not paths or sys.platform != "linux" or "torch" in sys.modules:
        if meanwhile:
            meanwhile()
        return [_header_or_error(path) for path in paths]
    if timeout is None:
        timeout = float(os.environ.get("BPSEVAL_METADATA_TIMEOUT", HEADER_TIMEOUT))
    shares = np.array_split(np.arange(len(paths)), max(1, min(jobs, len(paths))))
    children = [_HeaderReader([paths[i] for i in share]) for share in shares]
    if meanwhile:
        meanwhile()
    return [header for child in children for header in child.collect(timeout)]


class _HeaderReader:
    """A forked child that reads the headers of `paths` in order and sends each back as it is read."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        context = multiprocessing.get_context("fork")
        self.receiver, sender = context.Pipe(duplex=False)
        self.child = context.Process(target=_send_headers, args=(paths, sender), daemon=True)
        self.child.start()
        sender.close()

    def collect(self, timeout: float) -> list[ShardHeader | BpsevalError]:
        """The headers, in order; a file that hangs or crashes the child is reported, and the
        files after it are read by a new child."""
        headers: list[ShardHeader | BpsevalError] = []
        try:
            for path in self.paths:
                if not self.receiver.poll(timeout):
                    headers.append(
                        BpsevalError(
                            f"{path}: reading its metadata did not finish within {timeout:g} s; the file is damaged"
                            " (HDF5 can loop forever on a corrupt heap). Move it out of the run directory."
                        )
                    )
                    break
                headers.append(self.receiver.recv())
        except EOFError:
            headers.append(
                BpsevalError(f"{self.paths[len(headers)]}: reading its metadata crashed the reader; the file is damaged.")
            )
        finally:
            self.child.kill()
            self.child.join()
            self.receiver.close()
        return headers + read_headers(self.paths[len(headers) :], timeout)


def _send_headers(paths: list[Path], sender: Any) -> None:
    for path in paths:
        sender.send(_header_or_error(path))
    sender.close()


def _header_or_error(path: Path) -> ShardHeader | BpsevalError:
    try:
        return read_header(path)
    except BpsevalError as error:
        return error


@dataclass(frozen=True)
class StepSelection:
    """The shards of the step to merge, in rank order, and why that step was chosen."""

    shards: list[ShardHeader]
    notes: list[str]


def step_ranks(headers: list[ShardHeader]) -> tuple[list[int], list[int], list[int]]:
    """For one step's shards: its world sizes, the ranks missing, and the ranks present more than once."""
    sizes = sorted({header.world_size for header in headers})
    ranks = [header.rank for header in headers]
    missing = [rank for rank in range(max(sizes)) if rank not in ranks] if sizes else []
    repeated = sorted({rank for rank in ranks if ranks.count(rank) > 1})
    return sizes, missing, repeated


def select_step(
    headers: list[ShardHeader], step: int | None, run_dir: Path, leftovers: list[Path] | None = None
) -> StepSelection:
    """The shards of `step` (default: the latest complete one), one per rank 0..W-1, in rank order.

    A step is complete when one world size is used and ranks 0..W-1 are each present once. Without
    `step`, newer incomplete steps are passed over with a note (their writers may still be running).
    """
    by_step: dict[int, list[ShardHeader]] = {}
    for header in headers:
        by_step.setdefault(header.step, []).append(header)
    notes = []
    if step is None:
        for candidate in sorted(by_step, reverse=True):
            sizes, missing, repeated = step_ranks(by_step[candidate])
            if len(sizes) == 1 and not missing and not repeated:
                step = candidate
                break
            notes.append(f"step {candidate} is incomplete ({_describe_ranks(sizes, missing, repeated)}); passed over.")
        else:
            step = max(by_step)  # none is complete: report the latest one's problem below
            notes = []
    elif step not in by_step:
        raise BpsevalError(f"{run_dir}: no shard has step {step}; steps found: {', '.join(map(str, sorted(by_step)))}.")
    chosen = by_step[step]
    sizes, missing, repeated = step_ranks(chosen)
    if len(sizes) > 1:
        listing = "; ".join(f"{h.path} says {h.world_size}" for h in chosen)
        raise BpsevalError(
            f"{run_dir}: step {step} mixes world sizes {sizes} ({listing}). Shards of one step must come"
            " from one run; move stale shards away or pick another --step."
        )
    if repeated:
        paths = [str(h.path) for h in chosen if h.rank == repeated[0]]
        raise BpsevalError(
            f"{run_dir}: rank {repeated[0]} of step {step} appears twice: {' and '.join(paths)}. Remove the stale copy."
        )
    if missing:
        found = sorted(h.rank for h in chosen)
        raise BpsevalError(
            f"{run_dir}: step {step} has world size {sizes[0]} but no shard for rank"
            f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} (found ranks"
            f" {', '.join(map(str, found))}). Did a rank crash before writing its shard?"
            + _leftover_note(leftovers or [])
        )
    return StepSelection(sorted(chosen, key=lambda h: h.rank), notes)


def _describe_ranks(sizes: list[int], missing: list[int], repeated: list[int]) -> str:
    problems = []
    if len(sizes) > 1:
        problems.append(f"world sizes {sizes}")
    if missing:
        problems.append(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} missing")
    if repeated:
        problems.append(f"rank{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} twice")
    return ", ".join(problems)
