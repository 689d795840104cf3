"""Derived metrics of a run, computed from its loss histories (pure functions, no torch).

Formulas (documented in docs/analysis.md):
- overfit      = |test[-1] - train[-1]| / (max - min over both histories); 0 when the range is 0
- trainability = mean of the test-loss history
- slope        = mean epoch-to-epoch change of the train loss over the last 10% of the epochs,
                 at least one step; None with fewer than two epochs
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _finite(values: Sequence[float]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def overfit(train: Sequence[float], test: Sequence[float]) -> float | None:
    if not train or not test or not _finite(train) or not _finite(test):
        return None
    both = [*train, *test]
    spread = max(both) - min(both)
    if spread == 0:
        return 0.0
    return abs(test[-1] - train[-1]) / spread


def trainability(test: Sequence[float]) -> float | None:
    if not test or not _finite(test):
        return None
    return sum(test) / len(test)


def slope(train: Sequence[float]) -> float | None:
    if len(train) < 2 or not _finite(train):
        return None
    steps = max(1, int(round(0.1 * (len(train) - 1))))
    tail = train[-(steps + 1) :]
    return (tail[-1] - tail[0]) / steps


def derived(train: Sequence[float], test: Sequence[float]) -> dict[str, float | None]:
    return {
        "overfit": overfit(train, test),
        "trainability": trainability(test),
        "slope": slope(train),
    }
