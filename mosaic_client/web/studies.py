"""What the web pages show of a study database, read on a read-only connection.

Everything that grows with the number of runs is done by SQLite: a page of the runs table is
one query with WHERE, ORDER BY and LIMIT/OFFSET over the schema's indexes (runs_by_status,
params_by_name, the primary keys), and only that page's rows are turned into Python objects.
Nothing here loads every run; docs/web.md gives the figures at 100,000 runs.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import contract
from mosaic_client.analysis import CRITERIA, describe_run

MAX_PAGE = 500
# Sortable columns of the runs table besides params ("param:NAME"): SQL expressions, fixed here
# so that no user text ever becomes SQL.
SORT_COLUMNS: dict[str, str] = {
    "run_id": "r.run_id",
    "status": "r.status",
    "pipeline": "r.pipeline",
    **{c: f'rr."{c}"' for c in CRITERIA},
}
FILTER_OPS = ("=", "<=", ">=", "!=")


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


def _where(query: RunQuery, per_run: bool = True) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if query.states:
        unknown = [s for s in query.states if s not in contract.RUN_STATES]
        if unknown:
            raise QueryError(
                f"unknown run state {unknown[0]!r}; use {', '.join(contract.RUN_STATES)}"
            )
        clauses.append(f"r.status IN ({', '.join('?' * len(query.states))})")
        args.extend(query.states)
    for flt in query.filters:
        if flt.op not in FILTER_OPS:
            raise QueryError(f"unknown filter operator {flt.op!r}")
        if per_run:
            # A lookup in the params primary key (run_id, param_name) per run looked at: a page
            # in run order stops after its rows instead of listing every matching run first.
            clauses.append(
                "EXISTS (SELECT 1 FROM params p WHERE p.run_id = r.run_id AND "
                f"p.param_name = ? AND p.param_value {flt.op} ?)"
            )
        else:
            # The matching runs listed once from the params_by_name index: cheaper when every
            # run must be looked at anyway (a count).
            clauses.append(
                "r.run_id IN (SELECT run_id FROM params WHERE param_name = ? AND "
                f"param_value {flt.op} ?)"
            )
        args.extend([flt.name, flt.value])
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def count_matching(conn: sqlite3.Connection, query: RunQuery) -> int:
    """How many runs the query's states and filters select (its sort and page aside)."""
    where, args = _where(query, per_run=False)
    return int(conn.execute(f"SELECT count(*) FROM runs r{where}", args).fetchone()[0])


_RESULTS = ", ".join(f'rr."{c}"' for c in CRITERIA)
_ROW = f"r.run_id, r.status, r.pipeline, {_RESULTS}"


def _page_rows(conn: sqlite3.Connection, query: RunQuery) -> list[tuple[Any, ...]]:
    where, args = _where(query)
    direction = "DESC" if query.descending else "ASC"
    joins = "FROM runs r LEFT JOIN run_results rr ON rr.run_id = r.run_id"
    if not query.sort.startswith("param:"):
        if query.sort not in SORT_COLUMNS:
            raise QueryError(
                f"cannot sort by {query.sort!r}; use run_id, status, pipeline, a "
                "result column or param:NAME"
            )
        key = SORT_COLUMNS[query.sort]
        # Runs without a value (queued, failed) last whichever the direction; run_id breaks
        # ties so that paging is stable.
        order = (
            f"r.run_id {direction}"
            if key == "r.run_id"
            else f"({key} IS NULL), {key} {direction}, r.run_id"
        )
        return conn.execute(
            f"SELECT {_ROW} {joins}{where} ORDER BY {order} LIMIT ? OFFSET ?",
            [*args, query.limit, query.offset],
        ).fetchall()
    # By a param: walk the params_by_name index (param_name, param_value) in order and stop at
    # the page's end, instead of sorting every run. Ties go by the params row's rowid, which
    # follows the runs' order (a submission writes its runs' params in run order). Runs without
    # that param come after, by run_id.
    name = query.sort[len("param:") :]
    extra = where.replace(" WHERE ", " AND ", 1)
    rows = conn.execute(
        f"SELECT {_ROW} FROM params ps JOIN runs r ON r.run_id = ps.run_id LEFT JOIN "
        f"run_results rr ON rr.run_id = r.run_id WHERE ps.param_name = ?{extra} "
        f"ORDER BY ps.param_value {direction}, ps.rowid {direction} LIMIT ? OFFSET ?",
        [name, *args, query.limit, query.offset],
    ).fetchall()
    if len(rows) == query.limit:
        return rows
    with_param = conn.execute(
        f"SELECT count(*) FROM params ps JOIN runs r ON r.run_id = ps.run_id "
        f"WHERE ps.param_name = ?{extra}",
        [name, *args],
    ).fetchone()[0]
    missing = "NOT EXISTS (SELECT 1 FROM params p WHERE p.run_id = r.run_id AND p.param_name = ?)"
    rest = conn.execute(
        f"SELECT {_ROW} {joins} WHERE {missing}{extra} ORDER BY r.run_id LIMIT ? OFFSET ?",
        [name, *args, query.limit - len(rows), max(0, query.offset - with_param)],
    ).fetchall()
    return rows + rest


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
    ids = [row[0] for row in rows]
    params: dict[int, dict[str, Any]] = {i: {} for i in ids}
    if ids and shown_params:
        for run_id, name, value in conn.execute(
            f"SELECT run_id, param_name, param_value FROM params WHERE run_id IN "
            f"({', '.join('?' * len(ids))}) AND param_name IN "
            f"({', '.join('?' * len(shown_params))})",
            [*ids, *shown_params],
        ):
            params[run_id][name] = value
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


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    out = dict.fromkeys(contract.RUN_STATES, 0)
    for status, n in conn.execute("SELECT status, count(*) FROM runs GROUP BY status"):
        out[status] = n
    return out


