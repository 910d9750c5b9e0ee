"""bpseval's exceptions: one base type for bad input, a few subclasses where callers need to tell them apart.

Every error bpseval raises for bad input or usage is a `BpsevalError` (a `ValueError`), whose
message names the file, the dataset or the option, what is wrong and how to fix it; the CLI
turns it into one line on stderr and exit code 2. A bug in bpseval itself is never relabelled
as one of these: it surfaces as an ordinary traceback.
"""


class BpsevalError(ValueError):
    """Bad input or usage: the message names the file, the dataset, what is wrong and how to fix it."""


class ShardError(BpsevalError):
    """A shard file that cannot be used: unreadable, damaged, not a shard, or holding impossible values."""


class RunError(BpsevalError):
    """A run directory that cannot be scored as asked: no shards, an incomplete or mixed step."""


class BaselineError(BpsevalError):
    """A baseline document that is missing, malformed, or holds values no run could produce."""


class ArgumentError(BpsevalError):
    """An argument to the API (writer, online metric, sampler, callback) or an option that is out of range."""


class MissingExtraError(BpsevalError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it.

    An ImportError, as Python's convention for a missing extra wants (`except ImportError` works),
    and a BpsevalError, so that the CLI reports it in one line with exit code 2.
    """


def install_hint(extra: str) -> str:
    """The command that installs what bpseval's optional `extra` brings, for messages.

    bpseval is installed from a checkout or a wheel built from one, never from a package index, so
    the hint names the extra's own packages (read from the installed metadata, the one list in
    `pyproject.toml`), and the extra for a checkout.

    Args:
        extra: the extra's name (plot, tensorboard, fast, dask, torch, lightning).

    Returns:
        e.g. "pip install 'matplotlib>=3.7' (bpseval's [plot] extra: pip install -e '.[plot]' in its checkout)".
    """
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("bpseval") or []
    except PackageNotFoundError:  # run from a source folder that was never installed
        declared = []
    wanted, packages = [extra], []
    while wanted:
        name = wanted.pop()
        for line in declared:
            requirement, _, marker = line.partition(";")
            if marker.replace("'", '"').strip() != f'extra == "{name}"':
                continue
            if requirement.startswith("bpseval["):
                wanted += requirement.strip()[len("bpseval[") : -1].split(",")
            else:
                packages.append(f"'{requirement.strip()}'")
    checkout = f"pip install -e '.[{extra}]' in its checkout"
    return f"pip install {' '.join(packages)} (bpseval's [{extra}] extra: {checkout})" if packages else checkout
