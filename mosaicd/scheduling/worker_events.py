"""What each worker event means for its run: an epoch, a result, a failure, a park, the worker's
end, a timeout."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from mosaic_client import protocol, search
from mosaic_client.contract import FAILED, PARKED, QUEUED, RUNNING, run_log_path
from mosaicd.executors.base import IDLE, STOPPING, WorkerHandle, describe_exit
from mosaicd.scheduling.core import ActiveRun, SchedulerCore
from mosaicd.storage.store import RunRecord, StoreError, disk_full_message, is_disk_full

log = logging.getLogger("mosaicd")


class WorkerEvents(SchedulerCore):
    """The scheduler's worker events (a part of mosaicd.scheduling.scheduler.Scheduler)."""

    def on_message(self, worker: WorkerHandle, message: Any) -> None:
        """One decoded message from a worker: checked against its declared shape
        (mosaic_client.protocol.WORKER_MESSAGES), then handed to its handler in EVENTS. A
        malformed one is never acted on and never raises here (this is the daemon's loop)."""
        problem = protocol.worker_message_problem(message)
        if problem is not None:
            self._malformed(worker, message, problem)
            return
        EVENTS[message["type"]](self, worker, message)

    def _malformed(self, worker: WorkerHandle, message: Any, problem: str) -> None:
        """A message that breaks its declaration: the runs it names on this worker fail with
        the problem; one that names none of them is dropped and logged."""
        mine = worker.group or ({worker.run[1]} if worker.run is not None else set())
        named = [run_id for run_id in protocol.message_run_ids(message) if run_id in mine]
        if not named or worker.killed_for is not None:
            log.warning(
                "dropped a malformed message from worker %s: %s", worker.worker_id, problem[:500]
            )
            return
        # Its worker is killed: after a wrong message nothing else it says can be trusted, and
        # the run's end goes the one way every lost worker's does (on_worker_exit), with its
        # last output lines. The members of its ensemble, in the same process, end with it. The
        # cause does not start with "worker", so the run is not retried: the same code would
        # send the same message again.
        reason = (
            f"malformed {str(message.get('type'))[:40]!r} message for run(s) {named[:10]} "
            f"from its worker (pid {worker.pid}, {worker.slot.label}): {problem[:1000]}; "
            "the worker was killed"
        )
        log.error("%s", reason)
        self._executor.kill(worker, reason)

    def _on_hello(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        self._executor.said_hello(worker)

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
        """Hand the epochs received since the last flush to their studies' writers (one
        transaction per study), and write what waits for a lock that went (mosaicd.storage.writer).
        A study whose disk just filled up has its training runs asked to park."""
        for study, events in self._pending_epochs.items():
            if events:
                batch = list(events)
                self._studies.writer(study).write(
                    f"{len(batch)} epoch(s)", "record_epochs", {"events": batch}
                )
        self._pending_epochs.clear()
        self._studies.flush()
        for study, writer in self._studies.writers():
            if writer.disk_full and not writer.full_handled:
                writer.full_handled = True
                parked = self._park_study(study)
                log.error("%s; asked its %d training run(s) to park", writer.problem, parked)

    def _park_study(self, study: str) -> int:
        count = 0
        for run in self._active.values():
            if run.study == study and not run.park_sent:
                self._send(run.worker, "park")(run_id=run.record.run_id)
                run.park_sent = True
                count += 1
        return count

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
            f"done: {results['epochs']} epochs, train_loss "
            f"{_figure(results['train_loss'])}, test_loss {_figure(results['test_loss'])}"
        )
        run_id = run.record.run_id
        self._studies.writer(run.study).write(
            f"run {run_id} done",
            "finish_run",
            {"run_id": run_id, "results": results, "summary": summary},
        )
        self._finish(run, worker, recycle=False)

    def _on_failed(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        run = self._ended(worker, message)
        if run is None:
            return
        run_id = run.record.run_id
        writer = self._studies.writer(run.study)
        where = run.submission.process_settings["run_files_path"]
        try:  # its paths, looked at by its owner's keeper
            keeper = self._studies.keepers.of(run.submission.run_as)
            same_disk = keeper.call(
                "same_filesystem", None, {"directory": where, "study": run.study}
            )[0]
        except StoreError:
            same_disk = False
        if is_disk_full(Exception(message["error"])) and same_disk:
            # Not the run's fault, and its study is on the same full disk: it waits, parked at
            # its last checkpoint, for space and `mosaic resume`. (Run files alone on a full
            # disk fail the run with the message, as any unusable run_files_path does.)
            text = disk_full_message(os.path.join(where, "x"))
            if writer.disk_full and writer.problem:
                text = writer.problem
            writer.write(
                f"run {run_id} parked",
                "end_run",
                {"run_id": run_id, "to": PARKED, "detail": text, "return_status": text},
            )
        else:
            text = f"{message['error']}\n\n{message['traceback']}"
            writer.write(
                f"run {run_id} failed",
                "end_run",
                {
                    "run_id": run_id,
                    "to": FAILED,
                    "detail": message["error"][:500],
                    "return_status": text,
                },
            )
        # A failed run may have left the process in any state: start the next one fresh.
        self._finish(run, worker, recycle=True)

    def _on_provenance(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        # issue 16: what the run loaded and ran in, stored in one transaction.
        if message.get("data_cache") is not None:  # for status and show (issue 30)
            worker.data_cache = message["data_cache"]
        run = self._active_for(worker, message["run_id"])
        if run is not None:
            run_id = run.record.run_id
            self._studies.writer(run.study).write(
                f"provenance of run {run_id}",
                "record_provenance",
                {"run_id": run_id, "environment": message["environment"], "code": message["code"]},
            )

    def _on_search(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """A search run's resolved values (docs/tuning.md): into its params (the searched
        names, and the pipeline with them), with the epoch a pruner stopped it at."""
        run = self._active_for(worker, message["run_id"])
        if run is None:
            return
        run_id = run.record.run_id
        dimensions = search.space(run.submission.process.get("lr"), run.record.modules)
        values = message["values"]
        problem = search.values_problem(dimensions, values)
        if problem:
            log.error("run %d: search values not recorded: %s", run_id, problem)
            return
        _, modules = search.resolve(run.submission.process.get("lr"), run.record.modules, values)
        changes: list[list[Any]] = [[run_id, name, value] for name, value in values.items()]
        changes.append([run_id, "pipeline", json.dumps(modules)])
        if message.get("pruned") is not None:
            changes.append([run_id, search.PRUNED_PARAM, message["pruned"]])
        self._studies.writer(run.study).write(
            f"search values of run {run_id}", "set_params", {"changes": changes}
        )

    def _on_parked(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        run = self._ended(worker, message)
        if run is None:
            return
        run_id = run.record.run_id
        epoch = message["epoch"]
        writer = self._studies.writer(run.study)
        then = None
        if self.shutting_down:
            to, detail = QUEUED, f"daemon stopping; checkpointed at epoch {epoch}"
        elif writer.disk_full and writer.problem:
            to, detail = PARKED, f"{writer.problem} (parked at epoch {epoch})"
        elif (
            run.preempted_for is not None
            and worker.killed_for is None  # not cancelled or timed out meanwhile
            and not self._holds.holds_submissions_of(run.submission.owner_uid)
        ):
            # Parked for another user's share (mosaicd.scheduling.preemption): queued again at
            # once, first of its submission, to resume from this checkpoint. (A hold put on
            # meanwhile makes it an ordinary park, resumed by `mosaic resume`.)
            to, detail = QUEUED, f"preempted for {run.preempted_for}'s share at epoch {epoch}"
            then = self._requeue_preempted(run.study, run_id)
        else:
            to, detail = PARKED, f"parked at epoch {epoch}"

        writer.write(
            f"run {run_id} parked",
            "park",
            {"run_id": run_id, "epoch": epoch, "to": to, "detail": detail},
            then,
        )
        self._finish(run, worker, recycle=False)

    def _requeue_preempted(self, study: str, run_id: int) -> Callable[[Any], None]:
        """Once its park is written: the preempted run back in the queue, with its checkpoint
        epoch as the store now has it (the run record the next start reads)."""

        def requeue(_: Any) -> None:
            store = self._studies[study]
            try:
                # Not when the park found it cancelled (keeper operation "park").
                if store.status_of(run_id) != QUEUED:
                    return
                record = store.run_record(run_id)
            except StoreError as exc:
                # Queued in the study: the next daemon start queues it (requeue_interrupted).
                log.warning("preempted run %s of %s not queued again: %s", run_id, study, exc)
                return
            if record is not None:
                self._queue.put_back(study, record)

        return requeue

    def _on_cancelled(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        # A member of an ensemble stopped on a `cancel`; the daemon set its state already.
        run = self._ended(worker, message)
        if run is not None:
            run_id, epoch = run.record.run_id, message["epoch"]

            self._studies.writer(run.study).write(
                f"run {run_id} cancelled", "cancelled", {"run_id": run_id, "epoch": epoch}
            )
            self._finish(run, worker, recycle=False)

    def _on_fallback(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """The worker trains an ensemble's members one by one: record why, for `mosaic show`."""
        if worker.run is None:
            return
        run_ids = [r for r in message["run_ids"] if r in worker.group]
        reason = message["reason"][:1000]
        if run_ids:
            self._studies.writer(worker.run[0]).write(
                f"ensemble fallback of runs {run_ids}",
                "set_ensemble_fallback",
                {"run_ids": run_ids, "reason": reason},
            )

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
        study = run.study
        run_id = run.record.run_id
        if worker.killed_for:
            cause = worker.killed_for
        else:
            cause = f"worker (pid {worker.pid}, {worker.slot.label}) {describe_exit(code)}"
        # Read by the owner's keeper: the log is in their directory, and a link they put in
        # its place must not show them a file only the daemon could read.
        files = run.submission.process_settings["run_files_path"]
        try:
            keeper = self._studies.keepers.of(run.submission.run_as)
            tail = keeper.call("log_tail", None, {"path": run_log_path(files, run_id)})[0]
        except StoreError as exc:
            tail = f"(output file not read: {exc})"
        retry = (
            (not worker.killed_for or worker.killed_for.startswith("worker"))
            and run.record.attempts < run.submission.retries
            and not self.shutting_down
        )

        def requeue(record: Any) -> None:
            if record is not None:
                self._queue.add(study, self._studies[study], RunRecord(**record))

        # Decided on the state the write finds (it may be written late: mosaicd.storage.writer).
        self._studies.writer(study).write(
            f"run {run_id} settled",
            "settle",
            {
                "run_id": run_id,
                "retry": retry,
                "stopping": self.shutting_down,
                "cause": cause,
                "failure": f"{cause}\n\nlast lines of the run's output:\n{tail}",
            },
            requeue,
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


# What each worker message means: its handler (hello: the worker is ready). One entry per
# message of protocol.WORKER_MESSAGES, the way the request handlers have theirs
# (mosaicd.service.handlers.DISPATCH); a handler gets a message that passed
# protocol.worker_message_problem, and finds out itself whether the run is this worker's.
EVENTS: dict[str, Callable[[WorkerEvents, WorkerHandle, dict[str, Any]], None]] = {
    "hello": WorkerEvents._on_hello,
    "epoch": WorkerEvents._on_epoch,
    "done": WorkerEvents._on_done,
    "failed": WorkerEvents._on_failed,
    "parked": WorkerEvents._on_parked,
    "provenance": WorkerEvents._on_provenance,
    "search": WorkerEvents._on_search,
    "cancelled": WorkerEvents._on_cancelled,
    "fallback": WorkerEvents._on_fallback,
}
assert set(EVENTS) == set(protocol.WORKER_MESSAGES), "every worker message needs one handler"


def _figure(value: float | None) -> str:
    return "None" if value is None else f"{value:.6g}"
