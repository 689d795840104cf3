"""Whose a submission is (issue 24): the daemon's state database, never the study's rows.

Unit tests of mosaicd.storage.identity and the state's migration; tests/test_identity_box.py
drives a root daemon with throw-away users."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from mosaicd.storage.identity import Identities
from mosaicd.storage.state import DaemonState
from mosaicd.storage.store import Store
from mosaicd.storage.studies import Studies

PROCESS = {"epochs": 1}


def _study(path: Path, owner_uid: int | None) -> Store:
    """A study with one submission whose row says `owner_uid` (and no run)."""
    store = Store(str(path), create=True)
    store.add_submission(owner_uid, "someone", "c.ini", PROCESS, {}, [])
    return store


def _rows(store: Store) -> list[list[object]]:
    """The study's submission rows, as a keeper reads them for the daemon."""
    rows = store.conn.execute("SELECT submission_id, owner_uid, created_at FROM submissions")
    return [list(row) for row in rows]


def _row_owner(path: Path, owner_uid: int | None, submission_id: int = 1) -> None:
    """What a user does to their own study with sqlite3."""
    conn = sqlite3.connect(str(path))
    conn.execute(
        "UPDATE submissions SET owner_uid=? WHERE submission_id=?", (owner_uid, submission_id)
    )
    conn.commit()
    conn.close()


