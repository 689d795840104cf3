"""No user can stall the daemon's single loop (issue 24, item 4): a FIFO where the daemon opens a
study or reads a run log, a trigger that never ends in one's own study, and an oversized
message on the workers' socket. Each attack runs against a real daemon while the test keeps
asking it `ping`: every answer must come in under PING_S."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ini
import psutil
import pytest
import zmq
from conftest import Daemon, example_config, query
from ini import EXAMPLE

from mosaic_client import protocol
from mosaic_client.connection import DaemonUnavailable
from mosaicd.storage import user_files
from mosaicd.storage.store import Store

PING_S = 1.0  # the bound on how long any client waits while another user attacks


@contextmanager
def pinging(daemon: Daemon) -> Iterator[list[float]]:
    """Ping the daemon every 50 ms while the block runs; yields the latencies (a ping that got
    no answer in 5 s counts as 5 s). Fails if any took PING_S or longer."""
    latencies: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                daemon.request("ping", timeout=5.0)
            except DaemonUnavailable:
                pass
            latencies.append(time.monotonic() - started)
            stop.wait(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(10)
    assert latencies, "no ping was answered"
    assert max(latencies) < PING_S, f"the daemon stalled: pings took up to {max(latencies):.2f} s"


def request_in_thread(daemon: Daemon, name: str, **args: Any) -> dict[str, Any]:
    """Send a request on its own connection; its reply or error lands in the returned dict."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["reply"] = daemon.request(name, timeout=10.0, **args)
        except Exception as exc:  # the daemon's refusal (an error reply) or a timeout
            box["error"] = str(exc)

    box["thread"] = threading.Thread(target=go, daemon=True)
    box["thread"].start()
    return box


