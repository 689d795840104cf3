"""`mosaic rerun CONFIG DB <selection> -epochs N`: finished runs train N more epochs.

Sends `rerun`. CONFIG is the file the runs were queued from: as with `mosaic run`, a DB that
is not in the current directory is looked for next to CONFIG. The runs keep the settings they
were queued with (the daemon holds them); CONFIG is not read again. Their class files are: when
one's content differs from the hash recorded when the run last started, `rerun` says so before
queuing (the runs go on with the code as it is now), and with --strict queues nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError

NAME = "rerun"
HELP = "train the selected runs for N more epochs"
EXAMPLE = "mosaic rerun examples/or_mlp/config.ini results.db -id 1-3 -epochs 5"


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.config):
        raise CommandError(
            f"config file {args.config} does not exist; give the config the "
            "runs were queued from (`mosaic show RUN` shows its settings)",
            BAD_INPUT,
        )
    if args.epochs is None or args.epochs < 1:
        raise CommandError("give -epochs N (N >= 1): how many more epochs to train", BAD_INPUT)
    db = common.existing_db(
        common.near_config(args.db, os.path.dirname(os.path.abspath(args.config)))
    )
    changed_code(args, db)
    reply = common.call(args, "rerun", db=db, selection=common.selection(args), epochs=args.epochs)
    if not reply["selected"]:
        raise common.matched_nothing(args, "nothing was queued")
    print(common.rows_summary(f"queued for {args.epochs} more epoch(s):", reply["queued"]))
    if reply["skipped"]:
        print(common.rows_summary("skipped (queued or running):", reply["skipped"]))
    return OK


def changed_code(args: argparse.Namespace, db: str) -> None:
    """Warn about (or, with --strict, refuse) selected runs whose class files changed since
    they last started: the study's recorded hashes against the files' bytes now."""
    from mosaic_client import provenance, selection, study_reading

    conn = common.analysis_db(db)
    try:
        with common.refused_as_bad_input(selection.SelectionError):
            run_ids = selection.resolve(conn, common.selection(args))
        changes = provenance.code_changes(study_reading.recorded_code(conn, run_ids))
    finally:
        conn.close()
    if not changes:
        return
    lines = [
        f"  {c['path']} ({'now missing' if c['now'] is None else 'edited'}) since run(s) "
        f"{common.span(c['runs'])} started"
        for c in changes
    ]
    text = "class files differ from what the selected runs ran:\n" + "\n".join(lines)
    if args.strict:
        raise CommandError(
            f"{text}\nnothing was queued (--strict); restore the files, or rerun without "
            "--strict to go on with the code as it is now (`mosaic diff` shows the change "
            "once a rerun has started)",
            BAD_INPUT,
        )
    print(f"mosaic: warning: {text}\nthe reruns use the files as they are now", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="the INI file the runs were queued from (a relative DB is also looked for next to it)",
    )
    parser.add_argument("db", help="their study database")
    common.add_selection(parser)
    parser.add_argument(
        "-epochs",
        "--epochs",
        type=int,
        required=True,
        help="how many more epochs to train, from each run's last checkpoint",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="queue nothing when a class file differs from what the runs ran (exit 2)",
    )
