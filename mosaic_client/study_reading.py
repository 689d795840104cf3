"""Every read of a study database, as named queries: the one module that reads a study's schema.

Part of the shared contract (standard library only): the daemon (`mosaicd.storage.store.Store`
describes a run with :func:`describe_run`, repetitions find configuration groups with
:func:`run_params` and :func:`pipeline_mates`) and the client (analysis commands, `show` and
`logs` without a daemon, selections, the web view) read a study through these functions, so
that a change of the schema (written by mosaicd/storage/store.py's migrations) is followed here
once. Every function takes an open connection, read-only on the client's side, and only reads.

What stays elsewhere, on purpose: a user's own `-request` SQL (mosaic_client/selection.py runs it
under an authorizer), and the daemon's writes and bookkeeping reads of its Store (run_meta,
submissions: mosaicd/storage/store.py). docs/database.md describes the tables.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mosaic_client import contract, provenance

# Run ids per `IN (...)` list: below SQLite's limit on bound parameters (999 in older builds).
CHUNK = 500
# The operators of a param filter of the runs table (`NAME<=VALUE`, ...): SQL fixed here, so
# that no user text ever becomes SQL.
FILTER_OPS = ("=", "<=", ">=", "!=")
# Sortable columns of the runs table besides params ("param:NAME"): SQL expressions over the
# aliases of runs_table_page's query.
SORT_COLUMNS: dict[str, str] = {
    "run_id": "r.run_id",
    "status": "r.status",
    "pipeline": "r.pipeline",
    **{c: f'rr."{c}"' for c in contract.RESULT_COLUMNS},
}
# A param filter of the runs table: (param name, one of FILTER_OPS, value).
RunFilter = tuple[str, str, Any]


def quoted(column: str) -> str:
    """A column name as an SQL identifier: result columns such as "duration(s)" need quotes."""
    return '"' + column.replace('"', '""') + '"'


def _chunks(ids: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


# -- what the file holds ------------------------------------------------------------------------


def table_names(conn: sqlite3.Connection) -> set[str]:
    """The tables of the database: older studies lack the tables later schemas added."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def has_view(conn: sqlite3.Connection, name: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='view' AND name=?", (name,)
    ).fetchone()
    return found is not None


def data_version(conn: sqlite3.Connection) -> int:
    """SQLite's counter of commits by other connections: unchanged, the study is unchanged, so a
    poller re-reads it only when this moves."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


# -- runs, params, results ----------------------------------------------------------------------


def run_params(
    conn: sqlite3.Connection, run_ids: Iterable[int] | None = None
) -> dict[int, dict[str, Any]]:
    """params as {run_id: {name: value}}, for the given runs or all of them. Given runs are
    looked up by the params primary key, a chunk at a time, without reading the whole study."""
    out: dict[int, dict[str, Any]] = defaultdict(dict)
    if run_ids is None:
        for run_id, name, value in conn.execute(
            "SELECT run_id, param_name, param_value FROM params ORDER BY run_id"
        ):
            out[run_id][name] = value
        return dict(out)
    for chunk in _chunks(sorted(set(run_ids))):
        for run_id, name, value in conn.execute(
            f"SELECT run_id, param_name, param_value FROM params WHERE run_id IN ({_marks(chunk)})"
            " ORDER BY run_id",
            list(chunk),
        ):
            out[run_id][name] = value
    return dict(out)


def params_named(
    conn: sqlite3.Connection, run_ids: Sequence[int], names: Sequence[str]
) -> dict[int, dict[str, Any]]:
    """The values of the params `names` of a few runs (a page of the runs table): {run_id:
    {name: value}}, with an entry, maybe empty, for every run asked for."""
    out: dict[int, dict[str, Any]] = {i: {} for i in run_ids}
    if not run_ids or not names:
        return out
    for run_id, name, value in conn.execute(
        f"SELECT run_id, param_name, param_value FROM params WHERE run_id IN ({_marks(run_ids)})"
        f" AND param_name IN ({_marks(names)})",
        [*run_ids, *names],
    ):
        out[run_id][name] = value
    return out


def runs(conn: sqlite3.Connection) -> list[tuple[int, str, str, str | None]]:
    """Every run as (run_id, status, pipeline, return_status), by run id."""
    return conn.execute(
        "SELECT run_id, status, pipeline, return_status FROM runs ORDER BY run_id"
    ).fetchall()


def run_statuses(conn: sqlite3.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT run_id, status FROM runs"))


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """How many runs are in each state, every state of the contract present (0 when none)."""
    out = dict.fromkeys(contract.RUN_STATES, 0)
    for status, n in conn.execute("SELECT status, count(*) FROM runs GROUP BY status"):
        out[status] = n
    return out


def run_state(conn: sqlite3.Connection, run_id: int) -> tuple[str, str | None] | None:
    """(status, return_status) of one run; None when the study has no such run."""
    row = conn.execute(
        "SELECT status, return_status FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    return (row[0], row[1]) if row else None


def result_select(conn: sqlite3.Connection, columns: Sequence[str]) -> str:
    """The run_results columns as a select list, NULL for those a study not yet migrated
    lacks (the resource figures of schema 9, read by a client on an older study)."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(run_results)")}
    return ", ".join(quoted(c) if c in present else "NULL" for c in columns)