def settled(box: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    box["thread"].join(timeout)
    assert not box["thread"].is_alive(), "the request never got an answer"
    return box


def test_a_fifo_in_place_of_a_study_is_refused(tmp: Path) -> None:
    daemon = Daemon(tmp).start()
    try:
        db = tmp / "s.db"
        daemon.cli("run", str(example_config(tmp, epochs=1, nb_processus=1)), str(db), check=True)
        daemon.wait_for(str(db))
        # The study the daemon knows becomes a FIFO (the daemon holds the old file open).
        os.rename(db, tmp / "old.db")
        os.mkfifo(db)
        fresh = tmp / "new.db"
        os.mkfifo(fresh)
        with pinging(daemon):
            cancel = request_in_thread(
                daemon, "cancel", db=str(db), selection={"kind": "ids", "ids": [1]}
            )
            submit = daemon.cli("run", str(example_config(tmp, epochs=1)), str(fresh), timeout=20)
            assert submit.returncode != 0 and "not a regular file" in submit.stderr
            daemon.cli("status", str(fresh), timeout=20)  # answers (a hang raises)
            assert "not a regular file" in settled(cancel).get("error", "")
        # Restart recovery: the daemon reopens the studies it knew; the FIFO is refused.
        daemon.stop()
        daemon.start(wait=15)
        with pinging(daemon):
            assert daemon.request("ping")["pid"] == daemon.proc.pid  # type: ignore[union-attr]
        assert "not a regular file" in daemon.log_path.read_text()
    finally:
        daemon.stop(timeout=10)


def _classes_with(tmp: Path, attack: str) -> Path:
    """A copy of the example classes whose mlp.py runs `attack` when a run imports it."""
    classes = tmp / "classes"
    shutil.copytree(EXAMPLE, classes)
    mlp = classes / "mlp.py"
    mlp.write_text(mlp.read_text() + "\n" + attack)
    return classes


def test_a_fifo_in_place_of_a_failed_runs_log(tmp: Path) -> None:
    runs = tmp / "runs"
    classes = _classes_with(
        tmp,
        "import os, signal\n"
        f"_log = {str(runs / 'output_1.log')!r}\n"
        "os.unlink(_log)\n"
        "os.mkfifo(_log)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    daemon = Daemon(tmp).start()
    try:
        db = str(tmp / "s.db")
        cfg = ini.write(
            tmp,
            ini.process(tmp, 1),
            ini.monitor(1, 1),
            ini.dataset(40),
            ini.mlp("2", "3", classes=classes),
        )
        with pinging(daemon):
            daemon.cli("run", str(cfg), db, check=True, timeout=20)
            daemon.wait_for(db, timeout=30)
        assert query(db, "SELECT status FROM runs") == [("failed",)]
        assert os.path.exists(runs / "output_1.log")  # the FIFO, never opened for reading
    finally:
        daemon.stop(timeout=10)


ENDLESS_TRIGGER = """
CREATE TRIGGER endless AFTER UPDATE ON runs BEGIN
  SELECT count(*) FROM (
    WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c
  );
END;
"""


def test_an_endless_trigger_sets_its_study_aside(tmp: Path) -> None:
    daemon = Daemon(tmp, workers=2).start()
    try:
        bad, good = tmp / "bad", tmp / "good"
        bad.mkdir()
        good.mkdir()
        bad_db, good_db = str(bad / "s.db"), str(good / "s.db")
        # A study held before it runs, so that the trigger is in place before any state change.
        daemon.request("pause")
        daemon.cli("run", str(example_config(bad, epochs=2, nb_processus=1)), bad_db, check=True)
        conn = sqlite3.connect(bad_db)
        conn.executescript(ENDLESS_TRIGGER)
        conn.close()
        with pinging(daemon):
            daemon.request("resume")
            daemon.cli("run", str(example_config(good, epochs=1)), good_db, check=True)
            daemon.wait_for(good_db, timeout=60)  # the other study is not held up
            deadline = time.monotonic() + 20
            problem = ""
            while time.monotonic() < deadline and not problem:
                studies = daemon.request("status", db=bad_db)["studies"]
                problem = studies[0].get("problem", "") if studies else ""
                time.sleep(0.1)
        assert "ran longer than" in problem and "mosaic resume" in problem
    finally:
        daemon.stop(timeout=10)


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory, in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_an_oversized_worker_message_is_refused_unread(tmp: Path) -> None:
    """What a run's model code could do: connect to the workers' socket (its worker's
    --connect address, with its worker's routing id from the environment) and send a message
    far over the bound."""
    daemon = Daemon(tmp, workers=1).start()
    try:
        assert daemon.proc is not None
        worker = psutil.Process(daemon.request("status")["workers"][0]["pid"])
        cmdline = worker.cmdline()
        address = cmdline[cmdline.index("--connect") + 1]
        route = worker.environ()["MOSAIC_WORKER_ID"]
        before = _peak_rss(daemon.proc.pid)
        size = 4 * protocol.MAX_WORKER_MESSAGE_BYTES
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, route.encode())
        sock.linger = 0
        sock.connect(address)
        try:
            with pinging(daemon):
                sock.send(b"\x80" * size)
                time.sleep(2.0)
        finally:
            sock.close()
            ctx.term()
        grown = _peak_rss(daemon.proc.pid) - before
        assert grown < protocol.MAX_WORKER_MESSAGE_BYTES, f"the daemon grew by {grown >> 20} MiB"
        # The daemon still runs studies.
        db = str(tmp / "s.db")
        daemon.cli("run", str(example_config(tmp, epochs=1, nb_processus=1)), db, check=True)
        assert daemon.wait_for(db, timeout=60)["done"] == 1
    finally:
        daemon.stop(timeout=10)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_only_regular_files_are_opened(tmp: Path, kind: str) -> None:
    from mosaicd.storage import user_files

    path = tmp / "s.db"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp / "real.db").write_bytes(b"")
        os.symlink(tmp / "real.db", path)
    else:
        path.mkdir()
    started = time.monotonic()
    with pytest.raises(user_files.NotRegularFile, match="not a regular file"):
        user_files.check_study_files(str(path))
    assert time.monotonic() - started < PING_S


def test_checking_a_study_beside_the_daemons_connection_keeps_its_locks(tmp: Path) -> None:
    # The kernel drops every POSIX lock a process holds on a file when it closes any descriptor
    # of that file: a check that opened and closed the study beside the daemon's connection
    # would release that connection's locks, and a user's reader closing next would take itself
    # for the last connection, checkpoint and reset the WAL under the daemon, whose next commits
    # would then be lost to every other reader (seen as runs missing from the study).
    db = str(tmp / "s.db")
    store = Store(db)
    probe = "INSERT OR REPLACE INTO system (param_name, param_value) VALUES ('probe', ?)"
    with store.transaction() as conn:
        conn.execute(probe, ("first",))
    # What the daemon does before it opens a study beside this connection (a -request
    # selection's read-only connection, a rights check): look at the file.
    user_files.check_study_files(db)
    # A user's reader in another process (the kernel's locks are per process) opens and closes.
    reader = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('SELECT count(*) FROM runs').fetchall(); c.close()"
    )
    subprocess.run([sys.executable, "-c", reader, db], check=True, timeout=60)
    with store.transaction() as conn:
        conn.execute(probe, ("second",))
    assert os.path.exists(db + "-wal"), "the reader took itself for the last connection"
    assert query(db, "SELECT param_value FROM system WHERE param_name='probe'") == [("second",)]
