"""Markers mean what they say, and tests/unit stays free of Ray.

``-m "not cluster"`` must skip every test that starts a separate Ray cluster with
``ray start`` (and no other), and ``tests/unit`` must run without a Ray runtime: the
checks read the test sources (``ast``), so they import nothing and start nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
UNIT = TESTS / "unit"

# The word before "start" names the ray CLI: "ray", str(BIN / "ray"), ".../bin/ray".
_RAY_CLI = re.compile(r"""\bray['"]?\)*$""")


def _is_ray_start(call: ast.Call) -> bool:
    """``[<ray>, "start", ...]`` as a command list, or a ``"ray start ..."`` shell line."""
    if not call.args:
        return False
    command = call.args[0]
    if isinstance(command, ast.Constant) and isinstance(command.value, str):
        return re.match(r"\s*(\S*/)?ray\s+start\b", command.value) is not None
    if not isinstance(command, ast.List | ast.Tuple):
        return False
    items = command.elts
    return any(
        isinstance(item, ast.Constant) and item.value == "start"
        and _RAY_CLI.search(ast.unparse(before))
        for before, item in zip(items, items[1:], strict=False)
    )


def _starts_ray(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and _is_ray_start(n) for n in ast.walk(tree))


def _is_fixture(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and any(
        "fixture" in ast.unparse(d) for d in node.decorator_list
    )


def ray_start_fixtures(conftest: ast.Module) -> set[str]:
    """Fixtures of a conftest that lead to ``ray start``: the call is in their body or in
    a function or class of the same file that they use (followed through names)."""
    defs = {n.name: n for n in conftest.body
            if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    starters = {name for name, node in defs.items() if _starts_ray(node)}
    grew = True
    while grew:
        used = {name for name, node in defs.items() if name not in starters
                and any(isinstance(n, ast.Name) and n.id in starters for n in ast.walk(node))}
        starters |= used
        grew = bool(used)
    return {name for name in starters if _is_fixture(defs[name])}


def requested_fixtures(module: ast.Module) -> set[str]:
    """Fixture names a module asks for: test and fixture parameters, ``usefixtures``."""
    names = set()
    for node in ast.walk(module):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names |= {a.arg for a in (*node.args.posonlyargs, *node.args.args,
                                      *node.args.kwonlyargs)}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "usefixtures"):
            names |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return names


def uses_marker(module: ast.Module, marker: str) -> bool:
    return any(
        isinstance(n, ast.Attribute) and n.attr == marker
        and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"
        for n in ast.walk(module)
    )


def calls_ray_init(module: ast.Module) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "init"
        and isinstance(n.func.value, ast.Name) and n.func.value.id == "ray"
        for n in ast.walk(module)
    )


def cluster_marker_problem(path: Path, tree: ast.Module, conftests: dict[Path, ast.Module]) -> str:
    """Why ``path``'s cluster marker is wrong, or '' when it starts a cluster."""
    if not uses_marker(tree, "cluster") or _starts_ray(tree):
        return ""
    fixtures = set()
    for folder in (path.parent, *path.parent.parents):
        if folder in conftests:
            fixtures |= ray_start_fixtures(conftests[folder])
        if folder == TESTS:
            break
    if requested_fixtures(tree) & fixtures:
        return ""
    return (f"{path.relative_to(TESTS.parent)}: marked cluster but never runs `ray start` "
            "(nor asks for a conftest fixture that does); drop the marker or start a cluster")


def unit_ray_problem(path: Path, tree: ast.Module) -> str:
    """Why the tests/unit file ``path`` needs a Ray runtime, or ''."""
    why = [what for what, found in (
        ("asks for the ray_session fixture", "ray_session" in requested_fixtures(tree)),
        ("calls ray.init", calls_ray_init(tree)),
    ) if found]
    if not why:
        return ""
    return (f"{path.relative_to(TESTS.parent)}: {' and '.join(why)}; a test that needs Ray "
            "belongs under tests/integration")


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_every_cluster_marked_module_starts_a_cluster():
    conftests = {p.parent: _parse(p) for p in TESTS.rglob("conftest.py")}
    problems = [cluster_marker_problem(p, _parse(p), conftests)
                for p in sorted(TESTS.rglob("test_*.py"))]
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


def test_no_unit_module_starts_ray():
    problems = [unit_ray_problem(p, _parse(p)) for p in sorted(UNIT.rglob("*.py"))]
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


def test_the_cluster_conftest_is_recognised_as_starting_ray():
    """Guards the scan itself: the one real ``ray start`` must be found, or the check
    above would pass on anything."""
    assert ray_start_fixtures(_parse(TESTS / "cluster" / "conftest.py")) == {"local_cluster"}


CLUSTER_ONLY_IN_NAME = '''
import pytest
pytestmark = [pytest.mark.slow, pytest.mark.cluster]
"""Starts nothing: ``ray start`` is only mentioned here."""
def test_scales(serve_port):
    subprocess.run(["ray", "status"])
'''

STARTS_ITS_OWN = '''
import pytest
@pytest.mark.cluster
def test_head():
    subprocess.run(["ray", "start", "--head"], check=True)
'''


@pytest.mark.parametrize("source, flagged", [
    (CLUSTER_ONLY_IN_NAME, True),
    (STARTS_ITS_OWN, False),
    (STARTS_ITS_OWN.replace('["ray", "start", "--head"]', '"ray start --head"'), False),
    ("import pytest\ndef test_plain(ray_session):\n    pass\n", False),
])
def test_a_cluster_marker_without_ray_start_is_flagged(source, flagged):
    path = TESTS / "integration" / "test_example.py"  # where such a file would live
    problem = cluster_marker_problem(path, ast.parse(source), conftests={})
    assert bool(problem) is flagged, problem


@pytest.mark.parametrize("source, flagged", [
    ("def test_x(ray_session):\n    pass\n", True),
    ("import pytest\n@pytest.mark.usefixtures('ray_session')\ndef test_x():\n    pass\n", True),
    ("import ray\ndef test_x():\n    ray.init(num_cpus=1)\n", True),
    ("def test_x(ray_init_calls, monkeypatch):\n    pass\n", False),  # blocks ray.init
    ("from ray.serve.schema import ServeDeploySchema\n", False),  # an import starts nothing
])
def test_a_unit_module_that_needs_ray_is_flagged(source, flagged):
    problem = unit_ray_problem(UNIT / "test_example.py", ast.parse(source))
    assert bool(problem) is flagged, problem
