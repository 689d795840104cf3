"""Dispatch: which queued run goes to which idle worker, and starting it there."""

from __future__ import annotations

import logging
import os
from typing import Any

from mosaic_client import schema
from mosaic_client.contract import RUNNING, checkpoint_path
from mosaicd.executor import BUSY, WorkerHandle
from mosaicd.scheduler_core import ActiveRun, SchedulerCore
from mosaicd.store import RunRecord, Store, StoreError
from mosaicd.submissions import Submission

log = logging.getLogger("mosaicd")


class Dispatch(SchedulerCore):
    """The scheduler's dispatch step (a part of mosaicd.scheduler.Scheduler)."""

    def dispatch(self) -> None:
        if self._holds.all or self.shutting_down:
            return
        for kind in ("cpu", "cuda"):
            for worker in self._executor.idle(kind):
                # No `break` when one worker finds nothing: gpu_available may rule out this
                # GPU's slots and allow the next GPU's.
                self._start_next(worker)

    def _start_next(self, worker: WorkerHandle) -> bool:
        def startable(submission: Submission) -> bool:
            return (
                not self._holds.keeps(submission.owner_uid)
                # A study whose writes wait (locked, disk full) starts nothing until they land.
                and not self._studies.writer(submission.study).blocked
                and submission.running < submission.cap
                and submission.allows(worker.slot)
            )

        found = self._queue.take_next(startable)
        if found is None:
            return False
        return self._start(worker, *found)

    def _start(self, worker: WorkerHandle, submission: Submission, record: RunRecord) -> bool:
        store = self._studies[submission.study]
        run_files = submission.process["run_files_path"]
        from_epoch = record.checkpoint_epoch
        if from_epoch and not os.path.exists(checkpoint_path(run_files, record.run_id)):
            from_epoch = 0
        detail = (
            f"on {worker.slot.label} (worker {worker.worker_id}, pid {worker.pid}) "
            f"from epoch {from_epoch}"
        )

        def start(store: Store) -> None:
            store.truncate_history(record.run_id, from_epoch)
            store.transition(record.run_id, RUNNING, detail)

        try:
            self._studies.writer(submission.study).try_now(start)
        except StoreError:
            # Locked or full: the run stays first in its queue; its study's writer says why.
            self._queue.put_back(submission.study, record)
            return False
        spec: dict[str, Any] = {
            "run_id": record.run_id,
            "process": submission.process,
            "modules": record.modules,
            "seed": record.seed,
            "device": worker.slot.device,
            "run_files_path": run_files,
            "epochs_target": record.epochs_target,
            "start_epoch": from_epoch,
            "checkpoint_every": self._checkpoint_every,
            "max_log_mb": schema.value(schema.MONITOR, submission.monitor, "max_log_mb"),
        }
        worker.become(BUSY)
        worker.run = (submission.study, record.run_id)
        submission.running += 1
        self._active[(submission.study, record.run_id)] = ActiveRun(
            submission.study,
            record,
            submission,
            worker,
            store.pipeline_text(record.run_id),
            epoch=from_epoch,
        )
        self._send(worker, "run")(spec=spec)
        return True
