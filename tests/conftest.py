"""Shared fixtures: a real mosaicd on a temporary socket, and helpers to drive the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ini
import pytest
from ini import EXAMPLE

from mosaic_client.connection import Client, DaemonUnavailable

REPO = Path(__file__).resolve().parent.parent

# The columns of run_results after run_id: what every run's result is measured by.
RESULT_CRITERIA = (
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "nb_params",
    "duration(s)",
    "epochs",
    "overfit",
    "trainability",
    "slope",
    # What the run cost (issue 26; the interface is fixed: these names, this order).
    "flops_per_sample",
    "train_seconds",
    "cpu_seconds",
    "peak_memory_mb",
    "latency_ms",
    "throughput_per_s",
    "energy_j",
    # the validation loader's, when a data stage gives one (docs/tuning.md; schema 10)
    "val_loss",
    "val_acc",
)


class Daemon:
    """A mosaicd process on a private socket and state directory."""

    def __init__(self, root: Path, *extra: str, workers: int = 2) -> None:
        self.root = root
        # The daemon's own files live apart from the study files the tests write: the daemon
        # refuses to put a client's database inside its own directories.
        self.socket = str(root / "daemon" / "d.sock")
        self.state_dir = str(root / "daemon" / "state")
        self.extra = list(extra)
        self.workers = workers
        # A command that starts the daemon's Python, e.g. setpriv with fewer capabilities.
        self.prefix: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "mosaicd.log"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MOSAIC_SOCKET"] = self.socket
        env["MOSAIC_STATE_DIR"] = self.state_dir
        env["PYTHONPATH"] = str(REPO)
        return env

    def command(self) -> list[str]:
        """The mosaicd command line of this daemon (its socket, state, workers, options)."""
        return [
            *self.prefix,
            sys.executable,
            "-m",
            "mosaicd",
            "--socket",
            self.socket,
            "--state-dir",
            self.state_dir,
            "--workers",
            str(self.workers),
            "--gpus",
            "",
            *self.extra,
        ]

    def start(self, wait: float = 30.0) -> Daemon:
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosaicd exited: {self.log_path.read_text()}")
            try:
                self.request("ping", timeout=1.0)
                return self
            except DaemonUnavailable:
                time.sleep(0.05)
        raise RuntimeError("mosaicd did not start")

    def request(self, name: str, timeout: float = 30.0, **args: Any) -> Any:
        with Client(self.socket, timeout=timeout) as client:
            return client.request(name, **args)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)  # the daemon and its workers, like OOM/power
        self.proc.wait()

    def cli(
        self, *args: str, cwd: Path | None = None, timeout: float = 300, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", *args],
            env=self.env,
            cwd=cwd or self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"mosaic {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def wait_for(
        self,
        db: str,
        states: tuple[str, ...] = ("done", "failed", "cancelled"),
        total: int | None = None,
        timeout: float = 180.0,
    ) -> dict[str, int]:
        """Wait until every run of the study is in one of `states`; return the counts."""
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            status = self.request("status", db=db, limit=0)
            counts = status["studies"][0]["counts"] if status["studies"] else {}
            n = sum(counts.values())
            settled = sum(counts.get(s, 0) for s in states)
            if n and settled == n and (total is None or n == total):
                return counts
            time.sleep(0.1)
        raise AssertionError(f"runs did not settle in {timeout} s: {counts}")


def require_tools(*tools: str, packages: str) -> None:
    """Skip the calling test when a system tool it drives is missing (scripts/test-tools said
    so in one line before the tests); under CI=true, where that script must have installed
    them, fail instead: CI never passes by skipping."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} missing: apt-get install {packages} (scripts/test-tools)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    # ipc socket paths must stay short (108 bytes): pytest's tmp_path can be too long.
    short = Path(tempfile.mkdtemp(prefix="mos-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def write_classes(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Write user classes to tmp_path/classes.py (returns its path) for a test that loads them
    in this process; afterwards undo what loading them did, as the worker does between runs."""
    from mosaicd.training import execution

    saved_path = list(sys.path)

    def write(text: str) -> str:
        path = tmp_path / "classes.py"
        path.write_text(text)
        return str(path)

    yield write
    sys.path[:] = saved_path
    while execution.loaded_user_modules:
        sys.modules.pop(execution.loaded_user_modules.pop(), None)


@pytest.fixture
def daemon(tmp: Path) -> Iterator[Daemon]:
    d = Daemon(tmp).start()
    yield d
    d.stop()


def example_config(
    root: Path,
    epochs: int = 3,
    multiplicity: int = 1,
    nb_processus: int = 2,
    extra_monitor: str = "",
    mlp_length: str = "2",
    mlp_width: str = "3",
    seed: int = 0,
    classes: Path = EXAMPLE,
    extra_process: str = "",
) -> Path:
    """A small sweep over the OR/AND example classes (from `classes`: a copy of them in a
    project of its own, say)."""
    return ini.write(
        root,
        ini.process(root, epochs, seed=seed, extra=extra_process),
        ini.monitor(nb_processus, multiplicity, extra=extra_monitor),
        ini.dataset(200, classes=classes),
        ini.mlp(mlp_length, mlp_width, classes=classes),
    )


def query(db: str | Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()
