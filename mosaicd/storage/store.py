"""The study database: the one place that writes the schema (its migrations), and the daemon's
only writer. Reading a study's runs is shared with the client (mosaic_client.study_reading);
the daemon's own bookkeeping reads (run_meta, submissions) stay here.

Every state change of a run goes through :meth:`Store.transition`, which records it in
``run_events`` inside the same transaction as the change itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mosaic_client import provenance, study_reading
from mosaic_client.contract import (
    DONE,
    FINAL_STATES,
    MEASUREMENT_NUMBERS,
    MEASUREMENT_TEXT,
    QUEUED,
    RESOURCE_COLUMNS,
    RESULT_COLUMNS,
    RUN_STATES,
    RUNNING,
    TRANSITIONS,
)
from mosaicd.storage import user_files
from mosaicd.storage.groups_view import (
    COLUMNS_BEFORE_RESOURCES,
    COLUMNS_BEFORE_VALIDATION,
    run_groups_view,
)
from mosaicd.storage.settings import read_setting, write_setting
from mosaicd.storage.submission_rows import SubmissionRows

SCHEMA_VERSION = 10
log = logging.getLogger("mosaicd")


# run_environment's columns (issue 16), typed: the counts and flags are integers.
_INTEGER_ENVIRONMENT = ("threads", "deterministic", "cudnn_deterministic", "cudnn_benchmark")
PROVENANCE_COLUMNS = tuple(
    f"{name} {'INTEGER' if name in _INTEGER_ENVIRONMENT else 'TEXT'}"
    for name in provenance.ENVIRONMENT_FIELDS
)


# The run_results columns before version 9 (the views of migrations 4 and 5 name these).

# Forward migrations, by the version they bring the database to. Version 1 holds the seed's four
# tables, unchanged so users' SQL keeps working, plus the daemon's own tables.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS system (param_name TEXT PRIMARY KEY, param_value)",
        """CREATE TABLE IF NOT EXISTS params (
            run_id INTEGER NOT NULL, param_name TEXT NOT NULL, param_value,
            PRIMARY KEY (run_id, param_name))""",
        "CREATE INDEX IF NOT EXISTS params_by_name ON params (param_name, param_value)",
        """CREATE TABLE IF NOT EXISTS runs (
            run_id INTEGER PRIMARY KEY, status TEXT NOT NULL, pipeline TEXT NOT NULL,
            return_status TEXT)""",
        "CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, run_id)",
        """CREATE TABLE IF NOT EXISTS run_results (
            run_id INTEGER PRIMARY KEY, train_loss REAL, test_loss REAL, train_acc REAL,
            test_acc REAL, nb_params INTEGER, "duration(s)" REAL, epochs INTEGER, overfit REAL,
            trainability REAL, slope REAL)""",
        """CREATE TABLE IF NOT EXISTS run_epochs (
            run_id INTEGER NOT NULL, epoch INTEGER NOT NULL, train_loss REAL, test_loss REAL,
            train_acc REAL, test_acc REAL, "duration(s)" REAL,
            PRIMARY KEY (run_id, epoch)) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS submissions (
            submission_id INTEGER PRIMARY KEY, created_at REAL NOT NULL, owner_uid INTEGER,
            owner TEXT, config_path TEXT, process TEXT NOT NULL, monitor TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS run_meta (
            run_id INTEGER PRIMARY KEY, submission_id INTEGER NOT NULL, modules TEXT NOT NULL,
            seed INTEGER NOT NULL, epochs_target INTEGER NOT NULL,
            checkpoint_epoch INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
            queue_seq INTEGER NOT NULL, queued_at REAL, started_at REAL, finished_at REAL,
            worker TEXT)""",
        "CREATE INDEX IF NOT EXISTS run_meta_by_queue ON run_meta (queue_seq)",
        "CREATE INDEX IF NOT EXISTS run_meta_by_submission ON run_meta (submission_id)",
        """CREATE TABLE IF NOT EXISTS run_events (
            event_id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, at REAL NOT NULL,
            from_status TEXT, to_status TEXT NOT NULL, detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS run_events_by_run ON run_events (run_id, event_id)",
    ),
    # Per-submission pause: on a shared daemon a user pauses only their own submissions.
    2: ("ALTER TABLE submissions ADD COLUMN paused INTEGER NOT NULL DEFAULT 0",),
    # An owner's hold is kept once, in the daemon's state database (DaemonState.held_owners),
    # which also covers the submissions made while held; the per-submission copy goes.
    3: ("ALTER TABLE submissions DROP COLUMN paused",),
    # The configuration groups (runs that differ only by their repetition), for `mosaic groups`
    # and `mosaic compare`.
    4: (run_groups_view(COLUMNS_BEFORE_RESOURCES),),
    # -- issue 16: provenance (what produced each run) ---------------------------------------
    # Each distinct class file text once (10,000 runs of one file store it once), which file
    # each run loaded, and the environment it ran in (mosaic_client.provenance). The run_groups
    # view is made again: the [PROCESS] seed's row (process_seed) is a repetition's, like seed.
    5: (
        "CREATE TABLE IF NOT EXISTS code_files (sha256 TEXT PRIMARY KEY, text TEXT NOT NULL)"
        " WITHOUT ROWID",
        """CREATE TABLE IF NOT EXISTS run_code (
            run_id INTEGER NOT NULL, section TEXT NOT NULL, "class" TEXT, path TEXT NOT NULL,
            sha256 TEXT NOT NULL, git_commit TEXT, git_dirty INTEGER,
            PRIMARY KEY (run_id, section))""",
        "CREATE INDEX IF NOT EXISTS run_code_by_sha ON run_code (sha256)",
        f"""CREATE TABLE IF NOT EXISTS run_environment (
            run_id INTEGER PRIMARY KEY, recorded_at REAL NOT NULL,
            {", ".join(PROVENANCE_COLUMNS)})""",
        "DROP VIEW IF EXISTS run_groups",
        run_groups_view(COLUMNS_BEFORE_RESOURCES),
    ),
    # -- end issue 16 ------------------------------------------------------------------------
    # The ensemble a run was last sent to train in (docs/ensembles.md), and
    # why its members trained individually when they did: for `mosaic show`.
    6: (
        """CREATE TABLE IF NOT EXISTS run_ensembles (
            run_id INTEGER PRIMARY KEY, members TEXT NOT NULL, fallback TEXT,
            started_at REAL NOT NULL)""",
    ),
    # A submission's priority among its owner's runs (issue 27: `mosaic run --priority`,
    # `mosaic priority`): higher first; equal, first come, first served.
    7: ("ALTER TABLE submissions ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",),
    # The plans of `compare --until-decided` and the alpha they spent (issue 28; record_plan).
    8: (
        """CREATE TABLE IF NOT EXISTS sequential_plans (plan_id INTEGER PRIMARY KEY,
        recorded_at REAL NOT NULL, metric TEXT NOT NULL, data_key TEXT NOT NULL, families TEXT
        NOT NULL, alpha REAL NOT NULL, spent REAL NOT NULL, looks TEXT NOT NULL, verdicts TEXT
        NOT NULL, method TEXT NOT NULL)""",
    ),
    # What each run costs (issue 26, docs/resources.md): the resource figures as run_results
    # columns (NULL for the runs before, and where a figure cannot be measured), the context
    # they were measured in, and the groups' means of them.
    9: (
        *(f"ALTER TABLE run_results ADD COLUMN {c} REAL" for c in RESOURCE_COLUMNS),
        f"""CREATE TABLE IF NOT EXISTS run_measurements (run_id INTEGER PRIMARY KEY,
        {", ".join(f"{n} TEXT" for n in MEASUREMENT_TEXT)},
        {", ".join(f"{n} REAL" for n in MEASUREMENT_NUMBERS)})""",
        "DROP VIEW IF EXISTS run_groups",
        run_groups_view(COLUMNS_BEFORE_VALIDATION),
    ),
    # Tuned comparisons (issue 25, docs/tuning.md): a submission's [SEARCH], each search run's
    # group/stage/trial/round, and the validation loader's figures per run and per epoch.
    10: (
        "ALTER TABLE submissions ADD COLUMN search TEXT",
        "ALTER TABLE run_meta ADD COLUMN search TEXT",
        "ALTER TABLE run_results ADD COLUMN val_loss REAL",
        "ALTER TABLE run_results ADD COLUMN val_acc REAL",
        "ALTER TABLE run_epochs ADD COLUMN val_loss REAL",
        "ALTER TABLE run_epochs ADD COLUMN val_acc REAL",
        "DROP VIEW IF EXISTS run_groups",
        run_groups_view(),
    ),
}


