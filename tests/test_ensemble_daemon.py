"""Ensembles through the real daemon (docs/ensembles.md): with `[MONITOR] ensemble = auto` the
repetitions of a pipeline train as one group on one worker, with the numbers of the same runs
trained one by one, and pause, cancel, a NaN and a killed daemon behave per member."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import ini
import pytest
from conftest import Daemon, example_config, query

EPOCHS = 6
MEMBERS = 4
REL = 1e-5
NUMBERS = "SELECT run_id, epoch, train_loss, test_loss, train_acc, test_acc FROM run_epochs"


def slow_group(root: Path, ensemble: str = "auto") -> tuple[Path, str]:
    """A study of one pipeline repeated MEMBERS times, epochs long enough to act between."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = example_config(
        root,
        epochs=EPOCHS,
        multiplicity=MEMBERS,
        nb_processus=1,
        extra_monitor=f"ensemble = {ensemble}",
        seed=7,
    )
    cfg.write_text(
        cfg.read_text()
        .replace("data_size = 200", "data_size = 1600")
        .replace("batch_size = 20", "batch_size = 10")
    )
    return cfg, str(root / "s.db")


def numbers(db: str) -> dict[tuple[int, int], tuple[float, ...]]:
    return {(r[0], r[1]): r[2:] for r in query(db, NUMBERS)}


def assert_close(
    got: dict[tuple[int, int], tuple[float, ...]], want: dict[tuple[int, int], tuple[float, ...]]
) -> None:
    assert got.keys() == want.keys()
    for key, values in want.items():
        for a, b in zip(got[key], values):
            assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-7), (key, got[key], values)


def epochs_of(db: str, run_id: int) -> list[int]:
    rows = query(db, "SELECT epoch FROM run_epochs WHERE run_id=? ORDER BY epoch", run_id)
    return [e for (e,) in rows]


