"""Preemption at epoch boundaries (issue 27; off by default, `mosaicd --preempt-after SECONDS`).

After each dispatch pass, on a shared daemon: a user whose queued run could start but finds no
slot (none free, none of theirs on its way) has waited for `preempt_after` seconds, and a user
above their share holds a slot their run could use: that worker's run (its whole ensemble
group: they train in one process) is asked to park at its next epoch boundary, as `pause --now`
parks it. Once parked, the run is queued again by itself (WorkerEvents._on_parked) and the slot
goes to the waiting user, as fair share orders it; the run resumes later from its checkpoint,
and its per-epoch records equal an uninterrupted run's (tests/test_preemption_box.py). Which
worker to preempt is decided by fair_share.preempt_choice, a pure function.
"""

from __future__ import annotations

import logging
import time

from mosaicd.executors.base import WorkerHandle
from mosaicd.scheduling.dispatch import Dispatch
from mosaicd.scheduling.fair_share import Preemption, preempt_choice, standing

log = logging.getLogger("mosaicd")

# The preemption check looks at the whole queue: at most this often (s), not at every pass.
CHECK_EVERY_S = 1.0


class Preempting(Dispatch):
    """Dispatch, then preemption (a part of mosaicd.scheduling.scheduler.Scheduler)."""

    def dispatch(self) -> None:
        super().dispatch()
        now = time.time()
        if self._preempt_after > 0 and now - self._preempt_checked >= CHECK_EVERY_S:
            self._preempt_checked = now
            self._preempt(now)

    def _preempt(self, now: float) -> None:
        if not self._identities.shared or self._holds.all or self.shutting_down:
            self._waiting_since.clear()
            return
        # A park request is in flight until every run it named has left its worker (parked,
        # or ended otherwise before its next epoch boundary).
        self._preempting = {
            uid: keys
            for uid, keys in self._preempting.items()
            if any(key in self._active for key in keys)
        }
        busy = self._preemptible()
        # Whether a submission's run could start on each busy worker's slot, were it free.
        could_start = {
            worker_id: self._startable(worker, any_owner=True)
            for worker_id, (worker, _, _) in busy.items()
        }
        names: dict[int, str] = {}
        fits: dict[int, set[str]] = {}
        for submission, _ in self._queue.queued_counts():
            uid = submission.owner_uid
            if uid is None or self._has_worker_for(submission.run_as_uid):
                continue
            usable = {
                worker_id
                for worker_id, (_, owner, _) in busy.items()
                if owner != uid and could_start[worker_id](submission)
            }
            if usable:
                fits.setdefault(uid, set()).update(usable)
                names.setdefault(uid, submission.owner or str(uid))
        # Waiting since first seen waiting; a user who stops waiting starts over.
        self._waiting_since = {uid: self._waiting_since.get(uid, now) for uid in fits}
        # The newest run first: the runs nearest their end are left to finish.
        order = sorted(busy, key=lambda worker_id: -busy[worker_id][2])
        choice = preempt_choice(
            {uid: now - since for uid, since in self._waiting_since.items()},
            [(worker_id, busy[worker_id][1]) for worker_id in order],
            self._usage.usage,
            self._shares,
            self._preempt_after,
            in_flight=set(self._preempting),
            fits=lambda uid, worker_id: worker_id in fits.get(uid, set()),
        )
        if choice is not None:
            self._park_for(busy[choice.worker_id][0], choice, names[choice.waiter])

    def _preemptible(self) -> dict[str, tuple[WorkerHandle, int, float]]:
        """The busy workers none of whose runs is parking or being killed: worker id ->
        (worker, owner uid, when its newest run started)."""
        busy: dict[str, tuple[WorkerHandle, int, float]] = {}
        excluded: set[str] = set()
        for run in self._active.values():
            worker, uid = run.worker, run.submission.owner_uid
            if run.park_sent or worker.killed_for is not None or uid is None:
                excluded.add(worker.worker_id)
                continue
            seen = busy.get(worker.worker_id)
            busy[worker.worker_id] = (worker, uid, max(run.started, seen[2] if seen else 0.0))
        return {k: v for k, v in busy.items() if k not in excluded}

    def _park_for(self, worker: WorkerHandle, choice: Preemption, name: str) -> None:
        """Ask the worker's runs (all of its ensemble group: one process trains them) to park
        at their next epoch boundary, for the waiting user; they are queued again once parked."""
        runs = [run for run in self._active.values() if run.worker is worker]
        for run in runs:
            self._send(worker, "park")(run_id=run.record.run_id)
            run.park_sent = True
            run.preempted_for = name
        self._preempting[choice.waiter] = {(run.study, run.record.run_id) for run in runs}
        usage, shares = self._usage.usage, self._shares
        log.info(
            "preemption: run(s) %s on %s park at their next epoch boundary for %s's share "
            "(usage per share %.3g, against the runs' owner's %.3g)",
            sorted(run.record.run_id for run in runs),
            worker.slot.label,
            name,
            standing(choice.waiter, usage, shares),
            standing(choice.victim, usage, shares),
        )
