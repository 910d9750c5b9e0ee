"""The examples in bpseval's docstrings run, and give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import bpseval

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(bpseval.__path__, "bpseval.") if name != "bpseval.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_matching_rule_has_a_checked_example() -> None:
    """At least the one rule that matches cells of two runs carries an example that the test above runs."""
    tests = doctest.DocTestFinder().find(importlib.import_module("bpseval.run.scored"))
    assert any(test.name.endswith("cell_pairs") and test.examples for test in tests)


PUBLIC = [
    "bpseval.api.bits_per_spike",
    "bpseval.api.evaluate",
    "bpseval.features.coverage.check_coverage",
    "bpseval.features.planning.check_cell_coverage",
    "bpseval.shard.writer.ShardWriter",
    "bpseval.sampler.CellBalancedDistributedSampler",
    "bpseval.api.Result",
    "bpseval.torch.DistributedBPS",
    "bpseval.torch.WithSampleIndex",
    "bpseval.lightning.BPSShardCallback",
]


@pytest.mark.parametrize("path", PUBLIC)
def test_public_functions_and_classes_say_their_arguments_and_show_a_checked_example(path: str) -> None:
    module_name, name = path.rsplit(".", 1)
    module = importlib.import_module(module_name)
    documented = getattr(module, name)
    text = documented.__doc__ or ""
    assert "Args:" in text and "Example:" in text and ">>> " in text
    assert "Returns:" in text or isinstance(documented, type)
    examples = [test for test in doctest.DocTestFinder().find(module) if test.name.endswith(f".{name}")]
    assert examples and examples[0].examples  # test_docstring_examples_run runs them
