"""`mosaic rekey PIPELINES.json DB`: rewrite run keys from an edited `generate` file.

Sends `ping` (starting a daemon when none answers) and `rekey` when a key changes: the changes
are worked out by the client on a read-only connection, and the daemon writes them; into a study
the daemon does not serve (a copy, an older study: it takes none over), the client writes them
itself, with your rights.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from typing import Any

from mosaic_client import protocol
from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError

NAME = "rekey"
HELP = "rewrite keys in DB from an edited pipelines file"
EXAMPLE = "mosaic rekey pipelines.json results.db"


def run(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    with common.refused_as_bad_input(analysis.AnalysisError):
        pipelines = analysis.load_pipelines(args.pipelines)
    db = common.existing_db(args.db)
    conn = common.analysis_db(db)
    try:
        with common.refused_as_bad_input(analysis.AnalysisError):
            plan = analysis.rekey_plan(
                conn, pipelines, os.path.dirname(os.path.abspath(args.pipelines))
            )
    finally:
        conn.close()
    if not plan.matched_runs:
        raise CommandError(
            f"no pipeline of {args.pipelines} matches a run of {db} (compared "
            "without their keys); nothing was changed",
            BAD_INPUT,
        )
    if plan.changes:
        common.ensure_daemon(args)
        try:
            common.call(args, "rekey", db=db, keys=plan.changes)
        except protocol.ProtocolError as exc:
            if exc.code != protocol.ErrorCode.NOT_FOUND or not exc.message.startswith(
                protocol.NOT_SERVED
            ):
                raise
            write_keys(db, plan.changes)
            print("mosaic: (not a study the daemon serves: keys written here)", file=sys.stderr)
    for (name, key), (matched, changed) in sorted(plan.per_key.items()):
        print(f"{name} = {key}: {matched} run(s), {changed} changed")
    if plan.unmatched:
        print(
            f"note: {len(plan.unmatched)} pipeline(s) of {args.pipelines} match no run: "
            f"#{common.span(plan.unmatched)}",
            file=sys.stderr,
        )
    print(
        f"{len(plan.matched_runs)} run(s) matched, {len(plan.changes)} key(s) written"
        if plan.changes
        else f"{len(plan.matched_runs)} run(s) matched; keys already up to date, nothing written"
    )
    return OK


def write_keys(db: str, changes: list[list[Any]]) -> None:
    """Write the keys into a study the daemon does not serve (a copy, an older study): by the
    client, with your own rights, in one transaction; the daemon takes no study over for it."""
    conn = sqlite3.connect(db, timeout=10.0)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO params (run_id, param_name, param_value) VALUES (?, ?, ?) "
                "ON CONFLICT(run_id, param_name) DO UPDATE SET param_value=excluded.param_value",
                changes,
            )
    except sqlite3.Error as exc:
        raise CommandError(
            f"{db}: the keys could not be written ({exc}); nothing was changed"
        ) from None
    finally:
        conn.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipelines")
    parser.add_argument("db")
    common.add_autostart(parser)
