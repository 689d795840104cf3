"""Who a client is, and which paths the daemon may touch on a client's behalf.

On a shared box the daemon runs as root or as a service user and so could open files its clients
may not. Every path a client names is checked here against what that client could do itself,
from the kernel-verified identity (SO_PEERCRED through ZAP), with POSIX mode bits (ACLs are not
consulted): writing a study or run files needs write + search where they go, adding runs to an
existing study needs the right to write that file (or, for a study file the daemon's own user
owns, that every submission in it is the caller's), and reading a study through the daemon
(`show`, `studies`) needs the right to read the file. These checks give clear refusals; the
kernel has the last word, because files the daemon opens for a client are opened with that
client's rights (mosaicd.owners, docs/deployment.md).
"""

from __future__ import annotations

import grp
import os
import pwd
import sqlite3
from dataclasses import dataclass

from mosaic_client.protocol import ErrorCode
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.storage.store import StoreError, connect_readonly

READ, WRITE, SEARCH = 0o4, 0o2, 0o1


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


def may(caller: Caller, groups: set[int], st: os.stat_result, want: int) -> bool:
    """POSIX mode-bit check (owner bits, else group bits, else other bits); ACLs not consulted."""
    if st.st_uid == caller.uid:
        shift = 6
    elif st.st_gid in groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & want == want


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


def _blocked_on_the_way(caller: Caller, groups: set[int], real: str, want: int) -> str | None:
    """The first directory that stops the caller reaching `real` (want on its nearest existing
    directory, search on every one above), or None."""
    directory = real
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    if not may(caller, groups, os.stat(directory), want):
        return directory
    parent = directory
    while parent != "/":
        parent = os.path.dirname(parent)
        if not may(caller, groups, os.stat(parent), SEARCH):
            return parent
    return None


def study_owners(path: str) -> set[int | None]:
    """The owners of a study's submissions, read on a read-only connection."""
    try:
        conn = connect_readonly(path)  # a regular file only, statements on a time budget
    except (StoreError, OSError):
        return set()
    try:
        return {row[0] for row in conn.execute("SELECT DISTINCT owner_uid FROM submissions")}
    except sqlite3.Error:
        return set()
    finally:
        conn.close()


def check_writable(caller: Caller, path: str, real: str, what: str) -> None:
    """See _check_writable; the paths are looked at with the caller's own rights (a daemon
    with no file-access override cannot even look into a 0700 home; the caller can)."""
    with owners.acting_as(owners.of_uid(caller.uid, caller.gid)):
        _check_writable(caller, path, real, what)


def check_readable(caller: Caller, path: str, what: str) -> None:
    """Refuse to read a study for a client who could not read the file themself."""
    with owners.acting_as(owners.of_uid(caller.uid, caller.gid)):
        _check_readable(caller, path, what)


def _check_writable(caller: Caller, path: str, real: str, what: str) -> None:
    """Refuse a path the daemon would write for a client unless that client could write there.

    For a path that does not exist yet: write + search on its nearest existing directory and
    search on every directory above. For an existing file (a study that grows): the same search,
    and the right to write the file itself; a file the daemon's own user owns (it created it for
    someone) may only be extended by the owners of every submission already in it.
    """
    if caller.unrestricted:
        return
    _identified(caller)
    groups = caller.groups()
    exists = os.path.lexists(real)
    blocked = _blocked_on_the_way(
        caller,
        groups,
        os.path.dirname(real) if exists else real,
        WRITE | SEARCH if not exists else SEARCH,
    )
    if blocked is not None:
        raise Refused(
            ErrorCode.PERMISSION,
            f"{what} {path}: you ({caller.name}) may not write in "
            f"{blocked}, so the daemon will not write there for you; choose a "
            "directory you can write. Nothing was queued.",
        )
    if not exists or os.path.isdir(real):
        return
    st = os.stat(real)
    if may(caller, groups, st, WRITE):
        return
    if st.st_uid == os.getuid() and study_owners(real) == {caller.uid}:
        return  # a study the daemon created for this caller before it gave files away
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    raise Refused(
        ErrorCode.PERMISSION,
        f"{what} {path} belongs to {owner} (mode {st.st_mode & 0o7777:04o}) and you "
        f"({caller.name}) may not write it, so the daemon will not add to it for you; choose "
        "your own study file. Nothing was queued.",
    )


def _check_readable(caller: Caller, path: str, what: str) -> None:
    if caller.unrestricted:
        return
    _identified(caller)
    groups = caller.groups()
    real = os.path.realpath(path)
    blocked = _blocked_on_the_way(caller, groups, os.path.dirname(real), SEARCH)
    readable = blocked is None and os.path.exists(real)
    if readable and not may(caller, groups, os.stat(real), READ):
        readable = False
    if not readable:
        raise Refused(
            ErrorCode.PERMISSION,
            f"{what} {path}: you ({caller.name}) may not read it, so the daemon will not read "
            "it for you",
        )


def may_read(caller: Caller, path: str) -> bool:
    try:
        check_readable(caller, path, "study")
    except (Refused, OSError):
        return False
    return True