def results_by_run(conn: sqlite3.Connection, columns: Sequence[str]) -> dict[int, tuple[Any, ...]]:
    """The given run_results columns of every run that has results: {run_id: (values...)}."""
    return {
        row[0]: tuple(row[1:])
        for row in conn.execute(f"SELECT run_id, {result_select(conn, columns)} FROM run_results")
    }


MEASUREMENT_NAMES: tuple[str, ...] = (*contract.MEASUREMENT_TEXT, *contract.MEASUREMENT_NUMBERS)


def measurements_by_run(conn: sqlite3.Connection) -> dict[int, tuple[Any, ...]]:
    """Every run's measurement context (MEASUREMENT_NAMES), for export; none on an older study."""
    if "run_measurements" not in table_names(conn):
        return {}
    return {
        row[0]: tuple(row[1:])
        for row in conn.execute(
            f"SELECT run_id, {', '.join(MEASUREMENT_NAMES)} FROM run_measurements"
        )
    }


def run_measurement(conn: sqlite3.Connection, run_id: int) -> dict[str, Any] | None:
    """Where and under what load a run's resource figures were measured (run_measurements,
    schema 9), or None."""
    if "run_measurements" not in table_names(conn):
        return None
    row = conn.execute(
        f"SELECT {', '.join(MEASUREMENT_NAMES)} FROM run_measurements WHERE run_id=?", (run_id,)
    ).fetchone()
    return dict(zip(MEASUREMENT_NAMES, row)) if row else None


def loss_rows(conn: sqlite3.Connection) -> Iterable[tuple[int, int, Any, Any]]:
    """(run_id, epoch, train_loss, test_loss) of every recorded epoch, by run then epoch; none
    in a study too old to have run_epochs."""
    if "run_epochs" not in table_names(conn):
        return []
    return conn.execute(
        "SELECT run_id, epoch, train_loss, test_loss FROM run_epochs ORDER BY run_id, epoch"
    )


def epochs_after(conn: sqlite3.Connection, run_id: int, after: int) -> list[dict[str, Any]]:
    """One run's epochs recorded after epoch `after`: what a live view has not seen yet."""
    keys = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")
    return [
        dict(zip(keys, row))
        for row in conn.execute(
            "SELECT epoch, train_loss, test_loss, train_acc, test_acc FROM run_epochs "
            "WHERE run_id = ? AND epoch > ? ORDER BY epoch",
            (run_id, after),
        )
    ]


# -- one run, whole -----------------------------------------------------------------------------


