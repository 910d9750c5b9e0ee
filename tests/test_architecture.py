"""The layers of ARCHITECTURE.md hold: lower layers never import higher ones, every module is named there,
and `import bpseval` loads neither pandas, rich, matplotlib nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bpseval"

LEAVES = {"errors", "_version", "_arrays", "_lazy", "_json", "_sidefiles", "_distributed"}
LAYERS = {"leaves": 0, "kernel": 1, "shard": 2, "run": 3, "features": 4, "views": 5, "entry points": 6}


def layer_of(module: str) -> str:
    """The layer of `bpseval.<...>` as ARCHITECTURE.md lays them out."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in {"cli", "api", "torch", "lightning", "sampler", "__main__"}:
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
    code = (
        "import sys, importlib.util, bpseval\n"
        "heavy = ('pandas', 'rich', 'matplotlib', 'torch', 'numba')\n"
        "loaded = [name for name in heavy if name in sys.modules\n"
        "          and not isinstance(sys.modules[name], importlib.util._LazyModule)]\n"
        "print(loaded)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert completed.stdout.strip() == "[]"


def test_the_wheel_holds_every_module(tmp_path):
    """A real install (not editable) gets every subpackage, not only the top-level one."""
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
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert packaged == {path.relative_to(REPO).as_posix() for path in modules().values()}
