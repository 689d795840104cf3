"""`mosaicd --executor ray`: the same runs, database, control and crash handling on Ray actors.

One Ray-backed daemon serves the whole module (Ray takes seconds to start): a local Ray with 2
CPUs started by the daemon, its workers connected over tcp (the multi-node set-up of
docs/cluster.md, on one machine). Each test uses its own study directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Daemon, example_config, query

from mosaic_client.protocol import ProtocolError

METRICS = (
    "train_loss, test_loss, train_acc, test_acc, nb_params, epochs, overfit, trainability, slope"
)


@pytest.fixture(scope="module")
def ray_daemon() -> Iterator[Daemon]:
    root = Path(tempfile.mkdtemp(prefix="mosray-"))
    d = Daemon(root, "--executor", "ray", "--worker-bind", "tcp://127.0.0.1:*", workers=2)
    try:
        d.start(wait=180)
        wait_workers(d, 2)
        yield d
    finally:
        d.stop(timeout=90)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def study(ray_daemon: Daemon) -> Path:
    # Short: ipc socket paths under it (a second daemon's) must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="t", dir=ray_daemon.root))
    return path


def wait_workers(
    d: Daemon, count: int, timeout: float = 120, gone: str | None = None
) -> list[dict[str, Any]]:
    """Wait until `count` workers are idle or busy (their actors are up), none of them the
    worker `gone`; return them."""
    deadline = time.monotonic() + timeout
    workers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        workers = d.request("status", limit=0)["workers"]
        if (
            len(workers) == count
            and all(w["state"] in ("idle", "busy") for w in workers)
            and gone not in {w["id"] for w in workers}
        ):
            return workers
        time.sleep(0.2)
    raise AssertionError(f"the Ray workers did not come up: {workers}")


def slow_config(root: Path, epochs: int, seed: int = 5, extra_monitor: str = "") -> Path:
    """One run whose epochs take long enough (~0.1 s) to be caught mid-way."""
    cfg = example_config(root, epochs=epochs, seed=seed, extra_monitor=extra_monitor)
    cfg.write_text(
        cfg.read_text()
        .replace("data_size = 200", "data_size = 3000")
        .replace("batch_size = 20", "batch_size = 10")
        .replace("length = 2", "length = 3")
        .replace("width = 3", "width = 8")
    )
    return cfg


def running(d: Daemon, db: str, at_least: int, timeout: float = 120) -> dict[str, Any]:
    """The running run of the study once it has reached epoch `at_least`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = d.request("status", db=db)
        for run in status["studies"][0]["running"] if status["studies"] else []:
            if run["epoch"] >= at_least:
                return run
        time.sleep(0.05)
    raise AssertionError(f"no run of {db} reached epoch {at_least}")


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {state: n for state, n in counts.items() if n}


def snapshot(db: str) -> dict[str, list[tuple[Any, ...]]]:
    """What a study holds, but for what legitimately differs between two daemons: timings
    and the workers' names."""
    return {
        "runs": query(
            db, "SELECT run_id, status, pipeline, return_status FROM runs ORDER BY run_id"
        ),
        "results": query(db, f"SELECT run_id, {METRICS} FROM run_results ORDER BY run_id"),
        "epochs": query(
            db,
            "SELECT run_id, epoch, train_loss, test_loss, train_acc, test_acc "
            "FROM run_epochs ORDER BY run_id, epoch",
        ),
        "params": query(
            db, "SELECT run_id, param_name, param_value FROM params ORDER BY run_id, param_name"
        ),
        "meta": query(
            db,
            "SELECT run_id, modules, seed, epochs_target, checkpoint_epoch, "
            "attempts FROM run_meta ORDER BY run_id",
        ),
    }


# -- without Ray, and bad options: no Ray needed -------------------------------------------------


