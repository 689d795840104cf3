"""`mosaic rekey PIPELINES.json DB`: rewrite run keys from an edited `generate` file.

Sends `ping` (starting a daemon when none answers) and `rekey` when a key changes: the changes
are worked out by the client on a read-only connection, and the daemon writes them.
"""

from __future__ import annotations

import argparse
import os
import sys

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
        common.call(args, "rekey", db=db, keys=plan.changes)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipelines")
    parser.add_argument("db")
    common.add_autostart(parser)
