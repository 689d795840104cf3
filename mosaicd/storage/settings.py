"""Name/value tables: a study's `system` table and the daemon's `settings`, read and written
the same way."""

from __future__ import annotations

import sqlite3
from typing import Any


def read_setting(conn: sqlite3.Connection, table: str, key: str, column: str, name: str) -> Any:
    """One value of a name/value table (a study's `system`, the daemon's `settings`)."""
    row = conn.execute(f"SELECT {column} FROM {table} WHERE {key}=?", (name,)).fetchone()
    return row[0] if row else None


def write_setting(
    conn: sqlite3.Connection, table: str, key: str, column: str, name: str, value: Any
) -> None:
    conn.execute(
        f"INSERT INTO {table} ({key}, {column}) VALUES (?, ?) "
        f"ON CONFLICT({key}) DO UPDATE SET {column}=excluded.{column}",
        (name, value),
    )
