"""`mosaic compare --until-decided`: the sequential plan (alpha spent over the looks, Lan-DeMets)
and the loop that looks, picks the groups to repeat, waits for their runs and looks again."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mosaic_client.verdict.comparison import A_BETTER, B_BETTER, Line, Report, compare
from mosaic_client.verdict.reading import Side, StudyValues, VerdictError


def spent_alpha(fraction: float, alpha: float, kind: str = "obrien-fleming") -> float:
    """The Lan-DeMets alpha-spending function: the error budget used up by information
    fraction t = repetitions now / maximum repetitions (0 at t=0, alpha at t=1)."""
    from scipy import special

    t = min(max(fraction, 0.0), 1.0)
    if t == 0:
        return 0.0
    if kind == "obrien-fleming":
        return float(2 * special.ndtr(special.ndtri(alpha / 2) / math.sqrt(t)))
    if kind == "pocock":
        return float(alpha * math.log(1 + (math.e - 1) * t))
    raise ValueError(f"unknown spending function {kind!r}; use obrien-fleming or pocock")


@dataclass
class SequentialPlan:
    """`compare --until-decided`: test after each round of new repetitions at the level the
    spending function releases for that round; stop a line once decided.

    Looking after every round would inflate false decisions; spending alpha over the looks and
    testing look k at alpha(t_k) - alpha(t_{k-1}) keeps the probability of any false decision
    over all looks <= sum of the levels = alpha(1) = alpha, by the union bound, whatever the
    dependence between looks and whatever valid test is used (conservative, never anti-
    conservative). Within a look, Holm across the lines keeps the report's family-wise rate."""

    alpha: float
    max_repetitions: int
    spending: str = "obrien-fleming"
    looked_at: int = 0  # repetitions at the previous look
    decided: dict[tuple[str, ...], Line] = field(default_factory=dict)

    def level(self, repetitions: int) -> float:
        """The level for a look at `repetitions` (then remembered as the previous look)."""
        if repetitions <= self.looked_at:
            raise ValueError("each look needs more repetitions than the previous one")
        now = min(repetitions, self.max_repetitions) / self.max_repetitions
        before = self.looked_at / self.max_repetitions
        self.looked_at = repetitions
        return spent_alpha(now, self.alpha, self.spending) - spent_alpha(
            before, self.alpha, self.spending
        )

    def finished(self) -> bool:
        return self.looked_at >= self.max_repetitions

    def look(self, values: StudyValues, repetitions: int, db: str = "", **options: Any) -> Report:
        """One look, between two rounds of repetitions: the report at this look's level
        (`options` as for compare, alpha aside). Lines decided at an earlier look keep their
        verdict and leave the Holm family; the command queues more repetitions for the lines
        still undecided, up to max_repetitions, and looks again."""
        level = self.level(repetitions)
        report = compare(values, db, alpha=level, settled=self.decided, **options)
        for line in report.lines:
            if line.verdict in (A_BETTER, B_BETTER):
                self.decided.setdefault(line.key, line)
        return report


@dataclass
class Round:
    """What `compare --until-decided` does after a look: stop (and why), or look next at
    `target` repetitions, after topping up each group of the undecided lines to `target`
    finished runs: `additions` holds (side, how many more runs) for the groups below it."""

    stop: bool
    reason: str
    target: int = 0
    additions: list[tuple[Side, int]] = field(default_factory=list)

    @property
    def sides(self) -> list[Side]:
        return [side for side, _ in self.additions]

    def requests(self) -> dict[int, list[int]]:
        """{repetitions to add: run ids of the groups that need that many}: one `repeat`
        request each (it repeats the groups of the runs it is given)."""
        out: dict[int, list[int]] = {}
        for side, n in self.additions:
            out.setdefault(n, []).extend(side.run_ids)
        return out


DECIDED_ALL = "every comparison is decided"
NOTHING_TO_COMPARE = "nothing to compare"


