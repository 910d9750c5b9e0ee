"""Pictures of a scored run: per-cell bps, bps against rate, coverage per rank, bps over steps, run vs baseline.

Every `*_figure` function takes library objects (a `Result` or its frames, `RunFrames`, a `ScoredRun`, per-step scored runs, a
`Comparison`) and returns a matplotlib `Figure`; `write_plots` writes them all to a folder.
matplotlib is the optional extra `plot` (`errors.install_hint("plot")`) and is imported only when a
figure is made: `import bpseval` never imports it. Figures are drawn on the Agg canvas directly
(no pyplot, so no display is needed and the caller's pyplot backend and figure list are left
alone); they show in Jupyter like any other Figure.
"""

from __future__ import annotations

import io
import math
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bpseval.errors import BpsevalError, install_hint
from bpseval.features.compare import Comparison
from bpseval.features.overview import RunOverview
from bpseval.features.steps import StepResults
from bpseval.kernel.stats import OK, SILENT, UNCOVERED
from bpseval.run.scored import ScoredRun, cell_pairs
from bpseval.views.files import write_output
from bpseval.views.frames import RunFrames
from bpseval.views.text import format_bps, plural, samples_status

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

MISSING_MATPLOTLIB = f"plots need matplotlib: {install_hint('plot')}"
MIN_MATPLOTLIB = (3, 7)
DPI = 110
"""Pixels per inch of the PNG files: a figure of width w inches is round(w * DPI) pixels wide."""
WIDE = 10.0
"""Width in inches of the full-width figures (1100 px)."""
HISTOGRAM_SIZE = (5.0, 3.2)
"""Size in inches of one dataset's histogram (550 x 352 px)."""
FORMATS = ("png", "svg")
BPS_LABEL = "bits/spike"
RATE_LABEL = "mean rate (spikes/bin)"
SAMPLES_LABEL = "valid samples"
MEAN_COLOR, POOLED_COLOR, BELOW_COLOR, ZERO_COLOR = "#111111", "#e8590c", "#d62728", "#b0b0b0"


# ----------------------------------------------------------------------------------------------
# matplotlib, lazily


def _matplotlib() -> Any:
    """The matplotlib module, or BpsevalError saying how to install it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise BpsevalError(MISSING_MATPLOTLIB) from None
    version = tuple(int(part) for part in re.findall(r"\d+", matplotlib.__version__)[:2])
    if version < MIN_MATPLOTLIB:
        raise BpsevalError(
            f"plots need matplotlib >= {'.'.join(map(str, MIN_MATPLOTLIB))} (found {matplotlib.__version__}):"
            f" {install_hint('plot')}"
        )
    return matplotlib


def require_matplotlib() -> None:
    """Raise BpsevalError, saying how to install it, unless a recent enough matplotlib is importable."""
    _matplotlib()


def new_figure(width: float, height: float) -> Figure:
    """A Figure with constrained layout on an Agg canvas, `width` x `height` inches at DPI."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def dataset_colors(count: int) -> list[tuple[float, ...]]:
    """`count` distinct colours (40 before they repeat): tab20's dark then tab20b's, then the lighter ones."""
    matplotlib = _matplotlib()
    tab20, tab20b = matplotlib.colormaps["tab20"].colors, matplotlib.colormaps["tab20b"].colors
    order = (
        [tab20[i] for i in range(0, 20, 2)]
        + [tab20b[i] for i in (0, 4, 8, 12, 16, 2, 6, 10, 14, 18)]
        + [tab20[i] for i in range(1, 20, 2)]
        + [tab20b[i] for i in (1, 5, 9, 13, 17, 3, 7, 11, 15, 19)]
    )
    return [tuple(order[i % len(order)]) for i in range(count)]


def _text(value: Any) -> str:
    """A user string for matplotlib: `$` stays a dollar sign instead of starting mathtext."""
    return str(value).replace("$", r"\$")


def _wrap(value: Any, width: int) -> str:
    return "\n".join(textwrap.wrap(_text(value), width, break_long_words=True, break_on_hyphens=False)) or "''"


