"""The run catalog: one scan of a run directory — its files, every shard's header, its steps and which are complete.

Every command builds one `RunCatalog` and asks it everything: which step to merge, which steps
are complete, what is wrong with the directory. Each shard's header is read once per command.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bpseval.errors import BpsevalError, RunError, ShardError
from bpseval.run.headers import read_headers
from bpseval.shard.format import ShardHeader, is_shard_name
from bpseval.shard.reader import NotAShardError

STEP_DIRECTORY = re.compile(r"step-(\d+)")
"""The folder ShardWriter puts a step's shards in (`shard_path`): tells a file's step without opening it."""
SHARD_NAME = re.compile(r"rank[-_]?\d+\.h5", re.IGNORECASE)
"""File names that say "shard" (`rank-0003.h5`, `rank0.h5`, `rank_12.h5`): such a file that is not one is an error."""
LISTED = 5
"""Paths or ranks a message lists before it counts the rest."""


@dataclass(frozen=True)
class FileProblem:
    """A file or folder under the run that cannot be used, and the step it belongs to by its path (None: unknown)."""

    path: Path
    error: BpsevalError
    step: int | None

    @property
    def problem(self) -> str:
        """The message without the leading path."""
        return str(self.error).removeprefix(f"{self.path}: ")

    @property
    def reason(self) -> str:
        """Why a skipped file is not a shard, in a few words (for other problems, the whole message)."""
        return self.error.reason if isinstance(self.error, NotAShardError) else self.problem


@dataclass(frozen=True)
class RunFiles:
    """The files below a run directory: finished shards, writes in progress or left by a crash, and what cannot be used."""

    shards: list[Path]
    leftovers: list[Path]
    problems: list[FileProblem] = field(default_factory=list)


def is_shard_like(path: Path) -> bool:
    """Named like a shard (`SHARD_NAME`) or inside a `step-SSSSSS` folder: a file there is meant to be a shard."""
    return bool(SHARD_NAME.fullmatch(path.name)) or step_of_path(path) is not None


def skipped_text(skipped: list[FileProblem]) -> str:
    """ "2 files that are not a bpseval shard: <path> (<why>), <path> (<why>)": a handful named, the rest counted."""
    count = len(skipped)
    named = listing([f"{problem.path} ({problem.reason})" for problem in skipped])
    return f"{count} file{'s that are' if count > 1 else ' that is'} not a bpseval shard: {named}"


def step_of_path(path: Path) -> int | None:
    """The step a shard belongs to by where ShardWriter puts it (`.../step-SSSSSS/...`), or None."""
    match = STEP_DIRECTORY.fullmatch(path.parent.name)
    return int(match[1]) if match else None


def scan_run_dir(run_dir: str | os.PathLike[str]) -> RunFiles:
    """Walk `run_dir` (following symlinks that stay inside it) for shards and temporary files.

    Nothing is skipped silently: a folder that cannot be listed and a shard name that is not a
    regular file (a FIFO, socket or device, which is never opened) are problems of the scan. Raises
    RunError for a missing directory and for a symlink that leads outside the run: bpseval reads
    nothing outside the directory it is given.
    """
    root = Path(run_dir)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise RunError(f"{root}: {what}. Pass the run directory that holds the shards.")
    inside = root.resolve()
    shards: dict[Path, Path] = {}
    leftovers: list[Path] = []
    problems: list[FileProblem] = []
    visited: set[Path] = set()

    def unlistable(error: OSError) -> None:
        path = Path(error.filename)
        message = (
            f"{path}: cannot be listed ({error.strerror}); fix its permissions or move it out of the run directory."
        )
        match = STEP_DIRECTORY.fullmatch(path.name)
        problems.append(FileProblem(path, RunError(message), int(match[1]) if match else None))

    for directory, subdirectories, files in os.walk(root, onerror=unlistable, followlinks=True):
        here = Path(directory)
        if here.resolve() in visited:
            subdirectories[:] = []
            continue
        visited.add(here.resolve())
        try:  # a folder that can be listed but not entered: its entries cannot be looked at
            os.lstat(os.path.join(directory, "."))  # a string: pathlib would drop the "."
        except OSError as error:
            unlistable(OSError(error.errno, error.strerror, str(here)))
            subdirectories[:] = []
            continue
        for name in subdirectories + files:
            path = here / name
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise RunError(
                    f"{path}: a symlink to {path.resolve()}, outside the run directory {root}; bpseval reads only"
                    " files inside it. Copy the data in, or pass the directory it lives in."
                )
        for name in files:
            path = here / name
            if is_shard_name(name):
                kind = _file_kind(path)
                if kind is None:
                    shards.setdefault(path.resolve(), path)
                else:
                    message = f"{path}: is {kind}, not a regular file; bpseval never opens it. Move it out of the run."
                    problems.append(FileProblem(path, ShardError(message), step_of_path(path)))
            elif name.endswith(".tmp") or (name.startswith(".") and ".h5" in name):
                leftovers.append(path)
    return RunFiles(sorted(shards.values()), sorted(leftovers), sorted(problems, key=lambda p: p.path))


def _file_kind(path: Path) -> str | None:
    """None for a regular file, else what it is ("a FIFO", "a socket", ...)."""
    try:
        mode = path.stat().st_mode
    except OSError:  # vanished since the walk listed it, or a dangling symlink: reading it will say so
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def leftover_note(leftovers: list[Path]) -> str:
    """A sentence naming unfinished writes (at most LISTED of them), or "" when there is none."""
    if not leftovers:
        return ""
    return f" Unfinished writes left behind (a writer was killed?): {listing([str(p) for p in leftovers])}."


def listing(items: list[str]) -> str:
    """The first LISTED items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:LISTED])
    return shown + (f" (+{len(items) - LISTED} more)" if len(items) > LISTED else "")


