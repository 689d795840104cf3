"""The core: a real mosaicd, the thin client, training, and the study database."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import ini
import msgpack
import pytest
import zmq
from conftest import REPO, RESULT_CRITERIA, Daemon, example_config, query

from mosaic_client import protocol

SEED_TABLES = {
    "system": ["param_name", "param_value"],
    "params": ["run_id", "param_name", "param_value"],
    "runs": ["run_id", "status", "pipeline", "return_status"],
    "run_results": ["run_id", *RESULT_CRITERIA],
}


def test_sweep_fills_the_seed_tables(daemon: Daemon, tmp: Path) -> None:
    cfg = example_config(tmp, epochs=3, multiplicity=2, mlp_width="3, 4")
    db = str(tmp / "study.db")
    result = daemon.cli("run", str(cfg), db, "--follow", check=True)
    assert "queued 4 pipeline(s) as runs 1-4" in result.stdout
    assert "finished: 4 done, 0 failed" in result.stdout
    for table, columns in SEED_TABLES.items():
        info = query(db, f"PRAGMA table_info({table})")
        assert [row[1] for row in info] == columns
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "SELECT count(*), min(epochs), max(epochs) FROM run_results") == [(4, 3, 3)]
    assert query(db, "SELECT count(*) FROM run_epochs") == [(12,)]
    assert query(db, "SELECT DISTINCT status FROM runs") == [("done",)]
    # The seed's params naming, typed values, and distinct seeds per repetition.
    params = dict(query(db, "SELECT param_name, param_value FROM params WHERE run_id=1"))
    assert params["lr"] == 0.01 and params["epochs"] == 3
    assert params["dataset_key"] == "data_dataset_OR"
    assert params["mlp_key"] == "mlp_mlp_funnel"
    assert params["mlp_funnel_width"] == 3
    assert json.loads(params["pipeline"])[1]["class"] == "mlp_funnel"
    seeds = [
        s
        for (s,) in query(
            db, "SELECT param_value FROM params WHERE param_name='seed' ORDER BY run_id"
        )
    ]
    assert seeds[0] != seeds[1]
    assert query(db, "SELECT pipeline FROM runs WHERE run_id=1")[0][0].startswith(
        "dataset_OR(200,0.8,20) | mlp_funnel("
    )
    # Files of SPEC §5.
    runs = tmp / "runs"
    for name in ("output_1.log", "history_1.pt", "model_mlp_funnel_1.pt", "run_info_1.mdt"):
        assert (runs / name).exists(), name
    assert "epoch 3/3" in (runs / "output_1.log").read_text()
    # Derived metrics are consistent with the stored history.
    train = [
        r[0] for r in query(db, "SELECT train_loss FROM run_epochs WHERE run_id=1 ORDER BY epoch")
    ]
    test = [
        r[0] for r in query(db, "SELECT test_loss FROM run_epochs WHERE run_id=1 ORDER BY epoch")
    ]
    overfit, trainability = query(
        db, "SELECT overfit, trainability FROM run_results WHERE run_id=1"
    )[0]
    assert trainability == pytest.approx(sum(test) / 3)
    spread = max(train + test) - min(train + test)
    assert overfit == pytest.approx(abs(test[-1] - train[-1]) / spread)


def test_same_seed_reproduces_the_numbers(daemon: Daemon, tmp: Path) -> None:
    a, b = tmp / "a", tmp / "b"
    a.mkdir()
    b.mkdir()
    for root in (a, b):
        cfg = example_config(root, epochs=2, seed=7)
        daemon.cli("run", str(cfg), str(root / "s.db"), check=True)
    for root in (a, b):
        daemon.wait_for(str(root / "s.db"))
    sql = "SELECT train_loss, test_loss, nb_params FROM run_results"
    assert query(a / "s.db", sql) == query(b / "s.db", sql)


def test_status_during_and_after(daemon: Daemon, tmp: Path) -> None:
    cfg = example_config(tmp, epochs=40, nb_processus=1, mlp_width="3, 4")
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, check=True)
    deadline = time.monotonic() + 60
    running: list[dict] = []
    while time.monotonic() < deadline and not running:
        status = daemon.request("status", db=db)
        running = [r for r in status["studies"][0]["running"] if r["epoch"] > 0]
        time.sleep(0.05)
    assert running and running[0]["epochs"] == 40
    assert running[0]["train_loss"] is not None
    text = daemon.cli("status", check=True).stdout
    assert "Running:" in text and "epoch " in text
    daemon.wait_for(db)
    status = json.loads(daemon.cli("status", "--json", check=True).stdout)
    assert status["studies"][0]["counts"]["done"] == 2
    assert {r["run_id"] for r in status["studies"][0]["done"]} == {1, 2}


RAISING = """
import torch

