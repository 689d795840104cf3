"""`mosaic pause [FILE] [--now] [--all]`: start no new run (a hold; `--now` also parks runs).

Sends `pause`; with FILE also `pending` and then `cancel` per study, once FILE is written.
"""

from __future__ import annotations

import argparse
import json
import os

from mosaic_client.commands import common
from mosaic_client.commands.common import OK

NAME = "pause"
HELP = "stop starting new runs (--now: also park running ones)"
EXAMPLE = "mosaic pause --now"


def run(args: argparse.Namespace) -> int:
    reply = common.call(args, "pause", now=args.now, all=args.all)
    if args.file:
        moved = move_pending_to(args, args.file)
        print(
            f"wrote {moved} not-yet-run pipeline(s) to {args.file}; "
            f"`mosaic resume {args.file}` queues them again"
        )
    extra = (
        f"; parking {reply['parking']} running run(s) at their next epoch boundary"
        if args.now
        else "; running runs finish"
    )
    if reply.get("scope") == "owner":
        print(
            f"paused your submissions: none of your runs starts{extra}. "
            "`mosaic resume` starts them again."
        )
    else:
        print(f"paused: no new run starts{extra}. `mosaic resume` starts again.")
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="also write the not-yet-run pipelines to this JSON")
    parser.add_argument(
        "--now",
        action="store_true",
        help="checkpoint running runs at their next epoch boundary and park them",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="pause the whole shared daemon, everyone's runs (root and the admin group only)",
    )


def move_pending_to(args: argparse.Namespace, path: str) -> int:
    """The seed's form: the not-yet-run pipelines leave the queue for `path`, where they can be
    edited, and `mosaic resume FILE` queues them again. The client writes the file with the
    caller's own permissions; the runs leave the queue only once it is written."""
    pending = common.call(args, "pending")
    tmp = f"{path}.partial"
    with open(tmp, "w") as fh:
        json.dump(pending, fh, indent=1)
    os.replace(tmp, path)
    moved = 0
    for entry in pending:
        if entry["run_ids"]:
            result = common.call(
                args,
                "cancel",
                db=entry["db"],
                selection={"kind": "ids", "ids": entry["run_ids"]},
                reason=f"moved to {os.path.abspath(path)} by pause",
            )
            moved += len(result["cancelled"])
    return moved
