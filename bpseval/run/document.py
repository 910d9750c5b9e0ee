"""The run document: the JSON of `bpseval compute --json` and of a baseline, written, read, versioned and checked here.

One module owns it: `run_document` writes a `ScoredRun` as the document, `check_document` refuses a
document that no run could have produced (its shape, its types, and its cells' sums, by the sums
contract), and `read_document` / `scored_from_document` turn one back into a `ScoredRun`, numbers as
written. `bpseval baseline` files are this document with `format` and `format_version`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bpseval._json import plain
from bpseval._sidefiles import DOCUMENT_BYTES, DOCUMENT_DEPTH, SideFileError, read_json
from bpseval._version import __version__
from bpseval.errors import BaselineError
from bpseval.kernel.cellstats import STAT_FIELDS, CellStats
from bpseval.kernel.stats import (
    EXCLUDED,
    LOW,
    MIN_RATE,
    OK,
    OVERFLOW,
    SILENT,
    STATUSES,
    UNCOVERED,
    CellScores,
    cell_scores,
)
from bpseval.kernel.sums import ImpossibleSumsError, checked_sums
from bpseval.run.dedup import RHAT_COPY_RTOL
from bpseval.run.scored import SUMMARY_METRICS, Overall, ScoredDataset, ScoredRun, ScoreSettings

BASELINE_FORMAT = "bpseval-baseline"
BASELINE_FORMAT_VERSION = 1


def run_document(scored: ScoredRun, warnings: list[str]) -> dict[str, Any]:
    """The JSON document of `scored` (plain Python, None where a value is undefined), without intervals or groups.

    Args:
        scored: the scored run.
        warnings: what the merge, the scoring and the features computed from them said.

    Returns:
        The document `bpseval compute --json` writes; `baseline_document` adds its format.
    """
    datasets = [
        {
            "name": dataset.name,
            "samples": dataset.samples,
            "duplicates_dropped": dataset.duplicates_dropped,
            **dataset.numbers,
            "cells": dataset.cells,
            "identity": dataset.identity,
        }
        for dataset in scored.datasets
    ]
    cells = [
        {
            "dataset": dataset.name,
            "cell": cell,
            "cell_id": cell_id,
            "n_valid": n_valid,
            "n": weight,
            "spikes": spikes,
            "model_ll": model_ll,
            "ll_gain": ll_gain,
            "bps": bps,
            "pseudo_r2": pseudo_r2,
            "corr": corr,
            "status": status,
        }
        for dataset in scored.datasets
        for cell, (cell_id, n_valid, weight, spikes, model_ll, ll_gain, bps, pseudo_r2, corr, status) in enumerate(
            zip(
                dataset.cell_ids.tolist(),
                dataset.stats.n_valid.tolist(),
                dataset.stats.weight.tolist(),
                dataset.stats.spikes.tolist(),
                dataset.stats.model_ll.tolist(),
                dataset.scores.ll_gain.tolist(),
                dataset.scores.bps.tolist(),
                dataset.scores.pseudo_r2.tolist(),
                dataset.scores.corr.tolist(),
                dataset.scores.status.tolist(),
                strict=True,
            )
        )
    ]
    return plain(
        {
            "bpseval_version": __version__,
            "step": scored.step,
            "world_size": scored.world_size,
            "ranks": list(range(scored.world_size)),
            "files": scored.files,
            "settings": scored.settings.to_dict(),
            "identity": scored.identity,
            "overall": scored.overall.to_dict(),
            "datasets": datasets,
            "cells": cells,
            "warnings": warnings,
        }
    )


def baseline_document(document: dict[str, Any]) -> dict[str, Any]:
    """The baseline file: the run document, with its format and version first."""
    return {"format": BASELINE_FORMAT, "format_version": BASELINE_FORMAT_VERSION, **document}


def read_document(source: Path) -> ScoredRun:
    """The scored run of a document file (a baseline), read by the side-file rule and checked (`check_document`).

    Raises:
        BaselineError: naming the file, and the field when the document is malformed.
    """
    try:
        document = read_json(source, DOCUMENT_BYTES, DOCUMENT_DEPTH, parse_constant=_NonFinite)
    except SideFileError as error:
        raise BaselineError(
            f"{source}: cannot read the baseline ({error.reason}). Write one with `bpseval baseline RUN -o FILE`."
        ) from None
    check_document(document, source)
    return scored_from_document(document)


class _NonFinite:
    """What json makes of the tokens NaN, Infinity and -Infinity: kept, so that the check can name the field."""

    def __init__(self, token: str) -> None:
        self.token = token


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


_LEAVES: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str) and v != "", "non-empty text"),
    "text": (lambda v: isinstance(v, str), "text"),
    "texts": (lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v), "a list of text"),
    "count": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "positive": (lambda v: _is_int(v) and v > 0, "a whole number > 0"),
    "number": (_is_finite, "a finite number"),
    "number or null": (lambda v: v is None or _is_finite(v), "a finite number or null"),
    "correlation": (lambda v: v is None or (_is_finite(v) and -1 <= v <= 1), "a number in [-1, 1] or null"),
    "cell id": (lambda v: _is_int(v) or isinstance(v, str), "a whole number or text"),
    "status": (lambda v: isinstance(v, str) and v in STATUSES, f"one of {', '.join(STATUSES)}"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
}

_NEWER_METRICS = {"pseudo_r2?": "number or null", "pseudo_r2_pooled?": "number or null", "corr?": "correlation"}
"""Summary numbers added after the first baselines were written: checked when present, never required."""

_STATUS_COUNTS = {status if status in (OK, SILENT, UNCOVERED) else f"{status}?": "count" for status in STATUSES}
"""Cells per status: the statuses added after the first baselines (overflow, low, excluded) may be absent."""

BASELINE_SCHEMA: dict[str, Any] = {
    "format?": "text",
    "format_version?": "count",
    "step": "count",
    "world_size": "positive",
    "files?": "texts",
    "settings?": {
        "clamp_negative?": "flag",
        "min_rate?": "number",
        "duplicate_rhat_rtol?": "number",
        "min_samples?": "count",
        "exclude_cells?": "text",
    },
    "warnings?": "texts",
    "overall": {
        "bps": "number or null",
        "bps_pooled": "number or null",
        **_NEWER_METRICS,
        "cells": _STATUS_COUNTS,
        "datasets?": "count",
        "datasets_without_ok_cells?": "texts",
    },
    "datasets": [
        {
            "name": "name",
            "samples": "count",
            "duplicates_dropped": "count",
            "bps": "number or null",
            "bps_pooled": "number or null",
            **_NEWER_METRICS,
            "cells": _STATUS_COUNTS,
            "identity?": "text",
        }
    ],
    "cells": [
        {
            "dataset": "name",
            "cell": "count",
            "cell_id": "cell id",
            "n_valid": "count",
            "n": "number",
            "spikes": "number",
            "model_ll": "number or null",
            "ll_gain": "number or null",
            "bps": "number or null",
            "pseudo_r2?": "number or null",
            "corr?": "correlation",
            "status": "status",
        }
    ],
}
"""The baseline document, as `_check_against` reads it: a key ending in "?" may be absent, a list
holds one or more items of its one element's shape, a string names a leaf in `_LEAVES`. Other keys
are ignored; "any" is any JSON value without NaN or Infinity (the free-form settings). pseudo_r2,
pseudo_r2_pooled and corr are optional: baselines written before them lack them."""


def check_document(document: Any, source: Path) -> None:
    """Refuse a baseline document that no `bpseval baseline` could have written, naming the field.

    The schema walk checks every key and type (NaN and Infinity are refused: undefined is null);
    then the datasets must have distinct names, and the cells must belong to them, be numbered
    0..n-1 per dataset, and add up to each dataset's cell counts.
    """
    if not isinstance(document, dict) or "overall" not in document or "datasets" not in document:
        raise BaselineError(
            f"{source}: not a bpseval baseline (no 'overall' and 'datasets'). Write one with `bpseval baseline`."
        )
    fmt, version = document.get("format", BASELINE_FORMAT), document.get("format_version", BASELINE_FORMAT_VERSION)
    if fmt != BASELINE_FORMAT or version != BASELINE_FORMAT_VERSION:
        raise BaselineError(
            f"{source}: baseline format {fmt!r} version {version!r} is not supported (this bpseval reads"
            f" {BASELINE_FORMAT!r} version {BASELINE_FORMAT_VERSION}); recreate it with `bpseval baseline`."
        )

    def refuse(where: str, problem: str) -> BaselineError:
        return BaselineError(f"{source}: {where} {problem}; recreate the baseline with `bpseval baseline RUN -o FILE`.")

    _check_against(BASELINE_SCHEMA, document, "", refuse)
    first_of: dict[str, int] = {}
    for index, entry in enumerate(document["datasets"]):
        if entry["name"] in first_of:
            first = first_of[entry["name"]]
            raise refuse(f"datasets[{index}].name", f"repeats datasets[{first}].name {entry['name']!r}")
        first_of[entry["name"]] = index
    numbers: dict[str, list[int]] = {name: [] for name in first_of}
    statuses: dict[str, Counter] = {name: Counter() for name in first_of}
    for index, cell in enumerate(document["cells"]):
        if cell["dataset"] not in first_of:
            raise refuse(f"cells[{index}].dataset", f"{cell['dataset']!r} is not the name of any entry of datasets")
        numbers[cell["dataset"]].append(cell["cell"])
        statuses[cell["dataset"]][cell["status"]] += 1
    for name, index in first_of.items():
        if numbers[name] != list(range(len(numbers[name]))) or not numbers[name]:
            raise refuse(f"datasets[{index}] ({name!r})", "needs its cells, numbered 0, 1, 2, ... in order, in cells")
        counts = document["datasets"][index]["cells"]
        if any(counts.get(status, 0) != statuses[name][status] for status in STATUSES):
            listed = ", ".join(f"{statuses[name][status]} {status}" for status in STATUSES)
            raise refuse(f"datasets[{index}].cells", f"does not match its entries in cells ({listed})")
    cells_of: dict[str, list[tuple[int, dict[str, Any]]]] = {name: [] for name in first_of}
    for position, cell in enumerate(document["cells"]):
        cells_of[cell["dataset"]].append((position, cell))
    for name, index in first_of.items():
        _check_cell_sums(cells_of[name], document["datasets"][index]["samples"], refuse)


SCORE_RTOL = 1e-9
"""How far a baseline's ll_gain and bps may be from what its sums give: the rounding of a JSON round trip and more."""


