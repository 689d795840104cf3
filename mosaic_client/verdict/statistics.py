"""Pure statistics over numbers (numpy arrays): the tests of a verdict line (paired t, Welch,
exact permutation tests for degenerate data, TOST, Fisher's exact test of failure rates), the
intervals that invert them (t intervals; Wilson and Newcombe score intervals for P(A better); a
simultaneous band on a difference curve), the step-down correction of a report (Holm with
Tarone's screen), power and the repetitions needed, and the t interval of one group's mean
(mean_ci, for metaplot --ci).

Nothing here knows about studies or families; scipy is imported inside the functions that use
it (the thin client loads it only for the commands that need it)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

N_RESAMPLES = 10_000  # kept in the report's JSON: no bootstrap is drawn any more
SEED = 20_210_312  # fixed: the same database always gives the same report
SIGN_FLIP_EXACT_MAX = 16  # up to 2**16 sign patterns enumerated; beyond, Monte Carlo
SIGN_FLIP_RANDOM = 20_000
SPLITS_EXACT_MAX = 100_000  # unpaired permutation test: splits enumerated up to this many
POWER = 0.8
MAX_REPETITIONS_ADVISED = 100_000
CONFIDENCE = 0.95


# -- one group's mean (metaplot --ci) -----------------------------------------------------------


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The t interval of one group's mean (metaplot --ci), mean +- t quantile * s / sqrt(n):
    exact coverage for normal values, where a percentile bootstrap of 6 values covers about
    87% for a nominal 95%; a point for one value or for values without spread."""
    x = np.asarray(values, dtype=float)
    if x.size < 2 or not x.std() > 0:
        return float(x.mean()), float(x.mean())
    mean, se, df = paired_parts(x[None, :])
    low, high = t_interval(mean, se, df, confidence)
    return float(low[0]), float(high[0])


# -- t tests and their intervals --------------------------------------------------------------


def t_p(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided p-value of a t statistic; nan where t or df is not finite."""
    from scipy import special

    with np.errstate(invalid="ignore"):
        return 2 * special.stdtr(df, -np.abs(t))


def paired_parts(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, standard error, df) of the differences of each row of d (L, n)."""
    d = np.atleast_2d(np.asarray(d, float))
    n = d.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        se = d.std(axis=1, ddof=1) / math.sqrt(n) if n >= 2 else np.full(d.shape[0], np.nan)
    return d.mean(axis=1), se, np.full(d.shape[0], n - 1.0)


def welch_parts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(difference of means, standard error, Welch-Satterthwaite df) for rows of a and b."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    na, nb = a.shape[1], b.shape[1]
    if na < 2 or nb < 2:
        nan = np.full(a.shape[0], np.nan)
        return a.mean(axis=1) - b.mean(axis=1), nan, nan
    parts = np.stack([a.var(axis=1, ddof=1) / na, b.var(axis=1, ddof=1) / nb], axis=1)
    diff, se, df = contrast_parts(
        a.mean(axis=1) - b.mean(axis=1), parts, np.array([na - 1, nb - 1])
    )
    return diff, se, df


def contrast_parts(
    diff: np.ndarray, parts: np.ndarray, dofs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contrast, standard error, Welch-Satterthwaite df) of a linear contrast of group means.

    parts: (L, G) the contrast's variance terms w_g**2 s_g**2 / n_g; dofs: (G,) or (L, G) the
    n_g - 1. A zero variance gives se 0 and df nan: the t test cannot be used there."""
    var = parts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = var**2 / (parts**2 / dofs).sum(axis=1)
    return diff, np.sqrt(var), np.where(var > 0, df, np.nan)


def t_test(diff: np.ndarray, se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Two-sided p of diff / se ~ t(df); nan where se is 0 or unknown (degenerate: never p = 0
    by rule, the caller uses an exact test or says the line has too few repetitions)."""
    ok = (se > 0) & np.isfinite(df)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, t_p(diff / np.where(ok, se, 1.0), np.where(ok, df, 1.0)), np.nan)


