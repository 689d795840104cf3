"""`mosaic repeat DB --add N <selection> [--follow]`: N more repetitions of the selected groups.

Sends `repeat`; with --follow, `status` until the new runs end. A configuration group is the
runs that differ only by their repetition (seed): `mosaic groups DB` lists them. Each group of
a selected run gets N new runs, with the params of its runs but new seeds: a group whose seeds
are s0..s0+k-1 gets s0+k..s0+k+N-1 (random seeds when the config gave no PROCESS seed). The
runs already there are not touched. This is how to follow the "repetitions needed" advice of
`mosaic compare` (docs/compare.md).
"""

from __future__ import annotations

import argparse

from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, FAILED, OK, CommandError
from mosaic_client.contract import MAX_REPETITIONS_ADDED
from mosaic_client.protocol import RepeatReply

NAME = "repeat"
HELP = "queue N more repetitions (new seeds) of the selected configuration groups"
EXAMPLE = "mosaic repeat results.db --add 4 -id all"


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.add <= MAX_REPETITIONS_ADDED:
        raise CommandError(
            f"--add {args.add}: give how many more repetitions each group gets, "
            f"from 1 to {MAX_REPETITIONS_ADDED}",
            BAD_INPUT,
        )
    db = common.existing_db(args.db)
    reply = common.call(args, "repeat", db=db, selection=common.selection(args), add=args.add)
    if not reply["selected"]:
        raise common.matched_nothing(args, "nothing was queued")
    print(render(reply, args.follow))
    if not args.follow:
        return OK
    counts = common.wait_for_submissions(args, db, reply["submission_ids"])
    done, failed = counts.get("done", 0), counts.get("failed", 0)
    print(f"finished: {done} done, {failed} failed, {counts.get('cancelled', 0)} cancelled")
    return OK if failed == 0 else FAILED


def render(reply: RepeatReply, follow: bool = False) -> str:
    groups = reply["groups"]
    lines = [f"queued {len(reply['run_ids'])} run(s) in {len(groups)} group(s) of {reply['db']}:"]
    for group in groups:
        lines.append(
            f"  group of run {group['first_run']} ({group['runs']} run(s) before): new runs "
            f"{common.span(group['run_ids'])}, seeds {common.span(group['seeds'])}"
        )
    if reply["paused"]:
        lines.append("they wait for `mosaic resume`: a pause holds them")
    if not follow:
        lines.append(f"follow them with `mosaic status --db {reply['db']}`")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="the study database")
    parser.add_argument(
        "--add",
        type=int,
        required=True,
        metavar="N",
        help="how many more repetitions each selected group gets",
    )
    common.add_selection(parser)
    parser.add_argument("--follow", action="store_true", help="wait until the new runs have ended")
