"""Every run executes as its owner (issue 17): on a root daemon shared by two throw-away users,
one user's code can neither read nor rewrite the other's study, run files or workers, nor the
daemon's own state; each user's files are theirs; a kill -9 of the daemon with both users'
studies running loses nothing.

Runs as root (CI does), with the users and groups of tests/test_shared_box.py.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import query
from test_shared_box import (
    DENIED,
    USERS_GID,
    Box,
    _project,
    _uid,
    project_with_model,
    running_box,
)

EPOCHS = 12
PROBES = (
    "study_write",
    "study_sqlite",
    "run_file_read",
    "runs_dir_write",
    "signal",
    "worker_secret",
    "state",
)


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("mosiso-", workers=2) as made:
        yield made


def dump(db: str) -> tuple[list[str], str]:
    """A study's whole content and SQLite's own check of the file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.iterdump()), conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


PROBE_CLASS = '''
import importlib.util
import os
import signal
import sqlite3

_spec = importlib.util.spec_from_file_location("or_mlp", {mlp!r})
_mlp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mlp)


def _try(name, action):
    try:
        action()
    except PermissionError as exc:
        print(f"PROBE {{name}}: refused ({{exc.strerror}})", flush=True)
    except sqlite3.Error as exc:
        print(f"PROBE {{name}}: refused ({{exc}})", flush=True)
    else:
        print(f"PROBE {{name}}: ALLOWED", flush=True)


def _workers_of(uid):
    """The pids of the daemon's workers that run as `uid`, read from /proc like `ps` does."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{{pid}}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{{pid}}/status") as fh:
                uids = next(l for l in fh if l.startswith("Uid:")).split()[1:]
        except OSError:
            continue
        if b"mosaicd.training.worker" in cmdline and int(uids[0]) == uid:
            found.append(int(pid))
    return found


def _environ_of(pid):
    with open(f"/proc/{{pid}}/environ", "rb") as fh:
        return fh.read()


def _write_study(db):
    conn = sqlite3.connect(db)
    conn.execute("UPDATE runs SET status = 'failed'")
    conn.commit()


def _kill_workers(uid):
    pids = _workers_of(uid)
    print(f"PROBE workers of {{uid}}: {{pids}}", flush=True)
    if not pids:
        raise AssertionError("no worker of the other user to signal")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


class probe_mlp(_mlp.mlp_funnel):
    def __init__(self, input_size, output_size, length, width, victim_db, victim_runs,
                 victim_uid, state_dir):
        print(f"PROBE running as uid {{os.getuid()}} gid {{os.getgid()}}", flush=True)
        _try("study_write", lambda: open(victim_db, "r+b").close())
        _try("study_sqlite", lambda: _write_study(victim_db))
        _try("run_file_read", lambda: open(os.path.join(victim_runs, "output_1.log")).read())
        _try("runs_dir_write", lambda: open(os.path.join(victim_runs, "planted"), "w").close())
        _try("signal", lambda: _kill_workers(victim_uid))
        # The secret part of a worker's routing id is in its environment, not its cmdline.
        _try("worker_secret", lambda: _environ_of(_workers_of(victim_uid)[0]))
        _try("state", lambda: os.listdir(state_dir))
        super().__init__(input_size, output_size, length, width)
'''


def _probing_project(box: Box, victim_db: str) -> tuple[str, str]:
    """A's project whose model, when built in A's run, tries to reach B's study and worker."""
    return project_with_model(
        box,
        "a",
        "probe",
        PROBE_CLASS,
        "probe_mlp",
        victim_db=victim_db,
        victim_runs=Path(victim_db).parent / "runs",
        victim_uid=_uid(box, "b"),
        state_dir=box.daemon.state_dir,
    )


