"""The Pareto front of `mosaic pareto` (issue 26, docs/resources.md): which configuration groups
are best for what they cost.

A *point* is a Side of :func:`reading.study_values` with the cost column as its size: the runs
of one family at one cost (a configuration's median cost), with their mean metric and its 95% t
interval. A point is *dominated* only when the verdict says so: another point that costs no more
is better by the same test and correction as `mosaic compare` (comparison.size_lines, then one
Holm step-down over every pair tested: comparison.decide). Point estimates alone would call a
point dominated by noise; here an undecided comparison leaves both on the front.

Which family holds the front in each cost range: for a budget between two consecutive costs of
the front, the front point affordable with the best mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import contract
from mosaic_client.verdict.comparison import A_BETTER, B_BETTER, Line, decide, size_lines
from mosaic_client.verdict.reading import HIGHER, LOWER, Side, StudyValues, direction
from mosaic_client.verdict.statistics import mean_ci


@dataclass
class Point:
    dataset_key: str
    family: str
    cost: float
    n: int
    failed: int
    mean: float
    ci: list[float]
    run_ids: list[int]
    on_front: bool = True
    dominated_by: list[dict[str, Any]] = field(default_factory=list)
    dominated_by_means: bool = False  # what point estimates alone would say

    def as_json(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["mean"] = None if not math.isfinite(self.mean) else self.mean
        return out


@dataclass
class Front:
    db: str
    metric: str
    cost: str
    better: str  # the metric's direction
    cost_better: str  # "lower" but for a throughput
    alpha: float
    points: list[Point]
    ranges: list[dict[str, Any]]
    comparisons: int
    notes: list[str]

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "points"}
        out["cost_unit"] = contract.RESOURCE_UNITS.get(self.cost, self.cost)
        out["points"] = [p.as_json() for p in self.points]
        return out


def _cheaper(q: Point, p: Point, cost_better: str) -> bool:
    """Whether q costs no more than p."""
    return q.cost <= p.cost if cost_better == LOWER else q.cost >= p.cost


def _better_mean(x: float, y: float, better: str) -> bool:
    return x > y if better == HIGHER else x < y


def _pairs(
    points: list[tuple[Point, Side]], cost_better: str
) -> list[tuple[tuple[Point, Side], tuple[Point, Side]]]:
    """Each pair (q, p) of one dataset key with q costing no more than p; equal costs once."""
    found = []
    for i, q in enumerate(points):
        for j, p in enumerate(points):
            if i == j or q[0].dataset_key != p[0].dataset_key:
                continue
            if not _cheaper(q[0], p[0], cost_better):
                continue
            if q[0].cost == p[0].cost and j < i:
                continue
            found.append((q, p))
    return found


def cost_ranges(points: Sequence[Point], better: str, cost_better: str) -> list[dict[str, Any]]:
    """For each dataset key, the family whose front point is best (by its mean) among those a
    budget affords, for each range of budgets between consecutive front costs."""
    ranges: list[dict[str, Any]] = []
    keys = sorted({p.dataset_key for p in points})
    for key in keys:
        front = [p for p in points if p.dataset_key == key and p.on_front and math.isfinite(p.mean)]
        front.sort(key=lambda p: p.cost, reverse=cost_better == "higher")
        best: Point | None = None
        for i, point in enumerate(front):
            if best is None or _better_mean(point.mean, best.mean, better):
                best = point
                # The range ends where a dearer front point first beats this one.
                nxt = next(
                    (r for r in front[i + 1 :] if _better_mean(r.mean, best.mean, better)), None
                )
                upto = nxt.cost if nxt is not None else None
                ranges.append(
                    {
                        "dataset_key": key,
                        "from": point.cost,
                        "to": upto,
                        "family": point.family,
                        "cost": point.cost,
                        "mean": point.mean,
                    }
                )
    return ranges


def pareto(
    values: StudyValues,
    db: str,
    alpha: float = 0.05,
    data_keys: Sequence[str] | None = None,
    failures_as_losses: bool = True,
) -> Front:
    """The front of every dataset key of `values` (sized by the cost column)."""
    better = direction(values.metric)
    cost = values.size_by
    cost_better = "higher" if cost in contract.MORE_IS_BETTER else LOWER
    notes: list[str] = []
    points: list[tuple[Point, Side]] = []
    for key, families in sorted(values.sides.items()):
        if data_keys and key not in data_keys:
            continue
        for family, sides in sorted(families.items()):
            for size, side in sorted(sides.items()):
                if not side.values:
                    notes.append(f"{key}: {family} at {size:g}: every run failed; not placed")
                    continue
                low, high = mean_ci(side.values)
                point = Point(
                    key, family, float(size), len(side.values), side.failures, side.mean,
                    [low, high], list(side.run_ids),
                )  # fmt: skip
                points.append((point, side))
    pairs = _pairs(points, cost_better)
    lines: list[Line] = []
    for key in sorted({q[0].dataset_key for q, _ in pairs}):
        some = [(q[1], p[1]) for q, p in pairs if q[0].dataset_key == key]
        lines.extend(size_lines(some, key, better, 0, failures_as_losses))
    if lines:
        decide(lines, alpha, better)
    for (q, p), line in zip(pairs, lines):
        dominated, by = (p[0], q[0]) if line.verdict == A_BETTER else (q[0], p[0])
        if line.verdict not in (A_BETTER, B_BETTER):
            continue
        if line.verdict == B_BETTER and q[0].cost != p[0].cost:
            continue  # the dearer one is better: both stay on the front
        dominated.on_front = False
        dominated.dominated_by.append(
            {"family": by.family, "cost": by.cost, "p_adjusted": line.p_holm, "test": line.test}
        )
    for point, _ in points:
        point.dominated_by_means = any(
            other is not point
            and other.dataset_key == point.dataset_key
            and _cheaper(other, point, cost_better)
            and _better_mean(other.mean, point.mean, better)
            for other, _ in points
        )
    front_points = [p for p, _ in points]
    if values.skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(values.skipped.items()))
        notes.append(f"left out {sum(values.skipped.values())} run(s): {reasons}")
    return Front(
        db, values.metric, cost, better, cost_better, alpha, front_points,
        cost_ranges(front_points, better, cost_better), len(lines), notes,
    )  # fmt: skip
