"""The wire contract between `mosaic` (client), `mosaicd` (daemon) and the daemon's workers.

Every message type of both channels is declared here, so the contract is read in one place.

Client channel: ZeroMQ DEALER (client) -> ROUTER (daemon) over an ``ipc://`` socket. The client
sends two frames ``[b"", payload]``; the daemon answers ``[b"", payload]``. ``payload`` is a
msgpack map: a request ``{"v": PROTOCOL_VERSION, "type": NAME, "args": {...}}`` and a reply,
either ``{"v": .., "ok": True, "data": {...}}`` or
``{"v": .., "ok": False, "error": {"code", "message"}}``.

Worker channel: each worker is a DEALER whose identity is its worker id, connected to a private
ROUTER of the daemon; one frame of msgpack per message, ``{"type": NAME, ...fields}``.

This module must stay importable without torch: the CLI imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import msgpack

from mosaic_client.contract import (
    MEASUREMENT_NUMBERS,
    MEASUREMENT_TEXT,
    RESOURCE_BOUNDS,
    RESULT_COLUMNS,
)
from mosaic_client.provenance import CODE_FIELDS, ENVIRONMENT_FIELDS
from mosaic_client.schema import ProcessSettings

PROTOCOL_VERSION = 1

# The daemon refuses bigger client messages at the transport (ZMQ_MAXMSGSIZE), so a hostile or
# broken client cannot make it allocate arbitrary memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# And bigger worker messages (on the workers' socket, before a byte of the payload is held): the
# largest a worker sends is a "provenance" message with the text of each class file of the run
# (MAX_CODE_TEXT each; real ones are kilobytes): room for four at that bound.
MAX_WORKER_MESSAGE_BYTES = 64 * 1024 * 1024


class ErrorCode:
    """Codes of structured error replies; the client maps them to exit codes."""

    BAD_MESSAGE = "bad_message"  # undecodable bytes, wrong frames, not a map
    BAD_VERSION = "bad_version"
    UNKNOWN_REQUEST = "unknown_request"
    BAD_ARGUMENTS = "bad_arguments"  # known request, wrong or missing fields
    INVALID = "invalid"  # well-formed but refused: bad selection, SQL, path, config
    NOT_FOUND = "not_found"  # no such run / study
    PERMISSION = "permission"
    INTERNAL = "internal"


# How a `not_found` refusal begins when a request names a study the daemon does not serve: it
# never takes over ("adopts") a study that was not submitted to it, and the client reads such a
# study itself instead where it can (`mosaic show`, `mosaic logs`).
NOT_SERVED = "not a study this daemon serves"


@dataclass(frozen=True)
class Field:
    name: str
    kind: type | tuple[type, ...]
    required: bool = True
    # What a value of the right kind must be besides (worker messages: bounds, nested shapes):
    # a problem in words, or None when it is fine.
    check: Callable[[Any], str | None] | None = None


def _f(
    name: str,
    kind: type | tuple[type, ...],
    required: bool = True,
    check: Callable[[Any], str | None] | None = None,
) -> Field:
    return Field(name, kind, required, check)


_SELECTION = _f("selection", dict)

# Client -> daemon requests, by name: the fields of "args". Each name has a daemon handler of the
# same name in mosaicd/service/handlers.py. Commands and requests are not one to one: a command
# module of mosaic_client/commands/ names in its docstring the requests it sends (`run` sends `ping`
# and `submit`, `logs` sends `show`, `pause FILE` also `pending` and `cancel`, ...), and
# tests/test_units.py checks that every request here is sent by some command.
REQUESTS: dict[str, tuple[Field, ...]] = {
    "ping": (),
    "submit": (
        _f("db", str),
        _f("config_path", str),
        _f("process", dict),
        _f("monitor", dict),
        _f("pipelines", list),
        _f("priority", int, False),
        # [SEARCH] of a tuned comparison (docs/tuning.md): each pipeline is then one group.
        _f("search", dict, False),
    ),
    "status": (
        _f("db", str, False),
        _f("limit", int, False),
        _f("mine", bool, False),
        _f("states", list, False),
        _f("submission", int, False),
        _f("users", bool, False),
    ),
    "pause": (_f("now", bool, False), _f("db", str, False), _f("all", bool, False)),
    "resume": (_f("db", str, False), _f("all", bool, False)),
    "pending": (_f("db", str, False),),
    "cancel": (_f("db", str), _SELECTION, _f("reason", str, False)),
    "rerun": (_f("db", str), _SELECTION, _f("epochs", int), _f("monitor", dict, False)),
    "rekey": (_f("db", str), _f("keys", list)),
    # N more repetitions of the configuration groups of the selected runs (new seeds).
    "repeat": (_f("db", str), _SELECTION, _f("add", int)),
    "show": (_f("db", str), _f("run_id", int)),
    # A priority among the caller's own runs for one submission (or all theirs in the study).
    "priority": (_f("db", str), _f("priority", int), _f("submission", int, False)),
    "studies": (),
    "shutdown": (),
    # The plan of a `compare --until-decided` and the alpha it spent, kept in the study.
    "record_plan": (_f("db", str), _f("plan", dict)),
}


# -- replies ---------------------------------------------------------------------------------
# The "data" of each request's ok reply. The daemon builds them (one place per reply, in the
# scheduler's views) and the client, the web view and `status --json` scripts read them.
# `total=False` marks fields that are present only in some replies.


class PingReply(TypedDict):
    pid: int
    version: int
    socket: str
    caller: str
    uid: int | None


class SubmitReply(TypedDict):
    db: str
    submission_id: int
    run_ids: list[int]
    paused: bool  # a hold (daemon or owner) keeps these runs queued


class WorkerView(TypedDict, total=False):
    id: str
    slot: str
    state: str
    pid: int | None
    # The user it runs as on a shared daemon (None: the daemon's own user).
    owner: str | None
    run_id: int | None
    group: list[int] | None  # every run it trains as one ensemble (docs/ensembles.md)
    runs_done: int
    # Resource figures from the executor (None when it cannot measure them).
    cpu_percent: float | None
    rss: int | None  # bytes, the worker and the processes it started
    gpu_memory: int | None  # bytes on the worker's GPU, GPU slots only
    gpu_memory_device: int | None  # bytes used on that GPU by every process
    gpu_memory_total: int | None
    # The worker's data cache figures (mosaicd.training.data_cache.figures) as of its last
    # run's start; None before it reported any.
    data_cache: dict[str, Any] | None


class RunningRunView(TypedDict):
    run_id: int
    pipeline: str
    epoch: int
    epochs: int
    train_loss: float | None
    test_loss: float | None
    worker: str
    slot: str
    owner: str | None
    elapsed: float
    # The run ids training together with it in one ensemble (docs/ensembles.md), itself
    # included; None when it trains alone.
    group: list[int] | None


class FinishedRunView(TypedDict, total=False):
    run_id: int
    pipeline: str
    owner: str | None
    # done runs
    train_loss: float | None
    test_loss: float | None
    duration: float | None
    train_acc: float | None
    test_acc: float | None
    epochs: int | None
    # failed runs
    return_status: str | None


class StudyView(TypedDict):
    db: str
    counts: dict[str, int]  # run state -> number of runs
    running: list[RunningRunView]
    done: list[FinishedRunView]
    failed: list[FinishedRunView]
    # Why the daemon's writes to this study wait (locked by another process, disk full), and
    # what to do; absent when they go through.
    problem: NotRequired[str]
    # Why none of its runs starts: its rows disagree with the owners the daemon recorded
    # (docs/deployment.md, "Who a run's owner is"); absent when they agree.
    set_aside: NotRequired[str]


class StatusReply(TypedDict, total=False):
    paused: bool  # the daemon-wide hold
    workers: list[WorkerView]
    studies: list[StudyView]
    queued: int
    paused_owners: list[int]  # uids holding their own submissions
    submission_counts: dict[str, int]  # with db and submission: that submission's states
    hidden_studies: int  # studies served that the caller may not read: counted, not shown
    users: list[dict[str, Any]]  # "users": everyone's runs, usage, share (views.user_table)


class PauseReply(TypedDict):
    paused: bool
    parking: int  # runs asked to park at their next epoch boundary (pause --now)
    scope: str  # contract.HOLD_ALL or contract.HOLD_OWNER


class ResumeReply(TypedDict):
    paused: bool  # whether the daemon-wide hold is still on
    resumed: int  # parked runs queued again
    scope: str


class PendingItem(TypedDict):
    db: str
    process: dict[str, Any]
    monitor: dict[str, Any]
    run_ids: list[int]
    pipelines: list[list[dict[str, Any]]]


class CancelReply(TypedDict):
    selected: list[int]
    cancelled: list[int]
    skipped: list[int]


class RerunReply(TypedDict):
    selected: list[int]
    queued: list[int]
    skipped: list[int]


class RekeyReply(TypedDict):
    changed: int


class PriorityReply(TypedDict):
    submissions: list[int]  # the submissions whose priority is now `priority`
    priority: int


class RecordPlanReply(TypedDict):
    db: str
    plan_id: int  # its row in the study's sequential_plans table


class RepeatedGroup(TypedDict):
    first_run: int  # the group's first run: its id in the run_groups view's order
    runs: int  # the runs it had before
    seeds: list[int]  # the seeds of its new runs
    run_ids: list[int]  # its new runs


class RepeatReply(TypedDict):
    db: str
    selected: list[int]  # the runs the selection matched; their groups were repeated
    groups: list[RepeatedGroup]
    submission_ids: list[int]  # the new runs' submissions (one per submission repeated)
    run_ids: list[int]
    paused: bool  # a hold (daemon or owner) keeps these runs queued


class LiveView(TypedDict):
    epoch: int
    worker: str
    slot: str
    pid: int | None
    # Its worker's data cache figures, "outcome" saying how this run's data came (WorkerView).
    data_cache: NotRequired[dict[str, Any] | None]


class EnsembleView(TypedDict):
    members: list[int]  # the runs sent together (this one included), at its latest start
    fallback: str | None  # why they trained individually instead, when they did


class ShowReply(TypedDict, total=False):
    run_id: int
    status: str
    pipeline: str
    return_status: str | None
    params: dict[str, Any]
    results: dict[str, Any] | None
    events: list[dict[str, Any]]
    history: list[dict[str, Any]]
    seed: int | None
    epochs_target: int | None
    checkpoint_epoch: int | None
    live: LiveView  # while it trains
    queued_ahead: int | None  # while it is queued
    waiting_for: str  # while it is queued: why it has not started (a hold, a limit, a share)
    # What produced it (issue 16; study_reading.run_provenance): None before its first start.
    provenance: dict[str, Any] | None
    group: EnsembleView | None  # the ensemble it was last trained in, if any
    # Where its resource figures were measured (issue 26; study_reading.run_measurement).
    measurement: dict[str, Any] | None


class StudyItem(TypedDict):
    db: str
    counts: dict[str, int]


class ShutdownReply(TypedDict):
    stopping: bool


# The reply type of each request; a test checks it names every request.
REPLIES: dict[str, Any] = {
    "ping": PingReply,
    "submit": SubmitReply,
    "status": StatusReply,
    "pause": PauseReply,
    "resume": ResumeReply,
    "pending": list[PendingItem],
    "cancel": CancelReply,
    "rerun": RerunReply,
    "rekey": RekeyReply,
    "repeat": RepeatReply,
    "show": ShowReply,
    "priority": PriorityReply,
    "studies": list[StudyItem],
    "shutdown": ShutdownReply,
    "record_plan": RecordPlanReply,
}
assert set(REPLIES) == set(REQUESTS), "every request needs its reply type"

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


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    # The transport already bounds the size (MAX_MESSAGE_BYTES); msgpack's C unpacker bounds
    # nesting, and strict_map_key refuses unhashable or odd map keys.
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def fields_problem(spec: tuple[Field, ...], args: Any, what: str) -> str | None:
    """What is wrong with a message's fields against its declaration (types, required fields;
    not Field.check), or None."""
    if not isinstance(args, dict):
        return f"{what}: arguments must be a map"
    for field in spec:
        value = args.get(field.name)
        if value is None:
            if field.required:
                return f"{what}: missing field {field.name!r}"
            continue
        kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
        # msgpack has one integer type; a float field accepts an int, never a bool.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                return f"{what}: field {field.name!r} is out of range"
            continue
        if isinstance(value, bool) and bool not in kinds:
            return f"{what}: field {field.name!r} must not be a boolean"
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            # SQLite integers are 64-bit: a bigger run id or count can only be a mistake.
            return f"{what}: field {field.name!r} is out of range"
        if not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            return f"{what}: field {field.name!r} must be {names}, got {type(value).__name__}"
    return None


def check_fields(spec: tuple[Field, ...], args: Any, what: str) -> dict[str, Any]:
    """Validate a message's fields against its declaration; raise ProtocolError if wrong."""
    problem = fields_problem(spec, args, what)
    if problem:
        raise ProtocolError(ErrorCode.BAD_ARGUMENTS, problem)
    return args


