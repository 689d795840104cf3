"""Who a client is, and which paths the daemon uses on a client's behalf (issue 24).

On a shared box the daemon runs as root but never opens a user's file: each user's keeper does
(mosaicd.keeper), with that user's ids. A path a client names is checked against what that
client could do themself: writing (a study, run files) by the client's own keeper, which then
writes as them (the kernel has the last word); reading a study, and writing one another user's
keeper holds, by a proof: the client's keeper opens the file and hands the descriptor over, and
the daemon asks the kernel (fstat) which file it is. Nothing a keeper says decides a right.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from mosaic_client.protocol import ErrorCode
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.keeper.link import Link
from mosaicd.keeper.wire import MAX_FDS
from mosaicd.storage.store import StoreError
from mosaicd.storage.studies import Studies


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the kernel told us (SO_PEERCRED through ZAP), never as claimed."""

    uid: int | None
    gid: int | None
    pid: int | None

    @property
    def name(self) -> str:
        if self.uid is None:
            return "unknown"
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def unrestricted(self) -> bool:
        """Root, or the daemon's own user: the kernel applies the daemon's rights to them."""
        return self.uid == 0 or self.uid == os.getuid()

    def is_admin(self, admin_gid: int | None) -> bool:
        if self.unrestricted:
            return True
        if admin_gid is None or self.uid is None:
            return False
        try:
            user = pwd.getpwuid(self.uid).pw_name
            return user in grp.getgrgid(admin_gid).gr_mem or self.gid == admin_gid
        except KeyError:
            return False

    def groups(self) -> set[int]:
        try:
            user = pwd.getpwuid(self.uid if self.uid is not None else -1)
            found = set(os.getgrouplist(user.pw_name, user.pw_gid))
        except (KeyError, OverflowError):
            found = set()
        if self.gid is not None:
            found.add(self.gid)
        return found


def not_daemon_state(state_dir: str, socket: str, path: str, what: str) -> str:
    """Refuse, for everyone, a client-named path into the daemon's own state; return it real."""
    real = os.path.realpath(path)
    state = os.path.realpath(state_dir)
    socket_files = {os.path.realpath(socket + suffix) for suffix in ("", ".lock")}
    if real == state or real.startswith(state.rstrip("/") + "/") or real in socket_files:
        raise Refused(
            ErrorCode.PERMISSION,
            f"{what} {path} is part of the daemon's own state "
            f"({state}, its socket); choose a path in your project directory",
        )
    return real


def _identified(caller: Caller) -> None:
    if caller.uid is None:
        raise Refused(
            ErrorCode.PERMISSION, "the daemon could not learn who you are; nothing was done"
        )


def _link(studies: Studies, caller: Caller) -> Link | str:
    """The caller's keeper, or why this daemon cannot start one (it may not switch users: a
    daemon a user started for themself serves their own runs only)."""
    try:
        return studies.keepers.of(owners.lookup(caller.uid or 0, caller.gid))
    except owners.CannotSwitch as exc:
        return str(exc)


def check_writable(studies: Studies, caller: Caller, path: str, real: str, what: str) -> None:
    """Refuse a path the daemon would have written for a client unless that client could
    write it: checked by the caller's own keeper, which then writes it as them. A study served
    through another user's keeper is written by that keeper: the caller proves they may write
    it by opening it for writing (their keeper hands the descriptor over)."""
    if caller.unrestricted:
        return
    _identified(caller)
    link = _link(studies, caller)
    if isinstance(link, str):
        raise Refused(ErrorCode.PERMISSION, f"{link}. Nothing was queued.")
    try:
        problem = link.call("writable_problem", None, {"path": path, "real": real, "what": what})[0]
        handle = studies.get(path)
        if problem is None and handle is not None and handle.link is not link:
            proved = link.prove([path], write=True)[0]
            if proved is None or (proved.dev, proved.ino) != (handle.dev, handle.ino):
                problem = (
                    f"{what} {path}: you ({caller.name}) may not write it, so the daemon will "
                    "not add to it for you; choose your own study file. Nothing was queued."
                )
    except StoreError as exc:
        raise Refused(ErrorCode.PERMISSION, f"{what} {path}: {exc}. Nothing was queued.") from None
    if problem:
        raise Refused(ErrorCode.PERMISSION, str(problem)[:2000])


def readable(studies: Studies, caller: Caller, paths: list[str]) -> set[str]:
    """Which of `paths` the caller could read themself: their keeper opens each and hands the
    descriptor over, and the kernel says which file it is; a served study must be that very
    file. Nothing a keeper says decides it."""
    if caller.unrestricted:
        return set(paths)
    if caller.uid is None:
        return set()
    link = _link(studies, caller)
    if isinstance(link, str):
        return set()
    found: set[str] = set()
    for at in range(0, len(paths), MAX_FDS):
        batch = paths[at : at + MAX_FDS]
        try:
            proofs = link.prove(batch, write=False)
        except StoreError:
            continue
        for path, proved in zip(batch, proofs):
            handle = studies.get(path)
            if proved is not None and (
                handle is None or (proved.dev, proved.ino) == (handle.dev, handle.ino)
            ):
                found.add(path)
    return found


def check_readable(studies: Studies, caller: Caller, path: str, what: str) -> None:
    """Refuse to read a study for a client who could not read the file themself."""
    if not readable(studies, caller, [path]):
        raise Refused(
            ErrorCode.PERMISSION,
            f"{what} {path}: you ({caller.name}) may not read it, so the daemon will not read "
            "it for you",
        )
