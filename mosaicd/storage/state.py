"""The daemon's own state database (in its state directory, root-only on a shared box): the
studies it serves and its holds. Only the daemon writes it."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any

from mosaicd.storage.settings import read_setting, write_setting


class DaemonState:
    """The daemon's own small database: which studies it serves, and its holds."""

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
        self.conn.execute("DELETE FROM studies WHERE path=?", (path,))

    def get(self, name: str, default: Any = None) -> Any:
        found = read_setting(self.conn, "settings", "name", "value", name)
        return default if found is None else found

    def set(self, name: str, value: Any) -> None:
        write_setting(self.conn, "settings", "name", "value", name, value)

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
