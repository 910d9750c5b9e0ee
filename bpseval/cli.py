"""The `bpseval` command line: a thin layer over the library.

Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage (one message on stderr, no traceback),
3 an internal error, a bug (its traceback and a request to report it), 130 interrupted (Ctrl-C),
141 stdout closed by its reader (`bpseval compute | head -1`), quietly.
"""

from __future__ import annotations

import os
import select
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from bpseval import config
from bpseval._json import json_text
from bpseval._version import __version__
from bpseval.api import Result, evaluate
from bpseval.errors import ArgumentError, BpsevalError
from bpseval.features.compare import CompareSettings, Comparison, compare_paths
from bpseval.features.coverage import check_coverage
from bpseval.features.doctor import diagnose
from bpseval.features.groups import load_exclusions
from bpseval.features.planning import check_cell_coverage, exclude_from_plans, load_masks, plan_to_dict
from bpseval.features.steps import StepResults, evaluate_steps, incomplete_text
from bpseval.features.uncertainty import DEFAULT_RESAMPLES, DEFAULT_SEED, IntervalSettings
from bpseval.kernel.stats import OK
from bpseval.run.document import baseline_document
from bpseval.run.scored import ScoredRun
from bpseval.views.dashboards import metrics_json, metrics_lines, require_tensorboard, write_tensorboard
from bpseval.views.documents import compare_junit, compare_markdown
from bpseval.views.files import check_outputs, write_csv, write_text
from bpseval.views.frames import runs_frame, steps_frame
from bpseval.views.tables import TableFormat, print_line
from bpseval.views.terminal import (
    merge_progress,
    render_compare,
    render_compute,
    render_coverage,
    render_doctor,
    render_groups,
    render_intervals,
    render_plan,
    render_runs,
    render_steps,
)
from bpseval.views.text import ATTRIBUTION_TOP, PRINTED_TOP, printable

if TYPE_CHECKING:
    import pandas as pd

EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141
"""128 + SIGPIPE: what a shell reports for git, or any program ended by writing to a pipe its reader closed."""


class _Commands(TyperGroup):
    """bpseval's commands: what a command raises past its own handling becomes an exit code (the module's docstring)."""

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a closed stdout ends it quietly with EXIT_STDOUT_CLOSED, Ctrl-C with EXIT_INTERRUPTED."""
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe is told here, not by the interpreter's flush at exit
            return result
        except BrokenPipeError:
            closed = _closed_pipes()
            if not closed:  # another pipe (a child's, a socket): Typer would call it a failed gate
                _report_bug()
                raise typer.Exit(EXIT_BUG) from None
            _end_quietly(closed)
        except SystemExit as ending:
            if isinstance(ending.__context__, BrokenPipeError):  # rich's Console.on_broken_pipe, for a write of ours
                _end_quietly(_closed_pipes())
            raise
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Typer's main; an exception that escapes it is a bug: its traceback, one line asking to report it, EXIT_BUG.

        Without `standalone_mode` the caller gets every exception as it is.
        """
        if not standalone_mode:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        try:
            return super().main(*args, **kwargs)
        except Exception:  # noqa: BLE001 -- Typer has turned every expected error into an exit code: this is a bug
            _report_bug()
            sys.exit(EXIT_BUG)


def _report_bug() -> None:
    """The traceback of the exception being handled, and one line asking to report it, on stderr."""
    traceback.print_exc()
    print(f"This is a bug in bpseval {__version__}: please report it with the traceback above.", file=sys.stderr)


def _closed_pipes() -> list[int]:
    """Which of stdout and stderr (1, 2) is a pipe whose reader is gone: such a pipe polls as an error or hang-up.

    Empty where `select.poll` is missing (Windows, where a closed pipe is not EPIPE anyway).
    """
    if not hasattr(select, "poll"):
        return []
    poller = select.poll()
    for descriptor in (1, 2):
        poller.register(descriptor, select.POLLOUT)
    return [descriptor for descriptor, events in poller.poll(0) if events & (select.POLLERR | select.POLLHUP)]


def _end_quietly(closed: list[int]) -> NoReturn:
    """The reader of our output is gone: send what is left for it to /dev/null (no one to tell) and exit 141."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for descriptor in closed:
        os.dup2(devnull, descriptor)
    os.close(devnull)
    raise typer.Exit(EXIT_STDOUT_CLOSED)


app = typer.Typer(
    cls=_Commands,
    name="bpseval",
    help="Exact bits per spike of neural encoding models from the HDF5 shards of distributed validation.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"bpseval {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Exact bits per spike of neural encoding models from the HDF5 shards of distributed validation."""
    command = ctx.invoked_subcommand
    if command is None:
        return
    _apply_settings(ctx, command)


