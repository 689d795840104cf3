"""A submission's rows in its study (a part of mosaicd.storage.store.Store): its row, then its
runs, in one transaction that may be made in parts (issue 27: a submission of 150,000 runs is
written a part per step of the daemon's loop, in the one transaction the study's keeper holds
open), and the COMMIT of such a big transaction without its checkpoint."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from mosaic_client.contract import QUEUED

log = logging.getLogger("mosaicd")


@dataclass(frozen=True)
class OpenedSubmission:
    """A submission whose row is written and whose runs are being added (Store.add_runs)."""

    submission_id: int
    first_run_id: int
    first_queue_seq: int
    created_at: float


class SubmissionRows:
    """Store's methods that write submissions (Store provides what is declared here)."""

    path: str
    conn: sqlite3.Connection
    counts: Counter[str]

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _get_system(self, name: str) -> Any:
        raise NotImplementedError

    def _set_system(self, name: str, value: Any) -> None:
        raise NotImplementedError

    def _next_queue_seq(self) -> int:
        raise NotImplementedError

    def add_submission(
        self,
        owner_uid: int | None,
        owner: str,
        config_path: str,
        process: dict[str, Any],
        monitor: dict[str, Any],
        runs: list[tuple[list[dict[str, Any]], int, str, dict[str, Any]]],
        priority: int = 0,
        search: dict[str, Any] | None = None,
        search_runs: list[dict[str, Any]] | None = None,
    ) -> tuple[int, list[int]]:
        """Queue one submission atomically. Each run is (modules, seed, readable, params); a
        search's (docs/tuning.md) has its [SEARCH] and each run's search record."""
        with self.transaction():
            opened = self.begin_submission(
                owner_uid, owner, config_path, process, monitor, priority, search
            )
            run_ids = self.add_runs(
                opened, int(process["epochs"]), owner, runs, search_runs=search_runs
            )
        return opened.submission_id, run_ids

    def begin_submission(
        self,
        owner_uid: int | None,
        owner: str,
        config_path: str,
        process: dict[str, Any],
        monitor: dict[str, Any],
        priority: int = 0,
        search: dict[str, Any] | None = None,
    ) -> OpenedSubmission:
        """A submission's row, inside the caller's transaction: its runs follow (add_runs),
        in the same transaction, in as many parts as the daemon's loop needs (issue 27)."""
        now = time.time()
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO submissions (created_at, owner_uid, owner, config_path, process,"
                " monitor, priority, search) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    owner_uid,
                    owner,
                    config_path,
                    json.dumps(process),
                    json.dumps(monitor),
                    priority,
                    None if search is None else json.dumps(search),
                ),
            )
            next_id = int(self._get_system("next_run_id") or 1)
            row = conn.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()
            return OpenedSubmission(
                int(cur.lastrowid or 0), max(next_id, int(row[0])), self._next_queue_seq(), now
            )

    def add_runs(
        self,
        opened: OpenedSubmission,
        epochs: int,
        owner: str,
        runs: list[tuple[list[dict[str, Any]], int, str, dict[str, Any]]],
        offset: int = 0,
        search_runs: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Runs `offset`.. of an opened submission (begin_submission, same transaction); a
        search's runs with their search records (search_runs[i] for runs[i])."""
        run_ids = []
        now = opened.created_at
        with self.transaction() as conn:
            for at, (modules, seed, readable, params) in enumerate(runs, offset):
                run_id = opened.first_run_id + at
                run_ids.append(run_id)
                conn.execute(
                    "INSERT INTO runs (run_id, status, pipeline, return_status) "
                    "VALUES (?, ?, ?, NULL)",
                    (run_id, QUEUED, readable),
                )
                conn.execute(
                    "INSERT INTO run_meta (run_id, submission_id, modules, seed, epochs_target,"
                    " queue_seq, queued_at, search) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        opened.submission_id,
                        json.dumps(modules),
                        seed,
                        epochs,
                        opened.first_queue_seq + at,
                        now,
                        json.dumps(search_runs[at - offset]) if search_runs else None,
                    ),
                )
                conn.executemany(
                    "INSERT INTO params (run_id, param_name, param_value) VALUES (?, ?, ?)",
                    [(run_id, name, value) for name, value in params.items()],
                )
                conn.execute(
                    "INSERT INTO run_events (run_id, at, from_status, to_status, detail)"
                    " VALUES (?, ?, NULL, ?, ?)",
                    (run_id, now, QUEUED, f"submitted by {owner}"),
                )
            self._set_system("next_run_id", opened.first_run_id + offset + len(runs))
            self.counts[QUEUED] += len(runs)
        return run_ids

    @contextmanager
    def checkpoint_apart(self) -> Iterator[None]:
        """Commit a big transaction without copying it into the database file at once: SQLite's
        automatic checkpoint would do that in the COMMIT, seconds for a 150,000-run submission,
        while the daemon's loop waits. A thread with its own connection does it instead (a
        PASSIVE checkpoint: this connection's next writes go on meanwhile, and their own
        automatic checkpoints skip while it runs); the only thread besides the loop's, and it
        touches nothing but SQLite's own checkpoint."""
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        try:
            yield
        finally:
            self.conn.execute("PRAGMA wal_autocheckpoint = 1000")
        threading.Thread(
            target=_checkpoint, args=(self.path,), name="mosaic-checkpoint", daemon=True
        ).start()


def _checkpoint(path: str) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()
    except sqlite3.Error as exc:  # SQLite's next automatic checkpoint does it then
        log.warning("%s: checkpoint after a big submission failed: %s", path, exc)
