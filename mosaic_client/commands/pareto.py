"""`mosaic pareto DB [OUT] --metric M --cost COLUMN [--json]`: the configuration groups best for
what they cost, as a table, and as a picture when OUT is given (docs/resources.md).

Sends no request: it reads the study on a read-only connection. A point is dominated only when
`compare`'s test (with its Holm correction over every pair tested) says a point costing no more
is better (mosaic_client/verdict/pareto.py). Exit 0, 2 for input it cannot use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mosaic_client import contract
from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError
from mosaic_client.render import fmt

NAME = "pareto"
HELP = "the Pareto front of a metric against a cost (FLOPs, latency, memory, ...)"
EXAMPLE = "mosaic pareto results.db front.png --metric test_acc --cost flops"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="study database (read only)")
    parser.add_argument(
        "out", nargs="?", help="also draw the front into this image (.png, .svg, .pdf)"
    )
    parser.add_argument(
        "--metric", default="test_loss", help="run_results column compared (default test_loss)"
    )
    parser.add_argument(
        "--cost",
        required=True,
        metavar="COLUMN",
        help="run_results column of the cost: "
        + ", ".join(contract.SIZE_COLUMNS)
        + ", or a short name such as flops, latency, peak_memory, energy",
    )
    parser.add_argument(
        "--data",
        metavar="KEY",
        action="append",
        help="dataset key (repeatable; default: every key)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="family-wise error rate of the dominance tests (Holm), default 0.05",
    )
    parser.add_argument(
        "--exclude-failures",
        action="store_true",
        help="compare finished runs only (default: a failed run counts as a loss, as compare)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    if not 0 < args.alpha < 1:
        raise CommandError(
            f"--alpha {args.alpha}: give a level between 0 and 1, e.g. 0.05", BAD_INPUT
        )
    with common.refused_as_bad_input(analysis.AnalysisError):
        analysis.check_criterion(args.metric)
        fmt_out = analysis.plot_format(args.out) if args.out else None
    try:
        args.cost = contract.size_column(args.cost)
    except ValueError as exc:
        raise CommandError(f"--cost {exc}", BAD_INPUT) from None
    if args.out:
        common.out_dir_exists(args.out)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")  # thin matrix products (as compare)
    from mosaic_client.verdict import pareto, reading

    conn = common.analysis_db(args.db)
    try:
        with common.refused_as_bad_input(analysis.AnalysisError, reading.VerdictError):
            values = reading.study_values(conn, args.metric, args.cost)
    finally:
        conn.close()
    front = pareto.pareto(
        values, args.db, args.alpha, args.data, failures_as_losses=not args.exclude_failures
    )
    if not front.points:
        raise CommandError(
            f"no finished run with a {args.metric} and a positive {args.cost} to place"
            + (f" on {', '.join(args.data)}" if args.data else "")
            + "; wait for runs to finish or pick another --cost",
            BAD_INPUT,
        )
    if args.out:
        from mosaic_client import plots

        plots.plot_pareto(front, args.out, fmt_out or "png")
    if args.json:
        sys.stdout.write(json.dumps(front.as_json(), indent=1) + "\n")
    else:
        sys.stdout.write(render(front))
        if args.out:
            print(f"wrote {args.out}")
    return OK


def _cost(value: Any) -> str:
    return "-" if value is None else (f"{value:.4g}" if value < 1000 else f"{value:.0f}")


def render(front: Any) -> str:
    """The front as a table per dataset key, then which family holds it per cost range."""
    unit = contract.RESOURCE_UNITS.get(front.cost, front.cost)
    out = [
        f"pareto {front.metric} ({front.better} is better) against {front.cost} ({unit}; "
        f"{front.cost_better} is better) in {front.db}: {len(front.points)} point(s), "
        f"{front.comparisons} comparison(s), alpha {front.alpha:g} family-wise (Holm)"
    ]
    header = ("family", "cost", "n", "mean [95% CI]", "front", "dominated by (p adj)")
    for key in sorted({p.dataset_key for p in front.points}):
        points = sorted(
            (p for p in front.points if p.dataset_key == key),
            key=lambda p: (p.cost, p.family),
        )
        rows = [header]
        for p in points:
            by = ", ".join(
                f"{d['family']} {_cost(d['cost'])} ({fmt(d['p_adjusted'], '.2g')})"
                for d in p.dominated_by
            )
            where = "yes" if p.on_front else "no"
            if p.on_front and p.dominated_by_means:
                where = "yes*"
            interval = f"{fmt(p.mean)} [{fmt(p.ci[0])}, {fmt(p.ci[1])}]"
            rows.append((p.family, _cost(p.cost), str(p.n), interval, where, by))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        out.append("")
        out.append(f"{key}:")
        for r in rows:
            out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        ranges = [r for r in front.ranges if r["dataset_key"] == key]
        if ranges:
            out.append(f"  best affordable on the front, by {front.cost} budget:")
            for r in ranges:
                upto = f"below {_cost(r['to'])}" if r["to"] is not None else "and above"
                if front.cost_better != "lower":
                    upto = f"above {_cost(r['to'])}" if r["to"] is not None else "and below"
                out.append(
                    f"    {_cost(r['from'])} {upto}: {r['family']} "
                    f"(at {_cost(r['cost'])}, mean {fmt(r['mean'])})"
                )
    out.append("")
    out.append(
        "front: yes = no point costing no more is better by compare's test; yes* = on the front "
        "although a cheaper point has a better mean (the difference is not decided: more "
        "repetitions may settle it)"
    )
    for note in front.notes:
        out.append(f"note: {note}")
    return "\n".join(out) + "\n"
