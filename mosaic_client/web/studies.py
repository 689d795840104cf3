"""What the web pages show of a study database, read on a read-only connection.

Everything that grows with the number of runs is done by SQLite: a page of the runs table is
one query with WHERE, ORDER BY and LIMIT/OFFSET over the schema's indexes (runs_by_status,
params_by_name, the primary keys), and only that page's rows are turned into Python objects.
Nothing here loads every run; docs/web.md gives the figures at 100,000 runs. The queries are
mosaic_client.study_reading's; this module checks a page's request and shapes the answer.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import contract, search_report, study_reading
from mosaic_client.analysis import CRITERIA

MAX_PAGE = 500


class QueryError(ValueError):
    """A table request the server cannot answer, with what to change."""


@dataclass
class ParamFilter:
    name: str
    op: str
    value: Any


@dataclass
class RunQuery:
    states: list[str] = field(default_factory=list)
    filters: list[ParamFilter] = field(default_factory=list)
    sort: str = "run_id"
    descending: bool = False
    offset: int = 0
    limit: int = 50


def typed(text: str) -> Any:
    """A filter value as SQLite stored the param: integer, real, else text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_filter(text: str) -> ParamFilter:
    """`NAME=VALUE`, `NAME<=VALUE`, `NAME>=VALUE` or `NAME!=VALUE`."""
    for op in ("<=", ">=", "!=", "="):
        name, sep, value = text.partition(op)
        if sep and name.strip():
            return ParamFilter(name.strip(), op, typed(value.strip()))
    raise QueryError(
        f"cannot read the filter {text!r}: write NAME=VALUE, NAME<=VALUE, "
        "NAME>=VALUE or NAME!=VALUE with a parameter name"
    )


def _filters(query: RunQuery) -> list[study_reading.RunFilter]:
    """The query's states and filters checked (no user text becomes SQL), as study_reading's."""
    unknown = [s for s in query.states if s not in contract.RUN_STATES]
    if unknown:
        raise QueryError(f"unknown run state {unknown[0]!r}; use {', '.join(contract.RUN_STATES)}")
    for flt in query.filters:
        if flt.op not in study_reading.FILTER_OPS:
            raise QueryError(f"unknown filter operator {flt.op!r}")
    return [(flt.name, flt.op, flt.value) for flt in query.filters]


def count_matching(conn: sqlite3.Connection, query: RunQuery) -> int:
    """How many runs the query's states and filters select (its sort and page aside)."""
    return study_reading.count_runs(conn, query.states, _filters(query))


def _page_rows(conn: sqlite3.Connection, query: RunQuery) -> list[tuple[Any, ...]]:
    filters = _filters(query)
    if not query.sort.startswith("param:") and query.sort not in study_reading.SORT_COLUMNS:
        raise QueryError(
            f"cannot sort by {query.sort!r}; use run_id, status, pipeline, a "
            "result column or param:NAME"
        )
    return study_reading.runs_table_page(
        conn, query.states, filters, query.sort, query.descending, query.offset, query.limit
    )


def runs_page(
    conn: sqlite3.Connection, query: RunQuery, shown_params: list[str], total: int | None = None
) -> dict[str, Any]:
    """One page of the runs table: the number of matching runs (`total` when the caller knows
    it already), and the page's rows with their results and the values of `shown_params`."""
    if not 1 <= query.limit <= MAX_PAGE:
        raise QueryError(f"page size must be between 1 and {MAX_PAGE}")
    if query.offset < 0:
        raise QueryError("offset must not be negative")
    rows = _page_rows(conn, query)
    if total is None:
        total = count_matching(conn, query)
    params = study_reading.params_named(conn, [row[0] for row in rows], shown_params)
    return {
        "total": total,
        "offset": query.offset,
        "limit": query.limit,
        "rows": [
            {
                "run_id": row[0],
                "status": row[1],
                "pipeline": row[2],
                "results": dict(zip(CRITERIA, row[3:])),
                "params": params[row[0]],
            }
            for row in rows
        ],
    }


def study_summary(conn: sqlite3.Connection) -> dict[str, Any]:
    names = study_reading.param_names(conn)
    groups = search_report.groups(conn)
    return {
        "counts": study_reading.status_counts(conn),
        "params": names,
        "keys": study_reading.key_values(conn, names),
        "criteria": list(CRITERIA),
        # Each search's progress (docs/tuning.md): trials done, best so far, final runs.
        "searches": [g.as_json() for g in groups],
        "search_lines": [search_report.progress_line(g).strip() for g in groups],
    }


# -- one run ----------------------------------------------------------------------------------


def run_detail(conn: sqlite3.Connection, run_id: int) -> dict[str, Any] | None:
    """The run page's data: what `mosaic show` reads from a study (one query, written once)."""
    return study_reading.describe_run(conn, run_id)


def log_path(params: dict[str, Any], run_id: int) -> str | None:
    folder = params.get("run_files_path")
    return contract.run_log_path(folder, run_id) if isinstance(folder, str) else None


def log_tail(path: str | None, max_bytes: int = 16384) -> tuple[str, int]:
    """The end of a run's output file and the file's size (0 when it does not exist yet)."""
    if not path:
        return "", 0
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return "", 0
    text = data.decode(errors="replace")
    if size > max_bytes:
        text = text.split("\n", 1)[-1]  # drop the partial first line
    return text, size
