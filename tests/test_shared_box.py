"""The shared GPU box: a root daemon whose socket only one group reaches, users who own their
runs, administrators who may act on all of them, systemd readiness, and the unit files.

Runs as root (CI does): it creates throw-away users and groups with useradd/groupadd, removes
them at the end, and runs the client as those users with setpriv.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import site
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLE, REPO, Daemon, example_config, query

from mosaic_client.connection import Client, DaemonUnavailable

DENIED = 4
USERS_GID = 100  # useradd -N's default primary group ("users"), given explicitly below
SYSTEMD_DIR = REPO / "systemd"


def _require_root() -> None:
    # Not a skip: these tests are the proof of the permission model and CI runs them as root.
    if os.geteuid() != 0:
        pytest.fail("tests/test_shared_box.py creates users and groups: run it as root")
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install -y passwd util-linux")


def _usable_by_anyone(path: str) -> bool:
    """Whether a user with no special rights can execute `path` (search on every parent)."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    parent = os.path.dirname(path)
    while parent != "/":
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(parent)
    return True


def user_python() -> tuple[str, list[str]]:
    """An interpreter the throw-away users may run, and the PYTHONPATH entries it needs.

    The venv's interpreter may live under /root (0700, as on this box): then the same
    major.minor system interpreter runs the client with the venv's pure site-packages."""
    if _usable_by_anyone(sys.executable):
        return sys.executable, []
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidate = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if candidate and _usable_by_anyone(candidate):
        return candidate, [p for p in site.getsitepackages() if os.path.isdir(p)]
    pytest.fail(
        f"no {version} that unprivileged users may run: {sys.executable} is not "
        "reachable by them; install one (apt-get install -y python3)"
    )


# The suite runs test files in parallel (scripts/test: pytest-xdist): two boxes made at once
# would race for /etc/passwd's lock (useradd fails "cannot lock"), so account changes take turns.
ACCOUNTS_LOCK = Path(tempfile.gettempdir()) / "mosaic-tests-accounts.lock"


def _run(*argv: str) -> None:
    with ACCOUNTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


