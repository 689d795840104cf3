"""The worker pool under stress: slots and devices, crashes, timeouts, retries, isolation.

Every test drives a real mosaicd with real workers training tiny models; the misbehaving user
classes below are written into the test's directory and loaded by the workers like any user
code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import ini
import pytest
from conftest import Daemon, query

from mosaicd.executors import base as executor

# Models that misbehave on purpose. Each prints a marker first, so the test can check that the
# run's last log lines reach return_status.
PROBES = '''
import ctypes
import json
import os
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class _Base(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_size, output_size), nn.Sigmoid())

    def forward(self, data, run_info, module_info):
        self.hook(run_info)
        return self.net(data)

    def hook(self, run_info):
        pass

    def info(self):
        return {}


class good(_Base):
    pass


class segfault(_Base):
    def hook(self, run_info):
        print("probe: reading address 0", flush=True)
        ctypes.string_at(0)


class exit3(_Base):
    def hook(self, run_info):
        print("probe: calling os._exit(3)", flush=True)
        os._exit(3)


class sleeper(_Base):
    def hook(self, run_info):
        print(f"probe: sleeping in pid {os.getpid()}", flush=True)
        for _ in range(600):  # bounded: a stuck test must not hang the daemon's shutdown long
            time.sleep(0.1)


class raises(_Base):
    def hook(self, run_info):
        raise ValueError("probe: a plain Python error")


class crash_once(_Base):
    """Crashes its worker on the first attempt only (a marker file remembers the attempt)."""

    def hook(self, run_info):
        marker = os.path.join(HERE, f"crashed_{run_info['run_id']}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            print("probe: first attempt, crashing", flush=True)
            os._exit(3)


class slow(_Base):
    def hook(self, run_info):
        print(f"probe: epoch {run_info['epoch']}", flush=True)
        time.sleep(0.1)


class polluter(_Base):
    """Changes every piece of process-global state a run can reach."""

    def hook(self, run_info):
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        os.chdir("/")
        os.environ["MOSAIC_PROBE_POLLUTED"] = "1"
        sys.path.insert(0, "/polluted")
        torch.set_float32_matmul_precision("medium")


class recorder(_Base):
    """Records the global state it finds, and the process it runs in."""

    def __init__(self, input_size, output_size, run_id):
        seen = {
            "dtype": str(torch.get_default_dtype()),
            "threads": torch.get_num_threads(),
            "cwd": os.getcwd(),
            "polluted_env": "MOSAIC_PROBE_POLLUTED" in os.environ,
            "polluted_path": "/polluted" in sys.path,
            "matmul_precision": torch.get_float32_matmul_precision(),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "user_modules": sorted(m for m in sys.modules if m.startswith("mosaic_user_")
                                   and not m.endswith("_probes")),
        }
        with open(os.path.join(HERE, f"seen_{run_id}.json"), "w") as fh:
            json.dump(seen, fh)
        super().__init__(input_size, output_size)
'''


def project(
    root: Path,
    models: list[str],
    epochs: int = 1,
    monitor: str = "",
    name: str = "config.ini",
    need_gpu: str = "false",
    gpu_available: str = "None",
    nb_processus: int = 1,
    multiplicity: int = 1,
) -> Path:
    """A config whose pipelines are dataset_OR followed by each probe model, in this order."""
    sections = [
        ini.user_class(f"{model}_{i}", "model", f"{root}/probes.py", f"{model}_{i}", cls=model)
        for i, model in enumerate(models)
    ]
    path = ini.write(
        root,
        ini.process(root, epochs, pipeline_scheme="model"),
        ini.monitor(
            nb_processus,
            multiplicity,
            need_gpu=need_gpu,
            gpu_available=gpu_available,
            extra=monitor,
        ),
        ini.dataset(40, 0.5, 10, key="data"),
        *sections,
        files={"probes.py": PROBES},
    )
    return path.rename(root / name)


def submit(daemon: Daemon, config: Path, db: str) -> list[int]:
    result = daemon.cli("run", str(config), db, check=True)
    match = re.search(r"as runs (\d+)(?:-(\d+))?", result.stdout)
    assert match, result.stdout
    first = int(match.group(1))
    return list(range(first, int(match.group(2) or first) + 1))


def runs(db: str) -> dict[int, tuple[str, str | None]]:
    return {
        r[0]: (r[1], r[2])
        for r in query(db, "SELECT run_id, status, return_status FROM runs ORDER BY run_id")
    }


def worker_pid_of(db: str, run_id: int, attempt: int = -1) -> int:
    """The worker pid a run was started on (the daemon writes it in the running event)."""
    details = [
        d
        for (d,) in query(
            db,
            "SELECT detail FROM run_events WHERE run_id=? AND "
            "to_status='running' ORDER BY event_id",
            run_id,
        )
    ]
    match = re.search(r"pid (\d+)", details[attempt])
    assert match, details
    return int(match.group(1))


def wait_running(daemon: Daemon, db: str, run_id: int, timeout: float = 60.0) -> dict:
    """The status entry of a worker once it runs run_id and the run has printed its marker."""
    deadline = time.monotonic() + timeout
    log = Path(db).parent / "runs" / f"output_{run_id}.log"
    while time.monotonic() < deadline:
        workers = [w for w in daemon.request("status", limit=0)["workers"] if w["run_id"] == run_id]
        if workers and log.exists() and "probe:" in log.read_text():
            return workers[0]
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not start in {timeout} s")


def wait_idle(daemon: Daemon, count: int, timeout: float = 120.0) -> list[dict]:
    """The workers, once `count` of them have started and wait for work."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = daemon.request("status", limit=0)["workers"]
        if len(workers) == count and all(w["state"] == "idle" for w in workers):
            return workers
        time.sleep(0.2)
    raise AssertionError(f"the {count} workers did not start in {timeout} s")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


