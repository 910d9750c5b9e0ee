"""The one JSON encoder of bpseval: plain values (undefined numbers as null), strict text, one line per record."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

INDENT = "  "


def plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays turned into Python values, and non-finite floats into None.

    Every document bpseval writes goes through here, so none holds NaN or Infinity: an undefined
    number is null, never a number.
    """
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.str_):
        return str(value)
    return value


def json_text(document: Any) -> str:
    """`document` (through `plain`) as strict JSON: undefined numbers are null.

    Containers are indented by two spaces, except flat records (a dict or list holding no
    container, e.g. one cell's numbers), which take one line each: a document of thousands of
    cells stays readable and diffable, and each record is encoded by json's C encoder (an
    indented `json.dumps` runs in pure Python, about 10x slower).
    """
    return _render(plain(document), "")


def _render(value: Any, indent: str) -> str:
    inner = indent + INDENT
    if isinstance(value, dict) and any(isinstance(item, (dict, list, tuple)) for item in value.values()):
        items = (f"{inner}{json.dumps(str(key))}: {_render(item, inner)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(item, (dict, list, tuple)) for item in value):
        return "[\n" + ",\n".join(inner + _render(item, inner) for item in value) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)
