"""The daemon's own state database (in its state directory, root-only on a shared box): the
studies it serves, their submissions' owners, its holds and the users' fair-share usage. Only
the daemon writes it."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any, NamedTuple

from mosaicd.storage.settings import read_setting, write_setting


class OwnerRecord(NamedTuple):
    """Who queued a submission, as the kernel told the daemon (SO_PEERCRED), or the study
    file's owner for a submission queued before owners were kept here (adopted)."""

    uid: int
    name: str
    created_at: float | None  # the submission row's created_at, as the daemon wrote it
    adopted: bool


class DaemonState:
    """The daemon's own small database: which studies it serves, whose their submissions
    are (mosaicd.storage.identity), and its holds."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.conn = sqlite3.connect(
            os.path.join(state_dir, "daemon.db"), isolation_level=None, timeout=10.0
        )
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS studies (path TEXT PRIMARY KEY, added_at REAL NOT NULL)"
        )
        self.conn.execute("CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value)")
        self._migrate()

    # The state database's own migrations (PRAGMA user_version), as the studies' (MIGRATIONS).
    STATE_MIGRATIONS: tuple[str, ...] = (
        # 1: whose rights each study was opened with, to reopen it so after a restart (a daemon
        # without file-access override cannot even look into a private home: mosaicd.owners).
        "ALTER TABLE studies ADD COLUMN opener_uid INTEGER",
        # 2: every submission's owner, from the kernel (issue 24): never read back from the
        # study, a file its user owns and may edit (mosaicd.storage.identity).
        "CREATE TABLE submission_owners (study TEXT NOT NULL, submission_id INTEGER NOT NULL,"
        " owner_uid INTEGER NOT NULL, owner TEXT NOT NULL, created_at REAL,"
        " adopted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (study, submission_id))",
        # 3: whether the study's older submissions (no record in 2) were adopted: once.
        "ALTER TABLE studies ADD COLUMN owners_adopted INTEGER NOT NULL DEFAULT 0",
        # 4: every user's fair-share usage (mosaicd.scheduling.fair_share), so that a restart
        # does not start everyone at zero; `usage_at` (settings) is when it was as saved.
        "CREATE TABLE fair_share_usage (uid INTEGER PRIMARY KEY, slot_seconds REAL NOT NULL)",
    )

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        for number, statement in enumerate(self.STATE_MIGRATIONS[version:], start=version + 1):
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {number}")
            self.conn.execute("COMMIT")

    def studies(self) -> list[tuple[str, int | None]]:
        """The studies served, each with the uid it was opened as (None: the daemon's own)."""
        return [
            (r[0], r[1])
            for r in self.conn.execute("SELECT path, opener_uid FROM studies ORDER BY added_at")
        ]

    def add_study(self, path: str, opener_uid: int | None = None) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO studies (path, added_at, opener_uid) VALUES (?, ?, ?)",
            (path, time.time(), opener_uid),
        )

    def remove_study(self, path: str) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("DELETE FROM studies WHERE path=?", (path,))
        self.conn.execute("DELETE FROM submission_owners WHERE study=?", (path,))
        self.conn.execute("COMMIT")

    # Submissions' owners (mosaicd.storage.identity).

    def record_owner(
        self,
        study: str,
        submission_id: int,
        uid: int,
        name: str,
        created_at: float | None,
        adopted: bool = False,
    ) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO submission_owners (study, submission_id, owner_uid, owner,"
            " created_at, adopted) VALUES (?, ?, ?, ?, ?, ?)",
            (study, submission_id, uid, name, created_at, int(adopted)),
        )

    def owner_record(self, study: str, submission_id: int) -> OwnerRecord | None:
        row = self.conn.execute(
            "SELECT owner_uid, owner, created_at, adopted FROM submission_owners"
            " WHERE study=? AND submission_id=?",
            (study, submission_id),
        ).fetchone()
        return OwnerRecord(row[0], row[1], row[2], bool(row[3])) if row else None

    def owner_records(self, study: str) -> dict[int, OwnerRecord]:
        rows = self.conn.execute(
            "SELECT submission_id, owner_uid, owner, created_at, adopted FROM submission_owners"
            " WHERE study=?",
            (study,),
        )
        return {r[0]: OwnerRecord(r[1], r[2], r[3], bool(r[4])) for r in rows}

    def owners_adopted(self, study: str) -> bool:
        row = self.conn.execute(
            "SELECT owners_adopted FROM studies WHERE path=?", (study,)
        ).fetchone()
        return bool(row and row[0])

    def set_owners_adopted(self, study: str) -> None:
        self.conn.execute("UPDATE studies SET owners_adopted=1 WHERE path=?", (study,))

    def get(self, name: str, default: Any = None) -> Any:
        found = read_setting(self.conn, "settings", "name", "value", name)
        return default if found is None else found

    def set(self, name: str, value: Any) -> None:
        write_setting(self.conn, "settings", "name", "value", name, value)

    # Fair-share usage (mosaicd.scheduling.fair_share.Ledger), saved now and then and at stop.

    def usage(self) -> tuple[dict[int, float], float | None]:
        """Every user's usage as last saved, and when it was so (None: never saved)."""
        rows = self.conn.execute("SELECT uid, slot_seconds FROM fair_share_usage")
        at = self.get("usage_at")
        return {int(uid): float(used) for uid, used in rows}, None if at is None else float(at)

    def save_usage(self, usage: dict[int, float], at: float) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("DELETE FROM fair_share_usage")
            self.conn.executemany(
                "INSERT INTO fair_share_usage (uid, slot_seconds) VALUES (?, ?)",
                [(uid, used) for uid, used in usage.items() if used > 0],
            )
            self.set("usage_at", at)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # The holds (mosaicd.scheduling.holds). The setting names are those of earlier releases, so a
    # hold survives an upgrade.

    def hold_all(self) -> bool:
        return bool(self.get("paused", 0))

    def set_hold_all(self, held: bool) -> None:
        self.set("paused", int(held))

    def held_owners(self) -> set[int]:
        return set(json.loads(self.get("paused_owners", "[]")))

    def set_held_owners(self, owners: set[int]) -> None:
        self.set("paused_owners", json.dumps(sorted(owners)))