def _robust_limits(values: np.ndarray, include: Sequence[float] = ()) -> tuple[float, float]:
    """Axis limits that hold the bulk of `values` (Tukey fences at 3 IQR) and every value of `include`."""
    finite = values[np.isfinite(values)]
    extra = [v for v in include if v is not None and math.isfinite(v)]
    if not len(finite) and not extra:
        return -1.0, 1.0
    if len(finite):
        q1, q3 = np.quantile(finite, [0.25, 0.75])
        spread = q3 - q1
        low, high = max(finite.min(), q1 - 3 * spread), min(finite.max(), q3 + 3 * spread)
    else:
        low, high = min(extra), max(extra)
    low, high = min([low, *extra]), max([high, *extra])
    pad = 0.06 * (high - low) if high > low else max(0.1, 0.1 * abs(high))
    return float(low - pad), float(high + pad)


def _status_counts(row: Any) -> str:
    parts = [f"{int(row.ok)} ok"]
    parts += [f"{int(getattr(row, status))} {status}" for status in (SILENT, UNCOVERED) if int(getattr(row, status))]
    return " · ".join(parts)


def _plain_log_ticks(axis: Any) -> None:
    """Log-axis ticks at 1, 2, 5 per decade, written as plain numbers (0.05, not 5×10⁻²)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


LEGEND_ROW = 0.19
"""Height in inches of one row of a legend at font size 8."""


def _legend_layout(labels: Sequence[str], width: float = WIDE) -> tuple[int, int]:
    """(columns, rows) of a legend of `labels` under a figure `width` inches wide, at font size 8."""
    longest = max([len(label) for label in labels] or [1])
    entry = longest * 0.6 * 8 + 30  # points: characters at about 0.6 em, plus the marker and the gap
    columns = int(min(len(labels) or 1, 6, max(1, (width * 72 - 20) // entry)))
    return columns, math.ceil(len(labels) / columns) if labels else 0


def _dataset_legend(figure: Figure, entries: list[tuple[Any, str]], columns: int) -> None:
    """The legend of the datasets' colours, under the axes and as wide as the figure.

    `entries` are (artist, label) pairs, given to matplotlib explicitly: when it collects the
    labels itself, it hides those starting with `_`, and a dataset may well be named `_pilot`.
    """
    handles, labels = [handle for handle, _ in entries], [label for _, label in entries]
    figure.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=columns,
        fontsize=8,
        markerscale=1.4,
        frameon=False,
        title="dataset",
        title_fontsize=8,
        columnspacing=1.2,
        handletextpad=0.3,
    )


def _edges(low: float, high: float) -> tuple[float, float]:
    """Where to draw values beyond the limits: just inside the axis."""
    inset = 0.012 * (high - low)
    return low + inset, high - inset


# ----------------------------------------------------------------------------------------------
# Per-cell bps: one dataset as a histogram, all datasets as a strip plot


def _ok_bps(result: RunFrames, dataset: str) -> np.ndarray:
    cells = result.cells
    selected = cells[(cells["dataset"] == dataset) & (cells["status"] == OK)]
    return selected["bps"].to_numpy(float)


def bps_histogram_figure(result: RunFrames, dataset: str) -> Figure:
    """The distribution of one dataset's per-cell bps (ok cells), with its mean and pooled bps marked."""
    rows = result.datasets[result.datasets["name"] == dataset]
    if rows.empty:
        known = ", ".join(result.datasets["name"])
        raise BpsevalError(f"dataset {dataset!r} is not in the result (datasets: {known}).")
    row = next(rows.itertuples(index=False))
    values = _ok_bps(result, dataset)
    figure = new_figure(*HISTOGRAM_SIZE)
    axes = figure.add_subplot()
    axes.set_title(f"{_wrap(dataset, 48)}\n{_status_counts(row)}", fontsize=10)
    axes.set_xlabel(f"{BPS_LABEL} (per cell)")
    axes.set_ylabel("cells")
    if len(values):
        low, high = _robust_limits(values, (row.bps, row.bps_pooled, 0.0))
        shown = np.clip(values, low, high)
        bins = np.histogram_bin_edges(shown, bins=min(30, max(8, int(math.sqrt(len(values))) * 2)), range=(low, high))
        # matplotlib's stub types bins as a count or a sequence, not the array of edges hist takes
        axes.hist(shown, bins=bins, color="#4c78a8", edgecolor="white", linewidth=0.5)  # type: ignore[arg-type]
        axes.set_xlim(low, high)
        outside = int(np.sum((values < low) | (values > high)))
        if outside:
            axes.text(
                0.99,
                0.97,
                f"{plural(outside, 'cell')} beyond the axis,\ncounted in the edge bins",
                transform=axes.transAxes,
                ha="right",
                va="top",
                fontsize=7,
                color="#555555",
            )
    else:
        axes.text(0.5, 0.5, "no ok cell: bps undefined", transform=axes.transAxes, ha="center", va="center")
        axes.set_xlim(-1, 1)
    axes.axvline(0.0, color="#999999", linestyle=":", linewidth=1)
    handles = []
    if math.isfinite(row.bps):
        label = f"bps (mean of ok cells) {row.bps:.3f}"
        handles.append(axes.axvline(row.bps, color=MEAN_COLOR, linewidth=2, label=label))
    if math.isfinite(row.bps_pooled):
        handles.append(
            axes.axvline(
                row.bps_pooled,
                color=POOLED_COLOR,
                linewidth=2,
                linestyle="--",
                label=f"bps_pooled {row.bps_pooled:.3f}",
            )
        )
    # the default locator is an AutoLocator, whose set_params takes integer; the stub types Locator's, which takes none
    axes.yaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return figure


