"""The wire contract between `mosaic` (client), `mosaicd` (daemon) and the daemon's workers.

Every message type of both channels is declared in this package, so the contract is read in
one place: the client channel here, the worker channel in worker.py (re-exported here), the
keepers' replies in keeper.py, and how a message's fields are declared in fields.py.

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

from collections.abc import Generator
from typing import Any, NotRequired, TypedDict

import msgpack

from mosaic_client.protocol.fields import Field, fields_problem  # noqa: F401
from mosaic_client.protocol.fields import spec_field as _f

# The worker channel, declared in worker.py, read through this module as the rest of the contract.
from mosaic_client.protocol.worker import (  # noqa: F401
    DAEMON_TO_WORKER,
    DATA_CACHE_COUNTS,
    DATA_CACHE_OUTCOMES,
    MAX_CODE_TEXT,
    MAX_MEASUREMENT,
    MAX_WORKER_ITEMS,
    MAX_WORKER_MAP,
    MAX_WORKER_NAME,
    MAX_WORKER_TEXT,
    WORKER_MESSAGES,
    RunSpec,
    message_run_ids,
    worker_message_problem,
)

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
