"""`mosaic plotloss DB OUT.pdf <selection>`: loss curves of the selected runs, K×K per page.

Sends no request: the curves come from the study's run_epochs table alone, read by the client
on a read-only connection, so it works on a `savedb` copy with no daemon.
"""

from __future__ import annotations

import argparse
import os

from mosaic_client import selection as selections
from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError

NAME = "plotloss"
HELP = "loss curves of the selected runs into a PDF"
EXAMPLE = "mosaic plotloss results.db losses.pdf -id all"


def run(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    if not args.pdf.lower().endswith(".pdf"):
        raise CommandError(
            f"{args.pdf}: plotloss writes a multi-page PDF; end the name with "
            ".pdf (use --png FILE.png for an image of the first page)",
            BAD_INPUT,
        )
    if args.plot_size < 1 or args.plot_size > 10:
        raise CommandError(
            f"-plot_size {args.plot_size}: give 1 to 10 (runs per page side)", BAD_INPUT
        )
    for out in (args.pdf, args.png):
        if out:
            common.out_dir_exists(out)
    selection = common.selection(args)
    conn = common.analysis_db(args.db)
    try:
        with common.refused_as_bad_input(selections.SelectionError):
            run_ids = selections.resolve(conn, selection)
        if not run_ids:
            raise CommandError(
                f"the selection ({selections.describe(selection)}) matches no run "
                f"in {args.db}; nothing was drawn",
                BAD_INPUT,
            )
        runs = analysis.loss_histories(conn, run_ids)
    finally:
        conn.close()
    from mosaic_client import plots

    pages = plots.plot_losses(
        runs, args.pdf, args.plot_size, os.path.basename(args.db), png=args.png
    )
    print(
        f"wrote {pages} page(s), {len(runs)} run(s), to {args.pdf}"
        + (f" (page 1 also as {args.png})" if args.png else "")
    )
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db")
    parser.add_argument("pdf")
    common.add_selection(parser)
    parser.add_argument("-plot_size", "--plot-size", type=int, default=2, dest="plot_size")
    parser.add_argument("--png", metavar="FILE.png", help="also draw the first page as a PNG image")
