"""`mosaic run CONFIG DB`: validate, expand and queue every pipeline of CONFIG.

Sends `ping` (starting a daemon when none answers), then `submit`; with `--follow`, `status`
until every run of the submission has ended.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mosaic_client import contract, render
from mosaic_client.commands import common
from mosaic_client.commands.common import FAILED, INTERRUPTED, OK

NAME = "run"
HELP = "validate, expand and queue every pipeline of CONFIG into DB"
EXAMPLE = "mosaic run examples/or_mlp/config.ini results.db --follow"


def run(args: argparse.Namespace) -> int:
    expanded = common.load_config(args.config)
    db = common.resolve_db(args.db, os.path.dirname(expanded.config_path))
    common.ensure_daemon(args)
    reply = common.call(
        args,
        "submit",
        # The daemon takes a big submission in steps between other requests (about 3 ms a
        # run on a 2-core machine): its reply comes once all of it is queued.
        timeout=60.0 + 0.01 * len(expanded.pipelines),
        db=db,
        config_path=expanded.config_path,
        process=expanded.process,
        monitor=expanded.monitor,
        pipelines=expanded.pipelines,
        **({"priority": args.priority} if args.priority else {}),
        **({"search": expanded.search} if expanded.search is not None else {}),
    )
    ids = reply["run_ids"]
    span = f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    print(f"queued {len(ids)} pipeline(s) as runs {span} in {db}")
    if expanded.search is not None:
        search = expanded.search
        print(
            f"a tuned comparison of {len(expanded.pipelines)} family x size group(s): "
            f"{search['trials']} {search['strategy']} trial(s) each, then its best "
            f"configuration on {search['final_repetitions']} fresh seed(s) (docs/tuning.md)"
        )
    if reply.get("paused"):
        print(
            "note: paused (the daemon, or your own submissions): they start after `mosaic resume`"
        )
    if not args.follow:
        print("watch them with `mosaic status` (or `mosaic status --watch`)")
        return OK
    return follow(args, db, reply["submission_id"], ids)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the study's INI file (docs/configuration.md)")
    parser.add_argument("db", help="study database: created if missing, else the runs are added")
    parser.add_argument("--follow", action="store_true", help="show progress until all runs end")
    parser.add_argument(
        "--priority",
        type=int,
        default=0,
        help="order among your own queued runs: higher first (default 0; `mosaic priority`)",
    )
    common.add_autostart(parser)


def follow(args: argparse.Namespace, db: str, submission_id: int, ids: list[int]) -> int:
    """Redraw one progress line until every run of the submission has ended."""
    tty = sys.stderr.isatty()
    started = time.monotonic()
    last_line = ""
    total, mine = len(ids), set(ids)
    eta: render.Eta | None = None
    try:
        with common.client(args) as client:
            while True:
                status = client.request("status", db=db, limit=0, submission=submission_id)
                counts = status.get("submission_counts") or {}
                done, failed = counts.get(contract.DONE, 0), counts.get(contract.FAILED, 0)
                cancelled = counts.get(contract.CANCELLED, 0)
                finished = done + failed + cancelled
                # The running runs of this submission, by the share of their epochs done.
                fractions = [
                    run["epoch"] / run["epochs"]
                    for study in status.get("studies", [])
                    for run in study.get("running", [])
                    if run["run_id"] in mine and run.get("epochs")
                ]
                eta = render.next_eta(eta, time.monotonic() - started, finished, total, fractions)
                line = render.progress_line(
                    done,
                    failed,
                    cancelled,
                    counts.get(contract.RUNNING, 0),
                    total,
                    status.get("paused", False),
                    eta.seconds,
                )
                if tty:
                    print("\r" + line.ljust(len(last_line)), end="", file=sys.stderr, flush=True)
                elif line != last_line:
                    print(line, file=sys.stderr, flush=True)
                last_line = line
                if finished >= total:
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nmosaic: stopped following; the runs go on (`mosaic status`)", file=sys.stderr)
        return INTERRUPTED
    if tty:
        print(file=sys.stderr)
    print(f"finished: {done} done, {failed} failed, {cancelled} cancelled")
    return OK if failed == 0 else FAILED