def _apply_settings(ctx: typer.Context, command: str) -> None:
    """Make the settings file's keys (`bpseval.config`) the defaults of `command`'s options, and say so on stderr.

    They become click's `default_map` of the command: an option given on the command line wins, and `--help`
    shows them as the defaults.
    """
    group = ctx.command
    assert isinstance(group, TyperGroup)
    options = {
        name: {param.name.replace("_", "-") for param in sub.params if param.name and param.param_type_name == "option"}
        for name, sub in group.commands.items()
    }
    with bad_input_exits():
        settings = config.load(commands=options)
    defaults = settings.default_map(command, options.get(command, set()))
    if defaults:
        ctx.default_map = {command: defaults}
        keys = ", ".join(name.replace("_", "-") for name in defaults)
        stderr_console().print(f"using settings from {settings.path} ({keys})", highlight=False, markup=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


@contextmanager
def bad_input_exits() -> Iterator[None]:
    """Turn a BpsevalError into one message on stderr and exit code 2.

    Library errors (h5py, OS) are turned into BpsevalErrors where they are raised (an output file
    that cannot be written: `write_output`), so anything else is a bug, and exits EXIT_BUG.
    """
    try:
        yield
    except BpsevalError as error:
        stderr_console().print(f"[bold red]Error:[/] {escape(str(error))}", markup=True, highlight=False, emoji=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


RunDir = Annotated[Path, typer.Argument(help="Run directory; shards are found in it and below it.", show_default=True)]
Step = Annotated[
    int | None,
    typer.Option(
        "--step",
        help="Validation step to use (default: the latest complete one; newer incomplete ones are passed over).",
    ),
]
LatestStep = Annotated[
    int | None,
    typer.Option("--step", help="Validation step to use (default: the latest, which must be complete)."),
]
JsonPath = Annotated[str | None, typer.Option("--json", metavar="PATH", help="Write JSON here ([bold]-[/] = stdout).")]
CsvPath = Annotated[str | None, typer.Option("--csv", metavar="PATH", help="Write the per-cell table as CSV.")]
CellsPath = Annotated[
    Path | None,
    typer.Option(
        "--cells",
        metavar="TABLE",
        help="CSV of cell attributes: columns dataset, cell (0-based index) or cell_id, and any others.",
    ),
]
ExcludeCells = Annotated[
    Path | None,
    typer.Option(
        "--exclude-cells",
        metavar="TABLE",
        help="CSV of cells to leave out of every number and gate (dead units): columns dataset, cell (0-based index)"
        " or cell_id, and an optional reason. Listed as excluded in every output.",
    ),
]
GroupBy = Annotated[
    str | None,
    typer.Option(
        "--group-by", metavar="COLUMN", help="Every metric per value of this --cells column, per dataset and overall."
    ),
]


Jobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Processes that merge datasets in parallel.")]
Scheduler = Annotated[
    str | None,
    typer.Option(
        "--scheduler", metavar="ADDRESS", help="Merge on a Dask cluster: its scheduler address, or [bold]local[/]."
    ),
]
NoCache = Annotated[
    bool,
    typer.Option("--no-cache", help="Merge every step from its shards: neither read nor write the merge cache."),
]
RunDirs = Annotated[
    list[Path] | None,
    typer.Argument(help="Run directories (default: .); several give one row per run.", show_default=False),
]


class Choice(str, Enum):  # not StrEnum: that is Python 3.11+, and bpseval supports 3.10
    """The values of an option that takes one of a few words."""


class Layout(Choice):
    table = "table"
    plain = "plain"
    markdown = "markdown"


Format = Annotated[
    Layout,
    typer.Option(
        "--format",
        help="How tables are printed: [bold]table[/] (box lines), [bold]plain[/] (columns of spaces, for grep and"
        " diff) or [bold]markdown[/] (GitHub tables, for pasting).",
    ),
]


class CiOver(Choice):
    blocks = "blocks"
    cells = "cells"


class SortKey(Choice):
    run = "run"
    bps = "bps"
    bps_pooled = "bps_pooled"
    pseudo_r2 = "pseudo_r2"
    pseudo_r2_pooled = "pseudo_r2_pooled"
    corr = "corr"


class _Outputs(NamedTuple):
    """Where `compute` writes its documents (None: not asked for; '-': stdout)."""

    json: str | None
    csv: str | None
    metrics: str | None
    tensorboard: str | None
    groups_csv: str | None = None

    def check(self, runs: list[Path], tables: list[tuple[str, Path | None]]) -> None:
        """Refuse unusable paths, inputs as outputs, and dashboard outputs for several runs, before any shard is read."""
        check_outputs(
            {
                "--json": self.json,
                "--csv": self.csv,
                "--metrics": self.metrics,
                "--tensorboard": self.tensorboard,
                "--groups-csv": self.groups_csv,
            },
            folders={"--tensorboard"},
            inputs=[*(("run directory", run) for run in runs), *tables],
        )
        if len(runs) > 1 and (self.metrics or self.tensorboard):
            raise ArgumentError(
                f"--metrics and --tensorboard take one run directory, not {len(runs)}; run bpseval compute once per"
                " run."
            )
        if self.tensorboard is not None:
            require_tensorboard()

    @property
    def on_stdout(self) -> bool:
        """A document goes to stdout, which must then hold nothing else."""
        return "-" in (self.json, self.csv, self.metrics, self.groups_csv)


ClampNegative = Annotated[
    bool,
    typer.Option(
        "--clamp-negative", help="Reproduce legacy training-loop numbers: clamp each cell's bps at 0 before the means."
    ),
]
LowBelow = Annotated[
    int,
    typer.Option(
        "--min-samples",
        min=0,
        help="Cells with fewer valid samples are [bold]low[/]: listed, left out of the means, kept in bps_pooled.",
    ),
]
Sort = Annotated[
    SortKey, typer.Option("--sort", help="Order of the runs when several are given (a metric: best first).")
]
AllSteps = Annotated[
    bool, typer.Option("--all-steps", help="One row per complete step found; incomplete steps are listed, not scored.")
]
MetricsPath = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        metavar="PATH",
        help="Write the flat dashboard metrics as JSON (with --all-steps: JSON Lines) ([bold]-[/] = stdout).",
    ),
]
TensorboardDir = Annotated[
    str | None,
    typer.Option(
        "--tensorboard",
        metavar="DIR",
        help="Write the dashboard metrics as TensorBoard event files, at each step. Needs bpseval\\[tensorboard].",
    ),
]
GroupsCsv = Annotated[
    str | None,
    typer.Option("--groups-csv", metavar="PATH", help="Write the --group-by table as CSV ([bold]-[/] = stdout)."),
]
Ci = Annotated[
    float | None,
    typer.Option(
        "--ci",
        metavar="LEVEL",
        help="Also give bootstrap intervals at this level, 0 < LEVEL < 1 (e.g. 0.95) of every summary number.",
    ),
]
CiOverOption = Annotated[
    CiOver,
    typer.Option(
        "--ci-over",
        help="Resample [bold]blocks[/] of samples (validation-set noise; needs sample_idx) or [bold]cells[/]"
        " (population noise).",
    ),
]
CiResamples = Annotated[int, typer.Option("--ci-resamples", min=100, help="Bootstrap resamples of --ci.")]
CiSeed = Annotated[int, typer.Option("--ci-seed", min=0, help="Seed of the --ci bootstrap.")]


