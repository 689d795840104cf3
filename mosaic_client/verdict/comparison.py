"""One `mosaic compare` report: the sizes of each pair of families matched (symmetrically), each
line's statistics (line_statistics: the test, its interval, the effect; failures and P(A
better) beside), the curves compared over their overlap, the step-down correction across the
report and the verdict words with the repetitions advice (docs/compare.md)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mosaic_client.analysis import AnalysisError
from mosaic_client.verdict.lines import (
    Stats,
    finite,
    improvement_intervals,
    line_statistics,
    paired_order,
    pairing,
    probability_better,
    seed_clusters,
    t_line,
)
from mosaic_client.verdict.reading import LOWER, Side, StudyValues, direction
from mosaic_client.verdict.statistics import (
    N_RESAMPLES,
    SEED,
    contrast_parts,
    fisher_p,
    repetitions_needed_many,
    simultaneous_band,
    smallest_fisher_p,
    step_down,
)

A_BETTER, B_BETTER = "A better", "B better"
NO_DIFFERENCE, TOO_FEW = "no detectable difference", "too few repetitions"
EQUIVALENT = "equivalent within ±"  # followed by the margin: "equivalent within ±0.01"
DECIDED = (A_BETTER, B_BETTER)


def equivalent(margin: float) -> str:
    return f"{EQUIVALENT}{margin:g}"


@dataclass
class Line:
    """One comparison: A against B at one matched size, or over the whole curves."""

    kind: str  # "size" or "curve"
    dataset_key: str
    a: str
    b: str
    a_nb_params: Any  # an int for a size line; [low, high] of the overlap for a curve line
    b_nb_params: Any
    n_a: int  # finished runs in the test (complete pairs when paired)
    n_b: int
    paired: bool
    pairing: str
    mean_a: float
    mean_b: float
    diff: float  # mean A - mean B (over the overlap for a curve)
    ci: list[float] | None = None
    p_improvement: float | None = None  # P(A better than B), a failed run a loss
    p_improvement_ci: list[float] | None = None
    effect_size: float | None = None
    effect_kind: str = ""
    p_value: float | None = None
    p_holm: float | None = None
    testable: bool = True
    verdict: str = ""
    repetitions_needed: int | None = None
    repetitions_note: str = ""
    sd: float | None = None  # the spread the power advice uses
    test: str = ""
    p_floor: float = 0.0  # the smallest p the line's test can give
    ci_method: str = ""
    failed_a: int = 0  # failed runs (status failed, or a NaN metric), counted per side
    failed_b: int = 0
    runs_a: int = 0  # every run of the side, finished or failed
    runs_b: int = 0
    failure_p: float | None = None  # Fisher's exact test of the failure rates
    failure_p_holm: float | None = None
    margin: float | None = None
    tost_p: float | None = None  # equivalence within +-margin (two one-sided t tests)
    tost_p_holm: float | None = None
    decided_by: str = ""  # what decided the verdict: "mean", "failures", "equivalence"
    note: str = ""
    improvement_sizes: tuple[int, int] = (0, 0)  # for P(A better)'s interval; not in JSON
    # a curve line clustered by seed: the 95% simultaneous band on the difference curve A - B
    # at its knots ({nb_params, diff, low, high}; statistics.simultaneous_band)
    band: list[dict[str, float]] | None = None

    @property
    def key(self) -> tuple[str, ...]:
        """What the line compares, stable across looks at a growing study."""
        return (
            self.kind,
            self.dataset_key,
            self.a,
            self.b,
            str(self.a_nb_params),
            str(self.b_nb_params),
        )

    def as_json(self) -> dict[str, Any]:
        # NaN is not JSON: a side whose every run failed has no mean
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in vars(self).items()
            if k not in ("sd", "improvement_sizes")
        }

    def set_stats(self, found: Stats) -> None:
        self.test, self.p_floor, self.ci = found.test, found.floor, found.ci
        self.p_value = finite(found.p)
        self.effect_size = None if found.effect is None else finite(found.effect)
        self.effect_kind, self.sd, self.tost_p = found.effect_kind, found.sd, found.tost_p
        self.testable = found.floor < 1
        if found.ci is not None:
            self.ci_method = "95% t interval (inverts the test)"
        elif found.floor < 1:
            self.ci_method = "none: no spread (exact test)"


def size_line(
    a: Side, b: Side, dataset_key: str, better: str, margin: float = 0, failures: bool = True
) -> Line:
    """One matched-size comparison: the test of the finished runs (paired over the complete
    pairs, or unpaired), the failure-rate test, P(A better) with failures as losses."""
    paired, how = pairing(a, b)
    if paired:
        xa, xb = paired_order(a, b)
    else:
        xa, xb = np.asarray(a.values, float), np.asarray(b.values, float)
    mean = lambda x: float(x.mean()) if x.size else math.nan  # noqa: E731
    line = Line(
        "size", dataset_key, a.family, b.family, a.nb_params, b.nb_params, len(xa), len(xb),
        paired, how, mean(xa), mean(xb), mean(xa) - mean(xb),
    )  # fmt: skip
    line.set_stats(line_statistics(xa, xb, paired, margin))
    line.margin = margin or None
    line.failed_a, line.failed_b = a.failures, b.failures
    line.runs_a, line.runs_b = len(a.values) + a.failures, len(b.values) + b.failures
    if a.failures + b.failures:
        line.failure_p = fisher_p(a.failures, line.runs_a, b.failures, line.runs_b)
    line.p_improvement, line.improvement_sizes = probability_better(a, b, paired, better, failures)
    return line


def size_lines(
    pairs: Sequence[tuple[Side, Side]],
    dataset_key: str,
    better: str,
    margin: float = 0,
    failures: bool = True,
) -> list[Line]:
    """size_line for each matched pair, with the intervals of P(A better) (batched: one
    vectorised root search for thousands of lines)."""
    lines = [size_line(a, b, dataset_key, better, margin, failures) for a, b in pairs]
    with_pi = [line for line in lines if line.p_improvement is not None]
    found = improvement_intervals(
        [line.p_improvement for line in with_pi], [line.improvement_sizes for line in with_pi]
    )
    for line, ci in zip(with_pi, found):
        line.p_improvement_ci = ci
    return lines


# -- curves -----------------------------------------------------------------------------------


def curve_weights(
    xa: Sequence[float], xb: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """Weights wa, wb with mean over the overlap of (curve A - curve B) = wa.mean_a - wb.mean_b.

    Each curve is the piecewise-linear interpolation of its group means in log nb_params; their
    difference is piecewise linear between the union of the knots, so its average over the
    overlapping range is exactly a trapezoid sum over those knots: a linear contrast of the
    group means. None when the ranges do not overlap over an interval."""
    la, lb = np.log(np.asarray(xa, float)), np.log(np.asarray(xb, float))
    lo, hi = max(la.min(), lb.min()), min(la.max(), lb.max())
    if not hi > lo:
        return None
    knots = np.unique(np.concatenate([la, lb, [lo, hi]]))
    knots = knots[(knots >= lo) & (knots <= hi)]
    step = np.diff(knots)
    trapezoid = np.zeros(knots.size)
    trapezoid[:-1] += step / 2
    trapezoid[1:] += step / 2
    trapezoid /= hi - lo

    def weights(logs: np.ndarray) -> np.ndarray:
        # np.interp(knots, logs, y) = M @ y with M the hat functions at the knots (logs sorted,
        # knots inside their range): each knot mixes its two neighbouring nodes.
        right = np.clip(np.searchsorted(logs, knots, side="right"), 1, logs.size - 1)
        left = right - 1
        share = (knots - logs[left]) / (logs[right] - logs[left])
        out = np.zeros(logs.size)
        np.add.at(out, left, trapezoid * (1 - share))
        np.add.at(out, right, trapezoid * share)
        return out

    return weights(la), weights(lb), float(math.exp(lo)), float(math.exp(hi))


def curve_line(
    a: Sequence[Side], b: Sequence[Side], dataset_key: str, better: str, margin: float = 0
) -> Line | None:
    """The whole curves of A and B over their overlapping nb_params range (sides sorted by
    size, each with finished runs); None when they do not overlap over an interval.

    Every size of a family shares the family's seeds, and the same seed gives the same data to
    both families: the groups are not independent. When at least 2 seeds ran once in every
    group of the contrast (complete clusters, at least half of the smallest group), the test is
    the one-sample t test of the per-seed contrasts D_s (seed as the unit: valid whatever the
    correlation between the groups of one seed); else the Welch-Satterthwaite t of the contrast
    of independent group means, and the line says so."""
    found = curve_weights([s.nb_params for s in a], [s.nb_params for s in b])
    if found is None:
        return None
    wa, wb, lo, hi = found
    groups = [(w, s) for w, s in zip(wa, a) if w > 0] + [(-w, s) for w, s in zip(wb, b) if w > 0]
    seeds = seed_clusters([s for _, s in groups])
    ns = np.array([len(s.values) for _, s in groups])
    clustered = bool(len(seeds) >= 2 and 2 * len(seeds) >= ns.min())
    if clustered:
        at = [dict(zip(s.seeds, s.values)) for _, s in groups]
        per_seed = np.array([[v[seed] for seed in seeds] for v in at])  # (groups, seeds)
        signed = np.array([w for w, _ in groups])
        parts_a = (np.maximum(signed, 0)[:, None] * per_seed).sum(axis=0)
        parts_b = (np.maximum(-signed, 0)[:, None] * per_seed).sum(axis=0)
        how = f"clustered by seed: {len(seeds)} seeds ran by every size in the overlap"
    else:
        parts_a = np.array([wa @ np.array([s.mean for s in a])])
        parts_b = np.array([wb @ np.array([s.mean for s in b])])
        how = "unpaired: groups treated as independent (no complete seeds)"
    line = Line(
        "curve", dataset_key, a[0].family, b[0].family, [round(lo), round(hi)],
        [round(lo), round(hi)], int(ns[signed_mask(groups, True)].sum()),
        int(ns[signed_mask(groups, False)].sum()), clustered, how, float(parts_a.mean()),
        float(parts_b.mean()), float(parts_a.mean() - parts_b.mean()),
    )  # fmt: skip
    if clustered:  # the test's unit is the seed: n A/B = the complete seeds, like pairs
        line.n_a = line.n_b = len(seeds)
    line.failed_a = sum(s.failures for w, s in groups if w > 0)
    line.failed_b = sum(s.failures for w, s in groups if w < 0)
    line.margin = margin or None
    if clustered:
        positive = signed_mask(groups, True)
        sizes = np.log([s.nb_params for _, s in groups])
        knots, mean, low, high = simultaneous_band(
            sizes[positive], per_seed[positive], sizes[~positive], per_seed[~positive]
        )
        line.band = [
            {"nb_params": round(math.exp(k)), "diff": float(m), "low": float(x), "high": float(y)}
            for k, m, x, y in zip(knots, mean, low, high)
        ]
        stats = line_statistics(parts_a - parts_b, np.zeros(len(seeds)), True, margin)
        stats.test = "t test of the per-seed contrasts" if stats.floor == 0 else stats.test
        stats.effect_kind = "d_z (per-seed contrasts)"
    else:
        stats = independent_contrast(groups, line.diff, margin)
    line.set_stats(stats)
    return line


def signed_mask(groups: Sequence[tuple[float, Side]], positive: bool) -> np.ndarray:
    return np.array([(w > 0) == positive for w, _ in groups])


def independent_contrast(groups: Sequence[tuple[float, Side]], diff: float, margin: float) -> Stats:
    """Welch-Satterthwaite t of a contrast of independent group means (weights w_g)."""
    ns = np.array([len(s.values) for _, s in groups])
    stats = Stats(diff, "Welch-Satterthwaite t of the contrast", math.nan, 1.0)
    stats.effect_kind = "difference / pooled sd"
    if not (ns >= 2).all():
        stats.test = "none: a group with fewer than 2 runs"
        return stats
    variances = np.array([s.var for _, s in groups])
    ws = np.array([w for w, _ in groups])
    _, se, df = contrast_parts(np.array([diff]), (ws**2 * variances / ns)[None, :], ns - 1)
    if not se[0] > 0:
        stats.test = "none: no spread in any group"
        return stats
    pooled = math.sqrt(float(np.mean(variances)))
    stats.floor, stats.se, stats.df = 0.0, float(se[0]), float(df[0])
    stats.sd, stats.effect = pooled, diff / pooled
    return t_line(stats, margin)


# -- matching ---------------------------------------------------------------------------------


def match_sizes(
    sizes_a: Sequence[int], sizes_b: Sequence[int], tolerance: float
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Sizes of A and B matched one to one, closest pairs (in log) first, within a factor
    `tolerance`: symmetric (swapping the families swaps the pairs, never changes them).

    The closest remaining pair of sizes from different families is always adjacent in the
    sorted list of the sizes left (a size between them would be closer to one of them), so a
    heap of adjacent pairs finds each next match: n log n for hundreds of sizes. Ties in
    distance go to the pair of smaller sizes. Returns the matched (a, b) pairs sorted by a, and
    the sizes of A and of B left alone."""
    items = sorted([(x, 0) for x in set(sizes_a)] + [(y, 1) for y in set(sizes_b)])
    after = list(range(1, len(items) + 1))
    before = list(range(-1, len(items) - 1))
    alive = [True] * len(items)
    heap: list[tuple[float, int, int, int, int]] = []

    def push(i: int, j: int) -> None:
        if 0 <= i and j < len(items) and items[i][1] != items[j][1]:
            x, y = items[i][0], items[j][0]
            if y / x <= tolerance:
                heapq.heappush(heap, (math.log(y / x), x, y, i, j))

    for i in range(len(items) - 1):
        push(i, i + 1)
    matched = []
    while heap:
        *_, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j] and after[i] == j):
            continue
        alive[i] = alive[j] = False
        x, y = items[i][0], items[j][0]
        matched.append((x, y) if items[i][1] == 0 else (y, x))
        left, right = before[i], after[j]
        if left >= 0:
            after[left] = right
        if right < len(items):
            before[right] = left
        push(left, right)
    return (
        sorted(matched),
        [x for (x, side), ok in zip(items, alive) if ok and side == 0],
        [y for (y, side), ok in zip(items, alive) if ok and side == 1],
    )


