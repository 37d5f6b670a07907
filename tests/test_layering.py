"""The import layering docs/architecture.md describes, checked on the source (issue 27).

Packages are the nodes: a sub-package (``fedcore.plans``, ``fedcore.server.engine``) or a
top-level module (``fedcore.errors``, ``fedcore.worker.cli``). Every import counts, also one
inside a function or under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Where each package's source lives (server/ and worker/ install as fedcore.server/.worker).
SOURCES = {
    "fedcore": ROOT / "fedcore",
    "fedcore.server": ROOT / "server",
    "fedcore.worker": ROOT / "worker",
}
SIDES = ("fedcore.server", "fedcore.worker")
#: The one shared package that runs both sides in one process (fed-sim).
BOTH_SIDES = "fedcore.simulation"

Edge = tuple[str, str, str]  # (importing package, imported package, "module imports name")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "fedcore" and parts[0] == "v1":
                continue  # generated protobuf code
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path, is_package)
    return found


MODULES = _modules()


def node(module: str) -> str:
    """The package ``module`` belongs to, in the sense of this test."""
    parts = module.split(".")
    base = parts[:2] if ".".join(parts[:2]) in SIDES else parts[:1]
    rest = parts[len(base) :]
    return ".".join(base + rest[:1])


def _imports(module: str, path: Path, is_package: bool) -> Iterator[str]:
    here = module if is_package else module.rpartition(".")[0]
    for item in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(item, ast.Import):
            yield from (alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom):
            if item.level:
                base = here.split(".")[: len(here.split(".")) - item.level + 1]
                target = ".".join(base + ([item.module] if item.module else []))
            else:
                target = item.module or ""
            yield target
            # `from fedcore import plans` imports the sub-module fedcore.plans.
            yield from (f"{target}.{a.name}" for a in item.names if f"{target}.{a.name}" in MODULES)


def edges() -> list[Edge]:
    found = []
    for module, (path, is_package) in MODULES.items():
        for target in _imports(module, path, is_package):
            if target.split(".")[0] != "fedcore" or target.startswith("fedcore.v1"):
                continue
            a, b = node(module), node(target)
            if a != b:
                found.append((a, b, f"{module} imports {target}"))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_harness_sees_the_imports_it_checks() -> None:
    """Positive control: known arrows are found, and a planted cycle is reported."""
    found = {(a, b) for a, b, _ in edges()}
    assert ("fedcore.server.engine", "fedcore.server.state") in found
    assert ("fedcore.server.state", "fedcore.errors") in found
    assert ("fedcore.simulation", "fedcore.worker") in found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_two_packages_import_each_other() -> None:
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges():
        graph.setdefault(a, set()).add(b)
    found = cycles(graph)
    why = [w for c in found for a, b, w in edges() if a in c and b in c]
    assert found == [], "\n".join(why)


@pytest.mark.parametrize("side", SIDES)
def test_shared_code_imports_neither_side_except_the_simulation(side: str) -> None:
    offenders = [
        why
        for a, b, why in edges()
        if not a.startswith(SIDES) and a != BOTH_SIDES and b.startswith(side)
    ]
    assert offenders == []


def test_the_coordinator_and_the_worker_never_import_each_other() -> None:
    server, worker = SIDES
    offenders = [
        why
        for a, b, why in edges()
        if (a.startswith(server) and b.startswith(worker))
        or (a.startswith(worker) and b.startswith(server))
    ]
    assert offenders == []
