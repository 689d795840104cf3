"""`mosaic priority DB N [--submission S]`: the order of your own queued runs.

Sends `priority`. A higher priority starts first among its owner's runs; equal priorities go
first come, first served. On a shared daemon the fair share still decides between users
(docs/deployment.md): a priority orders only your own runs.
"""

from __future__ import annotations

import argparse

from mosaic_client.commands import common
from mosaic_client.commands.common import OK

NAME = "priority"
HELP = "set the priority of your submissions in a study (higher first)"
EXAMPLE = "mosaic priority results.db 10"


def run(args: argparse.Namespace) -> int:
    fields = {"db": common.existing_db(args.db), "priority": args.priority}
    if args.submission is not None:
        fields["submission"] = args.submission
    reply = common.call(args, "priority", **fields)
    chosen = ", ".join(map(str, reply["submissions"])) or "none of yours"
    print(f"priority {reply['priority']} for submission(s) {chosen} in {fields['db']}")
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="the study")
    parser.add_argument("priority", type=int, help="higher starts first among your runs")
    parser.add_argument(
        "--submission", type=int, help="only this submission (default: all yours in DB)"
    )
