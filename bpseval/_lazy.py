"""pandas imported on first use: only the frames and the CSV files need it.

Importing pandas costs more than anything else bpseval loads; `bpseval --version`, `--help`, the
merge and the tables and JSON of `bpseval compute` never touch it. Modules write
`from bpseval._lazy import pandas as pd`.
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


pandas = lazy_module("pandas")