@app.command()
def compute(
    run_dirs: RunDirs = None,
    step: Step = None,
    json_path: JsonPath = None,
    csv_path: CsvPath = None,
    clamp_negative: ClampNegative = False,
    min_samples: LowBelow = 0,
    sort: Sort = SortKey.run,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    all_steps: AllSteps = False,
    metrics_path: MetricsPath = None,
    tensorboard_dir: TensorboardDir = None,
    no_cache: NoCache = False,
    cells_path: CellsPath = None,
    group_by: GroupBy = None,
    groups_csv_path: GroupsCsv = None,
    ci: Ci = None,
    ci_over: CiOverOption = CiOver.blocks,
    ci_resamples: CiResamples = DEFAULT_RESAMPLES,
    ci_seed: CiSeed = DEFAULT_SEED,
    layout: Format = Layout.table,
    exclude_cells: ExcludeCells = None,
) -> None:
    """Merge the shards of one step and print exact bits per spike per dataset and overall."""
    paths = run_dirs or [Path(".")]
    outputs = _Outputs(json_path, csv_path, metrics_path, tensorboard_dir, groups_csv_path)
    scoring = {"clamp_negative": clamp_negative, "min_samples": min_samples, "exclude_cells": exclude_cells}
    merging = {"jobs": jobs, "scheduler": scheduler, "cache": not no_cache}
    with bad_input_exits():
        outputs.check(paths, [("--cells", cells_path), ("--exclude-cells", exclude_cells)])
        _check_compute_options(paths, all_steps, cells_path, group_by, groups_csv_path)
        intervals = None if ci is None else IntervalSettings(ci, ci_over.value, ci_resamples, ci_seed)
        if intervals is not None and all_steps:
            raise ArgumentError("--ci gives intervals on one step: leave out --all-steps.")
    if all_steps:
        _compute_all_steps(paths, step, outputs, scoring, layout.value, **merging)
        return
    options: dict[str, Any] = {**scoring, **merging, "cells": cells_path, "group_by": group_by}
    if intervals is not None:
        options.update(ci=ci, ci_over=intervals.over, ci_resamples=intervals.resamples, ci_seed=intervals.seed)
    with bad_input_exits():
        results, failed = _score_runs(paths, step, options)
        table = runs_frame({run: result.scored for run, result in results.items()}, sort.value) if results else None
        _write_compute_outputs(outputs, paths, results, failed, table)
    reasons = {run: error.removeprefix(f"{run}: ") for run, error in failed.items()}
    _show_compute(outputs, paths, results, table, reasons, layout.value)
    if failed:
        errors = stderr_console()
        for run, reason in reasons.items():
            errors.print(f"[bold red]Error:[/] {escape(f'{run}: not scored: {reason}')}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)


def _check_compute_options(
    paths: list[Path], all_steps: bool, cells: Path | None, group_by: str | None, groups_csv: str | None
) -> None:
    """Refuse options of `compute` that do not go together, before any shard is read."""
    if any(option is not None for option in (cells, group_by, groups_csv)) and (all_steps or len(paths) > 1):
        raise ArgumentError("--cells, --group-by and --groups-csv take one run directory and one step.")
    if groups_csv is not None and group_by is None:
        raise ArgumentError("--groups-csv writes the --group-by table: give --cells and --group-by too.")


def _score_runs(
    paths: list[Path], step: int | None, options: dict[str, Any]
) -> tuple[dict[str, Result], dict[str, str]]:
    """Each run scored (`evaluate`), and the error of each that cannot be (with one run, its error is raised)."""
    results: dict[str, Result] = {}
    failed: dict[str, str] = {}
    for path in paths:
        try:
            with merge_progress(f"{path}") as on_progress:
                results[str(path)] = evaluate(path, step, on_progress=on_progress, **options)
        except BpsevalError as error:
            if len(paths) == 1:
                raise
            failed[str(path)] = str(error)
    return results, failed


def _write_compute_outputs(
    outputs: _Outputs,
    paths: list[Path],
    results: dict[str, Result],
    failed: dict[str, str],
    table: pd.DataFrame | None,
) -> None:
    """The files of `compute`: CSV, JSON, dashboard metrics, TensorBoard events, the groups table."""
    several = len(paths) > 1
    only = next(iter(results.values()), None)  # one run: outputs.check refuses dashboards for several
    if outputs.csv is not None:
        write_csv(_runs_table(table, failed) if several or only is None else only.cells, outputs.csv)
    if outputs.json is not None:
        documents = {run: {"run": run, **result.to_dict()} for run, result in results.items()}
        documents.update({run: {"run": run, "error": error} for run, error in failed.items()})
        entries = [documents[str(path)] for path in dict.fromkeys(paths)]
        write_text(json_text({"runs": entries} if several else entries[0]), outputs.json)
    if only is not None and outputs.metrics is not None:
        write_text(metrics_json(only.scored), outputs.metrics)
    if only is not None and outputs.tensorboard is not None:
        print_warnings(write_tensorboard([only.scored], outputs.tensorboard))
    if only is not None and outputs.groups_csv is not None:
        write_csv(only.groups, outputs.groups_csv)


def _show_compute(
    outputs: _Outputs,
    paths: list[Path],
    results: dict[str, Result],
    table: pd.DataFrame | None,
    failed: dict[str, str],
    form: TableFormat,
) -> None:
    """Warnings, then the tables (on stderr when stdout holds a document; with several runs, a row for each run that
    could not be scored, `failed`: its reason), then the few-samples notes."""
    several = len(paths) > 1
    for run, result in results.items():
        print_warnings(result.warnings, f"{run}: " if several else "")
    console = stderr_console() if outputs.on_stdout else Console(highlight=False)
    if not outputs.on_stdout and not several and results:
        result = next(iter(results.values()))
        render_compute(result.scored, console, form)
        if result.group_scores is not None:
            render_groups(result.group_scores, result.step, console, form)
        if result.intervals is not None:
            render_intervals(result.scored, result.intervals, console, form)
    elif not outputs.on_stdout and several:
        render_runs(table, console, form, failed)
    for run, result in results.items():
        note = _few_samples_note(result.scored)
        if note is not None:
            print_line(console, f"[yellow]Note:[/] {escape((f'{run}: ' if several else '') + note)}", form)


def _runs_table(table: pd.DataFrame | None, failed: dict[str, str]) -> pd.DataFrame:
    """The runs table of a sweep with one row per run that could not be scored (its reason in `error`), last."""
    import pandas as pd

    if not failed:
        return table
    errors = pd.DataFrame({"run": list(failed), "error": list(failed.values())})
    return errors if table is None else pd.concat([table, errors], ignore_index=True)


FEW_SAMPLES = 10
"""An ok cell scored on fewer valid samples than this has a bps that is mostly noise (coverage's default bar)."""
FEW_SAMPLE_CELLS_NAMED = 5


def _few_samples_note(scored: ScoredRun) -> str | None:
    """One line naming the ok cells scored on fewer than FEW_SAMPLES valid samples, and the option for them."""
    listed = [
        (dataset.name, int(cell), int(dataset.stats.n_valid[cell]))
        for dataset in scored.datasets
        for cell in np.flatnonzero((dataset.scores.status == OK) & (dataset.stats.n_valid < FEW_SAMPLES))
    ]
    if not listed:
        return None
    first = listed[:FEW_SAMPLE_CELLS_NAMED]
    named = ", ".join(f"{printable(name)} cell {cell} (n_valid {n_valid})" for name, cell, n_valid in first)
    more = len(listed) - FEW_SAMPLE_CELLS_NAMED
    return (
        f"{len(listed)} ok cell{'s were' if len(listed) != 1 else ' was'} scored on fewer than {FEW_SAMPLES} valid"
        f" samples: {named}{f' and {more} more' if more > 0 else ''}. Their bps is mostly noise; --min-samples"
        f" {FEW_SAMPLES} marks them low and leaves them out of the means."
    )


def _compute_all_steps(
    paths: list[Path],
    step: int | None,
    outputs: _Outputs,
    scoring: dict[str, Any],
    form: TableFormat,
    **merge_options: Any,
) -> None:
    """`compute --all-steps`: one row per complete step of one run (JSON: `StepResults.to_dict`, CSV: `steps_frame`,
    metrics: JSON Lines, one object per step)."""
    with bad_input_exits():
        if len(paths) != 1:
            raise BpsevalError(f"--all-steps takes one run directory, not {len(paths)}.")
        if step is not None:
            raise BpsevalError("--all-steps scores every step: leave out --step.")
        steps = evaluate_steps(paths[0], **scoring, **merge_options)
        if outputs.csv is not None:
            write_csv(steps_frame(steps), outputs.csv)
        if outputs.json is not None:
            write_text(json_text(steps.to_dict(str(paths[0]))), outputs.json)
        if outputs.metrics is not None:
            write_text(metrics_lines(steps.results.values()), outputs.metrics)
        if outputs.tensorboard is not None:
            print_warnings(write_tensorboard(steps.results.values(), outputs.tensorboard))
    errors = stderr_console()
    print_warnings(steps.notes)
    for result in steps.results.values():
        print_warnings(result.warnings, f"step {result.step}: ")
    if not outputs.on_stdout:
        render_steps(steps, Console(highlight=False), form=form)
    else:
        for number, reason in steps.incomplete.items():
            errors.print(
                f"[yellow]Skipped incomplete step:[/] {escape(incomplete_text(number, reason))}", highlight=False
            )
    _exit_if_bad_steps(steps)


def _exit_if_bad_steps(steps: StepResults) -> None:
    """After everything that could be scored was shown: name each step or file that could not be, and exit 2."""
    if not steps.bad:
        return
    errors = stderr_console()
    for text in [incomplete_text(number, reason) for number, reason in steps.failed.items()] + steps.problems:
        errors.print(f"[bold red]Error:[/] {escape(text)}", highlight=False)
    raise typer.Exit(EXIT_BAD_INPUT)


MinSamples = Annotated[int, typer.Option("--min-samples", min=0, help="Flag cells with fewer valid samples than this.")]


@app.command()
def coverage(
    run_dir: RunDir = Path("."),
    min_samples: MinSamples = 10,
    min_spikes: Annotated[
        float | None, typer.Option("--min-spikes", min=0, help="Also flag cells with fewer spikes than this.")
    ] = None,
    step: Step = None,
    json_path: JsonPath = None,
    csv_path: CsvPath = None,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    no_cache: NoCache = False,
    layout: Format = Layout.table,
    exclude_cells: ExcludeCells = None,
) -> None:
    """Count the valid samples of every cell, in total and per rank. Exit 1 if a cell falls below."""
    with bad_input_exits():
        check_outputs(
            {"--json": json_path, "--csv": csv_path},
            inputs=[("run directory", run_dir), ("--exclude-cells", exclude_cells)],
        )
    with bad_input_exits(), merge_progress(str(run_dir)) as on_progress:
        report = check_coverage(
            run_dir,
            min_samples,
            step=step,
            min_spikes=min_spikes,
            exclude_cells=exclude_cells,
            jobs=jobs,
            scheduler=scheduler,
            on_progress=on_progress,
            cache=not no_cache,
        )
        if csv_path is not None:
            write_csv(report.cells, csv_path)
        if json_path is not None:
            write_text(json_text(report.to_dict()), json_path)
    print_warnings(report.warnings)
    if "-" not in (json_path, csv_path):
        render_coverage(report, Console(highlight=False), layout.value)
    if not report.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
def plan(
    masks: Annotated[
        Path, typer.Argument(help="Validation masks: a .npy array, or an HDF5 file of arrays (one per dataset).")
    ],
    world_size: Annotated[int, typer.Option("--world-size", min=1, help="Number of ranks (GPUs).")] = 1,
    fraction: Annotated[
        float,
        typer.Option("--fraction", min=0.0, max=1.0, help="Fraction of validation batches kept (limit_val_batches)."),
    ] = 1.0,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Validation batch size.")] = None,
    min_samples: MinSamples = 10,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="DistributedSampler(shuffle=True) with this seed (default: no shuffle)."),
    ] = None,
    json_path: JsonPath = None,
    layout: Format = Layout.table,
    exclude_cells: ExcludeCells = None,
) -> None:
    """Predict, before training, each cell's valid samples under DistributedSampler. Exit 1 if a cell falls below."""
    with bad_input_exits():
        check_outputs({"--json": json_path}, inputs=[("mask file", masks), ("--exclude-cells", exclude_cells)])
        exclusions = load_exclusions(exclude_cells)
        plans = {
            name: check_cell_coverage(
                mask,
                world_size=world_size,
                fraction=fraction,
                batch_size=batch_size,
                min_samples=min_samples,
                seed=seed,
            )
            for name, mask in load_masks(masks).items()
        }
        excluded = [] if exclusions is None else exclude_from_plans(plans, exclusions)
        settings = {
            "world_size": world_size,
            "fraction": fraction,
            "batch_size": batch_size,
            "min_samples": min_samples,
            "seed": seed,
            **({"exclude_cells": str(exclude_cells)} if exclude_cells is not None else {}),
        }
        if json_path is not None:
            write_text(json_text(plan_to_dict(plans, settings)), json_path)
    print_warnings(excluded)
    if json_path != "-":
        render_plan(plans, min_samples, Console(highlight=False), layout.value)
    if any(frame["below"].any() for frame in plans.values()):
        raise typer.Exit(EXIT_GATE_FAILED)