def make_request(name: str, **args: Any) -> bytes:
    check_fields(REQUESTS[name], args, name)
    return pack({"v": PROTOCOL_VERSION, "type": name, "args": args})


def decode_request(payload: bytes) -> tuple[str, dict[str, Any]]:
    """Decode and validate a client request; any defect raises ProtocolError."""
    try:
        message = unpack(payload)
    except Exception as exc:  # msgpack raises many types for bad bytes
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"undecodable request: {exc}") from None
    return _checked_request(message)


# A request bigger than this is decoded in parts (decode_in_parts): a submission of 150,000
# pipelines takes about a second to unpack, which the daemon's loop must not spend at once.
BIG_REQUEST_BYTES = 1024 * 1024
ITEMS_PER_PART = 2000


def decode_in_parts(payload: bytes) -> Generator[None, None, tuple[str, dict[str, Any]]]:
    """decode_request's result (or its ProtocolError), yielding after every ITEMS_PER_PART
    items of a list argument, so that the daemon answers other requests in between. Only the
    request's own map, its `args` map and their list values are taken apart; the rest is
    unpacked whole, as decode_request does."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=max(len(payload), 1)
    )
    unpacker.feed(payload)
    message: dict[Any, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = _map_key(unpacker.unpack())
            if key != "args":
                message[key] = unpacker.unpack()
                continue
            try:
                count = unpacker.read_map_header()
            except ValueError:
                message[key] = unpacker.unpack()  # not a map: refused as decode_request does
                continue
            args: dict[Any, Any] = {}
            for _ in range(count):
                name = _map_key(unpacker.unpack())
                try:
                    length = unpacker.read_array_header()
                except ValueError:
                    args[name] = unpacker.unpack()
                    continue
                items = []
                seen: dict[bytes, Any] = {}
                for index in range(length):
                    items.append(_item(unpacker, payload, seen))
                    if index % ITEMS_PER_PART == ITEMS_PER_PART - 1:
                        yield
                args[name] = items
            message[key] = args
        if unpacker.tell() != len(payload):
            raise ValueError("extra data after the request")
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types for bad bytes
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"undecodable request: {exc}") from None
    return _checked_request(message)


def _item(unpacker: msgpack.Unpacker, payload: bytes, seen: dict[bytes, Any]) -> Any:
    """One item of a list argument. An item that is a list (a pipeline) is made of values
    decoded once per distinct encoding: a submission's 150,000 pipelines repeat a few modules,
    which are then a few objects, not 300,000 maps (read only, as every request's values)."""
    try:
        length = unpacker.read_array_header()
    except ValueError:
        return unpacker.unpack()
    values = []
    for _ in range(length):
        begin = unpacker.tell()
        value = unpacker.unpack()
        values.append(seen.setdefault(payload[begin : unpacker.tell()], value))
    return values


def _map_key(key: Any) -> Any:
    # unpackb's strict_map_key: only str and bytes keys.
    if not isinstance(key, (str, bytes)):
        raise ValueError(f"{type(key).__name__} is not allowed for map key")
    return key


def _checked_request(message: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a request must be a msgpack map")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {version!r} is not {PROTOCOL_VERSION}: "
            "upgrade the client and the daemon to the same Mosaic release",
        )
    name = message.get("type")
    if not isinstance(name, str) or name not in REQUESTS:
        raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"unknown request type {name!r}")
    args = message.get("args", {})
    return name, check_fields(REQUESTS[name], args, name)


