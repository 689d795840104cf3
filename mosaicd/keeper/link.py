"""The daemon's side of its keepers: one link per user whose files it works on.

- LocalLink: the daemon's own user (a daemon a user starts for themself, and nothing else).
  The same Keeper as a keeper process runs, inside the daemon: no process, no socket.
- ProcessLink: any other user. The keeper (mosaicd.keeper.main) is started as that user as a
  worker is (their ids and groups, a fresh environment, cwd `/`, no descriptor of the daemon's
  but its end of a socket pair, its own process group, output to nowhere). Every call has a
  deadline; a keeper that misses it, dies or answers something malformed is killed and marked
  "not answering" for BACKOFF_S, during which its user's studies answer at once with that
  (StudyBusy: writes wait, as for a locked study, and go through once a new keeper, started on
  the next call after the backoff, has opened the studies again). Other users never wait on it.

What a keeper says is checked (mosaic_client.protocol.keeper_reply_problem) before it is used,
and what it opened is learned from the kernel: an "open" reply carries a descriptor of the study
file, and the daemon takes the file's owner, device and inode from fstat, never from the reply.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from mosaic_client import protocol
from mosaicd import owners
from mosaicd.executors.local import owner_environment
from mosaicd.keeper import wire
from mosaicd.keeper.main import Keeper
from mosaicd.owners import Owner
from mosaicd.storage.store import DiskFull, StoreError, StudyBusy, StudyFault, StudyStalled

log = logging.getLogger("mosaicd")

CALL_TIMEOUT_S = 0.5  # what one keeper may hold the daemon's loop: other users' requests wait
START_TIMEOUT_S = 10.0  # a new keeper: the interpreter starts and imports first
BACKOFF_S = 5.0  # a keeper that did not answer is not asked again before this
PER_ROW_S = 50e-6  # more time for operations that write many rows (a big submission)


class KeeperDown(StudyBusy):
    """The user's keeper does not answer (or could not be started): nothing was done."""


class KeeperBusy(StudyBusy):
    """The user's keeper is committing a big submission (Link.begin): nothing was done."""


class StudyMissing(StoreError):
    """No study database at that path."""


class StudyPermission(StoreError):
    """The user may not open the study."""


_ERRORS: dict[str, type[StoreError]] = {
    "busy": StudyBusy,
    "full": DiskFull,
    "stalled": StudyStalled,
    "fault": StudyFault,
    "missing": StudyMissing,
    "permission": StudyPermission,
}


@dataclass(frozen=True)
class FileIdentity:
    """A study file as the kernel describes it to the daemon."""

    uid: int
    dev: int
    ino: int