def describe_run(conn: sqlite3.Connection, run_id: int) -> dict[str, Any] | None:
    """Everything the study holds about one run, shaped as the daemon's `show` reply
    (`protocol.ShowReply`, without its live fields): the daemon's `show` (Store.describe) and
    `mosaic show`/`logs` when no daemon answers read it here alike. None when the study has no
    such run."""
    row = conn.execute(
        "SELECT status, pipeline, return_status FROM runs WHERE run_id=?", (run_id,)
    ).fetchone()
    if row is None:
        return None
    tables = table_names(conn)
    params = dict(
        conn.execute(
            "SELECT param_name, param_value FROM params WHERE run_id=? ORDER BY param_name",
            (run_id,),
        ).fetchall()
    )
    columns = result_select(conn, contract.RESULT_COLUMNS)
    results = conn.execute(
        f"SELECT {columns} FROM run_results WHERE run_id=?", (run_id,)
    ).fetchone()
    events: list[dict[str, Any]] = []
    if "run_events" in tables:
        events = [
            {"at": at, "from": f, "to": t, "detail": d}
            for at, f, t, d in conn.execute(
                "SELECT at, from_status, to_status, detail FROM run_events WHERE run_id=? "
                "ORDER BY event_id",
                (run_id,),
            )
        ]
    history: list[dict[str, Any]] = []
    if "run_epochs" in tables:
        keys = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc", "duration")
        history = [
            dict(zip(keys, r))
            for r in conn.execute(
                'SELECT epoch, train_loss, test_loss, train_acc, test_acc, "duration(s)" '
                "FROM run_epochs WHERE run_id=? ORDER BY epoch",
                (run_id,),
            )
        ]
    meta = None
    if "run_meta" in tables:
        meta = conn.execute(
            "SELECT seed, epochs_target, checkpoint_epoch FROM run_meta WHERE run_id=?",
            (run_id,),
        ).fetchone()
    group = None
    if "run_ensembles" in tables:  # schema 6: the ensemble it last trained in
        found = conn.execute(
            "SELECT members, fallback FROM run_ensembles WHERE run_id=?", (run_id,)
        ).fetchone()
        if found:
            group = {"members": json.loads(found[0]), "fallback": found[1]}
    return {
        "run_id": run_id,
        "status": row[0],
        "pipeline": row[1],
        "return_status": row[2],
        "params": params,
        "results": dict(zip(contract.RESULT_COLUMNS, results)) if results else None,
        "events": events,
        "history": history,
        "seed": meta[0] if meta else None,
        "epochs_target": meta[1] if meta else None,
        "checkpoint_epoch": meta[2] if meta else None,
        "provenance": run_provenance(conn, run_id),
        "group": group,
        "measurement": run_measurement(conn, run_id),
    }


# -- issue 16: provenance -------------------------------------------------------------------------

_PROVENANCE_TABLES = {"code_files", "run_code", "run_environment"}


def run_provenance(
    conn: sqlite3.Connection, run_id: int, with_text: bool = False
) -> dict[str, Any] | None:
    """A run's provenance: {"environment": {...} or None, "code": [{section, class, path,
    sha256, git_commit, git_dirty[, text]}]}; None when the study records none for it (a run
    not started yet, or a study older than provenance). Its fields: mosaic_client.provenance's."""
    if not _PROVENANCE_TABLES <= table_names(conn):
        return None
    fields, code_fields = provenance.ENVIRONMENT_FIELDS, provenance.CODE_FIELDS
    row = conn.execute(
        f"SELECT {', '.join(fields)} FROM run_environment WHERE run_id=?", (run_id,)
    ).fetchone()
    columns = ", ".join(f'c."{f}"' for f in code_fields) + (", f.text" if with_text else "")
    code = [
        dict(zip((*code_fields, "text"), r))
        for r in conn.execute(
            f"SELECT {columns} FROM run_code c LEFT JOIN code_files f USING (sha256) "
            "WHERE c.run_id=? ORDER BY c.rowid",
            (run_id,),
        )
    ]
    if row is None and not code:
        return None
    for entry in code:
        if entry["git_dirty"] is not None:
            entry["git_dirty"] = bool(entry["git_dirty"])
    return {"environment": dict(zip(fields, row)) if row else None, "code": code}


def recorded_code(
    conn: sqlite3.Connection, run_ids: Iterable[int]
) -> dict[tuple[str, str], list[int]]:
    """The class files these runs loaded, as recorded: {(path, sha256): [run ids]}; empty for a
    study older than provenance. provenance.code_changes compares them with the files now."""
    wanted = set(run_ids)
    if not wanted or not _PROVENANCE_TABLES <= table_names(conn):
        return {}
    recorded: dict[tuple[str, str], list[int]] = {}
    for run_id, path, sha in conn.execute("SELECT run_id, path, sha256 FROM run_code"):
        if run_id in wanted:
            recorded.setdefault((path, sha), []).append(run_id)
    return recorded


# -- selections (mosaic_client.selection; a user's -request SQL stays there) --------------------


