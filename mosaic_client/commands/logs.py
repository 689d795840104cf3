"""`mosaic logs RUN [--db DB] [-f]`: what a run printed; `-f` follows it until it ends.

Sends `show` (to find the run's log file and state; again while following) and `studies` when
--db is not given. The log itself is read from the run's files by the client.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mosaic_client import contract
from mosaic_client.commands import common
from mosaic_client.commands.common import INTERRUPTED, OK, CommandError

NAME = "logs"
HELP = "a run's output (-f: follow it live)"
EXAMPLE = "mosaic logs 3 -f"

_UNDERWAY = (contract.QUEUED, contract.RUNNING)


def run(args: argparse.Namespace) -> int:
    db = common.db_or_only(args, "the run is in")
    info = common.call(args, "show", db=db, run_id=args.run)
    path = contract.run_log_path(info["params"].get("run_files_path"), args.run)
    # Following a run that has not started yet means waiting for its output to appear.
    while args.follow and not os.path.exists(path) and info["status"] in _UNDERWAY:
        time.sleep(0.3)
        info = common.call(args, "show", db=db, run_id=args.run)
    if not os.path.exists(path):
        hint = "; `mosaic logs RUN -f` waits for it" if info["status"] == contract.QUEUED else ""
        raise CommandError(
            f"run {args.run} has no output yet ({path}): it is {info['status']}{hint}"
        )
    with open(path, "rb") as fh:
        sys.stdout.write(fh.read().decode(errors="replace"))
        sys.stdout.flush()
        if not args.follow:
            return OK
        try:
            with common.client(args) as client:
                while True:
                    chunk = fh.read()
                    if chunk:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                        continue
                    status = client.request("show", db=db, run_id=args.run)["status"]
                    if status not in _UNDERWAY:
                        rest = fh.read()
                        sys.stdout.write(rest.decode(errors="replace"))
                        return OK
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return INTERRUPTED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=int, help="run id")
    parser.add_argument("--db", help="its study database (default: the daemon's only study)")
    parser.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new output until the run ends (waits if queued)",
    )
