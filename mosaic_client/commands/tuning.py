"""`mosaic tuning DB [OUT.png]`: each search of a tuned study (docs/tuning.md): its trials,
their cost, the best so far and the configuration it selected; with OUT.png, the equal-effort
curves (the best so far against the trials, per family x size) and each searched param's
importance per family.

Sends no request: it reads the study on a read-only connection (a live study or a `savedb`
copy), and imports matplotlib only to draw.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mosaic_client.commands import common
from mosaic_client.commands.common import BAD_INPUT, OK, CommandError

NAME = "tuning"
HELP = "a tuned study's searches: trials, cost, best so far; plots of them"
EXAMPLE = "mosaic tuning tuned.db tuning.png"


def run(args: argparse.Namespace) -> int:
    from mosaic_client import search_report

    conn = common.analysis_db(args.db)
    try:
        groups = search_report.groups(conn)
    finally:
        conn.close()
    if not groups:
        raise CommandError(
            f"{args.db} has no search: it was not run with a [SEARCH] section (docs/tuning.md)",
            BAD_INPUT,
        )
    if args.out:
        if not args.out.lower().endswith(".png"):
            raise CommandError(f"{args.out}: tuning draws a PNG image; end the name with .png")
        common.out_dir_exists(args.out)
    rows = [_row(g, search_report.importance(g.points)) for g in groups]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_text(groups, rows))
    if args.out:
        from mosaic_client import plots

        plots.plot_tuning(groups, [r["importance"] for r in rows], args.out)
        print(f"wrote the best-so-far curves and the importances to {args.out}")
    return OK


def _row(group: Any, importance: dict[str, float]) -> dict[str, Any]:
    return {
        **group.as_json(),
        "curve": [list(point) for point in group.curve],
        "importance": importance,
    }


def _text(groups: list[Any], rows: list[dict[str, Any]]) -> str:
    settings = groups[0].settings
    out = [
        f"{len(groups)} search group(s): {settings['strategy']}, {settings['trials']} trial(s) "
        f"each, selected on {settings['metric']} ({settings['direction']}), pruning "
        f"{settings['pruning']}, {settings['final_repetitions']} final run(s) each"
    ]
    for group, row in zip(groups, rows):
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in group.best_values.items()) or "-"
        best = "-" if group.best is None else f"{group.best:.4g} (trial {group.best_trial})"
        weights = ", ".join(f"{k} {v:.2f}" for k, v in row["importance"].items()) or "-"
        out += [
            "",
            f"{group.data_key} {group.family}"
            + (f" ({group.nb_params} parameters)" if group.nb_params else ""),
            f"  trials {group.finished}/{group.trials}: {group.pruned} pruned, {group.failed} "
            f"failed; {group.slot_hours:.4f} slot-hours",
            f"  best {settings['metric']} {best}: {chosen}",
            "  best so far: "
            + " ".join("-" if b is None else f"{b:.3g}" for _, _, b in group.curve),
            f"  importance (share of the metric's spread, docs/tuning.md): {weights}",
            f"  final runs {group.finals_done}/{group.finals} on seeds "
            f"{_seeds(group.final_seeds)} (trials: {_seeds(group.trial_seeds)})",
        ]
    return "\n".join(out)


def _seeds(seeds: list[int]) -> str:
    ordered = sorted(set(seeds))
    if not ordered:
        return "-"
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 2:
        return f"{ordered[0]}..{ordered[-1]}"
    return ",".join(str(s) for s in ordered)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="a study run with a [SEARCH] section (read only)")
    parser.add_argument("out", nargs="?", help="draw the curves and importances into this PNG")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
