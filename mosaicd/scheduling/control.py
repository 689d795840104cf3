"""Control of runs and holds on request: hold/release (pause/resume), park, cancel, rerun and
rekey. Every change goes through a study's writer (one transaction each, in its keeper)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mosaic_client.contract import (
    CANCELLED,
    DONE,
    FAILED,
    HOLD_ALL,
    HOLD_OWNER,
    PARKED,
    QUEUED,
    RUNNING,
)
from mosaic_client.protocol import (
    CancelReply,
    ErrorCode,
    PauseReply,
    PriorityReply,
    RecordPlanReply,
    RekeyReply,
    RerunReply,
    ResumeReply,
)
from mosaicd.errors import Refused
from mosaicd.keeper.operations import SELECT_BUDGET_S
from mosaicd.scheduling.core import SchedulerCore, served
from mosaicd.scheduling.plans import plan_row
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.store import RunRecord, StoreError

log = logging.getLogger("mosaicd")

# The caller's rights over runs, checked by the request handler: given each selected run's
# (run id, owner uid, owner name) and whether the caller named those run ids themself (-id,
# rekey), it raises Refused when the caller may not change one. Its message may name a run only
# when the caller named it: ids a -request computed are values of the study, never echoed.
# None: the caller may change every run (an administrator).
OwnerCheck = Callable[[list[tuple[int, int | None, str | None]], bool], None] | None


class Control(SchedulerCore):
    """The scheduler's control requests (a part of mosaicd.scheduling.scheduler.Scheduler)."""

    # -- holds and parking --------------------------------------------------------------------

    def hold(self, now: bool, owner_uid: int | None = None) -> PauseReply:
        """Start no new runs: of anyone (None), or of one owner's submissions; `now` also parks
        the runs training."""
        self._holds.hold(owner_uid)
        parked = self.park_all(owner_uid) if now else 0
        return {
            "paused": True,
            "parking": parked,
            "scope": HOLD_ALL if owner_uid is None else HOLD_OWNER,
        }

    def park_all(self, owner_uid: int | None = None) -> int:
        """Ask the runs training (of one owner, or all) to park at their next epoch boundary."""
        count = 0
        for run in self._active.values():
            if owner_uid is not None and run.submission.owner_uid != owner_uid:
                continue
            if not run.park_sent:
                self._send(run.worker, "park")(run_id=run.record.run_id)
                run.park_sent = True
                count += 1
        return count

    def release(self, owner_uid: int | None = None) -> ResumeReply:
        """Release the holds (every hold, or one owner's) and queue the parked runs again."""
        self._holds.release(owner_uid)
        # `mosaic resume` is also how a user says "space is freed": write what waits first.
        self._studies.flush(force=True)
        # And how a set-aside study's rows, restored, are looked at again.
        for path in self._identities.aside_studies():
            store = self._studies.get(path)
            if store is not None:
                self._check_again(path, store)
        resumed = 0
        for path, store in self._studies.items():
            try:
                owned = self._owned_by(path, store, owner_uid)
                parked = [r for r in store.runs_in_state(PARKED) if owned(r.submission_id)]
            except StoreError as exc:
                log.warning("resume: %s: %s", path, exc)
                continue

            def enqueue(records: Any, path: str = path, store: StudyHandle = store) -> None:
                for record in records:
                    self._queue.add(path, store, RunRecord(**record))

            if parked:
                ids = sorted({r.submission_id for r in parked})
                self._studies.writer(path).write(
                    "resume parked runs", "resume_parked", {"submission_ids": ids}, enqueue
                )
            resumed += len(parked)
        return {
            "paused": self._holds.all,
            "resumed": resumed,
            "scope": HOLD_ALL if owner_uid is None else HOLD_OWNER,
        }

    def _enqueue_new(self, db: str, store: StudyHandle, run_ids: list[int]) -> None:
        """Queue runs just committed to the study. Their records are read back in bulk; a
        keeper that stops answering now sets the study aside: `mosaic resume` queues them."""
        try:
            records = store.run_records(run_ids)
        except StoreError as exc:
            self._identities.set_aside(db, f"its new runs could not be read back ({exc})")
            return
        for record in records:
            self._queue.add(db, store, record)

    def _check_again(self, path: str, store: StudyHandle) -> None:
        """A set-aside study looked at again (`mosaic resume`): once it agrees with the records,
        its queued runs that the queue lost (it could not read them) are queued again."""
        try:
            if self._identities.check_study(path, store.submission_rows()) is None:
                for record in store.runs_in_state(QUEUED):
                    if self._queue.ahead_of(path, record.run_id) is None:
                        self._queue.add(path, store, record)
        except StoreError as exc:
            log.warning("study %s still cannot be read: %s", path, exc)

    def _owned_by(
        self, path: str, store: StudyHandle, owner_uid: int | None
    ) -> Callable[[int], bool]:
        """Whether a submission of this study is of the owner (every one: None)."""

        def owned(submission_id: int) -> bool:
            if owner_uid is None:
                return True
            return self._queue.submission(path, store, submission_id).owner_uid == owner_uid

        return owned

    # -- runs chosen by a selection -----------------------------------------------------------

    def _select(self, db: str, selection: dict[str, Any], check: OwnerCheck) -> list[int]:
        """The selected run ids, once the caller's rights over each are checked. The handler
        has checked that the caller may read the study (its SQL runs with the rights the study
        was opened with); a study the daemon does not serve is refused before anything runs.
        Only ids of runs the study holds are selected (selections.resolve), and no message
        repeats what a -request computed."""
        store = served(self._studies, db)
        # Run by the study's keeper on a read-only connection, on a time budget there (an
        # endless recursive CTE stops that keeper only).
        try:
            run_ids = list(store.call("select", timeout=SELECT_BUDGET_S + 1.0, selection=selection))
        except StoreError as exc:
            raise Refused(ErrorCode.INVALID, str(exc)) from None
        self._check_owners(db, store, run_ids, check, named=selection.get("kind") == "ids")
        return run_ids

    def cancel(
        self, db: str, selection: dict[str, Any], reason: str, check: OwnerCheck
    ) -> CancelReply:
        run_ids = self._select(db, selection, check)
        store = self._studies[db]
        writer = self._studies.writer(db)
        cancelled, skipped = [], []
        for run_id in run_ids:
            status = store.status_of(run_id)
            running = status == RUNNING and (db, run_id) in self._active
            if status not in (QUEUED, PARKED) and not running:
                skipped.append(run_id)
                continue
            detail = f"{reason} (while running)" if running else reason

            # Written now, or once the study's lock goes (mosaicd.storage.writer): decided then
            # on the state it finds.
            writer.write(f"cancel run {run_id}", "cancel", {"run_id": run_id, "detail": detail})
            self._queue.drop(db, run_id)
            if running:
                worker = self._active[(db, run_id)].worker
                if len(worker.group) > 1:
                    # Killing the worker would take the rest of its ensemble: the member stops
                    # at its next epoch boundary and the worker reports it (WorkerEvents).
                    self._send(worker, "cancel")(run_id=run_id)
                else:
                    self._executor.kill(worker, "cancelled")
            cancelled.append(run_id)
        return {"selected": run_ids, "cancelled": cancelled, "skipped": skipped}

    def rerun(
        self, db: str, selection: dict[str, Any], epochs: int, check: OwnerCheck
    ) -> RerunReply:
        run_ids = self._select(db, selection, check)
        if epochs < 1:
            raise Refused(ErrorCode.INVALID, f"-epochs must be at least 1, got {epochs}")
        store = self._studies[db]
        queued, skipped = [], []
        for run_id in run_ids:
            status = store.status_of(run_id)
            if status in (DONE, FAILED, CANCELLED):

                def enqueue(fresh: Any) -> None:
                    if fresh:
                        self._queue.add(db, store, RunRecord(**fresh))

                # Continued from the last checkpoint, for `epochs` more (decided when written).
                self._studies.writer(db).write(
                    f"rerun run {run_id}", "rerun", {"run_id": run_id, "epochs": epochs}, enqueue
                )
                queued.append(run_id)
            else:
                skipped.append(run_id)
        return {"selected": run_ids, "queued": queued, "skipped": skipped}

    def rekey(self, db: str, changes: list[tuple[int, str, str]], check: OwnerCheck) -> RekeyReply:
        """Write `{type}_key` params: each change is (run id, param name, key)."""
        store = served(self._studies, db)
        unknown = sorted({c[0] for c in changes if store.status_of(c[0]) is None})
        if unknown:
            raise Refused(
                ErrorCode.NOT_FOUND,
                f"no run {', '.join(map(str, unknown[:10]))} in {db}; nothing was changed",
            )
        self._check_owners(db, store, sorted({c[0] for c in changes}), check, named=True)
        self._studies.writer(db).write(
            f"rekey {len(changes)} param(s)", "set_params", {"changes": [list(c) for c in changes]}
        )
        return {"changed": len(changes)}

    def set_priority(
        self, db: str, priority: int, submission: int | None, caller_uid: int | None, admin: bool
    ) -> PriorityReply:
        """Set the priority of one submission of the study, or of every one of the caller's
        (an administrator's: every one), among their owner's runs. Owners are the daemon's
        records (mosaicd.storage.identity)."""
        served(self._studies, db)
        records = self._identities.records(db)
        if submission is not None:
            record = records.get(submission)
            if record is None:
                raise Refused(
                    ErrorCode.NOT_FOUND, f"no submission {submission} in {db}; nothing changed"
                )
            if not admin and record.uid != caller_uid:
                raise Refused(
                    ErrorCode.PERMISSION,
                    f"submission {submission} belongs to {record.name}; only its owner or an "
                    "administrator may set its priority. Nothing was changed.",
                )
            targets = [submission]
        else:
            targets = sorted(s for s, r in records.items() if admin or r.uid == caller_uid)
        if targets:
            self._studies.writer(db).write(
                f"priority {priority} for submission(s) {targets}",
                "set_priority",
                {"submission_ids": targets, "priority": priority},
            )
        for loaded in self._queue.loaded(db):
            if loaded.submission_id in targets:
                loaded.priority = priority
        return {"submissions": targets, "priority": priority}

    def record_plan(
        self, db: str, plan: dict[str, Any], caller_uid: int | None, admin: bool
    ) -> RecordPlanReply:
        """Keep a `compare --until-decided` plan (and the alpha it spent) in the study, for a
        caller who owns a submission of it (the daemon's records) or an administrator."""
        served(self._studies, db)
        if not admin and not any(
            r.uid == caller_uid for r in self._identities.records(db).values()
        ):
            raise Refused(
                ErrorCode.PERMISSION,
                f"you own no submission in {db}; only those who queued runs into a study, or "
                "an administrator, may record a plan in it. Nothing was recorded.",
            )
        row = plan_row(plan)
        try:
            plan_id = self._studies.writer(db).try_now("record_plan", {"plan": row})
        except StoreError as exc:
            raise Refused(
                ErrorCode.INVALID, f"{exc}; the plan was not recorded: record it again later"
            ) from None
        return {"db": db, "plan_id": plan_id}

    def _check_owners(
        self, db: str, store: StudyHandle, run_ids: list[int], check: OwnerCheck, named: bool
    ) -> None:
        """The caller's rights over the runs, with each run's owner from the daemon's records
        (mosaicd.storage.identity), never from the study. `named`: the caller named these runs
        (-id, rekey), so a refusal may name one; never a -request's."""
        if check is not None:
            owners = [(run_id, *self._owner_of_run(db, store, run_id)) for run_id in run_ids]
            check(owners, named)

    def _owner_of_run(
        self, db: str, store: StudyHandle, run_id: int
    ) -> tuple[int | None, str | None]:
        submission_id = store.submission_of(run_id)
        if submission_id is None:
            return None, None
        return self._identities.owner(db, submission_id)