class GatedMetric(Choice):
    bps = "bps"
    bps_pooled = "bps_pooled"
    both = "both"


@app.command()
def baseline(
    run_dir: RunDir = Path("."),
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Baseline file to write ([bold]-[/] = stdout). [default: baseline.json]",
        ),
    ] = None,
    json_path: Annotated[
        str | None, typer.Option("--json", metavar="PATH", help="The same as -o: the baseline is the JSON document.")
    ] = None,
    step: Step = None,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    no_cache: NoCache = False,
) -> None:
    """Write a baseline for `bpseval compare`: the compute JSON with per-cell statistics and identity checksums."""
    with bad_input_exits():
        if output is not None and json_path is not None:
            raise ArgumentError("-o and --json both name the baseline file (the same JSON document); give one of them.")
        output = output or json_path or "baseline.json"
        check_outputs({"-o/--output" if json_path is None else "--json": output}, inputs=[("run directory", run_dir)])
    with bad_input_exits(), merge_progress(str(run_dir)) as on_progress:
        result = evaluate(run_dir, step, jobs=jobs, scheduler=scheduler, on_progress=on_progress, cache=not no_cache)
        write_text(json_text(baseline_document(result.to_dict())), output)
    print_warnings(result.warnings)
    if output != "-":
        stderr_console().print(f"baseline of step {result.step} written to {output}", highlight=False)


