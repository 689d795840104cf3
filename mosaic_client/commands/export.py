"""`mosaic export DB [OUT] [--format csv|json]`: one row per run with params and results.

Sends no request: the table is read by the client from the study on a read-only connection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mosaic_client.commands import common
from mosaic_client.commands.common import OK

NAME = "export"
HELP = "one row per run with params and results"
EXAMPLE = "mosaic export results.db --format csv results.csv"


class _FormatThenOut(argparse.Action):
    """`--format json OUT`: argparse fills an optional positional before the options, so OUT
    written after `--format` would be refused; this takes it as OUT."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        fmt, *rest = values
        if fmt not in ("csv", "json"):
            parser.error(f"argument --format: invalid choice {fmt!r} (choose csv or json)")
        if len(rest) > 1 or (rest and namespace.out):
            parser.error("give at most one output file")
        namespace.format = fmt
        if rest:
            namespace.out = rest[0]


def run(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    if args.format is None:
        args.format = "json" if (args.out or "").lower().endswith(".json") else "csv"
    if args.out:
        common.out_dir_exists(args.out)
    conn = common.analysis_db(args.db)
    try:
        columns, rows = analysis.export_table(conn)
    finally:
        conn.close()
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        if args.format == "json":
            json.dump([dict(zip(columns, row)) for row in rows], out, indent=1)
            out.write("\n")
        else:
            import csv

            writer = csv.writer(out)
            writer.writerow(columns)
            writer.writerows(rows)
    except BrokenPipeError:
        # `mosaic export DB | head` is a normal use; the reader left, nothing went wrong.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"wrote {len(rows)} run(s), {len(columns)} column(s), to {args.out}")
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db")
    parser.add_argument("out", nargs="?", help="output file (default: stdout)")
    parser.add_argument(
        "--format",
        nargs="+",
        action=_FormatThenOut,
        metavar="{csv,json}",
        help="csv or json (default: from OUT's extension, else csv)",
    )
