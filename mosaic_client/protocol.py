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
from typing import Any

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
# same name in mosaicd/handlers.py and a client command in mosaic_client/cli.py.
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
    "show": (_f("db", str), _f("run_id", int)),
    "studies": (),
    "shutdown": (),
}

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
}

# Daemon -> worker messages.
DAEMON_TO_WORKER: dict[str, tuple[Field, ...]] = {
    "run": (_f("spec", dict),),
    "park": (_f("run_id", int),),
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
