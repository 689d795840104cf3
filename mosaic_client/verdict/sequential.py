"""`mosaic compare --until-decided`: the group-sequential plan (Lan-DeMets alpha spending with
boundaries computed by numerical integration) and the loop that looks, picks the groups to
repeat, waits for their runs and looks again."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mosaic_client.verdict.comparison import A_BETTER, B_BETTER, Line, Report, compare
from mosaic_client.verdict.reading import Side, StudyValues, VerdictError


def spent_alpha(fraction: float, alpha: float, kind: str = "obrien-fleming") -> float:
    """The Lan-DeMets alpha-spending function: the error budget used up by information
    fraction t = repetitions now / maximum repetitions (0 at t=0, alpha at t=1): the
    O'Brien-Fleming-type 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)), or the Pocock-type
    alpha ln(1 + (e - 1) t)."""
    from scipy import special

    t = min(max(fraction, 0.0), 1.0)
    if t == 0:
        return 0.0
    if kind == "obrien-fleming":
        return float(2 * special.ndtr(special.ndtri(alpha / 2) / math.sqrt(t)))
    if kind == "pocock":
        return float(alpha * math.log(1 + (math.e - 1) * t))
    raise ValueError(f"unknown spending function {kind!r}; use obrien-fleming or pocock")


GRID = 401  # Simpson nodes on each look's continuation interval


def _simpson(n: int) -> np.ndarray:
    """Simpson's weights for n (odd) equally spaced nodes, spacing 1."""
    w = np.ones(n)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return w / 3


def boundaries(
    fractions: Sequence[float], alpha: float, kind: str = "obrien-fleming"
) -> list[float]:
    """Two-sided group-sequential boundaries c_k (on the z scale) for looks at information
    fractions t_1 < ... < t_K: P(no |Z_j| >= c_j for j < k, |Z_k| >= c_k) = alpha(t_k) -
    alpha(t_{k-1}) under the null, for Z_k = B(t_k) / sqrt(t_k), B a Brownian motion (the
    z statistics of a cumulative mean). Computed by the recursive numerical integration of
    Armitage, McPherson and Rowe (1969): the density of B(t_k) on the paths that have not
    crossed, on Simpson grids, and a root search for each c_k. inf where a look spends nothing."""
    from scipy import special

    out: list[float] = []
    nodes = weights = density = None  # the surviving paths' density at the previous look
    previous_t, previous_spent = 0.0, 0.0
    for t in fractions:
        spent = spent_alpha(t, alpha, kind)
        target = spent - previous_spent
        if density is None:
            c = float(special.ndtri(1 - target / 2)) if target > 0 else math.inf
        else:
            c = _boundary(target, nodes, weights * density, t, t - previous_t)
        out.append(c)
        edge = min(c, 12.0) * math.sqrt(t)
        new_nodes = np.linspace(-edge, edge, GRID)
        new_weights = _simpson(GRID) * (new_nodes[1] - new_nodes[0])
        if density is None:
            density = np.exp(-(new_nodes**2) / (2 * t)) / math.sqrt(2 * math.pi * t)
        else:
            step = math.sqrt(t - previous_t)
            kernel = np.exp(-(((new_nodes[:, None] - nodes[None, :]) / step) ** 2) / 2)
            density = kernel @ (weights * density) / (step * math.sqrt(2 * math.pi))
        nodes, weights = new_nodes, new_weights
        previous_t, previous_spent = t, spent
    return out


def _boundary(target: float, nodes: Any, mass: Any, t: float, dt: float) -> float:
    """The z boundary c at fraction t whose first-crossing probability is `target`, from the
    surviving paths' density (mass: Simpson weights times density at `nodes`, the values of
    B at the previous look) and the increment's variance dt."""
    from scipy import optimize, special

    step = math.sqrt(dt)

    def crossing(c: float) -> float:
        edge = c * math.sqrt(t)
        return float(
            mass @ (special.ndtr((-edge - nodes) / step) + special.ndtr((nodes - edge) / step))
        )

    if target <= 0:
        return math.inf
    if crossing(0.0) <= target:
        return 0.0
    return float(optimize.brentq(lambda c: crossing(c) - target, 0.0, 40.0, xtol=1e-10))


def nominal_level(c: float) -> float:
    """The two-sided p-value threshold of a z boundary c."""
    from scipy import special

    return 0.0 if math.isinf(c) else float(2 * special.ndtr(-c))


@dataclass
class SequentialPlan:
    """`compare --until-decided`: test after each round of new repetitions at the nominal
    level of that look's group-sequential boundary; stop a line once decided.

    Looking after every round would inflate false decisions. The Lan-DeMets spending function
    alpha(t) says how much of alpha the looks up to information fraction t (repetitions / R)
    may spend; the boundary of look k is the one whose probability of a first crossing there
    is alpha(t_k) - alpha(t_{k-1}) (boundaries), so the probability of any false decision over
    all looks is alpha(1) = alpha for z statistics of a cumulative mean. A line's p-value is
    compared with the boundary's nominal level (2 - 2 Phi(c_k)): each look's nominal level is
    larger than its spent increment, as the earlier looks' crossings are excluded. Within a look,
    Holm across the lines keeps the report's family-wise rate."""

    alpha: float
    max_repetitions: int
    spending: str = "obrien-fleming"
    looked_at: int = 0  # repetitions at the previous look
    decided: dict[tuple[str, ...], Line] = field(default_factory=dict)
    fractions: list[float] = field(default_factory=list)  # of the looks so far

    def level(self, repetitions: int) -> float:
        """The nominal level for a look at `repetitions` (then remembered as the previous
        look): the boundaries of every look so far, computed again with this one."""
        if repetitions <= self.looked_at:
            raise ValueError("each look needs more repetitions than the previous one")
        self.looked_at = repetitions
        self.fractions.append(min(repetitions, self.max_repetitions) / self.max_repetitions)
        return nominal_level(boundaries(self.fractions, self.alpha, self.spending)[-1])

    def spent(self) -> float:
        """The alpha spent by the looks so far: alpha(t) at the last look."""
        return spent_alpha(self.fractions[-1], self.alpha, self.spending) if self.fractions else 0.0

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
