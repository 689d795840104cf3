"""`compare` on a tuned study (docs/tuning.md): the final runs only are compared (reading.py
leaves the trials out); this says so, with each family's tuning cost and how its
configuration was selected."""

from __future__ import annotations

from typing import Any

from mosaic_client import analysis, search_report


def tuning_of(db: str) -> list[search_report.Group]:
    conn = analysis.open_readonly(db)
    try:
        return search_report.groups(conn)
    finally:
        conn.close()


def attach(report: Any, found: list[search_report.Group]) -> None:
    """Add `tuned` and `tuning` (new keys of compare --json) and the notes to the report."""
    report.tuned = bool(found)
    report.tuning = [g.as_json() for g in found]


def lines(found: list[search_report.Group]) -> list[str]:
    """What the text report says about a tuned study."""
    if not found:
        return []
    budgets = sorted({g.trials for g in found})
    settings = found[0].settings
    equal = "equal budgets" if len(budgets) == 1 else f"UNEQUAL budgets ({budgets})"
    out = [
        "",
        f"tuned: every family x size was tuned with {equal}: {budgets[0]} {settings['strategy']} "
        f"trial(s) each, selected on {settings['metric']} ({settings['direction']}); the "
        "verdicts compare the final runs only, on fresh seeds no trial used",
    ]
    if not settings["metric"].startswith("val_"):
        out.append(
            f"  selection used {settings['metric']} on the tuning seeds (no validation loader): "
            "the final runs never use those seeds"
        )
    for g in found:
        best = "none yet" if g.best is None else f"{g.best:.4g} (trial {g.best_trial})"
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in g.best_values.items())
        out.append(
            f"  {g.data_key} {g.family}: {g.finished}/{g.trials} trials, {g.pruned} pruned, "
            f"{g.failed} failed, {g.slot_hours:.4f} slot-hours; best {best}"
            + (f": {chosen}" if chosen else "")
            + f"; final runs {g.finals_done}/{g.finals}"
        )
    return out


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
