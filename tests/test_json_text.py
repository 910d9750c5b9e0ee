"""json_text: the same document as json.dumps, strict about NaN, one line per flat record."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpseval._json import json_text

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=30
)


@given(documents)
def test_round_trips_to_the_same_document(document):
    assert json.loads(json_text(document)) == json.loads(json.dumps(document))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_undefined_numbers_are_refused(value):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        json_text({"cells": [{"bps": value}]})


def test_flat_records_take_one_line_and_containers_are_indented():
    document = {"step": 3, "ranks": [0, 1], "cells": [{"cell": 0, "bps": 0.5}, {"cell": 1, "bps": None}], "overall": {}}
    assert json_text(document) == (
        "{\n"
        '  "step": 3,\n'
        '  "ranks": [0, 1],\n'
        '  "cells": [\n'
        '    {"cell": 0, "bps": 0.5},\n'
        '    {"cell": 1, "bps": null}\n'
        "  ],\n"
        '  "overall": {}\n'
        "}"
    )
