"""Faults from outside: killed and frozen workers, a study database held by other processes, and
the socket file deleted under a running daemon. (Daemon SIGKILLs at random moments are in
test_control.py; set MOSAIC_FAULT_REPEATS to repeat the seeded worker kills here more often.)

The longer tests are marked slow (.ci/run runs them); test_pool.py has the quick worker kill.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, example_config, query

from mosaic_client.connection import Client

REPEATS = int(os.environ.get("MOSAIC_FAULT_REPEATS", "3"))


def slow_config(root: Path, epochs: int, extra_monitor: str = "", **kw: Any) -> Path:
    """Runs whose epochs take ~0.1-0.3 s, so that they can be caught mid-way."""
    cfg = example_config(root, epochs=epochs, extra_monitor=extra_monitor, **kw)
    cfg.write_text(
        cfg.read_text()
        .replace("data_size = 200", "data_size = 3000")
        .replace("batch_size = 20", "batch_size = 10")
    )
    return cfg


def busy_workers(d: Daemon) -> list[dict[str, Any]]:
    return [w for w in d.request("status")["workers"] if w["run_id"] is not None]


def wait_busy(
    d: Daemon, db: str, min_epoch: int = 1, timeout: float = 60, exclude: tuple[int, ...] = ()
) -> dict[str, Any]:
    """A worker whose run has finished at least min_epoch epochs (not one of `exclude`: a
    killed worker stays listed until the daemon has reaped it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = d.request("status", db=db)
        epochs = {r["run_id"]: r["epoch"] for s in status["studies"] for r in s["running"]}
        for worker in status["workers"]:
            if (
                worker["run_id"] is not None
                and epochs.get(worker["run_id"], 0) >= min_epoch
                and worker["pid"] not in exclude
            ):
                return worker
        time.sleep(0.05)
    raise AssertionError("no run got going")


def epochs_of(db: str, run_id: int) -> list[int]:
    return [
        e
        for (e,) in query(db, "SELECT epoch FROM run_epochs WHERE run_id=? ORDER BY epoch", run_id)
    ]


@pytest.mark.slow
def test_seeded_worker_sigkills_retry_and_the_pool_refills(tmp: Path) -> None:
    rng = random.Random(8)
    d = Daemon(tmp, workers=2).start()
    db = str(tmp / "s.db")
    killed: list[int] = []
    try:
        d.cli(
            "run",
            str(
                slow_config(
                    tmp,
                    epochs=8,
                    multiplicity=2,
                    mlp_width="3, 4",
                    # One run per worker: each kill hits one run (an ensemble's worker
                    # carries several; tests/test_ensemble_daemon.py covers those kills).
                    extra_monitor=f"retries = {REPEATS}\n        ensemble = off",
                )
            ),
            db,
            check=True,
        )
        for _ in range(REPEATS):
            # Early enough in an 8-epoch run that the kill lands before the run ends.
            worker = wait_busy(d, db, min_epoch=rng.choice([0, 1, 2]), exclude=tuple(killed))
            time.sleep(rng.uniform(0, 0.2))
            os.kill(worker["pid"], signal.SIGKILL)
            killed.append(worker["pid"])
        counts = d.wait_for(db, total=4, timeout=240)
        workers = d.request("status")["workers"]
    finally:
        d.stop()
    assert counts == {**counts, "done": 4}, counts
    # The pool is back to two live workers, none of them a killed one.
    assert len(workers) == 2 and not {w["pid"] for w in workers} & set(killed)
    retried = query(db, "SELECT count(*) FROM run_events WHERE detail LIKE '%SIGKILL%retrying'")
    assert retried == [(REPEATS,)]
    for run_id in range(1, 5):
        assert epochs_of(db, run_id) == list(range(1, 9)), run_id
    assert query(db, "SELECT count(*), count(DISTINCT run_id) FROM run_results") == [(4, 4)]


@pytest.mark.slow
def test_a_stopped_worker_is_waited_for_and_finishes_after_sigcont(tmp: Path) -> None:
    d = Daemon(tmp, workers=1).start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(slow_config(tmp, epochs=6)), db, check=True)
        worker = wait_busy(d, db, min_epoch=1)
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            time.sleep(4)
            status = d.request("status", db=db)  # the daemon answers while its worker is frozen
            assert [w["pid"] for w in status["workers"]] == [worker["pid"]]
            assert status["studies"][0]["counts"]["running"] == 1
            assert status["studies"][0]["counts"]["failed"] == 0
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        d.wait_for(db, total=1, timeout=120)
    finally:
        d.stop()
    assert query(db, "SELECT status FROM runs") == [("done",)]
    assert epochs_of(db, 1) == [1, 2, 3, 4, 5, 6]


