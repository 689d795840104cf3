"""`mosaic status`: the daemon's workers, queue and runs (`--watch`: a live view), and the
progress of each search of a tuned study (read from the study, read-only: docs/tuning.md).

Sends `status` (once, or once per interval with `--watch`, see mosaic_client/watch.py).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mosaic_client import render
from mosaic_client.commands import common
from mosaic_client.commands.common import OK

NAME = "status"
HELP = "the daemon's state: workers, queue, runs"
EXAMPLE = "mosaic status"


def run(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"limit": args.limit, "mine": args.mine}
    if args.users:
        fields["users"] = True
    if args.db:
        fields["db"] = common.existing_db(args.db)
    if args.watch:
        # Imported here: termios and the live view are for --watch only.
        from mosaic_client.watch import watch

        return watch(args, fields)
    status = common.call(args, "status", **fields)
    searches = _searches(status)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        text = render.status_text(status, args.limit)
        for db, lines in searches.items():
            # Under the study's line: its searches' progress.
            head = f"study {db}:"
            at = text.find(head)
            if at >= 0:
                end = text.find("\n", at)
                end = len(text) if end < 0 else end
                text = text[:end] + "\n" + "\n".join(lines) + text[end:]
        print(text)
        if args.users:
            print("\n" + render.users_text(status.get("users", [])))
    return OK


def _searches(status: dict[str, Any]) -> dict[str, list[str]]:
    """Each shown study's searches (docs/tuning.md): its lines for the text, and a new
    "searches" key of the study in --json."""
    from mosaic_client import search_report

    found: dict[str, list[str]] = {}
    for study in status.get("studies", []):
        groups = search_report.of_study(study["db"]) if study.get("db") else []
        if groups:
            study["searches"] = [g.as_json() for g in groups]
            found[study["db"]] = [search_report.progress_line(g) for g in groups]
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", help="only this study")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="live view, redrawn every --interval seconds (q or Ctrl-C quits); "
        "not on a terminal: plain text each interval until no run is left",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="--watch refresh in seconds")
    parser.add_argument("--limit", type=int, default=10, help="latest done/failed runs shown")
    parser.add_argument("--mine", action="store_true", help="only my runs")
    parser.add_argument(
        "--users",
        action="store_true",
        help="every user's running and queued runs, usage and fair share (shared daemon)",
    )
