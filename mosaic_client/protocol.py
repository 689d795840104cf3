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

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import msgpack

PROTOCOL_VERSION = 1

# The daemon refuses bigger client messages at the transport (ZMQ_MAXMSGSIZE), so a hostile or
# broken client cannot make it allocate arbitrary memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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


@dataclass(frozen=True)
class Field:
    name: str
    kind: type | tuple[type, ...]
    required: bool = True


def _f(name: str, kind: type | tuple[type, ...], required: bool = True) -> Field:
    return Field(name, kind, required)


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
    ),
    "status": (
        _f("db", str, False),
        _f("limit", int, False),
        _f("mine", bool, False),
        _f("states", list, False),
        _f("submission", int, False),
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
    "studies": (),
    "shutdown": (),
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
    runs_done: int
    # Resource figures from the executor (None when it cannot measure them).
    cpu_percent: float | None
    rss: int | None  # bytes, the worker and the processes it started
    gpu_memory: int | None  # bytes on the worker's GPU, GPU slots only
    gpu_memory_device: int | None  # bytes used on that GPU by every process
    gpu_memory_total: int | None


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


class StatusReply(TypedDict, total=False):
    paused: bool  # the daemon-wide hold
    workers: list[WorkerView]
    studies: list[StudyView]
    queued: int
    paused_owners: list[int]  # uids holding their own submissions
    submission_counts: dict[str, int]  # with db and submission: that submission's states
    hidden_studies: int  # studies served that the caller may not read: counted, not shown


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
    # What produced it (issue 16; study_reading.run_provenance): None before its first start.
    provenance: dict[str, Any] | None
    group: EnsembleView | None  # the ensemble it was last trained in, if any


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
    "studies": list[StudyItem],
    "shutdown": ShutdownReply,
}
assert set(REPLIES) == set(REQUESTS), "every request needs its reply type"

# Worker -> daemon messages.
WORKER_MESSAGES: dict[str, tuple[Field, ...]] = {
    "hello": (_f("pid", int), _f("slot", str)),
    # One finished epoch; "checkpointed" tells the daemon the run can resume after this epoch.
    "epoch": (
        _f("run_id", int),
        _f("epoch", int),
        _f("train_loss", float),
        _f("test_loss", float),
        _f("train_acc", float, False),
        _f("test_acc", float, False),
        _f("duration", float),
        _f("checkpointed", bool),
    ),
    "done": (_f("run_id", int), _f("results", dict), _f("files", list)),
    "failed": (_f("run_id", int), _f("error", str), _f("traceback", str)),
    # Stopped at an epoch boundary on request, after writing its checkpoint.
    "parked": (_f("run_id", int), _f("epoch", int)),
    # What the run's start loaded and ran in (issue 16), sent once its pipeline is built (or
    # failed to build): "environment" holds provenance.ENVIRONMENT_FIELDS, "code" one map per
    # class file loaded (provenance.CODE_FIELDS and its "text").
    "provenance": (_f("run_id", int), _f("environment", dict), _f("code", list)),
    # A member of a group stopped on a `cancel` message, after this epoch (no checkpoint).
    "cancelled": (_f("run_id", int), _f("epoch", int)),
    # A group could not train as an ensemble: its members train one by one, for this reason.
    "fallback": (_f("run_ids", list), _f("reason", str)),
}

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


def check_fields(spec: tuple[Field, ...], args: Any, what: str) -> dict[str, Any]:
    """Validate a message's fields against its declaration; raise ProtocolError if wrong."""
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.BAD_ARGUMENTS, f"{what}: arguments must be a map")
    for field in spec:
        value = args.get(field.name)
        if value is None:
            if field.required:
                raise ProtocolError(
                    ErrorCode.BAD_ARGUMENTS, f"{what}: missing field {field.name!r}"
                )
            continue
        kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
        # msgpack has one integer type; a float field accepts an int, never a bool.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            continue
        if isinstance(value, bool) and bool not in kinds:
            raise ProtocolError(
                ErrorCode.BAD_ARGUMENTS, f"{what}: field {field.name!r} must not be a boolean"
            )
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            # SQLite integers are 64-bit: a bigger run id or count can only be a mistake.
            raise ProtocolError(
                ErrorCode.BAD_ARGUMENTS, f"{what}: field {field.name!r} is out of range"
            )
        if not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise ProtocolError(
                ErrorCode.BAD_ARGUMENTS,
                f"{what}: field {field.name!r} must be {names}, got {type(value).__name__}",
            )
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
