"""Pure statistics over numbers (numpy arrays): the bootstrap and its percentile intervals
(mean_ci: one group's mean, for metaplot --ci), the tests (sign-flip, Welch, a linear contrast),
Holm's correction, power and the repetitions needed. Nothing here knows about studies or
families; scipy is imported inside the functions that use it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

N_RESAMPLES = 10_000
SEED = 20_210_312  # fixed: the same database always gives the same report
SIGN_FLIP_EXACT_MAX = 16  # up to 2**16 sign patterns enumerated; beyond, Monte Carlo
SIGN_FLIP_RANDOM = 20_000
POWER = 0.8
MAX_REPETITIONS_ADVISED = 100_000


# -- bootstrap --------------------------------------------------------------------------------


def resample_weights(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, n) weights: resample_counts over n (a resample's mean is weights @ x)."""
    return resample_counts(rng, n, n_resamples) / n


def resample_counts(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, n) counts: how often each observation is drawn.

    The indices are drawn exactly as scipy.stats.bootstrap draws them (rng.integers(0, n,
    (n_resamples, n))), so with the same Generator seed both give the same resamples; the mean
    of a resample is then a matrix product, for many lines at once."""
    index = rng.integers(0, n, (n_resamples, n))
    offsets = index + n * np.arange(n_resamples)[:, None]
    return np.bincount(offsets.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def percentile_ci(boot: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of bootstrap distributions along the last axis (linear
    interpolation, as scipy.stats.bootstrap(method='percentile'))."""
    # np.quantile(boot, [tail, 1 - tail], axis=-1), without its copy of thousands of rows:
    # partition in place at the four order statistics involved, then interpolate as it does.
    spots = _spots(boot.shape[-1], confidence)
    boot.partition(sorted({k for b, a, _ in spots for k in (b, a)}), axis=-1)
    low, high = (boot[..., b] + (boot[..., a] - boot[..., b]) * frac for b, a, frac in spots)
    return low, high


def _spots(size: int, confidence: float) -> list[tuple[int, int, float]]:
    """For each tail: the order statistics around it and the interpolation fraction."""
    tail = (1 - confidence) / 2
    spots = []
    for q in (tail, 1 - tail):
        position = q * (size - 1)
        below = math.floor(position)
        spots.append((below, min(below + 1, size - 1), position - below))
    return spots


def counted_percentile_ci(
    numerators: np.ndarray, top: int, scale: float, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """percentile_ci of bootstrap values numerators / scale, where numerators (L, B) are
    integers in [0, top] (a probability of improvement): from a histogram per row, no sort."""
    rows, size = numerators.shape
    if numerators.dtype.kind == "f":
        numerators = np.rint(numerators).astype(np.intp)
    flat = numerators + (top + 1) * np.arange(rows)[:, None]
    cum = np.bincount(flat.ravel(), minlength=rows * (top + 1)).reshape(rows, top + 1).cumsum(1)

    def order(k: int) -> np.ndarray:  # the k-th smallest (0-based) of each row
        return (cum <= k).sum(axis=1) / scale

    low, high = (order(b) + (order(a) - order(b)) * frac for b, a, frac in _spots(size, confidence))
    return low, high


def mean_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap CI of one group's mean (metaplot --ci); a point for one value."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return float(x[0]), float(x[0])
    w = resample_weights(np.random.default_rng(seed), x.size, n_resamples)
    low, high = percentile_ci(w @ x, confidence)
    return float(low), float(high)


# -- tests ------------------------------------------------------------------------------------


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
    counts = np.zeros(d.shape[0])
    chunk = max(1, 2**24 // max(1, patterns.shape[0]))
    for start in range(0, d.shape[0], chunk):
        means = np.abs(patterns @ d[start : start + chunk].T) / n  # (K, chunk)
        counts[start : start + chunk] = (
            means >= observed[start : start + chunk] - tol[start : start + chunk]
        ).sum(axis=0)
    # Sampled patterns start with the identity, so this is (1 + count) / (1 + K) then.
    return counts / patterns.shape[0]


def smallest_sign_flip_p(n: int) -> float:
    """The smallest p-value a sign-flip test of n pairs can give: 2 / 2**n."""
    return 2.0 ** (1 - n) if n >= 1 else 1.0


def welch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, df, p) of Welch's two-sided t test for each row of a (L, na) against b (L, nb)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    na, nb = a.shape[1], b.shape[1]
    va, vb = a.var(axis=1, ddof=1) / na, b.var(axis=1, ddof=1) / nb
    diff = a.mean(axis=1) - b.mean(axis=1)
    return contrast_test(diff, np.stack([va, vb], axis=1), np.array([na - 1, nb - 1]))


def contrast_test(
    diff: np.ndarray, parts: np.ndarray, dofs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Welch-Satterthwaite t test of a linear contrast of group means.

    diff: the contrast (L,); parts: (L, G) its variance terms w_g**2 s_g**2 / n_g; dofs: (G,)
    or (L, G) the n_g - 1. A zero variance gives p = 0 for a non-zero contrast, 1 for zero."""
    from scipy import special

    var = parts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = var**2 / (parts**2 / dofs).sum(axis=1)
        t = diff / np.sqrt(var)
    p = 2 * special.stdtr(df, -np.abs(t))
    degenerate = ~(var > 0)
    p = np.where(degenerate, np.where(diff == 0, 1.0, 0.0), p)
    t = np.where(degenerate, np.where(diff == 0, 0.0, np.sign(diff) * np.inf), t)
    return t, np.where(degenerate, np.inf, df), p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.minimum(1.0, np.maximum.accumulate(scaled))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


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
    """Power of the paired test with n pairs, approximated by the paired t test's (the
    sign-flip test is asymptotically as powerful); 0 when n pairs cannot reach the level."""
    effect, sd, n = np.broadcast_arrays(*(np.asarray(x, float) for x in (effect, sd, n)))
    reachable = (n >= 2) & (sd > 0) & (2.0 ** (1 - n) <= level)
    with np.errstate(divide="ignore", invalid="ignore"):
        nc = np.abs(effect) / (sd / np.sqrt(n))
        power = np.where(reachable, _t_power(nc, n - 1, level), 0.0)
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
    smallest = math.ceil(1 + math.log2(1 / level)) if paired else 2  # 2**(1-n) <= level
    n = np.clip(n, smallest, MAX_REPETITIONS_ADVISED + 1)
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