def bps_strip_figure(result: RunFrames) -> Figure:
    """Every dataset's per-cell bps in one picture: one row per dataset, the mean and pooled bps marked.

    Counts of ok, silent and uncovered cells are on the right; cells far outside the bulk are
    drawn at the edge of the axis (◀ ▶) so that one bad cell does not squash the rest.
    """
    datasets = result.datasets.reset_index(drop=True)
    count = len(datasets)
    figure = new_figure(WIDE, max(3.4, 0.3 * count + 1.9))
    axes = figure.add_subplot()
    colors = dataset_colors(count)
    ok = result.cells[result.cells["status"] == OK]
    values = ok["bps"].to_numpy(float)
    low, high = _robust_limits(values, [*datasets["bps"], *datasets["bps_pooled"], 0.0])
    rng = np.random.default_rng(0)
    outside = 0
    left, right = _edges(low, high)
    for position, row in enumerate(datasets.itertuples(index=False)):
        cells = ok.loc[ok["dataset"] == row.name, "bps"].to_numpy(float)
        jitter = position + rng.uniform(-0.22, 0.22, size=len(cells))
        inside = (cells >= low) & (cells <= high)
        axes.scatter(cells[inside], jitter[inside], s=9, color=colors[position], alpha=0.7, linewidths=0)
        for mask, edge, marker in ((cells < low, left, "<"), (cells > high, right, ">")):
            if mask.any():
                axes.scatter(
                    np.full(mask.sum(), edge), jitter[mask], s=24, marker=marker, color=colors[position], zorder=3
                )
        outside += int((~inside).sum())
        axes.plot([row.bps, row.bps], [position - 0.36, position + 0.36], color=MEAN_COLOR, linewidth=2.2)
        axes.plot([row.bps_pooled], [position], marker="D", markersize=5, color=POOLED_COLOR, markeredgecolor="white")
    axes.axvline(0.0, color="#999999", linestyle=":", linewidth=1)
    overall = result.overall
    if math.isfinite(overall.bps):
        axes.axvline(overall.bps, color=MEAN_COLOR, linestyle="--", linewidth=1, alpha=0.6)
    axes.set_xlim(low, high)
    axes.set_ylim(max(count, 1) - 0.5, -0.5)
    axes.set_yticks(range(count), labels=[_text(name) for name in datasets["name"]], fontsize=8 if count > 12 else 9)
    axes.set_xlabel(f"{BPS_LABEL} (per cell)")
    axes.grid(axis="x", color="#eeeeee")
    axes.set_axisbelow(True)
    counts = axes.twinx()
    counts.set_ylim(axes.get_ylim())
    status_labels = [_status_counts(row) for row in datasets.itertuples(index=False)]
    counts.set_yticks(range(count), labels=status_labels, fontsize=8 if count > 12 else 9)
    counts.tick_params(axis="y", length=0)
    cells = overall.cells
    axes.set_title(
        f"Per-cell bits per spike · step {result.step} · overall bps {format_bps(overall.bps, 3)},"
        f" bps_pooled {format_bps(overall.bps_pooled, 3)} · {cells['ok']} ok, {cells['silent']} silent,"
        f" {cells['uncovered']} uncovered cells",
        fontsize=10,
        loc="left",
    )
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", linestyle="", color="#777777", markersize=4, label="one ok cell"),
        Line2D([], [], color=MEAN_COLOR, linewidth=2.2, label="dataset bps (mean of ok cells)"),
        Line2D([], [], marker="D", linestyle="", color=POOLED_COLOR, markersize=5, label="dataset bps_pooled"),
        Line2D([], [], color=MEAN_COLOR, linestyle="--", linewidth=1, label="overall bps"),
    ]
    if outside:
        handles.append(
            Line2D(
                [],
                [],
                marker="<",
                linestyle="",
                color="#777777",
                markersize=5,
                label=f"{plural(outside, 'cell')} beyond the axis (at its edge)",
            )
        )
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return figure