@dataclass(frozen=True)
class StepEntry:
    """One step of a run: its shards and everything that decides whether it can be merged."""

    step: int
    shards: list[ShardHeader]
    """In rank order (then path)."""
    problems: list[FileProblem]
    """Files of this step (by their folder) that cannot be read."""

    @property
    def world_sizes(self) -> list[int]:
        return sorted({header.world_size for header in self.shards})

    @property
    def ranks(self) -> list[int]:
        return sorted(header.rank for header in self.shards)

    @property
    def missing_count(self) -> int:
        """Ranks 0..W-1 without a shard (W the largest world size); counted without listing them all."""
        sizes = self.world_sizes
        return max(sizes) - len(set(self.ranks)) if sizes else 0

    @property
    def missing(self) -> list[int]:
        """The first LISTED missing ranks (a shard may claim any world size: never all of them)."""
        present = set(self.ranks)
        found: list[int] = []
        for rank in range(max(self.world_sizes, default=0)):
            if len(found) == LISTED:
                break
            if rank not in present:
                found.append(rank)
        return found

    @property
    def repeated(self) -> list[int]:
        ranks = self.ranks
        return sorted({rank for previous, rank in itertools.pairwise(ranks) if previous == rank})

    @property
    def run_ids(self) -> list[str | None]:
        """The distinct run_id attributes of the step's shards (None for a shard without one)."""
        return sorted({header.run_id for header in self.shards}, key=lambda run_id: (run_id is not None, run_id or ""))

    @property
    def stores(self) -> list[str]:
        return sorted({header.store for header in self.shards})

    @property
    def complete(self) -> bool:
        """One world size W, ranks 0..W-1 once each, one launch, one kind of store, and every file readable."""
        return not self.reason

    @property
    def only_incomplete(self) -> bool:
        """Ranks are missing and nothing else is wrong: its writers may still be running."""
        return self.missing_count > 0 and self.reason == self._missing_text()

    @property
    def reason(self) -> str:
        """Why the step cannot be merged ("" when it is complete): the first problem found."""
        if self.problems:
            first = self.problems[0]
            more = f" (and {len(self.problems) - 1} more damaged files)" if len(self.problems) > 1 else ""
            return f"step {self.step}: {first.path}: {first.problem}{more}"
        sizes = self.world_sizes
        if len(sizes) > 1:
            listed = "; ".join(f"{h.path} says {h.world_size}" for h in self.shards[:LISTED])
            return (
                f"step {self.step} mixes world sizes {sizes} ({listed}). Shards of one step must come from one"
                " launch; move stale shards away or pick another --step."
            )
        if self.repeated:
            paths = [str(h.path) for h in self.shards if h.rank == self.repeated[0]]
            return (
                f"rank {self.repeated[0]} of step {self.step} appears twice: {' and '.join(paths)}. Remove the stale"
                " copy (its created_at attribute is the older one)."
            )
        if len(self.run_ids) > 1:
            groups = [
                f"run_id {run_id!r}: rank{'s' if len(ranks) > 1 else ''} {listing([str(r) for r in ranks])}"
                for run_id in self.run_ids
                for ranks in [[h.rank for h in self.shards if h.run_id == run_id]]
            ]
            return (
                f"step {self.step} mixes shards of {len(self.run_ids)} launches ({'; '.join(groups)}): a shard is left"
                " over from an earlier launch of the job. Move the stale shards away (their created_at attribute"
                " tells which are older) or pick another --step."
            )
        if self.missing_count:
            return self._missing_text()
        if len(self.stores) > 1:
            listed = ", ".join(f"{h.path}: {h.store}" for h in self.shards[:LISTED])
            return f"step {self.step} mixes raw and stats-only shards ({listed}); write one kind per step."
        return ""

    def missing_text(self) -> str:
        """ "rank 3", "ranks 0, 1", "ranks 0, 1, 2, 3, 4 and 95 more": the missing ranks, a handful named."""
        count, shown = self.missing_count, self.missing
        more = f" and {count - len(shown)} more" if count > len(shown) else ""
        return f"rank{'s' if count > 1 else ''} {', '.join(map(str, shown))}{more}"

    def _missing_text(self) -> str:
        return (
            f"step {self.step} has world size {self.world_sizes[-1]} but no shard for {self.missing_text()} (found"
            f" ranks {listing([str(rank) for rank in self.ranks]) or 'none'}). Did a rank crash before writing its"
            " shard?"
        )


