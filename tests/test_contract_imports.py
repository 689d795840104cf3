"""The daemon imports only the shared contract of the client (the modules both sides agree on),
counting every import: module level, inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# The client modules mosaicd may import: the shared contract (standard library and msgpack
# only, no torch, no matplotlib), which both sides read so that a rule is written once. Adding
# a module here is a decision about the layering, not a fix for a failing test.
SHARED_CONTRACT = {
    "mosaic_client.contract",
    "mosaic_client.paths",
    "mosaic_client.protocol",
    "mosaic_client.provenance",
    "mosaic_client.schema",
    "mosaic_client.search",
    "mosaic_client.selection",
    "mosaic_client.study_reading",
}


def _client_modules(tree: ast.AST) -> set[str]:
    """Every mosaic_client module a source imports: at module level, inside functions and under
    `if TYPE_CHECKING:` alike (ast.walk visits them all), and by importlib with a literal name."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mosaic_client":  # `from mosaic_client import contract`
                names = [f"mosaic_client.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        found.update(n for n in names if n == "mosaic_client" or n.startswith("mosaic_client."))
    return found


def _imports_under(folder: Path) -> dict[str, set[str]]:
    """{client module: the files under `folder` that import it}."""
    out: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for module in _client_modules(ast.parse(path.read_text(), str(path))):
            out.setdefault(module, set()).add(str(path.relative_to(REPO)))
    return out


def test_the_daemon_imports_only_the_shared_contract() -> None:
    imported = _imports_under(REPO / "mosaicd")
    others = {m: sorted(files) for m, files in imported.items() if m not in SHARED_CONTRACT}
    assert not others, (
        f"mosaicd imports client modules outside the shared contract: {others}; move what it "
        "needs into a shared-contract module (mosaic_client/study_reading.py for reading a study)"
    )
    # Pinned exactly: a contract module the daemon no longer needs leaves the list on purpose.
    assert set(imported) == SHARED_CONTRACT


def test_the_shared_contract_imports_only_itself() -> None:
    """What the daemon imports must not bring the rest of the client in behind it."""
    for module in sorted(SHARED_CONTRACT):
        base = REPO / module.replace(".", "/")
        # A package (mosaic_client/protocol/) is one contract module with all its files.
        paths = sorted(base.glob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        for path in paths:
            imported = _client_modules(ast.parse(path.read_text(), str(path)))
            outside = {m for m in imported - SHARED_CONTRACT if not m.startswith(module + ".")}
            assert not outside, f"{path.relative_to(REPO)} imports {sorted(outside)}"


def test_the_scan_sees_every_kind_of_import() -> None:
    source = """
import mosaic_client.analysis
from mosaic_client import render
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from mosaic_client.verdict import Side
def later():
    from mosaic_client.web import studies
    importlib.import_module("mosaic_client.plots")
from mosaicd import owners
"""
    assert _client_modules(ast.parse(source)) == {
        "mosaic_client.analysis",
        "mosaic_client.render",
        "mosaic_client.verdict",
        "mosaic_client.web",
        "mosaic_client.plots",
    }
