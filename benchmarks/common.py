"""Shared helpers of the benchmarks: a private mosaicd and timing utilities."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mosaic_client import schema  # noqa: E402
from mosaic_client.connection import Client, DaemonUnavailable  # noqa: E402


def or_process() -> schema.ProcessSettings:
    """The resolved [PROCESS] of the OR example's runs, as the benchmarks' hand-made run specs
    carry it (binary accuracy, BCE loss, Adam at lr 0.001)."""
    return schema.process_settings(
        {
            "data_scheme": ["data"],
            "pipeline_scheme": ["model"],
            "lr": 0.001,
            "optimizer": "Adam",
            "loss_function": "BCELoss",
            "accuracy": "binary",
        }
    )


class BenchDaemon:
    def __init__(self, *extra: str, workers: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mosbench-"))
        (self.root / "daemon").mkdir()
        self.socket = str(self.root / "daemon" / "d.sock")
        self.state_dir = str(self.root / "daemon" / "state")
        self.extra = list(extra)
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_after = 0.0

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "MOSAIC_SOCKET": self.socket,
            "MOSAIC_STATE_DIR": self.state_dir,
            "PYTHONPATH": str(REPO),
        }

    def start(self) -> BenchDaemon:
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
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
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            try:
                self.request("ping", timeout=0.5)
                break
            except DaemonUnavailable:
                if self.proc.poll() is not None:
                    raise RuntimeError("mosaicd exited") from None
                time.sleep(0.005)
        self.ready_after = time.perf_counter() - started
        return self

    def request(self, name: str, timeout: float = 60.0, **args: Any) -> Any:
        with Client(self.socket, timeout=timeout) as client:
            return client.request(name, **args)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        shutil.rmtree(self.root, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


def tiny_config(root: Path, runs: int, epochs: int = 1, nb_processus: int = 64) -> Path:
    """A sweep of `runs` one-batch pipelines of the benchmark MLP."""
    cfg = root / "bench.ini"
    classes = REPO / "benchmarks" / "bench_classes.py"
    cfg.write_text(f"""
[PROCESS]
lr = 0.001
epochs = {epochs}
data_scheme = data
pipeline_scheme = model
loss_function = BCELoss
run_files_path = {root}/runs
seed = 0

[MONITOR]
need_gpu = false
gpu_available = None
nb_processus = {nb_processus}
multiplicity = {runs}

[data]
type = data
class = synthetic_data
path_to_class = {classes}
n_batches = 4
batch_size = 16
n_features = 8
key = synthetic

[model]
type = model
class = small_mlp
path_to_class = {classes}
width = 8
key = mlp
""")
    return cfg