# ----------------------------------------------------------------------------------------------
# bps against the observed rate


def bps_rate_figure(result: RunFrames, min_samples: int | None = None) -> Figure:
    """Per-cell bps against the cell's mean observed rate (spikes per valid bin), log x, coloured by dataset.

    Silent cells (rate 0) and uncovered ones cannot be placed and are counted in the title. With
    `min_samples`, cells with fewer valid samples are ringed in black.
    """
    datasets = list(result.datasets["name"])
    colors = dict(zip(datasets, dataset_colors(len(datasets)), strict=True))
    ok = result.cells[result.cells["status"] == OK]
    rate = (ok["spikes"].to_numpy(float) / ok["n"].to_numpy(float)) if len(ok) else np.zeros(0)
    bps = ok["bps"].to_numpy(float)
    columns, rows = _legend_layout([*datasets, f"< {min_samples} {SAMPLES_LABEL}"])
    figure = new_figure(WIDE, 5.6 + LEGEND_ROW * rows)
    axes = figure.add_subplot()
    low, high = _robust_limits(bps, (0.0,))
    clipped = np.clip(bps, *_edges(low, high))
    beyond_all = (bps < low) | (bps > high)
    names = ok["dataset"].to_numpy()
    entries = []
    for name in datasets:
        mask = names == name
        beyond = mask & beyond_all
        shown = mask & ~beyond
        dots = axes.scatter(rate[shown], bps[shown], s=14, color=colors[name], alpha=0.8, linewidths=0)
        entries.append((dots, _text(name)))
        if beyond.any():
            for side, marker in ((bps < low, "v"), (bps > high, "^")):
                if (beyond & side).any():
                    edge = beyond & side
                    axes.scatter(rate[edge], clipped[edge], s=28, marker=marker, color=colors[name], zorder=3)
    if min_samples is not None:
        below = ok["n_valid"].to_numpy() < min_samples
        if below.any():
            rings = axes.scatter(
                rate[below], clipped[below], s=60, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4
            )
            entries.append((rings, f"< {min_samples} {SAMPLES_LABEL}"))
    axes.axhline(0.0, color="#999999", linestyle=":", linewidth=1)
    axes.set_xscale("log")
    if not len(ok):
        axes.set_xlim(0.01, 10.0)
        axes.text(0.5, 0.5, "no ok cell to show", transform=axes.transAxes, ha="center", va="center")
    _plain_log_ticks(axes.xaxis)
    axes.set_ylim(low, high)
    axes.set_xlabel(RATE_LABEL)
    axes.set_ylabel(f"{BPS_LABEL} (per cell)")
    axes.grid(color="#eeeeee")
    axes.set_axisbelow(True)
    silent, uncovered = result.overall.cells["silent"], result.overall.cells["uncovered"]
    note = f"{len(ok)} ok cells"
    if silent or uncovered:
        note += f"; not shown: {silent} silent, {uncovered} uncovered"
    if beyond_all.any():
        note += f"; {plural(int(beyond_all.sum()), 'cell')} beyond the axis, drawn at its edge (▼ ▲)"
    axes.set_title(f"Per-cell bits per spike against firing rate · step {result.step}\n{note}", fontsize=10, loc="left")
    _dataset_legend(figure, entries, columns)
    return figure


# ----------------------------------------------------------------------------------------------
# Coverage: valid samples per cell per rank