def until_decided_step(first: int, max_repetitions: int, rounds: int = 4) -> int:
    """The repetitions each round adds by default: the way from the first look to R in
    `rounds` rounds (at least 1). Fixed before the first look, so the looks' levels do not
    depend on the data."""
    return max(1, math.ceil((max_repetitions - first) / rounds))


def undecided_sides(report: Report, values: StudyValues) -> list[Side]:
    """The groups of the report's undecided lines: both sides of a size line; every size of
    both families on the dataset key for a curve line (each may move the curves)."""
    found: dict[int, Side] = {}
    for line in report.lines:
        if line.verdict in (A_BETTER, B_BETTER):
            continue
        by_family = values.sides.get(line.dataset_key, {})
        if line.kind == "curve":
            chosen = [*by_family.get(line.a, {}).values(), *by_family.get(line.b, {}).values()]
        else:
            chosen = [
                by_family[family][size]
                for family, size in ((line.a, line.a_nb_params), (line.b, line.b_nb_params))
                if size in by_family.get(family, {})
            ]
        for side in chosen:
            found.setdefault(id(side), side)
    return list(found.values())


def next_round(report: Report, values: StudyValues, plan: SequentialPlan, step: int) -> Round:
    """After a look: stop when every line is decided or the plan reached R; else the next look
    is at `step` more repetitions (at most R), and every group of an undecided line with fewer
    finished runs than that gets the runs it lacks (a group already there gets none)."""
    if not report.lines:
        return Round(True, NOTHING_TO_COMPARE)
    sides = undecided_sides(report, values)
    if not sides:
        return Round(True, DECIDED_ALL)
    if plan.finished():
        return Round(True, f"the maximum of {plan.max_repetitions} repetitions is reached")
    target = min(plan.looked_at + step, plan.max_repetitions)
    lacking = [(side, target - len(side.values)) for side in sides if len(side.values) < target]
    return Round(False, "", target, lacking)


def first_repetitions(
    values: StudyValues, data_keys: Sequence[str] | None, families: Sequence[str] | None
) -> int:
    """The repetitions of the first look: the fewest finished runs of a compared group."""
    counts = [
        len(side.values)
        for key, by_family in values.sides.items()
        if not data_keys or key in data_keys
        for family, by_size in by_family.items()
        if not families or family in families
        for side in by_size.values()
    ]
    if not counts:
        raise VerdictError(
            "no finished run to compare yet: let the study's runs finish (`mosaic status`), "
            "then run this again"
        )
    return min(counts)


def until_decided(
    plan: SequentialPlan,
    values_now: Any,
    add: Any,
    options: dict[str, Any] | None = None,
    step: int | None = None,
    on_round: Any = None,
) -> tuple[Report, list[tuple[int, float, Round]]]:
    """The `compare --until-decided` loop: look (SequentialPlan.look), decide the next round
    (next_round), add its repetitions and wait (`add(round.requests())`: the command asks the
    daemon and waits for the runs), read the study again (`values_now()`), until next_round
    stops.

    The looks are at n0, n0 + step, ..., R repetitions, n0 the fewest finished runs of a
    compared group, fixed in advance: the levels do not depend on the data, so they sum to at
    most alpha whatever happens. Returns the last report and each look's (repetitions, level,
    round); `on_round(look number, repetitions, report, round)` is called after each look."""
    options = dict(options or {})
    values = values_now()
    n = first_repetitions(values, options.get("data_keys"), options.get("families"))
    if n >= plan.max_repetitions:
        raise VerdictError(
            f"--max-repetitions {plan.max_repetitions}: the groups already have {n} "
            f"repetitions; give a maximum above {n}"
        )
    step = step or until_decided_step(n, plan.max_repetitions)
    looks: list[tuple[int, float, Round]] = []
    while True:
        report = plan.look(values, n, **options)
        decision = next_round(report, values, plan, step)
        looks.append((n, report.alpha, decision))
        if on_round is not None:
            on_round(len(looks), n, report, decision)
        if decision.stop:
            return report, looks
        if decision.additions:
            add(decision.requests())
            values = values_now()
        n = decision.target