# -- the verdict --------------------------------------------------------------------------------


def family_of(lines: Sequence[Line]) -> list[tuple[Line, str, float, float, Any]]:
    """Every hypothesis the report may reject: (line, what, p, floor, group). A line's "no
    difference" and "not equivalent within the margin" share a group: both cannot be true."""
    found = []
    for i, line in enumerate(lines):
        if line.p_value is not None:
            found.append((line, "mean", line.p_value, line.p_floor, ("line", i)))
        if line.tost_p is not None:
            found.append((line, "equivalence", line.tost_p, 0.0, ("line", i)))
        if line.failure_p is not None:
            floor = smallest_fisher_p(line.failed_a + line.failed_b, line.runs_a, line.runs_b)
            found.append((line, "failures", line.failure_p, floor, ("failures", i)))
    return found


def decide(
    lines: Sequence[Line],
    alpha: float,
    better: str,
    min_effect: float | None = None,
) -> int:
    """The step-down correction across every hypothesis of the report (statistics.step_down:
    Holm with Tarone's screen), then the verdict words and the repetitions advice. Returns the
    number of groups in the family (the Bonferroni divisor of the first step).

    The rule, per line: "A better" / "B better" when its mean test or its failure test is
    rejected for that side and the other does not point the other way; "equivalent within
    +-margin" when the equivalence test is rejected and no difference is; "too few
    repetitions" when the mean test cannot reach the level it would face (no test, or an exact
    test whose smallest p is above it); else "no detectable difference"."""
    hypotheses = family_of(lines)
    adjusted, k = step_down(
        [h[2] for h in hypotheses], [h[3] for h in hypotheses], [h[4] for h in hypotheses], alpha
    )
    for line in lines:
        line.p_holm = line.tost_p_holm = line.failure_p_holm = None
    for (line, what, *_), adj in zip(hypotheses, adjusted):
        field_name = {"mean": "p_holm", "equivalence": "tost_p_holm"}.get(what, "failure_p_holm")
        setattr(line, field_name, adj)
    for line in lines:
        _verdict(line, alpha, better)
    _advice(lines, alpha / k, better, min_effect)
    return k


