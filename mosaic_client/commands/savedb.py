"""`mosaic savedb COPY [--db DB]`: a consistent copy of a study while the daemon writes to it.

Sends `studies` when --db is not given (to find the daemon's only study); the copy itself is
SQLite's online backup, made by the client from a read-only connection.
"""

from __future__ import annotations

import argparse
import os
import sqlite3

from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError

NAME = "savedb"
HELP = "consistent copy of a study database while runs write to it"
EXAMPLE = "mosaic savedb copy.db --db results.db"


def run(args: argparse.Namespace) -> int:
    source = common.db_or_only(args, "to copy")
    target = os.path.abspath(args.copy)
    if os.path.exists(target) and os.path.samefile(source, target):
        raise CommandError(
            "the copy would overwrite the live database; give another path", BAD_INPUT
        )
    copy_database(source, target)
    print(f"copied {source} to {target}")
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("copy")
    parser.add_argument("--db", help="the study to copy (default: the daemon's only study)")


def copy_database(source: str, target: str) -> None:
    """SQLite's online backup from a read-only connection: consistent while the daemon writes."""
    tmp = f"{target}.partial"
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30.0)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst, pages=1024)
            ok = dst.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dst.close()
        if ok != "ok":
            os.unlink(tmp)
            raise CommandError(
                f"the copy failed its integrity check ({ok}); nothing written. "
                f"Check the source with `sqlite3 {source} 'PRAGMA "
                "integrity_check'`"
            )
        os.replace(tmp, target)
    finally:
        src.close()