def test_a_users_code_cannot_reach_another_users_study_workers_or_the_daemon(box: Box) -> None:
    # B's study, private (the default [MONITOR] umask), finished; B's worker stays, idle.
    b_config, b_db = _project(box, "b", "victim", umask=None)
    result = box.cli("b", "run", b_config, b_db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    assert box.daemon.wait_for(b_db, timeout=180) == {**_zero(), "done": 1}
    b_runs = Path(b_db).parent / "runs"
    before = dump(b_db), tree(b_runs)
    assert before[0][1] == "ok"
    b_workers = _workers(box, "b")
    assert b_workers, "B's worker should stay on its slot while nobody needs it"

    a_config, a_db = _probing_project(box, b_db)
    result = box.cli("a", "run", a_config, a_db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    assert box.daemon.wait_for(a_db, timeout=180) == {**_zero(), "done": 1}

    log = (Path(a_db).parent / "runs" / "output_1.log").read_text()
    assert f"PROBE running as uid {_uid(box, 'a')} gid 100" in log, log
    for probe in PROBES:
        assert re.search(f"^PROBE {probe}: refused", log, flags=re.M), (probe, log)
    assert "ALLOWED" not in log
    # B's study and run files are byte for byte what they were, and B's worker lives on.
    assert (dump(b_db), tree(b_runs)) == before
    assert all(psutil.pid_exists(pid) for pid in b_workers)

    # `ps`: each user's workers run under that user's uid, and the daemon under root's.
    assert {p.uids().real for p in map(psutil.Process, _workers(box, "a"))} == {_uid(box, "a")}
    assert {p.uids().real for p in map(psutil.Process, b_workers)} == {_uid(box, "b")}
    # Every file of A's study is A's, and private to A.
    directory = Path(a_db).parent
    for path in [
        Path(a_db),
        Path(a_db + "-wal"),
        Path(a_db + "-shm"),
        *(directory / "runs").iterdir(),
    ]:
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode) & 0o077) == (_uid(box, "a"), 0), path
    assert stat.S_IMODE((directory / "runs").stat().st_mode) == 0o700


def test_the_daemon_holds_three_capabilities_only(box: Box) -> None:
    # As the unit starts it (CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_KILL): bits 5-7.
    assert box.daemon.proc is not None
    status = Path(f"/proc/{box.daemon.proc.pid}/status").read_text()
    caps = dict(re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, flags=re.M))
    assert int(caps["CapBnd"], 16) == int(caps["CapEff"], 16) == 0xE0, caps
    assert "mosaicd" in Path(f"/proc/{box.daemon.proc.pid}/cmdline").read_text()


def _gid(group: str) -> int:
    return int(subprocess.check_output(["getent", "group", group], text=True).split(":")[2])


def _one(db: str, sql: str, *params: object) -> int:
    return int(query(db, sql, *params)[0][0])


def _zero() -> dict[str, int]:
    return {s: 0 for s in ("queued", "running", "paused", "done", "failed", "cancelled")}


def _workers(box: Box, role: str) -> list[int]:
    """The pids of the daemon's workers that belong to a user, from `mosaic status`."""
    status = box.daemon.request("status", limit=0)
    return [w["pid"] for w in status["workers"] if w.get("owner") == box.users[role]]


