"""Whose a submission is (issue 24): from the kernel, kept where only the daemon writes.

A study is a file its user owns and may edit, so nothing the daemon runs is decided by a value
inside it. At submit (and `repeat`), the caller's uid as the kernel gave it (SO_PEERCRED through
ZAP) and name are recorded in the daemon's state database (DaemonState.submission_owners),
within the study's own transaction: the keeper that writes the study holds its transaction open
until the daemon has written the record, then commits (mosaicd.storage.writer, before_commit).

- Crash window: the daemon dies (or the COMMIT fails) after the record and before the study's
  COMMIT. The study rolls back; the state keeps a record of a submission id the study lacks.
  The next submission given that id replaces it (INSERT OR REPLACE), and a row put there by
  hand meanwhile does not match the record's `created_at` (a float the daemon chose): its
  study is set aside. The opposite order cannot happen: no study commits a submission whose
  record was not written first.
- Older studies: a submission with no record, in a study the daemon has not yet adopted, takes
  the owner of the study FILE (os.stat, by the daemon: never a value inside it), once per study
  (DaemonState.owners_adopted); from then on, its record.
- Every check here compares the study's rows with the records: a submission whose
  `owner_uid` (NULL read as the daemon's own user, as earlier releases wrote it) or
  `created_at` differs from its record, one with no record in an adopted study, one whose owner
  would be root on a shared daemon (`--socket-group`), or one this daemon cannot run as its owner
  sets its study ASIDE: none of the study's runs is dispatched (they stay as they are, queued
  or parked), the reason is logged and shown by `mosaic status`, and nothing in the study is
  changed. `mosaic resume` (or a restart) checks a set-aside study again: once its rows agree
  (restored by its owner or an administrator), its runs start; or its runs can be cancelled.
"""

from __future__ import annotations

import logging
import os
import pwd
from typing import Any

from mosaicd import owners
from mosaicd.storage.state import DaemonState, OwnerRecord

log = logging.getLogger("mosaicd")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Identities:
    """The submissions' owners of every study (from the daemon's state) and the studies set
    aside because their rows disagree with them."""

    def __init__(self, state: DaemonState, shared: bool) -> None:
        self._state = state
        self.shared = shared  # a daemon serving several users (--socket-group)
        self._aside: dict[str, str] = {}  # study -> why none of its runs starts

    # -- recording ----------------------------------------------------------------------------

    def record(
        self, study: str, submission_id: int, uid: int, name: str, created_at: float | None
    ) -> None:
        """Record the owner of a submission just added to the study, inside its transaction
        (the study's COMMIT follows: see the module's crash window)."""
        self._state.record_owner(study, submission_id, uid, name, created_at)

    def adopt(self, study: str, rows: list[list[Any]], file_uid: int) -> None:
        """Once per study: its submissions with no record (queued before owners were kept in
        the daemon's state) take the owner of the study file, `file_uid` (the kernel's fstat of
        the file its keeper opened). `rows`: the study's [submission_id, owner_uid, created_at]."""
        if self._state.owners_adopted(study):
            return
        recorded = self._state.owner_records(study)
        rows = [[row[0], row[2]] for row in rows]
        name = user_name(file_uid)
        conn = self._state.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for submission_id, created_at in rows:
                if submission_id not in recorded:
                    self._state.record_owner(
                        study, submission_id, file_uid, name, created_at, adopted=True
                    )
            self._state.set_owners_adopted(study)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        adopted = sum(1 for r in rows if r[0] not in recorded)
        if adopted:
            log.info(
                "study %s: %d submission(s) queued before owners were kept by the daemon: "
                "adopted as %s's, the owner of the file",
                study,
                adopted,
                name,
            )

    # -- reading ------------------------------------------------------------------------------

    def owner(self, study: str, submission_id: int) -> tuple[int | None, str | None]:
        """The recorded owner (uid, name); (None, None) when none is recorded: then only
        administrators may act on its runs, and it never starts."""
        record = self._state.owner_record(study, submission_id)
        return (record.uid, record.name) if record is not None else (None, None)

    def records(self, study: str) -> dict[int, OwnerRecord]:
        """Every submission's recorded owner in the study."""
        return self._state.owner_records(study)

    def check(self, study: str, rows: list[list[Any]], submission_id: int) -> OwnerRecord | None:
        """The submission's record, once its row (among the study's `rows`) is compared with
        it: a disagreement sets the study aside (and the record, never the row, is still what
        is returned)."""
        record = self._state.owner_record(study, submission_id)
        row = next((tuple(r[1:]) for r in rows if r[0] == submission_id), None)
        problem = self._problem(submission_id, record, row)
        if problem:
            self.set_aside(study, problem)
        return record

    def check_study(self, study: str, rows: list[list[Any]]) -> str | None:
        """Compare every submission of the study (its `rows`) with its record; set it aside
        (or lift its set-aside) accordingly. Returns why it is set aside, or None."""
        records = self._state.owner_records(study)
        for submission_id, owner_uid, created_at in rows:
            problem = self._problem(
                submission_id, records.get(submission_id), (owner_uid, created_at)
            )
            if problem:
                self.set_aside(study, problem)
                return self._aside[study]
        if self._aside.pop(study, None) is not None:
            log.warning("study %s agrees with the daemon's records again: runs may start", study)
        return None

    def _problem(
        self, submission_id: int, record: OwnerRecord | None, row: tuple[object, ...] | None
    ) -> str | None:
        """Why a submission may not run, or None."""
        if row is None:
            return None  # not in the study (a rolled-back one): nothing of it can be queued
        if record is None:
            return (
                f"submission {submission_id} has no owner recorded by the daemon: it was not "
                "queued through it"
            )
        owner_uid, created_at = row
        said = os.geteuid() if owner_uid is None else owner_uid
        moved = record.created_at is not None and created_at != record.created_at
        if said != record.uid or moved:
            return (
                f"submission {submission_id} was changed outside the daemon: the study says "
                f"owner_uid {owner_uid}, created_at {created_at}; the daemon recorded "
                f"{record.name} (uid {record.uid}), created_at {record.created_at}"
            )
        if self.shared and record.uid == 0:
            return (
                f"submission {submission_id} is root's (uid 0): a shared daemon runs no one's "
                "code as root"
            )
        if record.uid != os.geteuid() and not owners.can_switch():
            return (
                f"submission {submission_id} is {record.name}'s (uid {record.uid}) and this "
                f"daemon (uid {os.geteuid()}) cannot run anything as another user"
            )
        return None

    # -- set aside ----------------------------------------------------------------------------

    def set_aside(self, study: str, problem: str) -> None:
        if study in self._aside:
            return
        self._aside[study] = (
            f"set aside: {problem}. None of its runs starts until its rows agree with the "
            "daemon's records again (then `mosaic resume`), or they are cancelled "
            "(docs/deployment.md, Who a run's owner is)"
        )
        log.error("study %s %s", study, self._aside[study])

    def aside(self, study: str) -> str | None:
        """Why the study's runs are not started, or None."""
        return self._aside.get(study)

    def aside_studies(self) -> list[str]:
        return list(self._aside)

    def forget(self, study: str) -> None:
        self._aside.pop(study, None)