def t_interval(
    diff: np.ndarray, se: np.ndarray, df: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """diff +- t quantile * se: the interval that inverts the t test (excludes 0 exactly when
    the test's p < 1 - confidence); nan where the test cannot be used."""
    from scipy import special

    ok = (se > 0) & np.isfinite(df)
    q = special.stdtrit(np.where(ok, df, 1.0), 1 - (1 - confidence) / 2)
    half = np.where(ok, q * se, np.nan)
    return diff - half, diff + half


def tost(diff: np.ndarray, se: np.ndarray, df: np.ndarray, margin: float) -> np.ndarray:
    """Two one-sided t tests of |mean difference| >= margin (Schuirmann 1987): the p-value of
    equivalence within +-margin is the larger of the two one-sided p-values; nan where the t
    test cannot be used."""
    from scipy import special

    ok = (se > 0) & np.isfinite(df)
    s, f = np.where(ok, se, 1.0), np.where(ok, df, 1.0)
    lower = special.stdtr(f, -(diff + margin) / s)  # H0: diff <= -margin
    upper = special.stdtr(f, (diff - margin) / s)  # H0: diff >= +margin
    return np.where(ok, np.maximum(lower, upper), np.nan)


def simultaneous_band(
    la: np.ndarray, ya: np.ndarray, lb: np.ndarray, yb: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A simultaneous band on the difference of two curves measured on the same seeds.

    la, lb: the log sizes of each curve (sorted); ya (len(la), S), yb (len(lb), S): the values
    of each size at each of S seeds. Each seed's difference curve f_A,s - f_B,s is piecewise
    linear between the knots (the union of the sizes, within the overlap); at each of the J
    knots, mean +- t(1 - (1 - confidence) / (2 J), S - 1) * sd / sqrt(S) (Bonferroni over the
    knots: every knot covered at once with probability >= confidence for normal per-seed
    differences), and a band that holds at every knot holds for the linear pieces between
    them. Returns (knots, mean, low, high)."""
    from scipy import special

    lo, hi = max(la.min(), lb.min()), min(la.max(), lb.max())
    knots = np.unique(np.concatenate([la, lb, [lo, hi]]))
    knots = knots[(knots >= lo) & (knots <= hi)]
    seeds = ya.shape[1]
    fa = np.stack([np.interp(knots, la, ya[:, s]) for s in range(seeds)])
    fb = np.stack([np.interp(knots, lb, yb[:, s]) for s in range(seeds)])
    d = fa - fb  # (seeds, knots)
    mean, se = d.mean(axis=0), d.std(axis=0, ddof=1) / math.sqrt(seeds)
    q = special.stdtrit(seeds - 1, 1 - (1 - confidence) / (2 * knots.size))
    return knots, mean, mean - q * se, mean + q * se


def welch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, df, p) of Welch's two-sided t test for each row of a (L, na) against b (L, nb);
    nan where both sides have zero variance."""
    diff, se, df = welch_parts(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / se, np.nan)
    return t, df, t_test(diff, se, df)


# -- exact tests for degenerate data ----------------------------------------------------------


def sign_patterns(n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(K, n) rows of +-1: for n <= SIGN_FLIP_EXACT_MAX the 2**(n-1) patterns whose first sign
    is +1 (s and -s give the same |mean|, so half of all patterns carry the exact
    distribution), else the identity followed by SIGN_FLIP_RANDOM random patterns."""
    if n <= SIGN_FLIP_EXACT_MAX:
        # Numbers below 2**(n-1) have bit n-1 clear: reversed, the first sign is always +1.
        bits = (np.arange(2 ** max(n - 1, 0))[:, None] >> np.arange(n)[None, :]) & 1
        return 1 - 2 * bits[:, ::-1].astype(float)
    rng = rng or np.random.default_rng(SEED)
    random = rng.choice([-1.0, 1.0], size=(SIGN_FLIP_RANDOM, n))
    return np.vstack([np.ones((1, n)), random])


def sign_flip_p(d: np.ndarray, patterns: np.ndarray | None = None) -> np.ndarray:
    """Two-sided sign-flip permutation p-values of mean(d) = 0, for each row of d (L, n).

    Under the null of a paired comparison each difference is symmetric about 0, so every
    pattern of signs is equally likely; p = the fraction of patterns whose |mean| is at least
    the observed one (exact enumeration; (1 + count) / (1 + K) when sampled)."""
    d = np.atleast_2d(np.asarray(d, dtype=float))
    n = d.shape[1]
    patterns = sign_patterns(n) if patterns is None else patterns
    observed = np.abs(d.mean(axis=1))
    # A relative tolerance so that float rounding never hides a tie with the observed value.
    tol = 1e-9 * np.maximum(np.abs(d).max(axis=1), 1e-300)
    means = np.abs(patterns @ d.T) / n  # (K, L)
    counts = (means >= observed - tol).sum(axis=0)
    return counts / patterns.shape[0]


def smallest_sign_flip_p(n: int) -> float:
    """The smallest p-value a sign-flip test of n pairs can give: 2 / 2**n."""
    return 2.0 ** (1 - n) if n >= 1 else 1.0


def permutation_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact permutation p-value of mean(a) - mean(b) = 0 (every split of the pooled
    values into groups of len(a) and len(b) equally likely under exchangeability), twice the
    smaller tail as scipy.stats.permutation_test; sampled splits beyond SPLITS_EXACT_MAX."""
    pooled = np.concatenate([a, b]).astype(float)
    na, n = len(a), len(a) + len(b)
    if math.comb(n, na) <= SPLITS_EXACT_MAX:
        index = np.array(list(itertools.combinations(range(n), na)))
    else:
        rng = np.random.default_rng(SEED)
        index = np.argsort(rng.random((SIGN_FLIP_RANDOM, n)), axis=1)[:, :na]
        index = np.vstack([np.arange(na)[None, :], index])
    total = pooled.sum()
    sums = pooled[index].sum(axis=1)
    diffs = sums / na - (total - sums) / (n - na)
    observed = float(a.mean() - b.mean())
    tol = 1e-9 * max(float(np.abs(pooled).max()), 1e-300)
    tails = np.mean(diffs <= observed + tol), np.mean(diffs >= observed - tol)
    return float(min(1.0, 2 * min(tails)))


def smallest_permutation_p(na: int, nb: int) -> float:
    """The smallest p the exact permutation test of na against nb values can give: one
    extreme split of C(n, na), doubled."""
    if na < 1 or nb < 1:
        return 1.0
    return min(1.0, 2 / math.comb(na + nb, na))


# -- failures ---------------------------------------------------------------------------------


def fisher_p(failed_a: int, n_a: int, failed_b: int, n_b: int) -> float:
    """Two-sided Fisher's exact test of equal failure rates: failed_a of n_a runs against
    failed_b of n_b (scipy.stats.fisher_exact)."""
    from scipy import stats

    table = [[failed_a, n_a - failed_a], [failed_b, n_b - failed_b]]
    return float(stats.fisher_exact(table).pvalue)


def smallest_fisher_p(failed: int, n_a: int, n_b: int) -> float:
    """The smallest p Fisher's test can give with these margins (`failed` runs failed in all):
    the test is conditional on them, so this floor is known before looking at which side
    failed (Tarone 1990)."""
    if failed == 0 or failed == n_a + n_b:
        return 1.0
    low, high = max(0, failed - n_b), min(failed, n_a)
    return min(fisher_p(k, n_a, failed - k, n_b) for k in range(low, high + 1))


# -- P(A better): score intervals --------------------------------------------------------------


def wilson(successes: np.ndarray, n: np.ndarray, confidence: float = CONFIDENCE) -> tuple:
    """Wilson's score interval of a proportion (statsmodels proportion_confint 'wilson'):
    never collapses to a point at 0 or 1, unlike a bootstrap of n wins out of n."""
    from scipy import special

    z = special.ndtri(1 - (1 - confidence) / 2)
    n = np.asarray(n, float)
    p = np.asarray(successes, float) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def _hanley_mcneil_var(theta: np.ndarray, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """Newcombe's (2006) form of the Hanley-McNeil variance of a Mann-Whitney proportion at
    theta, with both group sizes replaced by their mean (his method 5)."""
    star = (na + nb) / 2 - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (1 - theta) / (2 - theta) + theta / (1 + theta)
    return theta * (1 - theta) * (1 + star * q) / (na * nb)


def newcombe(
    theta: np.ndarray, na: np.ndarray, nb: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """Score interval of the Mann-Whitney proportion theta = U / (na nb) (Newcombe 2006,
    method 5): the thetas t with |theta - t| <= z sqrt(V(t)), found by bisection on each side;
    it has width at theta = 0 or 1, where a bootstrap collapses to a point."""
    from scipy import special

    z = special.ndtri(1 - (1 - confidence) / 2)
    theta, na, nb = (np.asarray(x, float) for x in (theta, na, nb))

    def outside(t: np.ndarray) -> np.ndarray:
        return (theta - t) ** 2 > z * z * _hanley_mcneil_var(t, na, nb)

    bounds = []
    for edge in (0.0, 1.0):
        # between the edge (outside unless theta is there) and theta (inside): bisection
        far, near = np.full_like(theta, edge), theta.copy()
        for _ in range(60):
            mid = (far + near) / 2
            out = outside(mid)
            far, near = np.where(out, mid, far), np.where(out, near, mid)
        bounds.append(np.where(outside(np.full_like(theta, edge)), near, edge))
    return bounds[0], bounds[1]


# -- the report's correction -------------------------------------------------------------------


def step_down(
    p: Sequence[float], floors: Sequence[float], groups: Sequence[Any], alpha: float
) -> tuple[list[float | None], int]:
    """Holm's step-down over the hypotheses a report can reject, with Tarone's screen.

    p: each hypothesis's p-value; floors: the smallest p its test can give (0 for a t test);
    groups: hypotheses of one group cannot be true together (a line's "no difference" and
    "not equivalent"), so at most one true null per group. Tarone (1990): with K the smallest
    number such that the groups of the hypotheses with floor <= alpha / K number at most K,
    the others can never be rejected and leave the family. Holm then steps down with the
    divisor = the groups that still hold an unrejected hypothesis (the true nulls can be no
    more; with one hypothesis a group this is plain Holm). Returns the adjusted p-values (None
    for a screened-out hypothesis) and K."""
    p_, floors_ = np.asarray(p, float), np.asarray(floors, float)
    # count(k) = the groups with a hypothesis of floor <= alpha / k falls as k grows; it is
    # at least the groups of the hypotheses that can reach any level (floor 0): start there.
    k = max(1, len({groups[i] for i in np.flatnonzero(floors_ <= 0)}))
    while True:
        chosen = floors_ <= alpha / k
        needed = len({groups[i] for i in np.flatnonzero(chosen)})
        if needed <= k:
            break
        k += 1
    members = [i for i in np.flatnonzero(chosen) if np.isfinite(p_[i])]
    adjusted: list[float | None] = [None] * len(p_)
    remaining: dict[Any, int] = {}
    for i in members:
        remaining[groups[i]] = remaining.get(groups[i], 0) + 1
    open_groups = len(remaining)  # groups that still hold an unrejected hypothesis
    running = 0.0
    for i in sorted(members, key=lambda j: p_[j]):
        running = max(running, min(1.0, open_groups * float(p_[i])))
        adjusted[i] = running
        remaining[groups[i]] -= 1
        open_groups -= remaining[groups[i]] == 0
    return adjusted, k


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order."""
    adjusted, _ = step_down(p_values, [0.0] * len(p_values), list(range(len(p_values))), 1.0)
    return [float(a) for a in adjusted if a is not None]


# -- power ------------------------------------------------------------------------------------


def _t_power(nc: np.ndarray, df: np.ndarray, level: float) -> np.ndarray:
    """P(|T| > t crit) for a noncentral t with noncentrality nc and df degrees of freedom."""
    from scipy import special

    crit = special.stdtrit(df, 1 - level / 2)
    # nctdtr gives nan far in its tails (a huge nc; the lower tail of a large nc), where the
    # probabilities are 1 and 0 to double precision.
    nc = np.minimum(nc, 1e6)
    upper = 1 - special.nctdtr(df, nc, crit)
    lower = np.nan_to_num(special.nctdtr(df, nc, -crit), nan=0.0)
    return upper + lower


def power_two_sample(effect: Any, sd: Any, n: Any, level: float) -> Any:
    """Power of a two-sided Welch test with n per group and equal spreads: the noncentral t
    with 2n - 2 degrees of freedom (vectorised over arrays)."""
    effect, sd, n = np.broadcast_arrays(*(np.asarray(x, float) for x in (effect, sd, n)))
    ok = (n >= 2) & (sd > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        nc = np.abs(effect) / (sd * np.sqrt(2 / n))
        power = np.where(ok, _t_power(nc, 2 * n - 2, level), np.nan)
    return float(power) if power.ndim == 0 else power


def power_paired(effect: Any, sd: Any, n: Any, level: float) -> Any:
    """Power of the two-sided paired t test with n pairs (noncentral t, n - 1 df)."""
    effect, sd, n = np.broadcast_arrays(*(np.asarray(x, float) for x in (effect, sd, n)))
    ok = (n >= 2) & (sd > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        nc = np.abs(effect) / (sd / np.sqrt(n))
        power = np.where(ok, _t_power(nc, n - 1, level), 0.0)
    return float(power) if power.ndim == 0 else power


def repetitions_needed_many(
    effect: np.ndarray, sd: np.ndarray, paired: bool, level: float, power: float = POWER
) -> np.ndarray:
    """repetitions_needed for many lines at once; 0 where it cannot be said.

    Starts from the normal approximation (a z test needs no more repetitions than the t test
    it approximates) and steps up until the t power is reached: a few vectorised steps."""
    from scipy import special

    effect, sd = np.abs(np.asarray(effect, float)), np.asarray(sd, float)
    func = power_paired if paired else power_two_sample
    valid = (sd > 0) & np.isfinite(sd) & (effect > 0) & np.isfinite(effect)
    effect, sd = np.where(valid, effect, 1.0), np.where(valid, sd, 1.0)
    z = special.ndtri(1 - level / 2) + special.ndtri(power)
    n = np.ceil((1 if paired else 2) * (z * sd / effect) ** 2)
    n = np.clip(n, 2, MAX_REPETITIONS_ADVISED + 1)
    short = valid & (n <= MAX_REPETITIONS_ADVISED)
    while short.any():
        short[short] = func(effect[short], sd[short], n[short], level) < power
        n[short] += 1
        short &= n <= MAX_REPETITIONS_ADVISED
    return np.where(valid & (n <= MAX_REPETITIONS_ADVISED), n, 0).astype(int)


def repetitions_needed(
    effect: float, sd: float, paired: bool, level: float, power: float = POWER
) -> int | None:
    """The smallest repetitions per group (pairs when paired) giving `power` against `effect`
    at `level`; None when it cannot be said (no spread estimate, or no difference to find)."""
    n = int(repetitions_needed_many(np.array([effect]), np.array([sd]), paired, level, power)[0])
    return n or None
