"""The local executor: persistent worker processes, one per slot (a CPU slot or a GPU slot)."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import signal
import site
import subprocess
import sys
import tempfile
import time
from typing import IO, Any

import psutil
import zmq

import mosaicd
from mosaicd import owners
from mosaicd.executors.base import (
    STARTING,
    Executor,
    Slot,
    WorkerHandle,
    describe_exit,
    worker_environment,
)
from mosaicd.owners import Owner

log = logging.getLogger("mosaicd")

START_FAILURE_KEPT_S = 60.0  # how long a user's failed worker start fails their runs at once
START_OUTPUT_SHOWN = 2000  # bytes of a user's failed worker's output quoted in the failure


class ResourceMeter:
    """CPU %, RSS and GPU memory of worker processes, measured from the daemon's process.

    CPU % is averaged since the previous measurement of the same worker (since the process
    started, the first time), so `status` needs no sampling sleep. A worker's figures include
    its children: in --isolation process the run lives in a forked child.
    """

    def __init__(self, with_children: bool = False) -> None:
        self.with_children = with_children
        self._last: dict[int, tuple[float, float]] = {}  # pid -> (wall time, cpu seconds)
        self._nvml: Any = None
        self._nvml_tried = False
        self._children: dict[int, list[int]] = {}
        self._children_at = 0.0

    def _processes(self, pid: int) -> list[psutil.Process]:
        procs = [psutil.Process(pid)]
        if self.with_children:
            # One scan of the process table per status request, not one per worker: finding
            # a process's children means reading every /proc entry.
            now = time.monotonic()
            if now - self._children_at > 0.5:
                self._children = {}
                for proc in psutil.process_iter(["ppid"]):
                    self._children.setdefault(proc.info["ppid"], []).append(proc.pid)
                self._children_at = now
            for child in self._children.get(pid, []):
                try:
                    procs.append(psutil.Process(child))
                except psutil.Error:
                    pass
        return procs

    def measure(self, handle: WorkerHandle) -> dict[str, Any]:
        out: dict[str, Any] = {"cpu_percent": None, "rss": None}
        try:
            procs = self._processes(handle.pid)
            now = time.time()
            # A forked run's CPU time moves into the worker's children_* times when it is
            # reaped, so this sum grows continuously across runs.
            times = procs[0].cpu_times()
            cpu = times.user + times.system + times.children_user + times.children_system
            rss = 0
            for child in procs[1:]:
                try:
                    t = child.cpu_times()
                    cpu += t.user + t.system
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass  # a run process that just ended
            rss += procs[0].memory_info().rss
            since, cpu_before = self._last.get(handle.pid, (procs[0].create_time(), 0.0))
            self._last[handle.pid] = (now, cpu)
            out["rss"] = rss
            out["cpu_percent"] = round(100.0 * (cpu - cpu_before) / max(now - since, 1e-3), 1)
        except psutil.Error:
            pass  # the worker just died; the next reap replaces it
        if handle.slot.kind == "cuda":
            out.update(self._gpu_memory(handle))
        return out

    def forget(self, pid: int) -> None:
        self._last.pop(pid, None)

    def _nvml_module(self) -> Any:
        # NVML is optional (nvidia-ml-py); without it, GPU memory is simply not shown.
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # not installed, no driver, no permission: all mean "unknown"
                self._nvml = None
        return self._nvml

    def _gpu_memory(self, handle: WorkerHandle) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gpu_memory": None,
            "gpu_memory_device": None,
            "gpu_memory_total": None,
        }
        nvml = self._nvml_module()
        if nvml is None or handle.slot.gpu is None:
            return out
        try:
            gpu = handle.slot.gpu
            device = (
                nvml.nvmlDeviceGetHandleByIndex(int(gpu))
                if gpu.isdigit()
                else nvml.nvmlDeviceGetHandleByUUID(gpu)
            )
            info = nvml.nvmlDeviceGetMemoryInfo(device)
            out["gpu_memory_device"] = int(info.used)
            out["gpu_memory_total"] = int(info.total)
            pids = {handle.pid}
            try:
                pids.update(p.pid for p in self._processes(handle.pid))
            except psutil.Error:
                pass
            used = [
                p.usedGpuMemory
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(device)
                if p.pid in pids and p.usedGpuMemory is not None
            ]
            # Inside a container NVML reports host pids, which match none of ours: then only
            # the card's total is known.
            out["gpu_memory"] = sum(used) if used else None
        except Exception:
            pass
        return out


class Pool(Executor):
    """Workers as child processes of the daemon (`python -m mosaicd.training.worker`)."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        address: str,
        slots: list[Slot],
        max_runs_per_worker: int = 0,
        isolation: str = "state",
        worker_python: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.worker_python = worker_python or sys.executable
        self.next_owner = {}
        self.address = address
        self.slots = slots
        self.max_runs = max_runs_per_worker
        self.isolation = isolation
        # Only in process isolation do workers have children (the run processes) to count.
        self.meter = ResourceMeter(with_children=isolation == "process")
        self.workers: dict[str, WorkerHandle] = {}
        self._ids = itertools.count(1)
        self._early_deaths: dict[Slot, int] = {}
        self._respawn: list[tuple[float, Slot]] = []  # (monotonic due time, slot)
        self._respawn_owner: dict[Slot, Owner | None] = {}
        # Why a user's worker could not start (uid -> message, when): their runs fail with it.
        self._start_failures: dict[int | None, tuple[str, float]] = {}
        # A user's worker's fds 1 and 2 until it has its own log (route -> anonymous file).
        self._start_output: dict[str, IO[bytes]] = {}
        self._failed_output: dict[str, str] = {}  # route -> what a failed start printed
        cpu_slots = sum(1 for s in slots if s.kind == "cpu") or 1
        self.cpu_threads = max(1, (os.cpu_count() or 1) // cpu_slots)

    def start_all(self) -> None:
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: Slot, owner: Owner | None = None) -> WorkerHandle:
        worker_id = f"w{next(self._ids)}"
        route = f"{worker_id}.{secrets.token_hex(8)}"
        as_owner: dict[str, Any] = {}
        output: IO[bytes] | None = None
        if owner is None:
            env = worker_environment(slot, self.cpu_threads)
        else:
            # A user's worker: their ids, groups and home, a private umask, and none of the
            # daemon's environment but what running Python and CUDA needs.
            env = worker_environment(slot, self.cpu_threads, base=owner_environment(owner))
            as_owner = {
                "user": owner.uid,
                "group": owner.gid,
                "extra_groups": list(owner.groups),
                "umask": owners.DEFAULT_UMASK,
                # Not the home: the chdir comes before the ids change, and the daemon has no
                # file-access override to enter a 0700 home; the worker moves there itself.
                "cwd": "/",
            }
            # Never the daemon's stderr (its journal, where a user's lines would pass for the
            # daemon's): an unlinked file that only says why a start failed (replace), until
            # the worker points its output at a log in the user's home (run_log.settle_as_owner).
            try:
                output = tempfile.TemporaryFile()
            except OSError:  # /tmp full: the worker starts, its start-up output is lost
                output = None
            sink = output if output is not None else subprocess.DEVNULL
            as_owner.update(stdout=sink, stderr=sink)
        # The routing id in the environment, not on the command line: /proc/PID/environ is
        # readable by the process's own user only, its cmdline by everyone.
        env["MOSAIC_WORKER_ID"] = route
        try:
            proc = subprocess.Popen(
                [
                    sys.executable if owner is None else self.worker_python,
                    "-m",
                    "mosaicd.training.worker",
                    "--connect",
                    self.address,
                    "--slot",
                    slot.label,
                    "--isolation",
                    self.isolation,
                    *(["--as-owner"] if owner is not None else []),
                ],
                # The daemon's own workers inherit its stderr (journald under systemd) for what
                # they print outside a run; users' workers never do (above). A run's own output
                # goes to its run log (contract.run_log_path).
                env=env,
                stdin=subprocess.DEVNULL,
                # No descriptor of the daemon's (client socket, study databases, other users'
                # worker connections) reaches a worker.
                close_fds=True,
                # Its own process group: when a worker is killed (cancel, timeout), what its run
                # started goes with it (reap), as the worker itself ends leftovers after each
                # run.
                process_group=0,
                **as_owner,
            )
        except OSError as exc:
            if output is not None:
                output.close()
            who = f" as {owner.name}" if owner is not None else ""
            raise WorkerStartError(
                f"cannot start a worker{who} with {self.worker_python}: {exc.strerror or exc}; "
                "the runs' owners must be able to run the workers' Python (mosaicd "
                "--worker-python, docs/deployment.md)"
            ) from None
        handle = WorkerHandle(worker_id, slot, proc, owner=owner, route=route)
        self.workers[route] = handle
        if output is not None:
            self._start_output[route] = output
        return handle

    def replace(self, handle: WorkerHandle, code: int) -> None:
        """Start a new worker on a dead worker's slot.

        A worker that dies before it is ready (a broken torch install, a bad environment)
        would die again at once: its slot is retried with a growing delay instead of in a
        loop that keeps the CPUs busy starting Python.
        """
        slot = handle.slot
        said = self._failed_output.pop(handle.route, "")
        if slot in self.next_owner:  # handed over to another user (Executor.hand_over)
            self._early_deaths.pop(slot, None)
            self._spawn_or_log(slot, self.next_owner.pop(slot))
            return
        if handle.state != STARTING:
            self._early_deaths.pop(slot, None)
            self._spawn_or_log(slot, handle.owner)
            return
        if handle.owner is not None:
            # A user's worker that dies while starting (their Python or packages unreadable to
            # them): their runs fail with the reason for a while; the slot goes back to the
            # daemon's own worker meanwhile.
            self._start_failures[handle.owner.uid] = (
                f"the worker started as {handle.owner.name} with {self.worker_python} "
                f"{describe_exit(code)} before it was ready, saying: "
                f"{said!r} "
                "(docs/deployment.md: the workers' Python must be usable by every user)",
                time.monotonic(),
            )
            log.error("%s", self._start_failures[handle.owner.uid][0])
            self._spawn_or_log(slot, None)
            return
        failures = self._early_deaths.get(slot, 0) + 1
        self._early_deaths[slot] = failures
        delay = min(60.0, 0.5 * 2 ** (failures - 1))
        log.error(
            "worker %s (%s) %s while starting (%d time(s) in a row); next try in %g s. "
            "Its error is above in this log; check the Python and torch install that "
            "mosaicd runs with",
            handle.worker_id,
            slot.label,
            describe_exit(code),
            failures,
            delay,
        )
        self._respawn.append((time.monotonic() + delay, slot))
        self._respawn_owner[slot] = handle.owner

    def _spawn_or_log(self, slot: Slot, owner: Owner | None) -> None:
        """Start a replacement; one that cannot start leaves the slot to the daemon's user."""
        try:
            self.spawn(slot, owner)
        except WorkerStartError as exc:
            log.error("%s", exc)
            self._start_failures[owner.uid if owner else None] = (str(exc), time.monotonic())
            self.spawn(slot)

    def start_failure(self, uid: int | None) -> str | None:
        failure = self._start_failures.get(uid)
        # Tried again after a while: the administrator may have fixed the install meanwhile.
        if failure is None or time.monotonic() - failure[1] > START_FAILURE_KEPT_S:
            return None
        return failure[0]

    def _output_of(self, handle: WorkerHandle) -> str:
        """The end of what a user's worker printed before it had its own log (quoted with
        repr in messages: one line in the daemon's log, whatever the user's code wrote)."""
        output = self._start_output.pop(handle.route, None)
        if output is None:
            return ""
        with output:
            output.seek(max(0, output.seek(0, os.SEEK_END) - START_OUTPUT_SHOWN))
            return output.read().decode(errors="replace").strip()

    def respawn_due(self) -> None:
        """Start the workers whose retry delay has passed (called from the daemon's loop)."""
        if not self._respawn:
            return
        now = time.monotonic()
        due = [slot for at, slot in self._respawn if at <= now]
        self._respawn = [(at, slot) for at, slot in self._respawn if at > now]
        for slot in due:
            self._spawn_or_log(slot, self._respawn_owner.pop(slot, None))

    def resources(self, handle: WorkerHandle) -> dict[str, Any]:
        return self.meter.measure(handle)

    def check_submission(
        self, process: dict[str, Any], pipelines: list[Any], owner: Owner | None
    ) -> None:
        """Nothing to add: local workers see the daemon's own files, which the daemon's
        submission checks (mosaicd.scheduling.submissions) already cover, and start as any owner."""

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
                _kill_group(handle.pid)
                del self.workers[handle.route]
                output = self._output_of(handle)  # read, and its file closed
                if handle.state == STARTING and handle.owner is not None:
                    self._failed_output[handle.route] = output  # for replace
                self.meter.forget(handle.pid)
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
            _kill_group(handle.pid)
            self._output_of(handle)
        self.workers.clear()


class WorkerStartError(Exception):
    """A worker process could not be started (its Python not executable by its owner)."""


# The daemon's variables a user's worker keeps: locale, time zone and where CUDA lives.
OWNER_KEPT_VARIABLES = (
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "PATH",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "PYTHONUNBUFFERED",
)


def owner_environment(owner: Owner) -> dict[str, str]:
    """The environment a user's worker starts from: the user's identity, a few of the daemon's
    variables, and the paths to Mosaic's and torch's packages (the workers' Python may be
    another interpreter than the daemon's: mosaicd --worker-python)."""
    env = {k: os.environ[k] for k in OWNER_KEPT_VARIABLES if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(owner.environment())
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(mosaicd.__file__)))
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    roots = [package_root, *inherited, *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots))
    return env


def _kill_group(pid: int) -> None:
    """End what is left in a dead worker's process group (processes its run forked)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
