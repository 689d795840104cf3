"""Talking to the daemon: one request, one reply, with a timeout; starting a daemon when none
answers (autostart), and telling "no daemon" from "not allowed to reach it" (socket_denied)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

import zmq

from mosaic_client import paths, protocol


class DaemonUnavailable(Exception):
    """No daemon answers on the socket."""


def how_to_start(socket_path: str) -> str:
    return (
        f"no mosaicd answers on {socket_path}. Start one with `mosaicd &` (or "
        "`systemctl --user start mosaicd`); `mosaic run` starts one for you."
    )


def socket_accepts(socket_path: str) -> bool:
    """Cheap liveness check: a stale socket file refuses connections at once."""
    if not os.path.exists(socket_path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float = 60.0) -> None:
        self.socket_path = socket_path or paths.default_socket_path()
        self.timeout = timeout
        self._ctx: zmq.Context[Any] | None = None
        self._sock: zmq.Socket[Any] | None = None

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            if not socket_accepts(self.socket_path):
                raise DaemonUnavailable(how_to_start(self.socket_path))
            self._ctx = zmq.Context.instance()
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.linger = 0
            self._sock.connect(paths.endpoint(self.socket_path))
        return self._sock

    def request(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        sock = self._socket()
        sock.send_multipart([b"", protocol.make_request(name, **args)])
        wait_ms = int(1000 * (self.timeout if timeout is None else timeout))
        if not sock.poll(wait_ms):
            self.close()
            raise DaemonUnavailable(
                f"mosaicd on {self.socket_path} did not answer {name!r} within "
                f"{wait_ms / 1000:g} s; it may be overloaded or hung (see its log)"
            )
        frames = sock.recv_multipart()
        return protocol.decode_reply(frames[-1])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def daemon_log_path() -> str:
    return os.path.join(paths.default_state_dir(), "mosaicd.log")


def start_daemon(socket_path: str, wait: float = 30.0) -> int:
    """Start a detached mosaicd for this user and wait until it answers; return its pid."""
    state_dir = paths.default_state_dir()
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    log_path = daemon_log_path()
    with open(log_path, "ab") as log:
        # A new session: the daemon survives the SSH session (and its SIGHUP) that started it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "mosaicd", "--socket", socket_path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None and not socket_accepts(socket_path):
            raise DaemonUnavailable(
                f"mosaicd exited at start-up (code {proc.returncode}); see {log_path}"
            )
        if socket_accepts(socket_path):
            try:
                with Client(socket_path, timeout=2.0) as client:
                    client.request("ping")
                return proc.pid
            except DaemonUnavailable:
                pass
        time.sleep(0.05)
    raise DaemonUnavailable(f"mosaicd did not become ready within {wait:g} s; see {log_path}")


def socket_denied(socket_path: str) -> str | None:
    """Why the file system keeps this user from the daemon's socket, or None if it does not.

    On a shared box the socket is 0660 in a 0750 directory of the users' group: someone outside
    that group gets EACCES, which must read as "ask to be let in", not "start a daemon"."""
    blocked = None
    directory = os.path.dirname(socket_path)
    while directory not in ("", "/"):
        if os.path.isdir(directory) and not os.access(directory, os.X_OK):
            blocked = directory  # the outermost one wins: it is the one to fix first
        directory = os.path.dirname(directory)
    if blocked is None:
        if not os.path.exists(socket_path) or os.access(socket_path, os.R_OK | os.W_OK):
            return None
        blocked = socket_path
    import grp
    import pwd

    try:
        group = grp.getgrgid(os.stat(blocked).st_gid).gr_name
    except (KeyError, OSError):
        group = "the socket's group"
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (
        f"permission denied: you may not use the mosaicd socket {socket_path} ({blocked} "
        f"is closed to you). Only members of group {group} may; ask the administrator to "
        f"add you (usermod -aG {group} {user}), then log in again."
    )


def ensure_daemon(socket_path: str, autostart: bool = True) -> None:
    """Return once a daemon answers on `socket_path`, starting one when none does (and
    `autostart`); raise DaemonUnavailable otherwise."""
    with Client(socket_path) as client:
        try:
            client.request("ping", timeout=5.0)
            return
        except DaemonUnavailable:
            if not autostart or socket_denied(socket_path):
                raise  # a daemon we may not reach is still a daemon: do not start another
    pid = start_daemon(socket_path)
    print(
        f"mosaic: started mosaicd (pid {pid}) on {socket_path}; its log is {daemon_log_path()}",
        file=sys.stderr,
    )
