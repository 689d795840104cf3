"""The worker channel of the wire contract (see mosaic_client.protocol): what a worker may send
the daemon, with each field's type and bounds, what the daemon sends a worker, and the run spec
a worker trains from. Must stay importable without torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NotRequired, TypedDict

from mosaic_client.contract import (
    MEASUREMENT_NUMBERS,
    MEASUREMENT_TEXT,
    RESOURCE_BOUNDS,
    RESULT_COLUMNS,
)
from mosaic_client.protocol.fields import Field, fields_problem
from mosaic_client.protocol.fields import spec_field as _f
from mosaic_client.provenance import CODE_FIELDS, ENVIRONMENT_FIELDS
from mosaic_client.schema import ProcessSettings

# -- the worker channel -----------------------------------------------------------------------
# Bounds of what a worker may send. Its process runs the user's code, which can write to the
# worker's socket: a message the daemon acts on must not make it store, hold or log arbitrary
# amounts, and a wrong one must fail its run rather than stop the daemon's loop.
MAX_WORKER_TEXT = 1024 * 1024  # an error, a traceback, a fallback reason
MAX_WORKER_NAME = 4096  # a slot, a path, a map key
MAX_WORKER_ITEMS = 10_000  # the files, code entries or run ids of one message
MAX_WORKER_MAP = 256  # the entries of a results or environment map
MAX_CODE_TEXT = 16 * 1024 * 1024  # one class file's text


def _at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        # `not >=` also refuses NaN.
        return None if value >= low else f"must be at least {low}, got {value!r:.40}"

    return check


def _text(limit: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if len(value) <= limit else f"is longer than {limit} characters"

    return check


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _items(limit: int, item: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A list of at most `limit` items, each passing `item`."""

    def check(values: Any) -> str | None:
        if len(values) > limit:
            return f"has more than {limit} items"
        for index, value in enumerate(values):
            problem = item(value)
            if problem:
                return f"item {index} {problem}"
        return None

    return check


def _small_map(value: Any) -> str | None:
    if len(value) > MAX_WORKER_MAP:
        return f"has more than {MAX_WORKER_MAP} entries"
    bad = [k for k in value if not isinstance(k, str) or len(k) > MAX_WORKER_NAME]
    return f"has a key that is not a short string: {bad[0]!r:.40}" if bad else None


def _results(value: Any) -> str | None:
    """A run's row of run_results: every column, a number or None (epochs: a count)."""
    problem = _small_map(value)
    if problem:
        return problem
    for column in RESULT_COLUMNS:
        if column not in value:
            return f"lacks {column!r}"
        got = value[column]
        if column == "epochs" and not (isinstance(got, int) and not isinstance(got, bool)):
            return f"'epochs' must be an integer, got {got!r:.40}"
        if got is not None and not _is_number(got):
            return f"{column!r} must be a number or None, got {got!r:.40}"
        if isinstance(got, int) and not -(2**63) <= got < 2**63:
            return f"{column!r} is out of range"
    problem = _at_least(0)(value["epochs"])
    if problem:
        return f"'epochs' {problem}"
    for column, bound in RESOURCE_BOUNDS.items():
        problem = _bounded_figure(value[column], bound)
        if problem:
            return f"{column!r} {problem}"
    return _measurement(value.get("measurement"))


def _bounded_figure(got: Any, bound: float) -> str | None:
    """A measured figure: None, or a finite number from 0 to under `bound`."""
    if got is None:
        return None
    if not (_is_number(got) and math.isfinite(got) and 0 <= got < bound):
        return f"must be None or a finite number from 0 to under {bound:g}, got {got!r:.40}"
    return None


# The most a measurement context's number may be (a load average, a CPU count, a spread).
MAX_MEASUREMENT = 1e9


