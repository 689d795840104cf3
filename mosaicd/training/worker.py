"""A persistent worker process: imports torch once, then runs pipelines the daemon sends.

Started by the daemon's pool as ``python -m mosaicd.training.worker``, or inside a Ray actor
(mosaicd/executors/ray_cluster.py); both go through :func:`start`. Talks to the daemon over a
private ZeroMQ socket (message types in mosaic_client.protocol).

Isolation between the runs of one worker (``mosaicd --isolation``, docs/workers.md):

- ``state`` (default): runs share the process; what a run may change globally (working
  directory, environment, ``sys.path``, default dtype, thread count, grad mode, its user
  modules) is put back before the next run.
- ``none``: the same process, nothing restored but the run's user modules; for trusted code.
- ``process``: the worker forks a child per run (and one per ensemble). The child starts from
  the worker's clean, torch-imported state, so nothing a run does outlives it, at the cost of a
  fork (milliseconds) instead of a fresh interpreter and torch import (seconds). The worker
  relays the child's messages; a child that dies abnormally takes the worker down the same
  way, so the daemon's crash handling (cause, log tail, retries, replacement) is the same in
  every mode.

Ensembles (``run_group``, docs/ensembles.md): the members train together in one process
(:func:`mosaicd.training.ensemble.execute_group`), in the worker itself or, under ``process``, in
one forked child per group, to which the worker relays the members' park and cancel requests
through a pipe (a signal cannot say which member). Output printed while the group trains goes
to the first member's log; each member's own ``[mosaic]`` lines go to its own log. When the
group cannot train as an ensemble the worker says why (``fallback``) and trains the members one
by one, exactly as ``run`` messages.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import resource
import select
import signal
import sys
import traceback
import warnings
from typing import Any, NoReturn

import zmq

from mosaic_client import contract, protocol
from mosaic_client.protocol import RunSpec
from mosaicd.training import run_log


def _become_subreaper() -> None:
    # The processes a run forks and orphans are re-parented to the worker instead of PID 1, so
    # that the worker can end them when the run ends (run_log.end_leftovers).
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_child_subreaper = 36
        libc.prctl(pr_set_child_subreaper, 1)
    except OSError:
        pass


def _after_run(state: GlobalState | None, log_path: str, before: set[int]) -> None:
    """What every run (or ensemble) leaves to the next: the process state put back (or at
    least its user modules dropped), and its leftover processes ended and reported."""
    if state is not None:
        state.restore()
    else:
        drop_user_modules()
    _report(log_path, run_log.end_leftovers(before))


def _report(log_path: str, text: str | None) -> None:
    """Append a line of the daemon's to the run's log."""
    if not text:
        return
    try:
        fd = run_log.open_log(log_path)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def _die_with_parent() -> None:
    # If the daemon is killed (kill -9), its workers must not keep training orphaned runs that
    # the next daemon will start again.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass


class RedirectedOutput:
    """Send fds 1 and 2 (Python and C-level output alike) to the run's log file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> RedirectedOutput:
        fd_check = run_log.open_log(self.path)  # refuse a link before touching fds 1 and 2
        os.close(fd_check)
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        fd = run_log.open_log(self.path)  # O_NOFOLLOW: a planted link is refused
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        os.close(self.saved[0])
        os.close(self.saved[1])


def drop_user_modules() -> None:
    # Each run loads user files under fresh names (execution.load_user_class); dropping them
    # keeps a long-lived worker's memory flat and stops a later run from finding stale ones.
    from mosaicd.training.execution import loaded_user_modules

    while loaded_user_modules:
        sys.modules.pop(loaded_user_modules.pop(), None)


