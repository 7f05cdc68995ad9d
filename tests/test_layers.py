"""The package's layers: imports run one way, from apps down to core, with no cycle.

core (config, schema, images, color, data, weak labels) <- nn <- checkpoint <- runtime
<- training <- apps (export, serve, cli). Imports inside functions count too. A module may
import its own layer or any layer below, never one above; nothing imports the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "beautytag"
LAYERS = [  # lowest first; a module's layer is the first prefix that matches it
    ("core", ("beautytag", "beautytag.images", "beautytag.color", "beautytag.weak_labels",
              "beautytag.schema", "beautytag.config", "beautytag.data", "beautytag.composite")),
    ("nn", ("beautytag.nn",)),
    ("files", ("beautytag.checkpoint",)),
    ("runtime", ("beautytag.runtime",)),
    ("training", ("beautytag.training",)),
    ("apps", ("beautytag.export", "beautytag.serve", "beautytag.cli", "beautytag.search",
              "beautytag.catalogue")),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The index in LAYERS of `module` (the longest matching prefix wins)."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def imports(path: Path) -> set[str]:
    """The beautytag modules that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "beautytag":
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "beautytag"}
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(root.rglob("*.py"))}


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in edges.items():
        for t in targets:
            if t == "beautytag.cli":
                bad.append(f"{module} imports the CLI")
            elif layer(t) > layer(module):
                bad.append(
                    f"{module} ({LAYERS[layer(module)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
                )
    return sorted(bad)


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the package's modules, if there is one."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m], path[len(path) :] = 1, [m]
        for t in sorted(edges.get(m, ())):
            if t not in edges or t == m or (m == "beautytag" and t.startswith("beautytag.")):
                continue
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_imports_run_one_way_from_apps_down_to_core():
    assert layer_violations(graph()) == []


def test_no_import_cycle():
    assert cycle(graph()) is None


def test_the_checks_catch_an_upward_import_and_a_cycle():
    edges = {"beautytag.images": {"beautytag.runtime.engine"}, "beautytag.runtime.engine": set()}
    assert layer_violations(edges) == [
        "beautytag.images (core) imports beautytag.runtime.engine (runtime)"
    ]
    assert layer_violations({"beautytag.serve.app": {"beautytag.cli"}, "beautytag.cli": set()})
    loop = {"beautytag.data": {"beautytag.config"}, "beautytag.config": {"beautytag.data"}}
    assert cycle(loop) == ["beautytag.config", "beautytag.data", "beautytag.config"]


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_module_over_500_lines(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{path.relative_to(PACKAGE)}: {lines} lines"


@pytest.mark.parametrize(
    "command",
    ["", "train", "evaluate", "calibrate", "predict", "serve", "export", "index", "search"],
)
def test_help_imports_neither_torch_nor_timm(command: str):
    code = (
        "import sys, beautytag.cli as c\n"
        f"try: c.main({[a for a in (command, '--help') if a]!r})\n"
        "except SystemExit: pass\n"
        "print(sorted({'torch', 'timm', 'numpy', 'PIL'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: beautytag" in out.stdout
    assert out.stdout.splitlines()[-1] == "[]"
