"""The shape of the code, read from its syntax trees (nothing is imported or run): no import
cycle among the modules of mosaicd and mosaic_client, no module over 800 lines and no function
over 100 lines, each but for the explicit allow-lists below, which may only shrink."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

PACKAGES = ("mosaicd", "mosaic_client")
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100

# None is allowed today; a future exception goes here with the reason its size is earned.
ALLOWED_CYCLES: set[str] = set()  # each as its modules in order, joined by " <-> "
ALLOWED_LONG_MODULES: set[str] = set()  # paths from the repository's root
ALLOWED_LONG_FUNCTIONS: set[str] = set()  # "path qualified.name"


def modules() -> dict[str, Path]:
    """Every module of PACKAGES by its dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement of module `name` (file `path`) may load."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = name.split(".")
        if path.name != "__init__.py":
            package.pop()
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    # `from a import b` loads a, and a.b where b is a module.
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Who imports whom among the modules, counting every import statement: at module level,
    inside functions and under `if TYPE_CHECKING:`. A module importing its own package's
    __init__ is not an edge (that is how a package hands names on, and Python has it loaded)."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported(name, path, node):
                own_package = name.startswith(target + ".")
                if target in mods and target != name and not own_package:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    work: list[tuple[str, Iterator[str]]] = []  # the path of the depth-first search

    def enter(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        work.append((v, iter(sorted(graph[v]))))

    for root in sorted(graph):
        if root in index:
            continue
        enter(root)
        while work:
            v, successors = work[-1]
            w = next(successors, None)
            if w is not None:
                if w not in index:
                    enter(w)
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """Every function and method with its qualified name (nested ones too)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def lines_of(node: ast.AST) -> int:
    """From the `def` line (or its first decorator) to the function's last line."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return node.end_lineno - first + 1  # type: ignore[attr-defined,operator]


def check_allowed(found: set[str], allowed: set[str], what: str) -> None:
    new, fixed = found - allowed, allowed - found
    assert not new, f"{what}, not in the allow-list: {sorted(new)}"
    assert not fixed, f"in the allow-list of {what} but no longer true, remove: {sorted(fixed)}"


def test_the_helpers_see_what_they_should() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    mods = modules()
    assert "mosaicd" in mods and "mosaicd.main" in mods and "mosaic_client.cli" in mods
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n")
    assert [name for name, _ in functions(tree)] == ["A.f", "A.f.g"]
    node = ast.parse("from . import x\n").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert imported("mosaicd.storage.store", REPO / "mosaicd/storage/store.py", node) == [
        "mosaicd.storage",
        "mosaicd.storage.x",
    ]
    assert imported("mosaicd.storage", REPO / "mosaicd/storage/__init__.py", node) == [
        "mosaicd.storage",
        "mosaicd.storage.x",
    ]


def test_no_import_cycles() -> None:
    found = {" <-> ".join(sorted(cycle)) for cycle in cycles(import_graph())}
    check_allowed(found, ALLOWED_CYCLES, "import cycles")


def test_no_module_over_800_lines() -> None:
    long = {
        str(path.relative_to(REPO))
        for path in modules().values()
        if len(path.read_text().splitlines()) > MAX_MODULE_LINES
    }
    check_allowed(long, ALLOWED_LONG_MODULES, f"modules over {MAX_MODULE_LINES} lines")


def test_no_function_over_100_lines() -> None:
    long = set()
    for path in modules().values():
        where = str(path.relative_to(REPO))
        for name, node in functions(ast.parse(path.read_text(), where)):
            if lines_of(node) > MAX_FUNCTION_LINES:
                long.add(f"{where} {name}")
    check_allowed(long, ALLOWED_LONG_FUNCTIONS, f"functions over {MAX_FUNCTION_LINES} lines")