class GlobalState:
    """What a run may change in the process and the next run must not see."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        self.path = list(sys.path)
        self.dtype = torch.get_default_dtype()
        self.threads = torch.get_num_threads()
        self.grad = torch.is_grad_enabled()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.deterministic_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        self.matmul_precision = torch.get_float32_matmul_precision()
        self.anomaly = torch.is_anomaly_enabled()
        self.cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)

    def restore(self) -> None:
        torch = self.torch
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.environ)
        sys.path[:] = self.path
        drop_user_modules()
        torch.set_default_dtype(self.dtype)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_grad_enabled(self.grad)
        if (
            torch.are_deterministic_algorithms_enabled() != self.deterministic
            or torch.is_deterministic_algorithms_warn_only_enabled() != self.deterministic_warn
        ):
            torch.use_deterministic_algorithms(
                self.deterministic, warn_only=self.deterministic_warn
            )
        torch.set_float32_matmul_precision(self.matmul_precision)
        torch.autograd.set_detect_anomaly(self.anomaly)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = self.cudnn


ISOLATION_MODES = ("state", "none", "process")
_FRAME_HEADER = 4  # big-endian length before each message a forked run sends its worker


def _write_frame(fd: int, payload: bytes) -> None:
    data = len(payload).to_bytes(_FRAME_HEADER, "big") + payload
    while data:
        data = data[os.write(fd, data) :]


def _frames(worker: Worker) -> list[bytes]:
    """The whole frames in the worker's control pipe buffer, taken out of it."""
    frames = []
    buffer = worker.pipe_in_buffer
    while len(buffer) >= _FRAME_HEADER:
        size = int.from_bytes(buffer[:_FRAME_HEADER], "big")
        if len(buffer) < _FRAME_HEADER + size:
            break
        frames.append(buffer[_FRAME_HEADER : _FRAME_HEADER + size])
        buffer = buffer[_FRAME_HEADER + size :]
    worker.pipe_in_buffer = buffer
    return frames


def _no_outcome() -> dict[str, Any]:
    return {"error": "the ensemble ended without a result for this run", "traceback": ""}


