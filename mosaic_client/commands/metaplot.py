"""`mosaic metaplot DB OUT DATASET_KEY CRITERION [--x COLUMN]`: a criterion against nb_params
(or another size column, --x), per model key.

Sends no request: the points are read by the client from the study on a read-only connection.
"""

from __future__ import annotations

import argparse
import json
import sys

from mosaic_client import contract
from mosaic_client.commands import common
from mosaic_client.commands.common import OK

NAME = "metaplot"
HELP = "a criterion against nb_params, per model key"
EXAMPLE = "mosaic metaplot results.db meta.png data_dataset_OR test_loss"


def run(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    with common.refused_as_bad_input(analysis.AnalysisError):
        analysis.check_criterion(args.criterion)
        fmt = analysis.plot_format(args.out)
    common.out_dir_exists(args.out)
    conn = common.analysis_db(args.db)
    try:
        with common.refused_as_bad_input(analysis.AnalysisError):
            data = analysis.metaplot_data(
                conn, args.dataset_key, args.criterion, ci=args.spread == "ci", x=args.x
            )
    finally:
        conn.close()
    note = data.skipped_note()
    if note:
        print(f"note: {note}", file=sys.stderr)
    from mosaic_client import plots

    plots.plot_meta(data, args.out, args.spread, fmt)
    if args.data:
        with open(args.data, "w") as fh:
            json.dump(data.as_json(), fh, indent=1)
    points = sum(len(p) for p in data.series.values())
    print(
        f"wrote {args.out}: {args.criterion} of {data.used} run(s) as {points} point(s) on "
        f"{len(data.series)} model key(s)" + (f"; data in {args.data}" if args.data else "")
    )
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db")
    parser.add_argument("out")
    parser.add_argument("dataset_key")
    parser.add_argument(
        "criterion",
        help=", ".join(contract.RESULT_COLUMNS[:-1]) + " or " + contract.RESULT_COLUMNS[-1],
    )
    parser.add_argument(
        "--spread",
        choices=["minmax", "std"],
        default="minmax",
        help="error bars: min to max over runs (default) or standard deviation",
    )
    parser.add_argument(
        "--ci",
        action="store_const",
        const="ci",
        dest="spread",
        help="bars: 95%% t interval of each mean instead",
    )
    parser.add_argument("--data", metavar="OUT.json", help="also write the plotted points as JSON")
    parser.add_argument(
        "--x",
        default="nb_params",
        metavar="COLUMN",
        help="run_results column on the x axis (default nb_params; log scale): "
        + ", ".join(contract.SIZE_COLUMNS)
        + ", or a short name such as flops, latency, peak_memory (docs/resources.md)",
    )