def mosaicd_fails(
    d: Daemon, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run mosaicd on d's socket and state with `args` only (no --workers, no --gpus)."""
    return subprocess.run(
        [sys.executable, "-m", "mosaicd", "--socket", d.socket, "--state-dir", d.state_dir, *args],
        env=env or d.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_ray_installed_the_daemon_says_how_to_install_it(tmp: Path) -> None:
    # A `ray` package that fails to import, first on the path: as if Ray were not installed.
    fake = tmp / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    d = Daemon(tmp)
    env = {**d.env, "PYTHONPATH": f"{tmp / 'noray'}{os.pathsep}{REPO}"}
    result = mosaicd_fails(d, "--executor", "ray", env=env)
    assert result.returncode != 0
    assert "pip install 'mosaic-compare[ray]'" in result.stderr, result.stderr
    assert not os.path.exists(d.socket)  # it never started serving

    for args, expected in (
        (["--ray-address", "auto"], "--ray-address needs --executor ray"),
        (["--executor", "ray", "--worker-bind", "0.0.0.0:5560"], "give a ZeroMQ endpoint"),
        (["--executor", "ray", "--ray-runtime-env", "[1]"], "must be a JSON object"),
    ):
        result = mosaicd_fails(d, *args)
        assert result.returncode != 0 and expected in result.stderr, (args, result.stderr)


def test_the_advertised_address_replaces_a_wildcard_host() -> None:
    from mosaicd.executors.ray_cluster import advertised_address

    assert advertised_address("tcp://0.0.0.0:5560", None, "10.0.0.7") == "tcp://10.0.0.7:5560"
    assert (
        advertised_address("tcp://0.0.0.0:5560", "tcp://head:5560", "10.0.0.7") == "tcp://head:5560"
    )
    assert advertised_address("tcp://10.0.0.2:41000", None, "10.0.0.7") == "tcp://10.0.0.2:41000"
    assert advertised_address("ipc:///tmp/x/w.sock", None, "10.0.0.7") == "ipc:///tmp/x/w.sock"


def test_runtime_env_reaches_the_workers_and_a_worker_that_cannot_start_is_retried_slowly(
    tmp: Path,
) -> None:
    # --ray-runtime-env's env_vars put a broken torch first on the workers' path (only
    # theirs: the daemon never imports torch): each actor fails at start-up, with its cause in
    # the daemon's log, and the slot is retried with a growing delay, not in a loop.
    broken = tmp / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('probe: this torch is broken')\n")
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": f"{tmp / 'broken'}{os.pathsep}{REPO}"}})
    d = Daemon(tmp, "--executor", "ray", "--ray-runtime-env", runtime_env, workers=1)
    try:
        d.start(wait=180)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "3 time(s) in a row" not in d.log_path.read_text():
            time.sleep(0.5)
        # No worker ever came up to take runs.
        assert all(w["state"] == "starting" for w in d.request("status", limit=0)["workers"])
    finally:
        d.stop(timeout=90)
    log = d.log_path.read_text()
    assert "failed in its Ray actor: ImportError: probe: this torch is broken" in log, log
    assert "while starting (3 time(s) in a row); next try in 2 s" in log, log


# -- the Ray-backed daemon ------------------------------------------------------------------------


def test_example_sweep_gives_the_same_database_as_the_local_pool(
    ray_daemon: Daemon, study: Path
) -> None:
    # Both daemons run the example from the same directory, as a user would: the stored
    # paths (classes, run files) are then the same too.
    shutil.copytree(
        REPO / "examples",
        study / "examples",
        ignore=shutil.ignore_patterns(".runs", "__pycache__", "*.db*"),
    )
    started = time.monotonic()
    ray_daemon.cli(
        "run",
        "examples/or_mlp/config.ini",
        "ray.db",
        "--follow",
        cwd=study,
        timeout=600,
        check=True,
    )
    ray_seconds = time.monotonic() - started
    ray_db = str(study / "ray.db")
    status = ray_daemon.request("status", db=ray_db, limit=0)
    assert nonzero(status["studies"][0]["counts"]) == {"done": 32}
    workers = status["workers"]
    assert len(workers) == 2 and all(w["pid"] > 0 and w["node"] for w in workers), workers
    # The workers are Ray actors: processes of Ray's, not children of the daemon.
    daemon_pid = ray_daemon.request("ping")["pid"]
    for pid in {w["pid"] for w in workers}:
        with open(f"/proc/{pid}/stat") as fh:
            assert int(fh.read().rsplit(")", 1)[1].split()[1]) != daemon_pid

    local = Daemon(study / "localdaemon", workers=2)
    (study / "localdaemon").mkdir()
    local.start()
    try:
        local.cli(
            "run",
            "examples/or_mlp/config.ini",
            "local.db",
            "--follow",
            cwd=study,
            timeout=600,
            check=True,
        )
    finally:
        local.stop()
    local_db = str(study / "local.db")
    ray_rows, local_rows = snapshot(ray_db), snapshot(local_db)
    assert len(ray_rows["results"]) == 32 and len(ray_rows["epochs"]) == 320
    for table in ray_rows:
        assert ray_rows[table] == local_rows[table], table
    assert ray_seconds < 300


def test_pause_now_and_resume_through_ray(ray_daemon: Daemon, study: Path) -> None:
    db = str(study / "s.db")
    ray_daemon.cli("run", str(slow_config(study, epochs=12)), db, check=True)
    running(ray_daemon, db, 2)
    try:
        ray_daemon.cli("pause", "--now", check=True)
        ray_daemon.wait_for(db, states=("paused",), timeout=120)
    finally:
        ray_daemon.cli("resume", check=True)
    (checkpoint,) = query(db, "SELECT checkpoint_epoch FROM run_meta")[0]
    assert 2 <= checkpoint < 12
    assert (study / "runs" / "checkpoint_1.pt").exists()
    assert nonzero(ray_daemon.wait_for(db, timeout=240)) == {"done": 1}
    events = [
        d
        for (d,) in query(
            db, "SELECT detail FROM run_events WHERE to_status='running' ORDER BY event_id"
        )
    ]
    assert len(events) == 2 and events[1].endswith(f"from epoch {checkpoint}"), events
    # Every epoch once, in order: the resumed run continued from its checkpoint.
    assert [e for (e,) in query(db, "SELECT epoch FROM run_epochs ORDER BY epoch")] == list(
        range(1, 13)
    )


def test_cancel_through_ray_kills_the_actor_and_a_fresh_one_takes_the_slot(
    ray_daemon: Daemon, study: Path
) -> None:
    db = str(study / "s.db")
    ray_daemon.cli("run", str(slow_config(study, epochs=200)), db, check=True)
    run = running(ray_daemon, db, 1)
    before = {w["id"]: w["pid"] for w in ray_daemon.request("status", limit=0)["workers"]}
    ray_daemon.cli("cancel", db, "-id", "1", check=True)
    assert nonzero(ray_daemon.wait_for(db, timeout=60)) == {"cancelled": 1}
    assert query(db, "SELECT status FROM runs") == [("cancelled",)]
    workers = wait_workers(ray_daemon, 2, gone=run["worker"])
    assert before[run["worker"]] not in {w["pid"] for w in workers}
    # The new actor trains: a later run in the same study completes.
    ray_daemon.cli("run", str(example_config(study, epochs=2)), db, check=True)
    ray_daemon.wait_for(db, total=2, timeout=120)
    assert query(db, "SELECT status FROM runs ORDER BY run_id") == [("cancelled",), ("done",)]


def test_a_killed_ray_actor_fails_its_run_or_retries_it(ray_daemon: Daemon, study: Path) -> None:
    db = str(study / "s.db")
    # Without retries: the run fails with Ray's cause, and the slot gets a new actor.
    ray_daemon.cli("run", str(slow_config(study, epochs=200)), db, check=True)
    run = running(ray_daemon, db, 1)
    pid = next(
        w["pid"]
        for w in ray_daemon.request("status", limit=0)["workers"]
        if w["id"] == run["worker"]
    )
    os.kill(pid, signal.SIGKILL)  # the actor's process dies, as on a lost node
    assert nonzero(ray_daemon.wait_for(db, timeout=120)) == {"failed": 1}
    (text,) = query(db, "SELECT return_status FROM runs WHERE run_id=1")[0]
    assert "Ray actor died" in text and f"pid {pid}" in text, text
    workers = wait_workers(ray_daemon, 2, gone=run["worker"])
    assert pid not in {w["pid"] for w in workers}

    # With MONITOR retries = 1: the same death puts the run back in the queue, and it completes.
    (study / "retry").mkdir()
    ray_daemon.cli(
        "run",
        str(slow_config(study / "retry", epochs=20, extra_monitor="retries = 1")),
        db,
        check=True,
    )
    run = running(ray_daemon, db, 1)
    assert run["run_id"] == 2
    pid = next(
        w["pid"]
        for w in ray_daemon.request("status", limit=0)["workers"]
        if w["id"] == run["worker"]
    )
    os.kill(pid, signal.SIGKILL)
    ray_daemon.wait_for(db, total=2, timeout=240)
    assert query(db, "SELECT status FROM runs ORDER BY run_id") == [("failed",), ("done",)]
    assert query(db, "SELECT attempts FROM run_meta WHERE run_id=2") == [(2,)]
    path = query(db, "SELECT to_status, detail FROM run_events WHERE run_id=2 ORDER BY event_id")
    assert [s for s, _ in path] == ["queued", "running", "queued", "running", "done"], path
    assert "Ray actor died" in path[2][1] and "retrying" in path[2][1], path


def test_relative_paths_are_refused_at_submit(ray_daemon: Daemon, study: Path) -> None:
    from mosaic_client.config import load_config

    db = str(study / "s.db")
    # What `mosaic run` sends, but with a relative class path, as only another client could.
    expanded = load_config(str(example_config(study, epochs=1)))
    good = expanded.pipelines[0]
    bad = [{**good[0], "path_to_class": "dataset.py"}, *good[1:]]
    submission = {
        "db": db,
        "config_path": expanded.config_path,
        "process": expanded.process,
        "monitor": expanded.monitor,
    }
    with pytest.raises(ProtocolError) as refused:
        ray_daemon.request("submit", **submission, pipelines=[bad])
    assert refused.value.code == "invalid"
    assert (
        "path_to_class of [dataset_OR] 'dataset.py' is a relative path" in refused.value.message
    ), refused.value.message
    assert not os.path.exists(db)  # nothing was stored
    # The same submission with absolute paths is accepted, and its run trains to done.
    assert ray_daemon.request("submit", **submission, pipelines=[good])["run_ids"] == [1]
    assert nonzero(ray_daemon.wait_for(db, timeout=120)) == {"done": 1}


def test_a_shared_daemons_ray_executor_refuses_other_users_runs() -> None:
    # Issue 24, item 7: Ray actors run as the cluster's user, so a run of another user (an
    # owner to switch to) is refused at submit, before anything is queued; the daemon's own
    # user (owner None) goes on to the path checks.
    from mosaicd.errors import Refused
    from mosaicd.executors.ray_cluster import RayPool
    from mosaicd.owners import Owner

    executor = object.__new__(RayPool)  # its checks need no cluster
    alice = Owner(1234, 1234, (1234,), "alice", "/home/alice")
    with pytest.raises(Refused, match="cannot run workers as alice") as refused:
        executor.check_submission({"run_files_path": "/srv/runs"}, [], alice)
    assert refused.value.code == "permission"