def _winner(diff: float, better: str) -> str:
    """The side a difference (A - B) favours."""
    return A_BETTER if (diff < 0) == (better == LOWER) else B_BETTER


def _verdict(line: Line, alpha: float, better: str) -> None:
    """The verdict words of one line once its adjusted p-values are known (decide)."""
    by_mean = by_failures = ""
    if line.p_holm is not None and line.p_holm <= alpha and line.diff != 0:
        by_mean = _winner(line.diff, better)
    if line.failure_p_holm is not None and line.failure_p_holm <= alpha:
        # fewer failures is better, whatever the metric's direction
        rate_a = line.failed_a / max(1, line.runs_a)
        rate_b = line.failed_b / max(1, line.runs_b)
        by_failures = A_BETTER if rate_a < rate_b else B_BETTER
    line.testable = line.p_holm is not None
    line.note = ""
    if by_mean and by_failures and by_mean != by_failures:
        line.verdict, line.decided_by = NO_DIFFERENCE, ""
        side = "A" if by_failures == A_BETTER else "B"
        line.note = f"{by_mean} on its finished runs, but {side} fails less often"
    elif by_mean or by_failures:
        line.verdict = by_mean or by_failures
        line.decided_by = " and ".join(
            w for w, b in (("mean", by_mean), ("failures", by_failures)) if b
        )
    elif line.tost_p_holm is not None and line.tost_p_holm <= alpha and line.margin:
        line.verdict, line.decided_by = equivalent(line.margin), "equivalence"
    elif not line.testable:
        line.verdict, line.decided_by = TOO_FEW, ""
    else:
        line.verdict, line.decided_by = NO_DIFFERENCE, ""
        if line.ci is not None and (line.ci[0] > 0 or line.ci[1] < 0):
            line.note = "the 95% interval excludes 0, but p is above the level this line faces"


