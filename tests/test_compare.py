"""`mosaic compare` and `mosaic groups`: every statistic against scipy computed independently,
and the error rates, coverage and power of the verdict by simulation (small, vectorised: each
simulation runs in about a second).

The end-to-end tests through a real daemon are in test_analysis.py, on its trained study.
"""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO
from scipy import stats

from mosaic_client.verdict import comparison, reading, sequential
from mosaic_client.verdict import lines as lines_mod
from mosaic_client.verdict import statistics as vstats
from mosaicd.scheduling.submissions import run_params
from mosaicd.storage.store import RESULT_COLUMNS, Store

ALPHA = 0.05


def lower_better_pi(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(difference < 0) with ties counting half: scipy-side statistic for paired lines."""
    return ((x < 0) + 0.5 * (x == 0)).mean(axis=axis)


def side(
    family: str,
    values: Sequence[float],
    seeds: Sequence[Any] | None = None,
    failed: Sequence[Any] = (),
) -> reading.Side:
    """A side of finished runs (seeds None: unknown, unpaired) and failed runs with seeds."""
    seeds = list(seeds) if seeds is not None else [None] * len(values)
    out = reading.Side(family, 10, list(values), seeds=seeds, data_stages=[""] * len(values))
    for seed in failed:
        out.add_failure(0, {"seed": seed}, "")
    return out


def one_line(
    a: np.ndarray,
    b: np.ndarray,
    paired: bool,
    better: str = reading.LOWER,
    margin: float = 0,
    failed: tuple[int, int] = (0, 0),
) -> comparison.Line:
    seeds = list(range(len(a))) if paired else None
    side_a = side("A", a, seeds, failed=range(100, 100 + failed[0]))
    side_b = side("B", b, seeds, failed=range(200, 200 + failed[1]))
    (line,) = comparison.size_lines([(side_a, side_b)], "data", better, margin)
    assert line.paired is paired
    return line


# -- each statistic against scipy ---------------------------------------------------------------


def test_paired_line_is_scipy_ttest_rel_with_its_interval() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 8), rng.normal(0.4, 1, 8)
    line = one_line(a, b, paired=True)
    ref = stats.ttest_rel(a, b)
    assert line.test == "paired t" and line.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert line.ci == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert line.diff == pytest.approx(np.mean(a) - np.mean(b))
    d = a - b
    assert line.effect_size == pytest.approx(d.mean() / np.std(d, ddof=1), rel=1e-12)
    # P(A better): the fraction of pairs A won (lower is better), Wilson's score interval
    wins = int(np.sum(a < b))
    assert line.p_improvement == pytest.approx(wins / 8)
    wilson = stats.binomtest(wins, 8).proportion_ci(0.95, method="wilson")
    assert line.p_improvement_ci == pytest.approx([wilson.low, wilson.high], rel=1e-9)


def test_unpaired_line_is_scipy_welch_with_its_interval() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 6), rng.normal(0.5, 2, 9)
    line = one_line(a, b, paired=False)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert line.test == "Welch t" and line.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert line.ci == pytest.approx([ci.low, ci.high], rel=1e-9)
    pooled = math.sqrt((5 * np.var(a, ddof=1) + 8 * np.var(b, ddof=1)) / 13)
    g = (1 - 3 / (4 * 15 - 9)) * (a.mean() - b.mean()) / pooled
    assert line.effect_size == pytest.approx(g, rel=1e-12)
    # P(A better) is the Mann-Whitney U of B against A over all pairs (lower is better).
    u = stats.mannwhitneyu(b, a).statistic
    assert line.p_improvement == pytest.approx(u / (len(a) * len(b)))


def newcombe_by_grid(theta: float, na: int, nb: int) -> tuple[float, float]:
    """Newcombe (2006) method 5, by brute force over a fine grid: the thetas t whose
    |theta - t| <= z sqrt(t (1 - t) (1 + (N - 1)((1 - t)/(2 - t) + t/(1 + t))) / (na nb)),
    N = (na + nb) / 2."""
    z = stats.norm.ppf(0.975)
    t = np.linspace(0, 1, 2_000_001)
    n_star = (na + nb) / 2
    var = t * (1 - t) * (1 + (n_star - 1) * ((1 - t) / (2 - t) + t / (1 + t))) / (na * nb)
    inside = t[(theta - t) ** 2 <= z * z * var]
    return float(inside.min()), float(inside.max())


@pytest.mark.parametrize(
    ("theta", "na", "nb"), [(1.0, 6, 6), (0.5, 5, 7), (0.8, 10, 4), (0.0, 3, 3)]
)
def test_probability_of_improvement_interval_is_newcombes_and_never_a_point(
    theta: float, na: int, nb: int
) -> None:
    low, high = vstats.newcombe(np.array([theta]), np.array([na]), np.array([nb]))
    ref = newcombe_by_grid(theta, na, nb)
    assert (low[0], high[0]) == pytest.approx(ref, abs=2e-6)
    assert high[0] - low[0] > 0.1  # 6 of 6 wins is not certainty: no [1.00, 1.00]


def test_a_clean_sweep_has_an_interval_below_one() -> None:
    a, b = np.linspace(0.1, 0.2, 6), np.linspace(0.5, 0.6, 6)
    for paired in (True, False):
        line = one_line(a, b, paired=paired)
        assert line.p_improvement == 1.0 and line.p_improvement_ci[0] < 0.7
        assert line.p_improvement_ci[1] == 1.0


def test_tost_is_two_one_sided_scipy_t_tests() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.normal(0, 1, 10), rng.normal(0.1, 1, 10)
    margin = 1.0
    line = one_line(a, b, paired=True, margin=margin)
    d = a - b
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    assert line.tost_p == pytest.approx(max(lower, upper), rel=1e-9)
    line = one_line(a, b + 0.3, paired=False, margin=margin)
    lower = stats.ttest_ind(a + margin, b + 0.3, equal_var=False, alternative="greater").pvalue
    upper = stats.ttest_ind(a - margin, b + 0.3, equal_var=False, alternative="less").pvalue
    assert line.tost_p == pytest.approx(max(lower, upper), rel=1e-9)


def test_failure_rates_are_fishers_exact_test() -> None:
    a, b = np.linspace(0.1, 0.3, 6), np.linspace(0.1, 0.3, 8)
    line = one_line(a, b, paired=False, failed=(4, 0))
    ref = stats.fisher_exact([[4, 6], [0, 8]]).pvalue
    assert (line.failed_a, line.failed_b, line.runs_a, line.runs_b) == (4, 0, 10, 8)
    assert line.failure_p == pytest.approx(ref, rel=1e-12)
    # the floor: the smallest p over every table with these margins (4 failures of 18 runs)
    floor = min(stats.fisher_exact([[k, 10 - k], [4 - k, 4 + k]]).pvalue for k in range(5))
    assert vstats.smallest_fisher_p(4, 10, 8) == pytest.approx(floor)
    assert vstats.smallest_fisher_p(0, 10, 8) == 1.0


def test_failed_runs_count_as_losses_in_p_of_improvement() -> None:
    a = side("A", [0.1, 0.2, 0.3], seeds=[0, 1, 2], failed=[3])
    b = side("B", [0.5, 0.6, 0.7, 0.8], seeds=[0, 1, 2, 3])
    # paired over the 4 seeds both ran: A wins 3, loses seed 3 (its run failed)
    pi, sizes = lines_mod.probability_better(a, b, True, reading.LOWER)
    assert (pi, sizes) == (0.75, (4, 0))
    ((low, high),) = lines_mod.improvement_intervals([pi], [sizes])
    wilson = stats.binomtest(3, 4).proportion_ci(0.95, method="wilson")
    assert (low, high) == pytest.approx((wilson.low, wilson.high))
    pi, sizes = lines_mod.probability_better(a, b, True, reading.LOWER, failures=False)
    assert (pi, sizes) == (1.0, (3, 0))
    # unpaired: the failed run loses to each of B's 4 runs: 12 of 16 couples won
    pi, sizes = lines_mod.probability_better(a, b, False, reading.LOWER)
    assert (pi, sizes) == (12 / 16, (4, 4))
    both = side("B", [0.5], seeds=[0], failed=[1])
    a_one = side("A", [0.1], [0], failed=[1])
    assert lines_mod.probability_better(a_one, both, True, reading.LOWER)[0] == 0.75
    # seed 0 won, seed 1: both failed, a tie


def test_mean_ci_for_metaplot_is_scipys_t_interval_and_covers() -> None:
    x = [0.31, 0.29, 0.40, 0.35, 0.33]
    ref = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert vstats.mean_ci(x) == pytest.approx((ref.low, ref.high), rel=1e-9)
    assert vstats.mean_ci([0.5]) == (0.5, 0.5) and vstats.mean_ci([0.5, 0.5]) == (0.5, 0.5)
    rng = np.random.default_rng(23)
    groups = rng.normal(1.0, 0.2, (2000, 6))
    covered = np.mean([low <= 1.0 <= high for low, high in map(vstats.mean_ci, groups)])
    print(f"metaplot --ci coverage at 6 runs: {covered:.3f}")
    assert covered >= 0.93


@pytest.mark.parametrize("n", [3, 6, 10, 13])
def test_sign_flip_p_is_scipy_exact_permutation_test(n: int) -> None:
    rng = np.random.default_rng(n)
    d = np.round(rng.normal(0.3, 1, (4, n)), 1)  # rounding makes ties among |d|
    d[1, 0] = 0.0
    for row, p in zip(d, vstats.sign_flip_p(d)):
        ref = stats.permutation_test(
            (row,), np.mean, permutation_type="samples", n_resamples=np.inf
        ).pvalue
        assert p == pytest.approx(ref, rel=1e-9)


def test_unpaired_permutation_p_is_scipy_exact_permutation_test() -> None:
    def diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return x.mean(axis=axis) - y.mean(axis=axis)

    rng = np.random.default_rng(2)
    for a, b in (
        (np.round(rng.normal(0, 1, 4), 1), np.round(rng.normal(1, 1, 5), 1)),
        (np.array([0.75, 0.75]), np.array([1.0, 1.0])),
        (np.array([0.5, 0.5, 0.5]), np.array([0.75] * 4)),
    ):
        ref = stats.permutation_test(
            (a, b), diff, permutation_type="independent", n_resamples=np.inf
        ).pvalue
        assert vstats.permutation_p(a, b) == pytest.approx(ref, rel=1e-9)
    assert vstats.smallest_permutation_p(2, 2) == pytest.approx(2 / 6)
    assert vstats.smallest_permutation_p(3, 4) == pytest.approx(2 / 35)


def test_step_down_is_holm_and_screens_what_cannot_reach_its_level() -> None:
    # sorted: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06; max(0.04*1, 0.06) = 0.06
    assert vstats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert vstats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert vstats.holm([]) == []
    # Tarone: two t tests (floor 0) and two exact tests with floor 1/32 > 0.05/3: K = 2, the
    # exact ones leave the family, the others face Holm over 2
    adjusted, k = vstats.step_down(
        [0.02, 0.4, 1 / 32, 0.5], [0, 0, 1 / 32, 1 / 32], [0, 1, 2, 3], 0.05
    )
    assert k == 2 and adjusted == pytest.approx([0.04, 0.4, None, None])
    # a floor of 0.01 fits under 0.05 / 3: K = 3, all three in
    adjusted, k = vstats.step_down([0.02, 0.4, 0.01], [0, 0, 0.01], [0, 1, 2], 0.05)
    assert k == 3 and adjusted == pytest.approx([0.04, 0.4, 0.03])
    # two hypotheses of one group (a difference and an equivalence) count once: Holm over 2
    adjusted, k = vstats.step_down([0.01, 0.02, 0.3], [0, 0, 0], ["x", "x", "y"], 0.05)
    assert k == 2 and adjusted == pytest.approx([0.02, 0.04, 0.3])


def test_analytic_power_matches_reference_values() -> None:
    # Cohen's tables / G*Power: two-sample t, d = 1, n = 10 per group, two-sided 0.05 -> 0.562;
    # paired, d_z = 1, 10 pairs -> 0.803.
    assert vstats.power_two_sample(1.0, 1.0, 10, 0.05) == pytest.approx(0.562, abs=0.001)
    assert vstats.power_paired(1.0, 1.0, 10, 0.05) == pytest.approx(0.803, abs=0.001)
    # d = 0.5 needs 64 per group for 80% (the textbook figure), d = 1 needs 17; d_z = 1 paired 10
    assert vstats.repetitions_needed(0.5, 1.0, False, 0.05) == 64
    assert vstats.repetitions_needed(1.0, 1.0, False, 0.05) == 17
    assert vstats.repetitions_needed(1.0, 1.0, True, 0.05) == 10
    assert vstats.repetitions_needed(0.0, 1.0, False, 0.05) is None
    assert vstats.repetitions_needed(1.0, 0.0, False, 0.05) is None


def test_curve_difference_is_the_average_gap_of_the_interpolated_curves() -> None:
    xa, xb = [10, 40, 160, 500], [20, 30, 90, 300, 1000]
    ma, mb = np.array([1.0, 0.6, 0.5, 0.45]), np.array([0.9, 0.85, 0.5, 0.4, 0.38])
    wa, wb, lo, hi = comparison.curve_weights(xa, xb)
    assert (lo, hi) == pytest.approx((20, 500))
    grid = np.linspace(math.log(20), math.log(500), 200_001)
    gap = np.interp(grid, np.log(xa), ma) - np.interp(grid, np.log(xb), mb)
    integral = float(((gap[1:] + gap[:-1]) / 2 * np.diff(grid)).sum())  # trapezoid rule
    assert wa @ ma - wb @ mb == pytest.approx(integral / (grid[-1] - grid[0]), abs=1e-9)
    assert wa.sum() == pytest.approx(1) and wb.sum() == pytest.approx(1)
    assert comparison.curve_weights([10, 20], [30, 40]) is None


def test_curve_line_is_the_welch_satterthwaite_contrast_by_hand() -> None:
    rng = np.random.default_rng(13)
    sizes_a, sizes_b = [10, 40, 160], [20, 80, 320]
    a = [reading.Side("A", s, list(rng.normal(1 / math.log(s), 0.05, 6))) for s in sizes_a]
    b = [reading.Side("B", s, list(rng.normal(1 / math.log(s), 0.05, 5))) for s in sizes_b]
    line = comparison.curve_line(a, b, "data", reading.LOWER)
    wa, wb, _, _ = comparison.curve_weights(sizes_a, sizes_b)
    groups = [np.array(s.values) for s in a + b]
    used = [(w, g) for w, g in zip(np.concatenate([wa, -wb]), groups) if w != 0]
    assert line.diff == pytest.approx(sum(w * g.mean() for w, g in used))
    var_terms = np.array([w**2 * g.var(ddof=1) / g.size for w, g in used])
    se = math.sqrt(var_terms.sum())
    df = var_terms.sum() ** 2 / sum(vt**2 / (g.size - 1) for vt, (_, g) in zip(var_terms, used))
    assert line.p_value == pytest.approx(2 * stats.t.sf(abs(line.diff / se), df), rel=1e-9)
    half = stats.t.ppf(0.975, df) * se
    assert line.ci == pytest.approx([line.diff - half, line.diff + half], rel=1e-9)
    # no spread in any group: no test, never p = 0
    flat = [reading.Side("A", s, [0.5, 0.5]) for s in sizes_a]
    flat_b = [reading.Side("B", s, [0.7, 0.7]) for s in sizes_b]
    line = comparison.curve_line(flat, flat_b, "data", reading.LOWER)
    assert line.p_value is None and not line.testable


def curve_study(
    rng: np.random.Generator,
    seeds: int,
    gap: float = 0.0,
    family_seed_sd: float = 0.0,
    shared_sd: float = 1.0,
) -> tuple[list[reading.Side], list[reading.Side]]:
    """Two families of 3 sizes each, every size run with the same seeds: a seed effect shared
    by every group (the data) and one shared by the sizes of a family (e.g. its initial
    weights), plus noise; B is worse by `gap` everywhere."""
    shared = rng.normal(0, shared_sd, seeds)
    out = []
    for family, sizes, shift in (("A", [10, 40, 160], 0.0), ("B", [20, 80, 320], gap)):
        own = rng.normal(0, family_seed_sd, seeds)
        out.append(
            [
                side(
                    family,
                    1 / math.log(s) + shift + shared + own + rng.normal(0, 0.3, seeds),
                    range(seeds),
                )
                for s in sizes
            ]
        )
        for s, group in zip(sizes, out[-1]):
            group.nb_params = s
    return out[0], out[1]


def test_curve_line_with_shared_seeds_tests_the_per_seed_contrasts() -> None:
    a, b = curve_study(np.random.default_rng(21), 6, gap=0.2)
    line = comparison.curve_line(a, b, "data", reading.LOWER)
    wa, wb, _, _ = comparison.curve_weights([s.nb_params for s in a], [s.nb_params for s in b])
    per_seed = wa @ np.array([s.values for s in a]) - wb @ np.array([s.values for s in b])
    ref = stats.ttest_1samp(per_seed, 0.0)
    assert line.paired is True and line.pairing.startswith("clustered by seed: 6 seeds")
    json.dumps(line.as_json(), allow_nan=False)  # plain Python values only
    assert line.diff == pytest.approx(per_seed.mean())
    assert line.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval()
    assert line.ci == pytest.approx([ci.low, ci.high], rel=1e-9)


def test_curve_band_is_bonferroni_t_at_the_knots_and_covers_simultaneously() -> None:
    a, b = curve_study(np.random.default_rng(24), 6, gap=0.2)
    line = comparison.curve_line(a, b, "data", reading.LOWER)
    knots = np.log([20, 40, 80, 160])  # the overlap 20-160 and every size inside it
    assert [p["nb_params"] for p in line.band] == [20, 40, 80, 160]
    ya = np.array([s.values for s in a])
    yb = np.array([s.values for s in b])
    la, lb = np.log([10, 40, 160]), np.log([20, 80, 320])
    d = np.stack(
        [np.interp(knots, la, ya[:, s]) - np.interp(knots, lb, yb[:, s]) for s in range(6)]
    )
    half = stats.t.ppf(1 - 0.05 / 8, 5) * d.std(axis=0, ddof=1) / math.sqrt(6)
    assert [p["diff"] for p in line.band] == pytest.approx(d.mean(axis=0))
    assert [p["low"] for p in line.band] == pytest.approx(d.mean(axis=0) - half)
    assert [p["high"] for p in line.band] == pytest.approx(d.mean(axis=0) + half)
    # the true difference curve: -0.2 everywhere plus the gap of 1/ln(size) interpolated
    rng = np.random.default_rng(25)
    truth = -0.2 + np.interp(knots, la, 1 / la) - np.interp(knots, lb, 1 / lb)
    covered = []
    for _ in range(1000):
        a, b = curve_study(rng, 6, gap=0.2, family_seed_sd=0.3)
        band = comparison.curve_line(a, b, "data", reading.LOWER).band
        covered.append(all(p["low"] <= t <= p["high"] for p, t in zip(band, truth)))
    print(f"simultaneous band coverage at 6 seeds, 4 knots: {np.mean(covered):.3f}")
    assert np.mean(covered) >= 0.93


def test_curve_line_keeps_its_level_when_a_family_shares_its_seeds() -> None:
    """A seed effect common to the sizes of a family makes its groups correlated: the contrast
    of independent means then decides too often; the per-seed contrasts do not."""
    rng = np.random.default_rng(22)
    clustered, independent = [], []
    for _ in range(1500):
        a, b = curve_study(rng, 6, family_seed_sd=0.5, shared_sd=0.0)
        line = comparison.curve_line(a, b, "data", reading.LOWER)
        clustered.append(line.p_value <= ALPHA)
        wa, wb, _, _ = comparison.curve_weights([10, 40, 160], [20, 80, 320])
        groups = [(w, s) for w, s in zip(wa, a) if w > 0]
        groups += [(-w, s) for w, s in zip(wb, b) if w > 0]
        independent.append(comparison.independent_contrast(groups, line.diff, 0).p <= ALPHA)
    rate, naive = float(np.mean(clustered)), float(np.mean(independent))
    print(f"curve line, family seed effect: per-seed contrasts {rate:.3f}, independent {naive:.3f}")
    assert 0.03 <= rate <= 0.07 and naive > 0.08


def test_contrast_of_two_groups_is_welch() -> None:
    a, b = np.array([1.0, 1.2, 0.9, 1.4]), np.array([0.7, 0.8, 0.75])
    t, df, p = vstats.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert p[0] == pytest.approx(ref.pvalue, rel=1e-9) and df[0] == pytest.approx(ref.df)
    assert t[0] == pytest.approx(ref.statistic)


def test_group_sequential_boundaries_match_scipy_multivariate_normal() -> None:
    """The crossing probabilities of the boundaries, from scipy's multivariate normal
    (Z_j, Z_k correlated sqrt(t_j / t_k)), are the spending function's increments."""
    for fractions in ([0.5, 1.0], [0.25, 0.5, 0.75, 1.0], [0.4, 0.7, 1.0]):
        c = np.array(sequential.boundaries(fractions, ALPHA))
        t = np.array(fractions)
        cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
        for k in range(1, len(t) + 1):
            box = stats.multivariate_normal(np.zeros(k), cov[:k, :k])
            inside = box.cdf(c[:k], lower_limit=-c[:k]) if k > 1 else 1 - 2 * stats.norm.sf(c[0])
            spent = sequential.spent_alpha(fractions[k - 1], ALPHA)
            assert 1 - inside == pytest.approx(spent, abs=2e-5)
        assert c[0] > c[-1] > stats.norm.ppf(1 - ALPHA / 2)  # O'Brien-Fleming: strict early


# -- matching, pairing, direction, verdict words -------------------------------------------------


def test_sizes_are_matched_one_to_one_and_symmetrically() -> None:
    matched, lonely_a, lonely_b = comparison.match_sizes([10, 100, 1000], [12, 95, 140, 5000], 1.5)
    assert matched == [(10, 12), (100, 95)]
    assert lonely_a == [1000] and lonely_b == [140, 5000]
    assert comparison.match_sizes([10], [15], 1.5)[0] == [(10, 15)]
    assert comparison.match_sizes([10], [16], 1.5)[0] == []
    # the issue's case: 120 is closer to 140 than to 100, whichever family is A
    assert comparison.match_sizes([100, 140], [120], 1.5) == ([(140, 120)], [100], [])
    assert comparison.match_sizes([120], [100, 140], 1.5) == ([(120, 140)], [], [100])
    rng = np.random.default_rng(5)
    for _ in range(200):
        xa = sorted(set(rng.integers(10, 2000, 6).tolist()))
        xb = sorted(set(rng.integers(10, 2000, 5).tolist()))
        forward, lonely_a, lonely_b = comparison.match_sizes(xa, xb, 1.5)
        backward, back_a, back_b = comparison.match_sizes(xb, xa, 1.5)
        assert sorted((y, x) for x, y in forward) == backward
        assert (lonely_a, lonely_b) == (back_b, back_a)


def test_pairing_uses_the_complete_pairs_and_says_so() -> None:
    def sd(seeds: list[Any], stages: list[str]) -> reading.Side:
        return reading.Side("f", 1, [0.0] * len(seeds), seeds=seeds, data_stages=stages)

    assert comparison.pairing(sd([0, 1], ["d", "d"]), sd([1, 0], ["d", "d"])) == (
        True,
        "paired by seed",
    )
    assert not comparison.pairing(sd([0, 1], ["d", "d"]), sd([0, 2], ["d", "d"]))[0]
    assert not comparison.pairing(sd([0, 1], ["d", "d"]), sd([0, 1], ["d", "e"]))[0]
    assert not comparison.pairing(sd([0, 0], ["d", "d"]), sd([0, 0], ["d", "d"]))[0]
    assert not comparison.pairing(sd([None, 1], ["d", "d"]), sd([0, 1], ["d", "d"]))[0]
    paired, how = comparison.pairing(sd([0, 1, 2, 5], ["d"] * 4), sd([0, 1, 2], ["d"] * 3))
    assert paired and how.startswith("paired by seed: 3 complete pairs; 1 run(s) of A")
    # a replacement run that continued the numbering: seeds 0-4 and 6 against 0-5
    a = side("A", [1.0, 2.0, 3.0, 4.0, 5.0, 9.0], seeds=[0, 1, 2, 3, 4, 6], failed=[5])
    b = side("B", [0.5, 1.5, 2.5, 3.5, 4.5, 5.5], seeds=[0, 1, 2, 3, 4, 5])
    line = comparison.size_line(a, b, "data", reading.LOWER)
    assert line.paired and (line.n_a, line.n_b) == (5, 5) and "5 complete pairs" in line.pairing
    assert line.diff == pytest.approx(0.5)


def test_direction_and_verdict_words() -> None:
    assert (
        reading.direction("test_acc") == reading.HIGHER
        and reading.direction("overfit") == reading.LOWER
    )
    with pytest.raises(reading.VerdictError, match="size axis"):
        reading.direction("nb_params")
    a, b = np.linspace(0.1, 0.2, 8), np.linspace(0.5, 0.6, 8)  # A lower, clearly
    for better, word in (
        (reading.LOWER, comparison.A_BETTER),
        (reading.HIGHER, comparison.B_BETTER),
    ):
        line = one_line(a, b, paired=False, better=better)
        comparison.decide([line], ALPHA, better)
        assert line.verdict == word and line.repetitions_needed is None
    one = one_line(a[:1], b[:1], paired=False)  # 1 run a side: no test at all
    same = one_line(a, a[::-1] + 1e-3, paired=False)
    comparison.decide([one, same], ALPHA, reading.LOWER)
    assert one.verdict == comparison.TOO_FEW and one.p_holm is None
    # one tested line: Holm leaves its p-value as it is
    assert same.verdict == comparison.NO_DIFFERENCE and same.p_holm == same.p_value
    assert same.repetitions_needed and same.repetitions_needed > 8


def test_no_spread_is_never_decided_by_rule() -> None:
    """Constant sides (discrete accuracies on a small test set): an exact test, or "too few
    repetitions" when its smallest p cannot reach the level the line faces."""
    two = one_line(np.array([0.75, 0.75]), np.array([1.0, 1.0]), paired=False)
    assert two.test.startswith("exact permutation") and two.p_value == pytest.approx(1 / 3)
    three = one_line(np.full(3, 0.75), np.full(3, 1.0), paired=True)
    assert three.test.startswith("exact sign-flip") and three.p_value == pytest.approx(0.25)
    comparison.decide([two, three], ALPHA, reading.HIGHER)
    assert two.verdict == three.verdict == comparison.TOO_FEW
    assert two.p_holm is None and two.repetitions_note.startswith("no spread")
    # six constant pairs: 2/64 = 0.031 reaches 0.05 alone, but not 0.05 / 2 beside a t test
    six = one_line(np.full(6, 0.75), np.full(6, 1.0), paired=True)
    comparison.decide([six], ALPHA, reading.HIGHER)
    assert six.verdict == comparison.B_BETTER and six.p_holm == pytest.approx(1 / 32)
    other = one_line(np.linspace(0, 1, 6), np.linspace(0, 1, 6)[::-1], paired=True)
    comparison.decide([six, other], ALPHA, reading.HIGHER)
    assert six.verdict == comparison.TOO_FEW and other.p_holm == other.p_value
    same = one_line(np.full(4, 0.5), np.full(4, 0.5), paired=False)
    assert same.p_value == 1.0 and same.p_floor == 1.0


def test_failures_join_the_verdict() -> None:
    a, b = np.linspace(0.10, 0.20, 8), np.linspace(0.11, 0.21, 8)
    line = one_line(a, b, paired=False, failed=(0, 8))  # B fails half its runs
    comparison.decide([line], ALPHA, reading.LOWER)
    assert line.verdict == comparison.A_BETTER and line.decided_by == "failures"
    assert line.failure_p_holm == pytest.approx(line.failure_p * 2)  # Holm over 2 groups
    conflict = one_line(a, b + 1, paired=False, failed=(8, 0))  # A better, but fails often
    comparison.decide([conflict], ALPHA, reading.LOWER)
    assert conflict.verdict == comparison.NO_DIFFERENCE and "B fails less often" in conflict.note


def test_a_side_whose_every_run_failed_is_reported_and_loses() -> None:
    from mosaic_client.commands.compare import render

    seeds = list(range(8))
    sides = {
        "data": {
            "A": {10: side("A", [], [], failed=seeds)},
            "B": {11: side("B", np.linspace(0.2, 0.3, 8), seeds)},
        }
    }
    report = comparison.compare(reading.StudyValues("test_loss", sides, {"failed": 8}, {}), "x")
    (line,) = report.lines
    assert line.verdict == comparison.B_BETTER and line.decided_by == "failures"
    assert line.p_improvement == 0.0 and line.p_value is None
    assert line.failure_p == pytest.approx(stats.fisher_exact([[8, 0], [0, 8]]).pvalue)
    out = json.dumps(report.as_json(), allow_nan=False)  # no NaN in the JSON
    assert json.loads(out)["lines"][0]["mean_a"] is None
    table = render(report)
    row = next(r for r in table.splitlines() if r.strip().startswith("10 "))
    assert row.split()[2:4] == ["0/8", "8/0"] and "B better" in row  # n A/B, failed A/B
    assert "8 failed" in table


def test_equivalence_within_the_margin() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(0.5, 0.01, 10)
    close = one_line(a, a + rng.normal(0, 0.005, 10), paired=True, margin=0.02)
    far = one_line(a, a + rng.normal(0.1, 0.005, 10), paired=True, margin=0.02)
    comparison.decide([close, far], ALPHA, reading.LOWER)
    assert close.verdict == "equivalent within ±0.02" and close.decided_by == "equivalence"
    assert far.verdict == comparison.A_BETTER
    loose = one_line(a[:3], a[:3] + np.array([0.1, -0.1, 0.05]), paired=True, margin=0.02)
    comparison.decide([loose], ALPHA, reading.LOWER)
    assert loose.verdict == comparison.NO_DIFFERENCE


def test_issue_digits_case_six_of_six_pairs_is_decided_among_many_lines() -> None:
    """A CNN beat an MLP in 6 of 6 pairs, d_z 2.55, in a report of several lines: decided."""
    rng = np.random.default_rng(28)
    z = rng.normal(0, 1, 6)
    d = -2.55 + (z - z.mean()) / z.std(ddof=1)  # mean -2.55, sd 1
    base = rng.normal(0.3, 0.05, 6)
    strong = one_line(base + 0.01 * d, base, paired=True)
    assert strong.effect_size == pytest.approx(-2.55, rel=1e-6)
    nulls = [one_line(rng.normal(0, 1, 6), rng.normal(0, 1, 6), paired=True) for _ in range(5)]
    comparison.decide([strong, *nulls], ALPHA, reading.LOWER)
    assert strong.verdict == comparison.A_BETTER and strong.p_holm < 0.05


# -- calibration by simulation --------------------------------------------------------------------


def simulated_lines(
    a: np.ndarray, b: np.ndarray, paired: bool, margin: float = 0
) -> list[comparison.Line]:
    """One line per row, through the command's own code."""
    n = a.shape[1]
    seeds = list(range(n)) if paired else None
    pairs = [(side("A", x, seeds), side("B", y, seeds)) for x, y in zip(a, b)]
    return comparison.size_lines(pairs, "sim", reading.LOWER, margin)


def decided_rate(lines: list[comparison.Line], alpha: float = ALPHA) -> float:
    """Each simulated line is its own report (decide on it alone)."""
    for line in lines:
        comparison.decide([line], alpha, reading.LOWER)
    return float(np.mean([line.verdict in comparison.DECIDED for line in lines]))


@pytest.mark.parametrize("paired", [False, True])
def test_null_false_decision_rate_is_alpha(paired: bool) -> None:
    rng = np.random.default_rng(100 + paired)
    n = 6 if paired else 10
    a, b = rng.normal(0, 1, (2000, n)), rng.normal(0, 1, (2000, n))
    if paired:  # shared data: a strong common component, as a shared test split gives
        b = 0.8 * a + 0.6 * b
    rate = decided_rate(simulated_lines(a, b, paired))
    print(f"null false decisions ({'6 pairs' if paired else 'unpaired, 10 a side'}): {rate:.3f}")
    assert 0.03 <= rate <= 0.07


def test_paired_t_has_the_power_the_sign_flip_lacks_at_six_pairs() -> None:
    """Why the paired t test (chosen by simulation): at 6 pairs and d_z = 1.5 it decides >= 80%
    of the time; the exact sign-flip test, which needs all 6 signs alike, cannot."""
    rng = np.random.default_rng(15)
    d = rng.normal(-1.5, 1, (2000, 6))
    power = decided_rate(simulated_lines(d, np.zeros_like(d), True))
    sign_flip = float(np.mean(vstats.sign_flip_p(d) <= ALPHA))
    analytic = vstats.power_paired(1.5, 1.0, 6, ALPHA)
    print(
        f"power, 6 pairs, d_z 1.5: paired t {power:.3f} (analytic {analytic:.3f}), "
        f"sign-flip {sign_flip:.3f}"
    )
    assert power >= 0.8 and abs(power - analytic) <= 0.03 and sign_flip < 0.75


def test_intervals_cover_at_six_runs() -> None:
    rng = np.random.default_rng(16)
    for paired, spread in ((True, "normal"), (False, "normal"), (True, "t3"), (False, "t3")):
        draw = (
            (lambda size: rng.normal(0, 1, size))
            if spread == "normal"
            else (lambda size: rng.standard_t(3, size))
        )
        a, b = draw((2000, 6)) + 0.3, draw((2000, 6))
        lines = simulated_lines(a, b, paired)
        covered = np.mean([ln.ci[0] <= 0.3 <= ln.ci[1] for ln in lines])
        print(f"95% interval coverage, n = 6, paired {paired}, {spread}: {covered:.3f}")
        assert covered >= 0.93


def test_discrete_accuracies_make_no_false_decisions() -> None:
    """The issue's case: OR-like accuracies (a few test points: 0.75 or 1.0), 2 against 2 and 6
    pairs, both families alike: constant sides are never decided by rule."""
    rng = np.random.default_rng(17)
    for n, paired in ((2, False), (3, False), (6, True)):
        a = np.where(rng.random((3000, n)) < 0.7, 1.0, 0.75)
        b = np.where(rng.random((3000, n)) < 0.7, 1.0, 0.75)
        lines = simulated_lines(a, b, paired)
        rate = decided_rate(lines)
        print(f"discrete accuracies, {n} {'pairs' if paired else 'a side'}: {rate:.3f} decided")
        assert rate <= ALPHA and all(ln.p_value is None or ln.p_value > 0 for ln in lines)


def test_failure_modes_make_no_false_decisions() -> None:
    """Both families fail (NaN) 10% of the time and are otherwise alike: reports of 4 lines
    (mean and failure tests in one family) decide wrongly at most alpha of the time."""
    rng = np.random.default_rng(18)
    reports, false = 500, 0
    for _ in range(reports):
        lines = []
        for _ in range(4):
            fail_a, fail_b = rng.random(8) < 0.1, rng.random(8) < 0.1
            xa, xb = rng.normal(0, 1, 8), rng.normal(0, 1, 8)
            a = side("A", xa[~fail_a], np.flatnonzero(~fail_a), failed=np.flatnonzero(fail_a))
            b = side("B", xb[~fail_b], np.flatnonzero(~fail_b), failed=np.flatnonzero(fail_b))
            lines.append(comparison.size_line(a, b, "sim", reading.LOWER))
        comparison.decide(lines, ALPHA, reading.LOWER)
        false += any(line.verdict in comparison.DECIDED for line in lines)
    rate = false / reports
    print(f"reports of 4 null lines with a 10% failure mode: {rate:.3f} false decisions")
    assert rate <= ALPHA


def test_tost_holds_its_level_at_the_margin_and_has_power_inside() -> None:
    rng = np.random.default_rng(19)
    margin = 1.0
    d = rng.normal(margin, 0.5, (2000, 10))  # the true difference sits on the margin
    lines = simulated_lines(d, np.zeros_like(d), True, margin)
    for line in lines:
        comparison.decide([line], ALPHA, reading.LOWER)
    # those lines are truly different from 0 (and said so): what must be rare is equivalence
    false = np.mean([line.tost_p_holm <= ALPHA for line in lines])
    d = rng.normal(0, 0.5, (2000, 10))
    lines = simulated_lines(d, np.zeros_like(d), True, margin)
    for line in lines:
        comparison.decide([line], ALPHA, reading.LOWER)
    power = np.mean([line.verdict.startswith(comparison.EQUIVALENT) for line in lines])
    print(f"TOST, 10 pairs, margin 2 sd: level at the margin {false:.3f}, power at 0 {power:.3f}")
    assert 0.03 <= false <= 0.07 and power >= 0.8


def test_holm_keeps_the_family_wise_rate_of_a_report() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(0, 1, (5000, 6)), rng.normal(0, 1, (5000, 6))
    p = np.array([line.p_value for line in simulated_lines(a, b, True)]).reshape(1000, 5)
    any_false = np.mean([min(vstats.holm(row)) <= ALPHA for row in p])
    naive = np.mean((p <= ALPHA).any(axis=1))
    print(f"family-wise rate over 5 null lines: Holm {any_false:.3f}, uncorrected {naive:.3f}")
    assert any_false <= ALPHA + 0.01 and naive > 0.15


def test_following_the_repetitions_advice_reaches_the_power() -> None:
    """A pilot of 10 runs a side gives the advice (--min-effect = the true difference, spread
    estimated from the pilot); a new study of that size then decides >= 75% of the time."""
    rng = np.random.default_rng(10)
    effect = 0.7
    pilots = simulated_lines(rng.normal(0, 1, (600, 10)), rng.normal(effect, 1, (600, 10)), False)
    advice = []
    for line in pilots:
        comparison.decide([line], ALPHA, reading.LOWER, min_effect=effect)
        if line.verdict == comparison.NO_DIFFERENCE:
            advice.append(line.repetitions_needed)
    assert len(advice) > 100 and all(n and n > 10 for n in advice)
    decided = 0
    for n in sorted(set(advice)):
        k = advice.count(n)
        _, _, p = vstats.welch(rng.normal(0, 1, (k, n)), rng.normal(effect, 1, (k, n)))
        decided += int(np.sum(p <= ALPHA))
    power = decided / len(advice)
    print(f"power when following the advice: {power:.3f} (median advice {np.median(advice)})")
    assert power >= 0.75


def sequential_decisions(
    p_values: np.ndarray, looks: Sequence[int], max_repetitions: int, alpha: float
) -> np.ndarray:
    """For p-values (S, K) of S sequences at K looks (repetitions `looks`), the look index at
    which each sequence is decided, or -1: what the plan does, vectorised for simulation (the
    levels are SequentialPlan's own, with its default spending function)."""
    plan = sequential.SequentialPlan(alpha, max_repetitions)
    levels = np.array([plan.level(n) for n in looks])
    hit = p_values <= levels[None, :]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def test_sequential_plan_keeps_false_decisions_at_alpha() -> None:
    rng = np.random.default_rng(12)
    looks, n_max, sequences = [4, 8, 12, 16, 20], 20, 4000
    a, b = rng.normal(0, 1, (sequences, n_max)), rng.normal(0, 1, (sequences, n_max))
    p = np.stack([vstats.welch(a[:, :n], b[:, :n])[2] for n in looks], axis=1)
    decided_at = sequential_decisions(p, looks, n_max, ALPHA)
    false_rate = np.mean(decided_at >= 0)
    naive = np.mean((p <= ALPHA).any(axis=1))  # testing every round at alpha
    print(f"sequential false decisions, Welch: {false_rate:.3f} (naive looks: {naive:.3f})")
    assert 0.03 <= false_rate <= ALPHA + 0.01
    assert naive > ALPHA + 0.03  # what the plan protects against
    # z statistics of a cumulative mean: the boundaries spend exactly alpha
    z = np.cumsum(rng.normal(0, 1, (20000, n_max)), axis=1)[:, np.array(looks) - 1]
    z /= np.sqrt(np.array(looks))
    p_z = 2 * stats.norm.sf(np.abs(z))
    exact = np.mean(sequential_decisions(p_z, looks, n_max, ALPHA) >= 0)
    print(f"sequential false decisions, z statistics: {exact:.4f}")
    assert abs(exact - ALPHA) <= 0.005
    # and it still decides real differences, mostly before the last look
    shifted = np.stack([vstats.welch(a[:, :n], b[:, :n] + 1.2)[2] for n in looks], axis=1)
    when = sequential_decisions(shifted, looks, n_max, ALPHA)
    print(f"sequential power at 1.2 sd: {np.mean(when >= 0):.3f}")
    assert np.mean(when >= 0) > 0.9 and np.mean((when >= 0) & (when < 4)) > 0.5


def test_sequential_looks_keep_earlier_decisions() -> None:
    """What `--until-decided` does between rounds: look, keep what is decided, look again."""

    def study(n: int, gap: float, rng: np.random.Generator) -> reading.StudyValues:
        seeds = list(range(n))
        sides = {
            "data": {
                fam: {10: side(fam, rng.normal(shift, 0.1, n), seeds)}
                for fam, shift in (("A", 0.0), ("B", gap), ("C", 0.0))
            }
        }
        return reading.StudyValues("test_loss", sides, {}, {})

    rng = np.random.default_rng(14)
    plan = sequential.SequentialPlan(ALPHA, 20)
    first = plan.look(study(12, 1.0, rng), 12)  # A and C far below B: decided at once
    verdicts = {(ln.a, ln.b): ln.verdict for ln in first.lines}
    assert verdicts == {
        ("A", "B"): comparison.A_BETTER,
        ("A", "C"): comparison.NO_DIFFERENCE,
        ("B", "C"): comparison.B_BETTER,
    }
    assert first.alpha == pytest.approx(sequential.spent_alpha(0.6, ALPHA)) and first.alpha < 0.02
    second = plan.look(study(20, 0.0, rng), 20)  # no difference left in the new data
    kept = {(ln.a, ln.b): ln for ln in second.lines}
    assert kept[("A", "B")] is plan.decided[kept[("A", "B")].key]  # not tested again
    assert kept[("A", "B")].verdict == comparison.A_BETTER and kept[("A", "B")].n_a == 12
    assert kept[("A", "C")].n_a == 20 and kept[("A", "C")].p_holm == kept[("A", "C")].p_value
    # the last look's level: above its spent increment (earlier crossings are excluded)
    increment = ALPHA - sequential.spent_alpha(0.6, ALPHA)
    assert second.alpha > increment and plan.finished() and plan.spent() == pytest.approx(ALPHA)


def test_sequential_plan_levels() -> None:
    plan = sequential.SequentialPlan(ALPHA, 20)
    levels = [plan.level(n) for n in (5, 10, 20)]
    assert levels[0] == pytest.approx(sequential.spent_alpha(0.25, ALPHA))
    assert levels[0] < levels[1] < levels[2] < ALPHA  # O'Brien-Fleming: little early
    assert sum(levels) > ALPHA  # nominal levels: not a union bound
    with pytest.raises(ValueError):
        plan.level(20)
    assert sequential.spent_alpha(1.0, ALPHA, "pocock") == pytest.approx(ALPHA)
    assert sequential.spent_alpha(0.5, ALPHA, "pocock") > sequential.spent_alpha(0.5, ALPHA)


# -- the run_groups view ------------------------------------------------------------------------


def synthetic_study(path: Path) -> list[dict[str, Any]]:
    """A study written through the daemon's Store: three configurations of two families, a
    two-type data scheme, one failed run and one NULL result; returns what each run got."""
    store = Store(str(path))
    process = {
        "lr": 0.01,
        "epochs": 2,
        "data_scheme": "dataset,split",
        "pipeline_scheme": "mlp",
        "loss_function": "BCELoss",
        "run_files_path": "r",
    }
    truth = []
    runs = []
    configs = [("funnel", 3, 4), ("funnel", 5, 3), ("brick", 2, 5)]
    rng = np.random.default_rng(1)
    for family, width, reps in configs:
        for seed in range(reps):
            modules = [
                {"type": "dataset", "class": "D", "path_to_class": "d.py", "key": "OR"},
                {"type": "split", "class": "S", "path_to_class": "s.py", "key": "half"},
                {
                    "type": "mlp",
                    "class": family,
                    "path_to_class": "m.py",
                    "width": width,
                    "key": family,
                },
            ]
            runs.append((modules, seed, family, run_params(process, modules, seed, 1000, "me")))
            truth.append(
                {
                    "family": family,
                    "width": width,
                    "results": {c: float(rng.normal()) for c in RESULT_COLUMNS},
                }
            )
    _, ids = store.add_submission(1000, "me", "c.ini", process, {}, runs)
    for run_id, t in zip(ids, truth):
        store.transition(run_id, "running")
        t["results"]["nb_params"] = 10 * t["width"]
        if run_id == ids[2]:
            store.transition(run_id, "failed", return_status="boom")
            t["status"] = "failed"
            continue
        if run_id == ids[5]:
            t["results"]["slope"] = None
        store.finish_run(run_id, t["results"], "ok")
        t["status"] = "done"
    store.close()
    return truth


def test_run_groups_view_matches_python_statistics(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    truth = synthetic_study(db)
    conn = sqlite3.connect(db)
    cursor = conn.execute("SELECT * FROM run_groups ORDER BY group_id")
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, r)) for r in cursor]
    conn.close()
    assert [(r["model_key"], r["nb_params"], r["runs"], r["n"]) for r in rows] == [
        ("funnel", 30, 4, 3),
        ("funnel", 50, 3, 3),
        ("brick", 20, 5, 5),
    ]
    assert {r["dataset_key"] for r in rows} == {"OR_half"}  # both data types' keys, joined
    for row, width in zip(rows, (3, 5, 2)):
        done = [t["results"] for t in truth if t["width"] == width and t["status"] == "done"]
        for column in RESULT_COLUMNS:
            values = [d[column] for d in done if d[column] is not None]
            assert row[f"mean_{column}"] == pytest.approx(statistics.fmean(values))
            assert row[f"median_{column}"] == pytest.approx(statistics.median(values))
            assert row[f"sd_{column}"] == pytest.approx(statistics.stdev(values), abs=1e-12)


