"""A run's owner comes from the kernel and the daemon's state, never from the study (issue 24).

On a root daemon with the unit's three capabilities and throw-away users (tests/test_shared_box.py):
user A edits her own study's `submissions.owner_uid` to 0, to NULL and to B's uid, then waits for
a restart, or makes the daemon load a forged parked submission (`resume`) and reruns a run whose
row she edited. Her model records the uid it runs as in its log: only A's may ever appear, and
the edited studies are set aside, with the reason in `mosaic status`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import example_config, query
from test_shared_box import Box, _uid, project_with_model, running_box

WHOAMI_CLASS = """
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("or_mlp", {mlp!r})
_mlp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mlp)


class whoami_mlp(_mlp.mlp_funnel):
    def __init__(self, input_size, output_size, length, width):
        print(f"IDENTITY uid={{os.getuid()}} euid={{os.geteuid()}}", flush=True)
        super().__init__(input_size, output_size, length, width)
"""


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("mosident-") as made:
        yield made


def _whoami_project(box: Box, name: str) -> tuple[str, str]:
    """A's project whose model prints the uid it runs as into its run's log."""
    return project_with_model(box, "a", name, WHOAMI_CLASS, "whoami_mlp")


def _identities(db: str) -> list[tuple[int, int]]:
    """Every (uid, euid) a run of the study's model ran as, from its run logs (read as root:
    whoever wrote them)."""
    found = []
    for log in (Path(db).parent / "runs").glob("output_*.log"):
        for uid, euid in re.findall(r"IDENTITY uid=(\d+) euid=(\d+)", log.read_text()):
            found.append((int(uid), int(euid)))
    return found


def _as_a_sql(box: Box, db: str, *statements: str) -> None:
    """A edits her own study, as herself, with Python's sqlite3."""
    code = (
        "import sqlite3, sys, json\n"
        "conn = sqlite3.connect(sys.argv[1])\n"
        "for s in json.loads(sys.argv[2]):\n"
        "    conn.execute(s)\n"
        "conn.commit()\n"
    )
    result = box.as_user("a", box.python, "-c", code, db, json.dumps(list(statements)))
    assert result.returncode == 0, result.stderr


def _status_of(box: Box, role: str, db: str) -> dict:
    reply = box.request(role, "status", db=db, limit=0)
    assert "ok" in reply, reply
    (study,) = reply["ok"]["studies"]
    return study


FORGED = {"root": "0", "null": "NULL", "b": None}  # None: B's uid


def _forged_uid(box: Box, variant: str) -> str:
    return FORGED[variant] or str(_uid(box, "b"))


def test_an_edited_owner_never_runs_as_anyone_but_her_after_a_restart(box: Box) -> None:
    a_uid = _uid(box, "a")
    # A holds her submissions, so that they stay queued until the daemon dies.
    assert box.cli("a", "pause").returncode == 0
    studies = {}
    for variant in [*FORGED, "honest"]:
        config, db = _whoami_project(box, f"restart-{variant}")
        result = box.cli("a", "run", config, db, "--no-autostart")
        assert result.returncode == 0, result.stderr
        studies[variant] = db
    box.daemon.kill9()
    for variant in FORGED:
        _as_a_sql(
            box,
            studies[variant],
            f"UPDATE submissions SET owner_uid = {_forged_uid(box, variant)}",
        )
    box.daemon.start()
    assert box.cli("a", "resume").returncode == 0
    # The honest study runs, as A: the probe works.
    assert box.daemon.wait_for(studies["honest"], timeout=180)["done"] == 1
    assert _identities(studies["honest"]) == [(a_uid, a_uid)]
    for variant in FORGED:
        db = studies[variant]
        _settled_or_set_aside(box, db)
        assert all(ids == (a_uid, a_uid) for ids in _identities(db)), (variant, _identities(db))
        # Never started: a worker of whoever the row said (root, B) would have been its own.
        started = query(db, "SELECT detail FROM run_events WHERE to_status = 'running'")
        ends = query(db, "SELECT return_status FROM runs")
        assert started == [], (variant, started, ends)
        assert query(db, "SELECT status FROM runs") == [("queued",)], variant
        study = _status_of(box, "a", db)
        assert "set aside" in study.get("set_aside", ""), (variant, study)
        assert f"uid {a_uid}" in study["set_aside"], variant
        # An administrator sees it too.
        assert "set aside" in _status_of(box, "adm", db).get("set_aside", "")
    # Restored by its owner and resumed, a set-aside study runs, as A.
    db = studies["root"]
    _as_a_sql(box, db, f"UPDATE submissions SET owner_uid = {a_uid}")
    assert box.cli("a", "resume").returncode == 0
    assert box.daemon.wait_for(db, timeout=180)["done"] == 1
    assert _identities(db) == [(a_uid, a_uid)]