def _advice(lines: Sequence[Line], level: float, better: str, min_effect: float | None) -> None:
    """Repetitions needed by each undecided line: 80% power against --min-effect (else the
    observed difference) at `level`, the first step of the correction, so the advice holds even
    if no other line is decided."""
    undecided = [line for line in lines if line.verdict in (TOO_FEW, NO_DIFFERENCE)]
    for line in lines:
        line.repetitions_needed, line.repetitions_note = None, ""
    for paired in (False, True):
        some = [line for line in undecided if line.paired == paired]
        if not some:
            continue
        targets = [abs(min_effect) if min_effect else abs(line.diff or 0.0) for line in some]
        needed = repetitions_needed_many(
            np.array(targets), np.array([line.sd or 0.0 for line in some]), paired, level
        )
        for line, n in zip(some, needed):
            line.repetitions_needed = int(n) or None
    for line in undecided:
        if line.repetitions_needed is not None:
            unit = "pairs" if line.paired else "runs a side"
            line.repetitions_note = f"{line.repetitions_needed} {unit} needed"
        elif line.sd is None:
            line.repetitions_note = "no spread yet: run at least 2 repetitions a side"
        elif line.sd == 0:
            line.repetitions_note = "no spread: every repetition gave the same difference"
        else:
            line.repetitions_note = "no difference to detect: give --min-effect"


