"""Whether a user may write or read a path, by POSIX mode bits (ACLs are not consulted), for
clear refusals. Run by the user's own keeper (mosaicd.keeper.operations), with the user's ids:
the daemon cannot even look into a private home. The kernel has the last word, because the files
are then opened by that same keeper; where another user's keeper would open them, the daemon asks
for a proof instead (an open descriptor, mosaicd.service.rights).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass

READ, WRITE, SEARCH = 0o4, 0o2, 0o1


@dataclass(frozen=True)
class Who:
    uid: int
    groups: frozenset[int]
    name: str


def myself() -> Who:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Who(uid, frozenset({*os.getgroups(), os.getgid()}), name)


def may(who: Who, st: os.stat_result, want: int) -> bool:
    """POSIX mode-bit check (owner bits, else group bits, else other bits)."""
    if st.st_uid == who.uid:
        shift = 6
    elif st.st_gid in who.groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & want == want


def _blocked_on_the_way(who: Who, real: str, want: int) -> str | None:
    """The first directory that stops `who` reaching `real` (want on its nearest existing
    directory, search on every one above), or None."""
    directory = real
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    if not may(who, os.stat(directory), want):
        return directory
    parent = directory
    while parent != "/":
        parent = os.path.dirname(parent)
        if not may(who, os.stat(parent), SEARCH):
            return parent
    return None


def writable_problem(path: str, real: str, what: str) -> str | None:
    """Why this keeper's user may not write `path` (resolved: `real`), or None. For a path that
    does not exist yet: write + search on its nearest existing directory and search on every
    directory above; for an existing file, the same search and the right to write the file."""
    who = myself()
    exists = os.path.lexists(real)
    blocked = _blocked_on_the_way(
        who, os.path.dirname(real) if exists else real, WRITE | SEARCH if not exists else SEARCH
    )
    if blocked is not None:
        return (
            f"{what} {path}: you ({who.name}) may not write in {blocked}, so the daemon will "
            "not write there for you; choose a directory you can write. Nothing was queued."
        )
    if not exists or os.path.isdir(real):
        return None
    st = os.stat(real)
    if may(who, st, WRITE):
        return None
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    return (
        f"{what} {path} belongs to {owner} (mode {st.st_mode & 0o7777:04o}) and you "
        f"({who.name}) may not write it, so the daemon will not add to it for you; choose "
        "your own study file. Nothing was queued."
    )


_PROOF_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def open_for_proof(path: str, write: bool) -> int | None:
    """A descriptor of the regular file at `path`, opened as this keeper's user (read, or read
    and write), or None: the daemon learns from the kernel what it is (fstat). Never waits on a
    FIFO (O_NONBLOCK), never follows a final link."""
    try:
        fd = os.open(os.path.realpath(path), _PROOF_FLAGS | (os.O_RDWR if write else os.O_RDONLY))
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd
