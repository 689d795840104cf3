"""One line's numbers, before any correction: the pairing by seed (complete pairs), P(A
better) with failed runs as losses and its score interval, and line_statistics: the test that
fits the data (paired t, Welch, or an exact test for data without spread), its interval, the
effect size and the equivalence test (docs/compare.md, "The tests")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mosaic_client.verdict.reading import LOWER, Side
from mosaic_client.verdict.statistics import (
    newcombe,
    paired_parts,
    permutation_p,
    sign_flip_p,
    smallest_permutation_p,
    smallest_sign_flip_p,
    t_interval,
    t_test,
    tost,
    welch_parts,
    wilson,
)

# -- pairing ----------------------------------------------------------------------------------


def _single_seeds(seeds: Sequence[Any], stages: Sequence[str]) -> dict[Any, str]:
    """{seed: data stage} of the seeds a side ran exactly once (None: unknown seed)."""
    counts: dict[Any, int] = {}
    for s in seeds:
        counts[s] = counts.get(s, 0) + 1
    return {s: st for s, st in zip(seeds, stages) if s is not None and counts[s] == 1}


def common_seeds(a: Side, b: Side) -> list[Any]:
    """The seeds both sides finished exactly once on the same data stage: complete pairs."""
    sa = _single_seeds(a.seeds, a.data_stages)
    sb = _single_seeds(b.seeds, b.data_stages)
    return sorted((s for s in sa if s in sb and sa[s] == sb[s]), key=repr)


def pairing(a: Side, b: Side) -> tuple[bool, str]:
    """Paired by seed over the complete pairs (both sides finished the seed once, on the same
    data stage: repetition i of A and of B saw the same data) when there are at least 2 of
    them and they hold at least half the runs of the smaller side; else unpaired, and why.
    Runs without a partner are left out of a paired line, and the reason says how many."""
    if not a.values or not b.values:
        return False, "unpaired: a side has no finished run"
    if any(s is None for s in a.seeds + b.seeds):
        return False, "unpaired: seeds unknown"
    seeds = common_seeds(a, b)
    if len(seeds) < 2 or 2 * len(seeds) < min(len(a.values), len(b.values)):
        if not seeds:
            return False, "unpaired: the two sides ran different seeds"
        return False, f"unpaired: only {len(seeds)} complete pair(s) by seed and data stage"
    left_a, left_b = len(a.values) - len(seeds), len(b.values) - len(seeds)
    if left_a or left_b:
        return True, (
            f"paired by seed: {len(seeds)} complete pairs; {left_a} run(s) of A and "
            f"{left_b} of B without a partner left out"
        )
    return True, "paired by seed"


def seed_clusters(sides: Sequence[Side]) -> list[Any]:
    """The seeds every side finished exactly once, all on the same data stage: the complete
    clusters of a curve line (every size of both families trained on the data of seed s)."""
    found: dict[Any, str] | None = None
    for side in sides:
        own = _single_seeds(side.seeds, side.data_stages)
        if found is None:
            found = own
        else:
            found = {s: st for s, st in found.items() if own.get(s, None) == st}
    return sorted(found or {}, key=repr)


def paired_order(a: Side, b: Side) -> tuple[np.ndarray, np.ndarray]:
    """A's and B's values of the complete pairs, lined up by seed."""
    seeds = common_seeds(a, b)
    ia = dict(zip(a.seeds, a.values))
    ib = dict(zip(b.seeds, b.values))
    return np.array([ia[s] for s in seeds]), np.array([ib[s] for s in seeds])


# -- P(A better), failures counting as losses ----------------------------------------------------


def _losses(side: Side, better: str, failures: bool) -> np.ndarray:
    """The side's runs as losses (lower is better), a failed run +inf when `failures`."""
    sign = 1.0 if better == LOWER else -1.0
    values = sign * np.asarray(side.values, float)
    if failures:
        values = np.concatenate([values, np.full(side.failures, np.inf)])
    return values


def probability_better(
    a: Side, b: Side, paired: bool, better: str, failures: bool = True
) -> tuple[float | None, tuple[int, int]]:
    """P(A better) and the sizes its interval needs: (pairs, 0) or (runs of A, runs of B).

    Paired: over the seeds both sides ran once (finished or failed, same data stage), the
    fraction A won (a failed run loses to a finished one, two failures tie; ties count half).
    Unpaired: over every (A run, B run) couple, the Mann-Whitney proportion. failures=False
    leaves the failed runs out."""
    if paired:
        sa = _single_seeds(
            a.seeds + (a.failed_seeds if failures else []),
            a.data_stages + (a.failed_stages if failures else []),
        )
        sb = _single_seeds(
            b.seeds + (b.failed_seeds if failures else []),
            b.data_stages + (b.failed_stages if failures else []),
        )
        seeds = [s for s in sa if s in sb and sa[s] == sb[s]]
        if not seeds:
            return None, (0, 0)
        sign = 1.0 if better == LOWER else -1.0
        la = dict(zip(a.seeds, sign * np.asarray(a.values, float)))
        lb = dict(zip(b.seeds, sign * np.asarray(b.values, float)))
        xa = np.array([la.get(s, np.inf) for s in seeds])
        xb = np.array([lb.get(s, np.inf) for s in seeds])
        won = float(np.sum(xa < xb) + 0.5 * np.sum(xa == xb))
        return won / len(seeds), (len(seeds), 0)
    xa, xb = _losses(a, better, failures), _losses(b, better, failures)
    if not xa.size or not xb.size:
        return None, (0, 0)
    theta = float(((xa[:, None] < xb[None, :]) + 0.5 * (xa[:, None] == xb[None, :])).mean())
    return theta, (xa.size, xb.size)


