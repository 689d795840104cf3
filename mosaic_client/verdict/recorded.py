"""The sequential plans kept in a study: what `compare --until-decided` records at its end (the
`record_plan` request; table sequential_plans), and what a later plain `compare` does with
them. A plan spent part of alpha on its looks; testing its lines again at full alpha would add
a second chance of a false decision (in simulation, 5 % becomes about 8 %). So a line that a
recorded plan covers (same metric, dataset key, both families in the plan) is tested at the
*remaining* level alpha - spent (a union bound: the plan's false decisions and the later test's
together stay within alpha); a line the plan decided keeps its verdict; when nothing remains,
the plan's verdict stands. docs/compare.md, "The recorded plan"."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from mosaic_client.verdict.comparison import DECIDED, NO_DIFFERENCE, Line, Report, compare

METHOD = (
    "group-sequential: Lan-DeMets {spending}-type alpha spending, R = {r}, boundaries by "
    "numerical integration (Armitage-McPherson-Rowe); each look tests at the nominal level of "
    "its boundary"
)
NOTHING_LEFT = 1e-12  # a remaining level below this: nothing remains


def plan_records(
    plan: Any, looks: Sequence[tuple[int, float, Any]], report: Report
) -> list[dict[str, Any]]:
    """The `record_plan` payloads of a finished (or interrupted) plan: one per dataset key of
    the last look's report, with its families, the alpha the plan spent, its looks and the
    verdict of each line (its key, as Line.key)."""
    by_key: dict[str, list[Line]] = {}
    for line in report.lines:
        by_key.setdefault(line.dataset_key, []).append(line)
    shared = [
        {"repetitions": int(n), "level": float(level), "runs_added": sum(k for _, k in d.additions)}
        for n, level, d in looks
    ]
    method = METHOD.format(spending=plan.spending, r=plan.max_repetitions)
    return [
        {
            "metric": report.metric,
            "data_key": key,
            "families": sorted({f for line in lines for f in (line.a, line.b)}),
            "alpha": float(plan.alpha),
            "spent": float(min(plan.spent(), plan.alpha)),
            "looks": shared,
            "verdicts": [
                {"key": list(line.key), "verdict": line.verdict, "p_value": _finite(line.p_value)}
                for line in lines
            ],
            "method": method,
        }
        for key, lines in sorted(by_key.items())
    ]


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def covers(plan: dict[str, Any], line: Line) -> bool:
    return line.dataset_key == plan["data_key"] and {line.a, line.b} <= set(plan["families"])


def remaining_level(alpha: float, plans: Sequence[dict[str, Any]]) -> float:
    """The level left for a line after the plans that cover it: alpha minus what they spent
    (0 when what is left is rounding)."""
    left = alpha - sum(float(p["spent"]) for p in plans)
    return left if left > NOTHING_LEFT else 0.0


def overlapping(
    plans: Sequence[dict[str, Any]], data_keys: Sequence[str] | None, families: Sequence[str] | None
) -> list[dict[str, Any]]:
    """The recorded plans with lines that a new plan over these dataset keys and families (None:
    every one) could test again: its alpha must leave out what they spent."""
    return [
        p
        for p in plans
        if (not data_keys or p["data_key"] in data_keys)
        and (not families or len(set(p["families"]) & set(families)) >= 2)
    ]


def _settled(line: Line, plans: list[dict[str, Any]], exhausted: bool) -> Line | None:
    """The line as the plans left it, when a plan's verdict stands: the plan decided it, or no
    alpha remains (then a line the plan did not decide is 'no detectable difference')."""
    found = [
        v
        for p in plans
        for v in p["verdicts"]
        if isinstance(v, dict) and v.get("key") == list(line.key)
    ]
    decided = next((v["verdict"] for v in reversed(found) if v.get("verdict") in DECIDED), None)
    if decided is None and not exhausted:
        return None
    ids = ", ".join(str(p["plan_id"]) for p in plans)
    if decided is not None:
        why = f"decided by the recorded sequential plan {ids}: its verdict stands"
    else:
        decided = NO_DIFFERENCE
        why = f"the recorded sequential plan {ids} spent all of alpha: its verdict stands"
    note = f"{line.note}; {why}" if line.note else why
    return dataclasses.replace(line, verdict=decided, p_holm=None, decided_by="plan", note=note)


def compare_after_plans(
    values: Any, db: str, plans: Sequence[dict[str, Any]], alpha: float, **options: Any
) -> Report:
    """`compare` of a study with recorded plans: the lines they cover are tested at the level
    that remains (the report's level is the smallest of them, which only makes the others
    stricter), or keep the plan's verdict; `report.plans` says which plan covered what."""
    first = compare(values, db, alpha=alpha, **options)
    if not plans:
        return first
    settled: dict[tuple[str, ...], Line] = {}
    levels, used = [alpha], {}
    for line in first.lines:
        mine = [p for p in plans if covers(p, line)]
        if not mine:
            continue
        left = remaining_level(alpha, mine)
        for p in mine:
            used.setdefault(p["plan_id"], (p, []))[1].append(list(line.key))
        kept = _settled(line, mine, left <= NOTHING_LEFT)
        if kept is not None:
            settled[line.key] = kept
        elif left > NOTHING_LEFT:
            levels.append(left)
    if not used:
        return first
    level = min(levels)
    report = compare(values, db, alpha=level, settled=settled or None, **options)
    report.plans = [
        {
            **{k: p[k] for k in ("plan_id", "recorded_at", "data_key", "families", "alpha")},
            **{k: p[k] for k in ("spent", "looks", "method")},
            "remaining": remaining_level(alpha, [p]),
            "lines": keys,
        }
        for p, keys in used.values()
    ]
    report.notes.append(
        f"{len(used)} recorded sequential plan(s) covered {sum(len(k) for _, k in used.values())}"
        f" line(s): they spent alpha already, so this report tests at {level:.3g} (alpha "
        f"{alpha:g} minus what they spent: a union bound keeps the false decisions of the plans"
        " and of this report within alpha); a line a plan decided keeps its verdict"
    )
    return report
