"""Checking a user's class file when the config is checked, without running it.

A class file with a syntax error, or one that does not define the class the config names, would
otherwise be accepted at submit and then fail once per run. The client cannot import the file
(that would run user code, and pull torch into the thin client), so it compiles the text and
reads the names the module binds at top level from its syntax tree.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache

# Statements whose bodies run at module level: a name bound inside them is a module global.
_BLOCKS = (ast.If, ast.Try, ast.With, ast.For, ast.While)


def class_file_problem(path: str, name: str) -> str | None:
    """Why the module at `path` cannot provide `name`, or None when it can.

    "FILE:LINE: SyntaxError: message" when it does not compile; "FILE defines no class NAME"
    when no top-level statement binds NAME (a class, a function, an assignment or an import
    all count: only what is surely missing is refused)."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    outcome = _module_names(path, stat.st_mtime_ns, stat.st_size)
    if isinstance(outcome, str):
        return outcome
    names, star = outcome
    if name in names or star or "__getattr__" in names:
        return None
    classes = sorted(n for n, is_class in names.items() if is_class)
    found = f" (it defines {', '.join(classes[:8])})" if classes else ""
    return f"{path} defines no class {name}{found}; check `class` in the config or the file"


@lru_cache(maxsize=256)
def _module_names(path: str, mtime_ns: int, size: int) -> str | tuple[dict[str, bool], bool]:
    """The names bound at the top level of the file (name -> whether it is a class) and
    whether the module may bind names it does not spell out (`from M import *`, globals());
    or the compile error as a message. Cached by the file's identity: a config names one file
    in many sections."""
    try:
        with open(path, "rb") as fh:
            source = fh.read()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    try:
        # compile() rather than ast.parse alone: it also finds what only the compiler
        # refuses ('return' outside a function, a nonlocal at module level).
        compile(source, path, "exec", dont_inherit=True)
        tree = ast.parse(source, path)
    except SyntaxError as exc:
        return syntax_error_text(path, exc)
    except ValueError as exc:  # a NUL byte in the source
        return f"{path}: SyntaxError: {exc}"
    names: dict[str, bool] = {}
    # `from M import *`, a globals() update or a module __getattr__ may bind any name.
    star = any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "globals"
        for n in ast.walk(tree)
    )
    for node in _top_level(tree.body):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            star = True
        for bound, is_class in _bound_names(node):
            names[bound] = names.get(bound, False) or is_class
    return names, star


def syntax_error_text(path: str, exc: SyntaxError) -> str:
    """`FILE:LINE: SyntaxError: message`, as a compiler would say it."""
    kind = type(exc).__name__  # IndentationError, TabError: the subclass says more
    line = f":{exc.lineno}" if exc.lineno else ""
    return f"{path}{line}: {kind}: {exc.msg}"


def _top_level(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement run at module level, including inside if/try/with/for blocks."""
    for node in body:
        yield node
        if isinstance(node, _BLOCKS):
            for field in ("body", "orelse", "finalbody"):
                yield from _top_level(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                yield from _top_level(handler.body)


def _bound_names(node: ast.stmt) -> Iterator[tuple[str, bool]]:
    """The module names one statement binds, each with whether it is a class definition."""
    if isinstance(node, ast.ClassDef):
        yield node.name, True
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        yield node.name, False
    elif isinstance(node, ast.Import | ast.ImportFrom):
        for alias in node.names:
            if alias.name != "*":
                yield (alias.asname or alias.name.split(".")[0]), False
    elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    yield sub.id, False
    elif isinstance(node, ast.For | ast.With):
        targets = (
            [node.target]
            if isinstance(node, ast.For)
            else [i.optional_vars for i in node.items if i.optional_vars is not None]
        )
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    yield sub.id, False
    # A module-level walrus is too rare to chase: such a file must bind the name another way.
