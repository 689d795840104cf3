"""One study's trouble stays with its study (issue 18): a study whose filesystem is full, or whose
database another process holds locked, neither stops the daemon nor the other studies, and its
writes land, in order, once the trouble is gone (mosaicd/storage/writer.py)."""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Daemon, query
from test_faults import epochs_of, slow_config, wait_busy


def mount_small_tmpfs(where: Path) -> None:
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"this test mounts a 2 MiB tmpfs and needs root: {result.stderr.strip()}")


def fill(where: Path) -> Path:
    """Fill the filesystem to the last byte; return the file that does it."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def study_config(root: Path, name: str, runs_dir: Path, epochs: int) -> Path:
    project = root / name
    project.mkdir()
    cfg = slow_config(project, epochs=epochs, multiplicity=1)
    cfg.write_text(
        cfg.read_text()
        .replace(f"run_files_path = {project}/runs", f"run_files_path = {runs_dir}")
        .replace("nb_processus = 2", "nb_processus = 1")
    )
    return cfg


def test_a_full_disk_stops_only_its_study(tmp: Path) -> None:
    full = tmp / "full"
    mount_small_tmpfs(full)
    d = Daemon(tmp, workers=2)
    try:
        d.start()
        db_full, db_other = str(full / "a.db"), str(tmp / "b.db")
        d.cli("run", str(study_config(tmp, "a", full / "runs", 6)), db_full, check=True)
        d.cli("run", str(study_config(tmp, "b", tmp / "runs-b", 6)), db_other, check=True)
        wait_busy(d, db_full, min_epoch=1)
        filler = fill(full)
        filled_at = time.monotonic()

        # The full study says why it waits, and what to do; the daemon answers throughout.
        problem, answers = None, []
        deadline = time.monotonic() + 30
        while problem is None and time.monotonic() < deadline:
            started = time.monotonic()
            status = d.request("status", db=db_full, timeout=5)
            answers.append(time.monotonic() - started)
            problem = status["studies"][0].get("problem")
            time.sleep(0.1)
        assert problem and f"disk full in {full}" in problem and "mosaic resume" in problem
        reported_after = time.monotonic() - filled_at
        shown = d.cli("status", "--db", db_full, check=True).stdout
        assert f"disk full in {full}: free space and `mosaic resume`" in shown

        # The other study finishes meanwhile.
        assert d.wait_for(db_other, total=1, timeout=60) == {**_zero(), "done": 1}
        assert d.proc.poll() is None  # type: ignore[union-attr]
        assert max(answers) < 5
        print(
            f"\ndisk full: reported after {reported_after:.1f} s; status answered "
            f"{len(answers)} times, median {statistics.median(answers) * 1000:.0f} ms, max "
            f"{max(answers) * 1000:.0f} ms; the other study finished"
        )
        resumed_at = time.monotonic()

        # Space freed: `mosaic resume` writes what waited and the full study finishes.
        filler.unlink()
        d.cli("resume", check=True)
        d.wait_for(db_full, states=("done",), total=1, timeout=90)
        print(f"disk full: the study finished {time.monotonic() - resumed_at:.1f} s after resume")
        assert epochs_of(db_full, 1) == list(range(1, 7))
        assert query(db_full, "SELECT count(*) FROM run_results") == [(1,)]
        assert query(db_full, "PRAGMA integrity_check") == [("ok",)]
        events = [e for (e,) in query(db_full, "SELECT detail FROM run_events") if e]
        assert any(f"disk full in {full}" in e for e in events)
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(full)], check=False)
    log = d.log_path.read_text()
    assert "Traceback" not in log
    assert "cannot rollback" not in log


def _zero() -> dict[str, int]:
    return {s: 0 for s in ("queued", "running", "done", "failed", "cancelled", "paused")}


def test_a_locked_study_does_not_freeze_clients(tmp: Path) -> None:
    d = Daemon(tmp, workers=2).start()
    db = str(tmp / "s.db")
    epochs = 8
    try:
        d.cli("run", str(slow_config(tmp, epochs=epochs, multiplicity=2)), db, check=True)
        wait_busy(d, db, min_epoch=1)
        outside = sqlite3.connect(db, isolation_level=None)
        outside.execute("BEGIN EXCLUSIVE")
        held_until = time.monotonic() + 6
        times: list[float] = []
        problem = None
        try:
            while time.monotonic() < held_until:
                for name, args in (("status", {"db": db}), ("pause", {}), ("resume", {})):
                    started = time.monotonic()
                    reply = d.request(name, timeout=10, **args)
                    times.append(time.monotonic() - started)
                    if name == "status" and reply["studies"][0].get("problem"):
                        problem = reply["studies"][0]["problem"]
                time.sleep(0.2)
            started = time.monotonic()
            assert d.cli("status", timeout=10).returncode == 0
            cli_time = time.monotonic() - started
        finally:
            outside.execute("COMMIT")
            outside.close()
        print(
            f"\nlocked study: {len(times)} status/pause/resume answers while locked for 6 s: "
            f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms; "
            f"`mosaic status` (CLI) {cli_time:.2f} s"
        )
        assert statistics.median(times) < 1.0, times
        assert cli_time < 5
        assert problem and "is locked by another process" in problem
        d.wait_for(db, total=2, timeout=120)
    finally:
        d.stop()
    for run_id in (1, 2):
        assert epochs_of(db, run_id) == list(range(1, epochs + 1))
    assert query(db, "SELECT count(*) FROM run_results") == [(2,)]
    # The run's events landed in order: queued, running, done, each once.
    for run_id in (1, 2):
        states = [
            s
            for (s,) in query(
                db, "SELECT to_status FROM run_events WHERE run_id=? ORDER BY event_id", run_id
            )
        ]
        assert states == ["queued", "running", "done"], states
    assert os.path.exists(db)