# -- the report -------------------------------------------------------------------------------


@dataclass
class Report:
    db: str
    metric: str
    better: str
    alpha: float
    size_tolerance: float
    min_effect: float | None
    n_resamples: int
    seed: int
    lines: list[Line]
    unmatched: list[dict[str, Any]]
    notes: list[str]
    margin: float | None = None
    failures_as_losses: bool = True
    family_size: int = 0  # groups of hypotheses in the correction (Tarone's K)
    across_datasets: list[dict[str, Any]] | None = None  # --across-datasets (across.py)
    plans: list[dict[str, Any]] | None = None  # recorded sequential plans (recorded.py)
    # The run_results column the sizes are (`--size-by`, issue 26); the JSON keeps the key
    # names *_nb_params for the sizes whatever the column.
    size_by: str = "nb_params"

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "lines"}
        out["lines"] = [line.as_json() for line in self.lines]
        out["decided"] = sum(line.verdict in DECIDED for line in self.lines)
        out["equivalent"] = sum(line.verdict.startswith(EQUIVALENT) for line in self.lines)
        return out


@dataclass
class Candidates:
    """What a report compares, before any statistic: the matched sizes (with their dataset
    keys), the curves, the sizes without a partner, and notes on what is not compared."""

    pairs: list[tuple[Side, Side]] = field(default_factory=list)
    pair_keys: list[str] = field(default_factory=list)
    curves: list[tuple[list[Side], list[Side], str]] = field(default_factory=list)
    unmatched: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_families(
        self, key: str, fa: str, fb: str, sa: dict[int, Side], sb: dict[int, Side], tolerance: float
    ) -> None:
        """Families fa and fb on dataset key `key`: their matched sizes and their curves."""
        matched, lonely_a, lonely_b = match_sizes(list(sa), list(sb), tolerance)
        self.pairs.extend((sa[x], sb[y]) for x, y in matched)
        self.pair_keys.extend(key for _ in matched)
        for fam, other, sizes in ((fa, fb, lonely_a), (fb, fa, lonely_b)):
            self.unmatched.extend(
                {"dataset_key": key, "family": fam, "nb_params": s, "against": other} for s in sizes
            )
        finished_a = [sa[s] for s in sorted(sa) if sa[s].values]
        finished_b = [sb[s] for s in sorted(sb) if sb[s].values]
        self.curves.append((finished_a, finished_b, key))


