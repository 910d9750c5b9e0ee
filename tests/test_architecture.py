"""The layers of ARCHITECTURE.md hold: lower layers never import higher ones, every module is named there,
and `import bpseval` loads neither pandas, rich, matplotlib nor torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bpseval"

LEAVES = {"errors", "_version", "_arrays", "_json", "_sidefiles", "_distributed"}
LAYERS = {"leaves": 0, "kernel": 1, "shard": 2, "run": 3, "features": 4, "views": 5, "entry points": 6}


def layer_of(module: str) -> str:
    """The layer of `bpseval.<...>` as ARCHITECTURE.md lays them out."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in {"cli", "config", "api", "torch", "lightning", "sampler", "__main__"}:
        return "entry points"
    if parts[0] in LEAVES:
        return "leaves"
    return parts[0]


def modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imported_modules(path: Path) -> set[str]:
    """Every bpseval module `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bpseval"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("bpseval")}
    return found


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_a_higher_layer(module):
    mine = LAYERS[layer_of(module)]
    higher = {name for name in imported_modules(modules()[module]) if LAYERS[layer_of(name)] > mine}
    if layer_of(module) == "leaves":  # leaves are independent of each other, errors aside
        higher |= {name for name in imported_modules(modules()[module]) if name != "bpseval.errors"}
    assert not higher, f"{module} ({layer_of(module)}) imports {sorted(higher)}"


def test_every_module_is_named_in_architecture_md():
    text = (REPO / "ARCHITECTURE.md").read_text()
    unnamed = []
    for module, path in modules().items():
        if path.name == "__init__.py" and module != "bpseval":
            continue
        relative = path.relative_to(PACKAGE).as_posix()
        if relative not in text and f"`{path.name}`" not in text and path.name not in text:
            unnamed.append(relative)
    assert not unnamed, f"ARCHITECTURE.md does not name {unnamed}"


def test_importing_bpseval_loads_no_heavy_dependency():
    """Not even a placeholder: a library that tests `"pandas" in sys.modules` must not be misled."""
    code = (
        "import sys, bpseval\n"
        "heavy = ('pandas', 'rich', 'matplotlib', 'torch', 'numba')\n"
        "print([name for name in heavy if name in sys.modules])\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert completed.stdout.strip() == "[]"


def test_the_wheel_holds_every_module(tmp_path):
    """A real install (not editable) gets every subpackage, not only the top-level one, and the `py.typed`
    marker that lets type checkers read the package's hints."""
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    import zipfile

    (wheel,) = tmp_path.glob("bpseval-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name for name in names if name.endswith(".py")} == {
        path.relative_to(REPO).as_posix() for path in modules().values()
    }
    assert "bpseval/py.typed" in names


BATCH_RULES = (
    "dataset name must be",
    "rate_kind must be one of",
    "rhat and robs must both have shape",
    "sample_idx must be",
    "cell_ids must",
    "dfs must be given with the same shape",
    "give sample_idx on every batch or on none",
)


@pytest.mark.parametrize("rule", BATCH_RULES)
def test_each_batch_rule_is_written_once_in_the_batch_contract(rule):
    """ARCHITECTURE.md: every batch is checked by one contract, `kernel/batch.py`; no path keeps a copy of a check.

    The shard reader's checks of stored arrays (`shard/reader.py`) are the format's, not a batch's: they read
    what a file declares, without its values.
    """
    holders = [path.relative_to(PACKAGE).as_posix() for path in modules().values() if rule in path.read_text()]
    assert sorted(set(holders) - {"shard/reader.py"}) == ["kernel/batch.py"]


@pytest.mark.parametrize(
    "module", ["bpseval.shard.writer", "bpseval.torch", "bpseval.api", "bpseval.kernel.online"], ids=str
)
def test_every_path_that_takes_a_batch_goes_through_the_batch_contract(module):
    assert "bpseval.kernel.batch" in imported_modules(modules()[module])


@pytest.mark.parametrize(
    "module", ["bpseval.shard.reader", "bpseval.torch", "bpseval.run.cache", "bpseval.run.document"], ids=str
)
def test_every_path_that_takes_sums_it_did_not_make_goes_through_the_sums_contract(module):
    """ARCHITECTURE.md: stats-only shards, saved online states, cache entries and baseline documents pass
    `kernel.sums.checked_sums`."""
    assert "bpseval.kernel.sums" in imported_modules(modules()[module])
    assert "checked_sums(" in modules()[module].read_text() or "check_parts_add_up(" in modules()[module].read_text()