def ok_reply(data: Any) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "ok": True, "data": data})


def error_reply(code: str, message: str) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}})


def decode_reply(payload: bytes) -> Any:
    """Return the reply's data, or raise ProtocolError carrying the daemon's error."""
    try:
        message = unpack(payload)
    except Exception as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"undecodable reply: {exc}") from None
    if not isinstance(message, dict) or "ok" not in message:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "malformed reply from the daemon")
    if message["ok"]:
        return message.get("data")
    error = message.get("error") or {}
    raise ProtocolError(str(error.get("code", "error")), str(error.get("message", "")))


def worker_message(name: str, **fields: Any) -> bytes:
    return pack({"type": name, **fields})


def decode_worker_message(payload: bytes, table: dict[str, tuple[Field, ...]]) -> dict[str, Any]:
    message = unpack(payload)
    if not isinstance(message, dict) or message.get("type") not in table:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown worker message {message!r:.200}")
    return check_fields(table[message["type"]], message, message["type"])


# The daemon's keepers' replies (mosaicd.keeper), declared beside the rest: see keeper.py.
from mosaic_client.protocol.keeper import (  # noqa: E402, F401
    KEEPER_RESULTS,
    MAX_KEEPER_MESSAGE_BYTES,
    keeper_reply_problem,
)
