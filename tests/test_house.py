"""The house rules that can be checked mechanically: no import circles between capbatch modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "capbatch"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every capbatch module ``path`` imports, at module level or inside a function."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for name in candidates:
            # an import of a.b.c depends on the deepest capbatch module named
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me and name != "capbatch":
                found.add(name)
    return found


def test_no_import_circles() -> None:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(files)) for name, path in files.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_import_check_sees_a_circle(tmp_path: Path) -> None:
    """The checker itself must be able to fail: a function-level import back is an edge too."""
    (tmp_path / "capbatch").mkdir()
    a = tmp_path / "capbatch" / "a.py"
    a.write_text("from .b import x\n")
    b = tmp_path / "capbatch" / "b.py"
    b.write_text("def f():\n    from .a import y\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "capbatch"
    try:
        modules = {"capbatch.a", "capbatch.b"}
        assert _imports(a, modules) == {"capbatch.b"}
        assert _imports(b, modules) == {"capbatch.a"}
    finally:
        PACKAGE = saved
