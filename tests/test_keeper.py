"""The daemon's side of a keeper (mosaicd.keeper.link) against keepers that misbehave (issue 24,
item 3 and 4): a keeper runs as its user, who controls it, so every reply is checked before
the daemon uses it, every call has a deadline, and a keeper that stops answering is stopped
and replaced without anyone else waiting.

A fake keeper (a thread on the other end of the socket pair) answers with 10,000 malformed
frames: the link raises only StoreError (which the daemon's callers handle as a study that
cannot be used now), never anything else. A real keeper process, stopped with SIGSTOP by its
user, costs one deadline, then calls fail at once until a fresh keeper has reopened the study.
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mosaic_client import protocol
from mosaicd.keeper import wire
from mosaicd.keeper.link import CALL_TIMEOUT_S, KeeperDown, Keepers, ProcessLink
from mosaicd.keeper.operations import READS, WRITES
from mosaicd.owners import Owner
from mosaicd.storage.store import StoreError


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value: what a hostile keeper could put anywhere."""
    kinds = ["int", "big", "float", "str", "bytes", "none", "bool", "list", "map"]
    kind = rng.choice(kinds if depth < 3 else kinds[:7])
    if kind == "int":
        return rng.randint(-5, 5)
    if kind == "big":
        return rng.choice([2**63 - 1, -(2**63), 2**64 - 1, 10**18])
    if kind == "float":
        return rng.choice([math.nan, math.inf, -0.0, 1.5])
    if kind == "str":
        return rng.choice(["", "queued", "x" * 300, "running\0"])
    if kind == "bytes":
        return b"\xff\x00"
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(["run_id", "modules", "ok", "a", "queued", "process"]): _value(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


def _reply(rng: random.Random) -> Any:
    """A reply that is shaped almost right, or not at all."""
    shape = rng.randrange(5)
    if shape == 0:
        return _value(rng)
    if shape == 1:
        return {"ok": False, "kind": _value(rng), "message": _value(rng)}
    record = {
        "run_id": 1,
        "submission_id": 1,
        "modules": [],
        "seed": 0,
        "epochs_target": 1,
        "checkpoint_epoch": 0,
        "attempts": 0,
        "queue_seq": 1,
    }
    field = rng.choice([*record, "extra"])
    record[field] = _value(rng)
    result = rng.choice([record, [record], _value(rng)])
    counts = rng.choice([{"queued": 1}, {"queued": -1}, {"nope": 1}, _value(rng), None])
    return {"ok": rng.choice([True, True, "yes"]), "result": result, "counts": counts}


class _FakeProc:
    def __init__(self) -> None:
        self.pid = 2**22 + 17  # never signalled: _end is a no-op here

    def poll(self) -> None:
        return None


class FuzzLink(ProcessLink):
    """A link whose keeper is a thread answering every request with `answer(request)`."""

    def __init__(self, answer: Any) -> None:
        super().__init__(Owner(4242, 4242, (4242,), "mallory", "/"), "python", {})
        self.backoff_s = 0.0
        self._answer = answer

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        threading.Thread(target=self._serve, args=(theirs,), daemon=True).start()
        self._sock, self._proc = ours, _FakeProc()  # type: ignore[assignment]

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                request, _ = wire.receive(sock)
                raw = self._answer(request)
                if raw is None:
                    return  # hang up
                sock.sendall(raw)
        except (wire.WireError, OSError):
            pass
        finally:
            sock.close()

    def _end(self) -> None:
        pass


def _frame(message: Any) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def test_ten_thousand_malformed_keeper_replies_raise_only_store_errors() -> None:
    rng = random.Random(24)
    ops = sorted({*READS, *WRITES, "exists", "log_tail", "prove"})

    def answer(request: dict[str, Any]) -> bytes | None:
        roll = rng.random()
        if roll < 0.02:
            return None  # the keeper dies mid-call
        if roll < 0.04:
            return struct.pack(">I", wire.MAX_FRAME + 1)  # a frame too large: not read
        if roll < 0.06:
            return struct.pack(">I", 3) + b"\xc1\xc1\xc1"  # not msgpack
        return _frame(_reply(rng))

    link = FuzzLink(answer)
    outcomes = {"ok": 0, "refused": 0}
    for n in range(10_000):
        op = ops[n % len(ops)]
        try:
            if op == "prove":
                link.prove(["/nonexistent"], write=False)
            else:
                link.call(op, "/s.db", {"run_id": 1})
            outcomes["ok"] += 1
        except StoreError:
            outcomes["refused"] += 1
    # Almost all are refused; what passed had the declared shape of its operation's result.
    assert outcomes["refused"] > 9_000, outcomes
    assert outcomes["ok"] + outcomes["refused"] == 10_000


def test_every_result_check_never_raises_and_passes_the_keepers_own_results() -> None:
    rng = random.Random(7)
    for _ in range(5_000):
        op = rng.choice(sorted(protocol.KEEPER_RESULTS))
        problem = protocol.keeper_reply_problem(op, {"ok": True, "result": _value(rng)})
        assert problem is None or isinstance(problem, str)
    good = {
        "run_id": 3,
        "submission_id": 1,
        "modules": [{"type": "mlp"}],
        "seed": 0,
        "epochs_target": 5,
        "checkpoint_epoch": 2,
        "attempts": 1,
        "queue_seq": 9,
    }
    assert protocol.keeper_reply_problem("run_record", {"ok": True, "result": good}) is None
    assert protocol.keeper_reply_problem("runs_in_state", {"ok": True, "result": [good]}) is None
    # A search run's record (docs/tuning.md): its group, stage, trial and round.
    trial = dict(good, search={"group": 0, "stage": "trial", "trial": 3, "round": 1})
    assert protocol.keeper_reply_problem("run_record", {"ok": True, "result": trial}) is None
    odd = dict(good, search={"group": 0, "stage": "best", "trial": 3, "round": 1})
    assert protocol.keeper_reply_problem("run_record", {"ok": True, "result": odd})
    bad = dict(good, run_id=True)
    assert protocol.keeper_reply_problem("run_record", {"ok": True, "result": bad})
    assert protocol.keeper_reply_problem(
        "status_of", {"ok": True, "result": "queued", "counts": {"queued": -2}}
    )


def test_a_keeper_that_sends_an_oversized_frame_is_not_read(tmp_path: Path) -> None:
    sent: list[int] = []

    def answer(request: dict[str, Any]) -> bytes:
        sent.append(1)
        return struct.pack(">I", 2**31)  # says 2 GiB follow: nothing more is read

    link = FuzzLink(answer)
    started = time.monotonic()
    with pytest.raises(KeeperDown, match="over"):
        link.call("status_of", "/s.db", {"run_id": 1})
    assert time.monotonic() - started < CALL_TIMEOUT_S
    assert sent == [1]


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/test_keeper.py starts keepers as other users: run it as root")


def test_a_stopped_keeper_costs_one_deadline_then_is_replaced(tmp_path: Path) -> None:
    _require_root()
    import pwd

    from test_shared_box import user_python

    nobody = pwd.getpwnam("nobody")
    home = _reachable(tmp_path) / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    owner = Owner(nobody.pw_uid, nobody.pw_gid, (nobody.pw_gid,), "nobody", str(home))
    keepers = Keepers(user_python()[0])
    try:
        link = keepers.of(owner)
        assert isinstance(link, ProcessLink)
        study = str(home / "s.db")
        link.open(study, create=True, umask=0o077)
        first = link.pid
        assert first is not None
        # Its user stops it (they may signal their own process).
        os.kill(first, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(KeeperDown):
            link.call("runs_in_state", study, {"status": "queued"})
        waited = time.monotonic() - started
        assert CALL_TIMEOUT_S * 0.9 <= waited < CALL_TIMEOUT_S + 0.5
        assert keepers.problems() and "nobody" in keepers.problems()
        # During the backoff, calls fail at once: no one waits on it again.
        started = time.monotonic()
        with pytest.raises(KeeperDown, match="not answering"):
            link.call("runs_in_state", study, {"status": "queued"})
        assert time.monotonic() - started < 0.05
        assert not os.path.exists(f"/proc/{first}") or _state(first) in ("Z", "X")
        # After the backoff a fresh keeper starts and has the study open again.
        link.backoff_s = 0.0
        link._down_until = 0.0
        assert link.call("runs_in_state", study, {"status": "queued"})[0] == []
        assert link.pid not in (None, first)
    finally:
        keepers.stop_all()


def test_a_fifo_is_proved_as_nothing_without_waiting(tmp_path: Path) -> None:
    _require_root()
    import pwd

    from test_shared_box import user_python

    nobody = pwd.getpwnam("nobody")
    fifo = _reachable(tmp_path) / "s.db"
    os.mkfifo(fifo, 0o666)
    owner = Owner(nobody.pw_uid, nobody.pw_gid, (nobody.pw_gid,), "nobody", "/")
    keepers = Keepers(user_python()[0])
    try:
        link = keepers.of(owner)
        started = time.monotonic()
        assert link.prove([str(fifo)], write=False) == [None]
        with pytest.raises(StoreError, match="not a regular file|FIFO"):
            link.open(str(fifo), create=False, umask=0o077)
        assert time.monotonic() - started < 5.0
    finally:
        keepers.stop_all()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except OSError:
        return "X"


def _reachable(tmp_path: Path) -> Path:
    """tmp_path, made reachable by every user (pytest's directories are 0700)."""
    for path in [tmp_path, *tmp_path.parents]:
        if str(path) in ("/", "/tmp"):
            break
        path.chmod(path.stat().st_mode | 0o755)
    return tmp_path
