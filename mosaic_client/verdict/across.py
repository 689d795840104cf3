"""`mosaic compare --across-datasets`: one verdict per pair of families over every dataset key.

Each dataset key contributes the evidence of one line of the report: its curve line when it can
be tested with a t test, else its only matched-size line. Different dataset keys train on
different data, so these tests are independent; each line's two-sided p-value and direction
become a signed z, z_k = ±Φ⁻¹(1 − p_k / 2) (+ when A is better there), exactly N(0, 1) under the
null of a t test, and Stouffer's method combines them: Z = Σ z_k / √K, p = 2 Φ(−|Z|) (the one-
sided version is scipy.stats.combine_pvalues(method="stouffer")). Holm then corrects across the
family pairs. The question answered is the fixed-effects one: on these datasets, does one family
tend to be better? (docs/compare.md, "Across datasets")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mosaic_client.verdict.comparison import A_BETTER, B_BETTER, NO_DIFFERENCE, TOO_FEW, Line
from mosaic_client.verdict.reading import LOWER
from mosaic_client.verdict.statistics import step_down


@dataclass
class AcrossLine:
    """One family pair over every dataset key."""

    a: str
    b: str
    datasets: list[str] = field(default_factory=list)  # the keys whose evidence counts
    lines: list[str] = field(default_factory=list)  # which line of each: "curve" or "A/B" sizes
    a_better_in: int = 0  # datasets whose line favours A
    z: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    mean_p_improvement: float | None = None  # over the datasets' size lines that have one
    verdict: str = ""
    left_out: list[str] = field(default_factory=list)  # keys without a usable line, and why

    def as_json(self) -> dict[str, Any]:
        return dict(vars(self))


def evidence(lines: Sequence[Line]) -> tuple[Line | None, str]:
    """The line of one dataset key that speaks for it: the curve line if its test is a t test,
    else the only size line with a t test; None (and why) otherwise."""
    t_tested = [ln for ln in lines if ln.p_value is not None and ln.p_floor == 0]
    curves = [ln for ln in t_tested if ln.kind == "curve"]
    if curves:
        return curves[0], ""
    sizes = [ln for ln in t_tested if ln.kind == "size"]
    if len(sizes) == 1:
        return sizes[0], ""
    if sizes:
        return None, f"{len(sizes)} size lines and no testable curve line"
    return None, "no line with a t test"


def signed_z(line: Line, better: str) -> float:
    """±Φ⁻¹(1 − p/2): + when the line's difference favours A."""
    from scipy import special

    a_wins = (line.diff < 0) == (better == LOWER)
    magnitude = float(special.ndtri(1 - line.p_value / 2)) if line.p_value < 1 else 0.0
    return magnitude if a_wins else -magnitude


def across_datasets(lines: Sequence[Line], better: str, alpha: float) -> list[AcrossLine]:
    """One AcrossLine per family pair of the report's lines, with Holm across the pairs."""
    from scipy import special

    by_pair: dict[tuple[str, str], dict[str, list[Line]]] = {}
    for line in lines:
        by_pair.setdefault((line.a, line.b), {}).setdefault(line.dataset_key, []).append(line)
    out = []
    for (a, b), by_key in sorted(by_pair.items()):
        found = AcrossLine(a, b)
        zs, improvements = [], []
        for key in sorted(by_key):
            line, why = evidence(by_key[key])
            if line is None:
                found.left_out.append(f"{key}: {why}")
                continue
            z = signed_z(line, better)
            zs.append(z)
            found.a_better_in += z > 0
            found.datasets.append(key)
            found.lines.append(
                "curve" if line.kind == "curve" else f"{line.a_nb_params}/{line.b_nb_params}"
            )
            if line.p_improvement is not None:
                improvements.append(line.p_improvement)
        if zs:
            found.z = sum(zs) / math.sqrt(len(zs))
            found.p_value = float(2 * special.ndtr(-abs(found.z)))
        if improvements:
            found.mean_p_improvement = sum(improvements) / len(improvements)
        out.append(found)
    tested = [f for f in out if f.p_value is not None]
    adjusted, _ = step_down(
        [f.p_value for f in tested], [0.0] * len(tested), list(range(len(tested))), alpha
    )
    for f, adj in zip(tested, adjusted):
        f.p_holm = adj
    for f in out:
        if f.p_holm is None:
            f.verdict = TOO_FEW
        elif f.p_holm <= alpha and f.z:
            f.verdict = A_BETTER if f.z > 0 else B_BETTER
        else:
            f.verdict = NO_DIFFERENCE
    return out