@dataclass
class Box:
    root: Path
    group: str  # may use the socket
    admin_group: str  # may act on everyone's runs
    users: dict[str, str]  # role -> user name: a, b (in group), adm (in both), outsider
    daemon: Daemon
    python: str
    pythonpath: list[str]
    made_users: list[str] = field(default_factory=list)
    made_groups: list[str] = field(default_factory=list)

    def home(self, role: str) -> Path:
        return self.root / role

    def env(self, role: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home(role)),
            "USER": self.users[role],
            "LANG": "C.UTF-8",
            "MOSAIC_SOCKET": self.daemon.socket,
            "PYTHONPATH": os.pathsep.join([str(REPO), *self.pythonpath]),
        }

    def as_user(
        self, role: str, *argv: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        user = self.users[role]
        result = subprocess.run(
            ["setpriv", f"--reuid={user}", f"--regid={USERS_GID}", "--init-groups", "--", *argv],
            env=self.env(role),
            cwd=self.home(role),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return result

    def cli(self, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.as_user(role, self.python, "-m", "mosaic_client.cli", *args)

    def request(self, role: str, name: str, **fields: Any) -> dict[str, Any]:
        """Send one raw request as `role`, bypassing the CLI's own checks (a hostile client)."""
        code = (
            "import json, sys\n"
            "from mosaic_client.connection import Client\n"
            "from mosaic_client.protocol import ProtocolError\n"
            "name, fields = json.loads(sys.argv[1])\n"
            "try:\n"
            "    with Client() as c:\n"
            "        print(json.dumps({'ok': c.request(name, **fields)}))\n"
            "except ProtocolError as e:\n"
            "    print(json.dumps({'code': e.code, 'message': e.message}))\n"
        )
        result = self.as_user(role, self.python, "-c", code, json.dumps([name, fields]))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def _make_box(root: Path, workers: int = 1, options: tuple[str, ...] = ()) -> Box:
    tag = secrets.token_hex(3)
    group, admin_group = f"mosu{tag}", f"mosa{tag}"
    users = {
        "a": f"mosa{tag}a",
        "b": f"mosa{tag}b",
        "adm": f"mosa{tag}m",
        "outsider": f"mosa{tag}o",
    }
    python, pythonpath = user_python()
    box = Box(
        root,
        group,
        admin_group,
        users,
        # Workers run as the runs' owners: with an interpreter those users may run.
        Daemon(
            root,
            "--socket-group",
            group,
            "--admin-group",
            admin_group,
            "--worker-python",
            python,
            *options,
            workers=workers,
        ),
        python,
        pythonpath,
    )
    for g in (group, admin_group):
        _run("groupadd", g)
        box.made_groups.append(g)
    memberships = {"a": group, "b": group, "adm": f"{group},{admin_group}", "outsider": None}
    for role, name in users.items():
        extra = ["-G", memberships[role]] if memberships[role] else []
        _run("useradd", "-M", "-N", "-g", str(USERS_GID), "-s", "/usr/sbin/nologin", *extra, name)
        box.made_users.append(name)
        home = box.home(role)
        home.mkdir()
        os.chown(home, int(subprocess.check_output(["id", "-u", name])), -1)
        home.chmod(0o755)
    # The layout of /run/mosaic under systemd: a 0750 directory of the users' group.
    sock_dir = root / "run"
    sock_dir.mkdir(mode=0o750)
    group_gid = int(subprocess.check_output(["getent", "group", group], text=True).split(":")[2])
    os.chown(sock_dir, 0, group_gid)
    sock_dir.chmod(0o750)
    box.daemon.socket = str(sock_dir / "mosaicd.sock")
    # As systemd/mosaicd.service starts it: root's uid with only CAP_SETUID, CAP_SETGID and
    # CAP_KILL (no file-access override: it cannot look into a private home), and the users'
    # group as its group.
    box.daemon.prefix = [
        "setpriv",
        f"--regid={group_gid}",
        "--clear-groups",
        "--bounding-set=-all,+setuid,+setgid,+kill",
        "--inh-caps=-all",
        "--",
    ]
    return box


@contextlib.contextmanager
def running_box(prefix: str, workers: int = 1, options: tuple[str, ...] = ()) -> Iterator[Box]:
    """A box with its users and groups and a running root daemon (with these extra `mosaicd`
    options); all removed at the end."""
    _require_root()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)  # the users traverse it to their project directories and the socket
    made: Box | None = None
    try:
        made = _make_box(root, workers, options)
        made.daemon.start()
        yield made
    finally:
        if made is not None:
            made.daemon.stop()
            for name in made.made_users:
                with contextlib.suppress(subprocess.CalledProcessError):
                    _run("userdel", name)
            for g in made.made_groups:
                with contextlib.suppress(subprocess.CalledProcessError):
                    _run("groupdel", g)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("mosbox-") as made:
        yield made


def _project(
    box: Box,
    role: str,
    name: str,
    multiplicity: int = 1,
    umask: str | None = "022",
    epochs: int = 2,
) -> tuple[str, str]:
    """A config in the user's directory (owned by them); returns (config, db) paths. Its study
    is readable by the other users ([MONITOR] umask = 022) unless `umask` says otherwise (None:
    the default, private to its owner): the daemon's own refusals are what most tests here
    probe, not the client's."""
    directory = box.home(role) / name
    directory.mkdir()
    config = example_config(
        directory,
        epochs=epochs,
        multiplicity=multiplicity,
        nb_processus=1,
        extra_monitor=f"umask = {umask}" if umask else "",
    )
    uid = int(subprocess.check_output(["id", "-u", box.users[role]]))
    for path in (directory, config):
        os.chown(path, uid, -1)
    return str(config), str(directory / "results.db")


def settled(box: Box, db: str) -> dict[str, int]:
    counts = box.daemon.wait_for(db, total=1, timeout=180)
    return {state: n for state, n in counts.items() if n}


def snapshot(db: str) -> list[Any]:
    """Everything a refused request must leave untouched."""
    return [
        query(db, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("runs", "run_events", "run_meta", "params", "submissions")
    ]


@pytest.fixture(scope="module")
def finished(box: Box) -> dict[str, tuple[str, str]]:
    """One finished study per user, submitted by that user through the CLI."""
    out = {}
    for role in ("a", "b"):
        config, db = _project(box, role, "done")
        result = box.cli(role, "run", config, db, "--no-autostart")
        assert result.returncode == 0, result.stderr
        out[role] = (config, db)
    for _, db in out.values():
        assert settled(box, db) == {"done": 1}
    return out


def test_socket_is_group_only(box: Box) -> None:
    st = os.stat(box.daemon.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660
    gid = int(subprocess.check_output(["getent", "group", box.group], text=True).split(":")[2])
    assert st.st_gid == gid


def test_each_run_records_its_owner(box: Box, finished: dict[str, tuple[str, str]]) -> None:
    for role, (_, db) in finished.items():
        user = box.users[role]
        uid = int(subprocess.check_output(["id", "-u", user]))
        params = dict(
            query(
                db,
                "SELECT param_name, param_value FROM params WHERE run_id=1 "
                "AND param_name IN ('owner', 'owner_uid')",
            )
        )
        assert params == {"owner": user, "owner_uid": uid}
        assert query(db, "SELECT owner_uid, owner FROM submissions") == [(uid, user)]
    # `status --mine` as a: a's finished run, none of b's; every listed run names its owner.
    result = box.cli("a", "status", "--mine", "--json")
    assert result.returncode == 0, result.stderr
    studies = {s["db"]: s for s in json.loads(result.stdout)["studies"]}
    assert [r["owner"] for r in studies[finished["a"][1]]["done"]] == [box.users["a"]]
    assert studies[finished["b"][1]]["done"] == []
    everyone = json.loads(box.cli("a", "status", "--json").stdout)["studies"]
    assert {r["owner"] for s in everyone for r in s["done"]} >= {box.users["a"], box.users["b"]}

    # savedb is written by the client, with the caller's rights: the copy is a's, not root's.
    copy = box.home("a") / "copy.db"
    result = box.cli("a", "savedb", str(copy), "--db", finished["a"][1])
    assert result.returncode == 0, result.stderr
    assert copy.stat().st_uid == int(subprocess.check_output(["id", "-u", box.users["a"]]))
    assert query(copy, "SELECT param_value FROM params WHERE param_name='owner'") == [
        (box.users["a"],)
    ]
    # b cannot plant a copy in a's directory through the daemon either: it never writes it.
    result = box.cli("b", "savedb", str(box.home("a") / "stolen.db"), "--db", finished["a"][1])
    assert result.returncode != 0 and not (box.home("a") / "stolen.db").exists()


def test_other_users_runs_are_refused_admins_may(
    box: Box, finished: dict[str, tuple[str, str]]
) -> None:
    a_config, a_db = finished["a"]
    before = snapshot(a_db)
    result = box.cli("b", "rerun", a_config, a_db, "-id", "all", "-epochs", "1")
    assert result.returncode == DENIED, result.stderr
    assert f"belongs to {box.users['a']}" in result.stderr
    assert "Nothing was changed" in result.stderr
    assert snapshot(a_db) == before
    # Nor may b add repetitions of a's runs (`repeat` queues copies of them in a's study).
    result = box.cli("b", "repeat", a_db, "--add", "1", "-id", "all")
    assert result.returncode == DENIED, result.stderr
    assert "belongs to" in result.stderr and box.users["a"] in result.stderr
    assert snapshot(a_db) == before

    # Queued runs of a (the daemon is paused by root), which b then tries to cancel.
    assert box.daemon.cli("pause", "--all").returncode == 0
    try:
        config, db = _project(box, "a", "queued", multiplicity=2)
        assert box.cli("a", "run", config, db, "--no-autostart").returncode == 0
        assert query(db, "SELECT run_id, status FROM runs") == [(1, "queued"), (2, "queued")]
        before = snapshot(db)
        result = box.cli("b", "cancel", db, "-id", "all")
        assert result.returncode == DENIED
        assert f"belongs to {box.users['a']}" in result.stderr
        assert snapshot(db) == before

        # b may neither pause nor resume the whole daemon; the refusal says who may.
        for args in (("pause", "--all"), ("resume", "--all")):
            result = box.cli("b", *args)
            assert result.returncode == DENIED, (args, result.stderr)
            assert "root" in result.stderr and "Nothing was changed" in result.stderr
        assert f"members of group {box.admin_group}" in box.cli("b", "pause", "--all").stderr
        # Without --all, b pauses and resumes only b's own submissions: a's runs stay as
        # they are, and so does the daemon-wide pause.
        for verb in ("pause", "resume"):
            result = box.cli("b", verb)
            assert result.returncode == 0, result.stderr
            assert "your submissions" in result.stdout
        assert box.daemon.request("status", limit=0)["paused"] is True
        assert snapshot(db) == before

        # A member of the admin group may cancel a's run; a may cancel their own.
        result = box.cli("adm", "cancel", db, "-id", "1")
        assert result.returncode == 0, result.stderr
        result = box.cli("a", "cancel", db, "-id", "2")
        assert result.returncode == 0, result.stderr
        assert query(db, "SELECT run_id, status FROM runs") == [(1, "cancelled"), (2, "cancelled")]
        # Root may rerun a's finished run.
        result = box.daemon.cli("rerun", a_config, a_db, "-id", "all", "-epochs", "1")
        assert result.returncode == 0, result.stderr
    finally:
        assert box.daemon.cli("resume", "--all").returncode == 0
    assert settled(box, a_db) == {"done": 1}
    assert query(a_db, "SELECT epochs_target FROM run_meta") == [(3,)]


def test_a_user_pauses_only_their_own_submissions(box: Box) -> None:
    a_config, a_db = _project(box, "a", "own_pause", multiplicity=1)
    b_config, b_db = _project(box, "b", "own_pause", multiplicity=1)
    result = box.cli("a", "pause")
    assert result.returncode == 0 and "paused your submissions" in result.stdout
    try:
        # a's pause holds what a submits while paused; b's run goes on.
        assert box.cli("a", "run", a_config, a_db, "--no-autostart").returncode == 0
        assert box.cli("b", "run", b_config, b_db, "--no-autostart").returncode == 0
        assert settled(box, b_db) == {"done": 1}
        assert query(a_db, "SELECT status FROM runs") == [("queued",)]
        status = box.daemon.request("status", limit=0)
        assert status["paused"] is False
        assert status["paused_owners"] == [
            int(subprocess.check_output(["id", "-u", box.users["a"]]))
        ]
    finally:
        result = box.cli("a", "resume")
    assert result.returncode == 0 and "your submissions" in result.stdout
    assert settled(box, a_db) == {"done": 1}


def test_daemon_writes_only_where_the_caller_may(
    box: Box, finished: dict[str, tuple[str, str]]
) -> None:
    a_config, _ = finished["a"]
    process = {
        "epochs": 1,
        "lr": 0.01,
        "data_scheme": "dataset",
        "pipeline_scheme": "mlp",
        "run_files_path": str(box.home("b") / "runs"),
    }
    fields = {
        "config_path": a_config,
        "process": process,
        "monitor": {},
        "pipelines": [[{"type": "dataset", "class": "x", "path_to_class": a_config}]],
    }
    # A hostile client (no CLI checks) names a database in a's directory: refused.
    target = box.home("a") / "planted.db"
    reply = box.request("b", "submit", db=str(target), **fields)
    assert reply["code"] == "permission", reply
    assert "may not write in" in reply["message"] and str(box.home("a")) in reply["message"]
    assert not target.exists()
    # ... or run files there.
    reply = box.request(
        "b",
        "submit",
        db=str(box.home("b") / "mine.db"),
        **{**fields, "process": {**process, "run_files_path": str(target)}},
    )
    assert reply["code"] == "permission", reply
    assert not (box.home("b") / "mine.db").exists()
    # ... or a path into the daemon's own state (even root may not).
    inside = os.path.join(box.daemon.state_dir, "study.db")
    reply = box.request("b", "submit", db=inside, **fields)
    assert reply["code"] == "permission" and "daemon's own state" in reply["message"]
    assert not os.path.exists(inside)
    # Nor may a request make the daemon open its own state database as a study.
    own = os.path.join(box.daemon.state_dir, "daemon.db")
    before = query(own, "SELECT name FROM sqlite_master ORDER BY name")
    reply = box.request("b", "cancel", db=own, selection={"kind": "ids", "ids": [1]})
    assert reply["code"] == "permission", reply
    assert query(own, "SELECT name FROM sqlite_master ORDER BY name") == before


def _uid(box: Box, role: str) -> int:
    return int(subprocess.check_output(["id", "-u", box.users[role]]))


def test_a_study_and_its_run_files_belong_to_their_owner_who_may_run_again(box: Box) -> None:
    # Outside probe: B could not re-run their own config, because the daemon had created runs/
    # as root:root 0755. Now the study (and SQLite's -wal/-shm) and runs/ are B's.
    config, db = _project(box, "b", "again")
    for _ in range(2):
        result = box.cli("b", "run", config, db, "--no-autostart")
        assert result.returncode == 0, result.stderr
        box.daemon.wait_for(db, timeout=180)
    assert query(db, "SELECT status, count(*) FROM runs GROUP BY status") == [("done", 2)]
    runs = Path(config).parent / "runs"
    for path in (Path(db), Path(db + "-wal"), runs):
        assert path.stat().st_uid == _uid(box, "b"), path


def test_a_user_may_not_add_runs_to_another_users_study_in_a_shared_directory(box: Box) -> None:
    # Outside probe: B's study in a sticky 1777 directory; A's `mosaic run` queued runs into it.
    shared = box.root / "shared"
    shared.mkdir(exist_ok=True)
    shared.chmod(0o1777)
    b_config, _ = _project(box, "b", "sticky")
    study = str(shared / "b3.db")
    result = box.cli("b", "run", b_config, study, "--no-autostart")
    assert result.returncode == 0, result.stderr
    box.daemon.wait_for(study, timeout=180)
    before = snapshot(study)
    a_config, _ = _project(box, "a", "sticky")
    result = box.cli("a", "run", a_config, study, "--no-autostart")
    assert result.returncode == DENIED, result.stderr
    assert "belongs to" in result.stderr and box.users["b"] in result.stderr
    assert snapshot(study) == before
    # A hostile client bypassing the CLI is refused by the daemon the same way.
    reply = box.request(
        "a",
        "submit",
        db=study,
        config_path=a_config,
        process={"epochs": 1},
        monitor={},
        pipelines=[[{"type": "dataset", "class": "x", "path_to_class": a_config}]],
    )
    assert reply["code"] == "permission", reply
    assert snapshot(study) == before


def test_a_user_may_not_read_another_users_private_study_through_the_daemon(box: Box) -> None:
    # Outside probe: a raw `show` or `studies` from A returned B's parameters, pipelines and the
    # path of a study in B's 0700 home.
    config, db = _project(box, "b", "private")
    result = box.cli("b", "run", config, db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    box.daemon.wait_for(db, timeout=180)
    box.home("b").chmod(0o700)
    try:
        reply = box.request("a", "show", db=db, run_id=1)
        assert reply["code"] == "permission" and "may not read" in reply["message"], reply
        listed = box.request("a", "studies")["ok"]
        assert db not in [item["db"] for item in listed]
        # B still sees their own study, and root does; an administrator of runs is no reader of
        # files: what anyone reads through the daemon is what they could read themself.
        assert box.request("b", "show", db=db, run_id=1)["ok"]["run_id"] == 1
        assert db in [item["db"] for item in box.request("b", "studies")["ok"]]
        assert db not in [item["db"] for item in box.request("adm", "studies")["ok"]]
        assert db in [item["db"] for item in box.daemon.request("studies")]
    finally:
        box.home("b").chmod(0o755)


def test_outsider_cannot_connect(box: Box) -> None:
    result = box.cli("outsider", "status")
    assert result.returncode == DENIED, result.stderr
    assert "permission denied" in result.stderr
    assert f"members of group {box.group}" in result.stderr
    # `mosaic run` must not start a daemon of its own on a socket it may not reach.
    config, db = _project(box, "outsider", "denied")
    result = box.cli("outsider", "run", config, db)
    assert result.returncode == DENIED and "permission denied" in result.stderr
    assert "started mosaicd" not in result.stderr
    # Below the CLI: the kernel refuses the connection itself.
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.connect(sys.argv[1])\n"
    )
    result = box.as_user("outsider", box.python, "-c", probe, box.daemon.socket)
    assert result.returncode != 0 and "PermissionError" in result.stderr
    result = box.as_user("a", box.python, "-c", probe, box.daemon.socket)
    assert result.returncode == 0, result.stderr


def _datagrams(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Notification datagrams until one contains the line `until`."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(message)
        if until in message.splitlines():
            return got
    raise AssertionError(f"no {until} within {timeout} s; got {got}")


def test_sd_notify_ready_status_stopping() -> None:
    root = Path(tempfile.mkdtemp(prefix="mosn-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(root / "notify.sock"))
    daemon = Daemon(root, workers=1)
    env = {**daemon.env, "NOTIFY_SOCKET": str(root / "notify.sock")}
    log = open(daemon.log_path, "ab")
    proc = subprocess.Popen(
        daemon.command(),
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    try:
        messages = _datagrams(listener, "READY=1", timeout=60)
        # The moment READY=1 arrives the socket answers: no retry, a short timeout.
        with Client(daemon.socket, timeout=5.0) as client:
            assert client.request("ping")["pid"] == proc.pid
        assert all("READY=1" not in m for m in messages[:-1])
        assert any(line.startswith("STATUS=") for line in messages[-1].splitlines())
        proc.send_signal(signal.SIGTERM)
        messages = _datagrams(listener, "STOPPING=1", timeout=30)
        assert any(line.startswith("STATUS=stopping") for line in messages[-1].splitlines())
        assert proc.wait(60) == 0
        with pytest.raises(DaemonUnavailable):
            Client(daemon.socket, timeout=1.0).request("ping")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        shutil.rmtree(root, ignore_errors=True)


def _units_with_real_binary(tmp: Path) -> list[Path]:
    """The unit files with ExecStart pointing at this checkout's mosaicd: `verify` checks that
    the binary exists, and /usr/local/bin/mosaicd is not installed in CI."""
    binary = shutil.which("mosaicd", path=os.path.dirname(sys.executable))
    assert binary, "mosaicd is not installed in the venv (pip install -e .)"
    out = []
    for unit in ("mosaicd.service", "mosaicd-user.service"):
        text = (SYSTEMD_DIR / unit).read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={binary}", text, flags=re.M)
        (tmp / unit).write_text(text)
        out.append(tmp / unit)
    return out


def test_unit_files_verify_and_score(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get update && apt-get install -y systemd")
    units = _units_with_real_binary(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mosaicd" not in result.stdout + result.stderr  # no warning about our units
    text = (SYSTEMD_DIR / "mosaicd.service").read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Group=mosaic-users",
        # Root's uid with only what starting workers as their owners takes (issue 17).
        "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_KILL",
        "AmbientCapabilities=",
        "RuntimeDirectory=mosaic",
        "RuntimeDirectoryMode=0750",
        "StateDirectory=mosaic",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ):
        assert re.search(f"^{line}$", text, flags=re.M), line
    # Hidden GPUs or a JIT that cannot map executable memory would break CUDA and triton.
    assert not re.search(r"^(PrivateDevices|MemoryDenyWriteExecute)=", text, flags=re.M)
    # No User=: a service user could not start workers as the runs' owners.
    assert not re.search(r"^(User|DynamicUser)=", text, flags=re.M)
    stop = float(re.search(r"^TimeoutStopSec=(\d+)", text, flags=re.M).group(1))
    assert stop >= 60 + 5 + 10  # --stop-timeout's default, the workers' grace, a margin
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(units[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    score = re.search(r"Overall exposure level for mosaicd\.service: ([\d.]+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= 4.2  # docs/deployment.md quotes it


def project_with_model(
    box: Box, user: str, name: str, class_text: str, model: str, **keys: object
) -> tuple[str, str]:
    """`user`'s project whose only model is the class `model` of `class_text` (formatted with
    {mlp}: the example's mlp.py), given `keys` besides length and width; the class file is
    `user`'s."""
    config, db = _project(box, user, name, umask=None)
    directory = Path(config).parent
    probe = directory / f"{model}.py"
    probe.write_text(class_text.format(mlp=str(EXAMPLE / "mlp.py")))
    text = Path(config).read_text()
    extra = "".join(f"{key} = {value}\n" for key, value in keys.items())
    text = re.sub(r"\[mlp_funnel\].*", "", text, flags=re.S) + (
        f"\n[{model}]\ntype = mlp\nclass = {model}\npath_to_class = {probe}\n"
        f"length = 2\nwidth = 3\n{extra}key = mlp_{{class}}\n"
    )
    Path(config).write_text(text)
    os.chown(probe, _uid(box, user), -1)
    return config, db