class broken(torch.nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.lin = torch.nn.Linear(input_size, output_size)
    def forward(self, data, run_info, module_info):
        raise RuntimeError("deliberate failure in forward")
    def info(self):
        return {}

class needs_depth(torch.nn.Module):
    def __init__(self, input_size, depth):
        super().__init__()
        self.lin = torch.nn.Linear(input_size, 1)
    def forward(self, data, run_info, module_info):
        return torch.sigmoid(self.lin(data))
    def info(self):
        return {}
"""


def _two_model_config(root: Path, model_class: str) -> Path:
    return ini.write(
        root,
        ini.process(root, 2, seed=1),
        ini.monitor(),
        ini.dataset(100, key="data"),
        ini.user_class(model_class, "mlp", f"{root}/models.py", "bad"),
        ini.mlp(2, 3, key="good"),
        files={"models.py": RAISING},
    )


def test_a_raising_class_fails_only_its_run(daemon: Daemon, tmp: Path) -> None:
    cfg = _two_model_config(tmp, "broken")
    db = str(tmp / "s.db")
    result = daemon.cli("run", str(cfg), db, "--follow")
    assert result.returncode == 1  # a failed run makes --follow exit 1
    rows = dict(query(db, "SELECT pipeline, status FROM runs"))
    assert sorted(rows.values()) == ["done", "failed"]
    (traceback,) = query(db, "SELECT return_status FROM runs WHERE status='failed'")[0]
    assert "deliberate failure in forward" in traceback
    assert "Traceback" in traceback and "models.py" in traceback
    status = daemon.cli("status", check=True).stdout
    assert "deliberate failure" in status


def test_missing_constructor_parameter_is_named(daemon: Daemon, tmp: Path) -> None:
    cfg = _two_model_config(tmp, "needs_depth")
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, "--follow")
    (message,) = query(db, "SELECT return_status FROM runs WHERE status='failed'")[0]
    assert "needs_depth" in message and "depth" in message
    assert "section [needs_depth]" in message
    assert query(db, "SELECT count(*) FROM runs WHERE status='done'") == [(1,)]


def test_edited_class_is_picked_up_by_the_next_run(daemon: Daemon, tmp: Path) -> None:
    model = """
import torch

class tiny(torch.nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.lin = torch.nn.Linear(input_size, output_size)
        print("VERSION {v}")
    def forward(self, data, run_info, module_info):
        return torch.sigmoid(self.lin(data))
    def info(self):
        return {{}}
"""
    cfg = ini.write(
        tmp,
        ini.process(tmp, 1, seed=None),
        ini.monitor(1),
        ini.dataset(40, 0.5, 10, key="data"),
        ini.user_class("tiny", "mlp", f"{tmp}/models.py", "tiny"),
        files={"models.py": model.format(v=1)},
    )
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    (tmp / "models.py").write_text(model.format(v=2))
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    assert "VERSION 1" in (tmp / "runs" / "output_1.log").read_text()
    assert "VERSION 2" in (tmp / "runs" / "output_2.log").read_text()


def test_second_daemon_on_the_same_socket_is_refused(daemon: Daemon) -> None:
    result = subprocess.run(
        daemon.command(),
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon.env,
    )
    assert result.returncode == 1
    assert "already running" in result.stderr and daemon.socket in result.stderr
    assert daemon.request("ping")["pid"] == daemon.proc.pid  # type: ignore[union-attr]


def _raw(daemon: Daemon, *frames: bytes) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"ipc://{daemon.socket}")
    try:
        sock.send_multipart(list(frames))
        assert sock.poll(10000), "the daemon did not answer"
        reply = sock.recv_multipart()
        return msgpack.unpackb(reply[-1], raw=False)
    finally:
        sock.close()


def test_bad_requests_get_error_replies(daemon: Daemon) -> None:
    unknown = _raw(daemon, b"", msgpack.packb({"v": 1, "type": "explode", "args": {}}))
    assert unknown["ok"] is False and unknown["error"]["code"] == "unknown_request"
    garbage = _raw(daemon, b"", b"\xc1\xff not msgpack")
    assert garbage["error"]["code"] == "bad_message"
    version = _raw(daemon, b"", msgpack.packb({"v": 99, "type": "ping", "args": {}}))
    assert version["error"]["code"] == "bad_version"
    wrong = _raw(daemon, b"", msgpack.packb({"v": 1, "type": "status", "args": {"limit": "x"}}))
    assert wrong["error"]["code"] == "bad_arguments" and "limit" in wrong["error"]["message"]
    frames = _raw(daemon, b"a", b"b", b"c")
    assert frames["error"]["code"] == "bad_message"
    assert daemon.request("ping")["version"] == protocol.PROTOCOL_VERSION


def test_no_daemon_says_how_to_start_one(tmp: Path) -> None:
    d = Daemon(tmp)  # never started
    result = d.cli("status")
    assert result.returncode == 3
    assert "no mosaicd answers" in result.stderr and "mosaicd" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_autostarts_a_daemon_that_outlives_the_client(tmp: Path) -> None:
    d = Daemon(tmp)
    cfg = example_config(tmp, epochs=1)
    db = str(tmp / "s.db")
    try:
        result = d.cli("run", str(cfg), db, "--follow", check=True)
        assert "started mosaicd" in result.stderr
        assert d.request("ping")["pid"] > 0
        assert query(db, "SELECT status FROM runs") == [("done",)]
        refused = d.cli("run", str(cfg), db, "--no-autostart")
        assert refused.returncode == 0  # a daemon is running now
    finally:
        d.cli("shutdown")


def test_no_autostart_fails_cleanly(tmp: Path) -> None:
    d = Daemon(tmp)
    cfg = example_config(tmp, epochs=1)
    result = d.cli("run", str(cfg), str(tmp / "s.db"), "--no-autostart")
    assert result.returncode == 3 and "no mosaicd answers" in result.stderr
    assert not (tmp / "s.db").exists()


def test_bad_config_queues_nothing(daemon: Daemon, tmp: Path) -> None:
    cfg = example_config(tmp, epochs=1)
    db = str(tmp / "s.db")
    daemon.cli("run", str(cfg), db, "--follow", check=True)
    cfg.write_text(
        cfg.read_text()
        .replace("lr = 0.01", "lr = fast")
        .replace("multiplicity = 1", "multiplicity = 0")
    )
    result = daemon.cli("run", str(cfg), db)
    assert result.returncode == 2
    assert "lr" in result.stderr and "multiplicity" in result.stderr
    assert "nothing was queued" in result.stderr
    assert query(db, "SELECT count(*) FROM runs") == [(1,)]


def test_client_imports_neither_torch_nor_matplotlib() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import mosaic_client.cli"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    modules = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if "|" in line
    }
    assert "torch" not in modules and "matplotlib" not in modules


def test_daemon_main_process_does_not_import_torch(daemon: Daemon) -> None:
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()  # type: ignore[union-attr]
    assert "libtorch" not in maps
