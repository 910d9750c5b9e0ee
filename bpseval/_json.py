"""The text of every JSON document bpseval writes: strict, indented, one line per flat record."""

from __future__ import annotations

import json
from typing import Any

INDENT = "  "


def json_text(document: Any) -> str:
    """`document` as strict JSON (NaN and infinity are refused: undefined values must be None).

    Containers are indented by two spaces, except flat records (a dict or list holding no
    container, e.g. one cell's numbers), which take one line each: a document of thousands of
    cells stays readable and diffable, and each record is encoded by json's C encoder (an
    indented `json.dumps` runs in pure Python, about 10x slower).
    """
    return _render(document, "")


def _render(value: Any, indent: str) -> str:
    inner = indent + INDENT
    if isinstance(value, dict) and any(isinstance(item, (dict, list, tuple)) for item in value.values()):
        items = (f"{inner}{json.dumps(str(key))}: {_render(item, inner)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(item, (dict, list, tuple)) for item in value):
        return "[\n" + ",\n".join(inner + _render(item, inner) for item in value) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)