def wait_epoch(daemon: Daemon, db: str, at_least: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = daemon.request("status", db=db)
        running = status["studies"][0]["running"] if status["studies"] else []
        if running and min(r["epoch"] for r in running) >= at_least:
            return status
        time.sleep(0.02)
    raise AssertionError(f"the group did not reach epoch {at_least}")


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mos-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(root: Path) -> Iterator[Daemon]:
    d = Daemon(root / "d").start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def reference(daemon: Daemon, root: Path) -> str:
    """The group trained without interruption (ensemble = auto); checked against `off`."""
    cfg, db = slow_group(root / "auto")
    off_cfg, off_db = slow_group(root / "off", ensemble="off")
    daemon.cli("run", str(cfg), db, check=True)
    daemon.cli("run", str(off_cfg), off_db, check=True)
    status = wait_epoch(daemon, db, 1)
    running = status["studies"][0]["running"]
    assert sorted(r["run_id"] for r in running) == [1, 2, 3, 4]
    assert all(r["group"] == [1, 2, 3, 4] for r in running)  # each with its own progress
    text = daemon.cli("status", "--db", db, check=True).stdout
    assert "[ensemble with 2,3,4]" in text and "[ensemble with 1,2,3]" in text
    # The worker's line names every member it trains, too.
    assert "runs 1,2,3,4" in text, text
    assert any(w.get("group") == [1, 2, 3, 4] for w in status["workers"]), status["workers"]
    daemon.wait_for(db)
    daemon.wait_for(off_db)
    assert query(db, "SELECT status FROM runs") == [("done",)] * MEMBERS
    assert query(off_db, "SELECT status FROM runs") == [("done",)] * MEMBERS
    assert_close(numbers(db), numbers(off_db))
    return db


def test_auto_trains_the_repetitions_as_one_group_with_the_numbers_of_off(
    daemon: Daemon, reference: str, root: Path
) -> None:
    db, off_db = reference, str(root / "off" / "s.db")
    assert query(db, "SELECT run_id, members, fallback FROM run_ensembles ORDER BY run_id") == [
        (run_id, "[1, 2, 3, 4]", None) for run_id in range(1, MEMBERS + 1)
    ]
    assert query(off_db, "SELECT count(*) FROM run_ensembles") == [(0,)]
    # One worker trained all four: the same worker in every member's start event.
    starts = query(db, "SELECT detail FROM run_events WHERE to_status='running'")
    assert len({d.split(" (worker ")[1].split(",")[0] for (d,) in starts}) == 1
    assert all("in an ensemble with runs [1, 2, 3, 4]" in d for (d,) in starts)
    shown = daemon.cli("show", "3", "--db", db, check=True).stdout
    assert "ensemble: trained together with runs 1, 2, 4 (one vmapped model)" in shown
    log = (root / "auto" / "runs" / "output_3.log").read_text()
    assert "[mosaic] run 3 trains in an ensemble with runs [1, 2, 3, 4]" in log
    # The OR example's MLP is Linear layers and activations: the batched forward trained it,
    # with the numbers of off (checked by the reference fixture).
    assert "[mosaic] ensemble forward: batched matmul" in log
    for run_id in range(1, MEMBERS + 1):
        assert epochs_of(db, run_id) == list(range(1, EPOCHS + 1))


def test_pause_now_and_resume_of_a_group_give_the_uninterrupted_numbers(
    daemon: Daemon, reference: str, root: Path
) -> None:
    cfg, db = slow_group(root / "paused")
    daemon.cli("run", str(cfg), db, check=True)
    wait_epoch(daemon, db, 2)
    # Straight to the socket: a client process's start-up (a second or more on a busy machine)
    # can outlast the group's last epochs. `pause --now`'s own output: tests/test_control.py.
    try:
        assert daemon.request("pause", now=True)["parking"] == MEMBERS
        daemon.wait_for(db, states=("paused",))
        parked = {run_id: len(epochs_of(db, run_id)) for run_id in range(1, MEMBERS + 1)}
    finally:
        daemon.request("resume")  # the module's daemon serves the next tests either way
    assert all(2 <= n < EPOCHS for n in parked.values()), parked
    daemon.wait_for(db)
    for run_id in range(1, MEMBERS + 1):
        assert epochs_of(db, run_id) == list(range(1, EPOCHS + 1))
        events = query(db, "SELECT to_status FROM run_events WHERE run_id=?", run_id)
        assert [e for (e,) in events] == [
            "queued",
            "running",
            "paused",
            "queued",
            "running",
            "done",
        ]
    assert_close(numbers(db), numbers(reference))


def test_cancelling_a_member_leaves_the_others_identical(
    daemon: Daemon, reference: str, root: Path
) -> None:
    cfg, db = slow_group(root / "cancel")
    daemon.cli("run", str(cfg), db, check=True)
    before = wait_epoch(daemon, db, 2)
    result = daemon.cli("cancel", db, "-id", "2", check=True)
    assert "cancelled 1 run(s): 2" in result.stdout
    daemon.wait_for(db)
    assert dict(query(db, "SELECT run_id, status FROM runs")) == {
        1: "done",
        2: "cancelled",
        3: "done",
        4: "done",
    }
    assert 2 <= len(epochs_of(db, 2)) < EPOCHS
    # The worker was not killed (that would have taken the whole group).
    after = daemon.request("status")
    assert {w["pid"] for w in before["workers"]} == {w["pid"] for w in after["workers"]}
    want = {k: v for k, v in numbers(reference).items() if k[0] != 2}
    assert_close({k: v for k, v in numbers(db).items() if k[0] != 2}, want)


CLASSES = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class points:
    def __init__(self, n, nan_seed):
        self.n, self.nan_seed = n, nan_seed

    def prepare(self, data, run_info, module_info):
        x = torch.randn(self.n, 2)
        y = (x.sum(dim=1, keepdim=True) > 0).float()
        if run_info["seed"] == self.nan_seed:
            x[:] = float("nan")
        k = self.n * 3 // 4
        return (DataLoader(TensorDataset(x[:k], y[:k]), batch_size=10, shuffle=True),
                DataLoader(TensorDataset(x[k:], y[k:]), batch_size=10))

    def info(self):
        return {"input_size": 2, "output_size": 1}


class bn_mlp(nn.Module):
    def __init__(self, input_size, output_size, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_size, width), nn.BatchNorm1d(width),
                                 nn.ReLU(), nn.Linear(width, output_size))

    def forward(self, data, run_info, module_info):
        return self.net(data)

    def info(self):
        return {}

    def save_model(self, path):
        torch.save(self.state_dict(), path + ".pt")