def test_only_the_header_readers_and_the_parallel_runner_start_processes():
    """ARCHITECTURE.md: processes are started in two modules, one way (`run.parallel.START_METHOD`)."""
    starters = ("multiprocessing", "ProcessPoolExecutor", "os.fork", "subprocess", "LocalCluster")
    holders = [
        path.relative_to(PACKAGE).as_posix()
        for path in modules().values()
        if any(word in path.read_text() for word in starters)
    ]
    assert sorted(holders) == ["run/headers.py", "run/parallel.py"]
    catalog = (PACKAGE / "run" / "headers.py").read_text()
    assert 'START_METHOD != "fork"' in catalog and "start_method" not in (PACKAGE / "run" / "parallel.py").read_text()


def test_the_run_document_is_owned_by_one_module():
    """ARCHITECTURE.md: the document of `compute --json` and of baselines is written, read, versioned and
    checked in `run/document.py` alone."""
    owners = {
        marker: [path.relative_to(PACKAGE).as_posix() for path in modules().values() if marker in path.read_text()]
        for marker in ('"bpseval-baseline"', "def check_document", "def scored_from_document", '"n_valid": n_valid')
    }
    assert all(holders == ["run/document.py"] for holders in owners.values()), owners


def test_there_is_no_import_cycle():
    """ARCHITECTURE.md: imports go one way, also those made inside functions (no cycle hidden by a late import)."""
    graph = {module: imported_modules(path) & set(modules()) for module, path in modules().items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(target) :], target])}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_cells_of_two_runs_are_matched_by_one_rule():
    """ARCHITECTURE.md: compare, attribution and the figures match cells with `run.scored.cell_pairs` only."""
    for module in ("bpseval.features.compare", "bpseval.features.attribution", "bpseval.views.plot"):
        assert "cell_pairs(" in modules()[module].read_text(), module


def test_every_long_module_says_why_in_architecture_md():
    """ARCHITECTURE.md: no module over about 600 lines unless its "Long modules" list says why."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    listed = text[text.index("Long modules:") : text.index("`benchmarks/` (not installed)")]
    long = [
        path.relative_to(PACKAGE).as_posix() for path in modules().values() if len(path.read_text().splitlines()) > 600
    ]
    assert [name for name in long if f"`{name}`" not in listed] == []


def test_every_summary_metric_is_declared_in_one_table():
    """ARCHITECTURE.md: the summary metrics are declared once (`kernel.metrics.METRICS`), and only the kernel
    turns nats into bits: no other module divides by ln 2 or keeps a metric's formula of its own."""
    from bpseval.kernel.metrics import METRICS
    from bpseval.run.scored import SUMMARY_METRICS

    assert tuple(METRICS) == SUMMARY_METRICS
    bits = [
        path.relative_to(PACKAGE).as_posix()
        for path in modules().values()
        if "LN2" in path.read_text() or "log(2" in path.read_text()
    ]
    assert sorted(bits) == ["kernel/metrics.py", "kernel/stats.py"]
    for module in ("bpseval.run.scored", "bpseval.features.uncertainty", "bpseval.features.attribution"):
        assert "METRICS[" in modules()[module].read_text() or "metric_values(" in modules()[module].read_text()


SET_METHODS = {"contains", "__contains__", "first_sightings", "first_positions"}


def test_one_structure_holds_the_sample_indices_seen():
    """ARCHITECTURE.md: `kernel.samples.SeenSamples` is the one set of sample indices seen (with first positions for
    the merge): no other class has a set's methods, no other module grows a sorted array by insertion (`np.insert`),
    and the modules that track the samples seen use it."""
    others: dict[str, list[str]] = {}
    for module, path in modules().items():
        if module == "bpseval.kernel.samples":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)} & SET_METHODS
                if methods:
                    others.setdefault(module, []).append(f"class {node.name} with {sorted(methods)}")
            elif (
                isinstance(node, ast.Attribute) and node.attr == "insert" and ast.unparse(node.value) in {"np", "numpy"}
            ):
                others.setdefault(module, []).append("np.insert")
    assert others == {}
    users = {module for module, path in modules().items() if "SeenSamples" in path.read_text()}
    assert {"bpseval.kernel.online", "bpseval.run.dedup", "bpseval.shard._stats_store"} <= users


def test_every_thread_pool_is_ended_by_the_call_that_starts_it():
    """ARCHITECTURE.md: threads have an owner that ends them. Every pool bpseval starts is a `with` block's, or is
    shut down in the `finally` of the function that started it; no pool is kept in a module or a class."""
    for module, path in modules().items():
        source = path.read_text()
        tree = ast.parse(source)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = ast.get_source_segment(source, function) or ""
            started = body.count("ThreadPoolExecutor(") + body.count("ProcessPoolExecutor(")
            in_with = len(re.findall(r"with (Thread|Process)PoolExecutor\(", body))
            shut = body.count(".shutdown(") if "finally:" in body else 0
            assert started <= in_with + shut, f"{module}.{function.name} starts a pool nothing ends"
        outside = [
            node
            for node in tree.body
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and "PoolExecutor(" in (ast.get_source_segment(source, node) or "")
        ]
        assert not outside, f"{module} starts a pool at import"
