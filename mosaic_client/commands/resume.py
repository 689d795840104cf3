"""`mosaic resume [FILE] [--all]`: lift the hold; parked runs go on from their checkpoint.

Sends `resume`; with FILE (written by `mosaic pause FILE`), first `submit` per saved study.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError

NAME = "resume"
HELP = "start runs again (FILE: queue the pipelines saved in it)"
EXAMPLE = "mosaic resume"


def run(args: argparse.Namespace) -> int:
    if args.file:
        for entry in read_pause_file(args.file):
            if entry["pipelines"]:
                reply = common.call(
                    args,
                    "submit",
                    db=entry["db"],
                    config_path=os.path.abspath(args.file),
                    process=entry["process"],
                    monitor=entry["monitor"],
                    pipelines=entry["pipelines"],
                )
                ids = reply["run_ids"]
                print(
                    f"queued {len(ids)} pipeline(s) from {args.file} as runs "
                    f"{common.span(ids)} in {entry['db']}"
                )
    reply = common.call(args, "resume", all=args.all)
    whose = "your submissions" if reply.get("scope") == "owner" else "the daemon"
    print(f"resumed {whose}; {reply['resumed']} parked run(s) continue from their checkpoint")
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?")
    parser.add_argument(
        "--all",
        action="store_true",
        help="resume the whole shared daemon (root and the admin group only)",
    )


def read_pause_file(path: str) -> list[dict[str, Any]]:
    """The entries of a `mosaic pause FILE` file, checked before anything is queued."""
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(
            f"cannot read {path}: {exc}; give a file written by `mosaic pause FILE`", BAD_INPUT
        ) from None
    if not isinstance(saved, list) or not all(
        isinstance(e, dict) and {"db", "process", "monitor", "pipelines"} <= set(e) for e in saved
    ):
        raise CommandError(
            f"{path} is not a file written by `mosaic pause FILE` "
            "(a list of {db, process, monitor, pipelines})",
            BAD_INPUT,
        )
    return saved