"""


def small_project(root: Path, model: str, nan_seed: int) -> tuple[Path, str]:
    root.mkdir(parents=True, exist_ok=True)
    classes = f"{root}/classes.py"
    model_section = (
        ini.user_class("bn_mlp", "mlp", classes, "bn", width=4)
        if model == "bn"
        else ini.mlp(2, 3, key="mlp")
    )
    cfg = ini.write(
        root,
        ini.process(root, 3, loss_function="MSELoss"),
        ini.monitor(1, MEMBERS),
        ini.user_class(
            "points", "dataset", f"{root}/classes.py", "points", n=80, nan_seed=nan_seed
        ),
        model_section,
        files={"classes.py": CLASSES},
    )
    return cfg, str(root / "s.db")


def test_a_member_with_a_nan_loss_fails_alone(daemon: Daemon, root: Path) -> None:
    cfg, db = small_project(root / "nan", "mlp", nan_seed=2)  # seeds 0..3: run 3
    daemon.cli("run", str(cfg), db, check=True)
    daemon.wait_for(db)
    assert dict(query(db, "SELECT run_id, status FROM runs")) == {
        1: "done",
        2: "done",
        3: "failed",
        4: "done",
    }
    (failure,) = query(db, "SELECT return_status FROM runs WHERE run_id=3")
    assert "loss is not finite at epoch 1" in failure[0]
    assert query(db, "SELECT fallback FROM run_ensembles") == [(None,)] * MEMBERS
    for run_id in (1, 2, 4):
        assert epochs_of(db, run_id) == [1, 2, 3]


def test_a_group_that_cannot_be_vmapped_falls_back_and_show_says_why(
    daemon: Daemon, root: Path
) -> None:
    cfg, db = small_project(root / "bn", "bn", nan_seed=-1)
    daemon.cli("run", str(cfg), db, check=True)
    daemon.wait_for(db)
    assert query(db, "SELECT status FROM runs") == [("done",)] * MEMBERS
    reasons = {r for (r,) in query(db, "SELECT fallback FROM run_ensembles")}
    assert len(reasons) == 1
    (reason,) = reasons
    assert reason and "BatchNorm" in reason
    shown = daemon.cli("show", "2", "--db", db, check=True).stdout
    assert f"ensemble: sent with runs 1, 3, 4, trained individually: {reason}" in shown
    as_json = json.loads(daemon.cli("show", "2", "--db", db, "--json", check=True).stdout)
    assert as_json["group"] == {"members": [1, 2, 3, 4], "fallback": reason}
    log = (root / "bn" / "runs" / "output_2.log").read_text()
    assert "not used: " + reason in log
    for run_id in range(1, MEMBERS + 1):
        assert epochs_of(db, run_id) == [1, 2, 3]


def test_kill_9_of_the_daemon_mid_group_resumes_every_member_once(
    reference: str, tmp: Path
) -> None:
    # Process isolation: the group trains in a child the worker forks.
    d = Daemon(tmp, "--checkpoint-every", "0", "--isolation", "process", workers=1)
    cfg, db = slow_group(tmp / "study")
    d.start()
    try:
        d.cli("run", str(cfg), db, check=True)
        wait_epoch(d, db, 2)
        d.kill9()
        assert query(db, "SELECT DISTINCT status FROM runs") == [("running",)]
        d.start()
        d.wait_for(db)
    finally:
        d.stop()
    for run_id in range(1, MEMBERS + 1):
        assert epochs_of(db, run_id) == list(range(1, EPOCHS + 1))
        done = query(
            db, "SELECT count(*) FROM run_events WHERE run_id=? AND to_status='done'", run_id
        )
        assert done == [(1,)]
    assert query(db, "SELECT status FROM runs") == [("done",)] * MEMBERS
    assert_close(numbers(db), numbers(reference))


# -- the dispatch's pure parts ----------------------------------------------------------------


def test_group_size_depends_on_the_study_only() -> None:
    from mosaicd.scheduling.ensemble_groups import group_size

    assert group_size(16, 16) == 16
    assert group_size(40, 16) == 16  # then 16 and 8
    assert group_size(5, 16) == 5
    assert group_size(1, 16) == 1  # a single run trains alone
    assert group_size(16, 1) == 1  # ensemble_max = 1: never grouped
    assert group_size(16, 4) == 4


def test_the_queue_gives_up_only_matching_runs_within_its_window(tmp_path: Path) -> None:
    from mosaicd.scheduling.run_queue import RunQueue
    from mosaicd.scheduling.submissions import Submission
    from mosaicd.storage.identity import Identities
    from mosaicd.storage.state import DaemonState
    from mosaicd.storage.store import RunRecord

    queue = RunQueue(Identities(DaemonState(str(tmp_path / "state")), shared=False))
    submission = Submission("s.db", 1, None, None, {}, {})
    queue._submissions[("s.db", 1)] = submission
    for run_id in range(1, 9):
        record = RunRecord(run_id, 1, [], run_id, 3, 0, 0, run_id)
        queue._queues.setdefault(("s.db", 1), deque()).append(record)
    even = lambda r: r.run_id % 2 == 0  # noqa: E731
    assert queue.count_queued(submission, even, window=5) == 2
    taken = queue.take_queued(submission, even, window=6, limit=2)
    assert [r.run_id for r in taken] == [2, 4]
    assert [r.run_id for r in next(iter(queue.waiting()))[1]] == [1, 3, 5, 6, 7, 8]
    assert queue.take_queued(submission, lambda r: True, window=100, limit=100)
    assert queue.total() == 0 and queue.take_queued(submission, even, 5, 5) == []
