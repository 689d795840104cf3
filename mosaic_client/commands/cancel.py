"""`mosaic cancel DB <selection>`: cancel queued, parked or running runs.

Sends `cancel`.
"""

from __future__ import annotations

import argparse

from mosaic_client.commands import common
from mosaic_client.commands.common import OK

NAME = "cancel"
HELP = "cancel queued or running runs"
EXAMPLE = "mosaic cancel results.db -id 4"


def run(args: argparse.Namespace) -> int:
    reply = common.call(
        args, "cancel", db=common.existing_db(args.db), selection=common.selection(args)
    )
    if not reply["selected"]:
        raise common.matched_nothing(args, "nothing was cancelled")
    print(common.rows_summary("cancelled", reply["cancelled"]))
    if reply["skipped"]:
        print(common.rows_summary("left alone (already finished)", reply["skipped"]))
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db")
    common.add_selection(parser)