class StoreError(Exception):
    """A study database that cannot be used, with a message that says what to do."""


class StudyBusy(StoreError):
    """Another process holds the study's write lock: the write was not made; try it later."""


class StudyStalled(StoreError):
    """A statement on the study ran past its time budget (a trigger or view of the user's that
    never ends, mosaicd.storage.user_files): the write was rolled back; the study's writes
    wait until `mosaic resume`."""


def stalled_message(path: str) -> str:
    return (
        f"{path}: a statement ran longer than {user_files.STATEMENT_BUDGET_S:g} s and was "
        "stopped (a trigger or view added to the study?); remove it and `mosaic resume`"
    )


class StudyFault(StoreError):
    """Another database error on a study (an I/O error): tried again after a while."""


class DiskFull(StoreError):
    """The study's filesystem is full: the write was rolled back; try it once space is freed."""


# How long one attempt to take a study's write lock waits. The daemon's single loop must never
# wait on one study (mosaicd.storage.writer queues the study's writes and tries again later).
BUSY_TIMEOUT_MS = 10


def disk_full_message(path: str) -> str:
    return f"disk full in {os.path.dirname(os.path.abspath(path))}: free space and `mosaic resume`"


def is_disk_full(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        "database or disk is full" in text
        or "no space left" in text
        or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
    )


