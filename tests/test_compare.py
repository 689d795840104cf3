"""`mosaic compare` and `mosaic groups`: every statistic against scipy computed independently,
and the error rates of the verdict rule by simulation (vectorised: the file runs in seconds).

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
from mosaic_client.verdict import statistics as vstats
from mosaicd.scheduling.submissions import run_params
from mosaicd.storage.store import RESULT_COLUMNS, Store

ALPHA = 0.05


def lower_better_pi(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(difference < 0) with ties counting half: scipy-side statistic for paired lines."""
    return ((x < 0) + 0.5 * (x == 0)).mean(axis=axis)


def one_line(
    a: np.ndarray, b: np.ndarray, paired: bool, better: str = reading.LOWER
) -> comparison.Line:
    seeds = list(range(len(a))) if paired else [None] * len(a)
    side_a = reading.Side("A", 10, list(a), seeds=seeds, data_stages=[""] * len(a))
    side_b = reading.Side(
        "B", 10, list(b), seeds=seeds if paired else [None] * len(b), data_stages=[""] * len(b)
    )
    (line,) = comparison.size_lines([(side_a, side_b)], "data", better, ALPHA)
    assert line.paired is paired
    return line


# -- each statistic against scipy ---------------------------------------------------------------


def test_paired_bootstrap_cis_are_scipy_percentile_with_the_same_seed() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 8), rng.normal(0.4, 1, 8)
    line = one_line(a, b, paired=True)
    for statistic, ours in ((np.mean, line.ci), (lower_better_pi, line.p_improvement_ci)):
        ref = stats.bootstrap(
            (a - b,),
            statistic,
            method="percentile",
            n_resamples=10_000,
            rng=np.random.default_rng(vstats.SEED),
        ).confidence_interval
        assert ours == pytest.approx([ref.low, ref.high], rel=1e-9, abs=1e-12)
    assert line.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert line.p_improvement == pytest.approx(np.mean(a < b))


def test_unpaired_bootstrap_cis_are_scipy_percentile_with_the_same_seed() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 6), rng.normal(0.5, 2, 9)

    def diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return x.mean(axis=axis) - y.mean(axis=axis)

    def pi(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        d = x[..., :, None] - y[..., None, :]
        return ((d < 0) + 0.5 * (d == 0)).mean(axis=(-1, -2))

    line = one_line(a, b, paired=False)
    for statistic, ours in ((diff, line.ci), (pi, line.p_improvement_ci)):
        ref = stats.bootstrap(
            (a, b),
            statistic,
            method="percentile",
            n_resamples=10_000,
            rng=np.random.default_rng(vstats.SEED),
        ).confidence_interval
        assert ours == pytest.approx([ref.low, ref.high], rel=1e-9, abs=1e-12)
    # P(A better) is the Mann-Whitney U of B against A over all pairs (lower is better).
    u = stats.mannwhitneyu(b, a).statistic
    assert line.p_improvement == pytest.approx(u / (len(a) * len(b)))


def test_mean_ci_for_metaplot_is_scipy_percentile() -> None:
    x = [0.31, 0.29, 0.40, 0.35, 0.33]
    ref = stats.bootstrap(
        (np.array(x),),
        np.mean,
        method="percentile",
        n_resamples=10_000,
        rng=np.random.default_rng(vstats.SEED),
    ).confidence_interval
    assert vstats.mean_ci(x) == pytest.approx((ref.low, ref.high), rel=1e-9)
    assert vstats.mean_ci([0.5]) == (0.5, 0.5)


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


def test_sign_flip_beyond_exact_enumeration_is_close_to_exact() -> None:
    d = np.random.default_rng(7).normal(0.4, 1, 18)
    ref = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=np.inf
    ).pvalue
    (p,) = vstats.sign_flip_p(d[None, :])
    assert abs(p - ref) < 0.01
    assert vstats.sign_flip_p(np.ones((1, 5)))[0] == pytest.approx(vstats.smallest_sign_flip_p(5))