# -- slots and devices -------------------------------------------------------------------------


def test_make_slots_and_worker_environment() -> None:
    slots = executor.make_slots(2, ["3", "5"], 2)
    assert [s.label for s in slots] == ["cpu 0", "cpu 1", "cuda:3", "cuda:3", "cuda:5", "cuda:5"]
    assert [s.device for s in slots] == ["cpu", "cpu"] + ["cuda:0"] * 4
    assert len(set(slots)) == len(slots)  # two slots on one GPU are still distinct
    envs = [executor.worker_environment(s, cpu_threads=3) for s in slots]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["", "", "3", "3", "5", "5"]
    assert all(e["MOSAIC_WORKER_SLOT"] == s.label for e, s in zip(envs, slots))


def test_gpu_workers_see_only_their_device(tmp: Path) -> None:
    # Fake GPU ids on a CPU machine: what is checked is the environment each worker gets,
    # and that a GPU submission is only ever dispatched to the slots it allows.
    d = Daemon(tmp, "--gpus", "3,5", "--runs-per-gpu", "2", workers=1).start()
    try:
        workers = wait_idle(d, 5)
        seen = sorted(
            (
                w["slot"],
                environ_of(w["pid"])["CUDA_VISIBLE_DEVICES"],
                environ_of(w["pid"])["MOSAIC_WORKER_SLOT"],
            )
            for w in workers
        )
        assert seen == [
            ("cpu 0", "", "cpu 0"),
            ("cuda:3", "3", "cuda:3"),
            ("cuda:3", "3", "cuda:3"),
            ("cuda:5", "5", "cuda:5"),
            ("cuda:5", "5", "cuda:5"),
        ]
        assert all(w["state"] == "idle" for w in workers)
        # A GPU submission limited to GPU 5: both runs go to cuda:5 slots (where, without a
        # real card, torch refuses the device), never to the CPU or to GPU 3.
        db = str(tmp / "gpu.db")
        cfg = project(
            tmp, ["good", "good"], need_gpu="true", gpu_available="cuda:5", nb_processus=2
        )
        ids = submit(d, cfg, db)
        d.wait_for(db, timeout=120)
        for run_id in ids:
            detail = query(
                db, "SELECT detail FROM run_events WHERE run_id=? AND to_status='running'", run_id
            )[0][0]
            assert detail.startswith("on cuda:5 "), detail
        assert {status for status, _ in runs(db).values()} == {"failed"}
    finally:
        d.stop()


