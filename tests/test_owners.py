"""Acting as a run's owner (mosaicd.owners) and checking who sent a worker's message: the small
pieces of issue 17, tested alone. Acting as another user needs root, which CI has."""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
from pathlib import Path

import pytest

from mosaicd import owners
from mosaicd.executors.base import Slot, WorkerHandle
from mosaicd.service.server import _from_owner

NOBODY = pwd.getpwnam("nobody")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/test_owners.py switches to other users: run it as root")


def test_the_daemons_own_user_is_acted_as_without_switching() -> None:
    assert owners.of_uid(os.geteuid()) is None
    assert owners.of_uid(None) is None
    with owners.acting_as(None, 0o077):
        assert os.geteuid() == os.getuid()
    root = owners.lookup(0)
    assert (root.uid, root.name) == (0, "root") and 0 in root.groups


def test_umask_comes_from_the_config_private_by_default() -> None:
    assert owners.umask_of({}) == 0o077
    assert owners.umask_of({"umask": "027"}) == 0o027
    assert owners.umask_of({"umask": "022"}) == 0o022


def test_acting_as_a_user_creates_their_files_with_their_rights_only() -> None:
    _require_root()
    user = owners.of_uid(NOBODY.pw_uid)
    assert user is not None and user.uid == NOBODY.pw_uid and user.gid == NOBODY.pw_gid
    shared = Path(tempfile.mkdtemp(prefix="mosown-"))
    shared.chmod(0o1777)
    secret = shared / "root-only"
    secret.write_text("root's")
    secret.chmod(0o600)
    umask, groups = os.umask(0o022), os.getgroups()
    os.umask(umask)
    try:
        with owners.acting_as(user, 0o077):
            assert (os.geteuid(), os.getegid()) == (user.uid, user.gid)
            made = shared / "theirs"
            made.write_text("x")
            with pytest.raises(PermissionError):
                secret.read_text()
        st = made.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o600)
        # Everything is the daemon's again, after an error inside too.
        with pytest.raises(RuntimeError), owners.acting_as(user, 0o027):
            raise RuntimeError("inside")
        assert (os.geteuid(), os.getegid()) == (0, 0)
        assert os.getgroups() == groups
        assert os.umask(umask) == umask
    finally:
        for path in shared.iterdir():
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
