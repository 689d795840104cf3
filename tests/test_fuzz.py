"""Protocol fuzzing: thousands of malformed, oversized and hostile messages on the daemon's socket.

One daemon (module scope) serves a small study: two done runs and one run queued behind a
pause. Every test throws bytes at the raw ROUTER socket with a zmq DEALER, checks that each
message got one clean error reply (or, for read-only requests, a normal one), and then that
the daemon still answers `status` and that neither the study database nor the queue changed.
The number of messages sent is printed and written to fuzz_figures.json in the daemon's
directory (docs/reliability.md quotes it).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from conftest import Daemon, example_config, query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaic_client import protocol
from mosaic_client.protocol import PROTOCOL_VERSION, REQUESTS

ERRORS = {
    "bad_message",
    "bad_version",
    "unknown_request",
    "bad_arguments",
    "invalid",
    "not_found",
    "permission",
}
SENT: Counter[str] = Counter()  # messages sent, by category
FUZZ = settings(
    max_examples=int(os.environ.get("MOSAIC_FUZZ_EXAMPLES", "250")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# Any msgpack value, small: the material wrong-typed fields and unknown fields are made of.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


class Study:
    """The daemon, its study, and a raw DEALER that speaks bytes, not the protocol."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemon = Daemon(root, workers=1).start()
        self.db = str(root / "s.db")
        cfg = example_config(root, epochs=1, multiplicity=2)
        self.daemon.cli("run", str(cfg), self.db, "--follow", check=True)
        self.daemon.cli("pause", check=True)
        self.daemon.cli("run", str(example_config(root, epochs=1)), self.db, check=True)
        self.ctx = zmq.Context()
        self.sock = self._connect()
        self.before = self.snapshot()

    def _connect(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"ipc://{self.daemon.socket}")
        return sock

    def send(self, category: str, *frames: bytes, timeout: float = 15.0) -> dict[str, Any]:
        """Send one multipart message and return the decoded reply (one per message)."""
        self.sock.send_multipart(list(frames))
        SENT[category] += 1
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(
                f"no reply to a {category} message within {timeout} s; "
                f"daemon alive: {self.daemon.proc.poll() is None}"
            )  # type: ignore[union-attr]
        reply = self.sock.recv_multipart()
        assert len(reply) == 2 and reply[0] == b"", reply[:3]
        decoded = msgpack.unpackb(reply[1], raw=False)
        assert isinstance(decoded, dict) and decoded.get("v") == PROTOCOL_VERSION
        if not decoded["ok"]:
            error = decoded["error"]
            # "internal" would mean an unhandled exception in the daemon: a defect.
            assert error["code"] in ERRORS, error
            assert isinstance(error["message"], str) and error["message"]
        return decoded

    def request(self, category: str, obj: Any) -> dict[str, Any]:
        return self.send(category, b"", msgpack.packb(obj, use_bin_type=True))

    def snapshot(self) -> dict[str, Any]:
        """Everything a malformed message must not change: the study's tables and the queue."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            dump = sorted(conn.iterdump())
        finally:
            conn.close()
        status = self.daemon.request("status", db=self.db, limit=100)
        for worker in status["workers"]:
            for volatile in ("cpu_percent", "rss", "state", "pid", "id"):
                worker.pop(volatile, None)
        studies = self.daemon.request("studies")
        return {
            "dump": dump,
            "status": status,
            "pending": self.daemon.request("pending"),
            "studies": studies,
            "run_files": sorted(os.listdir(self.root / "runs")),
        }

    def check_unchanged(self) -> None:
        assert self.daemon.proc.poll() is None, "the daemon died"  # type: ignore[union-attr]
        status = self.daemon.request("status", db=self.db)
        assert status["paused"] is True
        assert status["studies"][0]["counts"]["done"] == 2
        assert status["studies"][0]["counts"]["queued"] == 1
        after = self.snapshot()
        for key in after:
            assert after[key] == self.before[key], key


@pytest.fixture(scope="module")
def study() -> Iterator[Study]:
    root = Path(tempfile.mkdtemp(prefix="mos-fz-"))
    s = Study(root)
    yield s
    s.sock.close()
    s.ctx.term()
    s.daemon.stop()
    total = sum(SENT.values())
    figures = {"messages": total, "by_category": dict(sorted(SENT.items()))}
    print(f"\nfuzz: {total} messages sent: {json.dumps(figures['by_category'])}")
    (root.parent / "mosaic-fuzz-figures.json").write_text(json.dumps(figures, indent=1))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def check(study: Study) -> Iterator[Study]:
    yield study
    study.check_unchanged()


def valid_args(study: Study, name: str) -> dict[str, Any]:
    """Well-formed arguments for each request; their wrong-typed variants are the fuzz."""
    selection = {"kind": "ids", "ids": [10**6]}  # matches nothing: never changes a run
    return {
        "submit": {
            "db": study.db,
            "config_path": "/x.ini",
            "process": {},
            "monitor": {},
            "pipelines": [],
        },
        "status": {"db": study.db, "limit": 3, "mine": False, "states": [], "submission": 1},
        "pause": {"now": False, "db": study.db, "all": False},
        "resume": {"db": study.db, "all": False},
        "pending": {"db": study.db},
        "cancel": {"db": study.db, "selection": selection, "reason": "fuzz"},
        "rerun": {"db": study.db, "selection": selection, "epochs": 1, "monitor": {}},
        "rekey": {"db": study.db, "keys": []},
        "repeat": {"db": study.db, "selection": selection, "add": 1},
        "show": {"db": study.db, "run_id": 1},
        # Submission 10**6 does not exist: nothing is changed.
        "priority": {"db": study.db, "priority": 0, "submission": 10**6},
        "record_plan": {"db": study.db, "plan": {}},
    }.get(name, {})


def wrong_for(kind: type | tuple[type, ...]) -> st.SearchStrategy[Any]:
    kinds = kind if isinstance(kind, tuple) else (kind,)

    def wrong(value: Any) -> bool:
        if value is None:
            return False  # None means "absent": an optional field would be valid
        if isinstance(value, bool):
            return bool not in kinds
        return not isinstance(value, kinds)

    return VALUES.filter(wrong)


FIELDS = [(name, field.name, field.kind) for name, fields in REQUESTS.items() for field in fields]


# -- bytes that are not a request ---------------------------------------------------------------


@FUZZ
@given(payload=st.binary(max_size=4096))
def test_random_bytes(check: Study, payload: bytes) -> None:
    reply = check.send("random bytes", b"", payload)
    assert reply["ok"] is False


@FUZZ
@given(
    name=st.sampled_from(sorted(REQUESTS)),
    cut=st.floats(0, 1, exclude_max=True),
    garbage=st.binary(min_size=1, max_size=8),
)
def test_truncated_and_trailing_msgpack(
    check: Study, name: str, cut: float, garbage: bytes
) -> None:
    whole = msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": name, "args": valid_args(check, name)}, use_bin_type=True
    )
    truncated = whole[: int(len(whole) * cut)]
    assert check.send("truncated msgpack", b"", truncated)["error"]["code"] == "bad_message"
    assert check.send("trailing bytes", b"", whole + garbage)["error"]["code"] == "bad_message"


# -- well-framed maps with wrong contents ---------------------------------------------------------


@FUZZ
@given(field=st.sampled_from(FIELDS), data=st.data())
def test_each_field_of_each_request_with_a_wrong_type(
    check: Study, field: tuple[str, str, Any], data: st.DataObject
) -> None:
    name, field_name, kind = field
    args = dict(valid_args(check, name))
    args[field_name] = data.draw(wrong_for(kind))
    reply = check.request("wrong field type", {"v": PROTOCOL_VERSION, "type": name, "args": args})
    assert reply["error"]["code"] == "bad_arguments", reply
    assert field_name in reply["error"]["message"]


@FUZZ
@given(
    name=st.sampled_from(sorted(REQUESTS)),
    args=VALUES.filter(lambda v: not isinstance(v, dict) and v is not None),
)
def test_arguments_that_are_not_a_map(check: Study, name: str, args: Any) -> None:
    reply = check.request("args not a map", {"v": PROTOCOL_VERSION, "type": name, "args": args})
    assert reply["error"]["code"] == "bad_arguments"


@FUZZ
@given(
    version=VALUES.filter(lambda v: v != PROTOCOL_VERSION), name=st.sampled_from(sorted(REQUESTS))
)
def test_wrong_protocol_version(check: Study, version: Any, name: str) -> None:
    reply = check.request(
        "wrong version", {"v": version, "type": name, "args": valid_args(check, name)}
    )
    assert reply["error"]["code"] == "bad_version"


@FUZZ
@given(
    message=st.dictionaries(st.text(max_size=8), VALUES, max_size=6)
    | VALUES.filter(lambda v: not isinstance(v, dict))
)
def test_random_maps_and_values(check: Study, message: Any) -> None:
    if (
        isinstance(message, dict)
        and message.get("v") == PROTOCOL_VERSION
        and message.get("type") in ("shutdown", "resume", "pause")
    ):
        message["v"] = "fuzz"  # the only random maps that could be valid state changes
    check.request("random map", message)


# Read-only requests take unknown fields without complaint; state-changing ones are sent with
# a required field missing, so they must be refused whatever else they carry.
READ_ONLY = ("ping", "status", "pending", "show", "studies")


@FUZZ
@given(
    name=st.sampled_from(sorted(REQUESTS)),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(
            lambda k: k not in {f.name for fs in REQUESTS.values() for f in fs}
        ),
        VALUES,
        min_size=1,
        max_size=5,
    ),
    envelope=st.dictionaries(st.text(min_size=2, max_size=8), VALUES, max_size=3),
)
def test_unknown_fields(
    check: Study, name: str, extra: dict[str, Any], envelope: dict[str, Any]
) -> None:
    args = {**valid_args(check, name), **extra}
    if name not in READ_ONLY:
        required = [f.name for f in REQUESTS[name] if f.required]
        if not required:
            return  # pause/resume/shutdown with any unknown field would be valid
        del args[required[0]]
    message = {**envelope, "v": PROTOCOL_VERSION, "type": name, "args": args}
    reply = check.request("unknown fields", message)
    if name in READ_ONLY:
        assert reply["ok"] or reply["error"]["code"] == "not_found", reply
    else:
        assert reply["error"]["code"] == "bad_arguments", reply


@FUZZ
@given(
    frames=st.lists(st.binary(max_size=64), min_size=1, max_size=300).filter(
        lambda f: not (len(f) == 2 and f[0] == b"")
    )
)
def test_wrong_frame_counts(check: Study, frames: list[bytes]) -> None:
    reply = check.send("frames", *frames)
    assert reply["error"]["code"] == "bad_message"


def test_empty_and_many_frames(check: Study) -> None:
    for frames in (
        [b""],
        [b"", b""],
        [b"", b"", b""],
        [b""] * 10_000,
        [b"", protocol.make_request("ping")] + [b"x"] * 5_000,
    ):
        reply = check.send("frames", *frames)
        assert reply["error"]["code"] == "bad_message", len(frames)


def _nested(depth: int, opener: bytes) -> bytes:
    # Built by hand: msgpack's packer refuses to nest this deep, a hostile client need not.
    inner = b"\xa1k" if opener == b"\x81" else b""
    return (opener + inner) * depth + b"\xc0"


@pytest.mark.parametrize("depth", [10, 500, 1000, 1100, 100_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81"], ids=["lists", "maps"])
def test_deep_nesting(check: Study, depth: int, opener: bytes) -> None:
    head = msgpack.packb({"v": PROTOCOL_VERSION, "type": "status"}, use_bin_type=True)
    # A map of three entries: the two above plus args={"states": <nested>}.
    payload = (
        b"\x83"
        + head[1:]
        + msgpack.packb("args")
        + b"\x81"
        + msgpack.packb("states")
        + _nested(depth, opener)
    )
    reply = check.send("deep nesting", b"", payload)
    if depth > 1000:
        assert reply["error"]["code"] == "bad_message"  # msgpack's C stack limit
    elif opener == b"\x81":
        assert reply["error"]["code"] == "bad_arguments"  # states must be a list
    for name in ("submit", "rekey", "cancel"):
        args = valid_args(check, name)
        key = {"submit": "process", "rekey": "keys", "cancel": "selection"}[name]
        body = msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "type": name,
                "args": {k: v for k, v in args.items() if k != key},
            },
            use_bin_type=True,
        )
        # Re-open the args map with one more entry whose value is the nested structure.
        at = body.index(msgpack.packb("args")) + len(msgpack.packb("args"))
        count = body[at] - 0x80 + 1
        payload = (
            body[:at]
            + bytes([0x80 + count])
            + body[at + 1 :]
            + msgpack.packb(key)
            + _nested(min(depth, 900), opener)
        )
        check.send("deep nesting", b"", payload)


def test_huge_strings_and_lists_below_the_limit(check: Study) -> None:
    big = "x" * (8 * 2**20)
    cases: list[tuple[str, dict[str, Any], str | None]] = [
        (big, {}, "unknown_request"),
        ("status", {"db": "/" + big}, None),
        ("status", {"states": list(range(2_000_000))}, None),
        ("show", {"db": "/" + big, "run_id": 1}, "not_found"),
        (
            "cancel",
            {"db": check.db, "selection": {"kind": "request", "sql": "SELECT " + big}},
            "invalid",
        ),
        (
            "cancel",
            {"db": check.db, "selection": {"kind": "ids", "ids": list(range(10**6, 3 * 10**6))}},
            None,
        ),
        (
            "repeat",
            {
                "db": check.db,
                "selection": {"kind": "ids", "ids": list(range(10**6, 3 * 10**6))},
                "add": 1,
            },
            None,
        ),
        (
            "rekey",
            {"db": check.db, "keys": [[10**6 + i, "mlp_key", "k"] for i in range(200_000)]},
            "not_found",
        ),
        (
            "submit",
            {
                "db": check.db,
                "config_path": big,
                "process": {},
                "monitor": {},
                "pipelines": [[1]] * 1_000_000,
            },
            "invalid",
        ),
        ("ping", {"pad": big}, None),
    ]
    for name, args, code in cases:
        started = time.monotonic()
        reply = check.request("huge", {"v": PROTOCOL_VERSION, "type": name, "args": args})
        assert time.monotonic() - started < 30
        if code is None:
            assert reply["ok"], reply
            if name == "cancel":
                assert reply["data"]["cancelled"] == []
            if name == "repeat":
                assert reply["data"]["run_ids"] == []
        else:
            assert reply["error"]["code"] == code, reply["error"]["message"][:300]


# -- well-formed, hostile ------------------------------------------------------------------------


def hostile_requests(study: Study) -> list[tuple[str, dict[str, Any], str]]:
    db = study.db
    daemon_dir = os.path.dirname(study.daemon.socket)
    empty = study.root / "empty.db"
    empty.touch()
    process = {
        "lr": 0.01,
        "epochs": 1,
        "data_scheme": ["dataset"],
        "pipeline_scheme": ["mlp"],
        "loss_function": "BCELoss",
        "run_files_path": str(study.root / "runs"),
    }
    module = {"type": "dataset", "class": "dataset_OR", "path_to_class": "/x.py", "key": "k"}
    ok_pipeline = [module, {**module, "type": "mlp"}]

    def submit(**changes: Any) -> dict[str, Any]:
        return {
            "db": db,
            "config_path": "/x.ini",
            "process": process,
            "monitor": {},
            "pipelines": [ok_pipeline],
            **changes,
        }

    def request_sql(sql: str) -> dict[str, Any]:
        return {"db": db, "selection": {"kind": "request", "sql": sql}}

    return [
        ("submit", submit(pipelines=[[1, 2]]), "invalid"),
        ("submit", submit(pipelines=[["a", "b"]]), "invalid"),
        ("submit", submit(pipelines=[]), "invalid"),
        ("submit", submit(pipelines=[[{}, {}]]), "invalid"),
        ("submit", submit(pipelines=[[module]]), "invalid"),
        ("submit", submit(pipelines=[[{**module, "x": {"nested": 1}}, module]]), "invalid"),
        ("submit", submit(process={**process, "epochs": "10"}), "invalid"),
        ("submit", submit(process={**process, "epochs": -3}), "invalid"),
        ("submit", submit(process={**process, "lr": float("nan")}), "invalid"),
        ("submit", submit(process={**process, "data_scheme": [1]}), "invalid"),
        ("submit", submit(process={**process, "run_files_path": "runs"}), "invalid"),
        ("submit", submit(process={**process, "optimizer": ["Adam"]}), "invalid"),
        ("submit", submit(monitor={"nb_processus": "x"}), "invalid"),
        ("submit", submit(monitor={"timeout": "soon"}), "invalid"),
        ("submit", submit(monitor={"multiplicity": -1}), "invalid"),
        ("submit", submit(monitor={"gpu_available": "0"}), "invalid"),
        ("submit", submit(db="relative.db"), "invalid"),
        ("submit", submit(db="/dev/null"), "invalid"),
        ("submit", submit(db=str(study.root)), "invalid"),
        ("submit", submit(db=os.path.join(daemon_dir, "state", "x.db")), "permission"),
        ("cancel", request_sql("DELETE FROM runs"), "invalid"),
        ("cancel", request_sql("UPDATE runs SET status='done'"), "invalid"),
        ("cancel", request_sql("SELECT run_id FROM runs; DELETE FROM runs"), "invalid"),
        ("cancel", request_sql("ATTACH DATABASE '/tmp/x.db' AS x"), "invalid"),
        ("cancel", request_sql("PRAGMA journal_mode=DELETE"), "invalid"),
        ("cancel", request_sql("INSERT INTO runs VALUES (99, 'done', 'x', NULL)"), "invalid"),
        (
            "cancel",
            request_sql(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
            ),
            "invalid",
        ),
        ("cancel", request_sql("SELECT 'a'"), "invalid"),
        ("cancel", {"db": db, "selection": {"kind": "request"}}, "invalid"),
        ("cancel", {"db": db, "selection": {"kind": "nope"}}, "invalid"),
        ("cancel", {"db": db, "selection": {"kind": "ids", "ids": ["1"]}}, "invalid"),
        (
            "cancel",
            {"db": db, "selection": {"kind": "param", "name": "lr", "value": {"a": 1}}},
            "invalid",
        ),
        (
            "cancel",
            {"db": db, "selection": {"kind": "low", "name": "lr", "value": 2**64 - 1}},
            "invalid",
        ),
        ("cancel", {"db": "relative.db", "selection": {"kind": "all"}}, "invalid"),
        # Paths the daemon does not serve (a device, a directory, an empty file): refused as
        # "not a study this daemon serves" before anything is opened (it adopts no study).
        ("cancel", {"db": "/dev/null", "selection": {"kind": "all"}}, "not_found"),
        ("cancel", {"db": str(study.root), "selection": {"kind": "all"}}, "not_found"),
        ("cancel", {"db": str(empty), "selection": {"kind": "all"}}, "not_found"),
        ("cancel", {"db": "/nonexistent/x.db", "selection": {"kind": "all"}}, "not_found"),
        ("rerun", {"db": db, "selection": {"kind": "all"}, "epochs": -1}, "invalid"),
        ("rerun", {"db": db, "selection": {"kind": "all"}, "epochs": 0}, "invalid"),
        ("repeat", {"db": db, "selection": {"kind": "all"}, "add": 0}, "invalid"),
        ("repeat", {"db": db, "selection": {"kind": "all"}, "add": -1}, "invalid"),
        ("repeat", {"db": db, "selection": {"kind": "all"}, "add": 10**6}, "invalid"),
        ("repeat", {"db": db, "selection": {"kind": "all"}, "add": 2**62}, "invalid"),
        ("repeat", {**request_sql("DELETE FROM runs"), "add": 1}, "invalid"),
        ("repeat", {"db": db, "selection": {"kind": "nope"}, "add": 1}, "invalid"),
        ("repeat", {"db": "relative.db", "selection": {"kind": "all"}, "add": 1}, "invalid"),
        ("repeat", {"db": "/dev/null", "selection": {"kind": "all"}, "add": 1}, "not_found"),
        ("repeat", {"db": str(empty), "selection": {"kind": "all"}, "add": 1}, "not_found"),
        (
            "repeat",
            {"db": os.path.join(daemon_dir, "state", "x.db"), "selection": {}, "add": 1},
            "permission",
        ),
        ("rekey", {"db": db, "keys": [1]}, "invalid"),
        ("rekey", {"db": db, "keys": [[1, "mlp_key"]]}, "invalid"),
        ("rekey", {"db": db, "keys": [[1, "status", "done"]]}, "invalid"),
        ("rekey", {"db": db, "keys": [[1, "mlp_key", {"a": 1}]]}, "invalid"),
        ("rekey", {"db": db, "keys": [["1", "mlp_key", "k"]]}, "invalid"),
        ("rekey", {"db": db, "keys": [[-7, "mlp_key", "k"]]}, "not_found"),
        ("show", {"db": db, "run_id": -1}, "not_found"),
        ("show", {"db": db, "run_id": 2**63}, "bad_arguments"),
        ("show", {"db": db, "run_id": -(2**63) - 1 + 1}, "not_found"),
        ("show", {"db": str(empty), "run_id": 1}, "not_found"),
        ("show", {"db": "/dev/null", "run_id": 1}, "not_found"),
        ("status", {"db": "relative.db", "submission": 1}, "not_found"),
        ("status", {"limit": 2**64 - 1}, "bad_arguments"),
    ]


def test_hostile_but_well_formed_requests(check: Study) -> None:
    for name, args, code in hostile_requests(check):
        reply = check.request("hostile", {"v": PROTOCOL_VERSION, "type": name, "args": args})
        assert not reply["ok"], (name, args, reply)
        assert reply["error"]["code"] == code, (name, str(args)[:200], reply)
    for limit in (-5, 0, 10**9):
        reply = check.request(
            "hostile",
            {"v": PROTOCOL_VERSION, "type": "status", "args": {"limit": limit, "db": check.db}},
        )
        assert reply["ok"] and len(reply["data"]["studies"][0]["done"]) <= 2
    assert not os.path.exists("/dev/null-wal") and not os.path.exists("/dev/null-journal")
    assert os.path.getsize(check.root / "empty.db") == 0
    assert query(check.db, "SELECT count(*) FROM params WHERE run_id < 1") == [(0,)]


# -- the transport's size limit --------------------------------------------------------------------


def test_oversized_message_is_refused_at_the_transport(check: Study) -> None:
    proc = psutil.Process(check.daemon.proc.pid)  # type: ignore[union-attr]
    before = proc.memory_info().rss
    sock = check._connect()
    try:
        for size in (protocol.MAX_MESSAGE_BYTES + 1, 2 * protocol.MAX_MESSAGE_BYTES):
            sock.send_multipart([b"", b"\x00" * size])
            SENT["oversized"] += 1
            # The daemon drops the connection instead of reading the message: no reply comes.
            assert not sock.poll(3000)
            assert check.daemon.request("ping")["pid"] == check.daemon.proc.pid  # type: ignore[union-attr]
    finally:
        sock.close()
    grown = proc.memory_info().rss - before
    assert grown < protocol.MAX_MESSAGE_BYTES // 4, f"daemon RSS grew by {grown} bytes"
    # A message just below the limit is still read and answered.
    body = msgpack.packb({"v": PROTOCOL_VERSION, "type": "ping", "args": {"pad": ""}})
    pad = protocol.MAX_MESSAGE_BYTES - len(body) - 16
    reply = check.request(
        "near the limit", {"v": PROTOCOL_VERSION, "type": "ping", "args": {"pad": b"\x00" * pad}}
    )
    assert reply["ok"]


def test_the_daemon_serves_others_during_a_flood(check: Study) -> None:
    """A client that floods garbage without reading replies does not starve a normal client."""
    flood = check._connect()
    flood.sndtimeo = 10_000
    try:
        for _ in range(2000):
            flood.send_multipart([b"", b"\xc1"])
            SENT["flood"] += 1
        started = time.monotonic()
        assert check.daemon.request("status", db=check.db)["paused"] is True
        assert time.monotonic() - started < 10
    finally:
        flood.close()


# -- a big request decoded in parts (issue 27) --------------------------------------------------


def _outcome(decode: Any) -> Any:
    try:
        return ("ok", msgpack.packb(decode()))  # packed: a NaN equals itself there
    except protocol.ProtocolError as exc:
        return ("refused", exc.code)


def _in_parts(payload: bytes) -> Any:
    steps = protocol.decode_in_parts(payload)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@FUZZ
@given(
    message=st.fixed_dictionaries(
        {},
        optional={
            "v": st.just(PROTOCOL_VERSION) | VALUES,
            "type": st.sampled_from(sorted(REQUESTS)) | VALUES,
            "args": st.dictionaries(
                st.text(max_size=10),
                VALUES | st.lists(st.lists(VALUES, max_size=3), max_size=3000),
                max_size=5,
            )
            | VALUES,
        },
    )
    | VALUES,
    cut=st.none() | st.floats(0, 1, exclude_max=True),
    garbage=st.binary(max_size=4),
)
def test_decoding_in_parts_agrees_with_decoding_at_once(
    message: Any, cut: float | None, garbage: bytes
) -> None:
    """What the daemon does with a big request (decode_in_parts, a part of its lists per step)
    is what it does with a small one: the same request, or a refusal with the same code, for
    well-formed, truncated and trailing bytes alike."""
    payload = msgpack.packb(message, use_bin_type=True)
    if cut is not None:
        payload = payload[: int(len(payload) * cut)]
    payload += garbage
    SENT["decoded in parts"] += 1
    assert _outcome(lambda: _in_parts(payload)) == _outcome(
        lambda: protocol.decode_request(payload)
    )
