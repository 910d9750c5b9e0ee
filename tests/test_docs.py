"""The docs pages' code runs as written (the rules of tests/test_readme.py), their reference is generated, and
the version is written in one place.

Each page's python and bash blocks run in order in a fresh folder holding the shipped run, so a
command shown on a page is one that works; blocks that cannot run here (a GPU job, CI YAML, an
install) carry the reason on the line before them; a block that checks a promise (the training
guide's online and offline numbers agree) asserts it itself. The command-line reference is made from the
Typer app by `docs/hooks.py` when the site is built: it must name every option `--help` offers, and
it is never committed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import bpseval
from tests.test_readme import README, REPO, code_blocks, prepared_folder, run_blocks, unexplained_blocks

DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
RUN_PAGES = [
    page
    for page in PAGES
    if any(block.lang in ("python", "bash") and not block.reason_not_run for block in code_blocks(page))
]
COMMANDS = ["compute", "coverage", "plan", "baseline", "compare", "doctor", "plot", "report"]


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_block_runs_or_says_why_not(page: Path) -> None:
    assert unexplained_blocks(page) == []
    reasons = [block.reason_not_run for block in code_blocks(page) if block.mark and block.mark.startswith("not run")]
    assert all(reasons), f"{page_id(page)}: a `not run:` mark without its reason"


@pytest.mark.parametrize("page", RUN_PAGES, ids=page_id)
def test_page_code_runs(page: Path, tmp_path: Path) -> None:
    done = run_blocks(page, prepared_folder(tmp_path))
    assert done, f"{page_id(page)} has code blocks but none ran"


def test_the_pages_run_the_main_commands() -> None:
    """Each main command appears in a block that runs, not only in prose."""
    ran = "\n".join(
        block.body
        for page in [README, *PAGES]
        for block in code_blocks(page)
        if block.lang == "bash" and not block.reason_not_run
    )
    for command in COMMANDS:
        assert re.search(rf"^(?:\S+=\S+ )?bpseval {command}\b", ran, flags=re.MULTILINE), command


def _hooks():  # type: ignore[no-untyped-def]
    pytest.importorskip("griffe", reason="docs/hooks.py needs the docs extra: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", COMMANDS)
def test_the_generated_cli_reference_names_every_option(command: str) -> None:
    import typer

    from bpseval import cli

    reference = _hooks().cli_reference()
    section = reference.split(f"## bpseval {command}\n", 1)[1].split("\n## ", 1)[0]
    options = typer.main.get_command(cli.app).commands[command].params  # type: ignore[attr-defined]
    flags = {flag for option in options for flag in (*option.opts, *option.secondary_opts) if flag.startswith("-")}
    assert flags and {flag for flag in flags if f"`{flag}`" not in section} == set()
    assert "[bold]" not in section and "[/]" not in section  # Rich markup is removed


def test_the_metrics_page_lists_every_dashboard_key_from_its_one_definition() -> None:
    """The keys of `--metrics`, `--tensorboard`, `Result.metrics` and the callback are listed from `metric_keys`
    and the metrics' declarations, at the place the metrics page marks."""
    from bpseval.kernel.metrics import METRICS
    from bpseval.views.dashboards import PREFIX, metric_keys

    hooks = _hooks()
    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    assert hooks.METRIC_KEYS_MARK in page
    built = hooks.on_page_markdown(page, None, None, None)
    keys = re.findall(rf"^\| `({PREFIX}[^`]+)` \|", built, flags=re.MULTILINE)
    assert keys == metric_keys(["<dataset>"])
    assert all(metric.description in built for metric in METRICS.values())


def test_generated_pages_and_the_built_site_are_not_committed() -> None:
    assert not (DOCS / "reference" / "cli.md").exists()
    assert not (DOCS / "project").exists()
    assert "site/" in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_the_changelog_names_the_current_version() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog
    assert re.search(rf"^## \[{re.escape(bpseval.__version__)}\]", changelog, flags=re.MULTILINE)


def test_the_version_is_written_only_in_its_module() -> None:
    """pyproject reads it (dynamic); docs and code import it; nothing else spells it out."""
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject and 'attr = "bpseval._version.__version__"' in pyproject
    places = [README, REPO / "pyproject.toml", REPO / "mkdocs.yml", REPO / ".ci" / "run", *PAGES, DOCS / "hooks.py"]
    places += [path for path in (REPO / "bpseval").rglob("*.py") if path.name != "_version.py"]
    literal = re.compile(rf"(?<![\d.]){re.escape(bpseval.__version__)}(?![\d.])")
    assert [str(path.relative_to(REPO)) for path in places if literal.search(path.read_text(encoding="utf-8"))] == []