def test_groups_command_reads_the_view_and_explains_an_old_database(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    synthetic_study(db)
    result = subprocess.run(
        [sys.executable, "-m", "mosaic_client.cli", "groups", str(db), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [g["n"] for g in json.loads(result.stdout)] == [3, 3, 5]
    table = subprocess.run(
        [sys.executable, "-m", "mosaic_client.cli", "groups", str(db)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    ).stdout
    assert "3 group(s)" in table and "OR_half" in table
    conn = sqlite3.connect(db)
    conn.execute("DROP VIEW run_groups")  # as a database written before migration 4
    conn.commit()
    conn.close()
    result = subprocess.run(
        [sys.executable, "-m", "mosaic_client.cli", "groups", str(db)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2 and "no run_groups view" in result.stderr


def test_failed_and_nan_runs_are_failures_of_their_point(tmp_path: Path) -> None:
    """Run 3 failed before reporting its size: placed by its configuration (funnel, width 3);
    run 6 finished with a NULL slope (NaN is stored as NULL): a failure of funnel at 50."""
    db = tmp_path / "s.db"
    synthetic_study(db)
    conn = sqlite3.connect(db)
    try:
        values = reading.study_values(conn, "slope")
    finally:
        conn.close()
    funnel = values.sides["OR_half"]["funnel"]
    assert (funnel[30].failures, funnel[30].failed_seeds, len(funnel[30].values)) == (1, [2], 3)
    assert (funnel[50].failures, len(funnel[50].values)) == (1, 2)
    assert values.sides["OR_half"]["brick"][20].failures == 0
    assert values.skipped == {"failed": 1, "without slope": 1} and not values.unplaced


def test_compare_on_a_synthetic_study_reports_unpaired_and_unmatched(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    synthetic_study(db)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mosaic_client.cli",
            "compare",
            str(db),
            "--json",
            "--metric",
            "test_acc",
            "--size-tolerance",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["better"] == "higher"
    sizes = [(ln["kind"], ln["a_nb_params"], ln["b_nb_params"]) for ln in report["lines"]]
    assert sizes == [("size", 20, 30)]  # brick 20 vs funnel 30 (nearest within 2x)
    (line,) = report["lines"]
    # brick ran seeds 0-4, funnel 30 seeds 0,1,3 (run 3, seed 2, failed): the 3 complete pairs
    assert line["paired"] and line["n_a"] == 3 and line["n_b"] == 3
    assert "3 complete pairs; 2 run(s) of A" in line["pairing"]
    assert (line["failed_a"], line["failed_b"], line["runs_a"], line["runs_b"]) == (0, 1, 5, 4)
    assert line["failure_p"] == pytest.approx(stats.fisher_exact([[0, 5], [1, 3]]).pvalue)
    for key in ("kind", "a", "b", "verdict", "ci", "p_value", "p_holm", "p_improvement_ci"):
        assert key in line  # the keys of the first compare --json stay
    assert report["unmatched"] == [
        {"dataset_key": "OR_half", "family": "funnel", "nb_params": 50, "against": "brick"}
    ]
    assert any("curve" in note for note in report["notes"])  # brick has one size


def test_status_import_does_not_load_numpy_or_scipy() -> None:
    code = (
        "import sys, mosaic_client.cli as c; c.build_parser(); "
        "print([m for m in ('numpy', 'scipy', 'mosaic_client.verdict') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- across datasets ------------------------------------------------------------------------------


def across_study(rng: np.random.Generator, keys: int, effect: float) -> reading.StudyValues:
    """`keys` dataset keys, families A and B at one size each, 6 paired seeds; A lower (better)
    by `effect` sd of the differences."""
    seeds = list(range(6))
    sides = {}
    for k in range(keys):
        base = rng.normal(0.5, 0.1, 6)
        sides[f"data_{k}"] = {
            "A": {10: side("A", base - effect * 0.1 + rng.normal(0, 0.1, 6), seeds)},
            "B": {11: side("B", base, seeds)},
        }
        sides[f"data_{k}"]["B"][11].nb_params = 11
    return reading.StudyValues("test_loss", sides, {}, {})


def test_across_datasets_is_stouffers_combination_of_one_sided_t_tests() -> None:
    from mosaic_client.commands.compare import render
    from mosaic_client.verdict import across

    values = across_study(np.random.default_rng(30), 3, 0.8)
    report = comparison.compare(values, "x")
    (found,) = across.across_datasets(report.lines, report.better, ALPHA)
    one_sided = []
    for key in sorted(values.sides):
        a, b = values.sides[key]["A"][10].values, values.sides[key]["B"][11].values
        one_sided.append(stats.ttest_rel(a, b, alternative="less").pvalue)  # A lower: better
    ref = stats.combine_pvalues(one_sided, method="stouffer")
    assert found.z == pytest.approx(ref.statistic, rel=1e-9)
    assert found.p_value == pytest.approx(2 * min(ref.pvalue, 1 - ref.pvalue), rel=1e-9)
    assert found.datasets == ["data_0", "data_1", "data_2"] and found.lines == ["10/11"] * 3
    assert found.p_holm == found.p_value  # one pair of families
    report.across_datasets = [found.as_json()]
    assert f"3 dataset key(s), A better in {found.a_better_in}" in render(report)


def test_across_datasets_keeps_its_level_and_pools_power() -> None:
    from mosaic_client.verdict import across

    rng = np.random.default_rng(31)
    rates = {}
    for effect in (0.0, 0.8):
        decided = single = 0
        for _ in range(600):
            values = across_study(rng, 3, effect)
            found = comparison.candidates(values, None, None, 1.5)
            lines = comparison.size_lines(found.pairs, "", reading.LOWER)
            for line, key in zip(lines, found.pair_keys):
                line.dataset_key = key
            (verdict,) = across.across_datasets(lines, reading.LOWER, ALPHA)
            decided += verdict.verdict in comparison.DECIDED
            single += lines[0].p_value <= ALPHA
        rates[effect] = (decided / 600, single / 600)
    print(f"across 3 datasets, 6 pairs each: null {rates[0.0][0]:.3f}; d_z 0.8: {rates[0.8]}")
    assert 0.03 <= rates[0.0][0] <= 0.07
    assert rates[0.8][0] > rates[0.8][1] + 0.2  # three datasets decide what one cannot
