"""The worker pool: persistent worker processes, one per slot (a CPU slot or a GPU slot)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from mosaic_client import protocol

STARTING, IDLE, BUSY, STOPPING = "starting", "idle", "busy", "stopping"


@dataclass(frozen=True)
class Slot:
    kind: str  # "cpu" or "cuda"
    index: int  # CPU slot number, or the physical GPU id for CUDA slots
    gpu: str | None = None

    @property
    def label(self) -> str:
        return f"cpu {self.index}" if self.kind == "cpu" else f"cuda:{self.gpu}"

    @property
    def device(self) -> str:
        # The worker sees only its GPU through CUDA_VISIBLE_DEVICES, so it is always cuda:0.
        return "cpu" if self.kind == "cpu" else "cuda:0"


def make_slots(workers: int, gpus: list[str], runs_per_gpu: int) -> list[Slot]:
    slots = [Slot("cpu", i) for i in range(workers)]
    for n, gpu in enumerate(gpus):
        slots.extend(Slot("cuda", n * runs_per_gpu + k, gpu) for k in range(runs_per_gpu))
    return slots


def worker_environment(slot: Slot, cpu_threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # CPU workers must not grab a GPU; GPU workers see exactly their own card.
    env["CUDA_VISIBLE_DEVICES"] = slot.gpu if slot.kind == "cuda" and slot.gpu else ""
    # One slot = its share of the cores: N workers x all-core BLAS would oversubscribe.
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads))
    env["MOSAIC_WORKER_SLOT"] = slot.label
    return env


@dataclass
class WorkerHandle:
    worker_id: str
    slot: Slot
    proc: subprocess.Popen[bytes]
    state: str = STARTING
    run: tuple[str, int] | None = None  # (study path, run id)
    runs_done: int = 0
    started_at: float = field(default_factory=time.time)
    run_started: float = 0.0
    killed_for: str | None = None  # why the daemon killed it, if it did

    @property
    def pid(self) -> int:
        return self.proc.pid


class Pool:
    def __init__(self, ctx: zmq.Context[Any], address: str, slots: list[Slot],
                 max_runs_per_worker: int = 0, log_file: Any = None) -> None:
        self.ctx = ctx
        self.address = address
        self.slots = slots
        self.max_runs = max_runs_per_worker
        self.log_file = log_file
        self.workers: dict[str, WorkerHandle] = {}
        self._ids = itertools.count(1)
        cpu_slots = sum(1 for s in slots if s.kind == "cpu") or 1
        self.cpu_threads = max(1, (os.cpu_count() or 1) // cpu_slots)

    def start_all(self) -> None:
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: Slot) -> WorkerHandle:
        worker_id = f"w{next(self._ids)}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "mosaicd.worker", "--connect", self.address,
             "--id", worker_id, "--slot", slot.label],
            env=worker_environment(slot, self.cpu_threads), stdin=subprocess.DEVNULL,
            stdout=self.log_file, stderr=self.log_file, close_fds=True)
        handle = WorkerHandle(worker_id, slot, proc)
        self.workers[worker_id] = handle
        return handle

    def send(self, sock: zmq.Socket[Any], handle: WorkerHandle, name: str,
             **fields: Any) -> None:
        sock.send_multipart([handle.worker_id.encode(), protocol.worker_message(name, **fields)])

    def idle(self, kind: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state == IDLE and w.slot.kind == kind]

    def slot_count(self, kind: str) -> int:
        return sum(1 for s in self.slots if s.kind == kind)

    def kill(self, handle: WorkerHandle, reason: str) -> None:
        handle.killed_for = reason
        try:
            handle.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> list[tuple[WorkerHandle, int]]:
        """Workers whose process has ended, with their return codes (negative: signal)."""
        dead = []
        for handle in list(self.workers.values()):
            code = handle.proc.poll()
            if code is not None:
                del self.workers[handle.worker_id]
                dead.append((handle, code))
        return dead

    def stop_all(self, sock: zmq.Socket[Any], grace: float) -> None:
        for handle in self.workers.values():
            if handle.proc.poll() is None:
                self.send(sock, handle, "exit")
        deadline = time.monotonic() + grace
        for handle in self.workers.values():
            remaining = max(0.0, deadline - time.monotonic())
            try:
                handle.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                handle.proc.kill()
                handle.proc.wait()
        self.workers.clear()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGSEGV": " (segmentation fault in native code)",
                "SIGKILL": " (killed: out of memory, or by someone)",
                "SIGABRT": " (aborted)"}.get(name, "")
        return f"killed by {name}{hint}"
    return f"exited with code {code}"
