"""MkDocs hooks: pages generated at build time from the code and the repository, never committed.

- `reference/cli.md`: every command, argument and option of the Typer app (`bpseval.cli.app`), with
  its help text, type and default, read from the click command Typer builds;
- `project/*.md`: the repository's own ARCHITECTURE.md, CHANGELOG.md, tests/README.md and
  benchmarks/README.md, whose links to files outside the site become plain text;
- the footer names the version from `bpseval/_version.py`;
- the metrics page's list of dashboard keys (`METRIC_KEYS_MARK`), from `bpseval.views.dashboards.metric_keys`
  and the metrics' declarations (`bpseval.kernel.metrics.METRICS`);
- `ExampleSections`, a griffe extension (mkdocs.yml), reads the docstrings' `Example:` sections as
  examples (griffe's Google style knows only `Examples:`), so that their doctests show as code.
"""

from __future__ import annotations

import enum
import html
import os
import re
import sys
from pathlib import Path
from typing import Any

import griffe

REPO = Path(__file__).resolve().parents[1]
PROJECT_PAGES = {
    "project/architecture.md": "ARCHITECTURE.md",
    "project/changelog.md": "CHANGELOG.md",
    "project/tests.md": "tests/README.md",
    "project/benchmarks.md": "benchmarks/README.md",
}
"""Generated page -> the repository file it shows."""
LOCAL_LINK = re.compile(r"\[([^\]]+)\]\((?!https?:|mailto:|#)[^)]*\)")
"""A markdown link to a file of the repository, which is not part of the site."""


EXAMPLE_HEADING = re.compile(r"^(\s*)Example:$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Docstrings' `Example:` sections read as griffe's `Examples:` (doctests shown as code)."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        """Rename the heading before the docstring is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)


def _bpseval() -> Any:
    """The bpseval of this checkout (not another installed copy)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import bpseval

    if Path(bpseval.__file__).resolve().parents[1] != REPO:
        raise RuntimeError(f"the docs of {REPO} would be built from another bpseval: {bpseval.__file__}")
    return bpseval


def _plain(text: str | None) -> str:
    """Help text without Rich markup (`[bold]-[/]`, `bpseval\\[plot]`)."""
    from rich.text import Text

    return Text.from_markup(text or "").plain.strip()


def _cell(text: str) -> str:
    """Text that fits one cell of a markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def _kind(param: Any, context: Any) -> str:
    """The option's type as `--help` names it, with its range ("<int range> x>=1")."""
    if getattr(param, "is_flag", False):
        return "flag"
    describe = getattr(param.type, "_describe_range", None)  # click's IntRange and FloatRange
    # HTML code: a markdown code span keeps the backslash of an escaped | in a table cell
    kind = f"<code>{html.escape(param.make_metavar(context)).replace('|', '&#124;')}</code>"
    return f"{kind} ({describe()})" if callable(describe) else kind


def _default(param: Any) -> str:
    """The default shown for an option, as `--help` shows it ("" for none)."""
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    if shown is False or param.default is None or getattr(param, "is_flag", False) or param.required:
        return ""
    value = param.default
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return " ".join(str(item) for item in value)
    return str(value)


def cli_reference() -> str:
    """The markdown of the command-line reference, from the click command Typer builds."""
    import typer

    from bpseval import cli

    group = typer.main.get_command(cli.app)  # typer may bring click of its own: its classes are used through it
    root = group.context_class(group, info_name="bpseval")
    lines = [
        "# Command-line reference",
        "",
        "Generated from the command line's own definitions when the site is built; `bpseval COMMAND --help`",
        "prints the same. Exit codes are the same for every command: see",
        "[Exit codes](../guides/cli.md#exit-codes).",
        "",
        f"{_plain(group.help)}",
        "",
        "```text",
        "bpseval [--version] [--help] COMMAND [ARGS]...",
        "```",
        "",
    ]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        if command.hidden:
            continue
        context = command.context_class(command, info_name=name, parent=root)
        usage = " ".join(command.collect_usage_pieces(context))
        lines += [f"## bpseval {name}", "", "```text", f"bpseval {name} {usage}", "```", "", _plain(command.help), ""]
        arguments = [param for param in command.params if param.param_type_name == "argument"]
        options = [param for param in command.params if param.param_type_name == "option" and not param.hidden]
        if arguments:
            lines += ["| argument | type | default | meaning |", "| --- | --- | --- | --- |"]
            for param in arguments:
                help_text = _plain(getattr(param, "help", "")) + (" Required." if param.required else "")
                lines.append(
                    f"| `{param.human_readable_name}` | {_kind(param, context)} | {_cell(_default(param))}"
                    f" | {_cell(help_text)} |"
                )
            lines.append("")
        lines += ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for param in options:
            names = ", ".join(f"`{flag}`" for flag in (*param.opts, *param.secondary_opts))
            help_text = _plain(param.help) + (" Required." if param.required else "")
            lines.append(f"| {names} | {_kind(param, context)} | {_cell(_default(param))} | {_cell(help_text)} |")
        lines.append("")
    return "\n".join(lines)


def project_page(source: str) -> str:
    """A repository file as a page: links to files outside the site become their text."""
    return LOCAL_LINK.sub(r"\1", (REPO / source).read_text(encoding="utf-8"))


METRIC_KEYS_MARK = "<!-- metric keys: generated -->"
"""Where the metrics page lists the dashboard keys, replaced at build time."""


def metric_keys_table() -> str:
    """The keys `--metrics`, `--tensorboard`, `Result.metrics` and the Lightning callback emit, each with what it
    holds: one row per key pattern, in the order they are written."""
    _bpseval()
    from bpseval.kernel.metrics import METRICS
    from bpseval.views.dashboards import PREFIX, metric_keys

    rows = ["| key | what it holds |", "| --- | --- |"]
    for key in metric_keys(["<dataset>"]):
        name = key.removeprefix(PREFIX).removesuffix("_overall").split("/")[0]
        scope = "over every dataset" if key.endswith("_overall") else "of one dataset"
        rows.append(f"| `{key}` | {METRICS[name].description}, {scope} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Put the generated list of dashboard keys where the metrics page marks it."""
    return markdown.replace(METRIC_KEYS_MARK, metric_keys_table()) if METRIC_KEYS_MARK in markdown else markdown


def on_config(config: Any) -> Any:
    """Name the version in the footer."""
    config["copyright"] = f"bpseval {_bpseval().__version__}"
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages."""
    from mkdocs.structure.files import File

    _bpseval()
    os.environ.setdefault("COLUMNS", "100")
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    for page, source in PROJECT_PAGES.items():
        files.append(File.generated(config, page, content=project_page(source)))
    return files