def coverage_figure(run: ScoredRun, min_samples: int = 10) -> Figure:
    """Valid samples per cell (x) and rank (one row per rank), datasets stacked top to bottom.

    A rank where a cell had no valid sample is grey; a cell with fewer than `min_samples` valid
    samples in total is outlined in red over all its ranks.
    """
    matplotlib = _matplotlib()
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch, Rectangle

    world = max(run.world_size, 1)
    names = [dataset.name for dataset in run.datasets]
    width = max([len(dataset.cell_ids) for dataset in run.datasets] or [1])
    counts = np.full((len(names) * world, width), np.nan)
    below_cells: list[tuple[int, int]] = []
    for index, dataset in enumerate(run.datasets):
        for rank, stats in enumerate(dataset.per_rank):
            counts[index * world + rank, : len(stats.n_valid)] = stats.n_valid
        total = dataset.stats.n_valid
        below_cells += [(index, int(cell)) for cell in np.flatnonzero(total < min_samples)]
    row_height = max(0.3 / world, 0.1)
    figure = new_figure(WIDE, max(3.2, row_height * world * len(names) + 2.0))
    axes = figure.add_subplot()
    if not names:
        axes.text(0.5, 0.5, "no dataset", transform=axes.transAxes, ha="center", va="center")
        axes.set_title(f"Coverage · step {run.step}", fontsize=10, loc="left")
        return figure
    blues = matplotlib.colormaps["Blues"]
    cmap = ListedColormap(blues(np.linspace(0.22, 0.95, 256))).with_extremes(under=ZERO_COLOR, bad="white")
    finite = counts[np.isfinite(counts)]
    top = max(2.0, float(finite.max()) if len(finite) else 2.0)
    image = axes.imshow(
        np.where(counts == 0, 0.5, counts),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=LogNorm(vmin=1, vmax=top),
        extent=(-0.5, width - 0.5, len(names) * world - 0.5, -0.5),
    )
    for index in range(1, len(names)):
        axes.axhline(index * world - 0.5, color="white", linewidth=2.5)
        axes.axhline(index * world - 0.5, color="#444444", linewidth=0.6)
    mark = max(1.0, width / 120)  # at least about 1/120 of the width, so that one cell stays visible
    for index, cell in below_cells:
        axes.add_patch(
            Rectangle(
                (cell - mark / 2, index * world - 0.5),
                mark,
                world,
                fill=False,
                edgecolor=BELOW_COLOR,
                linewidth=1.8,
                clip_on=False,
                zorder=3,
            )
        )
    axes.set_yticks(
        [index * world + (world - 1) / 2 for index in range(len(names))],
        labels=[_text(name) for name in names],
        fontsize=8 if len(names) > 12 else 9,
    )
    axes.tick_params(axis="y", length=0)
    axes.set_xlabel("cell (index within its dataset)")
    axes.set_ylabel("dataset")
    colorbar = figure.colorbar(image, ax=axes, extend="min", fraction=0.04, pad=0.01, aspect=30)
    colorbar.set_label(f"{SAMPLES_LABEL} (cell, rank)")
    _plain_log_ticks(colorbar.ax.yaxis)
    axes.set_title(
        f"Coverage · step {run.step} · {plural(len(below_cells), 'cell')} below {min_samples} {SAMPLES_LABEL}"
        + (f"\nrows: ranks 0 to {world - 1} of each dataset, top to bottom" if world > 1 else ""),
        fontsize=10,
        loc="left",
    )
    handles = [
        Patch(facecolor=ZERO_COLOR, label="0 valid samples on that rank"),
        Patch(
            facecolor="none",
            edgecolor=BELOW_COLOR,
            linewidth=1.4,
            label=f"cell below {min_samples} {SAMPLES_LABEL} in total",
        ),
        Patch(facecolor="white", edgecolor="#cccccc", label="no such cell (dataset has fewer cells)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return figure


# ----------------------------------------------------------------------------------------------
# bps over steps


def steps_figure(results: dict[int, ScoredRun] | StepResults) -> Figure:
    """bps over validation steps: overall bps and bps_pooled on top, every dataset's bps below."""
    if isinstance(results, StepResults):
        results = results.results
    steps = sorted(results)
    if not steps:
        raise BpsevalError("no step to plot")
    latest = results[steps[-1]].names
    names = latest + sorted({name for scored in results.values() for name in scored.names} - set(latest))
    columns, rows = _legend_layout(names)
    figure = new_figure(WIDE, 6.6 + LEGEND_ROW * rows)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[1, 1.6])
    overall = [results[step].overall for step in steps]
    top.plot(steps, [o.bps for o in overall], marker="o", color=MEAN_COLOR, linewidth=2, label="overall bps")
    top.plot(
        steps,
        [o.bps_pooled for o in overall],
        marker="D",
        color=POOLED_COLOR,
        linewidth=1.5,
        linestyle="--",
        label="overall bps_pooled",
    )
    top.set_ylabel(BPS_LABEL)
    top.set_title(f"Bits per spike over {plural(len(steps), 'validation step')}", fontsize=10, loc="left")
    top.legend(loc="best", fontsize=8, frameon=False)
    entries = []
    for color, name in zip(dataset_colors(len(names)), names, strict=True):
        values = [results[step].dataset(name).bps if name in results[step].names else math.nan for step in steps]
        (line,) = bottom.plot(steps, values, marker="o", markersize=3, linewidth=1.2, color=color)
        entries.append((line, _text(name)))
    bottom.set_ylabel(f"dataset {BPS_LABEL}")
    bottom.set_xlabel("validation step")
    for axes in (top, bottom):
        axes.grid(color="#eeeeee")
        axes.set_axisbelow(True)
        axes.axhline(0.0, color="#999999", linestyle=":", linewidth=1)
    bottom.xaxis.get_major_locator().set_params(integer=True)
    _dataset_legend(figure, entries, columns)
    return figure


# ----------------------------------------------------------------------------------------------
# Run against baseline


def matched_cells(new: RunFrames, base: RunFrames) -> pd.DataFrame:
    """Cells of the datasets both sides scored, matched by `run.scored.cell_pairs`.

    Columns: dataset, cell_id, bps_base, bps_new, status_base, status_new.
    """
    import pandas as pd

    names = {dataset.name for dataset in new.scored.datasets}
    rows = [
        {
            "dataset": before.name,
            "cell_id": now.cell_ids[later],
            "bps_base": before.scores.bps[cell],
            "bps_new": now.scores.bps[later],
            "status_base": before.scores.status[cell],
            "status_new": now.scores.status[later],
        }
        for before in base.scored.datasets
        if before.name in names
        for now in [new.scored.dataset(before.name)]
        for cell, later in cell_pairs(before, now)
        if cell is not None and later is not None
    ]
    columns = ["dataset", "cell_id", "bps_base", "bps_new", "status_base", "status_new"]
    return pd.DataFrame(rows, columns=columns)


def compare_figure(new: RunFrames, base: RunFrames, comparison: Comparison | None = None) -> Figure:
    """Per-cell bps of the run against the baseline (cells ok on both sides), with the diagonal."""
    pairs = matched_cells(new, base)
    both_ok = pairs[(pairs["status_base"] == OK) & (pairs["status_new"] == OK)]
    datasets = [name for name in base.datasets["name"] if name in set(both_ok["dataset"])]
    colors = dict(zip(datasets, dataset_colors(len(datasets)), strict=True))
    columns, rows = _legend_layout([*datasets, "no change (diagonal)"])
    figure = new_figure(WIDE, 7.0 + LEGEND_ROW * rows)
    axes = figure.add_subplot()
    x, y = both_ok["bps_base"].to_numpy(float), both_ok["bps_new"].to_numpy(float)
    low, high = _robust_limits(np.concatenate([x, y]), (0.0,))
    edges = _edges(low, high)
    entries: list[tuple[Artist, str]] = []
    for name in datasets:
        mask = (both_ok["dataset"] == name).to_numpy()
        dots = axes.scatter(
            np.clip(x[mask], *edges), np.clip(y[mask], *edges), s=14, alpha=0.8, linewidths=0, color=colors[name]
        )
        entries.append((dots, _text(name)))
    (diagonal,) = axes.plot([low, high], [low, high], color="#444444", linewidth=1, linestyle="--")
    entries.append((diagonal, "no change (diagonal)"))
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_aspect("equal")
    axes.set_xlabel(f"baseline {BPS_LABEL} (per cell)")
    axes.set_ylabel(f"run {BPS_LABEL} (per cell)")
    axes.grid(color="#eeeeee")
    axes.set_axisbelow(True)
    better, worse = int(np.sum(y > x)), int(np.sum(y < x))
    headline = f"Run against baseline · {len(both_ok)} cells ok on both sides: {better} better, {worse} worse"
    if comparison is not None:
        overall = {m.metric: m for m in comparison.metrics if m.scope == "overall"}
        if "bps" in overall:
            m = overall["bps"]
            headline += f"\noverall bps {format_bps(m.base, 3)} → {format_bps(m.new, 3)} ({m.verdict}) · "
        else:
            headline += "\n"
        gated = [m for m in comparison.metrics if m.gated]
        regressed = sum(m.verdict == "regressed" for m in gated)
        lost = len(comparison.coverage_regressions)
        if comparison.passed:
            headline += "no regression"
        else:
            headline += f"REGRESSION: {regressed} of {len(gated)} gated metrics"
            if lost:
                headline += f", {plural(lost, 'cell')} lost coverage"
            if comparison.missing_datasets:
                headline += f", {plural(len(comparison.missing_datasets), 'dataset')} missing"
        headline += samples_status(comparison)
    axes.set_title(_text(headline), fontsize=10, loc="left")
    _dataset_legend(figure, entries, columns)
    return figure


# ----------------------------------------------------------------------------------------------
# Everything a picture or a report needs, loaded once


def figures(inputs: RunOverview, result: RunFrames | None = None) -> dict[str, Figure]:
    """Every overview figure of `inputs` by file stem (the per-dataset histograms are separate).

    `result` is `RunFrames(inputs.scored)` when the caller already has it (its frames are built once).
    """
    result = result if result is not None else RunFrames(inputs.scored)
    made = {
        "bps-by-dataset": bps_strip_figure(result),
        "bps-vs-rate": bps_rate_figure(result, inputs.min_samples),
        "coverage": coverage_figure(inputs.scored, inputs.min_samples),
    }
    if len(inputs.steps.results) > 1:
        made["bps-over-steps"] = steps_figure(inputs.steps)
    if inputs.baseline is not None:
        made["compare-cells"] = compare_figure(result, RunFrames(inputs.baseline), inputs.comparison)
    return made


def dataset_stems(names: Sequence[str]) -> dict[str, str]:
    """A distinct, file-system-safe file stem for each dataset name: `dataset-<name>`."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        base = "dataset-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed")[:80]
        stem, suffix = base, 2
        while stem.lower() in taken:
            stem, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(stem.lower())
        stems[name] = stem
    return stems


def save_figure(figure: Figure, path: str | os.PathLike[str], fmt: str = "png") -> Path:
    """Write `figure` to `path` as PNG (at DPI, exactly its size) or SVG, whole or not at all (`write_output`)."""
    if fmt not in FORMATS:
        raise BpsevalError(f"unknown image format {fmt!r}; use one of {', '.join(FORMATS)}")
    return write_output(figure_bytes(figure, fmt), path)


def figure_bytes(figure: Figure, fmt: str = "png") -> bytes:
    """`figure` as the bytes of a PNG (at DPI, exactly its size) or SVG file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=DPI, facecolor="white", metadata=_metadata(fmt))
    return buffer.getvalue()


