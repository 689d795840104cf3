"""The daemon's main loop: the client socket, the workers' socket, signals, and the scheduler.

Single-threaded on purpose: one loop owns every database connection, so there is exactly one
writer per study and no locking in the daemon. Signal handlers only set flags; a wakeup fd makes
the poll return so the loop acts on them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Generator
from typing import Any

import zmq

from mosaic_client import paths, protocol
from mosaicd.errors import Refused
from mosaicd.executors.base import WorkerHandle
from mosaicd.executors.choice import make_executor
from mosaicd.options import Options
from mosaicd.scheduling.fair_share import Ledger
from mosaicd.scheduling.scheduler import Scheduler
from mosaicd.scheduling.taking import Taking
from mosaicd.service import notify
from mosaicd.service.handlers import DISPATCH, Context
from mosaicd.service.rights import Caller
from mosaicd.storage.state import DaemonState
from mosaicd.storage.store import StoreError

log = logging.getLogger("mosaicd")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# How long one loop iteration advances the submissions being taken before it polls again.
TAKING_BUDGET_S = 0.02


def _file_identity(path: str) -> tuple[int, int, int]:
    """Which file is at path: an inode number alone may be reused by a file made since."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _from_owner(frame: zmq.Frame, worker: WorkerHandle) -> bool:
    """Whether a worker's message comes from a process of the worker's own user (SO_PEERCRED
    through ZAP; a TCP connection, as Ray's, has none and is trusted as before)."""
    try:
        user_id = frame.get("User-Id") or ""
    except zmq.ZMQError:
        return True
    if not user_id:
        return True
    sender = parse_zap_address(f"x:{user_id}").uid
    expected = os.geteuid() if worker.owner is None else worker.owner.uid
    return sender == expected


class AlreadyRunning(Exception):
    pass


def parse_zap_address(address: str) -> Caller:
    # libzmq gives an IPC peer's SO_PEERCRED as "localhost:uid:gid:pid" (checked on 4.3.5).
    parts = address.split(":")
    try:
        uid, gid, pid = (int(p) for p in parts[-3:])
        return Caller(uid, gid, pid)
    except ValueError:
        return Caller(None, None, None)