def _check_cell_sums(cells: list[tuple[int, dict[str, Any]]], samples: int, refuse: Any) -> None:
    """The sums contract for a baseline's cells: n_valid, n, spikes and model_ll that some data gives
    (`checked_sums`), and ll_gain, bps and status that are what those sums score (or `low` for ok, or
    `excluded` for any). Overflow cells hold no sums.
    """
    kept = [(position, cell) for position, cell in cells if cell["status"] != OVERFLOW]
    fields = {"n_valid": "n_valid", "weight": "n", "spikes": "spikes", "model_ll": "model_ll"}
    values = {
        key: np.array([math.nan if cell[name] is None else cell[name] for _, cell in kept], dtype=np.float64)
        for key, name in fields.items()
    }
    try:
        stats = checked_sums(values, samples)
    except ImpossibleSumsError as error:
        first = kept[0][0] if kept else 0
        raise refuse(
            f"cells[{first}...] of dataset {kept[0][1]['dataset']!r}", f"hold impossible sums: {error}"
        ) from None
    scores = cell_scores(stats)
    for row, (position, cell) in enumerate(kept):
        status = str(scores.status[row])
        if cell["status"] not in (status, EXCLUDED) and not (cell["status"] == LOW and status == OK):
            raise refuse(f"cells[{position}].status", f"is {cell['status']!r}, but its sums score {status!r}")
        for key in ("ll_gain", "bps"):
            expected, written = float(getattr(scores, key)[row]), cell[key]
            if math.isnan(expected) != (written is None) or (
                written is not None and not math.isclose(written, expected, rel_tol=SCORE_RTOL, abs_tol=SCORE_RTOL)
            ):
                raise refuse(f"cells[{position}].{key}", f"is {written}, but its sums give {expected:.17g}")