def all_run_ids(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY run_id")]


def runs_with_param(conn: sqlite3.Connection, name: str, value: Any) -> list[int]:
    """The runs whose param `name` is `value`, or reads as it (a number given as text)."""
    return [
        int(r[0])
        for r in conn.execute(
            "SELECT DISTINCT run_id FROM params WHERE param_name=? AND "
            "(param_value=? OR CAST(param_value AS TEXT)=CAST(? AS TEXT)) ORDER BY run_id",
            (name, value, value),
        )
    ]


def runs_with_param_within(
    conn: sqlite3.Connection, name: str, value: Any, at_most: bool
) -> list[int]:
    """The runs whose param `name` is at most (or at least) `value`."""
    operator = "<=" if at_most else ">="
    if isinstance(value, (int, float)):
        # Numeric comparison for numeric values, whatever type the column holds.
        sql = (
            "SELECT DISTINCT run_id FROM params WHERE param_name=? AND "
            f"typeof(param_value) IN ('integer','real') AND CAST(param_value AS REAL) {operator} ? "
            "ORDER BY run_id"
        )
    else:
        sql = (
            f"SELECT DISTINCT run_id FROM params WHERE param_name=? AND "
            f"param_value {operator} ? ORDER BY run_id"
        )
    return [int(r[0]) for r in conn.execute(sql, (name, value))]


# -- configuration groups -------------------------------------------------------------------------


def pipeline_mates(conn: sqlite3.Connection, run_ids: Sequence[int]) -> set[int]:
    """The runs whose `pipeline` param is that of one of `run_ids` (those included): the only
    runs that can share their configuration groups, found by the params indexes."""
    pipelines = _pipeline_params(conn, "param_value", "run_id", list(run_ids))
    return set(run_ids) | _pipeline_params(conn, "run_id", "param_value", list(pipelines))


def _pipeline_params(conn: sqlite3.Connection, wanted: str, by: str, values: list[Any]) -> set[Any]:
    """`wanted` (run_id or param_value) of the `pipeline` params whose `by` is in `values`,
    queried a chunk of values at a time."""
    found: set[Any] = set()
    for chunk in _chunks(values):
        found.update(
            r[0]
            for r in conn.execute(
                f"SELECT DISTINCT {wanted} FROM params WHERE param_name = 'pipeline' AND "
                f"{by} IN ({_marks(chunk)})",
                chunk,
            )
        )
    return found


def run_groups(conn: sqlite3.Connection) -> list[dict[str, Any]] | None:
    """The rows of the run_groups view (mosaicd/storage/groups_view.py), by group;
    None when the study has no such view (written by an older mosaicd)."""
    if not has_view(conn, "run_groups"):
        return None
    cursor = conn.execute("SELECT * FROM run_groups ORDER BY group_id")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def sequential_plans(conn: sqlite3.Connection, metric: str | None = None) -> list[dict[str, Any]]:
    """The plans `compare --until-decided` recorded (table sequential_plans, schema 8), oldest
    first, of one metric or all: families, looks and verdicts decoded from JSON. [] for a study
    without the table (written before schema 8) or whose daemon never recorded one."""
    if "sequential_plans" not in table_names(conn):
        return []
    sql = (
        "SELECT plan_id, recorded_at, metric, data_key, families, alpha, spent, looks, verdicts,"
        " method FROM sequential_plans"
    )
    rows = conn.execute(
        sql + (" WHERE metric=? ORDER BY plan_id" if metric else " ORDER BY plan_id"),
        (metric,) if metric else (),
    )
    names = ("plan_id", "recorded_at", "metric", "data_key", "families", "alpha", "spent")
    out = []
    for row in rows:
        plan = dict(zip(names, row[:7]))
        try:
            plan["families"] = json.loads(row[4])
            plan["looks"], plan["verdicts"] = json.loads(row[7]), json.loads(row[8])
        except (TypeError, ValueError):
            continue  # not written by a daemon: unusable, left out
        plan["method"] = row[9]
        out.append(plan)
    return out


# -- the web view's runs table ------------------------------------------------------------------
# Everything that grows with the number of runs is done by SQLite: a page is one query with
# WHERE, ORDER BY and LIMIT/OFFSET over the schema's indexes (runs_by_status, params_by_name,
# the primary keys). The callers check states, operators and sort keys against
# contract.RUN_STATES, FILTER_OPS and SORT_COLUMNS first (mosaic_client/web/studies.py).


def _where(
    states: Sequence[str], filters: Sequence[RunFilter], per_run: bool = True
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if states:
        clauses.append(f"r.status IN ({_marks(states)})")
        args.extend(states)
    for name, op, value in filters:
        if op not in FILTER_OPS:  # never user text in SQL, even from a caller that forgot
            raise ValueError(f"unknown filter operator {op!r}")
        if per_run:
            # A lookup in the params primary key (run_id, param_name) per run looked at: a page
            # in run order stops after its rows instead of listing every matching run first.
            clauses.append(
                "EXISTS (SELECT 1 FROM params p WHERE p.run_id = r.run_id AND "
                f"p.param_name = ? AND p.param_value {op} ?)"
            )
        else:
            # The matching runs listed once from the params_by_name index: cheaper when every
            # run must be looked at anyway (a count).
            clauses.append(
                "r.run_id IN (SELECT run_id FROM params WHERE param_name = ? AND "
                f"param_value {op} ?)"
            )
        args.extend([name, value])
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def count_runs(
    conn: sqlite3.Connection, states: Sequence[str], filters: Sequence[RunFilter]
) -> int:
    """How many runs are in one of `states` (any, when empty) and pass every filter."""
    where, args = _where(states, filters, per_run=False)
    return int(conn.execute(f"SELECT count(*) FROM runs r{where}", args).fetchone()[0])


_ROW = "r.run_id, r.status, r.pipeline, " + ", ".join(f'rr."{c}"' for c in contract.RESULT_COLUMNS)


def runs_table_page(
    conn: sqlite3.Connection,
    states: Sequence[str],
    filters: Sequence[RunFilter],
    sort: str,
    descending: bool,
    offset: int,
    limit: int,
) -> list[tuple[Any, ...]]:
    """One page of the runs table: (run_id, status, pipeline, *RESULT_COLUMNS) rows, sorted by
    a key of SORT_COLUMNS or by "param:NAME"."""
    where, args = _where(states, filters)
    direction = "DESC" if descending else "ASC"
    joins = "FROM runs r LEFT JOIN run_results rr ON rr.run_id = r.run_id"
    if not sort.startswith("param:"):
        key = SORT_COLUMNS[sort]
        # Runs without a value (queued, failed) last whichever the direction; run_id breaks
        # ties so that paging is stable.
        order = (
            f"r.run_id {direction}"
            if key == "r.run_id"
            else f"({key} IS NULL), {key} {direction}, r.run_id"
        )
        return conn.execute(
            f"SELECT {_ROW} {joins}{where} ORDER BY {order} LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
    # By a param: walk the params_by_name index (param_name, param_value) in order and stop at
    # the page's end, instead of sorting every run. Ties go by the params row's rowid, which
    # follows the runs' order (a submission writes its runs' params in run order). Runs without
    # that param come after, by run_id.
    name = sort[len("param:") :]
    extra = where.replace(" WHERE ", " AND ", 1)
    rows = conn.execute(
        f"SELECT {_ROW} FROM params ps JOIN runs r ON r.run_id = ps.run_id LEFT JOIN "
        f"run_results rr ON rr.run_id = r.run_id WHERE ps.param_name = ?{extra} "
        f"ORDER BY ps.param_value {direction}, ps.rowid {direction} LIMIT ? OFFSET ?",
        [name, *args, limit, offset],
    ).fetchall()
    if len(rows) == limit:
        return rows
    with_param = conn.execute(
        f"SELECT count(*) FROM params ps JOIN runs r ON r.run_id = ps.run_id "
        f"WHERE ps.param_name = ?{extra}",
        [name, *args],
    ).fetchone()[0]
    missing = "NOT EXISTS (SELECT 1 FROM params p WHERE p.run_id = r.run_id AND p.param_name = ?)"
    rest = conn.execute(
        f"SELECT {_ROW} {joins} WHERE {missing}{extra} ORDER BY r.run_id LIMIT ? OFFSET ?",
        [name, *args, limit - len(rows), max(0, offset - with_param)],
    ).fetchall()
    return rows + rest


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


def dataset_keys(conn: sqlite3.Connection) -> list[str]:
    """Every dataset key of the study: the `{type}_key` params of each data_scheme, joined with
    '_' (as analysis.data_key joins them), found by the params index, not run by run."""
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


# -- tuned comparisons (docs/tuning.md) -----------------------------------------------------------


def has_search(conn: sqlite3.Connection) -> bool:
    """Whether the study's schema records searches (version 9 and later)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(run_meta)")}
    return "search" in columns


def search_runs(conn: sqlite3.Connection, submission_id: int | None = None) -> list[dict[str, Any]]:
    """Every run of a search: run_id, submission_id, status, seed and its search record
    (group, stage, trial, round) and modules, by run id; [] for a study without searches."""
    if not has_search(conn):
        return []
    where = "" if submission_id is None else " AND m.submission_id = ?"
    rows = conn.execute(
        "SELECT m.run_id, m.submission_id, r.status, m.seed, m.search, m.modules FROM run_meta "
        f"m JOIN runs r USING (run_id) WHERE m.search IS NOT NULL{where} ORDER BY m.run_id",
        () if submission_id is None else (submission_id,),
    )
    return [
        {
            "run_id": r[0],
            "submission_id": r[1],
            "status": r[2],
            "seed": r[3],
            **json.loads(r[4]),
            "modules": r[5],  # JSON text: its distributions unresolved
        }
        for r in rows
    ]


def search_open_rounds(conn: sqlite3.Connection, submission_id: int) -> dict[int, int]:
    """{group: the lowest round of its trials that have not finished} for one submission's
    search (groups whose trials have all finished are absent): what the daemon holds a trial
    or a final run back by. Read on every dispatch pass of a search: its unfinished runs only."""
    open_rounds: dict[int, int] = {}
    if not has_search(conn):
        return open_rounds
    rows = conn.execute(
        "SELECT m.search FROM run_meta m JOIN runs r USING (run_id) WHERE m.submission_id = ? "
        f"AND m.search IS NOT NULL AND r.status NOT IN ({_marks(contract.FINAL_STATES)})",
        (submission_id, *contract.FINAL_STATES),
    )
    for (text,) in rows:
        run = json.loads(text)
        if run["stage"] == "trial":
            group, round_ = int(run["group"]), int(run["round"])
            open_rounds[group] = min(open_rounds.get(group, round_), round_)
    return open_rounds


def search_history(
    conn: sqlite3.Connection,
    submission_id: int,
    group: int,
    before_round: int | None,
    metric: str,
    names: Sequence[str],
) -> list[dict[str, Any]]:
    """The finished trials of one group, of the rounds before `before_round` (None: all), by
    trial number: {trial, state (complete | pruned | fail), value (the metric), values (the
    params `names`), intermediate ([[epoch, the metric after it]], when it has per-epoch
    values)}. What a sampler, a pruner and a final run's choice see (docs/tuning.md)."""
    trials = [
        r
        for r in search_runs(conn, submission_id)
        if r["stage"] == "trial"
        and int(r["group"]) == group
        and r["status"] in contract.FINAL_STATES
        and (before_round is None or int(r["round"]) < before_round)
    ]
    ids = [r["run_id"] for r in trials]
    params = run_params(conn, ids)
    results = {
        run_id: value
        for run_id, value in conn.execute(
            f"SELECT run_id, {quoted(metric)} FROM run_results WHERE run_id IN ({_marks(ids)})",
            ids,
        )
    }
    epochs: dict[int, dict[int, float]] = defaultdict(dict)
    if metric in contract.EPOCH_COLUMNS:
        for run_id, epoch, value in conn.execute(
            f"SELECT run_id, epoch, {quoted(metric)} FROM run_epochs WHERE run_id IN "
            f"({_marks(ids)}) ORDER BY run_id, epoch",
            ids,
        ):
            if isinstance(value, (int, float)):
                epochs[run_id][epoch] = value
    history = []
    for run in sorted(trials, key=lambda r: int(r["trial"])):
        own = params.get(run["run_id"], {})
        value = results.get(run["run_id"])
        finite = isinstance(value, (int, float)) and value == value and abs(value) != float("inf")
        if own.get("search_pruned") is not None:
            state = "pruned"
        elif run["status"] == contract.DONE and finite:
            state = "complete"
        else:
            state = "fail"
        history.append(
            {
                "trial": int(run["trial"]),
                "run_id": run["run_id"],
                "state": state,
                "value": value if finite else None,
                "values": {n: own.get(n) for n in names},
                # [[epoch, value], ...]: msgpack maps take string keys only.
                "intermediate": sorted(epochs.get(run["run_id"], {}).items()),
            }
        )
    return history


def search_settings(conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
    """{submission_id: its [SEARCH] as sent, with "lr": its [PROCESS] lr (a distribution's
    text when lr is searched)} of the study's searches."""
    if not has_search(conn):
        return {}
    rows = conn.execute(
        "SELECT submission_id, search, process FROM submissions WHERE search IS NOT NULL"
    )
    return {
        int(sid): {**json.loads(text), "lr": json.loads(process).get("lr")}
        for sid, text, process in rows
    }