class Daemon:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.stop_requested = False
        self.child_exited = False
        self._lock_fd: int | None = None
        # Submissions being taken in steps, with the client each one's reply goes to.
        self._takings: list[tuple[bytes, Taking]] = []

    # -- start-up -----------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        lock_path = self.options.socket + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        # A daemon that is stopping has already removed its socket but still holds the lock
        # while it checkpoints its runs: wait for it rather than refuse (a restart, or a
        # `mosaic run` right after `mosaic shutdown`).
        deadline = time.monotonic() + self.options.stop_timeout + 30
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if os.path.exists(self.options.socket) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = ""
            try:
                with open(lock_path) as fh:
                    pid = fh.read().strip()
            except OSError:
                pass
            raise AlreadyRunning(
                f"a mosaicd is already running on {self.options.socket}"
                f"{f' (pid {pid})' if pid else ''}; use it, stop it with `mosaic shutdown`, or "
                "start this one with another --socket"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _bind(self) -> None:
        self.ctx = zmq.Context()
        # ZAP: libzmq asks this handler about every new connection and hands it the peer's
        # kernel credentials; the User-Id we return is attached to each message.
        self.zap = self.ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.router.setsockopt(zmq.ZAP_DOMAIN, b"mosaic")
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if os.path.exists(self.options.socket):
            os.unlink(self.options.socket)  # stale: we hold the lock, so nobody serves it
        self._bind_client_socket()
        self.worker_dir = tempfile.mkdtemp(prefix="mosaicd-workers-")
        self.worker_address = self.options.worker_bind or f"ipc://{self.worker_dir}/workers.sock"
        self.workers_sock = self.ctx.socket(zmq.ROUTER)
        self.workers_sock.linger = 1000
        # A worker runs its user's code: a message over the bound is refused by libzmq from its
        # header, before it is held, and that connection is closed (a real worker then fails
        # its run by timing out or dying; mosaicd.scheduling.worker_events).
        self.workers_sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_WORKER_MESSAGE_BYTES)
        # Workers' connections are authenticated like clients': each message carries the
        # sender's uid, which must be its worker's owner's (_serve_workers).
        self.workers_sock.setsockopt(zmq.ZAP_DOMAIN, b"mosaic-workers")
        self.workers_sock.bind(self.worker_address)
        if self.options.socket_group is not None and not self.options.worker_bind:
            # Users' workers (run as their owners) connect too: the socket group may reach
            # the socket, as it may the client socket; no one else may.
            sock_path = os.path.join(self.worker_dir, "workers.sock")
            for path, mode in ((self.worker_dir, 0o710), (sock_path, 0o660)):
                os.chown(path, -1, self.options.socket_group)
                os.chmod(path, mode)
        # tcp://HOST:* binds a free port: the workers need the real one.
        self.worker_address = self.workers_sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _bind_client_socket(self) -> None:
        """Bind the client socket with its permissions set from the first instant: 0600, or
        0660 for --socket-group (the kernel checks write access to the file on connect)."""
        old_umask = os.umask(0o117 if self.options.socket_group is not None else 0o177)
        try:
            self.router.bind(paths.endpoint(self.options.socket))
        finally:
            os.umask(old_umask)
        if self.options.socket_group is not None:
            os.chown(self.options.socket, -1, self.options.socket_group)
            os.chmod(self.options.socket, 0o660)
        self._socket_id = _file_identity(self.options.socket)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def on_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True

        def on_child(signum: int, frame: Any) -> None:
            self.child_exited = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGCHLD, on_child)

    def request_stop(self) -> None:
        self.stop_requested = True

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        paths.ensure_socket_dir(self.options.socket)
        self._acquire_lock()
        self.state = DaemonState(self.options.state_dir)
        self._bind()
        self.executor = make_executor(self.ctx, self.worker_address, self.options)
        # After the executor: one may install a SIGTERM handler of its own (ray.init does), which
        # must not replace the daemon's checkpoint-then-stop.
        self._install_signals()
        self.scheduler = Scheduler(
            self.state,
            self.executor,
            self._sender,
            self.options.checkpoint_every,
            shared=self.options.socket_group is not None,
            fair_share=Ledger(half_life=self.options.fair_share_half_life),
            shares=self.options.shares,
            limits=self.options.limits,
            preempt_after=self.options.preempt_after,
        )
        self.handler_context = Context(self.options, self.scheduler, self.request_stop)
        self.scheduler.recover()
        self.executor.start_all()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.workers_sock, zmq.POLLIN)
        poller.register(self.zap, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        log.info(
            "mosaicd %d ready on %s with %d slot(s): %s",
            os.getpid(),
            self.options.socket,
            len(self.executor.slots),
            ", ".join(s.label for s in self.executor.slots),
        )
        notify.notify("READY=1", self.scheduler.status_line())
        last_status_note = 0.0
        last_socket_check = time.monotonic()
        # Workers that are not our children (Ray actors): no SIGCHLD tells of their end.
        reap_every = self.executor.reap_every
        last_reap = 0.0
        while not self.stop_requested:
            wait_ms = int(reap_every * 1000) if reap_every else 1000
            if self._takings:  # at once, or soon when they only wait for a COMMIT
                wait_ms = 5 if all(t.committing for _, t in self._takings) else 0
            events = dict(poller.poll(wait_ms))
            if reap_every and time.monotonic() - last_reap >= reap_every:
                self.child_exited = True
                last_reap = time.monotonic()
            if self._wake_r.fileno() in events:
                self._drain_wakeup()
            if self.zap in events:
                self._serve_zap()
            if self.workers_sock in events:
                self._serve_workers()
            if self.router in events:
                self._serve_clients()
            self._serve_takings()
            if self.child_exited:
                self.child_exited = False
                for handle, code in self.executor.reap():
                    self.scheduler.on_worker_exit(handle, code)
            if not self.scheduler.shutting_down:
                self.executor.respawn_due()  # slots whose worker died while starting
            self.scheduler.flush_epochs()
            self.scheduler.check_timeouts()
            self.scheduler.dispatch()
            now = time.monotonic()
            if now - last_status_note > 5:
                notify.notify(self.scheduler.status_line())
                last_status_note = now
            if now - last_socket_check > 5:
                self._check_socket()
                last_socket_check = now
        return self._shutdown()

    def _check_socket(self) -> None:
        """Someone may delete the socket file (a /tmp cleaner): re-create it, and say so."""
        try:
            if _file_identity(self.options.socket) == self._socket_id:
                return
        except FileNotFoundError:
            pass
        log.warning("socket %s was removed or replaced; binding it again", self.options.socket)
        try:
            self.router.unbind(paths.endpoint(self.options.socket))
        except zmq.ZMQError:
            pass
        if os.path.exists(self.options.socket):
            os.unlink(self.options.socket)
        self._bind_client_socket()  # with the same mode and group as at start-up

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def _serve_zap(self) -> None:
        while self.zap.poll(0):
            request = self.zap.recv_multipart()
            version, request_id = request[0], request[1]
            address = request[3].decode(errors="replace") if len(request) > 3 else ""
            caller = parse_zap_address(address)
            user_id = "" if caller.uid is None else f"{caller.uid}:{caller.gid}:{caller.pid}"
            self.zap.send_multipart([version, request_id, b"200", b"OK", user_id.encode(), b""])

    def _serve_clients(self) -> None:
        for _ in range(1000):  # bounded so workers and signals are served between bursts
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            try:
                user_id = frames[-1].get("User-Id") or ""
            except zmq.ZMQError:
                user_id = ""
            caller = parse_zap_address(f"x:{user_id}") if user_id else Caller(None, None, None)
            if len(frames) != 3 or frames[1].bytes != b"":
                reply = protocol.error_reply(
                    protocol.ErrorCode.BAD_MESSAGE, "expected frames [empty delimiter, payload]"
                )
            else:
                reply = self._handle(frames[2].bytes, caller)
            if isinstance(reply, Taking):
                self._takings.append((identity, reply))  # answered once it is taken
            else:
                self._reply(identity, reply)

    def _reply(self, identity: bytes, reply: bytes) -> None:
        try:
            self.router.send_multipart([identity, b"", reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            log.warning("could not reply to a client that went away")

    def _serve_takings(self) -> None:
        """Advance the submissions being taken (mosaicd.scheduling.taking), in turn, for at
        most TAKING_BUDGET_S: the other requests are answered at the next poll."""
        deadline = time.monotonic() + TAKING_BUDGET_S
        working = True
        while working and time.monotonic() < deadline:
            working = False
            for entry in list(self._takings):
                identity, taking = entry
                reply = self._guarded(taking.name, taking.step)
                if reply is not None:
                    self._takings.remove(entry)
                    self._reply(identity, reply)
                # One whose keeper makes its COMMIT only waits: no reason to spin on it.
                working = working or not taking.committing

    def _handle(self, payload: bytes, caller: Caller) -> bytes | Taking:
        if len(payload) > protocol.BIG_REQUEST_BYTES:
            return Taking(self._in_parts(payload, caller), "request")
        try:
            name, args = protocol.decode_request(payload)
        except protocol.ProtocolError as exc:
            return protocol.error_reply(exc.code, exc.message)
        return self._guarded(name, lambda: DISPATCH[name](self.handler_context, caller, args))

    def _in_parts(self, payload: bytes, caller: Caller) -> Generator[None, None, Any]:
        """A big request (a submission of many pipelines): decoded in parts, then handled; a
        handler's own Taking goes on in the same steps."""
        name, args = yield from protocol.decode_in_parts(payload)
        handled = DISPATCH[name](self.handler_context, caller, args)
        if isinstance(handled, Taking):
            return (yield from handled.steps)
        return handled

    def _guarded(self, name: str, handle: Callable[[], Any]) -> Any:
        """The reply to a request, whatever its handler raises; a Taking (mosaicd.scheduling.
        taking) as it is, and None for one whose step is done but not its work."""
        try:
            data = handle()
            if isinstance(data, Taking):
                return data
            if data is Taking.NOT_YET:
                return None
            return protocol.ok_reply(data)
        except Refused as exc:
            return protocol.error_reply(exc.code, exc.message)
        except StoreError as exc:
            return protocol.error_reply(protocol.ErrorCode.INVALID, str(exc))
        except protocol.ProtocolError as exc:
            return protocol.error_reply(exc.code, exc.message)
        except Exception as exc:  # a daemon bug must not take the daemon down
            log.exception("request %s failed", name)
            return protocol.error_reply(
                protocol.ErrorCode.INTERNAL,
                f"internal error in {name}: {type(exc).__name__}: {exc}",
            )

    def _sender(self, worker: Any, name: str) -> Any:
        def send(**fields: Any) -> None:
            self.executor.send(self.workers_sock, worker, name, **fields)

        return send

    def _serve_workers(self) -> None:
        for _ in range(10000):
            try:
                frames = self.workers_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            # The payload is copied only once its sender is known to be the worker's owner.
            identity = frames[0].bytes
            worker = self.executor.workers.get(identity.decode(errors="replace"))
            if worker is None:
                continue  # a worker we already wrote off
            if not _from_owner(frames[-1], worker):
                log.warning(
                    "dropped a message sent as worker %s by another user than its owner",
                    worker.worker_id,
                )
                continue
            try:
                message = protocol.unpack(frames[1].bytes)
            except Exception as exc:  # msgpack raises many types for bad bytes
                log.error("undecodable message from worker %s: %s", worker.worker_id, exc)
                continue
            # The scheduler checks the message's shape itself: a malformed one fails the run
            # it names (mosaicd.scheduling.worker_events), which a drop here could not do.
            try:
                self.scheduler.on_message(worker, message)
            except StoreError as exc:
                log.error("could not record a message from %s: %s", worker.worker_id, exc)
            except Exception:  # a daemon bug must not take the daemon down (and at each start)
                log.exception("handling a message from worker %s failed", worker.worker_id)

    # -- shutdown -----------------------------------------------------------------------------

    def _unlink_socket(self) -> None:
        try:
            if _file_identity(self.options.socket) == self._socket_id:
                os.unlink(self.options.socket)
        except OSError:
            pass

    def _shutdown(self) -> int:
        notify.notify(
            "STOPPING=1",
            f"STATUS=stopping: checkpointing {self.scheduler.running()} running run(s)",
        )
        log.info("stopping: checkpointing %d running run(s)", self.scheduler.running())
        # Submissions still being taken are rolled back (or, once their COMMIT is on its way,
        # finished) and their clients told.
        for identity, taking in self._takings:
            if taking.committing:  # its COMMIT is on its way: it is queued whole
                self._reply(identity, self._guarded(taking.name, taking.finish_now))
                continue
            taking.cancel()
            self._reply(
                identity,
                protocol.error_reply(
                    protocol.ErrorCode.INVALID,
                    "the daemon is stopping; nothing of this submission was queued: submit it "
                    "again once it is back",
                ),
            )
        self._takings.clear()
        # Stop serving clients first: one that connects now must hear "no daemon" at once
        # instead of waiting for a reply that would never come.
        self.router.close()
        self._unlink_socket()
        self.scheduler.begin_shutdown()
        deadline = time.monotonic() + self.options.stop_timeout
        while self.scheduler.running() and time.monotonic() < deadline:
            if self.workers_sock.poll(200):
                self._serve_workers()
            for handle, code in self.executor.reap():
                self.scheduler.on_worker_exit(handle, code)
        self.scheduler.flush_epochs()
        self.executor.stop_all(self.workers_sock, grace=5.0)
        # Runs still marked running resume from their last checkpoint at the next start.
        self.scheduler.close()
        self.workers_sock.close()
        self.zap.close()
        self.ctx.term()
        # The directory still holds the workers' ipc socket file (zmq leaves it): removed with
        # it, so that no daemon leaves a mosaicd-workers-* directory behind in /tmp.
        shutil.rmtree(self.worker_dir, ignore_errors=True)
        log.info("stopped")
        return 0
