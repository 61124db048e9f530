"""The layers a newcomer can draw: serve/ at the bottom, no import circle anywhere."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rl_system", "serve", "train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Every imported name, at any depth (lazy imports count), except under
    ``if TYPE_CHECKING:``, which never runs."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (``from pkg import mod`` resolves to mod)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imported in _runtime_imports(ast.parse(path.read_text(), str(path))):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_the_cycle_finder_finds_a_circle():
    # The check below is only worth something if it can fail.
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_the_project_modules():
    graph = import_graph()
    assert "serve.app" in graph and "rl_system.pipeline" in graph  # the walk found the code
    assert import_cycles(graph) == []


def test_serve_names_no_module_above_it():
    graph = import_graph()
    upward = {m: sorted(d for d in deps if not d.startswith("serve"))
              for m, deps in graph.items() if m.startswith("serve")}
    assert {m: d for m, d in upward.items() if d} == {}


# Modules that need an optional extra at import time (the ast check above still covers them).
NEEDS_EXTRA = {"serve.backends.vllm_ingress": "vllm"}


def test_importing_every_serve_module_loads_nothing_of_rl_system_or_train():
    serve_modules = sorted(m for m in project_modules() if m.split(".")[0] == "serve")
    script = (
        "import importlib, json, sys\n"
        f"for m in {serve_modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError:\n"
        f"        if m not in {sorted(NEEDS_EXTRA)!r}:\n"
        "            raise\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('rl_system', 'train'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=300)
    assert len(serve_modules) > 10
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
