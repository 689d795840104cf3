"""The queue and the life of runs: which run goes to which worker, and what each event means.

All state that must survive a restart is in the study databases (through Store.transition);
what is kept here in memory is derived from them at start-up and is only there to answer
`status` and to dispatch without scanning the databases.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import selection as selections
from mosaicd import pool as poolmod
from mosaicd.store import (
    CANCELLED,
    DONE,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    DaemonState,
    RunRecord,
    Store,
    StoreError,
    connect_readonly,
)

log = logging.getLogger("mosaicd")
RESERVED = ("type", "class", "path_to_class", "key", "name")
SELECT_TIMEOUT = 5.0  # seconds a selection's SQL may run in the daemon's loop


class Refused(Exception):
    """A request the daemon will not carry out; the message goes back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Submission:
    study: str
    submission_id: int
    owner_uid: int | None
    owner: str | None
    process: dict[str, Any]
    monitor: dict[str, Any]
    paused: bool = False
    running: int = 0

    @property
    def cap(self) -> int:
        return max(1, int(self.monitor.get("nb_processus") or 1))

    @property
    def slot_kind(self) -> str:
        return "cuda" if self.monitor.get("need_gpu") else "cpu"

    def allows(self, slot: poolmod.Slot) -> bool:
        if slot.kind != self.slot_kind:
            return False
        wanted = [str(g).replace("cuda:", "") for g in self.monitor.get("gpu_available") or []]
        return slot.kind == "cpu" or not wanted or slot.gpu in wanted


@dataclass
class ActiveRun:
    study: str
    record: RunRecord
    submission: Submission
    worker: poolmod.WorkerHandle
    pipeline: str
    started: float = field(default_factory=time.time)
    epoch: int = 0
    train_loss: float | None = None
    test_loss: float | None = None
    park_sent: bool = False


_SCALAR = (str, int, float, bool, type(None))
_PROCESS_STRINGS = ("loss_function", "class_loss_function", "path_to_class_loss_function",
                    "optimizer", "accuracy")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def submission_problem(process: dict[str, Any], monitor: dict[str, Any],
                       pipelines: list[Any]) -> str | None:
    """What makes a submission unusable, or None. The CLI's config checks do not protect the
    daemon from a hand-made request, and a bad value found later (at dispatch, in the timeout
    check) would fail every run or stop the loop: refuse it here, before anything is written."""
    epochs, lr = process.get("epochs"), process.get("lr")
    if not _is_int(epochs) or not 1 <= epochs <= 2**31:
        return f"PROCESS epochs must be an integer of at least 1, got {epochs!r:.80}"
    if not (_is_int(lr) or isinstance(lr, float)) or not 0 < lr < float("inf"):
        return f"PROCESS lr must be a positive number, got {lr!r:.80}"
    schemes = []
    for name in ("data_scheme", "pipeline_scheme"):
        value = process.get(name)
        if not (isinstance(value, list) and value and all(isinstance(t, str) for t in value)):
            return f"PROCESS {name} must be a non-empty list of type names, got {value!r:.80}"
        schemes += value
    run_files = process.get("run_files_path")
    if not (isinstance(run_files, str) and os.path.isabs(run_files)):
        return f"PROCESS run_files_path must be an absolute path, got {run_files!r:.80}"
    existing = run_files
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        # Else every run would fail in its worker before it could write its log.
        return (f"run_files_path {run_files}: {existing} exists and is not a directory; give "
                "a directory (it is created if missing)")
    for name, value in process.items():
        wrong = (name in _PROCESS_STRINGS and value is not None and not isinstance(value, str))
        if wrong or not (isinstance(value, _SCALAR) or name in ("data_scheme", "pipeline_scheme")):
            return f"PROCESS {name} has an unusable value {value!r:.80}"
    if process.get("seed") is not None and not _is_int(process["seed"]):
        return f"PROCESS seed must be an integer, got {process['seed']!r:.80}"
    for name in ("nb_processus", "multiplicity", "retries"):
        value = monitor.get(name)
        if value is not None and not (_is_int(value) and 0 <= value <= 2**31):
            return f"MONITOR {name} must be a non-negative integer, got {value!r:.80}"
    timeout = monitor.get("timeout")
    if timeout is not None and not (isinstance(timeout, (int, float))
                                    and not isinstance(timeout, bool) and 0 < timeout < 1e12):
        return f"MONITOR timeout must be a positive number of seconds, got {timeout!r:.80}"
    gpus = monitor.get("gpu_available")
    if gpus is not None and not (isinstance(gpus, list)
                                 and all(isinstance(g, (str, int)) for g in gpus)):
        return f"MONITOR gpu_available must be a list of GPU ids, got {gpus!r:.80}"
    for pipeline in pipelines:
        if len(pipeline) != len(schemes):
            return (f"each pipeline must have one module per scheme type ({len(schemes)}), "
                    f"got {len(pipeline)}")
        for module in pipeline:
            for name in ("type", "class", "path_to_class"):
                if not isinstance(module.get(name), str) or not module[name]:
                    return f"each module needs a {name!r} string; got {module!r:.120}"
            if not all(isinstance(k, str) and isinstance(v, _SCALAR) for k, v in module.items()):
                return f"module values must be numbers or strings; got {module!r:.120}"
    return None


