"""A submission: the daemon's checks of a submit request, and the runs it becomes.

The PROCESS/MONITOR rules are the shared schema's (mosaic_client.schema), so the client's config
checks and these agree; what is checked here besides is what only the daemon can check (the
pipelines as sent, the run files directory on this machine, the slots it has).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import schema, search
from mosaic_client.contract import MODULE_FIELDS, PROCESS_SEED_PARAM, run_info_key_problem
from mosaic_client.protocol import ErrorCode
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.executors.base import Slot
from mosaicd.owners import Owner

_SCALAR = (str, int, float, bool, type(None))
# The module keys every pipeline stage must name (the others of MODULE_FIELDS are optional).
_MODULE_NAMES = ("type", "class", "path_to_class")


@dataclass
class Submission:
    """One submission of a study, as the scheduler keeps it in memory while it has runs."""

    study: str
    submission_id: int
    owner_uid: int | None
    owner: str | None
    # The user's values as the study stores them (what `mosaic show` and `pending` report).
    process: dict[str, Any]
    monitor: dict[str, Any]
    running: int = 0
    priority: int = 0  # among its owner's runs: higher first (mosaic run --priority)
    # [SEARCH] as sent (docs/tuning.md); None: not a search.
    search: dict[str, Any] | None = None
    # The same, resolved once here with every default filled in (mosaic_client.schema): the
    # scheduler and the run specs read these, never a default of their own.
    process_settings: schema.ProcessSettings = field(init=False)
    monitor_settings: schema.MonitorSettings = field(init=False)

    search_settings: schema.SearchSettings | None = field(init=False)

    def __post_init__(self) -> None:
        self.process_settings = schema.process_settings(self.process)
        self.monitor_settings = schema.monitor_settings(self.monitor)
        self.search_settings = None if self.search is None else schema.search_settings(self.search)

    @functools.cached_property
    def run_as(self) -> Owner | None:
        """Whom its runs execute as (mosaicd.owners): None for the daemon's own user."""
        return owners.of_uid(self.owner_uid)

    @property
    def run_as_uid(self) -> int | None:
        return None if self.run_as is None else self.run_as.uid

    @property
    def umask(self) -> int:
        return owners.umask_of(self.monitor_settings)

    @property
    def cap(self) -> int:
        return max(1, self.monitor_settings["nb_processus"])

    @property
    def retries(self) -> int:
        return self.monitor_settings["retries"]

    @property
    def timeout(self) -> float | None:
        return self.monitor_settings["timeout"] or None

    @property
    def slot_kind(self) -> str:
        return "cuda" if self.monitor_settings["need_gpu"] else "cpu"

    def allows(self, slot: Slot) -> bool:
        if slot.kind != self.slot_kind:
            return False
        wanted = [str(g).replace("cuda:", "") for g in self.monitor_settings["gpu_available"]]
        return slot.kind == "cpu" or not wanted or slot.gpu in wanted


def submission_problem(
    process: dict[str, Any], monitor: dict[str, Any], pipelines: list[Any]
) -> str | None:
    """What makes a submission unusable, or None. The CLI's config checks do not protect the
    daemon from a hand-made request, and a bad value found later (at dispatch, in the timeout
    check) would fail every run or stop the loop: refuse it here, before anything is written."""
    problem = schema.submission_problem(process, monitor)
    if problem:
        return problem
    run_files = process["run_files_path"]
    existing = run_files
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        # Else every run would fail in its worker before it could write its log.
        return (
            f"run_files_path {run_files}: {existing} exists and is not a directory; give "
            "a directory (it is created if missing)"
        )
    schemes = [*process["data_scheme"], *process["pipeline_scheme"]]
    for pipeline in pipelines:
        if len(pipeline) != len(schemes):
            return (
                f"each pipeline must have one module per scheme type ({len(schemes)}), "
                f"got {len(pipeline)}"
            )
        for module in pipeline:
            for name in _MODULE_NAMES:
                if not isinstance(module.get(name), str) or not module[name]:
                    return f"each module needs a {name!r} string; got {module!r:.120}"
            if not all(isinstance(k, str) and isinstance(v, _SCALAR) for k, v in module.items()):
                return f"module values must be numbers or strings; got {module!r:.120}"
            for key in module:
                # The config checks refuse these too; a hand-made request must not record a
                # param the class never received either.
                problem = run_info_key_problem(str(module.get("name") or module["class"]), key)
                if problem:
                    return problem
    return None


def search_problem(
    search_values: dict[str, Any] | None, process: dict[str, Any], pipelines: list[Any]
) -> str | None:
    """What makes a submission's search unusable (the client's config checks, again for a
    hand-made request): distributions without [SEARCH] or the reverse, a bad distribution,
    a grid over a continuous one or with fewer points than trials."""
    try:
        spaces = [search.space(process.get("lr"), modules) for modules in pipelines]
    except ValueError as exc:
        return str(exc)
    if search_values is None:
        named = next((list(space) for space in spaces if space), None)
        if named:
            return f"{named[0]} is a distribution but the submission has no [SEARCH]"
        return None
    problem = schema.section_problem(schema.SEARCH, search_values, require=False)
    if problem:
        return problem
    if not all(spaces):
        return "[SEARCH] is given but a pipeline has no distribution to search"
    settings = schema.search_settings(search_values)
    if settings["strategy"] == "grid":
        try:
            smallest = min(len(search.grid_points(space)) for space in spaces)
        except ValueError as exc:
            return str(exc)
        if smallest < settings["trials"]:
            return f"[SEARCH] trials = {settings['trials']} exceeds a grid of {smallest} points"
    return None


