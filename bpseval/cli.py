"""The `bpseval` command line: a thin layer over the library.

Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage (one message on stderr, no traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from bpseval._version import __version__
from bpseval.errors import BpsevalError
from bpseval.report import render_compute, write_csv, write_text
from bpseval.result import evaluate

EXIT_BAD_INPUT = 2

app = typer.Typer(
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
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Exact bits per spike of neural encoding models from the HDF5 shards of distributed validation."""


def stderr_console() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


@contextmanager
def bad_input_exits() -> Iterator[None]:
    """Turn a BpsevalError (or a file we cannot write) into one message on stderr and exit code 2."""
    try:
        yield
    except (BpsevalError, OSError) as error:
        stderr_console().print(f"[bold red]Error:[/] {error}", markup=True, highlight=False, emoji=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


RunDir = Annotated[
    Path, typer.Argument(help="Run directory; shards are found in it and below it.", show_default=True)
]
Step = Annotated[Optional[int], typer.Option("--step", help="Validation step to use (default: the latest).")]
JsonPath = Annotated[Optional[str], typer.Option("--json", metavar="PATH", help="Write JSON here ([bold]-[/] = stdout).")]
CsvPath = Annotated[Optional[str], typer.Option("--csv", metavar="PATH", help="Write the per-cell table as CSV.")]


@app.command()
def compute(
    run_dir: RunDir = Path("."),
    step: Step = None,
    json_path: JsonPath = None,
    csv_path: CsvPath = None,
    clamp_negative: Annotated[
        bool,
        typer.Option(
            "--clamp-negative",
            help="Reproduce legacy training-loop numbers: clamp each cell's bps at 0 before the means.",
        ),
    ] = False,
) -> None:
    """Merge the shards of one step and print exact bits per spike per dataset and overall."""
    with bad_input_exits():
        result = evaluate(run_dir, step, clamp_negative=clamp_negative)
        if csv_path is not None:
            write_csv(result.cells, csv_path)
        if json_path is not None:
            write_text(result.to_json(), json_path)
    errors = stderr_console()
    for warning in result.warnings:
        errors.print(f"[yellow]Warning:[/] {warning}", highlight=False)
    if "-" not in (json_path, csv_path):
        render_compute(result, Console(highlight=False))


def main() -> None:
    """Console-script entry point."""
    app()
