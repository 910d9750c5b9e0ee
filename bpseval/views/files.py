"""Write a document to a file or to stdout ('-'), and check output paths before any work is done.

`write_output` is the one writer of output files: every file a command or a view writes goes
through it, whole or not at all (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bpseval.errors import ArgumentError, RunError
from bpseval.run.catalog import scan_run_dir
from bpseval.shard.format import is_shard_name

if TYPE_CHECKING:
    import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make Excel, LibreOffice or Google Sheets read a CSV cell as a formula."""
STDOUT = "-"
"""The path that means stdout."""


def check_outputs(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    *,
    folders: Collection[str] = (),
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (),
) -> None:
    """Refuse output paths that cannot be written, or that would overwrite an input, before a command reads any shard.

    `outputs` maps each option, as the user sees it (e.g. "--json"), to its path, or None when it
    was not given; '-' is stdout. The options in `folders` take a folder, the others a file. A
    file must not be a directory and a folder must not be a file; an existing file must be
    writable, and so must its directory (the file is replaced whole, `write_output`); a missing
    one must be creatable, its nearest existing ancestor a writable directory (missing folders
    are made when writing). Two options naming the same file, or both stdout, are refused too:
    one document would overwrite or interleave with the other. An output file must not be one of
    the command's `inputs` either (`check_not_inputs`). Why up front: a merge can take minutes,
    and its result should not be lost to a typo in an output path.
    """
    taken: dict[str, str] = {}
    files: dict[str, str | os.PathLike[str]] = {}
    for option, value in outputs.items():
        if value is None:
            continue
        if str(value) == STDOUT:
            if option in folders:
                raise ArgumentError(
                    f"{option} -: this option takes a folder, not stdout; pass the folder to write into."
                )
            key, where = STDOUT, "stdout"
        else:
            path = Path(value)
            _check_output_path(path, option, folder=option in folders)
            key, where = os.path.realpath(path), str(path)
            if option not in folders:
                files[option] = value
        if key in taken:
            raise ArgumentError(f"{taken[key]} and {option} both write to {where}; give each its own path.")
        taken[key] = option
    check_not_inputs(files, inputs)


def check_not_inputs(
    outputs: Mapping[str, str | os.PathLike[str]], inputs: Iterable[tuple[str, str | os.PathLike[str] | None]]
) -> None:
    """Refuse an output file that is one of the command's inputs: ArgumentError naming both.

    `inputs` pairs what each input is, as the user sees it ("run directory", "--baseline",
    "--cells"), with its path (None: not given). An input file is compared with each output by
    identity (device and inode, `os.stat`), so that another spelling of it (a symlink, `..`, a
    hard link) is caught too. An input directory is a run: its shards are every file that the
    run catalog's scan finds below it (`scan_run_dir`: `*.h5`, following the symlinks that stay
    inside), compared the same way; and an output whose resolved path lies inside it with a
    shard's name (`is_shard_name`) is refused even when it does not exist yet, since the next
    command would read it as a shard. A run whose scan is refused (a symlink that leads outside
    it) has only that second rule here; the command reports the scan's error when it reads the
    run. A missing input holds nothing to overwrite: the command reports it.
    """
    if not outputs:
        return
    identities: dict[tuple[int, int], tuple[str, str | os.PathLike[str]]] = {}
    runs: list[tuple[str, str | os.PathLike[str], Path]] = []
    for what, value in inputs:
        if value is None or not os.path.exists(value):
            continue
        if os.path.isdir(value):
            runs.append((what, value, Path(os.path.realpath(value))))
            try:
                shards = scan_run_dir(value).shards
            except RunError:
                shards = []
            for shard in shards:
                _remember(identities, shard, f"a shard of the input {what} {value}")
        else:
            _remember(identities, value, f"the input {what}")
    for option, value in outputs.items():
        target = destination(value)
        identity = _identity(target)
        if identity in identities:
            what, path = identities[identity]
            spelled = "" if os.path.abspath(path) == os.path.abspath(value) else f" (the same file as {path})"
            raise ArgumentError(
                f"{option} {value}: is {what}{spelled}; an output never overwrites an input: pass another path."
            )
        resolved = Path(os.path.realpath(target))
        for what, run, inside in runs:
            if resolved.is_relative_to(inside) and is_shard_name(resolved.name):
                raise ArgumentError(
                    f"{option} {value}: is inside the input {what} {run} with a shard's name (.h5), so it would be"
                    " read as a shard of the run; an output never overwrites an input: pass another path."
                )