def improvement_intervals(
    thetas: Sequence[float], sizes: Sequence[tuple[int, int]]
) -> list[list[float]]:
    """95% score intervals of many P(A better) at once: Wilson's for a paired fraction of wins
    (sizes (pairs, 0)), Newcombe's for a Mann-Whitney proportion (sizes (n_a, n_b))."""
    theta = np.asarray(thetas, float)
    na, nb = (np.array([s[i] for s in sizes], float) for i in (0, 1))
    out = np.zeros((theta.size, 2))
    pairs = nb == 0
    if pairs.any():
        low, high = wilson(theta[pairs] * na[pairs], na[pairs])
        out[pairs] = np.stack([low, high], axis=1)
    if (~pairs).any():
        low, high = newcombe(theta[~pairs], na[~pairs], nb[~pairs])
        out[~pairs] = np.stack([low, high], axis=1)
    return out.tolist()


# -- one line's statistics ----------------------------------------------------------------------


@dataclass
class Stats:
    """What line_statistics finds: the difference, the test that fits the data, its p-value
    and the smallest p it could give (the floor, for the screen), its interval, the effect."""

    diff: float
    test: str
    p: float  # nan when no test can be used
    floor: float  # 1 when the line cannot be tested
    se: float = math.nan
    df: float = math.nan
    ci: list[float] | None = None
    effect: float | None = None
    effect_kind: str = ""
    sd: float | None = None  # the spread the power advice uses
    tost_p: float | None = None


def finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def line_statistics(xa: np.ndarray, xb: np.ndarray, paired: bool, margin: float = 0) -> Stats:
    """The test of one line, chosen by the data's shape (docs/compare.md, "The tests"):

    * paired, n >= 2 pairs with spread: the paired t test (power at small n, level held in
      simulation); its t interval;
    * unpaired, >= 2 runs a side, some spread: Welch's t test; its interval;
    * no spread at all (every difference equal; both sides constant): the exact sign-flip or
      permutation test, whose smallest p is 2/2^n (paired) or 2/C(n, n_a): degenerate data
      are never decided by a rule, only by an exact test that can reach the level;
    * fewer than 2 pairs, or fewer than 2 runs on a side: no test (floor 1).
    With a margin, the TOST p-value of equivalence within it (t tests only)."""
    xa, xb = np.asarray(xa, float), np.asarray(xb, float)
    if xa.size == 0 or xb.size == 0:
        return Stats(math.nan, "none: no finished run on a side", math.nan, 1.0)
    if paired:
        d = xa - xb
        diff, se, df = (float(v[0]) for v in paired_parts(d[None, :]))
        sd = float(d.std(ddof=1)) if d.size >= 2 else math.nan
        out = Stats(diff, "paired t", math.nan, 0.0, se, df, effect_kind="d_z (paired)")
        if d.size < 2:
            return Stats(diff, "none: fewer than 2 pairs", math.nan, 1.0)
        if not sd > 0:
            constant = bool(np.all(d == 0))
            return Stats(
                diff,
                "exact sign-flip (no spread)",
                1.0 if constant else float(sign_flip_p(d[None, :])[0]),
                1.0 if constant else smallest_sign_flip_p(d.size),
                sd=0.0,
            )
        out.effect, out.sd = diff / sd, sd
    else:
        diff, se, df = (float(v[0]) for v in welch_parts(xa[None, :], xb[None, :]))
        if xa.size < 2 or xb.size < 2:
            return Stats(diff, "none: fewer than 2 runs on a side", math.nan, 1.0)
        out = Stats(diff, "Welch t", math.nan, 0.0, se, df, effect_kind="Hedges' g")
        na, nb = xa.size, xb.size
        pooled = math.sqrt(((na - 1) * xa.var(ddof=1) + (nb - 1) * xb.var(ddof=1)) / (na + nb - 2))
        if not pooled > 0:
            constant = diff == 0
            return Stats(
                diff,
                "exact permutation (no spread)",
                1.0 if constant else permutation_p(xa, xb),
                1.0 if constant else smallest_permutation_p(na, nb),
                sd=0.0,
            )
        out.effect = (1 - 3 / (4 * (na + nb) - 9)) * diff / pooled  # Hedges' g
        out.sd = pooled
    return t_line(out, margin)


def t_line(out: Stats, margin: float) -> Stats:
    """The t test's p, interval and (with a margin) TOST p of a Stats with diff, se and df."""
    diff, se, df = (np.array([v]) for v in (out.diff, out.se, out.df))
    out.p = float(t_test(diff, se, df)[0])
    low, high = t_interval(diff, se, df)
    out.ci = [float(low[0]), float(high[0])]
    if margin:
        out.tost_p = finite(tost(diff, se, df, margin)[0])
    return out
