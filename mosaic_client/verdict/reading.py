"""Reading a study into what the verdict needs: the metric of every finished run as Sides
({dataset key: {family: {nb_params: Side}}}, with seeds and data stages for the pairing, and
the side's failed runs: status failed, or finished with a NaN or infinite metric), and which
way each metric is better. No numpy: this is plain Python over the study's rows."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import analysis, contract, study_reading

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
    # What a run costs (issue 26): less is better, but for throughput.
    **{c: HIGHER if c in contract.MORE_IS_BETTER else LOWER for c in contract.RESOURCE_COLUMNS},
}
NOT_OUTCOMES = {
    "nb_params": "it is the size axis the families are matched on",
    "epochs": "it is fixed by the configuration, not an outcome of training",
}

# The params that differ between the repetitions of one configuration (docs/compare.md).
REPETITION_PARAMS = contract.REPETITION_PARAMS
# The param that marks a search's runs (mosaic_client.search.STAGE_PARAM): trial or final.
SEARCH_STAGE = "search_stage"


class VerdictError(ValueError):
    """Input the comparison cannot use, with what to do instead."""


def direction(metric: str) -> str:
    if metric in NOT_OUTCOMES:
        raise VerdictError(
            f"cannot compare on {metric}: {NOT_OUTCOMES[metric]}; use one of: "
            f"{', '.join(DIRECTIONS)}"
        )
    return DIRECTIONS[metric]


@dataclass
class Side:
    """The runs of one family at one size: values of the metric, with seed and data stage;
    and its failed runs (failure is an outcome: the verdict counts them, docs/compare.md)."""

    family: str
    nb_params: int
    values: list[float]
    run_ids: list[int] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    data_stages: list[str] = field(default_factory=list)
    failed_run_ids: list[int] = field(default_factory=list)
    failed_seeds: list[Any] = field(default_factory=list)
    failed_stages: list[str] = field(default_factory=list)

    def add_failure(self, run_id: int, params: dict[str, Any], stage: str) -> None:
        self.failed_run_ids.append(run_id)
        self.failed_seeds.append(params.get("seed"))
        self.failed_stages.append(stage)

    @property
    def failures(self) -> int:
        return len(self.failed_run_ids)

    @functools.cached_property
    def mean(self) -> float:
        """Mean of the finished runs; nan when every run failed."""
        if not self.values:
            return math.nan
        return math.fsum(self.values) / len(self.values)

    @functools.cached_property
    def var(self) -> float:
        """Sample variance; nan for a single value."""
        if len(self.values) < 2:
            return math.nan
        m = self.mean
        return math.fsum((v - m) ** 2 for v in self.values) / (len(self.values) - 1)


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
    types = set(analysis.scheme_types(params, "data_scheme"))
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
    unplaced: dict[str, int] = field(default_factory=dict)  # failed runs of unknown size, by key
    size_by: str = "nb_params"  # the run_results column the sizes are (issue 26)


def size_axis(metric: str, size_by: str) -> str:
    """The run_results column the families are matched on (contract.size_column: a name or a
    short name), refused when it is the metric itself."""
    try:
        column = contract.size_column(size_by)
    except ValueError as exc:
        raise VerdictError(f"--size-by {exc}") from None
    if column == metric:
        raise VerdictError(
            f"cannot compare on {metric} at matched {column}: the families would be matched on "
            "the figure compared; give another size or cost column, or another --metric"
        )
    return column


def study_values(conn: Any, metric: str, size_by: str = "nb_params") -> StudyValues:
    """The metric of every finished run of the study on `conn`, grouped into Sides by the size
    column `size_by` (a configuration's median: size_axis), with each side's failed runs; the
    runs left out counted by reason."""
    analysis.check_criterion(metric)
    direction(metric)
    column = size_axis(metric, size_by)
    params = study_reading.run_params(conn)
    statuses = study_reading.run_statuses(conn)
    results = study_reading.results_by_run(conn, (column, metric))
    values = StudyValues(metric, {}, {}, {})
    configs: dict[tuple[str, str, Any], set[Any]] = {}
    stages: dict[Any, str] = {}
    # Each run's place on the size axis: its configuration's (a run that failed before
    # reporting its size has its configuration's finished runs' size; none when none finished).
    sizes = analysis.configuration_sizes(
        params, statuses, {r: row[0] for r, row in results.items()}, column
    )
    for run_id in sorted(statuses):
        own = params.get(run_id, {})
        key = analysis.data_key(own)
        if key is None or own.get(SEARCH_STAGE) == "trial":
            # A tuned study is compared on its final runs only (docs/tuning.md): the trials
            # chose the configurations, on other seeds.
            continue
        values.sides.setdefault(key, {})
        row = results.get(run_id)
        size = sizes.get(run_id)
        status = statuses[run_id]
        failed = status == "failed" or (
            status == "done"
            and row is not None
            and size is not None
            and (row[1] is None or not math.isfinite(row[1]))
        )
        if failed:
            reason = "failed" if status == "failed" else f"without {metric}"
            values.skipped[reason] = values.skipped.get(reason, 0) + 1
            if size is None:
                values.unplaced[key] = values.unplaced.get(key, 0) + 1
            else:
                _side(values, key, own, size).add_failure(run_id, own, _data_stage(own, stages))
            continue
        if status != "done" or row is None or size is None:
            reason = status if status != "done" else "without results"
            if status == "done" and row is not None:
                reason = f"without a positive {column}"
            values.skipped[reason] = values.skipped.get(reason, 0) + 1
            continue
        side = _side(values, key, own, size)
        side.values.append(float(row[1]))
        side.run_ids.append(run_id)
        side.seeds.append(own.get("seed"))
        side.data_stages.append(_data_stage(own, stages))
        # Everything but the repetition's own params (set operations: fast on 10,000 runs).
        signature = frozenset(own.items()) - {(k, own.get(k)) for k in REPETITION_PARAMS}
        configs.setdefault((key, side.family, size), set()).add(signature)
    values.configurations = {k: len(v) for k, v in configs.items()}
    values.size_by = column
    return values


def _side(values: StudyValues, key: str, own: dict[str, Any], size: Any) -> Side:
    family = analysis.model_key(own) or "(no model key)"
    by_size = values.sides.setdefault(key, {}).setdefault(family, {})
    return by_size.setdefault(size, Side(family, size, []))
