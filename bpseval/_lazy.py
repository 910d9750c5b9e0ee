"""pandas imported on first use, so that start-up and the merge do not wait for it.

Importing pandas takes 0.2-0.4 s, more than anything else bpseval loads; `bpseval --version`,
`--help` and the merge of the shards never touch it, and `bpseval compute` imports it while the
merge runs elsewhere (see `preload_pandas`). Modules write `from bpseval._lazy import pandas as pd`.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """The module `name`, executed on its first attribute access (the standard library's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def preload_pandas() -> None:
    """Execute pandas now: for a process that would otherwise wait idle (e.g. for its worker processes)."""
    pandas.__version__  # noqa: B018 - the attribute access is what loads it


pandas = lazy_module("pandas")
