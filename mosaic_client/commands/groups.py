"""`mosaic groups`: the configuration groups of a study (runs that differ only by repetition),
read from the study's run_groups view (mosaicd/storage/store.py creates it).

Sends no request: reads the study read-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from typing import Any

from mosaic_client.commands.common import BAD_INPUT, CommandError

NAME = "groups"
HELP = "configuration groups: runs that differ only by seed, with n, mean, sd, median"
EXAMPLE = "mosaic groups results.db"
SHOWN = ("test_loss", "test_acc")  # the table's columns; --json has every run_results column


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="study database (read only)")
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output, with every run_results column"
    )


def read_groups(conn: sqlite3.Connection, db: str) -> list[dict[str, Any]]:
    from mosaic_client import study_reading
    from mosaic_client.analysis import AnalysisError

    groups = study_reading.run_groups(conn)
    if groups is None:
        raise AnalysisError(
            f"{db} has no run_groups view: an older mosaicd wrote it. Let the current daemon "
            f"open it once (for instance `mosaic show 1 --db {db}`), then run this again"
        )
    return groups


def run(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    try:
        conn = analysis.open_readonly(os.path.abspath(args.db))
        try:
            groups = read_groups(conn, args.db)
        finally:
            conn.close()
    except analysis.AnalysisError as exc:
        raise CommandError(str(exc), BAD_INPUT) from None
    if args.json:
        sys.stdout.write(json.dumps(groups, indent=1) + "\n")
        return 0
    sys.stdout.write(render(groups, args.db))
    return 0


def _stat(group: dict[str, Any], column: str) -> str:
    mean, sd, median = (group.get(f"{s}_{column}") for s in ("mean", "sd", "median"))
    if mean is None:
        return "-"
    text = f"{mean:.4g}"
    if sd is not None:
        text += f" ± {sd:.2g}"
    return text + f" (med {median:.4g})"


def render(groups: list[dict[str, Any]], db: str) -> str:
    if not groups:
        return f"{db} has no run yet\n"
    header = (
        "group",
        "dataset key",
        "model key",
        "nb_params",
        "runs",
        "n",
        *(f"{c}: mean ± sd (median)" for c in SHOWN),
    )
    rows = [header]
    for g in groups:
        rows.append(
            (
                str(g["group_id"]),
                str(g["dataset_key"]),
                str(g["model_key"]),
                "-" if g["nb_params"] is None else str(g["nb_params"]),
                str(g["runs"]),
                str(g["n"]),
                *(_stat(g, c) for c in SHOWN),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(
        f"{len(groups)} group(s); n counts finished runs with results; --json gives "
        "mean, sd and median of every run_results column"
    )
    return "\n".join(lines) + "\n"