def _measurement(value: Any) -> str | None:
    """The context of a run's resource figures (contract.MEASUREMENT_*), optional."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"'measurement' must be a map, got {type(value).__name__}"
    unknown = set(value) - {*MEASUREMENT_TEXT, *MEASUREMENT_NUMBERS}
    if unknown:
        return f"'measurement' has an unknown key {sorted(map(str, unknown))[0]!r:.40}"
    for name in MEASUREMENT_TEXT:
        got = value.get(name)
        if got is not None and not (isinstance(got, str) and len(got) <= MAX_WORKER_NAME):
            return f"'measurement' {name!r} must be a short string, got {got!r:.40}"
    for name in MEASUREMENT_NUMBERS:
        problem = _bounded_figure(value.get(name), MAX_MEASUREMENT)
        if problem:
            return f"'measurement' {name!r} {problem}"
    return None


def _environment(value: Any) -> str | None:
    problem = _small_map(value)
    if problem:
        return problem
    for name in ENVIRONMENT_FIELDS:
        got = value.get(name)
        if isinstance(got, str) and len(got) > MAX_WORKER_NAME:
            return f"{name!r} is longer than {MAX_WORKER_NAME} characters"
    return None


def _short_string(value: Any) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_WORKER_NAME:
        return f"must be a path of 1 to {MAX_WORKER_NAME} characters, got {value!r:.40}"
    return None


def _code_entry(value: Any) -> str | None:
    """One class file a run loaded (mosaic_client.provenance.CODE_FIELDS and its text)."""
    if not isinstance(value, dict):
        return f"must be a map, got {type(value).__name__}"
    for name in ("section", "path", "sha256", "text"):
        if not isinstance(value.get(name), str):
            return f"needs a {name!r} string"
    if len(value["text"]) > MAX_CODE_TEXT:
        return f"has a text longer than {MAX_CODE_TEXT} characters"
    for name in CODE_FIELDS:
        got = value.get(name)
        if got is not None and not isinstance(got, (str, bool)):
            return f"{name!r} must be a string, got {type(got).__name__}"
        if isinstance(got, str) and len(got) > MAX_WORKER_NAME:
            return f"{name!r} is longer than {MAX_WORKER_NAME} characters"
    return None


# A worker's data cache figures (mosaicd.training.data_cache.figures), sent with a run's
# provenance: how the run's data stages were had, and the worker's cache counts and memory.
DATA_CACHE_OUTCOMES = ("memory", "disk", "miss", "off")
DATA_CACHE_COUNTS = ("hits", "disk_hits", "misses", "entries", "bytes")


def _data_cache(value: Any) -> str | None:
    if set(value) != {"outcome", *DATA_CACHE_COUNTS}:
        return f"must have the keys outcome, {', '.join(DATA_CACHE_COUNTS)}"
    if value["outcome"] not in DATA_CACHE_OUTCOMES:
        return f"has an unknown outcome {value['outcome']!r:.40}"
    for name in DATA_CACHE_COUNTS:
        got = value[name]
        if not isinstance(got, int) or isinstance(got, bool) or not 0 <= got < 2**63:
            return f"{name!r} must be a count, got {got!r:.40}"
    return None


def _search_values(value: Any) -> str | None:
    problem = _small_map(value)
    if problem:
        return problem
    for name, got in value.items():
        finite = _is_number(got) and got == got and abs(got) != float("inf")
        if not (finite or (isinstance(got, str) and len(got) <= MAX_WORKER_NAME)):
            return f"{name!r} must be a finite number or a short string, got {got!r:.40}"
    return None


def _run_id(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**63:
        return f"must be a run id, got {value!r:.40}"
    return None


_RUN_ID = _f("run_id", int, check=_at_least(1))
_EPOCH = _f("epoch", int, check=_at_least(0))
_LOSS = float  # any float, NaN included: a non-finite loss is the run's to report

# Worker -> daemon messages: each one's fields, types and bounds. The daemon checks a message
# with worker_message_problem before it acts on it (mosaicd.scheduling.worker_events.EVENTS).
WORKER_MESSAGES: dict[str, tuple[Field, ...]] = {
    "hello": (_f("pid", int, check=_at_least(1)), _f("slot", str, check=_text(MAX_WORKER_NAME))),
    # One finished epoch; "checkpointed" tells the daemon the run can resume after this epoch.
    "epoch": (
        _RUN_ID,
        _f("epoch", int, check=_at_least(1)),
        _f("train_loss", _LOSS),
        _f("test_loss", _LOSS),
        _f("train_acc", _LOSS, False),
        _f("test_acc", _LOSS, False),
        _f("duration", float, check=_at_least(0)),
        _f("checkpointed", bool),
        # On the data stage's validation loader, when it gives one (docs/tuning.md).
        _f("val_loss", _LOSS, False),
        _f("val_acc", _LOSS, False),
    ),
    "done": (
        _RUN_ID,
        _f("results", dict, check=_results),
        _f("files", list, check=_items(MAX_WORKER_ITEMS, _short_string)),
    ),
    "failed": (
        _RUN_ID,
        _f("error", str, check=_text(MAX_WORKER_TEXT)),
        # Required, possibly empty ("" when there is no Python traceback: an OSError).
        _f("traceback", str, check=_text(MAX_WORKER_TEXT)),
    ),
    # Stopped at an epoch boundary on request, after writing its checkpoint.
    "parked": (_RUN_ID, _EPOCH),
    # What the run's start loaded and ran in (issue 16), sent once its pipeline is built (or
    # failed to build): "environment" holds provenance.ENVIRONMENT_FIELDS, "code" one map per
    # class file loaded (provenance.CODE_FIELDS and its "text").
    "provenance": (
        _RUN_ID,
        _f("environment", dict, check=_environment),
        _f("code", list, check=_items(MAX_WORKER_ITEMS, _code_entry)),
        # Optional: workers before the data cache did not send it.
        _f("data_cache", dict, False, check=_data_cache),
    ),
    # A search run's resolved values (docs/tuning.md), sent before it trains: {param name:
    # number or string}, recorded in its params; "pruned": the epoch its pruner stopped it at.
    "search": (
        _RUN_ID,
        _f("values", dict, check=_search_values),
        _f("pruned", int, False, check=_at_least(1)),
    ),
    # A member of a group stopped on a `cancel` message, after this epoch (no checkpoint).
    "cancelled": (_RUN_ID, _EPOCH),
    # A group could not train as an ensemble: its members train one by one, for this reason.
    "fallback": (
        _f("run_ids", list, check=_items(MAX_WORKER_ITEMS, _run_id)),
        _f("reason", str, check=_text(MAX_WORKER_TEXT)),
    ),
}


def worker_message_problem(message: Any) -> str | None:
    """What makes a decoded worker message unusable (a map, a known type, the declared fields
    with their types and bounds, no other field), or None. Never raises."""
    if not isinstance(message, dict):
        return f"a worker message must be a map, got {type(message).__name__}"
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in WORKER_MESSAGES:
        return f"unknown worker message type {kind!r:.80}"
    fields = WORKER_MESSAGES[kind]
    problem = fields_problem(fields, message, kind)
    if problem:
        return problem
    names = {f.name for f in fields} | {"type"}
    extra = [k for k in message if k not in names]
    if extra:
        return f"{kind}: unknown field {extra[0]!r:.80}"
    for field in fields:
        value = message.get(field.name)
        if value is not None and field.check is not None:
            problem = field.check(value)
            if problem:
                return f"{kind}: field {field.name!r} {problem}"
    return None


def message_run_ids(message: Any) -> list[int]:
    """The run ids a (possibly malformed) worker message names: its run_id, or the run ids of
    a fallback; only the values that are integers. Never raises."""
    if not isinstance(message, dict):
        return []
    named = message.get("run_ids") if message.get("type") == "fallback" else None
    values = named if isinstance(named, list) else [message.get("run_id")]
    return [v for v in values[:MAX_WORKER_ITEMS] if isinstance(v, int) and _run_id(v) is None]


class RunSpec(TypedDict):
    """What a worker needs to train one run: a "run" message's spec, or one of a "run_group"'s
    specs. Built in one place, the daemon's dispatch (mosaicd.scheduling.dispatch), from the
    submission's resolved settings; read by the worker (mosaicd.training)."""

    run_id: int
    process: ProcessSettings  # every key present: the worker looks no default up
    modules: list[dict[str, Any]]  # the pipeline's stages, in scheme order
    seed: int
    device: str  # "cpu", "cuda:0", ...
    run_files_path: str
    epochs_target: int
    start_epoch: int  # 0, or the checkpoint epoch it resumes from
    checkpoint_every: float  # seconds between checkpoints (0: every epoch)
    max_log_mb: float
    # The umask of a user's worker on a shared daemon (mosaicd.owners); None: unchanged.
    umask: int | None
    # [MONITOR] data_cache_mb, cache_dir and cache_size_mb (mosaicd.training.data_cache);
    # absent: the worker's defaults (memory only).
    data_cache: NotRequired[dict[str, Any]]
    # A search run's (docs/tuning.md): its [SEARCH] settings, group, stage, trial, the study
    # seed its sampler's seed derives from, and the finished trials of its group that it may
    # see (study_reading.search_history); the worker resolves its distributions from them.
    search: NotRequired[dict[str, Any]]


# Daemon -> worker messages.
DAEMON_TO_WORKER: dict[str, tuple[Field, ...]] = {
    "run": (_f("spec", dict),),
    # An ensemble: the specs of its members, each as a "run" would carry it.
    "run_group": (_f("specs", list),),
    "park": (_f("run_id", int),),
    # Stop one member of a group at its next epoch boundary (an individual run is killed).
    "cancel": (_f("run_id", int),),
    "exit": (),
}