class Link:
    """Calls on one user's keeper."""

    owner: Owner | None

    def call(
        self,
        op: str,
        study: str | None = None,
        args: dict[str, Any] | None = None,
        hold: bool = False,
        timeout: float = CALL_TIMEOUT_S,
        within: bool = False,
    ) -> tuple[Any, dict[str, int] | None]:
        """The checked result of `op` and the study's run counts; raise a StoreError.
        `hold`: leave its transaction open until "finish"; `within`: add to the open one."""
        request = {"op": op, "study": study, "args": args or {}, "hold": hold, "within": within}
        reply, fds = self._exchange(request, timeout)
        for fd in fds:
            os.close(fd)
        return self._result(op, reply)

    def begin(self, op: str, study: str, args: dict[str, Any], timeout: float) -> None:
        """Send `op` and return at once: its reply is awaited by `finished` (a big COMMIT,
        seconds, while the daemon's loop goes on). Until then every other call on this link
        answers KeeperBusy. In the daemon's own process (LocalLink) it is done here."""
        self._begun = (op, self.call(op, study, args, timeout=timeout))

    def finished(self) -> tuple[Any, dict[str, int] | None] | None:
        """The begun call's checked result and counts once it came (or its StoreError), else
        None."""
        begun, self._begun = self._begun, None
        if begun is None:
            raise StoreError("no call was begun")
        return begun[1]  # type: ignore[no-any-return]

    _begun: tuple[str, Any] | None = None

    def open(
        self, study: str, create: bool, umask: int | None
    ) -> tuple[dict[str, int], FileIdentity]:
        """Open (or create) the study in the keeper (a new one with `umask`; None: the
        process's own); its counts and the file's identity."""
        request = {"op": "open", "study": study, "args": {"create": create, "umask": umask}}
        reply, fds = self._exchange(request, START_TIMEOUT_S)
        try:
            _, counts = self._result("open", reply)
            return counts or {}, self._identity(study, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def prove(self, paths: list[str], write: bool) -> list[FileIdentity | None]:
        """Which of `paths` this user can open (write: for writing too), as the kernel
        describes each file opened by their keeper; None where it could not open one."""
        reply, fds = self._exchange(
            {"op": "prove", "study": None, "args": {"paths": paths, "write": write}},
            CALL_TIMEOUT_S,
        )
        try:
            opened, _ = self._result("prove", reply)
            if len(opened) != len(paths) or sum(opened) != len(fds):
                self._broken("a proof without its files")
                raise KeeperDown(f"{self.name}'s keeper answered something malformed")
            found: list[FileIdentity | None] = []
            given = iter(fds)
            for ok in opened:
                found.append(_proved(next(given), write) if ok else None)
            return found
        finally:
            for fd in fds:
                os.close(fd)

    def _result(self, op: str, reply: Any) -> tuple[Any, dict[str, int] | None]:
        problem = protocol.keeper_reply_problem(op, reply)
        if problem:
            self._broken(f"malformed reply: {problem}")
            raise KeeperDown(f"{self.name}'s keeper answered something malformed ({problem})")
        if not reply["ok"]:
            raise _ERRORS.get(reply["kind"], StoreError)(reply["message"][:2000])
        return reply.get("result"), reply.get("counts")

    @property
    def name(self) -> str:
        return self.owner.name if self.owner is not None else "the daemon's"

    def _exchange(self, request: dict[str, Any], timeout: float) -> tuple[Any, list[int]]:
        raise NotImplementedError

    def _identity(self, study: str, fds: list[int]) -> FileIdentity:
        raise NotImplementedError

    def _broken(self, why: str) -> None:
        """The keeper cannot be trusted to go on (a process keeper is killed)."""

    def stop(self) -> None:
        raise NotImplementedError


class LocalLink(Link):
    """The daemon's own user: the keeper's work done in the daemon's process."""

    def __init__(self) -> None:
        self.owner = None
        self._keeper = Keeper(proofs=False)

    def _exchange(self, request: dict[str, Any], timeout: float) -> tuple[Any, list[int]]:
        return self._keeper.handle(request)

    def _identity(self, study: str, fds: list[int]) -> FileIdentity:
        st = os.stat(study)
        return FileIdentity(st.st_uid, st.st_dev, st.st_ino)

    def prove(self, paths: list[str], write: bool) -> list[FileIdentity | None]:
        # The daemon's own user is never asked for a proof (it is unrestricted); were it, no
        # second descriptor may be opened here, beside the studies' connections.
        found: list[FileIdentity | None] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                found.append(None)
                continue
            found.append(FileIdentity(st.st_uid, st.st_dev, st.st_ino))
        return found

    def stop(self) -> None:
        self._keeper.close_all()


class ProcessLink(Link):
    """A keeper process running as `owner`."""

    def __init__(self, owner: Owner, python: str, environment: dict[str, str]) -> None:
        self.owner = owner
        self._python = python
        self._environment = environment
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._down_until = 0.0
        self.backoff_s = BACKOFF_S
        self.problem: str | None = None  # why it is not answering, for `mosaic status`
        self._studies: dict[
            str, int | None
        ] = {}  # opened studies and their umask: reopened on restart

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def begin(self, op: str, study: str, args: dict[str, Any], timeout: float) -> None:
        sock = self._ensure_free()
        request = {"op": op, "study": study, "args": args, "hold": False, "within": False}
        deadline = time.monotonic() + timeout
        try:
            wire.send(sock, request, deadline=deadline)
        except wire.WireError as exc:
            self._broken(str(exc))
            raise KeeperDown(f"{self.name}'s keeper is not answering ({exc})") from None
        self._begun = (op, deadline)

    def finished(self) -> tuple[Any, dict[str, int] | None] | None:
        if self._begun is None or self._sock is None:
            self._begun = None
            raise KeeperDown(f"{self.name}'s keeper is not answering: {self.problem}")
        op, deadline = self._begun
        if not select.select([self._sock], [], [], 0)[0]:
            if time.monotonic() < deadline:
                return None
            self._begun = None
            self._broken("no answer in time")
            raise KeeperDown(f"{self.name}'s keeper is not answering (no answer in time)")
        self._begun = None
        try:
            reply, fds = wire.receive(self._sock, deadline)
        except wire.WireError as exc:
            self._broken(str(exc))
            raise KeeperDown(f"{self.name}'s keeper is not answering ({exc})") from None
        for fd in fds:
            os.close(fd)
        return self._result(op, reply)

    def _ensure_free(self) -> socket.socket:
        self._not_begun()
        return self._ensure()

    def _not_begun(self) -> None:
        """No other call while a begun call's reply is awaited."""
        if self._begun is not None:
            raise KeeperBusy(
                f"{self.name}'s keeper is committing a submission; it answers again in a moment"
            )

    def _exchange(self, request: dict[str, Any], timeout: float) -> tuple[Any, list[int]]:
        self._not_begun()
        before = self._sock
        sock = self._ensure()
        fresh = sock is not before
        # A keeper just started imports first: its first answer may take longer.
        deadline = time.monotonic() + (max(timeout, START_TIMEOUT_S) if fresh else timeout)
        try:
            wire.send(sock, request, deadline=deadline)
            reply, fds = wire.receive(sock, deadline)
        except wire.WireError as exc:
            self._broken(str(exc))
            raise KeeperDown(f"{self.name}'s keeper is not answering ({exc})") from None
        if request["op"] == "open" and isinstance(reply, dict) and reply.get("ok") is True:
            self._studies[request["study"]] = request["args"]["umask"]
        elif request["op"] == "close":
            self._studies.pop(request["study"], None)
        return reply, fds

    def _identity(self, study: str, fds: list[int]) -> FileIdentity:
        if len(fds) != 1:
            self._broken("an open without its file")
            raise KeeperDown(f"{self.name}'s keeper did not hand over {study}")
        st = os.fstat(fds[0])
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{study} is not a regular file")
        return FileIdentity(st.st_uid, st.st_dev, st.st_ino)

    def _ensure(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        if self._proc is not None:
            self._broken(f"it ended ({self._proc.poll()})")
        if time.monotonic() < self._down_until:
            raise KeeperDown(f"{self.name}'s keeper is not answering: {self.problem}")
        self._start()
        assert self._sock is not None
        return self._sock

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        owner = self.owner
        assert owner is not None
        try:
            self._proc = subprocess.Popen(
                [self._python, "-s", "-m", "mosaicd.keeper.main", "--fd", str(theirs.fileno())],
                env=self._environment,
                stdin=subprocess.DEVNULL,
                # Never the daemon's journal: what a user's process prints is theirs.
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                cwd="/",
                user=owner.uid,
                group=owner.gid,
                extra_groups=list(owner.groups),
                umask=owners.DEFAULT_UMASK,
                process_group=0,
            )
        except OSError as exc:
            ours.close()
            self._down_until = time.monotonic() + self.backoff_s
            self.problem = f"cannot start it: {exc.strerror or exc}"
            raise KeeperDown(f"{owner.name}'s keeper: {self.problem}") from None
        finally:
            theirs.close()
        self._sock = ours
        self.problem = None
        log.info("keeper for %s started (pid %d)", owner.name, self._proc.pid)
        # The studies its predecessor had open: opened again before anything else is asked.
        for study, umask in list(self._studies.items()):
            try:
                self.open(study, create=False, umask=umask)
            except StoreError as exc:
                log.error("keeper for %s cannot open %s again: %s", owner.name, study, exc)

    def _broken(self, why: str) -> None:
        self._begun = None
        if self._proc is not None:
            log.error("keeper for %s (pid %d): %s; stopping it", self.name, self._proc.pid, why)
            self._end()
        if self._sock is not None:
            self._sock.close()
        self._proc = self._sock = None
        self.problem = why
        self._down_until = time.monotonic() + self.backoff_s

    def _end(self) -> None:
        """Kill the keeper and what it started (its process group): the daemon has CAP_KILL."""
        if self._proc is not None:
            _kill(self._proc)

    @property
    def answering(self) -> bool:
        return time.monotonic() >= self._down_until

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # it finishes, closes its studies and ends
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill(self._proc)
        self._proc = self._sock = None


def _proved(fd: int, write: bool) -> FileIdentity | None:
    """The identity of a regular file behind a handed-over descriptor, if it was opened as
    claimed (for writing, when `write`)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    if write and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        return None
    return FileIdentity(st.st_uid, st.st_dev, st.st_ino)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class Keepers:
    """One link per user: the daemon's own (None) in-process, everyone else's a process."""

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable
        self._links: dict[int | None, Link] = {}

    def of(self, owner: Owner | None) -> Link:
        key = None if owner is None else owner.uid
        link = self._links.get(key)
        if link is None:
            if owner is None:
                link = LocalLink()
            else:
                owners.require_switch(owner)
                link = ProcessLink(owner, self._python, owner_environment(owner))
            self._links[key] = link
        return link

    def problems(self) -> dict[str, str]:
        """Users whose keeper is not answering, and why."""
        return {
            link.name: link.problem
            for link in self._links.values()
            if isinstance(link, ProcessLink) and link.problem and not link.answering
        }

    def pids(self) -> dict[str, int]:
        return {
            link.name: link.pid
            for link in self._links.values()
            if isinstance(link, ProcessLink) and link.pid is not None
        }

    def stop_all(self) -> None:
        for link in self._links.values():
            link.stop()
        self._links.clear()
