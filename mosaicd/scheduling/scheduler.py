"""The scheduler: the one object request handlers and the server's loop call.

It owns the daemon's registries (private, declared in mosaicd.scheduling.core): the open studies
(mosaicd.storage.studies), the queue (mosaicd.scheduling.run_queue), the runs being trained and the
holds (mosaicd.scheduling.holds). Its parts live in
their own modules: submission checks and building (mosaicd.scheduling.submissions), taking a
submission in bounded steps (mosaicd.scheduling.taking), dispatch
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

from mosaic_client.protocol import PendingItem, ShowReply, StatusReply, StudyItem
from mosaicd.scheduling import views
from mosaicd.scheduling.control import Control
from mosaicd.scheduling.preemption import Preempting
from mosaicd.scheduling.repetitions import Repetitions
from mosaicd.scheduling.taking import Submitting
from mosaicd.scheduling.worker_events import WorkerEvents
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.store import RunRecord, StoreError

log = logging.getLogger("mosaicd")


class Scheduler(Submitting, Preempting, WorkerEvents, Repetitions, Control):
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
        self.save_usage()
        for path, writer in self._studies.writers():
            if writer.waiting:
                log.error("%s: %d write(s) not written: %s", path, writer.waiting, writer.problem)
        self._studies.close_all()