def _die_like(status: int) -> NoReturn:
    """End this process the way a forked run process ended (signal or exit code)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # Passing on a SIGSEGV must not write a core file of the worker into its cwd.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) or 1)


class Worker:
    def __init__(self, address: str, worker_id: str, slot: str, isolation: str = "state") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.connect(address)
        self.slot = slot
        self.isolation = isolation
        # The run ids being trained (a run, or an ensemble's members) and those the daemon
        # asked to park or (members of an ensemble only) cancel.
        self.running_ids: set[int] = set()
        self.park_ids: set[int] = set()
        self.cancel_ids: set[int] = set()
        self.park_signalled = False
        self.exit_requested = False
        # Set in a forked run process: its messages go to the worker through this pipe, since
        # a zmq socket must never be used from a forked child.
        self.pipe_out: int | None = None
        # Set in a forked ensemble process: the park/cancel messages the worker relays to it.
        self.pipe_in: int | None = None
        self.pipe_in_buffer = b""
        self.pending: list[dict[str, Any]] = []  # daemon messages read while relaying a run
        # Installed before any fork so that the child inherits it: a park signal that arrives
        # before the child got going must not kill it (SIGUSR1's default action).
        signal.signal(signal.SIGUSR1, self._on_park_signal)

    def _on_park_signal(self, signum: int, frame: Any) -> None:
        self.park_signalled = True

    def send(self, name: str, **fields: Any) -> None:
        payload = protocol.worker_message(name, **fields)
        if self.pipe_out is not None:
            _write_frame(self.pipe_out, payload)
        else:
            self.sock.send(payload)

    def _begin(self, run_ids: list[int]) -> None:
        self.running_ids = set(run_ids)
        self.park_ids = set()
        self.cancel_ids = set()
        self.park_signalled = False

    def _handle_control(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        # A park or cancel for a run that already ended is stale: ignore it.
        if kind in ("park", "cancel") and message["run_id"] in self.running_ids:
            (self.park_ids if kind == "park" else self.cancel_ids).add(message["run_id"])
        elif kind == "exit":
            self.exit_requested = True

    def _poll_control(self) -> None:
        """Take in the daemon's control messages that arrived (park, cancel, exit)."""
        if self.pipe_in is not None:  # a forked ensemble: the worker relays them here
            while select.select([self.pipe_in], [], [], 0)[0]:
                chunk = os.read(self.pipe_in, 1 << 16)
                if not chunk:
                    self.pipe_in = None
                    return
                self.pipe_in_buffer += chunk
                for payload in _frames(self):
                    self._handle_control(
                        protocol.decode_worker_message(payload, protocol.DAEMON_TO_WORKER)
                    )
            return
        if self.pipe_out is not None:
            return  # a forked run never touches the zmq socket; its park comes as SIGUSR1
        while self.sock.poll(0):
            message = protocol.decode_worker_message(self.sock.recv(), protocol.DAEMON_TO_WORKER)
            self._handle_control(message)

    def park_requested(self, run_id: int) -> bool:
        if self.pipe_out is not None and self.pipe_in is None:
            return self.park_signalled  # a forked run: the worker relays a park as SIGUSR1
        self._poll_control()
        return run_id in self.park_ids

    def cancel_requested(self, run_id: int) -> bool:
        self._poll_control()
        return run_id in self.cancel_ids

    def serve(self) -> None:
        from mosaicd.training import execution

        self.send("hello", pid=os.getpid(), slot=self.slot)
        while not self.exit_requested:
            message = (
                self.pending.pop(0)
                if self.pending
                else protocol.decode_worker_message(self.sock.recv(), protocol.DAEMON_TO_WORKER)
            )
            if message["type"] == "run":
                specs, group = [message["spec"]], False
            elif message["type"] == "run_group":
                specs, group = list(message["specs"]), True
            else:
                self._handle_control(message)
                continue
            self._begin([int(spec["run_id"]) for spec in specs])
            if specs[0]["umask"] is not None:
                # A user's worker on a shared daemon: what the run writes is made with the
                # umask its config chose ([MONITOR] umask), private by default.
                os.umask(specs[0]["umask"])
            if self.isolation == "process":
                self.run_forked(execution, specs, group)
            elif group:
                self.run_group(execution, specs, restore=self.isolation == "state")
            else:
                self.run_one(execution, specs[0], restore=self.isolation == "state")
        self.sock.close()
        self.ctx.term()

    def run_forked(self, execution: Any, specs: list[RunSpec], group: bool) -> None:
        """Run one pipeline (or one ensemble) in a forked child and relay its messages to the
        daemon, and the daemon's park (and cancel) requests to it."""
        run_ids = {int(spec["run_id"]) for spec in specs}
        before = run_log.descendants()
        read_fd, write_fd = os.pipe()
        # An ensemble's park/cancel requests name a member: they go through a pipe.
        control_read, control_write = os.pipe() if group else (-1, -1)
        with warnings.catch_warnings():
            # The warning is about zmq's I/O threads: the child never touches zmq (it talks
            # through the pipe and ends with os._exit), and glibc's malloc is fork-safe.
            warnings.filterwarnings(
                "ignore", "This process .* is multi-threaded", DeprecationWarning
            )
            pid = os.fork()
        if pid == 0:  # the run process
            code = 0
            try:
                os.close(read_fd)
                _die_with_parent()  # PDEATHSIG is not inherited across fork
                # What this process would add to the memory cache ends with it: only the disk
                # cache serves a later run (docs/performance.md#data-stage-cache).
                execution.data_cache.in_forked_run = True
                self.pipe_out = write_fd
                if group:
                    os.close(control_write)
                    self.pipe_in = control_read
                    self.run_group(execution, specs, restore=False)
                else:
                    self.run_one(execution, specs[0], restore=False)
            except BaseException:
                code = 70
            finally:
                # Skip atexit and finalizers: they would touch the worker's zmq context.
                os._exit(code)
        os.close(write_fd)
        if group:
            os.close(control_read)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(read_fd, zmq.POLLIN)
        buffer = b""
        eof = False
        while not eof:
            for item, _ in poller.poll():
                if item == read_fd:
                    chunk = os.read(read_fd, 1 << 16)
                    eof = not chunk
                    buffer += chunk
                    while len(buffer) >= _FRAME_HEADER:
                        size = int.from_bytes(buffer[:_FRAME_HEADER], "big")
                        if len(buffer) < _FRAME_HEADER + size:
                            break
                        self.sock.send(buffer[_FRAME_HEADER : _FRAME_HEADER + size])
                        buffer = buffer[_FRAME_HEADER + size :]
                else:
                    while self.sock.poll(0):
                        payload = self.sock.recv()
                        message = protocol.decode_worker_message(payload, protocol.DAEMON_TO_WORKER)
                        if message["type"] in ("park", "cancel") and message["run_id"] in run_ids:
                            if group:
                                try:
                                    _write_frame(control_write, payload)
                                except OSError:
                                    pass  # the child has ended: its result is on its way
                            elif message["type"] == "park":
                                os.kill(pid, signal.SIGUSR1)
                        else:
                            # The daemon may send the next run as soon as it has this one's
                            # result, while the child is still exiting: keep it for serve().
                            self.pending.append(message)
        os.close(read_fd)
        if group:
            os.close(control_write)
        _, status = os.waitpid(pid, 0)
        # The processes the run (or the ensemble) left behind are reported in its first log.
        _report(
            contract.run_log_path(specs[0]["run_files_path"], int(specs[0]["run_id"])),
            run_log.end_leftovers(before),
        )
        if status != 0:
            # The run's process crashed (segfault, os._exit, OOM kill): end this worker the same
            # way, so the daemon fails or retries the run with the real cause.
            self.sock.close(linger=1000)
            _die_like(status)

    def _send_provenance(self, run_id: int, record: dict[str, Any]) -> None:
        self.send("provenance", run_id=run_id, **record)

    def _send_search(self, run_id: int, values: dict[str, Any], pruned: int | None) -> None:
        """A search run's resolved values, and the epoch its pruner stopped it at."""
        extra = {} if pruned is None else {"pruned": pruned}
        self.send("search", run_id=run_id, values=values, **extra)

    def run_group(self, execution: Any, specs: list[RunSpec], restore: bool) -> None:
        """Train an ensemble's members together, or one by one when they cannot be."""
        from mosaicd.training import ensemble

        run_ids = [int(spec["run_id"]) for spec in specs]
        channels = {
            run_id: ensemble.MemberChannel(
                on_epoch=lambda event: self.send("epoch", **event),
                park_requested=functools.partial(self.park_requested, run_id),
                cancel_requested=functools.partial(self.cancel_requested, run_id),
                on_provenance=functools.partial(self._send_provenance, run_id),
            )
            for run_id in run_ids
        }
        state = GlobalState() if restore else None
        outcomes: dict[int, tuple[str, dict[str, Any]]] = {}
        fallback: str | None = None
        before = run_log.descendants()
        lead_log = contract.run_log_path(specs[0]["run_files_path"], run_ids[0])
        max_bytes = int(specs[0]["max_log_mb"] * 2**20)
        try:
            for spec in specs:
                os.makedirs(spec["run_files_path"], exist_ok=True)
            with run_log.LogCap(lead_log, max_bytes), RedirectedOutput(lead_log):
                try:
                    outcomes = ensemble.execute_group(specs, channels)
                except ensemble.Fallback as exc:
                    fallback = exc.reason  # already in each member's log
                except BaseException as exc:  # a fault of the engine itself, not of a member
                    text = traceback.format_exc()
                    print(text, file=sys.stderr, flush=True)
                    message = f"ensemble: {execution.failure_message(exc)}"
                    failure = {"error": message, "traceback": text}
                    outcomes = {run_id: ("failed", failure) for run_id in run_ids}
        except run_log.RunLogRefused as exc:
            failure = {"error": exc.strerror, "traceback": ""}
            outcomes = {run_id: ("failed", failure) for run_id in run_ids}
        except OSError as exc:
            failure = {"error": f"cannot write run files: {exc}", "traceback": ""}
            outcomes = {run_id: ("failed", failure) for run_id in run_ids}
        finally:
            _after_run(state, lead_log, before)
        if fallback is None:
            for run_id in run_ids:
                kind, fields = outcomes.get(run_id, ("failed", _no_outcome()))
                self.send(kind, run_id=run_id, **fields)
            return
        self.send("fallback", run_ids=run_ids, reason=fallback)
        for spec in specs:
            run_id = int(spec["run_id"])
            start = spec["start_epoch"]
            if run_id in self.cancel_ids:  # asked before its turn came: it never starts
                self.send("cancelled", run_id=run_id, epoch=start)
            elif run_id in self.park_ids:
                self.send("parked", run_id=run_id, epoch=start)
            else:
                self.run_one(execution, spec, restore=restore)

    def run_one(self, execution: Any, spec: RunSpec, restore: bool = True) -> None:
        run_id = int(spec["run_id"])
        state = GlobalState() if restore else None
        os.makedirs(spec["run_files_path"], exist_ok=True)
        log_path = contract.run_log_path(spec["run_files_path"], run_id)
        channel = execution.Channel(
            on_epoch=lambda event: self.send("epoch", **event),
            # A member of a fallen-back ensemble is cancelled at an epoch boundary, as a park
            # that it then reports as "cancelled" (an individual run is killed instead).
            park_requested=lambda: self.park_requested(run_id) or self.cancel_requested(run_id),
            on_provenance=functools.partial(self._send_provenance, run_id),
            on_search=functools.partial(self._send_search, run_id),
        )
        outcome: tuple[str, dict[str, Any]]
        before = run_log.descendants()
        max_bytes = int(spec["max_log_mb"] * 2**20)
        try:
            with run_log.LogCap(log_path, max_bytes), RedirectedOutput(log_path):
                try:
                    result = execution.execute(spec, channel)
                    outcome = ("done", {"results": result["results"], "files": result["files"]})
                except execution.Parked as parked:
                    verb = "cancelled" if run_id in self.cancel_ids else "parked"
                    print(f"[mosaic] run {run_id} {verb} after epoch {parked.epoch}", flush=True)
                    outcome = (verb, {"epoch": parked.epoch})
                except BaseException as exc:  # user code may raise anything, even SystemExit
                    text = traceback.format_exc()
                    print(text, file=sys.stderr, flush=True)
                    message = execution.failure_message(exc)
                    outcome = ("failed", {"error": message, "traceback": text})
        except run_log.RunLogRefused as exc:
            outcome = ("failed", {"error": exc.strerror, "traceback": ""})
        except OSError as exc:  # the log file itself could not be written (disk full, perms)
            outcome = (
                "failed",
                {"error": f"cannot write run files: {exc}", "traceback": traceback.format_exc()},
            )
        finally:
            _after_run(state, log_path, before)
        self.send(outcome[0], run_id=run_id, **outcome[1])