@dataclass(frozen=True)
class StepSelection:
    """The step to merge, and notes on the newer steps passed over to get to it."""

    entry: StepEntry
    notes: list[str]

    @property
    def shards(self) -> list[ShardHeader]:
        return self.entry.shards


@dataclass
class RunCatalog:
    """One scan of a run directory: its files, every shard's header (read once), and its steps.

    Every command builds one catalog and asks it which step to merge, which steps are complete
    and what is wrong; nothing re-reads a header afterwards.
    """

    root: Path
    shards: list[ShardHeader]
    leftovers: list[Path]
    problems: list[FileProblem]
    steps: dict[int, StepEntry]
    skipped: list[FileProblem] = field(default_factory=list)
    """Files that are not bpseval shards (not HDF5, or without the root attribute 'format') and not named like
    one (`is_shard_like`): a mask file, say. Named in a warning, never merged, never an error."""

    @classmethod
    def scan(cls, run_dir: str | os.PathLike[str], *, jobs: int = 1) -> RunCatalog:
        """Walk `run_dir` and read every shard's header once, in up to `jobs` child processes (`read_headers`).

        Raises RunError when the directory is missing, holds no shard, or holds several runs
        (a sweep); unreadable and damaged files are kept as problems, for the steps they belong to.
        A file that is not a shard at all and not named like one is skipped (`skipped`).
        """
        root = Path(run_dir)
        files = scan_run_dir(root)
        if not files.shards and not files.problems:
            empty = sorted(p.name for p in root.iterdir() if p.is_dir() and STEP_DIRECTORY.fullmatch(p.name))
            holds = f"; its step folders hold none: {listing(empty)}" if empty else ""
            raise RunError(
                f"{root}: no shards found (no *.h5 file below it{holds}). Write shards with bpseval.ShardWriter"
                " during validation, or pass the run directory that holds them." + leftover_note(files.leftovers)
            )
        _refuse_sweep(root, files.shards)
        headers, problems, skipped = [], list(files.problems), []
        for path, header in zip(files.shards, read_headers(files.shards, jobs=jobs), strict=True):
            if isinstance(header, NotAShardError) and not is_shard_like(path):
                skipped.append(FileProblem(path, header, None))
            elif isinstance(header, BpsevalError):
                problems.append(FileProblem(path, header, step_of_path(path)))
            else:
                headers.append(header)
        if not headers and not problems:
            raise RunError(
                f"{root}: no shards found; skipped {skipped_text(skipped)}. Write shards with bpseval.ShardWriter"
                " during validation, or pass the run directory that holds them." + leftover_note(files.leftovers)
            )
        by_step: dict[int, list[ShardHeader]] = {}
        for header in headers:
            by_step.setdefault(header.step, []).append(header)
        for problem in problems:
            if problem.step is not None:
                by_step.setdefault(problem.step, [])
        steps = {
            step: StepEntry(
                step,
                sorted(by_step[step], key=lambda h: (h.rank, str(h.path))),
                [problem for problem in problems if problem.step == step],
            )
            for step in sorted(by_step)
        }
        return cls(root, headers, files.leftovers, problems, steps, skipped)

    @property
    def run_problems(self) -> list[FileProblem]:
        """Problems with files whose step is unknown: any step may be missing a shard because of them."""
        return [problem for problem in self.problems if problem.step is None]

    @property
    def complete_steps(self) -> list[int]:
        return [step for step, entry in self.steps.items() if entry.complete]

    @property
    def usable_steps(self) -> list[int]:
        """The steps `select(step)` merges: the complete ones, and none while a file of unknown step cannot be read."""
        return [] if self.run_problems else self.complete_steps

    @property
    def skipped_steps(self) -> dict[int, str]:
        """Every step that cannot be merged, with why."""
        return {step: entry.reason for step, entry in self.steps.items() if not entry.complete}

    def select(self, step: int | None = None, *, pass_over: bool = True) -> StepSelection:
        """The step to merge: `step`, or by default the latest complete one. The one rule of every command.

        Newer steps whose ranks are still missing are passed over with a note (their writers may
        still be running), unless `pass_over` is False: then (`compare`, `report`) the latest step is
        used only when it is complete, and an incomplete one is refused naming its missing ranks and
        `--step`, since a verdict on an older step would pass for one on the latest. A newer step that
        is broken otherwise (damaged files, mixed launches or world sizes) is never passed over: it is
        refused, as is `step` when it cannot be merged. A file whose step is unknown and cannot be
        read is refused whatever the step.
        """
        if self.run_problems:
            raise self.run_problems[0].error
        notes = [self.skipped_note] if self.skipped else []
        if step is not None:
            if step not in self.steps:
                found = ", ".join(map(str, self.steps)) or "none readable"
                raise RunError(f"{self.root}: no shard has step {step}; steps found: {found}.")
            return StepSelection(self._require(self.steps[step]), notes)
        for entry in reversed(self.steps.values()):
            if entry.complete:
                return StepSelection(entry, notes)
            if not entry.only_incomplete:
                self._require(entry)
            if not pass_over:
                raise RunError(self._latest_incomplete_text(entry))
            notes.append(f"step {entry.step} is incomplete ({entry.missing_text()} missing); passed over.")
        return StepSelection(self._require(list(self.steps.values())[-1]), [])

    def _latest_incomplete_text(self, entry: StepEntry) -> str:
        """Why the latest step, whose ranks are missing, is not used when it must be complete; and the ways out."""
        complete = self.complete_steps
        way = f"pass --step {complete[-1]} (the latest complete step), or wait" if complete else "wait"
        return (
            f"{self.root}: the latest step, {entry.step}, is incomplete ({entry.missing_text()} missing), and an"
            f" older step is not used in its place without --step: {way} until every rank has written step"
            f" {entry.step}.{leftover_note(self.leftovers)}"
        )

    @property
    def skipped_note(self) -> str:
        """One line naming the skipped files (see `skipped`)."""
        return f"skipped {skipped_text(self.skipped)}; move such files out of the run directory to silence this."

    def _require(self, entry: StepEntry) -> StepEntry:
        """`entry` if it can be merged, else the RunError (or the file's own error) saying why."""
        if entry.problems:
            raise entry.problems[0].error
        if not entry.complete:
            note = leftover_note(self.leftovers) if entry.missing_count else ""
            raise RunError(f"{self.root}: {entry.reason}{note}")
        return entry


def _refuse_sweep(root: Path, shards: list[Path]) -> None:
    """Raise RunError when `root` is a folder of runs rather than a run.

    A run's shards sit in `step-SSSSSS` folders directly below it. When `root` has none of its
    own and its shards sit below several run folders, it is a sweep: merging them as one run
    would mix runs.
    """
    runs = sorted({path.parent.parent for path in shards if step_of_path(path) is not None})
    if root.resolve() in {run.resolve() for run in runs} or len(runs) < 2:
        return
    names = listing([str(run.relative_to(root)) for run in runs])
    raise RunError(
        f"{root}: holds {len(runs)} runs, not one ({names}). Pass each run directory itself; to compare them in one"
        f" table: {runs_command(runs)}"
    )


def runs_command(runs: list[Path]) -> str:
    """The `bpseval compute` command line that scores exactly `runs`: each run named, quoted for a POSIX shell, and
    no other folder or file (a glob of their folder would also take folders that are not runs, and files)."""
    return shlex.join(["bpseval", "compute", *map(str, runs)])