def _settled_or_set_aside(box: Box, db: str, timeout: float = 90) -> None:
    """Wait until the study is set aside (at once, today) or its runs have all run (as
    they did before: as whoever the study said)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = _status_of(box, "a", db)
        if study.get("set_aside"):
            return
        counts = study["counts"]
        if not counts.get("queued") and not counts.get("running"):
            return
        time.sleep(0.5)


def _forge_parked_run(box: Box, db: str, submission_id: int, run_id: int, owner: str) -> None:
    """A copies her submission 1 and its run 1 into a new submission (owner `owner`) with a
    parked run: what `mosaic resume` loads."""
    _as_a_sql(
        box,
        db,
        "CREATE TEMP TABLE s AS SELECT * FROM submissions WHERE submission_id = 1",
        f"UPDATE s SET submission_id = {submission_id}, owner_uid = {owner}",
        "INSERT INTO submissions SELECT * FROM s",
        "CREATE TEMP TABLE r AS SELECT * FROM runs WHERE run_id = 1",
        f"UPDATE r SET run_id = {run_id}, status = 'paused', return_status = NULL",
        "INSERT INTO runs SELECT * FROM r",
        "CREATE TEMP TABLE m AS SELECT * FROM run_meta WHERE run_id = 1",
        f"UPDATE m SET run_id = {run_id}, submission_id = {submission_id}, checkpoint_epoch = 0",
        "INSERT INTO run_meta SELECT * FROM m",
        "CREATE TEMP TABLE p AS SELECT * FROM params WHERE run_id = 1",
        f"UPDATE p SET run_id = {run_id}",
        "INSERT INTO params SELECT * FROM p",
        "DROP TABLE s",
        "DROP TABLE r",
        "DROP TABLE m",
        "DROP TABLE p",
    )


def test_an_edited_owner_never_runs_without_a_restart_pause_resume_rerun(box: Box) -> None:
    a_uid = _uid(box, "a")
    config, db = _whoami_project(box, "no-restart")
    result = box.cli("a", "run", config, db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    assert box.daemon.wait_for(db, timeout=180)["done"] == 1
    assert _identities(db) == [(a_uid, a_uid)]
    # Forged parked runs of forged submissions (root's, NULL's, B's): her `resume` loads them
    # (not hers by their rows, they stay parked).
    forged = {}
    for offset, variant in enumerate(FORGED):
        forged[variant] = 2 + offset
        _forge_parked_run(box, db, 2 + offset, 2 + offset, _forged_uid(box, variant))
    assert box.cli("a", "pause").returncode == 0
    assert box.cli("a", "resume").returncode == 0
    # Then she makes them look like her failed runs, and reruns them; and her real run's row
    # says root's, and she reruns it too.
    ids = ", ".join(map(str, forged.values()))
    _as_a_sql(
        box,
        db,
        f"UPDATE submissions SET owner_uid = {a_uid} WHERE submission_id IN ({ids})",
        f"UPDATE runs SET status = 'failed' WHERE run_id IN ({ids})",
        "UPDATE submissions SET owner_uid = 0 WHERE submission_id = 1",
    )
    reruns = {
        variant: box.cli("a", "rerun", config, db, "-id", str(run_id), "-epochs", "1")
        for variant, run_id in forged.items()
    }
    _settled_or_set_aside(box, db)
    assert all(ids == (a_uid, a_uid) for ids in _identities(db)), _identities(db)
    for variant, result in reruns.items():
        # The daemon's records name no owner for them: refused (only administrators may).
        assert result.returncode != 0, (variant, result.stdout)
        assert "belongs to" in result.stderr, (variant, result.stderr)
    result = box.cli("a", "rerun", config, db, "-id", "1", "-epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    time.sleep(3)  # time enough for it to start, were it to
    assert all(ids == (a_uid, a_uid) for ids in _identities(db)), _identities(db)
    statuses = dict(query(db, "SELECT run_id, status FROM runs"))
    assert statuses == {1: "queued", 2: "failed", 3: "failed", 4: "failed"}, statuses
    study = _status_of(box, "a", db)
    assert "set aside" in study.get("set_aside", ""), study
    # Run 1, whose row says root's, is still hers (the daemon's record) to cancel.
    result = box.cli("a", "cancel", db, "-id", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert box.daemon.wait_for(db, timeout=60)["cancelled"] == 1


def test_root_may_not_submit_to_a_shared_daemon(box: Box) -> None:
    directory = box.root / "by-root"  # root's: the daemon may write there
    directory.mkdir()
    config = example_config(directory, epochs=1, nb_processus=1)
    db = str(directory / "results.db")
    result = box.daemon.cli("run", str(config), db, "--no-autostart")
    assert result.returncode != 0
    assert "no one's code as root" in result.stderr + result.stdout
    assert not os.path.exists(db)


# -- issue 24, item 2: the daemon never changes its ids; users' keepers do their file work ------

REPO = Path(__file__).resolve().parent.parent
SET_ID = re.compile(r"\bset(?:e|re|res)?[ug]id\s*\(|\bsetgroups\s*\(|\binitgroups\s*\(")

# Run as B: `status` over and over for SECONDS; prints the slowest answer.
STATUS_PROBE = """
import sys, time
from mosaic_client.connection import Client
slowest, until = 0.0, time.monotonic() + float(sys.argv[1])
with Client(timeout=10.0) as client:
    while time.monotonic() < until:
        started = time.monotonic()
        client.request("status", limit=5)
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
print(slowest)
"""


def _ids_of(pid: int) -> tuple[str, str, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    lines = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status.splitlines()}
    return (" ".join(lines["Uid"]), " ".join(lines["Gid"]), " ".join(lines["Groups"]))


def _keepers_of(uid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        cmdline = proc.info["cmdline"] or []
        if "mosaicd.keeper.main" in cmdline and proc.info["uids"].real == uid:
            found.append(proc)
    return found


def test_the_daemon_never_switches_ids_its_users_keepers_touch_their_files(box: Box) -> None:
    # The source: no set*id call anywhere in the daemon's package (workers and keepers are
    # started as their users by the kernel, between fork and exec: Popen's user=, group=).
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "mosaicd").rglob("*.py")
        if SET_ID.search(path.read_text())
    ]
    assert offenders == [], offenders
    assert box.cli("a", "resume").returncode == 0
    pid = box.daemon.proc.pid  # type: ignore[union-attr]
    before = _ids_of(pid)
    assert before[0] == "0 0 0 0", before
    config, db = _whoami_project(box, "ids")
    result = box.cli("a", "run", config, db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    # The process, throughout A's run (and the keeper's work on her study): all ids 0.
    seen = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        seen.add(_ids_of(pid))
        done = query(db, "SELECT count(*) FROM runs WHERE status = 'done'")[0][0]
        if done:
            break
        time.sleep(0.01)
    assert done == 1
    assert seen == {before}, seen
    # A's study and run files were made by her keeper, as her; it runs with her ids only.
    a_uid = _uid(box, "a")
    assert os.stat(db).st_uid == a_uid
    (keeper,) = _keepers_of(a_uid)
    assert set(keeper.uids()) == {a_uid} and keeper.gids().effective != 0
    assert keeper.cwd() in ("/", str(box.home("a")))


def test_a_stopped_keeper_stalls_no_one_else_and_is_replaced(box: Box) -> None:
    a_uid = _uid(box, "a")
    assert box.cli("a", "resume").returncode == 0
    config, db = _whoami_project(box, "stopped-keeper")
    assert box.cli("a", "run", config, db, "--no-autostart").returncode == 0
    (keeper,) = _keepers_of(a_uid)
    # A stops her own keeper (she may signal her own process) while her run trains.
    result = box.as_user("a", "kill", "-STOP", str(keeper.pid))
    assert result.returncode == 0, result.stderr
    probe = box.as_user("b", box.python, "-c", STATUS_PROBE, "8")
    assert probe.returncode == 0, probe.stderr
    assert float(probe.stdout) < 1.0, f"B waited {float(probe.stdout):.2f} s for status"
    # The daemon gave up on it and, after its backoff, started another: A's run is stored.
    assert box.daemon.wait_for(db, timeout=180)["done"] == 1
    fresh = _keepers_of(a_uid)
    assert [p.pid for p in fresh] != [keeper.pid]
    assert not psutil.pid_exists(keeper.pid) or keeper.status() == psutil.STATUS_ZOMBIE
