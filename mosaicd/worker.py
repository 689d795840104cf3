"""A persistent worker process: imports torch once, then runs pipelines the daemon sends.

Started by the daemon's pool as ``python -m mosaicd.worker``; talks to the daemon over a private
ZeroMQ socket (message types in mosaic_client.protocol).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import traceback
from typing import Any

import zmq

from mosaic_client import protocol


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
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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


class GlobalState:
    """What a run may change in the process and the next run must not see."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        self.path = list(sys.path)
        self.modules = set(sys.modules)
        self.dtype = torch.get_default_dtype()
        self.threads = torch.get_num_threads()
        self.grad = torch.is_grad_enabled()

    def restore(self) -> None:
        torch = self.torch
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.environ)
        sys.path[:] = self.path
        for name in set(sys.modules) - self.modules:
            if name.startswith("mosaic_user_"):
                del sys.modules[name]
        torch.set_default_dtype(self.dtype)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_grad_enabled(self.grad)


class Worker:
    def __init__(self, address: str, worker_id: str, slot: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.connect(address)
        self.slot = slot
        self.park_for: int | None = None
        self.exit_requested = False

    def send(self, name: str, **fields: Any) -> None:
        self.sock.send(protocol.worker_message(name, **fields))

    def _handle_control(self, message: dict[str, Any], running: int | None) -> None:
        if message["type"] == "park" and message["run_id"] == running:
            self.park_for = running
        elif message["type"] == "exit":
            self.exit_requested = True

    def park_requested(self, run_id: int) -> bool:
        while self.sock.poll(0):
            message = protocol.decode_worker_message(self.sock.recv(),
                                                     protocol.DAEMON_TO_WORKER)
            self._handle_control(message, run_id)
        return self.park_for == run_id

    def serve(self) -> None:
        from mosaicd import execution

        self.send("hello", pid=os.getpid(), slot=self.slot)
        while not self.exit_requested:
            message = protocol.decode_worker_message(self.sock.recv(), protocol.DAEMON_TO_WORKER)
            if message["type"] != "run":
                self._handle_control(message, None)
                continue
            self.run_one(execution, message["spec"])
        self.sock.close()
        self.ctx.term()

    def run_one(self, execution: Any, spec: dict[str, Any]) -> None:
        run_id = int(spec["run_id"])
        self.park_for = None
        state = GlobalState()
        os.makedirs(spec["run_files_path"], exist_ok=True)
        log_path = os.path.join(spec["run_files_path"], f"output_{run_id}.log")
        channel = execution.Channel(
            on_epoch=lambda event: self.send("epoch", **event),
            park_requested=lambda: self.park_requested(run_id))
        outcome: tuple[str, dict[str, Any]]
        try:
            with RedirectedOutput(log_path):
                try:
                    result = execution.execute(spec, channel)
                    outcome = ("done", {"results": result["results"], "files": result["files"]})
                except execution.Parked as parked:
                    print(f"[mosaic] run {run_id} parked after epoch {parked.epoch}", flush=True)
                    outcome = ("parked", {"epoch": parked.epoch})
                except BaseException as exc:  # user code may raise anything, even SystemExit
                    text = traceback.format_exc()
                    print(text, file=sys.stderr, flush=True)
                    message = (str(exc) if isinstance(exc, execution.UserCodeError)
                               else f"{type(exc).__name__}: {exc}")
                    outcome = ("failed", {"error": message, "traceback": text})
        except OSError as exc:  # the log file itself could not be written (disk full, perms)
            outcome = ("failed", {"error": f"cannot write run files: {exc}",
                                  "traceback": traceback.format_exc()})
        finally:
            state.restore()
        self.send(outcome[0], run_id=run_id, **outcome[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mosaicd.worker")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--slot", default="cpu")
    args = parser.parse_args(argv)
    _die_with_parent()
    # The daemon stops workers itself; a Ctrl-C in the daemon's terminal must not kill a run
    # before the daemon has checkpointed it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch  # noqa: F401  -- imported once per worker, not once per run

    Worker(args.connect, args.id, args.slot).serve()


if __name__ == "__main__":
    main()