AllowDifferentSamples = Annotated[
    bool,
    typer.Option(
        "--allow-different-samples",
        help="Compare even when the run and the baseline scored different samples of a dataset (their identity"
        " checksums differ); every verdict is then marked as made on different samples.",
    ),
]


def _test_level(value: float | None) -> float | None:
    """--significance is a test level: strictly between 0 and 1 (0 would never flag, 1 always)."""
    if value is not None and not 0.0 < value < 1.0:
        raise typer.BadParameter(f"{value:g} is not a test level: give 0 < LEVEL < 1, e.g. 0.05 for a 95% interval.")
    return value


@app.command()
def compare(
    run_dir: RunDir = Path("."),
    baseline_path: Annotated[
        Path, typer.Option("--baseline", metavar="BASE", help="A baseline JSON (bpseval baseline) or a run directory.")
    ] = Path("baseline.json"),
    step: LatestStep = None,
    atol: Annotated[float, typer.Option("--atol", min=0.0, help="Absolute tolerance of the overall metrics.")] = 0.0,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, help="Relative tolerance of the overall metrics.")] = 0.01,
    dataset_atol: Annotated[
        float | None,
        typer.Option("--dataset-atol", min=0.0, help="Absolute tolerance per dataset (default: --atol)."),
    ] = None,
    dataset_rtol: Annotated[
        float | None,
        typer.Option("--dataset-rtol", min=0.0, help="Relative tolerance per dataset (default: --rtol)."),
    ] = None,
    metric: Annotated[GatedMetric, typer.Option("--metric", help="Overall metrics that gate.")] = GatedMetric.both,
    allow_missing_datasets: Annotated[
        bool, typer.Option("--allow-missing-datasets", help="Do not fail when a baseline dataset is missing.")
    ] = False,
    significance: Annotated[
        float | None,
        typer.Option(
            "--significance",
            metavar="LEVEL",
            callback=_test_level,
            help="Also require a significant drop: the level of the two-sided bootstrap test, 0 < LEVEL < 1;"
            " the interval shown is the 1 - LEVEL one (0.05: 95%).",
        ),
    ] = None,
    fail_on_inconclusive: Annotated[
        bool,
        typer.Option(
            "--fail-on-inconclusive",
            help="With --significance, also fail when the interval of a change reaches below -tolerance only in part"
            " (inconclusive; by default it passes with a warning).",
        ),
    ] = False,
    allow_different_samples: AllowDifferentSamples = False,
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            min=1,
            help=f"Cells (and groups) of each failed metric's change shown. \\[default: {PRINTED_TOP} printed,"
            f" {ATTRIBUTION_TOP} in --markdown]",
        ),
    ] = None,
    blocks: Annotated[int, typer.Option("--blocks", min=2, help="Sample blocks of the paired bootstrap.")] = 100,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=100, help="Bootstrap replicates (as many as --ci-resamples by default).")
    ] = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    json_path: JsonPath = None,
    markdown_path: Annotated[
        str | None,
        typer.Option(
            "--markdown",
            metavar="PATH",
            help="Write a markdown summary (under GitHub Actions it is also appended to $GITHUB_STEP_SUMMARY).",
        ),
    ] = None,
    junit_path: Annotated[
        str | None, typer.Option("--junit", metavar="PATH", help="Write JUnit XML: a testcase per gated metric.")
    ] = None,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    no_cache: NoCache = False,
    cells_path: CellsPath = None,
    group_by: GroupBy = None,
    layout: Format = Layout.table,
    exclude_cells: ExcludeCells = None,
) -> None:
    """Compare a run with a baseline. Exit 1 if a gated metric regressed or became undefined (or, with
    --fail-on-inconclusive, is inconclusive), or coverage was lost; the cells that carry each failed change are listed.

    Under GitHub Actions ($GITHUB_STEP_SUMMARY set) the markdown summary is also appended to the job summary.
    """
    summary, markdown_path = _step_summary(markdown_path)
    with bad_input_exits():
        check_outputs(
            {"--json": json_path, "--markdown": markdown_path, "--junit": junit_path, "$GITHUB_STEP_SUMMARY": summary},
            inputs=[
                ("run directory", run_dir),
                ("--baseline", baseline_path),
                ("--cells", cells_path),
                ("--exclude-cells", exclude_cells),
            ],
        )
        settings = CompareSettings(
            atol=atol,
            rtol=rtol,
            dataset_atol=dataset_atol,
            dataset_rtol=dataset_rtol,
            metric=metric.value,
            allow_missing_datasets=allow_missing_datasets,
            significance=significance,
            blocks=blocks,
            bootstrap=bootstrap,
            seed=seed,
            fail_on_inconclusive=fail_on_inconclusive,
            allow_different_samples=allow_different_samples,
        )
        comparison = compare_paths(
            run_dir,
            baseline_path,
            settings,
            step,
            cells=cells_path,
            group_by=group_by,
            exclude_cells=exclude_cells,
            jobs=jobs,
            scheduler=scheduler,
            cache=not no_cache,
        )
        for path, text in (
            (json_path, json_text(comparison.to_dict())),
            (markdown_path, compare_markdown(comparison, top or ATTRIBUTION_TOP)),
            (junit_path, compare_junit(comparison)),
        ):
            if path is not None:
                write_text(text, path)
        if summary is not None:
            write_text("\n" + compare_markdown(comparison, top or ATTRIBUTION_TOP), summary, append=True)
            stderr_console().print(
                f"markdown summary appended to $GITHUB_STEP_SUMMARY ({summary})", highlight=False, markup=False
            )
    print_warnings(comparison.warnings + comparison.inconclusive_warnings)
    if "-" not in (json_path, markdown_path, junit_path):
        render_compare(comparison, Console(highlight=False), top or PRINTED_TOP, layout.value)
    if not comparison.passed:
        stderr_console().print(f"Regression: {printable('; '.join(comparison.reasons))}", highlight=False, markup=False)
        raise typer.Exit(EXIT_GATE_FAILED)


