"""`mosaic logs RUN [--db DB] [-f]`: what a run printed; `-f` follows it until it ends.

Sends `show` (to find the run's log file and state; again while following) and `studies` when
--db is not given. The log itself is read from the run's files by the client, in chunks. With
no daemon answering, the run is read from the study (--db DB, or the one study the stopped daemon
served) and its log printed as it is.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from typing import BinaryIO

from mosaic_client import contract
from mosaic_client.commands import common
from mosaic_client.commands.common import INTERRUPTED, OK, CommandError

NAME = "logs"
HELP = "a run's output (-f: follow it live)"
EXAMPLE = "mosaic logs 3 -f"

_UNDERWAY = (contract.QUEUED, contract.RUNNING)


# Read and written in pieces: a run that printed 200 MB costs the client 64 KiB, not 200 MB.
CHUNK = 64 * 1024


def run(args: argparse.Namespace) -> int:
    db, info, live = common.run_info(args, "the run is in")
    path = contract.run_log_path(info["params"].get("run_files_path"), args.run)
    if args.follow and not live:
        # No daemon: nothing is training, so there is nothing to follow.
        print("mosaic: no daemon, so the run is not training: its log so far", file=sys.stderr)
    # Following a run that has not started yet means waiting for its output to appear.
    while live and args.follow and not os.path.exists(path) and info["status"] in _UNDERWAY:
        time.sleep(0.3)
        info = common.call(args, "show", db=db, run_id=args.run)
    if not os.path.exists(path):
        hint = "; `mosaic logs RUN -f` waits for it" if info["status"] == contract.QUEUED else ""
        raise CommandError(
            f"run {args.run} has no output yet ({path}): it is {info['status']}{hint}"
        )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as fh:
        copy(fh, decoder)
        if not args.follow or not live:
            sys.stdout.write(decoder.decode(b"", final=True))
            return OK
        try:
            with common.client(args) as client:
                while True:
                    if copy(fh, decoder):
                        continue
                    status = client.request("show", db=db, run_id=args.run)["status"]
                    if status not in _UNDERWAY:
                        copy(fh, decoder)
                        sys.stdout.write(decoder.decode(b"", final=True))
                        return OK
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return INTERRUPTED


def copy(fh: BinaryIO, decoder: codecs.IncrementalDecoder) -> bool:
    """Write what the log holds past `fh`'s position to stdout, a chunk at a time; whether
    there was anything."""
    any_text = False
    while chunk := fh.read(CHUNK):
        sys.stdout.write(decoder.decode(chunk))
        any_text = True
    sys.stdout.flush()
    return any_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=int, help="run id")
    parser.add_argument("--db", help="its study database (default: the daemon's only study)")
    parser.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new output until the run ends (waits if queued)",
    )