@dataclass(slots=True)
class RunRecord:
    """What the scheduler needs to start a run."""

    run_id: int
    submission_id: int
    modules: list[dict[str, Any]]
    seed: int
    epochs_target: int
    checkpoint_epoch: int
    attempts: int
    queue_seq: int
    # A search run's group, stage, trial and round (mosaic_client.search.record); None: none.
    search: dict[str, Any] | None = None


def connect_readonly(path: str) -> sqlite3.Connection:
    """A connection that cannot write: for users' SQL and the client's reads."""
    try:
        # Read-only opens wait on a FIFO: look first (mosaicd.storage.user_files).
        checked = user_files.check_study_files(path)
        conn = user_files.connect(f"file:{path}?mode=ro", timeout=5.0)
    except user_files.NotRegularFile as exc:
        raise StoreError(str(exc)) from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot read it as a Mosaic database ({exc})") from None
    try:
        user_files.same_file(path, checked)
        conn.execute("PRAGMA query_only = 1")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except user_files.NotRegularFile as exc:
        conn.close()
        raise StoreError(str(exc)) from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path}: cannot read it as a Mosaic database ({exc})") from None
    return conn


class Store(SubmissionRows):
    def __init__(self, path: str, create: bool = True) -> None:
        self.path = path
        try:
            # Regular files only, and a time budget on every statement: a FIFO or an endless
            # trigger of the user's must not stop the daemon's loop (mosaicd.storage.user_files).
            checked = user_files.check_study_files(path)
        except user_files.NotRegularFile as exc:
            raise StoreError(str(exc)) from None
        try:
            uri = f"file:{path}?mode={'rwc' if create else 'rw'}"
            # The file is its user's: a trigger or view they add must not run functions with
            # side effects when the daemon writes (trusted_schema off, docs/deployment.md).
            self.conn = user_files.connect(uri, timeout=10.0, isolation_level=None)
            try:
                user_files.same_file(path, checked)
            except user_files.NotRegularFile as exc:
                self.conn.close()
                raise StoreError(str(exc)) from None
            if not create and self._version() == 0:
                # An existing empty file (or empty SQLite database) named in a request that
                # only reads or changes runs must not be turned into a study.
                self.conn.close()
                raise StoreError(
                    f"{path} is not a Mosaic study database (it holds no runs); "
                    "give the database that `mosaic run` created"
                )
            self.conn.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL is durable across process crashes (kill -9); only a power loss
            # may drop the last transactions, never corrupt the file.
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = OFF")
            self._migrate()
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.DatabaseError as exc:
            if user_files.is_interrupted(exc):
                raise StudyStalled(stalled_message(path)) from None
            raise StoreError(
                f"{path} is not a usable SQLite database ({exc}); give a new file name or "
                "a database created by Mosaic"
            ) from None
        self._in_tx = False
        self.counts = self._load_counts()

    # -- schema -------------------------------------------------------------------------------

    def _version(self) -> int:
        has_system = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='system'"
        ).fetchone()
        if not has_system:
            tables = self.conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type='table'"
            ).fetchone()[0]
            if tables:
                raise StoreError(
                    f"{self.path} is an SQLite database but not a Mosaic study "
                    "(no 'system' table); give another file name"
                )
            return 0
        row = self.conn.execute(
            "SELECT param_value FROM system WHERE param_name='schema_version'"
        ).fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        version = self._version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this Mosaic "
                f"({SCHEMA_VERSION}); upgrade Mosaic to use it"
            )
        for target in sorted(v for v in MIGRATIONS if v > version):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target]:
                    self.conn.execute(statement)
                self._set_system("schema_version", target)
                if self._get_system("next_run_id") is None:
                    self._set_system("next_run_id", 1)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def _get_system(self, name: str) -> Any:
        return read_setting(self.conn, "system", "param_name", "param_value", name)

    def _set_system(self, name: str, value: Any) -> None:
        write_setting(self.conn, "system", "param_name", "param_value", name, value)

    def close(self) -> None:
        self.conn.close()

    # -- transactions -------------------------------------------------------------------------

    def _begin(self) -> None:
        """Take the write lock, or raise StudyBusy at once (after BUSY_TIMEOUT_MS).

        Only mosaicd should write a study, but a user's `sqlite3` shell left in a transaction
        holds the lock for as long as it likes. Waiting here would stop the daemon's loop for
        every user; the caller (mosaicd.storage.writer.StudyWriter) keeps the write and retries."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StudyBusy(
                    f"{self.path} is locked by another process ({exc}); only mosaicd should "
                    "write a study database"
                ) from None
            if is_disk_full(exc):
                raise DiskFull(disk_full_message(self.path)) from None
            raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self._in_tx:
            yield self.conn
            return
        self._begin()
        self._in_tx = True
        pending_counts = dict(self.counts)
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            # A failed COMMIT (disk full) may already have rolled the transaction back: a
            # second ROLLBACK would raise "no transaction is active" over the real cause.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.counts = pending_counts
            if isinstance(exc, (sqlite3.OperationalError, OSError)) and is_disk_full(exc):
                raise DiskFull(disk_full_message(self.path)) from None
            if isinstance(exc, sqlite3.OperationalError) and (
                "locked" in str(exc) or "busy" in str(exc)
            ):
                raise StudyBusy(f"{self.path} is locked by another process ({exc})") from None
            if user_files.is_interrupted(exc):
                raise StudyStalled(stalled_message(self.path)) from None
            raise
        finally:
            self._in_tx = False

    def _load_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(RUN_STATES, 0)
        for status, n in self.conn.execute("SELECT status, count(*) FROM runs GROUP BY status"):
            counts[status] = n
        return counts

    def transition(
        self,
        run_id: int,
        to_status: str,
        detail: str | None = None,
        return_status: str | None = None,
    ) -> str:
        """The one function that changes a run's state; returns the previous state."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"run {run_id} does not exist in {self.path}")
            from_status = row[0]
            if to_status not in TRANSITIONS.get(from_status, ()):
                raise StoreError(f"run {run_id}: cannot go from {from_status} to {to_status}")
            now = time.time()
            conn.execute(
                "UPDATE runs SET status=?, return_status=? WHERE run_id=?",
                (to_status, return_status, run_id),
            )
            conn.execute(
                "INSERT INTO run_events (run_id, at, from_status, to_status, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, now, from_status, to_status, detail),
            )
            if to_status == RUNNING:
                conn.execute(
                    "UPDATE run_meta SET started_at=?, attempts=attempts+1 WHERE run_id=?",
                    (now, run_id),
                )
            elif to_status in FINAL_STATES:
                conn.execute("UPDATE run_meta SET finished_at=? WHERE run_id=?", (now, run_id))
            elif to_status == QUEUED:
                conn.execute(
                    "UPDATE run_meta SET queued_at=?, queue_seq=? WHERE run_id=?",
                    (now, self._next_queue_seq(), run_id),
                )
            self.counts[from_status] -= 1
            self.counts[to_status] += 1
            return from_status

    def _next_queue_seq(self) -> int:
        row = self.conn.execute("SELECT coalesce(max(queue_seq), 0) + 1 FROM run_meta").fetchone()
        return int(row[0])

    # -- submissions --------------------------------------------------------------------------

    def submission(self, submission_id: int) -> dict[str, Any]:
        row = self.conn.execute(
            "SELECT owner_uid, owner, config_path, process, monitor, priority, search "
            "FROM submissions "
            "WHERE submission_id=?",
            (submission_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"submission {submission_id} missing from {self.path}")
        return {
            "submission_id": submission_id,
            "owner_uid": row[0],
            "owner": row[1],
            "config_path": row[2],
            "process": json.loads(row[3]),
            "monitor": json.loads(row[4]),
            "priority": row[5],
            "search": json.loads(row[6]) if row[6] else None,
        }

    def _record(self, row: tuple[Any, ...]) -> RunRecord:
        return RunRecord(
            run_id=row[0],
            submission_id=row[1],
            modules=json.loads(row[2]),
            seed=row[3],
            epochs_target=row[4],
            checkpoint_epoch=row[5],
            attempts=row[6],
            queue_seq=row[7],
            search=json.loads(row[8]) if row[8] else None,
        )

    _RECORD_COLUMNS = (
        "m.run_id, m.submission_id, m.modules, m.seed, m.epochs_target, "
        "m.checkpoint_epoch, m.attempts, m.queue_seq, m.search"
    )

    def runs_in_state(self, status: str) -> list[RunRecord]:
        rows = self.conn.execute(
            f"SELECT {self._RECORD_COLUMNS} FROM run_meta m JOIN runs r USING (run_id) "
            "WHERE r.status=? ORDER BY m.queue_seq",
            (status,),
        )
        return [self._record(row) for row in rows]

    def run_record(self, run_id: int) -> RunRecord | None:
        row = self.conn.execute(
            f"SELECT {self._RECORD_COLUMNS} FROM run_meta m WHERE m.run_id=?", (run_id,)
        ).fetchone()
        return self._record(row) if row else None

    def run_records(self, run_ids: list[int]) -> list[RunRecord]:
        """The records of these runs (those that exist), in queue order: one query per 500."""
        found: list[RunRecord] = []
        for at in range(0, len(run_ids), 500):
            chunk = run_ids[at : at + 500]
            rows = self.conn.execute(
                f"SELECT {self._RECORD_COLUMNS} FROM run_meta m WHERE m.run_id IN "
                f"({', '.join('?' * len(chunk))}) ORDER BY m.queue_seq",
                chunk,
            )
            found.extend(self._record(row) for row in rows)
        return found

    def status_of(self, run_id: int) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def submission_of(self, run_id: int) -> int | None:
        """The run's submission id. Its owner is the daemon's record of it (DaemonState), never
        the study's own `owner_uid`, which its user may edit (mosaicd.storage.identity)."""
        row = self.conn.execute(
            "SELECT submission_id FROM run_meta WHERE run_id=?", (run_id,)
        ).fetchone()
        return int(row[0]) if row else None

    # -- progress and results -----------------------------------------------------------------

    def record_epochs(self, events: Iterable[dict[str, Any]]) -> None:
        """Store a batch of epoch events in one transaction (the hot write path)."""
        with self.transaction() as conn:
            for ev in events:
                conn.execute(
                    "INSERT OR REPLACE INTO run_epochs (run_id, epoch, train_loss, test_loss,"
                    ' train_acc, test_acc, "duration(s)", val_loss, val_acc)'
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        ev["run_id"],
                        ev["epoch"],
                        ev["train_loss"],
                        ev["test_loss"],
                        ev.get("train_acc"),
                        ev.get("test_acc"),
                        ev["duration"],
                        ev.get("val_loss"),
                        ev.get("val_acc"),
                    ),
                )
                if ev.get("checkpointed"):
                    conn.execute(
                        "UPDATE run_meta SET checkpoint_epoch=? WHERE run_id=?",
                        (ev["epoch"], ev["run_id"]),
                    )

    def record_ensemble(self, run_ids: list[int]) -> None:
        """These runs were sent to train together (replaces each one's earlier ensemble)."""
        members = json.dumps(run_ids)
        now = time.time()
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO run_ensembles (run_id, members, fallback, started_at) "
                "VALUES (?, ?, NULL, ?)",
                [(run_id, members, now) for run_id in run_ids],
            )

    def set_ensemble_fallback(self, run_ids: list[int], reason: str) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE run_ensembles SET fallback=? WHERE run_id=?",
                [(reason, run_id) for run_id in run_ids],
            )

    def set_checkpoint_epoch(self, run_id: int, epoch: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE run_meta SET checkpoint_epoch=? WHERE run_id=?", (epoch, run_id))

    def truncate_history(self, run_id: int, after_epoch: int) -> None:
        """Drop epochs recorded after the checkpoint a run resumes from: no repeats, no gaps."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM run_epochs WHERE run_id=? AND epoch>?", (run_id, after_epoch))

    def finish_run(self, run_id: int, results: dict[str, Any], summary: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO run_results (run_id, "
                f"{', '.join(chr(34) + c + chr(34) for c in RESULT_COLUMNS)}) "
                f"VALUES (?{', ?' * len(RESULT_COLUMNS)})",
                (run_id, *(results.get(c) for c in RESULT_COLUMNS)),
            )
            measurement = results.get("measurement")
            if isinstance(measurement, dict):
                names = (*MEASUREMENT_TEXT, *MEASUREMENT_NUMBERS)
                conn.execute(
                    f"INSERT OR REPLACE INTO run_measurements (run_id, {', '.join(names)}) "
                    f"VALUES (?{', ?' * len(names)})",
                    (run_id, *(measurement.get(n) for n in names)),
                )
            self.transition(run_id, DONE, "finished", return_status=summary)

    def extend_target(self, run_id: int, extra_epochs: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE run_meta SET epochs_target=epochs_target+? WHERE run_id=?",
                (extra_epochs, run_id),
            )

    def recent(self, status: str, limit: int) -> list[dict[str, Any]]:
        if status == DONE:
            rows = self.conn.execute(
                'SELECT r.run_id, r.pipeline, rr.train_loss, rr.test_loss, rr."duration(s)", '
                "rr.train_acc, rr.test_acc, rr.epochs FROM runs r LEFT JOIN run_results rr "
                "USING (run_id) WHERE r.status=? ORDER BY r.run_id DESC LIMIT ?",
                (status, limit),
            )
            keys = (
                "run_id",
                "pipeline",
                "train_loss",
                "test_loss",
                "duration",
                "train_acc",
                "test_acc",
                "epochs",
            )
        else:
            rows = self.conn.execute(
                "SELECT run_id, pipeline, return_status FROM runs WHERE status=? "
                "ORDER BY run_id DESC LIMIT ?",
                (status, limit),
            )
            keys = ("run_id", "pipeline", "return_status")
        return [dict(zip(keys, row)) for row in rows]

    def submission_counts(self, submission_id: int) -> dict[str, int]:
        rows = self.conn.execute(
            "SELECT r.status, count(*) FROM run_meta m JOIN runs r USING (run_id) "
            "WHERE m.submission_id=? GROUP BY r.status",
            (submission_id,),
        )
        return {status: n for status, n in rows}

    def pipeline_text(self, run_id: int) -> str:
        row = self.conn.execute("SELECT pipeline FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else ""

    def set_params(self, changes: list[tuple[int, str, Any]]) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO params (run_id, param_name, param_value) VALUES (?, ?, ?) "
                "ON CONFLICT(run_id, param_name) DO UPDATE SET param_value=excluded.param_value",
                changes,
            )

    # -- issue 16: provenance -----------------------------------------------------------------

    def record_provenance(
        self, run_id: int, environment: dict[str, Any], code: list[dict[str, Any]]
    ) -> None:
        """What a run's start loaded and ran in (a worker's "provenance" message), in one
        transaction; a later start of the run (resume, rerun) replaces its record."""
        fields = provenance.ENVIRONMENT_FIELDS
        with self.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO run_environment (run_id, recorded_at, "
                f"{', '.join(fields)}) VALUES (?, ?{', ?' * len(fields)})",
                (run_id, time.time(), *(_sql_value(environment.get(f)) for f in fields)),
            )
            conn.execute("DELETE FROM run_code WHERE run_id=?", (run_id,))
            for entry in code:
                conn.execute(
                    "INSERT OR IGNORE INTO code_files (sha256, text) VALUES (?, ?)",
                    (entry["sha256"], entry["text"]),
                )
                conn.execute(
                    'INSERT OR REPLACE INTO run_code (run_id, section, "class", path, sha256, '
                    "git_commit, git_dirty) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        entry["section"],
                        entry.get("class"),
                        entry["path"],
                        entry["sha256"],
                        entry.get("git_commit"),
                        _sql_value(entry.get("git_dirty")),
                    ),
                )

    # -- end issue 16 ----------------------------------------------------------------------

    def params_of(self, run_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The params of these runs: {run_id: {name: value}} (the client's reading, shared)."""
        return study_reading.run_params(self.conn, run_ids)

    def pipeline_mates(self, run_ids: list[int]) -> set[int]:
        """These runs and every run with the same `pipeline` param as one of them."""
        return study_reading.pipeline_mates(self.conn, run_ids)

    def describe(self, run_id: int) -> dict[str, Any] | None:
        """Everything known about one run, for `mosaic show`: the same reading of a study as
        the client's when no daemon answers (one query, written once)."""
        return study_reading.describe_run(self.conn, run_id)


def _sql_value(value: Any) -> Any:
    """A bool as SQLite's 0/1; anything else unchanged."""
    return int(value) if isinstance(value, bool) else value