def test_a_stopped_worker_is_killed_by_the_monitor_timeout(tmp: Path) -> None:
    d = Daemon(tmp, workers=1).start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(slow_config(tmp, epochs=200, extra_monitor="timeout = 4")), db, check=True)
        worker = wait_busy(d, db, min_epoch=1)
        os.kill(worker["pid"], signal.SIGSTOP)
        stopped = time.monotonic()
        d.wait_for(db, total=1, timeout=60)
        waited = time.monotonic() - stopped
        deadline = time.monotonic() + 60
        while not [w for w in d.request("status")["workers"] if w["state"] == "idle"]:
            assert time.monotonic() < deadline, "the pool was not refilled"
            time.sleep(0.2)
    finally:
        d.stop()
    assert waited < 30
    status, text = query(db, "SELECT status, return_status FROM runs")[0]
    assert status == "failed" and "timed out after 4 s" in text, text


def test_a_long_outside_read_transaction_does_not_block_the_daemon(tmp: Path) -> None:
    d = Daemon(tmp, workers=2).start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(example_config(tmp, epochs=1)), db, "--follow", check=True)
        reader = sqlite3.connect(db, isolation_level=None)
        reader.execute("BEGIN")
        seen = reader.execute("SELECT count(*) FROM runs").fetchone()[0]
        started = time.monotonic()
        d.cli("run", str(example_config(tmp, epochs=3, multiplicity=2)), db, check=True)
        counts = d.wait_for(db, total=3, timeout=120)
        took = time.monotonic() - started
        # The reader still sees its snapshot; the daemon wrote past it.
        assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == seen == 1
        reader.execute("COMMIT")
        reader.close()
    finally:
        d.stop()
    assert counts == {**counts, "done": 3} and took < 100
    for run_id in (2, 3):
        assert epochs_of(db, run_id) == [1, 2, 3]
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


def busy_daemon(tmp: Path) -> tuple[Daemon, str]:
    """A daemon with 2 workers training 2 slow runs of 5 epochs, both past their first epoch."""
    d = Daemon(tmp, workers=2).start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(slow_config(tmp, epochs=5, multiplicity=2)), db, check=True)
        wait_busy(d, db, min_epoch=1)
    except BaseException:
        d.stop()
        raise
    return d, db


def test_an_outside_writer_lock_is_waited_out_and_nothing_is_lost(tmp: Path) -> None:
    d, db = busy_daemon(tmp)
    try:
        writer = sqlite3.connect(db, isolation_level=None)
        for hold in (2.0, 4.0):
            writer.execute("BEGIN IMMEDIATE")
            time.sleep(hold)  # epochs end meanwhile: the daemon must wait, not drop them
            writer.execute("COMMIT")
            with Client(d.socket, timeout=30) as client:
                assert client.request("ping")["pid"] == d.proc.pid  # type: ignore[union-attr]
        writer.close()
        d.wait_for(db, total=2, timeout=180)
    finally:
        d.stop()
    assert query(db, "SELECT status FROM runs") == [("done",), ("done",)]
    for run_id in (1, 2):
        assert epochs_of(db, run_id) == [1, 2, 3, 4, 5]
    assert "could not record" not in d.log_path.read_text()


def test_deleted_socket_file_is_recreated(tmp: Path) -> None:
    d = Daemon(tmp, workers=1).start()
    try:
        pid = d.request("ping")["pid"]
        os.unlink(d.socket)
        # The file is gone, and the kernel refuses a connection to the path now.
        assert not os.path.exists(d.socket)
        deadline = time.monotonic() + 15
        while not os.path.exists(d.socket):
            assert time.monotonic() < deadline, "the socket was not recreated"
            time.sleep(0.1)
        # (Not its inode number: the filesystem may give the new file the old one's number.)
        assert stat.S_ISSOCK(os.stat(d.socket).st_mode)
        assert oct(os.stat(d.socket).st_mode & 0o777) == "0o600"
        assert d.request("ping")["pid"] == pid  # a new client reaches the same daemon
        assert d.cli("status").returncode == 0
    finally:
        d.stop()
    assert "was removed or replaced; binding it again" in d.log_path.read_text()


@pytest.mark.slow
def test_an_outside_writer_holding_the_lock_past_the_busy_timeout(tmp: Path) -> None:
    """Longer than SQLite's 10 s busy timeout: the daemon may not record while it waits, but it
    must neither crash nor lose an epoch or a result once the lock is gone."""
    d, db = busy_daemon(tmp)
    try:
        writer = sqlite3.connect(db, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        time.sleep(15)
        writer.execute("COMMIT")
        writer.close()
        d.wait_for(db, total=2, timeout=180)
        assert d.proc.poll() is None  # type: ignore[union-attr]
    finally:
        d.stop()
    for run_id in (1, 2):
        assert epochs_of(db, run_id) == [1, 2, 3, 4, 5]
    assert query(db, "SELECT count(*) FROM run_results") == [(2,)]
    assert "is locked by another process" in d.log_path.read_text()