def param_names(conn: sqlite3.Connection) -> list[str]:
    """Distinct param names, read from the params_by_name index without visiting every row."""
    names = []
    row = conn.execute("SELECT min(param_name) FROM params").fetchone()
    while row and row[0] is not None:
        names.append(row[0])
        row = conn.execute(
            "SELECT min(param_name) FROM params WHERE param_name > ?", (row[0],)
        ).fetchone()
    return names


def key_values(conn: sqlite3.Connection, names: list[str], cap: int = 200) -> dict[str, list[Any]]:
    """The values of each `{type}_key` param (at most `cap` each), for the filter menus."""
    out: dict[str, list[Any]] = {}
    for name in names:
        if name.endswith("_key"):
            out[name] = [
                v
                for (v,) in conn.execute(
                    "SELECT DISTINCT param_value FROM params WHERE param_name = ? "
                    "ORDER BY param_value LIMIT ?",
                    (name, cap),
                )
            ]
    return out


def study_summary(conn: sqlite3.Connection) -> dict[str, Any]:
    names = param_names(conn)
    return {
        "counts": counts(conn),
        "params": names,
        "keys": key_values(conn, names),
        "criteria": list(CRITERIA),
    }


# -- one run ----------------------------------------------------------------------------------


def run_detail(conn: sqlite3.Connection, run_id: int) -> dict[str, Any] | None:
    """The run page's data: what `mosaic show` reads from a study (one query, written once)."""
    return describe_run(conn, run_id)


def epochs_after(conn: sqlite3.Connection, run_id: int, after: int) -> list[dict[str, Any]]:
    keys = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")
    return [
        dict(zip(keys, row))
        for row in conn.execute(
            "SELECT epoch, train_loss, test_loss, train_acc, test_acc FROM run_epochs "
            "WHERE run_id = ? AND epoch > ? ORDER BY epoch",
            (run_id, after),
        )
    ]


def run_state(conn: sqlite3.Connection, run_id: int) -> tuple[str, str | None] | None:
    row = conn.execute(
        "SELECT status, return_status FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    return (row[0], row[1]) if row else None


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


# -- comparison -------------------------------------------------------------------------------


def dataset_keys(conn: sqlite3.Connection) -> list[str]:
    """Every dataset key of the study: the `{type}_key` params of each data_scheme, joined."""
    keys: set[str] = set()
    schemes = [
        v
        for (v,) in conn.execute(
            "SELECT DISTINCT param_value FROM params WHERE param_name = 'data_scheme'"
        )
    ]
    for scheme in schemes:
        types = [t.strip() for t in str(scheme).split(",") if t.strip()]
        if not types:
            continue
        joins = " ".join(
            f"JOIN params p{i} ON p{i}.run_id = s.run_id AND p{i}.param_name = ?"
            for i in range(len(types))
        )
        select = ", ".join(f"p{i}.param_value" for i in range(len(types)))
        rows = conn.execute(
            f"SELECT DISTINCT {select} FROM params s {joins} WHERE s.param_name = "
            "'data_scheme' AND s.param_value = ?",
            [*(f"{t}_key" for t in types), scheme],
        )
        keys.update("_".join(str(v) for v in row) for row in rows)
    return sorted(keys)