def test_welch_is_scipy_ttest_ind_unequal_var() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, (50, 4)), rng.normal(0.5, 3, (50, 7))
    t, df, p = vstats.welch(a, b)
    ref = stats.ttest_ind(a, b, axis=1, equal_var=False)
    np.testing.assert_allclose(t, ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(p, ref.pvalue, rtol=1e-9)
    np.testing.assert_allclose(df, ref.df, rtol=1e-10)
    line = one_line(a[0], b[0], paired=False)
    assert line.p_value == pytest.approx(ref.pvalue[0], rel=1e-9)


def test_effect_sizes_follow_their_definitions() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 1, 7), rng.normal(1, 1, 7)
    pooled = math.sqrt((6 * np.var(a, ddof=1) + 6 * np.var(b, ddof=1)) / 12)
    g = (1 - 3 / (4 * 14 - 9)) * (a.mean() - b.mean()) / pooled
    assert one_line(a, b, paired=False).effect_size == pytest.approx(g, rel=1e-12)
    d = a - b
    assert one_line(a, b, paired=True).effect_size == pytest.approx(
        d.mean() / np.std(d, ddof=1), rel=1e-12
    )


def test_holm_matches_a_hand_checked_case() -> None:
    # sorted: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06; max(0.04*1, 0.06) = 0.06
    assert vstats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert vstats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert vstats.holm([]) == []


def test_analytic_power_matches_reference_values() -> None:
    # Cohen's tables / G*Power: two-sample t, d = 1, n = 10 per group, two-sided 0.05 -> 0.562;
    # paired, d_z = 1, 10 pairs -> 0.803.
    assert vstats.power_two_sample(1.0, 1.0, 10, 0.05) == pytest.approx(0.562, abs=0.001)
    assert vstats.power_paired(1.0, 1.0, 10, 0.05) == pytest.approx(0.803, abs=0.001)
    # d = 0.5 needs 64 per group for 80% (the textbook figure), d = 1 needs 17.
    assert vstats.repetitions_needed(0.5, 1.0, False, 0.05) == 64
    assert vstats.repetitions_needed(1.0, 1.0, False, 0.05) == 17
    assert vstats.repetitions_needed(0.0, 1.0, False, 0.05) is None
    assert vstats.repetitions_needed(1.0, 0.0, False, 0.05) is None
    # a paired sign-flip test needs 6 pairs to reach 0.05 at all
    assert vstats.repetitions_needed(100.0, 1.0, True, 0.05) == 6


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


def test_curve_line_against_scipy_bootstrap_and_contrast_by_hand() -> None:
    rng = np.random.default_rng(13)
    sizes_a, sizes_b = [10, 40, 160], [20, 80, 320]
    a = [reading.Side("A", s, list(rng.normal(1 / math.log(s), 0.05, 6))) for s in sizes_a]
    b = [reading.Side("B", s, list(rng.normal(1 / math.log(s), 0.05, 5))) for s in sizes_b]
    line = comparison.curve_line(a, b, "data", reading.LOWER)
    wa, wb, _, _ = comparison.curve_weights(sizes_a, sizes_b)
    groups = [np.array(s.values) for s in a + b]
    weights = np.concatenate([wa, -wb])
    used = [(w, g) for w, g in zip(weights, groups) if w != 0]

    def contrast(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return sum(w * x.mean(axis=axis) for (w, _), x in zip(used, samples))

    assert line.diff == pytest.approx(contrast(*(g for _, g in used)))
    ref = stats.bootstrap(
        tuple(g for _, g in used),
        contrast,
        method="percentile",
        n_resamples=10_000,
        rng=np.random.default_rng(1),
    ).confidence_interval
    width = ref.high - ref.low
    # independent resamples (different draws): equal up to Monte Carlo error
    assert abs(line.ci[0] - ref.low) < 0.05 * width and abs(line.ci[1] - ref.high) < 0.05 * width
    # the test: Welch-Satterthwaite for the contrast, by hand
    var_terms = np.array([w**2 * g.var(ddof=1) / g.size for w, g in used])
    t = line.diff / math.sqrt(var_terms.sum())
    df = var_terms.sum() ** 2 / sum(vt**2 / (g.size - 1) for vt, (_, g) in zip(var_terms, used))
    assert line.p_value == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)


