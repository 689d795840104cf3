"""Run owners: who a run executes as (issues 17 and 24).

On a shared box the daemon serves several users. Their code runs in workers started as the
run's owner (mosaicd.executors.local), and every file of a user's (a study database and its
-wal/-shm files, the run-files directory, a run's log) is touched only by that user's keeper,
a process started as them (mosaicd.keeper): the kernel checks every open against the user's own
rights, a link the user planted leads only where the user could go, and what is created is the
user's. The daemon's own process never changes its ids.

A daemon that serves only its own user (the single-user mode) starts no one as anyone:
:func:`of_uid` gives None for the daemon's own uid, and None means "as the daemon, as before".

Starting a process as another user needs CAP_SETUID and CAP_SETGID (a root daemon has them; the
systemd unit keeps only these and CAP_KILL, docs/deployment.md); they are used only in the
children, between fork and exec.
"""

from __future__ import annotations

import functools
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mosaic_client import schema

# What a run's files are created with, unless the user's config says otherwise
# ([MONITOR] umask): private to their owner on a box shared with other users.
DEFAULT_UMASK = 0o077
NOGROUP = 65534
_CAP_SETGID, _CAP_SETUID = 6, 7


class CannotSwitch(Exception):
    """The daemon may not act as another user (no CAP_SETUID/CAP_SETGID)."""


@dataclass(frozen=True)
class Owner:
    """A user the daemon acts for: ids from the kernel-verified caller, groups and home from
    the user database."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str

    def environment(self) -> dict[str, str]:
        """The user's identity variables for a process started as them."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def lookup(uid: int, gid: int | None = None) -> Owner:
    """The owner with this uid: primary gid `gid` (the caller's, as the kernel gave it) or the
    user database's, and the user's supplementary groups."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # A uid with no name (a container's, an LDAP hiccup): its own ids and no groups.
        primary = gid if gid is not None else NOGROUP
        return Owner(uid, primary, (primary,), str(uid), "/")
    primary = gid if gid is not None else entry.pw_gid
    try:
        groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = {entry.pw_gid}
    groups.add(primary)
    home = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
    return Owner(uid, primary, tuple(sorted(groups)), entry.pw_name, home)


def of_uid(uid: int | None, gid: int | None = None) -> Owner | None:
    """The owner to act as for `uid`; None for the daemon's own user, an unknown caller, or
    when this daemon may not switch (handlers refuse to run such a caller's code: see
    :func:`require_switch`): the daemon acts as itself, as a single-user daemon always does."""
    if uid is None or uid == os.geteuid() or not can_switch():
        return None
    return lookup(uid, gid)


@functools.cache
def can_switch() -> bool:
    """Whether this process may take other users' ids (root, or CAP_SETUID + CAP_SETGID)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps >> _CAP_SETUID & 1 and caps >> _CAP_SETGID & 1)
    except OSError:
        pass
    return False


def require_switch(owner: Owner | None) -> None:
    """Raise CannotSwitch unless this daemon may act as `owner`."""
    if owner is not None and owner.uid != os.geteuid() and not can_switch():
        raise CannotSwitch(
            f"this daemon (uid {os.geteuid()}) cannot run anything as {owner.name}: it has no "
            "CAP_SETUID/CAP_SETGID, and it will not run your code or write your files under "
            "its own identity. Ask the administrator to start it as in docs/deployment.md, or "
            "start a daemon of your own (mosaicd)"
        )


def umask_of(monitor: Mapping[str, Any]) -> int:
    """The umask a submission chose ([MONITOR] umask), from its MONITOR as sent or resolved."""
    return int(schema.monitor_settings(monitor)["umask"], 8)