def cuda_check_environment(isolation: str) -> dict[str, str]:
    """Environment defaults a worker needs before it imports torch."""
    if isolation == "process":
        # By default torch.cuda.is_available() (which torch itself calls, e.g. while warming
        # up) asks the CUDA runtime, and that "poisons" fork: a forked run could never use
        # CUDA. The NVML-based check leaves the worker free to fork runs that initialise CUDA
        # themselves.
        return {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    return {}


def warms_up(isolation: str, slot: str) -> bool:
    # Warming up initialises the CUDA driver through torch._dynamo on a GPU machine, after
    # which a forked child cannot use CUDA: GPU runs in process isolation pay it themselves.
    return not (isolation == "process" and slot.startswith("cuda"))


def start(
    address: str, worker_id: str, slot: str, isolation: str, *, die_with_parent: bool
) -> None:
    """Set up this process as a worker and serve the daemon at `address` until it says exit.

    The one start-up of every worker: ``python -m mosaicd.training.worker`` (through :func:`main`,
    with `die_with_parent`) and the Ray actor (mosaicd/executors/ray_cluster.py, in a process Ray
    started with its own environment: nothing set there is overridden).
    """
    if isolation not in ISOLATION_MODES:
        raise ValueError(
            f"unknown isolation {isolation!r}; expected one of {', '.join(ISOLATION_MODES)}"
        )
    if die_with_parent:
        _die_with_parent()
    _become_subreaper()
    # The daemon stops workers itself; a Ctrl-C in the daemon's terminal must not kill a run
    # before the daemon has checkpointed it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name, value in cuda_check_environment(isolation).items():
        os.environ.setdefault(name, value)
    if slot.startswith("cuda"):
        # issue 16: cuBLAS reads this once, when CUDA is first used (warm-up may do it), so a
        # later `deterministic = true` run could not set it in time. The deterministic
        # workspace setting costs a GPU worker little; a value set by the user is kept.
        from mosaic_client.provenance import CUBLAS_DETERMINISTIC

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    from mosaicd.training import execution  # imports torch: once per worker, not once per run

    if warms_up(isolation, slot):
        execution.warm_up()
    Worker(address, worker_id, slot, isolation).serve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mosaicd.training.worker")
    parser.add_argument("--connect", required=True)
    # The routing id comes in the environment (MOSAIC_WORKER_ID), which other users cannot read.
    parser.add_argument("--id", default=os.environ.get("MOSAIC_WORKER_ID"))
    parser.add_argument("--slot", default="cpu")
    parser.add_argument("--isolation", default="state", choices=ISOLATION_MODES)
    parser.add_argument("--as-owner", action="store_true")  # started by a shared daemon
    args = parser.parse_args(argv)
    if args.as_owner:
        run_log.settle_as_owner(args.slot)  # its home as cwd, its output in its own log
    if not args.id:
        parser.error("give --id or MOSAIC_WORKER_ID")
    start(args.connect, args.id, args.slot, args.isolation, die_with_parent=True)


if __name__ == "__main__":
    main()