def test_gpu_submission_refused_without_gpu_slots(daemon: Daemon, tmp: Path) -> None:
    db = tmp / "s.db"
    cfg = project(tmp, ["good"], need_gpu="true")
    result = daemon.cli("run", str(cfg), str(db))
    assert result.returncode != 0
    assert "needs a GPU" in result.stderr and "--gpus" in result.stderr, result.stderr
    assert not db.exists() or query(db, "SELECT count(*) FROM runs") == [(0,)]
    assert daemon.request("status", limit=0)["queued"] == 0


def test_submissions_share_the_pool_within_their_nb_processus(tmp: Path) -> None:
    d = Daemon(tmp, workers=3).start()
    try:
        db = str(tmp / "s.db")
        # All three slots ready first: on a loaded machine a worker still importing torch
        # would let the other submission's runs go one at a time.
        wait_idle(d, 3)
        # Queued while paused, so that both submissions compete for the pool from the start
        # (tiny runs would otherwise finish before the second submission arrives).
        d.cli("pause", check=True)
        one = submit(d, project(tmp, ["good"] * 4, epochs=2, nb_processus=1, name="one.ini"), db)
        two = submit(d, project(tmp, ["good"] * 4, epochs=2, nb_processus=2, name="two.ini"), db)
        d.cli("resume", check=True)
        assert d.wait_for(db, timeout=240)["done"] == 8
    finally:
        d.stop()
    events = query(
        db,
        "SELECT e.run_id, e.at, e.to_status, m.submission_id FROM run_events e "
        "JOIN run_meta m USING (run_id) ORDER BY e.at, e.event_id",
    )
    running: dict[int, set[int]] = {}
    peak: dict[int, int] = {}
    overall = 0
    for run_id, _, to_status, submission in events:
        current = running.setdefault(submission, set())
        if to_status == "running":
            current.add(run_id)
        else:
            current.discard(run_id)
        peak[submission] = max(peak.get(submission, 0), len(current))
        overall = max(overall, sum(len(s) for s in running.values()))
    by_run = dict(query(db, "SELECT run_id, submission_id FROM run_meta"))
    sub_one, sub_two = by_run[one[0]], by_run[two[0]]
    assert peak[sub_one] == 1
    assert peak[sub_two] == 2  # it used both of its processes, not just one
    assert overall == 3  # both submissions ran side by side on the 3 slots
    # Same check from the run_meta timestamps: never more than nb_processus overlapping.
    for sub, cap in ((sub_one, 1), (sub_two, 2)):
        spans = query(db, "SELECT started_at, finished_at FROM run_meta WHERE submission_id=?", sub)
        for start, _ in spans:
            overlapping = sum(1 for s, f in spans if s <= start < f)
            assert overlapping <= cap


# -- crashes, timeouts, retries ----------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["state", "process"])
def test_crashing_runs_fail_with_their_cause_and_the_next_runs_complete(
    tmp: Path, isolation: str
) -> None:
    d = Daemon(tmp, "--isolation", isolation, workers=1).start()
    try:
        db = str(tmp / "s.db")
        ids = submit(d, project(tmp, ["segfault", "exit3", "raises", "good", "good"]), db)
        counts = d.wait_for(db, total=5, timeout=240)
        assert counts["failed"] == 3 and counts["done"] == 2
        status = d.request("status", limit=0)
    finally:
        d.stop()
    result = runs(db)
    segv, exit3, raised = (result[i][1] or "" for i in ids[:3])
    assert "killed by SIGSEGV" in segv and "probe: reading address 0" in segv, segv
    assert "exited with code 3" in exit3 and "probe: calling os._exit(3)" in exit3, exit3
    assert "ValueError: probe: a plain Python error" in raised, raised
    assert [result[i][0] for i in ids[3:]] == ["done", "done"]
    # Each failure cost its worker: the runs after a failure started on a fresh process.
    pids = [worker_pid_of(db, i) for i in ids]
    assert len(set(pids[:4])) == 4, pids
    assert pids[3] == pids[4]  # a done run does not recycle its worker
    assert len(status["workers"]) == 1 and status["workers"][0]["pid"] == pids[4]