def readable_pipeline(modules: list[dict[str, Any]]) -> str:
    """`dataset_OR(200,0.8,20) | mlp_funnel(2,3)`: the seed's readable form."""
    parts = []
    for module in modules:
        values = ",".join(str(v) for k, v in module.items() if k not in RESERVED)
        parts.append(f"{module.get('class')}({values})")
    return " | ".join(parts)


def run_params(process: dict[str, Any], modules: list[dict[str, Any]], seed: int,
               owner_uid: int | None, owner: str | None) -> dict[str, Any]:
    """The seed's params naming: PROCESS values, pipeline, {type}_key, {class}_{param}."""
    params: dict[str, Any] = {}
    for name, value in process.items():
        if value is None:
            continue
        params[name] = ",".join(value) if isinstance(value, list) else value
    params["pipeline"] = json.dumps(modules)
    for module in modules:
        params[f"{module.get('type')}_key"] = module.get("key")
        for name, value in module.items():
            if name not in RESERVED:
                params[f"{module.get('class')}_{name}"] = value
    params["seed"] = seed
    params["owner"] = owner
    params["owner_uid"] = owner_uid
    return params


class Scheduler:
    def __init__(self, state: DaemonState, pool: poolmod.Pool,
                 send: Callable[[poolmod.WorkerHandle, str], Callable[..., None]],
                 checkpoint_every: float) -> None:
        self.state = state
        self.pool = pool
        self._send = send
        self.checkpoint_every = checkpoint_every
        self.stores: dict[str, Store] = {}
        self.submissions: dict[tuple[str, int], Submission] = {}
        self.queues: dict[tuple[str, int], deque[RunRecord]] = {}
        self.active: dict[tuple[str, int], ActiveRun] = {}
        self.pending_epochs: dict[str, list[dict[str, Any]]] = {}
        self.paused = bool(self.state.get("paused", 0))
        # Owners who paused their own work on a shared daemon: their submissions, including
        # those they make while paused, do not start until they resume.
        self.paused_owners: set[int] = set(json.loads(self.state.get("paused_owners", "[]")))
        self.shutting_down = False

    # -- studies ------------------------------------------------------------------------------

    def open_study(self, path: str, create: bool) -> Store:
        store = self.stores.get(path)
        if store is not None:
            return store
        if not create and not os.path.exists(path):
            raise Refused("not_found", f"no study database at {path}")
        if os.path.exists(path) and not os.path.isfile(path):
            # A directory, /dev/null, a FIFO: SQLite would create journals beside it.
            raise Refused("invalid", f"{path} is not a regular file; give the path of a study "
                          "database file")
        try:
            store = Store(path, create=create)
        except StoreError as exc:
            raise Refused("invalid", str(exc)) from None
        self.stores[path] = store
        self.state.add_study(path)
        return store

    def recover(self) -> None:
        """Reopen the known studies; runs that were running go back to the queue."""
        for path in self.state.studies():
            if not os.path.exists(path):
                log.warning("study %s has disappeared; forgetting it", path)
                self.state.remove_study(path)
                continue
            try:
                store = self.open_study(path, create=False)
            except Refused as exc:
                log.error("cannot reopen study %s: %s", path, exc.message)
                continue
            for record in store.runs_in_state(RUNNING):
                store.transition(record.run_id, QUEUED,
                                 f"daemon restarted; resumes after epoch {record.checkpoint_epoch}")
            for record in store.runs_in_state(QUEUED):
                self._enqueue(path, record)
            log.info("study %s: %s", path, store.counts)

    def _submission(self, study: str, submission_id: int) -> Submission:
        key = (study, submission_id)
        if key not in self.submissions:
            info = self.stores[study].submission(submission_id)
            self.submissions[key] = Submission(study, submission_id, info["owner_uid"],
                                               info["owner"], info["process"], info["monitor"],
                                               info["paused"])
        return self.submissions[key]

    def _enqueue(self, study: str, record: RunRecord) -> None:
        self._submission(study, record.submission_id)
        self.queues.setdefault((study, record.submission_id), deque()).append(record)

    def queued_ahead(self, study: str, run_id: int) -> int | None:
        """How many queued runs start before this one (None when it is not queued)."""
        queues = [q for (path, _), q in self.queues.items() if path == study]
        seq = next((r.queue_seq for q in queues for r in q if r.run_id == run_id), None)
        if seq is None:
            return None
        return sum(1 for q in queues for r in q if r.queue_seq < seq)

    def queued_total(self) -> int:
        return sum(len(q) for q in self.queues.values())

    # -- submit -------------------------------------------------------------------------------

    def submit(self, db: str, config_path: str, process: dict[str, Any],
               monitor: dict[str, Any], pipelines: list[Any], owner_uid: int | None,
               owner: str | None) -> dict[str, Any]:
        if not pipelines:
            raise Refused("invalid", "the submission has no pipeline")
        for pipeline in pipelines:
            if not isinstance(pipeline, list) or not all(isinstance(m, dict) for m in pipeline):
                raise Refused("invalid", "each pipeline must be a list of module maps")
        for key in ("epochs", "lr", "data_scheme", "pipeline_scheme", "run_files_path"):
            if key not in process:
                raise Refused("invalid", f"PROCESS lacks {key!r}")
        problem = submission_problem(process, monitor, pipelines)
        if problem:
            raise Refused("invalid", f"{problem}; nothing was queued")
        if monitor.get("need_gpu") and not self.pool.slot_count("cuda"):
            raise Refused("invalid", "this submission needs a GPU (MONITOR need_gpu = true) but "
                          "this daemon has no GPU slots; start mosaicd with --gpus 0,... on a GPU "
                          "machine, or set need_gpu = false")
        base_seed = process.get("seed")
        multiplicity = max(1, int(monitor.get("multiplicity") or 1))
        runs = []
        for index, modules in enumerate(pipelines):
            if isinstance(base_seed, int):
                seed = base_seed + index % multiplicity
            else:
                seed = secrets.randbelow(2**31)
            runs.append((modules, seed, readable_pipeline(modules),
                         run_params(process, modules, seed, owner_uid, owner)))
        store = self.open_study(db, create=True)
        submission_id, run_ids = store.add_submission(owner_uid, owner or "", config_path,
                                                      process, monitor, runs)
        if owner_uid in self.paused_owners:
            store.set_paused(True, owner_uid)
        for run_id in run_ids:
            record = store.run_record(run_id)
            assert record is not None
            self._enqueue(db, record)
        return {"db": db, "submission_id": submission_id, "run_ids": run_ids,
                "paused": self.paused or owner_uid in self.paused_owners}

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        if self.paused or self.shutting_down:
            return
        for kind in ("cpu", "cuda"):
            for worker in self.pool.idle(kind):
                # No `break` when one worker finds nothing: gpu_available may rule out this
                # GPU's slots and allow the next GPU's.
                self._start_next(worker)

    def _start_next(self, worker: poolmod.WorkerHandle) -> bool:
        candidates = sorted(((q[0].queue_seq, key) for key, q in self.queues.items() if q))
        for _, key in candidates:
            submission = self.submissions[key]
            if (submission.paused or submission.running >= submission.cap
                    or not submission.allows(worker.slot)):
                continue
            record = self.queues[key].popleft()
            if not self.queues[key]:
                del self.queues[key]
            self._start(worker, submission, record)
            return True
        return False

    def _start(self, worker: poolmod.WorkerHandle, submission: Submission,
               record: RunRecord) -> None:
        store = self.stores[submission.study]
        run_files = submission.process["run_files_path"]
        from_epoch = record.checkpoint_epoch
        if from_epoch and not os.path.exists(os.path.join(run_files,
                                                          f"checkpoint_{record.run_id}.pt")):
            from_epoch = 0
        with store.transaction():
            store.truncate_history(record.run_id, from_epoch)
            store.transition(record.run_id, RUNNING,
                             f"on {worker.slot.label} (worker {worker.worker_id}, pid "
                             f"{worker.pid}) from epoch {from_epoch}")
        spec = {"run_id": record.run_id, "process": submission.process,
                "modules": record.modules, "seed": record.seed, "device": worker.slot.device,
                "run_files_path": run_files, "epochs_target": record.epochs_target,
                "start_epoch": from_epoch, "checkpoint_every": self.checkpoint_every}
        worker.state = poolmod.BUSY
        worker.run = (submission.study, record.run_id)
        worker.run_started = time.time()
        submission.running += 1
        self.active[(submission.study, record.run_id)] = ActiveRun(
            submission.study, record, submission, worker, store.pipeline_text(record.run_id),
            epoch=from_epoch)
        self._send(worker, "run")(spec=spec)

    # -- worker events ------------------------------------------------------------------------

    def _active_for(self, worker: poolmod.WorkerHandle, run_id: int) -> ActiveRun | None:
        if worker.run is None or worker.run[1] != run_id:
            log.warning("worker %s reported run %s it is not running", worker.worker_id, run_id)
            return None
        return self.active.get(worker.run)

    def on_epoch(self, worker: poolmod.WorkerHandle, event: dict[str, Any]) -> None:
        run = self._active_for(worker, event["run_id"])
        if run is None:
            return
        run.epoch, run.train_loss, run.test_loss = (event["epoch"], event["train_loss"],
                                                    event["test_loss"])
        self.pending_epochs.setdefault(run.study, []).append(event)

    def flush_epochs(self) -> None:
        for study, events in self.pending_epochs.items():
            if events:
                self.stores[study].record_epochs(events)
        self.pending_epochs.clear()

    def _finish(self, run: ActiveRun, worker: poolmod.WorkerHandle, recycle: bool) -> None:
        self.active.pop((run.study, run.record.run_id), None)
        run.submission.running -= 1
        worker.run = None
        worker.runs_done += 1
        if recycle or (self.pool.max_runs and worker.runs_done >= self.pool.max_runs):
            worker.state = poolmod.STOPPING
            self._send(worker, "exit")()
        else:
            worker.state = poolmod.IDLE

    def on_done(self, worker: poolmod.WorkerHandle, message: dict[str, Any]) -> None:
        run = self._active_for(worker, message["run_id"])
        if run is None:
            return
        self.flush_epochs()
        results = message["results"]
        summary = (f"done: {results.get('epochs')} epochs, train_loss "
                   f"{results.get('train_loss'):.6g}, test_loss {results.get('test_loss'):.6g}")
        self.stores[run.study].finish_run(run.record.run_id, results, summary)
        self._finish(run, worker, recycle=False)

    def on_failed(self, worker: poolmod.WorkerHandle, message: dict[str, Any]) -> None:
        run = self._active_for(worker, message["run_id"])
        if run is None:
            return
        self.flush_epochs()
        text = f"{message['error']}\n\n{message['traceback']}"
        self.stores[run.study].transition(run.record.run_id, FAILED, message["error"][:500],
                                          return_status=text)
        # A failed run may have left the process in any state: start the next one fresh.
        self._finish(run, worker, recycle=True)

    def on_parked(self, worker: poolmod.WorkerHandle, message: dict[str, Any]) -> None:
        run = self._active_for(worker, message["run_id"])
        if run is None:
            return
        self.flush_epochs()
        store = self.stores[run.study]
        run_id = run.record.run_id
        store.set_checkpoint_epoch(run_id, message["epoch"])
        if self.shutting_down:
            store.transition(run_id, QUEUED, f"daemon stopping; checkpointed at epoch "
                             f"{message['epoch']}")
        else:
            store.transition(run_id, PAUSED, f"parked at epoch {message['epoch']}")
        self._finish(run, worker, recycle=False)

    def on_worker_exit(self, worker: poolmod.WorkerHandle, code: int) -> None:
        """A worker process ended: fail (or retry) its run if it had one, and replace it."""
        if worker.run is not None and worker.run in self.active:
            run = self.active.pop(worker.run)
            run.submission.running -= 1
            self.flush_epochs()
            store = self.stores[run.study]
            run_id = run.record.run_id
            if worker.killed_for:
                cause = worker.killed_for
            else:
                cause = (f"worker (pid {worker.pid}, {worker.slot.label}) "
                         f"{poolmod.describe_exit(code)}")
            tail = _log_tail(os.path.join(run.submission.process["run_files_path"],
                                          f"output_{run_id}.log"))
            retries = int(run.submission.monitor.get("retries") or 0)
            status = store.status_of(run_id)
            if status != RUNNING:
                pass  # cancelled or otherwise settled by the daemon before the kill
            elif (not worker.killed_for or worker.killed_for.startswith("worker")) and \
                    run.record.attempts < retries and not self.shutting_down:
                store.transition(run_id, QUEUED, f"{cause}; retrying")
                record = store.run_record(run_id)
                if record:
                    self._enqueue(run.study, record)
            elif self.shutting_down:
                store.transition(run_id, QUEUED, "daemon stopping")
            else:
                store.transition(run_id, FAILED, cause, return_status=(
                    f"{cause}\n\nlast lines of the run's output:\n{tail}"))
        if not self.shutting_down:
            self.pool.replace(worker, code)

    def check_timeouts(self) -> None:
        now = time.time()
        for run in list(self.active.values()):
            timeout = run.submission.monitor.get("timeout")
            # Already killed: the run stays active until its worker is reaped, and a second
            # FAILED transition would be refused by the store.
            if run.worker.killed_for is not None:
                continue
            if timeout and now - run.started > float(timeout):
                # on_worker_exit records the failure, with the run's last output lines.
                reason = (f"timed out after {float(timeout):g} s (MONITOR timeout); its worker "
                          f"(pid {run.worker.pid}, {run.worker.slot.label}) was killed")
                self.pool.kill(run.worker, reason)

    # -- control ------------------------------------------------------------------------------

    def pause(self, now: bool, owner_uid: int | None = None) -> dict[str, Any]:
        """Stop starting runs: all of them, or only those of one owner's submissions."""
        if owner_uid is None:
            self.paused = True
            self.state.set("paused", 1)
        else:
            self.paused_owners.add(owner_uid)
            self.state.set("paused_owners", json.dumps(sorted(self.paused_owners)))
            for store in self.stores.values():
                store.set_paused(True, owner_uid)
            for submission in self.submissions.values():
                if submission.owner_uid == owner_uid:
                    submission.paused = True
        parked = self.park_all(owner_uid) if now else 0
        return {"paused": True, "parking": parked,
                "scope": "all" if owner_uid is None else "owner"}

    def park_all(self, owner_uid: int | None = None) -> int:
        count = 0
        for run in self.active.values():
            if owner_uid is not None and run.submission.owner_uid != owner_uid:
                continue
            if not run.park_sent:
                self._send(run.worker, "park")(run_id=run.record.run_id)
                run.park_sent = True
                count += 1
        return count

    def resume(self, owner_uid: int | None = None) -> dict[str, Any]:
        """Start again: everything (and every owner's pause), or one owner's submissions."""
        if owner_uid is None:
            self.paused = False
            self.state.set("paused", 0)
            self.paused_owners.clear()
        else:
            self.paused_owners.discard(owner_uid)
        self.state.set("paused_owners", json.dumps(sorted(self.paused_owners)))
        for store in self.stores.values():
            store.set_paused(False, owner_uid)
        for submission in self.submissions.values():
            if owner_uid is None or submission.owner_uid == owner_uid:
                submission.paused = False
        resumed = 0
        for path, store in self.stores.items():
            for record in store.runs_in_state(PAUSED):
                owner = self._submission(path, record.submission_id).owner_uid
                if owner_uid is not None and owner != owner_uid:
                    continue
                store.transition(record.run_id, QUEUED, "resumed")
                fresh = store.run_record(record.run_id)
                if fresh:
                    self._enqueue(path, fresh)
                resumed += 1
        return {"paused": self.paused, "resumed": resumed,
                "scope": "all" if owner_uid is None else "owner"}

    def select(self, db: str, selection: dict[str, Any]) -> list[int]:
        if db not in self.stores:
            self.open_study(db, create=False)
        conn = connect_readonly(db)
        # A user's -request runs inside the daemon's single loop: an endless recursive CTE
        # would stop the daemon for everyone. Interrupt it after SELECT_TIMEOUT seconds.
        deadline = time.monotonic() + SELECT_TIMEOUT
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10000)
        try:
            return selections.resolve(conn, selection)
        except selections.SelectionError as exc:
            if time.monotonic() > deadline:
                raise Refused("invalid", f"the selection took more than {SELECT_TIMEOUT:g} s "
                              "and was stopped; select run ids with a simpler query") from None
            raise Refused("invalid", str(exc)) from None
        except (sqlite3.Error, OverflowError, TypeError) as exc:
            # A hand-made selection value SQLite cannot bind (a map, a 70-bit integer).
            raise Refused("invalid", f"unusable selection {selection!r:.200}: {exc}") from None
        finally:
            conn.close()

    def cancel(self, db: str, run_ids: list[int], reason: str) -> dict[str, Any]:
        store = self.stores[db]
        cancelled, skipped = [], []
        for run_id in run_ids:
            status = store.status_of(run_id)
            if status in (QUEUED, PAUSED):
                store.transition(run_id, CANCELLED, reason)
                self._drop_from_queue(db, run_id)
                cancelled.append(run_id)
            elif status == RUNNING and (db, run_id) in self.active:
                run = self.active[(db, run_id)]
                store.transition(run_id, CANCELLED, f"{reason} (while running)")
                self.pool.kill(run.worker, "cancelled")
                cancelled.append(run_id)
            else:
                skipped.append(run_id)
        return {"cancelled": cancelled, "skipped": skipped}

    def _drop_from_queue(self, db: str, run_id: int) -> None:
        for key, queue in list(self.queues.items()):
            if key[0] == db:
                for record in queue:
                    if record.run_id == run_id:
                        queue.remove(record)
                        if not queue:
                            del self.queues[key]
                        return

    def rerun(self, db: str, run_ids: list[int], epochs: int) -> dict[str, Any]:
        if epochs < 1:
            raise Refused("invalid", f"-epochs must be at least 1, got {epochs}")
        store = self.stores[db]
        queued, skipped = [], []
        for run_id in run_ids:
            status = store.status_of(run_id)
            if status in (DONE, FAILED, CANCELLED):
                with store.transaction():
                    record = store.run_record(run_id)
                    assert record is not None
                    # Continue from the last checkpoint: the target is what was trained so far
                    # plus the extra epochs.
                    done_epochs = record.checkpoint_epoch
                    store.extend_target(run_id, done_epochs + epochs - record.epochs_target)
                    store.transition(run_id, QUEUED, f"rerun for {epochs} more epochs")
                fresh = store.run_record(run_id)
                if fresh:
                    self._enqueue(db, fresh)
                queued.append(run_id)
            else:
                skipped.append(run_id)
        return {"queued": queued, "skipped": skipped}

    # -- status -------------------------------------------------------------------------------

    def status(self, db: str | None, limit: int, uid: int | None, mine: bool) -> dict[str, Any]:
        studies = []
        for path, store in self.stores.items():
            if db and path != db:
                continue
            running = [
                {"run_id": r.record.run_id, "pipeline": r.pipeline, "epoch": r.epoch,
                 "epochs": r.record.epochs_target, "train_loss": r.train_loss,
                 "test_loss": r.test_loss, "worker": r.worker.worker_id,
                 "slot": r.worker.slot.label, "owner": r.submission.owner,
                 "elapsed": time.time() - r.started}
                for r in self.active.values() if r.study == path
                and (not mine or r.submission.owner_uid == uid)]
            studies.append({"db": path, "counts": dict(store.counts), "running": running,
                            "done": store.recent(DONE, limit),
                            "failed": store.recent(FAILED, limit)})
        workers = [{"id": w.worker_id, "slot": w.slot.label, "state": w.state, "pid": w.pid,
                    "run_id": w.run[1] if w.run else None, "runs_done": w.runs_done,
                    **self.pool.resources(w)}
                   for w in self.pool.workers.values()]
        return {"paused": self.paused, "workers": workers, "studies": studies,
                "queued": self.queued_total(), "paused_owners": sorted(self.paused_owners)}


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