def candidates(
    values: StudyValues,
    data_keys: Sequence[str] | None,
    families: Sequence[str] | None,
    size_tolerance: float,
) -> Candidates:
    """Every pair of the chosen families on each chosen dataset key (default: all of them)."""
    present = sorted(values.sides)
    if data_keys:
        for key in data_keys:
            if key not in values.sides:
                listing = ", ".join(present) if present else "none (the study has no run)"
                raise AnalysisError(f"no run has dataset key {key!r}; keys present: {listing}")
    found = Candidates()
    for key in list(data_keys) if data_keys else present:
        by_family = values.sides[key]
        names = _chosen_families(key, by_family, families)
        if len(names) < 2:
            found.notes.append(
                f"{key}: {len(names)} model key(s) with finished runs; nothing to compare"
            )
            continue
        for (k, fam, size), count in sorted(values.configurations.items()):
            if k == key and fam in names and count > 1:
                found.notes.append(
                    f"{key}: {fam} at {size} parameters pools {count} configurations "
                    "that differ in more than the seed"
                )
        if values.unplaced.get(key):
            found.notes.append(
                f"{key}: {values.unplaced[key]} failed run(s) of configurations that never "
                "finished a run: their size is unknown, so no line counts them"
            )
        for i, fa in enumerate(names):
            for fb in names[i + 1 :]:
                found.add_families(key, fa, fb, by_family[fa], by_family[fb], size_tolerance)
    return found