def _step_summary(markdown_path: str | None) -> tuple[str | None, str | None]:
    """GitHub Actions' job summary file ($GITHUB_STEP_SUMMARY; None when unset), and --markdown unless it is that file.

    A `--markdown "$GITHUB_STEP_SUMMARY"` (the older recipe) is then appended once rather than written twice.
    """
    summary = os.environ.get("GITHUB_STEP_SUMMARY") or None
    if (
        summary is not None
        and markdown_path not in (None, "-")
        and os.path.realpath(markdown_path) == os.path.realpath(summary)
    ):
        return summary, None
    return summary, markdown_path


@app.command()
def doctor(run_dir: RunDir = Path("."), json_path: JsonPath = None, layout: Format = Layout.table) -> None:
    """Check a run directory without computing: steps, ranks, leftovers, damaged files. Exit 1 on problems."""
    with bad_input_exits():
        check_outputs({"--json": json_path}, inputs=[("run directory", run_dir)])
        diagnosis = diagnose(run_dir)
        if json_path is not None:
            write_text(json_text(diagnosis.to_dict()), json_path)
    if json_path != "-":
        render_doctor(diagnosis, Console(highlight=False), layout.value)
    if diagnosis.status:
        raise typer.Exit(diagnosis.status)


class ImageFormat(Choice):
    png = "png"
    svg = "svg"