def _check_against(schema: Any, value: Any, where: str, refuse: Any) -> None:
    """Walk `value` along `schema`, raising `refuse(field, problem)` at the first field that does not fit."""
    if isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
        token = value.token if isinstance(value, _NonFinite) else repr(value)
        raise refuse(where, f"is {token}, which a baseline never holds (an undefined value is null)")
    if schema == "any":
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            _check_against("any", item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]", refuse)
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise refuse(where or "the document", f"must be an object, not {_kind(value)}")
        for key, inner in schema.items():
            name = key.removesuffix("?")
            path = f"{where}.{name}" if where else name
            if name in value:
                _check_against(inner, value[name], path, refuse)
            elif not key.endswith("?"):
                raise refuse(path, "is missing")
    elif isinstance(schema, list):
        if not isinstance(value, list) or not value:
            raise refuse(where, f"must be a non-empty list, not {_kind(value)}")
        for index, item in enumerate(value):
            _check_against(schema[0], item, f"{where}[{index}]", refuse)
    else:
        accepts, expected = _LEAVES[schema]
        if not accepts(value):
            raise refuse(where, f"must be {expected}, not {_kind(value)}")
        if schema == "object":
            _check_against("any", value, where, refuse)


def _kind(value: Any) -> str:
    """How a wrong value is named in a message: its JSON type, and the value when it is short."""
    kinds = {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null"}
    kind = kinds.get(type(value), "a number")
    if isinstance(value, list) and not value:
        return "an empty list"
    shown = json.dumps(value) if not isinstance(value, (dict, list)) else ""
    return f"{kind} {shown}" if shown and len(shown) <= 40 else kind


def stats_from_cells(cells: Sequence[dict[str, Any]]) -> CellStats:
    """A dataset's per-cell statistics back from the JSON records of its cells (n is the weight).

    A document carries n_valid, n, spikes and model_ll only: the other sums are unknown (NaN).
    """
    unknown = np.full(len(cells), math.nan)
    return CellStats(
        n_valid=np.array([cell["n_valid"] for cell in cells], dtype=np.int64),
        weight=np.array([cell["n"] for cell in cells], dtype=np.float64),
        spikes=np.array([cell["spikes"] for cell in cells], dtype=np.float64),
        model_ll=np.array([_number(cell["model_ll"]) for cell in cells], dtype=np.float64),
        **{name: unknown.copy() for name in STAT_FIELDS[4:]},
    )


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _numbers(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """records[i][key] as float64, NaN where null or absent (documents written before the metric existed)."""
    return np.array([_number(record.get(key)) for record in records], dtype=np.float64)


def scored_from_document(document: dict[str, Any]) -> ScoredRun:
    """A ScoredRun back from the JSON document of `bpseval compute --json` (a baseline), numbers as written.

    Nothing is re-scored: per-cell and per-dataset numbers are the document's own (null becomes
    NaN). There are no per-rank or per-block statistics. The caller validates the document.
    """
    cells_by_dataset: dict[str, list[dict[str, Any]]] = {}
    for cell in document["cells"]:
        cells_by_dataset.setdefault(cell["dataset"], []).append(cell)
    datasets = []
    for entry in document["datasets"]:
        cells = sorted(cells_by_dataset.get(entry["name"], []), key=lambda cell: cell["cell"])
        datasets.append(
            ScoredDataset(
                name=entry["name"],
                cell_ids=np.array([cell["cell_id"] for cell in cells], dtype=object),
                stats=stats_from_cells(cells),
                scores=CellScores(
                    ll_gain=np.array([_number(cell["ll_gain"]) for cell in cells], dtype=np.float64),
                    bps=np.array([_number(cell["bps"]) for cell in cells], dtype=np.float64),
                    status=np.array([cell["status"] for cell in cells], dtype=object),
                    pseudo_r2=_numbers(cells, "pseudo_r2"),
                    corr=_numbers(cells, "corr"),
                    null_deviance=np.full(len(cells), math.nan),
                    model_deviance=np.full(len(cells), math.nan),
                ),
                samples=int(entry["samples"]),
                duplicates_dropped=int(entry["duplicates_dropped"]),
                identity=str(entry.get("identity", "")),
                numbers={metric: _number(entry.get(metric)) for metric in SUMMARY_METRICS},
                cells={status: int(entry["cells"].get(status, 0)) for status in STATUSES},
            )
        )
    overall = document["overall"]
    settings = document.get("settings", {})
    return ScoredRun(
        step=int(document["step"]),
        world_size=int(document["world_size"]),
        files=[str(path) for path in document.get("files", [])],
        datasets=datasets,
        overall=Overall(
            numbers={metric: _number(overall.get(metric)) for metric in SUMMARY_METRICS},
            datasets=int(overall.get("datasets", sum(dataset.has_ok_cells for dataset in datasets))),
            datasets_without_ok_cells=[str(name) for name in overall.get("datasets_without_ok_cells", [])],
            cells={status: int(overall["cells"].get(status, 0)) for status in STATUSES},
        ),
        settings=ScoreSettings(
            clamp_negative=bool(settings.get("clamp_negative", False)),
            min_rate=float(settings.get("min_rate", MIN_RATE)),
            duplicate_rhat_rtol=float(settings.get("duplicate_rhat_rtol", RHAT_COPY_RTOL)),
            min_samples=int(settings.get("min_samples", 0)),
        ),
        warnings=[str(warning) for warning in document.get("warnings", [])],
    )
