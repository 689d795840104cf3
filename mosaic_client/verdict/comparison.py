"""One `mosaic compare` report: the sizes of each pair of families matched, every line's
statistics (batched: thousands of lines share their bootstrap draws), the curves compared over
their overlap, Holm across the report and the verdict words with the repetitions advice."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mosaic_client.analysis import AnalysisError
from mosaic_client.verdict.reading import HIGHER, LOWER, Side, StudyValues, direction
from mosaic_client.verdict.statistics import (
    N_RESAMPLES,
    SEED,
    contrast_test,
    counted_percentile_ci,
    holm,
    percentile_ci,
    repetitions_needed_many,
    resample_counts,
    resample_weights,
    sign_flip_p,
    smallest_sign_flip_p,
    welch,
)

A_BETTER, B_BETTER = "A better", "B better"
NO_DIFFERENCE, TOO_FEW = "no detectable difference", "too few repetitions"


# -- one comparison line ----------------------------------------------------------------------


def _better_matrix(diff: np.ndarray, better: str) -> np.ndarray:
    """1 where the first value is better, 0.5 on ties, 0 where worse."""
    sign = np.sign(diff) if better == HIGHER else -np.sign(diff)
    return (sign + 1) / 2


def pairing(a: Side, b: Side) -> tuple[bool, str]:
    """Paired by repetition when both sides ran each seed once, the same seeds, and each seed
    on the same data stage: then repetition i of A and of B saw the same data."""
    if len(a.values) != len(b.values) or len(a.values) < 2:
        return False, "unpaired: different numbers of repetitions"
    if (
        any(s is None for s in a.seeds + b.seeds)
        or len(a.seeds) != len(a.values)
        or len(b.seeds) != len(b.values)
    ):
        return False, "unpaired: seeds unknown"
    if len(set(a.seeds)) != len(a.seeds) or set(a.seeds) != set(b.seeds):
        return False, "unpaired: the two sides ran different seeds"
    stage_a = dict(zip(a.seeds, a.data_stages))
    stage_b = dict(zip(b.seeds, b.data_stages))
    if any(stage_a.get(s) != stage_b.get(s) for s in a.seeds):
        return False, "unpaired: different data stages"
    return True, "paired by seed"


def paired_order(a: Side, b: Side) -> tuple[np.ndarray, np.ndarray]:
    """A's and B's values lined up by seed."""
    ia = {s: v for s, v in zip(a.seeds, a.values)}
    ib = {s: v for s, v in zip(b.seeds, b.values)}
    seeds = sorted(ia, key=repr)
    return np.array([ia[s] for s in seeds]), np.array([ib[s] for s in seeds])


@dataclass
class Line:
    """One comparison: A against B at one matched size, or over the whole curves."""

    kind: str  # "size" or "curve"
    dataset_key: str
    a: str
    b: str
    a_nb_params: Any  # an int for a size line; [low, high] of the overlap for a curve line
    b_nb_params: Any
    n_a: int
    n_b: int
    paired: bool
    pairing: str
    mean_a: float
    mean_b: float
    diff: float  # mean A - mean B (over the overlap for a curve)
    ci: list[float] | None = None
    p_improvement: float | None = None  # P(A better than B)
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
        return {k: v for k, v in vars(self).items() if k != "sd"}


def size_lines(
    pairs: Sequence[tuple[Side, Side]],
    dataset_key: str,
    better: str,
    alpha: float,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> list[Line]:
    """Statistics of matched-size comparisons, batched by shape so that thousands of lines
    share one set of bootstrap draws per (paired, n_a, n_b): a matrix product each."""
    lines: list[Line | None] = [None] * len(pairs)
    shapes: dict[tuple[bool, int, int], list[int]] = {}
    arrays: list[tuple[np.ndarray, np.ndarray]] = []
    for index, (a, b) in enumerate(pairs):
        paired, how = pairing(a, b)
        if paired:
            xa, xb = paired_order(a, b)
        else:
            xa, xb = np.asarray(a.values, float), np.asarray(b.values, float)
        arrays.append((xa, xb))
        lines[index] = Line(
            "size",
            dataset_key,
            a.family,
            b.family,
            a.nb_params,
            b.nb_params,
            len(xa),
            len(xb),
            paired,
            how,
            float(xa.mean()),
            float(xb.mean()),
            float(xa.mean() - xb.mean()),
        )
        shapes.setdefault((paired, len(xa), len(xb)), []).append(index)
    for (paired, _, _), members in shapes.items():
        xa = np.stack([arrays[i][0] for i in members])
        xb = np.stack([arrays[i][1] for i in members])
        _fill(paired, xa, xb, [lines[i] for i in members], better, alpha, n_resamples, seed)
    return [line for line in lines if line is not None]


def _fill(
    paired: bool,
    xa: np.ndarray,
    xb: np.ndarray,
    lines: list[Any],
    better: str,
    alpha: float,
    n_resamples: int,
    seed: int,
) -> None:
    na, nb = xa.shape[1], xb.shape[1]
    rng = np.random.default_rng(seed)
    ci = pi_ci = None
    if paired:
        d = xa - xb
        wins = _better_matrix(d, better)
        sd = d.std(axis=1, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            effect = d.mean(axis=1) / sd
        p = sign_flip_p(d)
        testable = smallest_sign_flip_p(na) <= alpha
        if n_resamples and na >= 2:
            counts = resample_counts(rng, na, n_resamples)
            weights, counts32 = counts.T / na, counts.T.astype(np.float32)
            ci, pi_ci = _chunked(
                len(lines),
                lambda part: (
                    percentile_ci(d[part] @ weights),
                    # 2 x wins (ties count 1): small integers, exact in float32
                    counted_percentile_ci(
                        (2 * wins[part]).astype(np.float32) @ counts32, 2 * na, 2 * na
                    ),
                ),
            )
        pi = wins.mean(axis=1)
    else:
        testable = na >= 2 and nb >= 2
        wins = _better_matrix(xa[:, :, None] - xb[:, None, :], better)  # (L, na, nb)
        pi = wins.mean(axis=(1, 2))
        if testable:
            _, _, p = welch(xa, xb)
            pooled = ((na - 1) * xa.var(axis=1, ddof=1) + (nb - 1) * xb.var(axis=1, ddof=1)) / (
                na + nb - 2
            )
            sd = np.sqrt(pooled)
            correction = 1 - 3 / (4 * (na + nb) - 9)  # Hedges' small-sample correction
            with np.errstate(divide="ignore", invalid="ignore"):
                effect = correction * (xa.mean(axis=1) - xb.mean(axis=1)) / sd
        else:
            p = np.full(len(lines), np.nan)
            sd = np.full(len(lines), np.nan)
            effect = np.full(len(lines), np.nan)
        if n_resamples and testable:
            ca = resample_counts(rng, na, n_resamples).astype(float)
            cb = resample_counts(rng, nb, n_resamples).astype(float)
            top = 2 * na * nb

            def part_pi(part: slice) -> tuple[np.ndarray, np.ndarray]:
                won = np.stack([((ca @ (2 * m)) * cb).sum(axis=1) for m in wins[part]])
                if top < 4096:
                    return counted_percentile_ci(won, top, top)
                return percentile_ci(won / top)

            ci, pi_ci = _chunked(
                len(lines),
                lambda part: (
                    percentile_ci(xa[part] @ (ca.T / na) - xb[part] @ (cb.T / nb)),
                    part_pi(part),
                ),
            )
    for k, line in enumerate(lines):
        line.p_improvement = float(pi[k])
        line.sd = float(sd[k]) if np.isfinite(sd[k]) else None
        line.effect_kind = "d_z (paired)" if paired else "Hedges' g"
        line.effect_size = float(effect[k]) if np.isfinite(effect[k]) else None
        line.testable = bool(testable)
        line.p_value = float(p[k]) if np.isfinite(p[k]) else None
        if ci is not None and pi_ci is not None:
            line.ci = [float(ci[0][k]), float(ci[1][k])]
            line.p_improvement_ci = [float(pi_ci[0][k]), float(pi_ci[1][k])]


def _chunked(rows: int, func: Any, chunk: int = 256) -> tuple[tuple[np.ndarray, ...], ...]:
    """func(slice) -> (ci, pi_ci) over chunks of lines, concatenated: the bootstrap matrices
    of a chunk (chunk x resamples) stay small enough for the caches."""
    results = [func(slice(start, start + chunk)) for start in range(0, rows, chunk)]
    return tuple(
        tuple(np.concatenate([r[i][j] for r in results]) for j in range(2)) for i in range(2)
    )


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
    a: Sequence[Side],
    b: Sequence[Side],
    dataset_key: str,
    better: str,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    boot_cache: dict[Any, np.ndarray] | None = None,
) -> Line | None:
    """The whole curves of A and B over their overlapping nb_params range (sides sorted by
    size); None when they do not overlap over an interval."""
    found = curve_weights([s.nb_params for s in a], [s.nb_params for s in b])
    if found is None:
        return None
    wa, wb, lo, hi = found
    means_a = np.array([s.mean for s in a])
    means_b = np.array([s.mean for s in b])
    groups = [(w, s) for w, s in zip(wa, a) if w > 0] + [(-w, s) for w, s in zip(wb, b) if w > 0]
    diff = float(wa @ means_a - wb @ means_b)
    line = Line(
        "curve",
        dataset_key,
        a[0].family,
        b[0].family,
        [round(lo), round(hi)],
        [round(lo), round(hi)],
        sum(len(s.values) for w, s in zip(wa, a) if w > 0),
        sum(len(s.values) for w, s in zip(wb, b) if w > 0),
        False,
        "unpaired (curves: groups resampled independently)",
        float(wa @ means_a),
        float(wb @ means_b),
        diff,
    )
    line.effect_kind = "difference / pooled sd"
    ns = np.array([len(s.values) for _, s in groups])
    line.testable = bool((ns >= 2).all())
    variances = np.array([s.var for _, s in groups])
    if line.testable:
        ws = np.array([w for w, _ in groups])
        parts = (ws**2 * variances / ns)[None, :]
        _, _, p = contrast_test(np.array([diff]), parts, (ns - 1)[None, :])
        line.p_value = float(p[0])
        pooled = math.sqrt(float(np.mean(variances)))
        line.sd = pooled
        line.effect_size = diff / pooled if pooled > 0 else None
    if n_resamples:
        # A stratified bootstrap: each group resampled on its own. Drawing 10,000 resamples
        # per group would cost resamples x runs random numbers; instead one pool of resamples
        # per group size n, and group g takes row (b + offset_g) of its pool in replicate b.
        # Offsets are distinct, so the groups of one replicate use different, independent
        # rows: each replicate is a proper stratified resample.
        cache = boot_cache if boot_cache is not None else {}
        offsets = cache.setdefault("offsets", {})
        boot = np.zeros(n_resamples)
        for w, side in groups:
            x = np.asarray(side.values, float)
            pool = cache.get(("pool", x.size))
            if pool is None:
                rng = np.random.default_rng([seed, x.size])
                pool = cache[("pool", x.size)] = resample_weights(rng, x.size, n_resamples)
            offset = offsets.setdefault(id(side), len(offsets)) % n_resamples
            means = pool @ x  # replicate b gets row (b + offset) mod n_resamples
            boot[: n_resamples - offset] += w * means[offset:]
            boot[n_resamples - offset :] += w * means[:offset]
        low, high = percentile_ci(boot)
        line.ci = [float(low), float(high)]
    return line


# -- the report -------------------------------------------------------------------------------


def match_sizes(
    sizes_a: Sequence[int], sizes_b: Sequence[int], tolerance: float
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Each size of A with the nearest size of B (in log) within a factor `tolerance`; on a
    tie, the smaller.

    Returns the matched (a, b) pairs, the sizes of A without a partner and the sizes of B that
    no size of A was matched with."""
    ordered = sorted(sizes_b)
    matched, lonely_a = [], []
    for a in sorted(sizes_a):
        at = bisect.bisect_left(ordered, a)
        near = ordered[max(0, at - 1) : at + 1]  # the neighbours below and above
        best = min(near, key=lambda b: (abs(math.log(a / b)), b), default=None)
        if best is not None and max(a, best) / min(a, best) <= tolerance:
            matched.append((a, best))
        else:
            lonely_a.append(a)
    used = {b for _, b in matched}
    return matched, lonely_a, [b for b in ordered if b not in used]


