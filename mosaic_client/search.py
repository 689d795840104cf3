"""Tuned comparisons (docs/tuning.md): search spaces, the [SEARCH] rules both sides share, and
the pure functions a search is made of (standard library only: part of the shared contract).

A parameter of a module section, or [PROCESS] lr, may be a *distribution*
(``loguniform(1e-4, 1e-1)``, ``uniform(0, 0.5)``, ``int(1, 4)``, ``choice(16, 32, 64)``). It
travels unresolved, as its canonical text, in the run's modules (or its process lr) until the
run starts: the worker that trains it resolves it (sampled, or the group's best trial for a
final run) and sends the values back in a ``search`` message, which the daemon records in the
run's params. The daemon never samples (it never imports optuna).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mosaic_client.contract import MODULE_FIELDS

# -- names ------------------------------------------------------------------------------------
SEARCH = "SEARCH"  # the config section
LOGUNIFORM, UNIFORM, INT, CHOICE = "loguniform", "uniform", "int", "choice"
DISTRIBUTIONS: tuple[str, ...] = (LOGUNIFORM, UNIFORM, INT, CHOICE)
STRATEGIES: tuple[str, ...] = ("grid", "random", "tpe")
PRUNINGS: tuple[str, ...] = ("none", "median", "hyperband")
DIRECTIONS: tuple[str, ...] = ("minimize", "maximize")
TRIAL, FINAL = "trial", "final"
# The params every run of a search records (users' SQL reads them).
STAGE_PARAM = "search_stage"  # trial | final
TRIAL_PARAM = "search_trial"  # a trial's number in its group, from 0
GROUP_PARAM = "search_group"  # the group (family x size: one combination of the grid's lists)
PRUNED_PARAM = "search_pruned"  # a pruned trial: the epoch its pruner stopped it after
# Per-epoch columns a pruner can read (contract.EPOCH_COLUMNS besides the duration).
EPOCH_METRICS: tuple[str, ...] = (
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "val_loss",
    "val_acc",
)
# The run_results columns a search may select on (nb_params and epochs are not outcomes).
METRICS: tuple[str, ...] = EPOCH_METRICS + ("overfit", "trainability", "slope")
# Trials per round by default: a constant, never the machine's slot count (docs/tuning.md).
DEFAULT_ROUND_SIZE = 4
# The most trials a group may have: more is a typo (and each is a training run).
MAX_TRIALS = 10_000

_CALL_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", re.DOTALL)


@dataclass(frozen=True)
class Distribution:
    """One searched parameter's distribution."""

    kind: str
    args: tuple[int | float | str, ...]

    @property
    def text(self) -> str:
        """The canonical text: what modules and params hold until the run resolves it."""
        items = (repr(a) if isinstance(a, str) else str(a) for a in self.args)
        return f"{self.kind}({', '.join(items)})"

    def grid(self) -> list[int | float | str]:
        """The values a grid search tries; ValueError for a continuous distribution."""
        if self.kind == CHOICE:
            return list(self.args)
        if self.kind == INT:
            low, high = int(self.args[0]), int(self.args[1])
            if high - low >= 1000:
                raise ValueError(f"int({low}, {high}) has too many values for a grid")
            return list(range(low, high + 1))
        raise ValueError(
            f"{self.kind}() is continuous: strategy = grid takes choice() or int() only; "
            "use strategy = random or tpe"
        )


def _number(text: str) -> int | float:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"'{text}' is not a finite number")
    return value


def _choice_item(text: str) -> int | float | str:
    text = text.strip()
    try:
        return _number(text)
    except ValueError:
        return text.strip("'\"")


def is_distribution_syntax(text: str) -> bool:
    """Whether a config value is written as a call, name(...): a distribution, or a mistake."""
    return _CALL_RE.fullmatch(text) is not None


def parse(text: str) -> Distribution:
    """A distribution from its text; ValueError with a message for the user when it is wrong
    (unknown name, wrong arguments, low > high, log of a non-positive bound)."""
    match = _CALL_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"'{text}' is not a distribution such as loguniform(1e-4, 1e-1)")
    name, inner = match.group(1), match.group(2)
    if name not in DISTRIBUTIONS:
        known = ", ".join(d + "()" for d in DISTRIBUTIONS)
        raise ValueError(f"unknown distribution '{name}'; use one of {known}")
    items = [item for item in inner.split(",")]
    if any(not item.strip() for item in items):
        raise ValueError(f"{name}() has an empty argument")
    if name == CHOICE:
        values = tuple(_choice_item(item) for item in items)
        if len(set(values)) != len(values):
            raise ValueError("choice() lists a value twice")
        return Distribution(CHOICE, values)
    if len(items) != 2:
        raise ValueError(f"{name}() takes two bounds, low and high, e.g. {name}(1, 4)")
    low, high = (_number(item) for item in items)
    if name == INT and not (isinstance(low, int) and isinstance(high, int)):
        raise ValueError(f"int() takes integer bounds, got {low} and {high}")
    if low > high:
        raise ValueError(f"{name}({low}, {high}): low is greater than high")
    if name == LOGUNIFORM and low <= 0:
        raise ValueError(f"loguniform({low}, {high}): a log scale needs bounds above 0")
    if name != INT:
        low, high = float(low), float(high)
    return Distribution(name, (low, high))