Baseline = Annotated[
    Path | None,
    typer.Option(
        "--baseline", metavar="BASE", help="Also compare with a baseline: a baseline JSON or a run directory."
    ),
]


def print_warnings(warnings: list[str], where: str = "") -> None:
    """Each warning as one `Warning:` line on stderr, led by `where`: nothing a command was told is dropped."""
    for warning in warnings:
        stderr_console().print(f"[yellow]Warning:[/] {escape(where + warning)}", highlight=False)


@app.command()
def plot(
    run_dir: RunDir = Path("."),
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="DIR", help="Folder for the pictures (created if needed).")
    ] = ...,  # type: ignore[assignment]  # a required option, as typer spells it
    step: Step = None,
    image_format: Annotated[ImageFormat, typer.Option("--format", help="Image format.")] = ImageFormat.png,
    baseline_path: Baseline = None,
    allow_different_samples: AllowDifferentSamples = False,
    min_samples: MinSamples = 10,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    no_cache: NoCache = False,
    exclude_cells: ExcludeCells = None,
) -> None:
    """Draw per-cell bps, bps against rate, coverage per rank, bps over steps, and run vs baseline.
    Needs [bold]bpseval\\[plot][/]."""
    from bpseval.features.overview import load_overview
    from bpseval.views.plot import require_matplotlib, write_plots

    with bad_input_exits():
        check_outputs(
            {"-o/--output": output},
            folders={"-o/--output"},
            inputs=[("run directory", run_dir), ("--baseline", baseline_path), ("--exclude-cells", exclude_cells)],
        )
        require_matplotlib()
        inputs = load_overview(
            run_dir,
            step,
            baseline=baseline_path,
            min_samples=min_samples,
            settings=CompareSettings(allow_different_samples=allow_different_samples),
            exclude_cells=exclude_cells,
            jobs=jobs,
            scheduler=scheduler,
            cache=not no_cache,
        )
        written = write_plots(inputs, output, image_format.value)
    print_warnings([*inputs.steps.notes, *inputs.scored.warnings, *_sample_warnings(inputs.comparison)])
    console = Console(highlight=False)
    console.print(
        f"{len(written)} pictures of step {inputs.scored.step} written to {escape(str(output))}:", markup=False
    )
    for path in written:
        console.print(f"  {path.name}", markup=False)
    _exit_if_bad_steps(inputs.steps)