def _chosen_families(
    key: str, by_family: dict[str, dict[int, Side]], families: Sequence[str] | None
) -> list[str]:
    """The families compared on `key`: the ones asked for (each must have runs there), or all."""
    names = sorted(by_family)
    if not families:
        return names
    missing = [f for f in families if f not in by_family]
    if missing:
        raise AnalysisError(
            f"no finished run of model key {', '.join(map(repr, missing))} on dataset key "
            f"{key!r}; model keys present: {', '.join(names) or 'none'}"
        )
    return list(families)


def curve_lines(
    curves: Sequence[tuple[list[Side], list[Side], str]],
    better: str,
    notes: list[str],
    margin: float = 0,
) -> list[Line]:
    """A curve line for each pair of curves that can be compared; a note for each that cannot
    (fewer than 2 sizes with finished runs a side, or nb_params ranges that do not overlap)."""
    lines: list[Line] = []
    for a, b, key in curves:
        if len(a) < 2 or len(b) < 2:
            names = " and ".join(s[0].family for s in (a, b) if s) or "the families"
            notes.append(
                f"{key}: no curve comparison of {names}: each family needs at least 2 sizes "
                "with finished runs"
            )
            continue
        line = curve_line(a, b, key, better, margin)
        if line is None:
            notes.append(
                f"{key}: the size ranges of {a[0].family} and {b[0].family} do "
                "not overlap; no curve comparison"
            )
        else:
            lines.append(line)
    return lines


def _order(line: Line) -> tuple[Any, ...]:
    """Report order: by dataset key and family pair, size lines by A's size (numerically),
    the curve last."""
    size = line.a_nb_params[0] if isinstance(line.a_nb_params, list) else line.a_nb_params
    return (line.dataset_key, line.a, line.b, line.kind == "curve", size)


def compare(
    values: StudyValues,
    db: str,
    data_keys: Sequence[str] | None = None,
    families: Sequence[str] | None = None,
    alpha: float = 0.05,
    size_tolerance: float = 1.5,
    min_effect: float | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    settled: dict[tuple[str, ...], Line] | None = None,
    margin: float | None = None,
    failures_as_losses: bool = True,
) -> Report:
    """Every pair of families on each dataset key: matched sizes and whole curves.

    settled: lines decided earlier (SequentialPlan); they replace the new ones with the same key
    and are not tested again. n_resamples and seed: kept in the report's JSON for its
    readers; no interval is bootstrapped any more (each inverts its test)."""
    better = direction(values.metric)
    found = candidates(values, data_keys, families, size_tolerance)
    notes = found.notes
    lines = size_lines(found.pairs, "", better, margin or 0, failures_as_losses)
    for line, key in zip(lines, found.pair_keys):
        line.dataset_key = key
    lines.extend(curve_lines(found.curves, better, notes, margin or 0))
    if settled:
        lines = [settled.get(line.key, line) for line in lines]
    k = decide(
        [line for line in lines if not settled or line.key not in settled],
        alpha,
        better,
        min_effect,
    )
    if values.skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(values.skipped.items()))
        notes.append(
            f"left out of the means {sum(values.skipped.values())} run(s): {reasons}; failed "
            "runs and NaN results are counted as failures in their lines"
        )
    lines.sort(key=_order)
    report = Report(
        db, values.metric, better, alpha, size_tolerance, min_effect, n_resamples, seed,
        lines, found.unmatched, notes, margin, failures_as_losses, k,
    )  # fmt: skip
    report.size_by = values.size_by
    return report
