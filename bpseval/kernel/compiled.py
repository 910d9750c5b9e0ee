"""A compiled single pass of `batch_stats` for numpy batches (numba, the optional extra `bpseval[fast]`).

The numpy code in `stats.py` stays the reference and the contract; this is a second implementation
of the same 13 float64 statistics with the same validity rules, in one pass without temporary
arrays (`numba_loops.accumulate` says how). It only says whether the batch is usable: on any
invalid value it gives up and `batch_stats` runs the reference, which builds the message.

numba is imported on the first call, never by `import bpseval`. Compiled code is cached on disk
(`cache=True`): where `NUMBA_CACHE_DIR` says, else in `__pycache__` next to this file, else in the
user's cache directory (numba's own order). When none is writable, the kernel is not used: compiling
in every process would cost more than it saves. `BPSEVAL_KERNEL=numpy` forces the reference,
`BPSEVAL_KERNEL=compiled` requires this kernel (an error when numba is missing).

numba unpickles its cache files and runs the machine code in them: a damaged file is an exception, an
abort or a crash. So they are read by the side-file rule (regular files of bounded size) and loaded only
when their sha256 is the one recorded next to them when they were written (`_load`, under a file lock
so that processes loading or compiling at once keep files and digests together). A file that fails is
one warning: the numpy reference runs for the rest of the process, and the files are removed, so that
the next process compiles them afresh.

A large batch is cut into parts of whole rows, reduced on several threads (the compiled pass releases
the GIL) and merged in order. The parts depend only on the batch's shape, never on the number of
threads, so the numbers are the same to the last bit on any machine and with any `--jobs`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from bpseval._sidefiles import SideFileError, read_bytes, read_json
from bpseval.errors import ArgumentError, MissingExtraError, install_hint
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats

if sys.platform != "win32":
    import fcntl

ENVIRONMENT_VARIABLE = "BPSEVAL_KERNEL"
CHOICES = ("auto", "numpy", "compiled")
"""`auto` (the default): the compiled kernel for work of at least WORTH_ENTRIES entries when numba is installed
and can cache, else the numpy reference."""
WORTH_ENTRIES = 1 << 25
"""Entries of work from which `auto` takes the compiled kernel. A process pays once for importing numba and
loading the compiled code (half a second or more), and the compiled pass saves a few to 20 ns per entry
over the reference, whose own speed varies (benchmarks/README.md): below this the reference finishes first."""
_work: ContextVar[int | None] = ContextVar("bpseval_kernel_work", default=None)
_threads: ContextVar[int | None] = ContextVar("bpseval_kernel_threads", default=None)
PART_ENTRIES = 1 << 19
"""Entries per part of a batch cut for several threads: a part's fixed cost (a call, a merge of its statistics)
stays small beside its pass."""
MAX_PARTS = 16
"""Most parts a batch is cut into: enough to balance the threads of common machines, few enough that the
in-order merge of the parts costs little."""
AUTO_RATE_KINDS = ("rate",)
"""Rate kinds the compiled kernel takes by default. Log-rates need exp of every entry: numba calls the scalar
libm exp, numpy's vectorised exp is faster, so the reference is the default there."""
NUMBA_DTYPE_KINDS = "biuf"
"""Dtype kinds the compiled kernel reads, each as float32 or float64 (`_readable`)."""
NUMBA_FILES = ("numba_loops.", (".nbi", ".nbc"))
"""Prefix and suffixes of numba's cache files of `numba_loops` (`numba_loops.<function>-<line>.py<version>[.<n>].nbc`)."""
NUMBA_FILE_BYTES = 1 << 26
"""The largest numba cache file read (they hold a few hundred KB of machine code)."""
DIGESTS = "numba_loops.bpseval-digests.json"
"""The sha256 of each of numba's cache files of `numba_loops`, recorded next to them when they are written."""
DIGESTS_BYTES = 1 << 20
LOCK = "numba_loops.bpseval-lock"
logger = logging.getLogger(__name__)
_ready: set[tuple[Any, ...]] = set()
"""The kinds of batch (`_kind`) whose compiled code is loaded in this process."""
_failure: list[str] = []
"""Why numba's cache could not be used in this process: then the reference runs."""
_loading = threading.Lock()