def check_submission(
    process: dict[str, Any],
    monitor: dict[str, Any],
    pipelines: list[Any],
    gpu_slots: int,
    search_values: dict[str, Any] | None = None,
) -> None:
    """Refuse a submission the daemon cannot run; nothing is written before this passes."""
    if not pipelines:
        raise Refused(ErrorCode.INVALID, "the submission has no pipeline")
    for pipeline in pipelines:
        if not isinstance(pipeline, list) or not all(isinstance(m, dict) for m in pipeline):
            raise Refused(ErrorCode.INVALID, "each pipeline must be a list of module maps")
    problem = submission_problem(process, monitor, pipelines) or search_problem(
        search_values, process, pipelines
    )
    if problem:
        raise Refused(ErrorCode.INVALID, f"{problem}; nothing was queued")
    if schema.monitor_settings(monitor)["need_gpu"] and not gpu_slots:
        raise Refused(
            ErrorCode.INVALID,
            "this submission needs a GPU (MONITOR need_gpu = true) "
            "but this daemon has no GPU slots; start mosaicd with --gpus 0,... on a "
            "GPU machine, or set need_gpu = false",
        )


def readable_pipeline(modules: list[dict[str, Any]]) -> str:
    """`dataset_OR(200,0.8,20) | mlp_funnel(2,3)`: the seed's readable form."""
    parts = []
    for module in modules:
        values = ",".join(str(v) for k, v in module.items() if k not in MODULE_FIELDS)
        parts.append(f"{module.get('class')}({values})")
    return " | ".join(parts)


def run_params(
    process: dict[str, Any],
    modules: list[dict[str, Any]],
    seed: int,
    owner_uid: int | None,
    owner: str | None,
) -> dict[str, Any]:
    """The seed's params naming: PROCESS values, pipeline, {type}_key, {class}_{param}."""
    params: dict[str, Any] = {}
    for name, value in process.items():
        if value is None:
            continue
        # The [PROCESS] seed has its own row: `seed` is the run's own seed (below).
        name = PROCESS_SEED_PARAM if name == "seed" else name
        params[name] = ",".join(value) if isinstance(value, list) else value
    params["pipeline"] = json.dumps(modules)
    for module in modules:
        params[f"{module.get('type')}_key"] = module.get("key")
        for name, value in module.items():
            if name not in MODULE_FIELDS:
                params[f"{module.get('class')}_{name}"] = value
    params["seed"] = seed
    params["owner"] = owner
    params["owner_uid"] = owner_uid
    return params


Run = tuple[list[dict[str, Any]], int, str, dict[str, Any]]  # modules, seed, readable, params


def build_runs(
    process: dict[str, Any],
    monitor: dict[str, Any],
    pipelines: list[Any],
    owner_uid: int | None,
    owner: str | None,
    start: int = 0,
) -> list[Run]:
    """The runs of a checked submission, as Store.add_submission takes them: repetition i of a
    pipeline gets seed + i (random seeds without a PROCESS seed). `pipelines` may be a part of
    the submission's, beginning at its pipeline `start` (a big one is taken in parts)."""
    base_seed = process.get("seed")
    multiplicity = max(1, schema.monitor_settings(monitor)["multiplicity"])
    runs = []
    for index, modules in enumerate(pipelines, start):
        if isinstance(base_seed, int):
            seed = base_seed + index % multiplicity
        else:
            seed = secrets.randbelow(2**31)
        runs.append(
            (
                modules,
                seed,
                readable_pipeline(modules),
                run_params(process, modules, seed, owner_uid, owner),
            )
        )
    return runs


def build_search_runs(
    process: dict[str, Any],
    pipelines: list[Any],
    search_values: dict[str, Any],
    owner_uid: int | None,
    owner: str | None,
) -> tuple[list[Run], list[dict[str, Any]]]:
    """A search's runs (docs/tuning.md), each pipeline one group: round after round, trial n
    of every group (seed + n), then final repetition i of every group (seed + trials + i, the
    same in every group, no trial's): queued in this order, the groups interleave fairly."""
    settings = schema.search_settings(search_values)
    base = process.get("seed")
    base = base if isinstance(base, int) else secrets.randbelow(2**31)
    trials, size = settings["trials"], settings["round_size"]
    plan: list[tuple[int, dict[str, Any], int]] = []
    for trial in range(trials):
        for group in range(len(pipelines)):
            record = {"group": group, "stage": search.TRIAL, "trial": trial}
            plan.append((group, record, search.trial_seed(base, trial)))
    for repetition in range(settings["final_repetitions"]):
        for group in range(len(pipelines)):
            record = {"group": group, "stage": search.FINAL, "trial": None}
            plan.append((group, record, search.final_seed(base, trials, repetition)))
    runs: list[Run] = []
    records: list[dict[str, Any]] = []
    for group, record, seed in plan:
        modules = pipelines[group]
        trial = record["trial"]
        record["round"] = search.round_of(trial, size) if trial is not None else -1
        params = run_params(process, modules, seed, owner_uid, owner)
        params[search.STAGE_PARAM] = record["stage"]
        params[search.GROUP_PARAM] = group
        if trial is not None:
            params[search.TRIAL_PARAM] = trial
        runs.append((modules, seed, readable_pipeline(modules), params))
        records.append(search.record(record))
    return runs, records


def repetition(modules: list[dict[str, Any]], params: dict[str, Any], seed: int) -> Run:
    """One more repetition of a run (`mosaic repeat`): its modules and params with a new seed.

    The params are the existing run's own rather than run_params() of its submission again: a
    `mosaic rekey` may have changed its keys since, and the new run must join its group."""
    return (modules, seed, readable_pipeline(modules), {**params, "seed": seed})
