"""bpseval: exact bits per spike of neural encoding models after distributed validation."""

from bpseval._version import __version__
from bpseval.errors import BpsevalError
from bpseval.result import Result, evaluate
from bpseval.shard import ShardWriter
from bpseval.stats import bits_per_spike

__all__ = ["BpsevalError", "Result", "ShardWriter", "__version__", "bits_per_spike", "evaluate"]