def test_contrast_test_of_two_groups_is_welch() -> None:
    a, b = np.array([1.0, 1.2, 0.9, 1.4]), np.array([0.7, 0.8, 0.75])
    parts = np.array([[a.var(ddof=1) / 4, b.var(ddof=1) / 3]])
    _, _, p = vstats.contrast_test(np.array([a.mean() - b.mean()]), parts, np.array([[3, 2]]))
    assert p[0] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)


# -- matching, pairing, direction, verdict words -------------------------------------------------


def test_sizes_are_matched_to_the_nearest_within_the_factor() -> None:
    matched, lonely_a, lonely_b = comparison.match_sizes([10, 100, 1000], [12, 95, 140, 5000], 1.5)
    assert matched == [(10, 12), (100, 95)]
    assert lonely_a == [1000] and lonely_b == [140, 5000]
    assert comparison.match_sizes([10], [15], 1.5)[0] == [(10, 15)]
    assert comparison.match_sizes([10], [16], 1.5)[0] == []


def test_pairing_needs_the_same_seeds_on_the_same_data() -> None:
    def side(seeds: list[Any], stages: list[str]) -> reading.Side:
        return reading.Side("f", 1, [0.0] * len(seeds), seeds=seeds, data_stages=stages)

    assert comparison.pairing(side([0, 1], ["d", "d"]), side([1, 0], ["d", "d"])) == (
        True,
        "paired by seed",
    )
    assert not comparison.pairing(side([0, 1], ["d", "d"]), side([0, 2], ["d", "d"]))[0]
    assert not comparison.pairing(side([0, 1], ["d", "d"]), side([0, 1], ["d", "e"]))[0]
    assert not comparison.pairing(side([0, 0], ["d", "d"]), side([0, 0], ["d", "d"]))[0]
    assert not comparison.pairing(side([0, 1, 2], ["d"] * 3), side([0, 1], ["d"] * 2))[0]


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
    few = one_line(a[:3], b[:3], paired=True)  # 3 pairs: p >= 0.25 whatever the data
    same = one_line(a, a[::-1] + 1e-3, paired=False)
    comparison.decide([few, same], ALPHA, reading.LOWER)
    assert few.verdict == comparison.TOO_FEW and few.p_holm is None and few.repetitions_needed >= 6
    # one tested line: Holm leaves its p-value as it is
    assert same.verdict == comparison.NO_DIFFERENCE and same.p_holm == same.p_value
    assert same.repetitions_needed and same.repetitions_needed > 8


# -- calibration by simulation --------------------------------------------------------------------


def simulated_lines(a: np.ndarray, b: np.ndarray, paired: bool) -> list[comparison.Line]:
    """One line per row, through the command's own batched code (no bootstrap: the verdict
    rests on the p-value alone)."""
    n = a.shape[1]
    seeds = list(range(n)) if paired else [None] * n
    pairs = [
        (
            reading.Side("A", 1, list(x), seeds=seeds, data_stages=[""] * n),
            reading.Side("B", 1, list(y), seeds=seeds, data_stages=[""] * n),
        )
        for x, y in zip(a, b)
    ]
    return comparison.size_lines(pairs, "sim", reading.LOWER, ALPHA, n_resamples=0)


def rejection_rate(lines: list[comparison.Line]) -> float:
    """Each simulated line is its own report: Holm over one line is its p-value."""
    return float(np.mean([line.testable and line.p_value <= ALPHA for line in lines]))


