"""Run selections (`-id 1-3,7`, `-request SQL`, `-param_name_and_value NAME VALUE`, thresholds).

A selection is a small dict that travels in requests; :func:`resolve` turns it into run ids on a
read-only connection, used both by the daemon (cancel, rerun) and the client (plots, export).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from mosaic_client import study_reading


class SelectionError(ValueError):
    """A selection that cannot be used, with a message that says why and what to write."""


def parse_ids(text: str) -> list[int] | None:
    """Parse `1-3,7` into [1, 2, 3, 7]; `all` gives None (every run)."""
    text = text.strip()
    if text.lower() == "all":
        return None
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise SelectionError(f"empty item in id list {text!r}; write e.g. 1-3,7")
        if "-" in part:
            low_text, _, high_text = part.partition("-")
            try:
                low, high = int(low_text), int(high_text)
            except ValueError:
                raise SelectionError(
                    f"{part!r} is not a range of run ids; write e.g. 2-5"
                ) from None
            if low > high:
                raise SelectionError(f"range {part!r} goes backwards; write {high}-{low}")
            ids.extend(range(low, high + 1))
        else:
            try:
                ids.append(int(part))
            except ValueError:
                raise SelectionError(f"{part!r} is not a run id; ids are integers like 7") from None
    return sorted(set(ids))


def typed(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def make_selection(
    ids: str | None = None,
    request: str | None = None,
    param: list[str] | None = None,
    low: list[str] | None = None,
    high: list[str] | None = None,
) -> dict[str, Any]:
    """Build the selection dict from CLI arguments; exactly one kind must be given."""
    given = [
        k
        for k, v in (
            ("ids", ids),
            ("request", request),
            ("param", param),
            ("low", low),
            ("high", high),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise SelectionError(
            "give exactly one selection: -id, -request, -param_name_and_value, "
            "-param_name_and_value_low_threshold or "
            "-param_name_and_value_high_threshold"
        )
    if ids is not None:
        parsed = parse_ids(ids)
        return {"kind": "all"} if parsed is None else {"kind": "ids", "ids": parsed}
    if request is not None:
        return {"kind": "request", "sql": request}
    name, value = param or low or high  # type: ignore[misc]
    return {"kind": given[0], "name": name, "value": typed(value)}


# SQLite authorizer action codes a read-only query may need; everything else is denied, so a
# `-request` can neither write nor attach nor change pragmas even before query_only applies.
_ALLOWED_ACTIONS = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}


def _authorizer(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def resolve(conn: sqlite3.Connection, selection: dict[str, Any]) -> list[int]:
    """Run ids selected, ascending. `conn` should be read-only (store.connect_readonly)."""
    if not isinstance(selection, dict):
        raise SelectionError("a selection must be a map")
    kind = selection.get("kind")
    if kind == "all":
        return study_reading.all_run_ids(conn)
    if kind == "ids":
        ids = selection.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise SelectionError("ids must be a list of integers")
        wanted = set(ids)
        return [i for i in study_reading.all_run_ids(conn) if i in wanted]
    if kind in ("param", "low", "high"):
        name, value = selection.get("name"), selection.get("value")
        if not isinstance(name, str):
            raise SelectionError("parameter name must be a string")
        if kind == "param":
            return study_reading.runs_with_param(conn, name, value)
        return study_reading.runs_with_param_within(conn, name, value, at_most=kind == "low")
    if kind == "request":
        return _requested(conn, selection.get("sql"))
    raise SelectionError(f"unknown selection kind {kind!r}")


_REQUEST_HINT = (
    'Only a single read-only SELECT that returns run ids is allowed, e.g. "SELECT run_id FROM '
    "runs WHERE status='done'\""
)


def _requested(conn: sqlite3.Connection, sql: Any) -> list[int]:
    """The ids of the study's runs a user's own `-request` SQL returns, run under the
    authorizer (not a query of study_reading).

    No message repeats a value the query computed: the daemon runs it on studies its caller may
    read, yet what it answers must not become a way to read a study byte by byte (`SELECT
    unicode(substr(text, 1, 1)) FROM code_files`). So integers that are not run ids of the study
    select nothing, and an error raised while the query ran (which SQLite may word with a value,
    e.g. a JSON path) is reported without its text; an error found when compiling it (syntax, an
    unknown column, a denied action) depends on the SQL alone and is shown."""
    if not isinstance(sql, str) or not sql.strip():
        raise SelectionError("-request needs an SQL SELECT returning run ids")
    conn.set_authorizer(_authorizer)
    try:
        try:
            conn.execute(f"EXPLAIN {sql}").fetchall()  # compiled, not run: reads no row
        except (sqlite3.DatabaseError, sqlite3.Warning) as exc:
            raise SelectionError(
                f"-request {sql!r} was refused: {str(exc).rstrip('.')}. {_REQUEST_HINT}"
            ) from None
        try:
            rows = conn.execute(sql).fetchall()
        except (sqlite3.DatabaseError, sqlite3.Warning):
            raise SelectionError(
                f"-request {sql!r} failed while it ran (the error is not shown: it may quote "
                f"the study's contents). {_REQUEST_HINT}"
            ) from None
    finally:
        conn.set_authorizer(None)
    if rows and not all(isinstance(r[0], int) for r in rows):
        raise SelectionError(f"-request {sql!r} must return integer run ids in its first column")
    existing = set(study_reading.all_run_ids(conn))
    return sorted({int(r[0]) for r in rows} & existing)


def describe(selection: dict[str, Any]) -> str:
    kind = selection.get("kind")
    if kind == "ids":
        return f"-id {','.join(map(str, selection['ids']))}"
    if kind == "request":
        return f"-request {selection['sql']!r}"
    if kind in ("param", "low", "high"):
        operator = {"param": "=", "low": "<=", "high": ">="}[kind]
        return f"{selection['name']} {operator} {selection['value']}"
    return "all runs"
