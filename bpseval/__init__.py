"""bpseval: exact bits per spike of neural encoding models after distributed validation."""

from typing import Any

from bpseval._version import __version__
from bpseval.api import Result, bits_per_spike, evaluate
from bpseval.errors import BpsevalError
from bpseval.features.coverage import CoverageReport, check_coverage
from bpseval.features.planning import check_cell_coverage
from bpseval.shard.writer import ShardWriter

__all__ = [
    "BpsevalError",
    "CellBalancedDistributedSampler",
    "CoverageReport",
    "Result",
    "ShardWriter",
    "__version__",
    "bits_per_spike",
    "check_cell_coverage",
    "check_coverage",
    "evaluate",
]


def __getattr__(name: str) -> Any:
    """Import torch-based parts on first use: `import bpseval` must not import torch."""
    if name == "CellBalancedDistributedSampler":
        from bpseval.sampler import CellBalancedDistributedSampler

        return CellBalancedDistributedSampler
    raise AttributeError(f"module 'bpseval' has no attribute {name!r}")
