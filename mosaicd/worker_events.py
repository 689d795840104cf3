"""What each worker event means for its run: an epoch, a result, a failure, a park, the worker's
end, a timeout."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mosaic_client.contract import CANCELLED, FAILED, PARKED, QUEUED, RUNNING, run_log_path
from mosaicd.executor import IDLE, STOPPING, WorkerHandle
from mosaicd.pool import describe_exit
from mosaicd.scheduler_core import ActiveRun, SchedulerCore

log = logging.getLogger("mosaicd")


class WorkerEvents(SchedulerCore):
    """The scheduler's worker events (a part of mosaicd.scheduler.Scheduler)."""

    def on_message(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """One message of mosaic_client.protocol.WORKER_MESSAGES from a worker."""
        kind = message["type"]
        if kind == "hello":
            self._executor.said_hello(worker)
        elif kind == "epoch":
            self._on_epoch(worker, message)
        elif kind == "done":
            self._on_done(worker, message)
        elif kind == "failed":
            self._on_failed(worker, message)
        elif kind == "parked":
            self._on_parked(worker, message)
        elif kind == "cancelled":
            self._on_cancelled(worker, message)
        elif kind == "fallback":
            self._on_fallback(worker, message)

    def _active_for(self, worker: WorkerHandle, run_id: int) -> ActiveRun | None:
        if worker.run is None or run_id not in (worker.group or {worker.run[1]}):
            log.warning("worker %s reported run %s it is not running", worker.worker_id, run_id)
            return None
        return self._active.get((worker.run[0], run_id))

    def _ended(self, worker: WorkerHandle, message: dict[str, Any]) -> ActiveRun | None:
        """The run a worker says has ended (done, failed, parked), its epochs written first."""
        run = self._active_for(worker, message["run_id"])
        if run is not None:
            self.flush_epochs()
            if run.group and self._studies[run.study].status_of(run.record.run_id) != RUNNING:
                # Cancelled while its ensemble trained: the worker has only now let it go.
                self._finish(run, worker, recycle=False)
                return None
        return run

    def _on_epoch(self, worker: WorkerHandle, event: dict[str, Any]) -> None:
        run = self._active_for(worker, event["run_id"])
        if run is None:
            return
        run.epoch, run.train_loss, run.test_loss = (
            event["epoch"],
            event["train_loss"],
            event["test_loss"],
        )
        self._pending_epochs.setdefault(run.study, []).append(event)

    def flush_epochs(self) -> None:
        """Write the epochs received since the last flush, one transaction per study."""
        for study, events in self._pending_epochs.items():
            if events:
                self._studies[study].record_epochs(events)
        self._pending_epochs.clear()

    def _finish(self, run: ActiveRun, worker: WorkerHandle, recycle: bool) -> None:
        self._active.pop((run.study, run.record.run_id), None)
        worker.runs_done += 1
        if worker.group:
            worker.group.discard(run.record.run_id)
            worker.recycle_after_group |= recycle
            if worker.group:  # the rest of its ensemble still trains on this worker
                worker.run = (run.study, min(worker.group))
                return
            recycle = worker.recycle_after_group
        run.submission.running -= 1
        worker.run = None
        max_runs = self._executor.max_runs
        if recycle or (max_runs and worker.runs_done >= max_runs):
            worker.become(STOPPING)
            self._send(worker, "exit")()
        else:
            worker.become(IDLE)

    def _on_done(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        run = self._ended(worker, message)
        if run is None:
            return
        results = message["results"]
        summary = (
            f"done: {results.get('epochs')} epochs, train_loss "
            f"{results.get('train_loss'):.6g}, test_loss {results.get('test_loss'):.6g}"
        )
        self._studies[run.study].finish_run(run.record.run_id, results, summary)
        self._finish(run, worker, recycle=False)

    def _on_failed(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        run = self._ended(worker, message)
        if run is None:
            return
        text = f"{message['error']}\n\n{message['traceback']}"
        self._studies[run.study].transition(
            run.record.run_id, FAILED, message["error"][:500], return_status=text
        )
        # A failed run may have left the process in any state: start the next one fresh.
        self._finish(run, worker, recycle=True)

    def _on_parked(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        run = self._ended(worker, message)
        if run is None:
            return
        store = self._studies[run.study]
        run_id = run.record.run_id
        store.set_checkpoint_epoch(run_id, message["epoch"])
        if self.shutting_down:
            store.transition(
                run_id, QUEUED, f"daemon stopping; checkpointed at epoch {message['epoch']}"
            )
        else:
            store.transition(run_id, PARKED, f"parked at epoch {message['epoch']}")
        self._finish(run, worker, recycle=False)

    def _on_cancelled(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        # A member of an ensemble stopped on a `cancel`; the daemon set its state already.
        run = self._ended(worker, message)
        if run is not None:
            self._studies[run.study].transition(
                run.record.run_id, CANCELLED, f"cancelled after epoch {message['epoch']}"
            )
            self._finish(run, worker, recycle=False)

    def _on_fallback(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """The worker trains an ensemble's members one by one: record why, for `mosaic show`."""
        if worker.run is None:
            return
        run_ids = [int(r) for r in message["run_ids"] if int(r) in worker.group]
        if run_ids:
            self._studies[worker.run[0]].set_ensemble_fallback(run_ids, message["reason"][:1000])

    def on_worker_exit(self, worker: WorkerHandle, code: int) -> None:
        """A worker ended: fail (or retry) its runs (a run, or an ensemble's members) if it had
        any, and replace the worker."""
        if worker.run is not None:
            study = worker.run[0]
            runs = [
                self._active.pop((study, run_id))
                for run_id in sorted(worker.group or {worker.run[1]})
                if (study, run_id) in self._active
            ]
            if runs:
                runs[0].submission.running -= 1  # the worker's one place in nb_processus
                self.flush_epochs()
            for run in runs:
                self._settle_run_of_dead_worker(run, worker, code)
            worker.group = set()
        if not self.shutting_down:
            self._executor.replace(worker, code)

    def _settle_run_of_dead_worker(self, run: ActiveRun, worker: WorkerHandle, code: int) -> None:
        store = self._studies[run.study]
        run_id = run.record.run_id
        if worker.killed_for:
            cause = worker.killed_for
        else:
            cause = f"worker (pid {worker.pid}, {worker.slot.label}) {describe_exit(code)}"
        tail = _log_tail(run_log_path(run.submission.process["run_files_path"], run_id))
        status = store.status_of(run_id)
        if status != RUNNING:
            pass  # cancelled or otherwise settled by the daemon before the kill
        elif (
            (not worker.killed_for or worker.killed_for.startswith("worker"))
            and run.record.attempts < run.submission.retries
            and not self.shutting_down
        ):
            store.transition(run_id, QUEUED, f"{cause}; retrying")
            record = store.run_record(run_id)
            if record:
                self._queue.add(run.study, store, record)
        elif self.shutting_down:
            store.transition(run_id, QUEUED, "daemon stopping")
        else:
            store.transition(
                run_id,
                FAILED,
                cause,
                return_status=(f"{cause}\n\nlast lines of the run's output:\n{tail}"),
            )

    def check_timeouts(self) -> None:
        now = time.time()
        for run in list(self._active.values()):
            timeout = run.submission.timeout
            # Already killed: the run stays active until its worker is reaped, and a second
            # FAILED transition would be refused by the store.
            if run.worker.killed_for is not None:
                continue
            if timeout and now - run.started > timeout:
                # on_worker_exit records the failure, with the run's last output lines.
                reason = (
                    f"timed out after {timeout:g} s (MONITOR timeout); its worker "
                    f"(pid {run.worker.pid}, {run.worker.slot.label}) was killed"
                )
                self._executor.kill(run.worker, reason)


def _log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no output file)"
    return "\n".join(text.splitlines()[-lines:])