def decide(
    lines: Sequence[Line], alpha: float, better: str, min_effect: float | None = None
) -> None:
    """Holm across every testable line, then the verdict words and the repetitions advice.

    The rule: a testable line whose Holm-adjusted p-value is <= alpha is decided for the side
    with the better mean ("A better" / "B better"); a testable line above it is "no detectable
    difference"; a line that cannot reach alpha whatever its data (fewer than 2 runs a side, or
    fewer pairs than a sign-flip test needs: 2**(1-n) > alpha) is "too few repetitions"."""
    tested = [line for line in lines if line.testable and line.p_value is not None]
    for line, adjusted in zip(tested, holm([line.p_value for line in tested])):
        line.p_holm = adjusted
    # The advice aims at the first Holm step (Bonferroni level): enough even if every other
    # line stays undecided.
    level = alpha / max(1, len(tested))
    for line in lines:
        if not line.testable:
            line.verdict = TOO_FEW
        elif line.p_holm is not None and line.p_holm <= alpha and line.diff != 0:
            a_wins = (line.diff < 0) == (better == LOWER)
            line.verdict = A_BETTER if a_wins else B_BETTER
        else:
            line.verdict = NO_DIFFERENCE
    undecided = [line for line in lines if line.verdict in (TOO_FEW, NO_DIFFERENCE)]
    for paired in (False, True):
        some = [line for line in undecided if line.paired == paired]
        if not some:
            continue
        targets = [abs(min_effect) if min_effect else abs(line.diff) for line in some]
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

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "lines"}
        out["lines"] = [line.as_json() for line in self.lines]
        out["decided"] = sum(line.verdict in (A_BETTER, B_BETTER) for line in self.lines)
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
        self.curves.append(([sa[s] for s in sorted(sa)], [sb[s] for s in sorted(sb)], key))


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
    n_resamples: int,
    seed: int,
    notes: list[str],
) -> list[Line]:
    """A curve line for each pair of curves that can be compared; a note for each that cannot
    (fewer than 2 sizes a side, or nb_params ranges that do not overlap)."""
    lines: list[Line] = []
    cache: dict[Any, np.ndarray] = {}
    for a, b, key in curves:
        if len(a) < 2 or len(b) < 2:
            notes.append(
                f"{key}: no curve comparison of {a[0].family} and {b[0].family}: each "
                "needs at least 2 sizes"
            )
            continue
        line = curve_line(a, b, key, better, n_resamples, seed, cache)
        if line is None:
            notes.append(
                f"{key}: the nb_params ranges of {a[0].family} and {b[0].family} do "
                "not overlap; no curve comparison"
            )
        else:
            lines.append(line)
    return lines


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
) -> Report:
    """Every pair of families on each dataset key: matched sizes and whole curves.

    settled: lines decided earlier (SequentialPlan); they replace the new ones with the same key
    and are not tested again."""
    better = direction(values.metric)
    found = candidates(values, data_keys, families, size_tolerance)
    notes = found.notes
    lines = size_lines(found.pairs, "", better, alpha, n_resamples, seed)
    for line, key in zip(lines, found.pair_keys):
        line.dataset_key = key
    lines.extend(curve_lines(found.curves, better, n_resamples, seed, notes))
    if settled:
        lines = [settled.get(line.key, line) for line in lines]
    decide(
        [line for line in lines if not settled or line.key not in settled],
        alpha,
        better,
        min_effect,
    )
    if values.skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(values.skipped.items()))
        notes.append(f"left out {sum(values.skipped.values())} run(s): {reasons}")
    lines.sort(key=lambda ln: (ln.dataset_key, ln.a, ln.b, ln.kind == "curve", str(ln.a_nb_params)))
    return Report(
        db,
        values.metric,
        better,
        alpha,
        size_tolerance,
        min_effect,
        n_resamples,
        seed,
        lines,
        found.unmatched,
        notes,
    )