# -- a run's search space ----------------------------------------------------------------------


def param_name(module: Mapping[str, Any], name: str) -> str:
    """The params row of a module parameter (mosaicd.scheduling.submissions.run_params)."""
    return f"{module.get('class')}_{name}"


def space(lr: Any, modules: Sequence[Mapping[str, Any]]) -> dict[str, Distribution]:
    """{param name: distribution} of one run: [PROCESS] lr when it is a distribution's text,
    and every module parameter whose value is one. In sorted order (a sampler's input)."""
    found: dict[str, Distribution] = {}
    if isinstance(lr, str):
        found["lr"] = parse(lr)
    for module in modules:
        for name, value in module.items():
            if (
                name not in MODULE_FIELDS
                and isinstance(value, str)
                and is_distribution_syntax(value)
            ):
                found[param_name(module, name)] = parse(value)
    return dict(sorted(found.items()))


def resolve(
    lr: Any, modules: Sequence[Mapping[str, Any]], values: Mapping[str, Any]
) -> tuple[Any, list[dict[str, Any]]]:
    """The lr and modules with every distribution replaced by its value in `values`."""
    new_lr = values.get("lr", lr) if isinstance(lr, str) else lr
    resolved: list[dict[str, Any]] = []
    for module in modules:
        copy = dict(module)
        for name, value in module.items():
            key = param_name(module, name)
            if name not in MODULE_FIELDS and isinstance(value, str) and key in values:
                copy[name] = values[key]
        resolved.append(copy)
    return new_lr, resolved


def value_problem(dimension: Distribution, value: Any) -> str | None:
    """What makes `value` impossible for the distribution, or None."""
    if dimension.kind == CHOICE:
        return None if value in dimension.args else f"{value!r:.40} is not one of the choices"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{value!r:.40} is not a finite number"
    if dimension.kind == INT and not isinstance(value, int):
        return f"{value!r:.40} is not an integer"
    low, high = dimension.args
    if not low <= value <= high:  # type: ignore[operator]
        return f"{value!r:.40} is outside [{low}, {high}]"
    return None


def values_problem(dimensions: Mapping[str, Distribution], values: Mapping[str, Any]) -> str | None:
    """What makes a worker's resolved values unusable for the run's space, or None: the same
    names, each value possible for its distribution."""
    if set(values) != set(dimensions):
        return f"names {sorted(values)} are not the run's searched params {sorted(dimensions)}"
    for name, dimension in dimensions.items():
        problem = value_problem(dimension, values[name])
        if problem:
            return f"{name}: {problem}"
    return None


def grid_points(dimensions: Mapping[str, Distribution]) -> list[dict[str, Any]]:
    """The cartesian product of the dimensions' grid values, in a fixed order."""
    names = sorted(dimensions)
    return [
        dict(zip(names, combo, strict=True))
        for combo in itertools.product(*(dimensions[n].grid() for n in names))
    ]


def sampler_seed(study_seed: int, group: int, trial: int) -> int:
    """The seed of the sampler that draws trial `trial` of group `group`: a function of these
    alone, so the same study seed gives the same trials on any machine, after any restart."""
    digest = hashlib.sha256(json.dumps([study_seed, group, trial]).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def round_of(trial: int, round_size: int) -> int:
    """The round of a trial: trials of round r start once every trial of earlier rounds of
    their group has finished, so what a sampler sees does not depend on timing."""
    return trial // max(1, round_size)


def trial_seed(base: int, trial: int) -> int:
    """Trial n of every group trains with seed base + n."""
    return base + trial


def final_seed(base: int, trials: int, repetition: int) -> int:
    """Final repetition i of every group: base + trials + i, after every trial seed (disjoint
    from them) and the same in every group (so compare pairs the families)."""
    return base + trials + repetition


def best(history: Sequence[Mapping[str, Any]], direction: str) -> Mapping[str, Any] | None:
    """The best complete trial of a history ({trial, values, value, state}): lowest (or
    highest) finite value, ties to the lower trial number; None when none completed."""
    complete = [
        h
        for h in history
        if h.get("state") == "complete"
        and isinstance(h.get("value"), (int, float))
        and math.isfinite(h["value"])
    ]
    if not complete:
        return None
    sign = 1 if direction == "minimize" else -1
    return min(complete, key=lambda h: (sign * h["value"], h["trial"]))


def record(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run_meta.search value (what the daemon keeps about a search run): group, stage, trial
    (None for a final run) and round."""
    return {k: run.get(k) for k in ("group", "stage", "trial", "round")}
