"""Durable control: pause, resume, cancel, rerun, savedb, and restarts that lose nothing."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import Daemon, example_config, query

METRICS = (
    "train_loss, test_loss, train_acc, test_acc, nb_params, epochs, overfit, trainability, slope"
)


def slow_config(root: Path, epochs: int = 12, seed: int = 5, **kw: object) -> Path:
    """One run whose epochs take long enough (~0.1 s) to be caught mid-way."""
    cfg = example_config(root, epochs=epochs, seed=seed, **kw)  # type: ignore[arg-type]
    text = (
        cfg.read_text()
        .replace("data_size = 200", "data_size = 3000")
        .replace("batch_size = 20", "batch_size = 10")
    )
    cfg.write_text(text)
    return cfg


def wait_epoch(daemon: Daemon, db: str, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = daemon.request("status", db=db)
        if status["studies"] and any(
            r["epoch"] >= at_least for r in status["studies"][0]["running"]
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"no run reached epoch {at_least}")


def epochs_of(db: str, run_id: int) -> list[int]:
    return [
        e
        for (e,) in query(db, "SELECT epoch FROM run_epochs WHERE run_id=? ORDER BY epoch", run_id)
    ]


def test_pause_is_seen_from_another_client_and_resume_restarts(daemon: Daemon, tmp: Path) -> None:
    assert daemon.cli("pause", check=True).returncode == 0
    status = json.loads(daemon.cli("status", "--json", check=True).stdout)
    assert status["paused"] is True
    cfg = example_config(tmp, epochs=1)
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, check=True)
    time.sleep(1.5)
    assert query(db, "SELECT status FROM runs") == [("queued",)]
    assert "PAUSED" in daemon.cli("status", check=True).stdout
    daemon.cli("resume", check=True)
    daemon.wait_for(db)
    assert query(db, "SELECT status FROM runs") == [("done",)]


def test_pause_survives_a_daemon_restart(tmp: Path) -> None:
    d = Daemon(tmp).start()
    try:
        d.cli("pause", check=True)
        d.stop()
        d.start()
        assert d.request("status")["paused"] is True
        d.cli("resume", check=True)
        assert d.request("status")["paused"] is False
    finally:
        d.stop()


def test_pause_now_and_resume_give_the_uninterrupted_results(daemon: Daemon, tmp: Path) -> None:
    a, b = tmp / "a", tmp / "b"
    a.mkdir()
    b.mkdir()
    db_a, db_b = str(a / "s.db"), str(b / "s.db")
    daemon.cli("run", str(slow_config(a)), db_a, "--follow", check=True)

    daemon.cli("run", str(slow_config(b)), db_b, check=True)
    wait_epoch(daemon, db_b, 2)
    out = daemon.cli("pause", "--now", check=True).stdout
    assert "parking 1 running run" in out
    daemon.wait_for(db_b, states=("paused",))
    parked_at = len(epochs_of(db_b, 1))
    assert 2 <= parked_at < 12
    assert (b / "runs" / "checkpoint_1.pt").exists()
    daemon.cli("resume", check=True)
    daemon.wait_for(db_b)
    assert epochs_of(db_b, 1) == list(range(1, 13))
    assert query(db_a, f"SELECT {METRICS} FROM run_results") == query(
        db_b, f"SELECT {METRICS} FROM run_results"
    )
    assert query(db_a, "SELECT train_loss, test_loss FROM run_epochs ORDER BY epoch") == query(
        db_b, "SELECT train_loss, test_loss FROM run_epochs ORDER BY epoch"
    )
    events = [t for (t,) in query(db_b, "SELECT to_status FROM run_events ORDER BY event_id")]
    assert events == ["queued", "running", "paused", "queued", "running", "done"]


def test_cancel_queued_and_running(daemon: Daemon, tmp: Path) -> None:
    cfg = slow_config(tmp, epochs=50, nb_processus=1, mlp_width="3, 4, 5")
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, check=True)
    wait_epoch(daemon, db, 1)
    result = daemon.cli("cancel", db, "-id", "1,3", check=True)
    assert "cancelled 2 run(s): 1,3" in result.stdout
    daemon.wait_for(db, states=("done", "cancelled"), timeout=120)
    assert dict(query(db, "SELECT run_id, status FROM runs")) == {
        1: "cancelled",
        2: "done",
        3: "cancelled",
    }
    empty = daemon.cli("cancel", db, "-id", "99")
    assert empty.returncode == 2 and "matches no run" in empty.stderr


def test_rerun_accumulates_epochs_like_one_long_run(daemon: Daemon, tmp: Path) -> None:
    short, long = tmp / "short", tmp / "long"
    short.mkdir()
    long.mkdir()
    db_s, db_l = str(short / "s.db"), str(long / "s.db")
    cfg = example_config(short, epochs=2, seed=3)
    daemon.cli("run", str(cfg), db_s, "--follow", check=True)
    daemon.cli("run", str(example_config(long, epochs=5, seed=3)), db_l, "--follow", check=True)
    out = daemon.cli("rerun", str(cfg), db_s, "-id", "1", "-epochs", "3", check=True).stdout
    assert "queued for 3 more epoch(s): 1 run(s): 1" in out
    daemon.wait_for(db_s)
    assert epochs_of(db_s, 1) == [1, 2, 3, 4, 5]
    assert query(db_s, "SELECT epochs FROM run_results") == [(5,)]
    # Same seed, same total: the continued run equals one uninterrupted 5-epoch run.
    assert query(db_s, f"SELECT {METRICS} FROM run_results") == query(
        db_l, f"SELECT {METRICS} FROM run_results"
    )


def test_selections_for_rerun(daemon: Daemon, tmp: Path) -> None:
    cfg = example_config(tmp, epochs=1, mlp_width="3, 10")
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    before = query(db, "SELECT * FROM runs")
    for sql in (
        "DROP TABLE runs",
        "UPDATE runs SET status='x'",
        "SELECT 1; DROP TABLE runs",
        "ATTACH DATABASE '/tmp/x.db' AS x",
    ):
        refused = daemon.cli("rerun", str(cfg), db, "-request", sql, "-epochs", "1")
        assert refused.returncode == 2, sql
        assert "refused" in refused.stderr or "read-only" in refused.stderr, refused.stderr
    assert query(db, "SELECT * FROM runs") == before

    def rerun_one_epoch(*selection: str) -> str:
        """Rerun the runs `selection` picks for 1 epoch; wait for them; return what rerun said."""
        result = daemon.cli("rerun", str(cfg), db, *selection, "-epochs", "1", check=True)
        daemon.wait_for(db)
        return result.stdout

    # Numeric comparison: 10 >= 5 although "10" < "5" as text.
    high = rerun_one_epoch("-param_name_and_value_high_threshold", "mlp_funnel_width", "5")
    assert ": 2" in high.splitlines()[0]
    low = rerun_one_epoch("-param_name_and_value_low_threshold", "mlp_funnel_width", "5")
    assert ": 1" in low.splitlines()[0]
    eq = rerun_one_epoch("-param_name_and_value", "mlp_funnel_width", "10")
    assert ": 2" in eq.splitlines()[0]
    sql = rerun_one_epoch(
        "-request",
        "SELECT run_id FROM run_results WHERE nb_params > (SELECT min(nb_params) FROM run_results)",
    )
    assert "run(s)" in sql
    none = daemon.cli(
        "rerun", str(cfg), db, "-param_name_and_value", "mlp_funnel_width", "77", "-epochs", "1"
    )
    assert none.returncode == 2 and "matches no run" in none.stderr
    assert query(db, "SELECT run_id, epochs FROM run_results ORDER BY run_id") == [(1, 2), (2, 4)]


def test_savedb_during_a_running_sweep(daemon: Daemon, tmp: Path) -> None:
    cfg = example_config(tmp, epochs=30, mlp_width="{2-9}")
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, check=True)
    deadline = time.monotonic() + 120
    while not query(db, "SELECT count(*) FROM runs WHERE status='done'")[0][0]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    done_before = query(db, "SELECT run_id FROM runs WHERE status='done'")
    copy = str(tmp / "copy.db")
    daemon.cli("savedb", copy, "--db", db, check=True)
    assert query(copy, "PRAGMA integrity_check") == [("ok",)]
    done_in_copy = {r for (r,) in query(copy, "SELECT run_id FROM runs WHERE status='done'")}
    assert {r for (r,) in done_before} <= done_in_copy
    for run_id in done_in_copy:
        assert query(copy, "SELECT count(*) FROM run_results WHERE run_id=?", run_id) == [(1,)]
    refused = daemon.cli("savedb", db, "--db", db)
    assert refused.returncode == 2 and "overwrite the live database" in refused.stderr
    daemon.wait_for(db)


def test_seed_pause_and_resume_files(daemon: Daemon, tmp: Path) -> None:
    daemon.cli("pause", check=True)
    cfg = example_config(tmp, epochs=1, mlp_width="3, 4")
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, check=True)
    saved = tmp / "pending.json"
    out = daemon.cli("pause", str(saved), check=True).stdout
    assert "wrote 2 not-yet-run pipeline(s)" in out
    content = json.loads(saved.read_text())
    assert content[0]["db"] == db and len(content[0]["pipelines"]) == 2
    assert content[0]["process"]["epochs"] == 1 and "nb_processus" in content[0]["monitor"]
    assert query(db, "SELECT DISTINCT status FROM runs") == [("cancelled",)]
    # The user edits the file, then queues it again.
    content[0]["pipelines"] = content[0]["pipelines"][:1]
    saved.write_text(json.dumps(content))
    out = daemon.cli("resume", str(saved), check=True).stdout
    assert "queued 1 pipeline(s)" in out
    daemon.wait_for(db)
    assert query(db, "SELECT run_id, status FROM runs ORDER BY run_id") == [
        (1, "cancelled"),
        (2, "cancelled"),
        (3, "done"),
    ]
    bad = tmp / "bad.json"
    bad.write_text('{"not": "a pause file"}')
    result = daemon.cli("resume", str(bad))
    assert result.returncode == 2 and "not a file written by" in result.stderr


def test_sigterm_checkpoints_and_the_next_daemon_resumes(tmp: Path) -> None:
    d = Daemon(tmp, "--checkpoint-every", "1000").start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(slow_config(tmp, epochs=15)), db, check=True)
        wait_epoch(d, db, 3)
        started = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 30
        parked = len(epochs_of(db, 1))
        assert query(db, "SELECT status FROM runs") == [("queued",)]
        assert query(db, "SELECT checkpoint_epoch FROM run_meta") == [(parked,)]
        d.start()
        d.wait_for(db)
    finally:
        d.stop()
    assert epochs_of(db, 1) == list(range(1, 16))
    details = [t for (t,) in query(db, "SELECT detail FROM run_events WHERE to_status='running'")]
    assert details[-1].endswith(f"from epoch {parked}")


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp: Path) -> None:
    rng = random.Random(1234)
    d = Daemon(tmp, "--checkpoint-every", "0")
    cfg = example_config(tmp, epochs=6, multiplicity=2, mlp_width="{2-7}", nb_processus=2)
    db = str(tmp / "s.db")
    d.start()
    d.cli("run", str(cfg), db, check=True)
    kills = 0
    try:
        for _ in range(6):
            time.sleep(rng.uniform(0.2, 2.0))
            d.kill9()
            kills += 1
            d.start()
        d.wait_for(db, timeout=300)
    finally:
        d.stop()
    assert kills == 6
    rows = query(db, "SELECT run_id, status FROM runs")
    assert len(rows) == 12 and {s for _, s in rows} == {"done"}
    assert query(db, "SELECT count(*), count(DISTINCT run_id) FROM run_results") == [(12, 12)]
    for run_id, _ in rows:
        assert epochs_of(db, run_id) == [1, 2, 3, 4, 5, 6], run_id
    assert query(db, "SELECT min(epochs), max(epochs) FROM run_results") == [(6, 6)]
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
