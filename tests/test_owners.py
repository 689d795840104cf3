"""A run's owner (mosaicd.owners), a user's keeper doing their file work as them
(mosaicd.keeper), and checking who sent a worker's message: the small pieces of issues 17 and
24, tested alone. Starting a process as another user needs root, which CI has."""

from __future__ import annotations

import os
import pwd
import re
import stat
import tempfile
from pathlib import Path

import pytest
from test_shared_box import user_python

from mosaicd import owners
from mosaicd.executors.base import Slot, WorkerHandle
from mosaicd.keeper.link import Keepers, LocalLink, ProcessLink
from mosaicd.service.server import _from_owner

NOBODY = pwd.getpwnam("nobody")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/test_owners.py switches to other users: run it as root")


def test_the_daemons_own_user_is_acted_as_without_switching() -> None:
    assert owners.of_uid(os.geteuid()) is None
    assert owners.of_uid(None) is None
    assert isinstance(Keepers().of(None), LocalLink)  # its files: no process, no switch
    root = owners.lookup(0)
    assert (root.uid, root.name) == (0, "root") and 0 in root.groups


def test_umask_comes_from_the_config_private_by_default() -> None:
    assert owners.umask_of({}) == 0o077
    assert owners.umask_of({"umask": "027"}) == 0o027
    assert owners.umask_of({"umask": "022"}) == 0o022


def test_a_keeper_does_a_users_file_work_with_their_rights_only() -> None:
    _require_root()
    user = owners.of_uid(NOBODY.pw_uid)
    assert user is not None and user.uid == NOBODY.pw_uid and user.gid == NOBODY.pw_gid
    shared = Path(tempfile.mkdtemp(prefix="mosown-"))
    shared.chmod(0o1777)
    secret = shared / "root-only"
    secret.write_text("root's")
    secret.chmod(0o600)
    keepers = Keepers(user_python()[0])
    ids = (os.getresuid(), os.getresgid(), os.getgroups())
    try:
        link = keepers.of(user)
        assert isinstance(link, ProcessLink)
        link.call("make_dirs", None, {"path": str(shared / "theirs"), "umask": 0o077})
        st = (shared / "theirs").stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o700)
        # What the user may not read, their keeper may not read either.
        tail, _ = link.call("log_tail", None, {"path": str(secret)})
        assert tail == "(no output file)"
        assert link.prove([str(secret), str(shared / "nothing")], write=False) == [None, None]
        # A study it creates is the user's, and the daemon learns so from the kernel.
        counts, file = link.open(str(shared / "theirs.db"), create=True, umask=0o077)
        assert file.uid == user.uid == (shared / "theirs.db").stat().st_uid
        assert counts.get("queued", 0) == 0
        # A user's keeper runs as them, with their groups, in its own process group.
        pid = link.pid
        assert pid is not None
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids is not None and set(uids.group(1).split()) == {str(user.uid)}
        assert os.getpgid(pid) == pid
        # And the daemon's own ids never changed.
        assert (os.getresuid(), os.getresgid(), os.getgroups()) == ids
    finally:
        keepers.stop_all()
        for path in shared.iterdir():
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        shared.rmdir()


class _Frame:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id

    def get(self, name: str) -> str:
        assert name == "User-Id"
        return self.user_id


def test_a_workers_message_must_come_from_its_owners_uid() -> None:
    alice = owners.Owner(1234, 1234, (1234,), "alice", "/")
    theirs = WorkerHandle("w1", Slot("cpu", 0), None, owner=alice)
    ours = WorkerHandle("w2", Slot("cpu", 1), None)
    assert _from_owner(_Frame("1234:1234:99"), theirs)  # type: ignore[arg-type]
    assert not _from_owner(_Frame("1235:1234:99"), theirs)  # type: ignore[arg-type]
    assert not _from_owner(_Frame(f"{os.geteuid()}:0:99"), theirs)  # type: ignore[arg-type]
    assert _from_owner(_Frame(f"{os.geteuid()}:0:99"), ours)  # type: ignore[arg-type]
    assert not _from_owner(_Frame("1234:1234:99"), ours)  # type: ignore[arg-type]
    # TCP (Ray) connections carry no credentials: trusted as before.
    assert _from_owner(_Frame(""), theirs)  # type: ignore[arg-type]
