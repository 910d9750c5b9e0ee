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