def test_the_state_migration_upgrades_an_older_state_database(tmp_path: Path) -> None:
    # A state database as the previous release left it: version 1, a study, a hold.
    os.makedirs(tmp_path / "state")
    conn = sqlite3.connect(tmp_path / "state" / "daemon.db")
    conn.execute("CREATE TABLE studies (path TEXT PRIMARY KEY, added_at REAL NOT NULL)")
    conn.execute("CREATE TABLE settings (name TEXT PRIMARY KEY, value)")
    conn.execute("ALTER TABLE studies ADD COLUMN opener_uid INTEGER")
    conn.execute("INSERT INTO studies VALUES ('/s/results.db', 1.0, 1000)")
    conn.execute("INSERT INTO settings VALUES ('paused_owners', '[1000]')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    state = DaemonState(str(tmp_path / "state"))
    assert state.conn.execute("PRAGMA user_version").fetchone()[0] == len(state.STATE_MIGRATIONS)
    assert state.studies() == [("/s/results.db", 1000)]
    assert state.held_owners() == {1000}
    assert not state.owners_adopted("/s/results.db")  # adopted at its first open, once
    state.record_owner("/s/results.db", 1, 1000, "alice", 2.5)
    assert state.owner_record("/s/results.db", 1) == (1000, "alice", 2.5, False)
    # NOT NULL: no record says "the daemon's own user" by leaving the owner out.
    try:
        state.conn.execute(
            "INSERT INTO submission_owners (study, submission_id, owner_uid, owner)"
            " VALUES ('/s/results.db', 2, NULL, 'x')"
        )
    except sqlite3.IntegrityError:
        pass
    else:
        raise AssertionError("a NULL owner was recorded")
    # And it is idempotent: a second start migrates nothing.
    assert DaemonState(str(tmp_path / "state")).owner_record("/s/results.db", 1) is not None


def test_adoption_takes_the_files_owner_once_never_a_value_inside(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    _study(path, owner_uid=0).close()  # the row says root: ignored
    os.chown(path, 4242, -1)
    state = DaemonState(str(tmp_path / "state"))
    state.add_study(str(path))
    identities = Identities(state, shared=True)
    store = Store(str(path), create=False)
    identities.adopt(str(path), _rows(store), os.stat(path).st_uid)
    record = state.owner_record(str(path), 1)
    assert record is not None and (record.uid, record.adopted) == (4242, True)
    assert identities.owner(str(path), 1) == (4242, "4242")
    # Once: a later owner of the file (or a new submission written by hand) adopts nothing.
    os.chown(path, 5151, -1)
    store.add_submission(5151, "mallory", "c.ini", PROCESS, {}, [])
    identities.adopt(str(path), _rows(store), os.stat(path).st_uid)
    assert identities.owner(str(path), 1) == (4242, "4242")
    assert identities.owner(str(path), 2) == (None, None)
    # The row (owner 0) disagrees with the record: the study is set aside, and the record is
    # still the owner.
    assert identities.check_study(str(path), _rows(store)) is not None
    checked = identities.check(str(path), _rows(store), 1)
    assert checked is not None and checked.uid == 4242
    assert "uid 4242" in (identities.aside(str(path)) or "")
    store.close()


def test_studies_open_adopts_the_owner_of_the_file(tmp_path: Path) -> None:
    # Through the registry, as the daemon opens a study: the row says uid 1234; the file is
    # the daemon's (root here). A single-user daemon runs it as itself, as before.
    path = tmp_path / "results.db"
    _study(path, owner_uid=os.geteuid()).close()
    state = DaemonState(str(tmp_path / "state"))
    studies = Studies(state, shared=False)
    store = studies.open(str(path), create=False, owner=None)
    assert store.file_uid == os.stat(path).st_uid  # from the kernel, not from a reply
    assert studies.identities.owner(str(path), 1) == (os.geteuid(), _name(os.geteuid()))
    assert studies.identities.check_study(str(path), store.submission_rows()) is None
    # On a shared daemon a root-owned study's submissions are root's: set aside, not run.
    if os.geteuid() == 0:
        shared = Identities(state, shared=True)
        assert "root" in (shared.check_study(str(path), store.submission_rows()) or "")
    # The value inside is never the owner: edited, it only sets the study aside.
    _row_owner(path, 1234)
    assert "owner_uid 1234" in (
        studies.identities.check_study(str(path), store.submission_rows()) or ""
    )
    assert studies.identities.owner(str(path), 1) == (os.geteuid(), _name(os.geteuid()))
    # Restored, the study may run again (a check at `mosaic resume`).
    _row_owner(path, os.geteuid())
    assert studies.identities.check_study(str(path), store.submission_rows()) is None
    assert studies.identities.aside(str(path)) is None
    # A single-user daemon's older NULL owner means "the daemon's own user": it agrees.
    _row_owner(path, None)
    assert studies.identities.check_study(str(path), store.submission_rows()) is None
    studies.close_all()


def test_a_record_left_by_a_crash_before_the_studys_commit_does_not_own_a_forged_row(
    tmp_path: Path,
) -> None:
    path = tmp_path / "results.db"
    store = _study(path, owner_uid=os.geteuid())
    state = DaemonState(str(tmp_path / "state"))
    state.add_study(str(path))
    identities = Identities(state, shared=False)
    identities.adopt(str(path), _rows(store), os.stat(path).st_uid)
    # The daemon recorded submission 2 and died before the study's COMMIT.
    try:
        with store.transaction():
            store.add_submission(os.geteuid(), "me", "c.ini", PROCESS, {}, [])
            created = store.conn.execute("SELECT created_at FROM submissions WHERE submission_id=2")
            identities.record(str(path), 2, os.geteuid(), "me", created.fetchone()[0])
            raise RuntimeError("the daemon dies")
    except RuntimeError:
        pass
    assert store.conn.execute("SELECT count(*) FROM submissions").fetchone()[0] == 1
    # A row made by hand in its place has the record's owner but not its created_at.
    conn = sqlite3.connect(str(path))
    conn.execute(
        "INSERT INTO submissions (submission_id, created_at, owner_uid, owner, process, monitor)"
        " VALUES (2, 1.0, ?, 'me', '{}', '{}')",
        (os.geteuid(),),
    )
    conn.commit()
    conn.close()
    assert "created_at" in (identities.check_study(str(path), _rows(store)) or "")
    store.close()


def _name(uid: int) -> str:
    import pwd

    return pwd.getpwuid(uid).pw_name