def test_run_killed_from_outside_fails_and_the_pool_carries_on(tmp: Path) -> None:
    d = Daemon(tmp, workers=1).start()
    try:
        db = str(tmp / "s.db")
        ids = submit(d, project(tmp, ["sleeper", "good"]), db)
        worker = wait_running(d, db, ids[0])
        os.kill(worker["pid"], signal.SIGKILL)
        d.wait_for(db, total=2, timeout=120)
    finally:
        d.stop()
    result = runs(db)
    text = result[ids[0]][1] or ""
    assert result[ids[0]][0] == "failed"
    assert "killed by SIGKILL" in text and f"pid {worker['pid']}" in text, text
    assert "probe: sleeping in pid" in text, text
    assert result[ids[1]][0] == "done"
    assert worker_pid_of(db, ids[1]) != worker["pid"]


def test_run_over_its_timeout_is_stopped(tmp: Path) -> None:
    d = Daemon(tmp, workers=1).start()
    try:
        db = str(tmp / "s.db")
        slow = submit(d, project(tmp, ["sleeper"], monitor="timeout = 2", name="slow.ini"), db)
        fine = submit(d, project(tmp, ["good"], name="fine.ini"), db)
        started = time.monotonic()
        d.wait_for(db, total=2, timeout=120)
        assert time.monotonic() - started < 60  # the sleeper would sleep for 60 s
    finally:
        d.stop()
    result = runs(db)
    status, text = result[slow[0]]
    assert status == "failed"
    assert "timed out after 2 s (MONITOR timeout)" in (text or ""), text
    # On a loaded machine the run may not have printed anything in 2 s; whatever it printed
    # is in return_status.
    assert "last lines of the run's output:" in (text or ""), text
    log = tmp / "runs" / f"output_{slow[0]}.log"
    printed = log.read_text().strip().splitlines() if log.exists() else []
    if printed:
        assert printed[-1] in (text or ""), text
    assert result[fine[0]][0] == "done"
    started_at, finished_at = query(
        db, "SELECT started_at, finished_at FROM run_meta WHERE run_id=?", slow[0]
    )[0]
    assert 2 <= finished_at - started_at < 30


def test_retries_requeue_a_run_that_crashed_its_worker(tmp: Path) -> None:
    d = Daemon(tmp, workers=1).start()
    try:
        db = str(tmp / "s.db")
        retried = submit(
            d, project(tmp, ["crash_once"], monitor="retries = 1", name="retried.ini"), db
        )
        no_retry = submit(d, project(tmp, ["exit3"], name="once.ini"), db)
        d.wait_for(db, total=2, timeout=120)
    finally:
        d.stop()
    result = runs(db)
    assert result[retried[0]][0] == "done"
    assert query(db, "SELECT attempts FROM run_meta WHERE run_id=?", retried[0]) == [(2,)]
    path = [
        (s, d)
        for s, d in query(
            db,
            "SELECT to_status, detail FROM run_events WHERE run_id=? ORDER BY event_id",
            retried[0],
        )
    ]
    assert [s for s, _ in path] == ["queued", "running", "queued", "running", "done"]
    assert "exited with code 3; retrying" in path[2][1]
    # Without retries, the same crash fails the run at once.
    assert result[no_retry[0]][0] == "failed"
    assert query(db, "SELECT attempts FROM run_meta WHERE run_id=?", no_retry[0]) == [(1,)]


# -- isolation and recycling -------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["state", "process"])
def test_global_state_changes_do_not_reach_the_next_run(tmp: Path, isolation: str) -> None:
    d = Daemon(tmp, "--isolation", isolation, workers=1).start()
    try:
        db = str(tmp / "s.db")
        ids = submit(d, project(tmp, ["recorder", "polluter", "recorder"]), db)
        d.wait_for(db, total=3, timeout=120)
        worker_pid = d.request("status", limit=0)["workers"][0]["pid"]
    finally:
        d.stop()
    assert [s for s, _ in runs(db).values()] == ["done", "done", "done"]
    before = json.loads((tmp / f"seen_{ids[0]}.json").read_text())
    after = json.loads((tmp / f"seen_{ids[2]}.json").read_text())
    assert before["dtype"] == "torch.float32" and before["matmul_precision"] == "highest"
    assert not before["polluted_env"] and not before["polluted_path"]
    for key in ("dtype", "threads", "cwd", "polluted_env", "polluted_path", "matmul_precision"):
        assert after[key] == before[key], key
    # The user modules of earlier runs are gone too.
    assert after["user_modules"] == [
        m for m in after["user_modules"] if m.startswith(f"mosaic_user_{ids[2]}_")
    ]
    pids = {worker_pid_of(db, i) for i in ids}
    assert pids == {worker_pid}  # one worker served all three: the state was restored, not
    if isolation == "state":  # left behind with a recycled process
        assert before["pid"] == after["pid"] == worker_pid
    else:
        # Each run had a process of its own, forked from the worker.
        assert before["ppid"] == after["ppid"] == worker_pid
        assert len({before["pid"], after["pid"], worker_pid}) == 3


