"""The scheduler: the one object request handlers and the server's loop call.

It owns the daemon's registries (private, declared in mosaicd.scheduling.core): the open studies
(mosaicd.storage.studies), the queue (mosaicd.scheduling.run_queue), the runs being trained and the
holds (mosaicd.scheduling.holds). Its parts live in
their own modules: submission checks and building (mosaicd.scheduling.submissions), dispatch
(mosaicd.scheduling.dispatch, then mosaicd.scheduling.preemption), worker events
(mosaicd.scheduling.worker_events), control requests
(mosaicd.scheduling.control), more repetitions of configuration groups
(mosaicd.scheduling.repetitions) and the replies that describe the state (mosaicd.scheduling.views).

All state that must survive a restart is in the study databases (through Store.transition) and
the daemon's state database (holds, known studies, every submission's owner:
mosaicd.storage.identity); what is kept here in memory is derived from
them at start-up and is only there to answer `status` and to dispatch without scanning the
databases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mosaic_client.protocol import (
    ErrorCode,
    PendingItem,
    ShowReply,
    StatusReply,
    StudyItem,
    SubmitReply,
)
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.keeper.link import CALL_TIMEOUT_S, PER_ROW_S
from mosaicd.owners import Owner
from mosaicd.scheduling import views
from mosaicd.scheduling.control import Control
from mosaicd.scheduling.preemption import Preempting
from mosaicd.scheduling.repetitions import Repetitions
from mosaicd.scheduling.submissions import build_runs, build_search_runs, check_submission
from mosaicd.scheduling.worker_events import WorkerEvents
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.store import RunRecord, StoreError

log = logging.getLogger("mosaicd")


class Scheduler(Preempting, WorkerEvents, Repetitions, Control):
    """The queue and the life of runs; its registries are declared in mosaicd.scheduling.core."""

    def recover(self) -> None:
        """Reopen the known studies; runs that were running go back to the queue."""
        for path, store in self._studies.reopen_known():
            # Owners come from the daemon's state: a study whose rows disagree is set aside
            # (mosaicd.storage.identity); its runs are queued again as any study's, not started.
            try:
                self._identities.check_study(path, store.submission_rows())
            except StoreError as exc:
                self._identities.set_aside(path, f"its submissions cannot be read ({exc})")

            def enqueue(queued: Any, path: str = path, store: StudyHandle = store) -> None:
                for record in queued:
                    self._queue.add(path, store, RunRecord(**record))
                log.info("study %s: %s", path, dict(store.counts))

            # A study locked or full at start-up waits (mosaicd.storage.writer); the others start.
            self._studies.writer(path).write(
                "requeue the runs of the previous daemon", "requeue_interrupted", {}, enqueue
            )

    def submit(
        self,
        db: str,
        config_path: str,
        process: dict[str, Any],
        monitor: dict[str, Any],
        pipelines: list[Any],
        owner_uid: int | None,
        owner: str | None,
        acting_for: Owner | None = None,
        priority: int = 0,
        search: dict[str, Any] | None = None,
    ) -> SubmitReply:
        """Check a submission, then queue its runs in one transaction. The run-files directory
        and a new study file are made by `acting_for`'s keeper (mosaicd.keeper; None: the
        daemon's own user) with the submission's umask, so they are that user's; the
        directory only once the submission is known to be good (a refused one leaves nothing)."""
        self._executor.check_submission(process, pipelines, acting_for)
        check_submission(process, monitor, pipelines, self._executor.slot_count("cuda"), search)
        search_runs = None
        if search is None:
            runs = build_runs(process, monitor, pipelines, owner_uid, owner)
        else:
            runs, search_runs = build_search_runs(process, pipelines, search, owner_uid, owner)
        umask = owners.umask_of(monitor)
        if owner_uid is None:
            raise Refused(ErrorCode.PERMISSION, "the daemon could not learn who you are")
        uid: int = owner_uid
        problem = self.limit_problem(uid, owner or str(uid), len(runs))
        if problem:
            raise Refused(ErrorCode.INVALID, f"{problem}. Nothing was queued.")
        keeper = self._studies.keepers.of(acting_for)
        try:
            keeper.call(
                "make_dirs",
                None,
                {"path": process["run_files_path"], "umask": umask if acting_for else None},
            )
        except StoreError as exc:
            raise Refused(
                ErrorCode.PERMISSION,
                f"{process['run_files_path']}: you may not create it ({exc}). Nothing was queued.",
            ) from None
        store = self._studies.open(db, create=True, owner=acting_for, umask=umask)
        batch = {
            "owner_uid": uid,
            "owner": owner or "",
            "config_path": config_path,
            "process": process,
            "monitor": monitor,
            "runs": [list(run) for run in runs],
            "priority": priority,
            "search": search,
            "search_runs": search_runs,
        }

        def record(added: Any) -> None:
            # Its owner, from the kernel, in the daemon's state: just before the study's COMMIT
            # (mosaicd.storage.identity says what a crash in between leaves).
            submission_id, _, created_at = added[0]
            self._identities.record(db, submission_id, uid, owner or str(uid), created_at)

        try:
            added = self._studies.writer(db).try_now(
                "add_submissions", {"batches": [batch]}, record, _rows_timeout(len(runs))
            )
        except StoreError as exc:
            raise Refused(
                ErrorCode.INVALID, f"{exc}; nothing was queued: submit again once it is solved"
            ) from None
        submission_id, run_ids, _ = added[0]
        self._enqueue_new(db, store, run_ids)
        return {
            "db": db,
            "submission_id": submission_id,
            "run_ids": run_ids,
            "paused": self._holds.holds_submissions_of(owner_uid),
        }

    # -- replies that describe the state (mosaicd.scheduling.views)
    # --------------------------------------

    def status(
        self,
        db: str | None,
        limit: int,
        uid: int | None,
        mine: bool,
        submission: int | None = None,
        readable: Callable[[list[str]], set[str]] | None = None,
        users: bool = False,
    ) -> StatusReply:
        reply = views.status(
            self._studies,
            self._active,
            self._queue,
            self._executor,
            self._holds,
            db,
            limit,
            uid,
            mine,
            submission,
            readable,
        )
        if users:
            reply["users"] = views.user_table(
                self._queue, self._active, self._usage, self._shares, self._limits
            )
        return reply

    def show(self, db: str, run_id: int) -> ShowReply:
        return views.show(
            self._studies, self._active, self._queue, db, run_id, self.wait_reason(db, run_id)
        )

    def pending(self, db: str | None, owner_uid: int | None, everyone: bool) -> list[PendingItem]:
        return views.pending(self._queue, db, owner_uid, everyone)

    def studies(self, visible: Callable[[list[str]], set[str]]) -> list[StudyItem]:
        """The studies served, those `visible` to the caller."""
        return views.study_list(self._studies, visible)

    def status_line(self) -> str:
        """The one-line state for systemd (sd_notify STATUS=)."""
        text = (
            ", ".join(f"{n} {state}" for state, n in self._studies.counts().items() if n)
            or "no runs"
        )
        return f"STATUS={'paused; ' if self._holds.all else ''}{text}"

    # -- the daemon's end ---------------------------------------------------------------------

    def running(self) -> int:
        """How many runs workers are training."""
        return len(self._active)

    def begin_shutdown(self) -> None:
        """Start no run again, and ask the training ones to checkpoint and stop."""
        self.shutting_down = True
        self.park_all()

    def close(self) -> None:
        """Close the study databases (runs still marked running resume at the next start).
        Writes still waiting for a lock get a few seconds more; what a full disk or a lock
        still holds back is lost with the daemon, and the next start goes on from the last
        written state (runs marked running resume from their checkpoints)."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(w.waiting for _, w in self._studies.writers()):
            self._studies.flush(force=True)
            time.sleep(0.2)
        for path, writer in self._studies.writers():
            if writer.waiting:
                log.error("%s: %d write(s) not written: %s", path, writer.waiting, writer.problem)
        self._studies.close_all()


def _rows_timeout(rows: int) -> float:
    """How long a keeper may take to write a submission of `rows` runs."""
    return CALL_TIMEOUT_S + PER_ROW_S * rows * 8
