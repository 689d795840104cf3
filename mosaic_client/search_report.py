"""What a study's searches did (docs/tuning.md), read-only: per family x size group, its
trials (finished, pruned, failed), their cost in slot-hours, the best so far after each trial,
the selected configuration and its final runs. Read by `compare` (the tuning cost of a tuned
comparison), `status` (each search's progress) and `tuning` (the table and the plots).
Standard library only."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import analysis, contract, schema, search, study_reading


@dataclass
class Group:
    """One family x size group of a search."""

    submission_id: int
    group: int
    family: str
    data_key: str
    settings: dict[str, Any]
    trials: int = 0  # queued for it (the budget)
    finished: int = 0  # trials in a final state
    pruned: int = 0
    failed: int = 0
    slot_hours: float = 0.0  # the trials' training time
    # (trial, its value or None, the best value after it) in trial order, finished trials only
    curve: list[tuple[int, float | None, float | None]] = field(default_factory=list)
    best_trial: int | None = None
    best_values: dict[str, Any] = field(default_factory=dict)
    finals: int = 0
    finals_done: int = 0
    trial_seeds: list[int] = field(default_factory=list)
    final_seeds: list[int] = field(default_factory=list)
    nb_params: int | None = None
    names: list[str] = field(default_factory=list)  # the searched params
    # The searched values and metric of every finished trial: for an importance estimate.
    points: list[tuple[dict[str, Any], float]] = field(default_factory=list)

    @property
    def best(self) -> float | None:
        return self.curve[-1][2] if self.curve else None

    def as_json(self) -> dict[str, Any]:
        return {
            "submission_id": self.submission_id,
            "group": self.group,
            "family": self.family,
            "data_key": self.data_key,
            "nb_params": self.nb_params,
            "metric": self.settings["metric"],
            "direction": self.settings["direction"],
            "strategy": self.settings["strategy"],
            "trials": self.trials,
            "finished": self.finished,
            "pruned": self.pruned,
            "failed": self.failed,
            "slot_hours": self.slot_hours,
            "best": self.best,
            "best_trial": self.best_trial,
            "best_values": self.best_values,
            "finals": self.finals,
            "finals_done": self.finals_done,
        }


def _better(a: float, b: float | None, direction: str) -> bool:
    return b is None or (a < b if direction == "minimize" else a > b)


def groups(conn: sqlite3.Connection) -> list[Group]:
    """Every search group of the study, by submission and group number."""
    runs = study_reading.search_runs(conn)
    if not runs:
        return []
    settings = study_reading.search_settings(conn)
    params = study_reading.run_params(conn, [r["run_id"] for r in runs])
    columns = ("nb_params", "duration(s)", *search.METRICS)
    results = study_reading.results_by_run(conn, columns)
    found: dict[tuple[int, int], Group] = {}
    for run in runs:
        own = params.get(run["run_id"], {})
        key = (run["submission_id"], int(run["group"]))
        if key not in found:
            given = settings.get(run["submission_id"], {})
            resolved = dict(schema.search_settings({k: v for k, v in given.items() if k != "lr"}))
            names = list(search.space(given.get("lr"), json.loads(run["modules"])))
            found[key] = Group(
                run["submission_id"],
                int(run["group"]),
                analysis.model_key(own) or "(no model key)",
                analysis.data_key(own) or "(no data key)",
                resolved,
                names=names,
            )
        _add(found[key], run, own, results.get(run["run_id"]), columns)
    return [found[k] for k in sorted(found)]


def _add(
    group: Group,
    run: dict[str, Any],
    own: dict[str, Any],
    row: tuple[Any, ...] | None,
    columns: tuple[str, ...],
) -> None:
    figures = dict(zip(columns, row)) if row is not None else {}
    if run["stage"] == search.FINAL:
        group.finals += 1
        group.final_seeds.append(run["seed"])
        if run["status"] == contract.DONE:
            group.finals_done += 1
            if figures.get("nb_params") is not None:
                group.nb_params = int(figures["nb_params"])
        return
    group.trials += 1
    group.trial_seeds.append(run["seed"])
    if run["status"] not in contract.FINAL_STATES:
        return
    group.finished += 1
    group.slot_hours += float(figures.get("duration(s)") or 0.0) / 3600.0
    if own.get(search.PRUNED_PARAM) is not None:
        group.pruned += 1
    elif run["status"] != contract.DONE:
        group.failed += 1
    value = figures.get(group.settings["metric"])
    complete = (
        run["status"] == contract.DONE
        and own.get(search.PRUNED_PARAM) is None
        and isinstance(value, (int, float))
        and math.isfinite(value)
    )
    best = group.best
    if complete and _better(float(value), best, group.settings["direction"]):
        best = float(value)
        group.best_trial = int(run["trial"])
        group.best_values = _searched(own, group.names)
    if complete:
        group.points.append((_searched(own, group.names), float(value)))
    group.curve.append((int(run["trial"]), float(value) if complete else None, best))
    group.curve.sort()


def _searched(own: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The searched values of a run, as its params hold them once resolved."""
    return {name: own.get(name) for name in names}


def progress_line(group: Group) -> str:
    """One search group's progress, for `mosaic status`."""
    metric = group.settings["metric"]
    best = "-" if group.best is None else f"{group.best:.4g} (trial {group.best_trial})"
    extra = ", ".join(
        f"{n} {what}" for n, what in ((group.pruned, "pruned"), (group.failed, "failed")) if n
    )
    return (
        f"  search {group.data_key} {group.family}: {group.finished}/{group.trials} trials"
        + (f" ({extra})" if extra else "")
        + f", best {metric} {best}, final runs {group.finals_done}/{group.finals}"
    )


def of_study(path: str) -> list[Group]:
    """The search groups of a study file, read-only; [] when it cannot be read now."""
    try:
        conn = analysis.open_readonly(path)
    except Exception:  # a status line must not fail over a study it cannot read
        return []
    try:
        return groups(conn)
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def importance(points: list[tuple[dict[str, Any], float]]) -> dict[str, float]:
    """How much of the spread of the metric over a group's finished trials each searched
    param explains, alone (docs/tuning.md): for a number, the squared correlation of the
    metric with its value (with log10 of it when every value is positive and they span more
    than a factor 10, as a loguniform's do); for a choice, the share of the variance between
    its values' means (eta squared). Each between 0 and 1; {} with fewer than 3 trials."""
    if len(points) < 3:
        return {}
    ys = [y for _, y in points]
    out: dict[str, float] = {}
    for name in points[0][0]:
        xs = [p[0].get(name) for p in points]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            numbers = [float(x) for x in xs]  # type: ignore[arg-type]
            if min(numbers) > 0 and max(numbers) > 10 * min(numbers):
                numbers = [math.log10(x) for x in numbers]
            out[name] = _r_squared(numbers, ys)
        else:
            out[name] = _eta_squared([str(x) for x in xs], ys)
    return out


def _r_squared(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return 0.0
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy * sxy / (sxx * syy)


def _eta_squared(labels: list[str], ys: list[float]) -> float:
    my = sum(ys) / len(ys)
    total = sum((y - my) ** 2 for y in ys)
    if total == 0:
        return 0.0
    by: dict[str, list[float]] = {}
    for label, y in zip(labels, ys):
        by.setdefault(label, []).append(y)
    between = sum(len(v) * (sum(v) / len(v) - my) ** 2 for v in by.values())
    return between / total
