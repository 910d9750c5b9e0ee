"""json_text: the same document as json.dumps, undefined numbers as null, one line per flat record."""

from __future__ import annotations

import json
import math

import numpy as np
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


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")])
def test_undefined_numbers_are_null_never_a_number(value):
    assert json_text({"cells": [{"bps": value}]}) == '{\n  "cells": [\n    {"bps": null}\n  ]\n}'


def test_numpy_values_are_written_as_plain_json():
    document = {"n": np.int64(3), "x": np.float32(0.5), "ok": np.bool_(True), "id": np.str_("a"), "v": np.arange(2)}
    assert json.loads(json_text(document)) == {"n": 3, "x": 0.5, "ok": True, "id": "a", "v": [0, 1]}


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