def test_a_link_planted_at_a_run_log_reaches_nothing_of_root(box: Box) -> None:
    # Outside probe: A made runs/output_1.log a link to a root-only file; the worker (then
    # the daemon's user) appended A's output to it. Now A's worker has A's rights only.
    secret = box.root / "root-only.txt"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    config, db = _project(box, "a", "planted", umask=None)
    runs = Path(config).parent / "runs"
    runs.mkdir()
    os.chown(runs, _uid(box, "a"), -1)
    os.symlink(secret, runs / "output_1.log")
    os.lchown(runs / "output_1.log", _uid(box, "a"), -1)
    result = box.cli("a", "run", config, db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    counts = box.daemon.wait_for(db, timeout=180)
    assert counts["failed"] == 1, counts
    assert secret.read_text() == "root's\n"
    (status,) = query(db, "SELECT return_status FROM runs")[0]
    assert "root's" not in status


def test_kill_9_of_the_daemon_with_two_owners_running_loses_nothing(box: Box) -> None:
    # Private homes (0700, Debian's default): the daemon, without a file-access override, cannot
    # look into them itself, and must still reopen both studies after the restart and resume
    # their runs from their checkpoints.
    for role in ("a", "b"):
        box.home(role).chmod(0o700)
    try:
        _kill_9_with_two_owners(box)
    finally:
        for role in ("a", "b"):
            box.home(role).chmod(0o755)


def _kill_9_with_two_owners(box: Box) -> None:
    studies = {}
    for role in ("a", "b"):
        config, db = _project(box, role, "sweep", multiplicity=3, umask=None, epochs=EPOCHS)
        # Epochs long enough (400 batches) for the kill to land in the middle of the sweep.
        text = Path(config).read_text().replace("data_size = 200", "data_size = 10000")
        Path(config).write_text(text)
        result = box.cli(role, "run", config, db, "--no-autostart")
        assert result.returncode == 0, result.stderr
        studies[role] = db
    # Mid-sweep: both users' runs have trained some epochs, and not all are done.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        epochs = {
            r: query(db, "SELECT count(*) FROM run_epochs")[0][0] for r, db in studies.items()
        }
        if all(n >= 3 for n in epochs.values()):
            break
        time.sleep(0.2)
    done = {
        r: query(db, "SELECT count(*) FROM runs WHERE status='done'")[0][0]
        for r, db in studies.items()
    }
    assert min(done.values()) < 3, done
    box.daemon.kill9()
    box.daemon.start()
    for role, db in studies.items():
        assert box.daemon.wait_for(db, timeout=300) == {**_zero(), "done": 3}, role
        # Each run trained once to the end: one "done", epochs 1..N with no gap or repeat.
        for run_id in (1, 2, 3):
            events = query(
                db, "SELECT count(*) FROM run_events WHERE run_id=? AND to_status='done'", run_id
            )
            assert events == [(1,)], (role, run_id)
            got = [
                e
                for (e,) in query(
                    db, "SELECT epoch FROM run_epochs WHERE run_id=? ORDER BY epoch", run_id
                )
            ]
            assert got == list(range(1, EPOCHS + 1)), (role, run_id, got)
        # And every file of the study is still its owner's, those written after the restart too.
        directory = Path(db).parent
        for path in [Path(db), Path(db + "-wal"), *(directory / "runs").iterdir()]:
            assert path.stat().st_uid == _uid(box, role), path


def test_a_daemon_without_privilege_refuses_other_users_and_serves_its_own(box: Box) -> None:
    # The single-user mode is unchanged: a daemon a user starts for themself runs their runs
    # as them, with their umask, and switches nothing. Reached by another user (here through
    # --socket-group), it refuses their submission rather than run their code as itself.
    adm = box.users["adm"]
    home = box.home("adm")
    run_dir = home / "own-daemon"
    run_dir.mkdir()
    os.chown(run_dir, _uid(box, "adm"), _gid(box.group))
    run_dir.chmod(0o750)
    socket_path = str(run_dir / "d.sock")
    env = {**box.env("adm"), "MOSAIC_SOCKET": socket_path}
    log = open(home / "own-daemon.log", "wb")
    daemon = subprocess.Popen(
        ["setpriv", f"--reuid={adm}", f"--regid={USERS_GID}", "--init-groups", "--"]
        + [box.python, "-m", "mosaicd", "--socket", socket_path]
        + ["--state-dir", str(run_dir / "state"), "--socket-group", box.group, "--workers", "1"]
        + ["--gpus", ""],
        env=env,
        cwd=home,
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        own = {**env}
        deadline = time.monotonic() + 60
        while not os.path.exists(socket_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        config, db = _project(box, "a", "elsewhere", umask=None)
        result = box.as_user(
            "a", box.python, "-m", "mosaic_client.cli", "--socket", socket_path, "run", config, db
        )
        assert result.returncode == DENIED, result.stdout + result.stderr
        assert f"cannot run anything as {box.users['a']}" in result.stderr
        assert not os.path.exists(db)

        config, db = _project(box, "adm", "mine", umask=None)
        result = subprocess.run(
            ["setpriv", f"--reuid={adm}", f"--regid={USERS_GID}", "--init-groups", "--"]
            + [box.python, "-m", "mosaic_client.cli", "run", config, db, "--no-autostart"],
            env=own,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if query(db, "SELECT status FROM runs") == [("done",)]:
                break
            time.sleep(0.2)
        assert query(db, "SELECT status FROM runs") == [("done",)]
        # The user's own umask (setpriv keeps root's 022 here), not the shared daemon's 077.
        for path in (Path(db), Path(config).parent / "runs" / "output_1.log"):
            st = path.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (_uid(box, "adm"), 0o644), path
    finally:
        daemon.terminate()
        daemon.wait(60)