def test_process_isolation_parks_and_resumes_a_run(tmp: Path) -> None:
    # The park request reaches a forked run through its worker (as SIGUSR1), and the parked
    # message comes back through the pipe.
    d = Daemon(tmp, "--isolation", "process", workers=1).start()
    try:
        db = str(tmp / "s.db")
        ids = submit(d, project(tmp, ["slow"], epochs=30), db)
        wait_running(d, db, ids[0])
        d.cli("pause", "--now", check=True)
        d.wait_for(db, states=("paused",), timeout=60)
        d.cli("resume", check=True)
        d.wait_for(db, total=1, timeout=120)
    finally:
        d.stop()
    assert runs(db)[ids[0]][0] == "done"
    assert query(db, "SELECT epochs FROM run_results WHERE run_id=?", ids[0]) == [(30,)]
    details = [
        x
        for (x,) in query(
            db,
            "SELECT detail FROM run_events WHERE run_id=? AND "
            "to_status IN ('paused', 'running') ORDER BY event_id",
            ids[0],
        )
    ]
    assert details[1].startswith("parked at epoch "), details
    parked_at = int(details[1].split()[-1])
    assert 0 < parked_at < 30
    assert details[2].endswith(f"from epoch {parked_at}"), details


def test_workers_are_recycled_after_max_runs(tmp: Path) -> None:
    d = Daemon(tmp, "--max-runs-per-worker", "2", workers=1).start()
    try:
        db = str(tmp / "s.db")
        ids = submit(d, project(tmp, ["good"] * 5), db)
        d.wait_for(db, total=5, timeout=180)
    finally:
        d.stop()
    pids = [worker_pid_of(db, i) for i in ids]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids


def test_status_shows_each_workers_resources(daemon: Daemon, tmp: Path) -> None:
    db = str(tmp / "s.db")
    ids = submit(daemon, project(tmp, ["sleeper"]), db)
    busy = wait_running(daemon, db, ids[0])
    assert busy["rss"] > 50 * 2**20  # a worker holds torch: tens of MiB at least
    assert busy["cpu_percent"] is not None and busy["cpu_percent"] >= 0
    assert "gpu_memory" not in busy  # CPU slots have no GPU figures
    text = daemon.cli("status", check=True).stdout
    line = next(x for x in text.splitlines() if f"pid {busy['pid']}" in x)
    assert f"run {ids[0]}" in line and "MiB" in line and "%" in line, line
    daemon.cli("cancel", db, "-id", str(ids[0]), check=True)
    daemon.wait_for(db, timeout=60)


class BrokenTorchDaemon(Daemon):
    """A daemon whose workers find a torch that cannot be imported."""

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["PYTHONPATH"] = f"{self.root / 'fake'}{os.pathsep}{env['PYTHONPATH']}"
        return env


def test_workers_that_die_while_starting_are_retried_with_a_delay(tmp: Path) -> None:
    fake = tmp / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('probe: this torch is broken')\n")
    d = BrokenTorchDaemon(tmp, workers=1).start()
    try:
        time.sleep(6)
        assert d.request("ping")["pid"] == d.proc.pid  # the daemon itself is fine
        workers = d.request("status", limit=0)["workers"]
        log = d.log_path.read_text()
    finally:
        d.stop()
    assert "probe: this torch is broken" in log
    tries = log.count("while starting")
    # Without a delay a worker dying in well under a second would be restarted many times.
    assert 2 <= tries <= 5, log
    assert "exited with code 1 while starting (1 time(s) in a row); next try in 0.5 s" in log
    assert len(workers) <= 1
