"""The package's shape: no import circle (type-only imports included) and no module over 500 lines.

A circle is allowed only through a module that says it states a contract
as Protocols: its docstring's first line names it a "Protocol module".
Imports are read with ``ast``, so an import under ``if TYPE_CHECKING:``
or inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sharedpool"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _is_protocol_module(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return "protocol module" in doc.split("\n", 1)[0].lower()


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]], allowed: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module, after dropping the allowed modules (Tarjan)."""
    nodes = [n for n in graph if n not in allowed]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt in allowed:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    modules = _modules()
    allowed = {name for name, path in modules.items() if _is_protocol_module(path)}
    assert allowed, "no Protocol module found: the checker would allow nothing, or read nothing"
    assert cycles(import_graph(), allowed) == []


# Over the bound, to be split, each with why it is not yet: the test fails
# once one is back under it, so that this list cannot go stale.
OVER = {
    "sharedpool.manager.loop": "Sentinel and Cluster grew it to 528 lines in the same round; its split is open",
    "sharedpool.manager.pool_state": "Cluster grew it to 510 lines in the same round; its split is open",
}


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_size(name: str) -> None:
    lines = len(_modules()[name].read_text().splitlines())
    if name in OVER:
        assert lines > MAX_LINES, f"{name} is {lines} lines now: take it off OVER"
        return
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES})"


def test_the_checker_sees_a_type_only_circle() -> None:
    # The checker must fail on what it is for: a circle closed by an import under TYPE_CHECKING.
    tree = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(tree, set()) == [["a", "b", "c"]]
    assert cycles(tree, {"b"}) == []


def test_imports_under_type_checking_count(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sharedpool.client.sync_pool import X\n")
    assert _imports("sharedpool.x", module, set(_modules())) == {"sharedpool.client.sync_pool"}


@pytest.mark.parametrize("package", ["sharedpool.client", "sharedpool.asyncio", "sharedpool.lease", "sharedpool.shell"])
def test_a_module_map_names_every_module(package: str) -> None:
    modules = _modules()
    doc = ast.get_docstring(ast.parse(modules[package].read_text())) or ""
    names = {name.rpartition(".")[2] for name in modules if name.rpartition(".")[0] == package}
    missing = sorted(name for name in names if f"``{name}``" not in doc)
    assert missing == [], f"{package}'s module map does not name {missing}"