@app.command()
def report(
    run_dir: RunDir = Path("."),
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="PATH", help="The HTML file to write ([bold]-[/] = stdout).")
    ] = ...,  # type: ignore[assignment]  # a required option, as typer spells it
    baseline_path: Baseline = None,
    allow_different_samples: AllowDifferentSamples = False,
    step: LatestStep = None,
    min_samples: MinSamples = 10,
    jobs: Jobs = 1,
    scheduler: Scheduler = None,
    no_cache: NoCache = False,
    cells_path: CellsPath = None,
    group_by: GroupBy = None,
    exclude_cells: ExcludeCells = None,
) -> None:
    """Write one self-contained HTML page: tables, pictures, unscored cells, the verdict against a baseline.
    Needs [bold]bpseval\\[plot][/]."""
    from bpseval.features.overview import load_overview
    from bpseval.views.html import render_report
    from bpseval.views.plot import require_matplotlib

    options = [str(run_dir), "-o", output]
    options += ["--baseline", str(baseline_path)] if baseline_path is not None else []
    options += ["--allow-different-samples"] if allow_different_samples else []
    options += ["--step", str(step)] if step is not None else []
    options += ["--min-samples", str(min_samples)] if min_samples != 10 else []
    options += ["--no-cache"] if no_cache else []
    options += ["--cells", str(cells_path)] if cells_path is not None else []
    options += ["--group-by", group_by] if group_by is not None else []
    options += ["--exclude-cells", str(exclude_cells)] if exclude_cells is not None else []
    with bad_input_exits():
        check_outputs(
            {"-o/--output": output},
            inputs=[
                ("run directory", run_dir),
                ("--baseline", baseline_path),
                ("--cells", cells_path),
                ("--exclude-cells", exclude_cells),
            ],
        )
        require_matplotlib()
        inputs = load_overview(
            run_dir,
            step,
            baseline=baseline_path,
            min_samples=min_samples,
            settings=CompareSettings(allow_different_samples=allow_different_samples),
            jobs=jobs,
            scheduler=scheduler,
            cache=not no_cache,
            cells=cells_path,
            group_by=group_by,
            pass_over=False,
            exclude_cells=exclude_cells,
        )
        html = render_report(inputs, _command_line("report", options), run_label=str(run_dir))
        write_text(html, output)
    groups = inputs.groups.warnings if inputs.groups else []
    print_warnings([*inputs.steps.notes, *inputs.scored.warnings, *groups, *_sample_warnings(inputs.comparison)])
    console = stderr_console() if output == "-" else Console(highlight=False)  # stdout holds the HTML then
    size = len(html.encode()) / 1024
    console.print(
        f"report of step {inputs.scored.step} written to {output} ({size:.0f} KB)", highlight=False, markup=False
    )
    _exit_if_bad_steps(inputs.steps)


def _sample_warnings(comparison: Comparison | None) -> list[str]:
    """What `plot` and `report` say of a baseline whose samples differ from the run's (or may)."""
    return [] if comparison is None else comparison.sample_warnings


def _command_line(command: str, options: list[str]) -> list[str]:
    """The command line as typed when this process is `bpseval COMMAND ...`; else rebuilt from the parsed options."""
    argv = sys.argv
    if len(argv) > 1 and Path(argv[0]).name in ("bpseval", "cli.py", "__main__.py") and argv[1] == command:
        return ["bpseval", *argv[1:]]
    return ["bpseval", command, *options]


def main() -> None:
    """Console-script entry point."""
    app()