def png_bytes(figure: Figure) -> bytes:
    """`figure` as PNG bytes (for embedding)."""
    return figure_bytes(figure, "png")


def _metadata(fmt: str) -> dict[str, str]:
    from bpseval._version import __version__

    return {"Software": f"bpseval {__version__}"} if fmt == "png" else {"Creator": f"bpseval {__version__}"}


def write_plots(inputs: RunOverview, out_dir: str | os.PathLike[str], fmt: str = "png") -> list[Path]:
    """Write every figure of `inputs` to `out_dir` (created if needed); returns the files written.

    Files: bps-by-dataset, bps-vs-rate, coverage, bps-over-steps (more than one step),
    compare-cells (with a baseline), and dataset-<name> for each dataset's histogram.
    """
    if fmt not in FORMATS:
        raise BpsevalError(f"unknown image format {fmt!r}; use one of {', '.join(FORMATS)}")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise BpsevalError(f"{folder}: exists and is not a directory; pass a folder for the pictures.")
    result = RunFrames(inputs.scored)
    written = [save_figure(figure, folder / f"{stem}.{fmt}", fmt) for stem, figure in figures(inputs, result).items()]
    for name, stem in dataset_stems(inputs.scored.names).items():
        written.append(save_figure(bps_histogram_figure(result, name), folder / f"{stem}.{fmt}", fmt))
    return written


__all__ = [
    "DPI",
    "bps_histogram_figure",
    "bps_rate_figure",
    "bps_strip_figure",
    "compare_figure",
    "coverage_figure",
    "dataset_colors",
    "figures",
    "matched_cells",
    "png_bytes",
    "require_matplotlib",
    "save_figure",
    "steps_figure",
    "write_plots",
]