def _identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(device, inode) of the regular file at `path` (symlinks followed); None when there is none."""
    try:
        status = os.stat(path)
    except OSError:  # missing, or not reachable: no input file can be it
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISREG(status.st_mode) else None


def _remember(
    identities: dict[tuple[int, int], tuple[str, str | os.PathLike[str]]], path: str | os.PathLike[str], what: str
) -> None:
    """Note that the file at `path` (if it is one) is `what`."""
    identity = _identity(path)
    if identity is not None:
        identities.setdefault(identity, (what, path))


def _check_output_path(path: Path, option: str, *, folder: bool) -> None:
    """One output path: right kind (file or folder), writable, or creatable; ArgumentError saying what to do."""
    target = destination(path)
    if not os.path.exists(target):
        ancestor = next(parent for parent in target.parents if os.path.exists(parent))
        if not os.path.isdir(ancestor):
            raise ArgumentError(
                f"{option} {path}: cannot be created, because {ancestor} is a file, not a directory; pass a path"
                " under a directory."
            )
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ArgumentError(
                f"{option} {path}: cannot be created, because the directory {ancestor} is not writable"
                " (permission denied); pass a path in a directory you can write to."
            )
        return
    if not folder and os.path.isdir(target):
        raise ArgumentError(
            f"{option} {path}: is a directory, not a file; pass the path of the file to write, e.g. a new"
            " file name inside it."
        )
    if folder and not os.path.isdir(target):
        raise ArgumentError(
            f"{option} {path}: is not a directory (it is a file); pass the folder to write into"
            " (it is created if needed)."
        )
    if not os.access(target, os.W_OK | (os.X_OK if folder else 0)):
        raise ArgumentError(
            f"{option} {path}: the {'directory' if folder else 'file'} exists and cannot be written (permission"
            " denied); fix its permissions or pass another path."
        )
    if not folder and os.path.isfile(target):  # written by a rename into its folder (`write_output`)
        parent = Path(os.path.realpath(target)).parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ArgumentError(
                f"{option} {path}: the file is replaced whole, and its directory {parent} is not writable"
                " (permission denied); pass a path in a directory you can write to."
            )


def destination(path: str | os.PathLike[str]) -> Path:
    """Where writing `path` goes: the path itself when it exists (a file, /dev/stdout), else its resolved form.

    Missing folders are made when writing, so a `..` after one of them steps back lexically
    (`new/../r.json` is `r.json`), as `os.path.realpath` reads it; symlinks are followed.
    """
    return Path(path) if os.path.exists(path) else Path(os.path.realpath(path))


def write_text(text: str, path: str | os.PathLike[str], stdout: TextIO | None = None, *, append: bool = False) -> None:
    """Write (or append) `text` to `path` as UTF-8 (`write_output`), or to stdout when `path` is '-'.

    A file that cannot be written raises ArgumentError naming it; `check_outputs` makes that rare.
    """
    text = text if text.endswith("\n") else text + "\n"
    if str(path) == STDOUT:
        stream = stdout or sys.stdout
        stream.write(text)
        stream.flush()
        return
    write_output(text.encode("utf-8"), path, append=append)


def write_output(data: bytes, path: str | os.PathLike[str], *, append: bool = False) -> Path:
    """Write `data` to the file `path` whole, or not at all; returns the path written. The one writer of output files.

    Missing parent folders are made. The data goes to a hidden temporary file in the file's
    folder, which then replaces the file (`os.replace`): a reader never sees half a file, and when
    writing fails (a full disk, a folder that cannot be written) the temporary file is removed and
    a file already at `path` is left as it was. With `append`, the new file is the old one's
    bytes followed by `data`. A symlink at `path` stays and the file it names is replaced; the
    replaced file keeps its permission bits (and owner), a new one gets the umask's. What is not
    a regular file (a device such as /dev/stdout, a FIFO) is written in place. Raises
    ArgumentError naming `path` when it cannot be written.
    """
    target = destination(path)
    try:
        if os.path.exists(target) and not os.path.isfile(target):
            with open(target, "ab" if append else "wb") as handle:
                handle.write(data)
            return Path(path)
        _replace(Path(os.path.realpath(target)), data, append)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ArgumentError(f"{path}: cannot be written ({reason}); pass a path you can write to.") from None
    return Path(path)


def _replace(file: Path, data: bytes, append: bool) -> None:
    """Write `data` (after the old bytes with `append`) to a temporary file beside `file`, then rename it to `file`."""
    file.parent.mkdir(parents=True, exist_ok=True)
    old = file.stat() if file.exists() else None
    if append and old is not None:
        data = file.read_bytes() + data
    temporary = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if old is not None:
            os.chmod(temporary, stat.S_IMODE(old.st_mode))
            if os.name == "posix" and os.geteuid() == 0:  # root writes over a user's file: it stays theirs
                os.chown(temporary, old.st_uid, old.st_gid)
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised says more than a failed clean-up
            temporary.unlink(missing_ok=True)
        raise


def inert(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with `'`; any other value unchanged.

    Only strings are touched: a number such as a negative bps stays a number.
    """
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_csv(frame: pd.DataFrame, path: str, stdout: TextIO | None = None) -> None:
    """The frame as CSV at `path` ('-' = stdout); undefined values are empty fields.

    Text cells and column names that begin like a formula (dataset names, cell ids, run names
    come from the data) are made inert, so that opening the file in a spreadsheet runs nothing.
    Lines end in CRLF, as RFC 4180 says: then a text cell holding a carriage return is quoted too
    (with '\n' line ends Python's csv writer leaves a bare '\r' unquoted, which splits the row).
    """
    import pandas as pd

    safe = frame.rename(columns=inert)
    for column, dtype in safe.dtypes.items():
        if not pd.api.types.is_numeric_dtype(dtype):
            safe[column] = safe[column].map(inert)
    write_text(safe.to_csv(index=False, lineterminator="\r\n"), path, stdout)
