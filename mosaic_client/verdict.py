"""The statistics behind `mosaic compare` and `metaplot --ci`: pure functions over numbers,
plus the reading of one metric's values from a study (study_values).

Imported only by the commands that need it (numpy and scipy are slow to import; `mosaic status`
must stay fast). docs/compare.md gives the procedure, the formulas and the references; the
choices in short:

* one comparison *line* = one size of family A against the nearest size of family B (within a
  factor), or the whole curves of A and B over their overlapping nb_params range;
* paired by repetition when both sides ran the same seeds on the same data stage, else unpaired;
* the test: an exact sign-flip permutation test of the mean difference (paired), Welch's t test
  (unpaired), a Welch-Satterthwaite t test of a linear contrast (curves);
* the verdict: Holm-adjusted p-value <= alpha across every tested line of one report; the
  bootstrap confidence intervals (percentile, 10,000 resamples, fixed seed) are descriptive;
* lines that can never reach alpha (too few repetitions) are left out of the Holm family
  (Tarone 1990: a hypothesis that cannot be rejected does not count towards the error rate).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

N_RESAMPLES = 10_000
SEED = 20_210_312  # fixed: the same database always gives the same report
SIGN_FLIP_EXACT_MAX = 16  # up to 2**16 sign patterns enumerated; beyond, Monte Carlo
SIGN_FLIP_RANDOM = 20_000
POWER = 0.8
MAX_REPETITIONS_ADVISED = 100_000

# Which way is better, per run_results column (docs/compare.md, "Direction").
LOWER, HIGHER = "lower", "higher"
DIRECTIONS: dict[str, str] = {
    "train_loss": LOWER,
    "test_loss": LOWER,
    "train_acc": HIGHER,
    "test_acc": HIGHER,
    "duration(s)": LOWER,  # cheaper to train
    "overfit": LOWER,  # a smaller gap between the final train and test losses
    "trainability": LOWER,  # the mean test loss over all epochs: learns sooner and better
    "slope": LOWER,  # a more negative final slope: the train loss still falls faster
}
NOT_OUTCOMES = {
    "nb_params": "it is the size axis the families are matched on",
    "epochs": "it is fixed by the configuration, not an outcome of training",
}

# The params that differ between the repetitions of one configuration (docs/compare.md).
REPETITION_PARAMS = ("seed", "process_seed", "owner", "owner_uid")

A_BETTER, B_BETTER = "A better", "B better"
NO_DIFFERENCE, TOO_FEW = "no detectable difference", "too few repetitions"


class VerdictError(ValueError):
    """Input the comparison cannot use, with what to do instead."""


def direction(metric: str) -> str:
    if metric in NOT_OUTCOMES:
        raise VerdictError(
            f"cannot compare on {metric}: {NOT_OUTCOMES[metric]}; use one of: "
            f"{', '.join(DIRECTIONS)}"
        )
    return DIRECTIONS[metric]


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


def _better_matrix(diff: np.ndarray, better: str) -> np.ndarray:
    """1 where the first value is better, 0.5 on ties, 0 where worse."""
    sign = np.sign(diff) if better == HIGHER else -np.sign(diff)
    return (sign + 1) / 2


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


# -- one comparison line ----------------------------------------------------------------------


@dataclass
class Side:
    """The runs of one family at one size: values of the metric, with seed and data stage."""

    family: str
    nb_params: int
    values: list[float]
    run_ids: list[int] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    data_stages: list[str] = field(default_factory=list)

    @functools.cached_property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)

    @functools.cached_property
    def var(self) -> float:
        """Sample variance; nan for a single value."""
        if len(self.values) < 2:
            return math.nan
        m = self.mean
        return math.fsum((v - m) ** 2 for v in self.values) / (len(self.values) - 1)


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
    import bisect

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


# -- sequential decisions (--until-decided) -----------------------------------------------------


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


def sequential_decisions(
    p_values: np.ndarray,
    looks: Sequence[int],
    max_repetitions: int,
    alpha: float,
    spending: str = "obrien-fleming",
) -> np.ndarray:
    """For p-values (S, K) of S sequences at K looks (repetitions `looks`), the look index at
    which each sequence is decided, or -1: what the plan does, vectorised for simulation."""
    plan = SequentialPlan(alpha, max_repetitions, spending)
    levels = np.array([plan.level(n) for n in looks])
    hit = p_values <= levels[None, :]
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    return first


# -- reading a study --------------------------------------------------------------------------


def _data_stage(params: dict[str, Any], cache: dict[Any, str] | None = None) -> str:
    """The modules of the run's data_scheme types, without their keys: two runs with the same
    data stage and the same seed saw the same data."""
    key = (params.get("pipeline"), params.get("data_scheme"))
    if cache is not None and key in cache:
        return cache[key]
    stage = _parse_data_stage(params)
    if cache is not None:
        cache[key] = stage
    return stage


def _parse_data_stage(params: dict[str, Any]) -> str:
    import json

    from mosaic_client import analysis

    types = set(analysis._types(params, "data_scheme"))
    try:
        modules = json.loads(params.get("pipeline") or "[]")
    except (TypeError, ValueError):
        return ""
    if not isinstance(modules, list):
        return ""
    stage = [
        {k: v for k, v in m.items() if k != "key"}
        for m in modules
        if isinstance(m, dict) and m.get("type") in types
    ]
    return json.dumps(stage, sort_keys=True)


@dataclass
class StudyValues:
    """The metric of every finished run, as sides: {dataset key: {family: {nb_params: Side}}}."""

    metric: str
    sides: dict[str, dict[str, dict[int, Side]]]
    skipped: dict[str, int]
    configurations: dict[tuple[str, str, int], int]  # how many configuration groups per point


def study_values(conn: Any, metric: str) -> StudyValues:
    from mosaic_client import analysis

    analysis.check_criterion(metric)
    direction(metric)
    params = analysis.run_params(conn)
    statuses = dict(conn.execute("SELECT run_id, status FROM runs"))
    column = analysis._quoted(metric)
    results = {
        row[0]: row[1:]
        for row in conn.execute(f"SELECT run_id, nb_params, {column} FROM run_results")
    }
    sides: dict[str, dict[str, dict[int, Side]]] = {}
    skipped: dict[str, int] = {}
    configs: dict[tuple[str, str, int], set[Any]] = {}
    stages: dict[Any, str] = {}
    for run_id in sorted(statuses):
        own = params.get(run_id, {})
        key = analysis.data_key(own)
        if key is None:
            continue
        row = results.get(run_id)
        if statuses[run_id] != "done":
            reason = statuses[run_id]
        elif row is None or row[0] is None:
            reason = "without results"
        elif row[1] is None or not math.isfinite(row[1]):
            reason = f"without {metric}"
        else:
            reason = ""
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            sides.setdefault(key, {})
            continue
        family = analysis.model_key(own) or "(no model key)"
        size = int(row[0])
        side = (
            sides.setdefault(key, {})
            .setdefault(family, {})
            .setdefault(size, Side(family, size, []))
        )
        side.values.append(float(row[1]))
        side.run_ids.append(run_id)
        side.seeds.append(own.get("seed"))
        side.data_stages.append(_data_stage(own, stages))
        # Everything but the repetition's own params (set operations: fast on 10,000 runs).
        signature = frozenset(own.items()) - {(k, own.get(k)) for k in REPETITION_PARAMS}
        configs.setdefault((key, family, size), set()).add(signature)
    return StudyValues(metric, sides, skipped, {k: len(v) for k, v in configs.items()})


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
    from mosaic_client.analysis import AnalysisError

    better = direction(values.metric)
    present = sorted(values.sides)
    if data_keys:
        for key in data_keys:
            if key not in values.sides:
                listing = ", ".join(present) if present else "none (the study has no run)"
                raise AnalysisError(f"no run has dataset key {key!r}; keys present: {listing}")
    keys = list(data_keys) if data_keys else present
    pairs: list[tuple[Side, Side]] = []
    pair_keys: list[str] = []
    curves: list[tuple[list[Side], list[Side], str]] = []
    unmatched: list[dict[str, Any]] = []
    notes: list[str] = []
    for key in keys:
        by_family = values.sides[key]
        names = sorted(by_family)
        if families:
            missing = [f for f in families if f not in by_family]
            if missing:
                raise AnalysisError(
                    f"no finished run of model key {', '.join(map(repr, missing))} on dataset key "
                    f"{key!r}; model keys present: {', '.join(names) or 'none'}"
                )
            names = list(families)
        if len(names) < 2:
            notes.append(f"{key}: {len(names)} model key(s) with finished runs; nothing to compare")
            continue
        for (k, fam, size), count in sorted(values.configurations.items()):
            if k == key and fam in names and count > 1:
                notes.append(
                    f"{key}: {fam} at {size} parameters pools {count} configurations "
                    "that differ in more than the seed"
                )
        for i, fa in enumerate(names):
            for fb in names[i + 1 :]:
                sa, sb = by_family[fa], by_family[fb]
                matched, lonely_a, lonely_b = match_sizes(list(sa), list(sb), size_tolerance)
                pairs.extend((sa[x], sb[y]) for x, y in matched)
                pair_keys.extend(key for _ in matched)
                for fam, other, sizes in ((fa, fb, lonely_a), (fb, fa, lonely_b)):
                    unmatched.extend(
                        {"dataset_key": key, "family": fam, "nb_params": s, "against": other}
                        for s in sizes
                    )
                curves.append(([sa[s] for s in sorted(sa)], [sb[s] for s in sorted(sb)], key))
    lines = size_lines(pairs, "", better, alpha, n_resamples, seed)
    for line, key in zip(lines, pair_keys):
        line.dataset_key = key
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
        unmatched,
        notes,
    )