def choice() -> str:
    """The kernel `BPSEVAL_KERNEL` asks for, read at every call so that tests and users can switch it."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ArgumentError(
            f"environment variable {ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r} is not one of"
            f" {', '.join(CHOICES)}; unset it to use the compiled kernel when numba is installed"
        )
    return value


@contextlib.contextmanager
def work(entries: int, threads: int | None = None) -> Iterator[None]:
    """Batches reduced in the block belong to one piece of work of `entries` entries in all (a step's merge
    reads it in many small chunks): `auto` decides by that size instead of each batch's, so that every
    chunk of a step takes the same kernel, whichever steps or datasets a command merges with it.

    `threads` (default: the CPUs this process may use) bounds the threads of one batch, for callers that
    already run several processes."""
    tokens = _work.set(entries), _threads.set(threads)
    try:
        yield
    finally:
        _work.reset(tokens[0])
        _threads.reset(tokens[1])


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def batch_sums(rhat: np.ndarray, robs: np.ndarray, weights: np.ndarray | None, rate_kind: str) -> CellStats | None:
    """The `CellStats` of a numpy (rows, cells) batch, or None when the numpy reference must run instead.

    None when `uses_compiled` says so; when a dtype is not a plain number; or when some value is invalid
    (the reference then raises `InvalidValuesError`). `weights` is None or an (rows, cells) / (rows, 1) array.
    """
    if not uses_compiled(rate_kind, rhat.size):
        return None
    accumulate = _compiled()
    assert accumulate is not None  # uses_compiled loaded it
    if not _fits(rhat, robs, weights):
        return None
    rhat, robs = _readable(rhat), _readable(robs)
    weights = None if weights is None else _readable(weights)
    if not _load(accumulate, rhat, robs, weights, rate_kind == "log_rate"):
        return None
    bounds = part_bounds(*rhat.shape)
    n_parts = len(bounds) - 1
    threads = min(_threads.get() or available_cpus(), n_parts)
    groups = [n_parts * thread // threads for thread in range(threads + 1)]  # consecutive parts per thread

    def reduce_parts(first: int, stop: int) -> list[CellStats | None]:
        return [
            _reduce_rows(accumulate, rhat, robs, weights, rate_kind, bounds[part], bounds[part + 1])
            for part in range(first, stop)
        ]

    parts = _on_threads([functools.partial(reduce_parts, groups[i], groups[i + 1]) for i in range(threads)])
    sums = [part for part in parts if part is not None]
    if len(sums) < len(parts):
        return None
    return functools.reduce(CellStats.__add__, sums)


def uses_compiled(rate_kind: str, batch_entries: int) -> bool:
    """Whether `batch_sums` takes a valid batch of `rate_kind` and `batch_entries` entries (in the current `work`).

    False when `BPSEVAL_KERNEL=numpy`; when the choice is `auto` and numba is not installed or cannot
    cache, the rate kind is not in AUTO_RATE_KINDS, or the work (`work`, else the batch) is smaller than
    WORTH_ENTRIES; and after numba's cache failed to load in this process, whatever the choice. With
    `BPSEVAL_KERNEL=compiled` and no usable numba, MissingExtraError.
    """
    wanted = choice()
    if wanted == "numpy":
        return False
    if wanted == "auto":
        entries = _work.get()
        if rate_kind not in AUTO_RATE_KINDS or (batch_entries if entries is None else entries) < WORTH_ENTRIES:
            return False
    if _compiled() is None:
        if wanted == "compiled":
            raise MissingExtraError(
                f"{ENVIRONMENT_VARIABLE}=compiled needs numba with a writable cache directory: {install_hint('fast')};"
                " and set NUMBA_CACHE_DIR if the install directory and ~/.cache are read-only"
            )
        return False
    return not _failure


def kernel_setting() -> str:
    """The kernel as the numbers depend on it, for the merge cache's key: `BPSEVAL_KERNEL`'s choice, the numba
    installed, and whether its cache failed to load in this process (the reference then ran)."""
    wanted = choice()
    if wanted == "numpy":
        return wanted
    return f"{wanted}, numba {_numba_version()}" + (", failed to load" if _failure else "")


@functools.cache
def _numba_version() -> str:
    """The version of numba installed (from its metadata: numba is not imported), or "none"."""
    try:
        return importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def part_bounds(n_rows: int, n_cells: int) -> list[int]:
    """The first row of each part of a (n_rows, n_cells) batch, then n_rows: about PART_ENTRIES entries each,
    at most MAX_PARTS parts, of sizes within one row. A function of the shape alone."""
    parts = max(1, min(MAX_PARTS, n_rows, n_rows * n_cells // PART_ENTRIES))
    return [n_rows * part // parts for part in range(parts + 1)]


def _reduce_rows(
    accumulate: Callable[..., bool],
    rhat: np.ndarray,
    robs: np.ndarray,
    weights: np.ndarray | None,
    rate_kind: str,
    start: int,
    stop: int,
) -> CellStats | None:
    """The statistics of rows start:stop, or None when they hold an invalid value."""
    stats = CellStats.zeros(rhat.shape[1])
    valid = accumulate(
        rhat[start:stop],
        robs[start:stop],
        None if weights is None else weights[start:stop],
        rate_kind == "log_rate",
        *(getattr(stats, name) for name in STAT_FIELDS),
    )
    return stats if valid else None


def _on_threads(calls: list[Callable[[], list[CellStats | None]]]) -> list[CellStats | None]:
    """The concatenated results of `calls`: the first on this thread, the others on threads of this call's own.

    The threads live as long as the call (started for a batch of a million entries or more, they cost
    a fraction of a percent of it), so no pool outlives its work or a fork.
    """
    if len(calls) == 1:
        return calls[0]()
    with ThreadPoolExecutor(max_workers=len(calls) - 1, thread_name_prefix="bpseval-kernel") as pool:
        futures = [pool.submit(call) for call in calls[1:]]
        results = calls[0]()
        for future in futures:
            results += future.result()
    return results


def _fits(rhat: np.ndarray, robs: np.ndarray, weights: np.ndarray | None) -> bool:
    """Whether the compiled code can read the batch: plain native numbers, shapes that agree (it does not
    check bounds), so that anything else goes to the reference, which reads or refuses it as before."""
    arrays = (rhat, robs) if weights is None else (rhat, robs, weights)
    if any(array.dtype.kind not in NUMBA_DTYPE_KINDS or not array.dtype.isnative for array in arrays):
        return False
    shape = rhat.shape
    return len(shape) == 2 and robs.shape == shape and (weights is None or weights.shape in (shape, (shape[0], 1)))


def _readable(array: np.ndarray) -> np.ndarray:
    """`array` as the compiled code reads it: C-contiguous float32 or float64, converted exactly (bool and
    integers of up to 16 bits and float16 to float32, wider integers to float64, as the reference sums them).

    Every other dtype and layout would compile a signature of its own (seconds, once per installation each).
    """
    if array.dtype in (np.float32, np.float64):
        return np.ascontiguousarray(array)
    exact_in_float32 = array.dtype.kind == "b" or array.dtype.itemsize <= 2
    return np.ascontiguousarray(array, dtype=np.float32 if exact_in_float32 else np.float64)


@functools.cache
def _compiled() -> Callable[..., bool] | None:
    """`numba_loops.accumulate`, or None when numba is missing or can cache nowhere."""
    try:
        from bpseval.kernel import numba_loops
    except ModuleNotFoundError as error:
        if error.name != "numba":
            raise
        return None
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available" (no writable cache)
        if "no locator available" not in str(error):
            raise
        return None
    return numba_loops.accumulate


def _load(accumulate: Any, rhat: np.ndarray, robs: np.ndarray, weights: np.ndarray | None, log_rate: bool) -> bool:
    """Whether the compiled code for this kind of batch is ready in this process: loaded from numba's cache once its
    files are checked (`_check_cache`), or compiled (numba caches it, and its digests are recorded).

    False, with one warning, when the cache cannot be used: the reference runs instead for the rest of the process,
    and the cache's files are removed, so that the next process compiles them afresh.
    """
    kind = (log_rate, *(None if array is None else _kind(array) for array in (rhat, robs, weights)))
    if kind in _ready:
        return True
    with _loading:
        if kind in _ready or _failure:
            return not _failure
        outputs = CellStats.zeros(rhat.shape[1]).fields().values()
        arguments = (rhat, robs, weights, log_rate, *outputs)
        signature = tuple(accumulate.typeof_pyval(argument) for argument in arguments)  # numba's types: 0.3 ms
        directory = Path(accumulate._cache._cache_path)  # numba's cache directory of this module (no public name)
        with _locked(directory):
            problem = _check_cache(directory)
            if problem is None:
                try:
                    accumulate.compile(signature)  # loads it from the cache, or compiles and caches it
                except (pickle.UnpicklingError, EOFError, OSError) as error:  # a file changed since it was checked
                    problem = f"{type(error).__name__}: {error}"
            if problem is not None:
                _failure.append(problem)
                _remove_cache(directory)
                logger.warning(
                    "Warning: the compiled kernel's cache in %s cannot be used (%s); the numpy kernel computes the"
                    " numbers instead, and the next process compiles the kernel afresh.",
                    directory,
                    problem,
                )
                return False
            _record_digests(directory)
        _ready.add(kind)
    return True


def _kind(array: np.ndarray) -> tuple[str, bool, bool]:
    """What numba's type of an input array depends on besides what `_readable` fixes (2-D, C-contiguous, native):
    its dtype, and whether it is aligned and writeable."""
    return array.dtype.char, bool(array.flags.aligned), bool(array.flags.writeable)


def _check_cache(directory: Path) -> str | None:
    """Why numba's cache files of `numba_loops` in `directory` cannot be loaded, or None.

    Each must be a regular file of at most NUMBA_FILE_BYTES whose sha256 is the one recorded in DIGESTS. A file
    without a recorded digest (left by an older bpseval, or by a process killed before it recorded one) is removed:
    numba compiles it again.
    """
    try:
        recorded = read_json(directory / DIGESTS, DIGESTS_BYTES, 1)
    except SideFileError as error:
        if not error.missing:
            return f"{DIGESTS}: {error.reason}"
        recorded = {}
    if not isinstance(recorded, dict) or not all(isinstance(digest, str) for digest in recorded.values()):
        return f"{DIGESTS} is not an object of digests"
    try:
        files = _cache_files(directory)
    except OSError as error:
        return f"cannot list it ({error.strerror or error})"
    for path in files:
        if path.name not in recorded:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        try:
            digest = _digest(path)
        except SideFileError as error:
            return f"{path.name}: {error.reason}"
        if digest != recorded[path.name]:
            return f"{path.name} changed after it was written"
    return None


def _record_digests(directory: Path) -> None:
    """Record the sha256 of numba's cache files of `numba_loops` in DIGESTS (written whole: temporary file, rename).

    A file that cannot be read, or digests that cannot be written, leave files without digests: removed and
    compiled again by the next process that loads them.
    """
    digests = {}
    with contextlib.suppress(OSError):
        for path in _cache_files(directory):
            with contextlib.suppress(SideFileError):
                digests[path.name] = _digest(path)
    temporary = directory / f".{DIGESTS}.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        temporary.write_text(json.dumps(digests))
        os.replace(temporary, directory / DIGESTS)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _remove_cache(directory: Path) -> None:
    """Remove numba's cache files of `numba_loops` in `directory` and their digests, as far as it can."""
    paths = [directory / DIGESTS]
    with contextlib.suppress(OSError):
        paths += _cache_files(directory)
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _digest(path: Path) -> str:
    """sha256 of a numba cache file read by the side-file rule (SideFileError when it cannot be)."""
    return hashlib.sha256(read_bytes(path, NUMBA_FILE_BYTES)).hexdigest()


def _cache_files(directory: Path) -> list[Path]:
    """numba's cache files of `numba_loops` in `directory`: none when it does not exist (numba makes it again when
    it saves); OSError when it cannot be listed."""
    prefix, suffixes = NUMBA_FILES
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries if entry.name.startswith(prefix) and entry.name.endswith(suffixes)]
    except FileNotFoundError:
        return []
    return [directory / name for name in sorted(names)]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on numba's cache of `numba_loops` in `directory`, so that one process at a time checks,
    loads or compiles, and records it. Without a lock where none can be taken (Windows, or the lock file cannot be made)."""
    if sys.platform == "win32":
        yield
        return
    try:
        descriptor = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