@pytest.mark.parametrize("paired", [False, True])
def test_null_rejection_rate_is_alpha(paired: bool) -> None:
    rng = np.random.default_rng(100 + paired)
    a, b = rng.normal(0, 1, (2000, 10)), rng.normal(0, 1, (2000, 10))
    if paired:  # shared data: a strong common component, as a shared test split gives
        b = 0.8 * a + 0.6 * b
    rate = rejection_rate(simulated_lines(a, b, paired))
    print(f"null rejection rate ({'paired' if paired else 'unpaired'}): {rate:.3f}")
    assert 0.03 <= rate <= 0.07


def test_holm_keeps_the_family_wise_rate_of_a_report() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(0, 1, (5000, 10)), rng.normal(0, 1, (5000, 10))
    p = np.array([line.p_value for line in simulated_lines(a, b, False)]).reshape(1000, 5)
    any_false = np.mean([min(vstats.holm(row)) <= ALPHA for row in p])
    naive = np.mean((p <= ALPHA).any(axis=1))
    print(f"family-wise rate over 5 null lines: Holm {any_false:.3f}, uncorrected {naive:.3f}")
    assert 0.03 <= any_false <= 0.07 < naive


def test_power_at_one_sd_with_ten_per_group_is_the_analytic_value() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.normal(0, 1, (4000, 10)), rng.normal(1, 1, (4000, 10))
    measured = rejection_rate(simulated_lines(a, b, False))
    analytic = vstats.power_two_sample(1.0, 1.0, 10, ALPHA)
    print(f"power unpaired: measured {measured:.3f}, analytic {analytic:.3f}")
    assert abs(measured - analytic) <= 0.05
    d = rng.normal(-1, 1, (4000, 10))  # paired: differences of mean -1 sd
    measured = rejection_rate(simulated_lines(d, np.zeros_like(d), True))
    analytic = vstats.power_paired(1.0, 1.0, 10, ALPHA)
    print(f"power paired (sign-flip): measured {measured:.3f}, analytic {analytic:.3f}")
    assert abs(measured - analytic) <= 0.05


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
        lines = simulated_lines(rng.normal(0, 1, (k, n)), rng.normal(effect, 1, (k, n)), False)
        decided += sum(line.p_value <= ALPHA for line in lines)
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
    looks, n_max, sequences = [4, 8, 12, 16, 20], 20, 2000
    a, b = rng.normal(0, 1, (sequences, n_max)), rng.normal(0, 1, (sequences, n_max))
    p = np.stack([vstats.welch(a[:, :n], b[:, :n])[2] for n in looks], axis=1)
    decided_at = sequential_decisions(p, looks, n_max, ALPHA)
    false_rate = np.mean(decided_at >= 0)
    naive = np.mean((p <= ALPHA).any(axis=1))  # testing every round at alpha
    print(f"sequential false decisions: {false_rate:.3f} (naive looks: {naive:.3f})")
    assert false_rate <= ALPHA + 0.01
    assert naive > ALPHA + 0.03  # what the plan protects against
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
                fam: {
                    10: reading.Side(
                        fam, 10, list(rng.normal(shift, 0.1, n)), seeds=seeds, data_stages=[""] * n
                    )
                }
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
    assert plan.finished()


def test_sequential_plan_spends_exactly_alpha() -> None:
    plan = sequential.SequentialPlan(ALPHA, 20)
    levels = [plan.level(n) for n in (5, 10, 20)]
    assert sum(levels) == pytest.approx(ALPHA) and plan.finished()
    assert levels[0] < levels[1] < levels[2]  # O'Brien-Fleming: little early
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
    # brick ran seeds 0-4, funnel 30 seeds 0,1,3 (run 3 failed): not the same seeds
    assert not line["paired"] and line["n_a"] == 5 and line["n_b"] == 3
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
