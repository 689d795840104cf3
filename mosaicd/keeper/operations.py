"""What a keeper does to its user's studies and files, by name: the one table of operations
(OPS) that the daemon asks for and a keeper carries out (mosaicd.keeper.main).

Each operation is a plain function of a study's Store (or of nothing, for file operations) and
of arguments that travel as msgpack; its result travels back the same way. A write is applied
in one transaction (one transaction per state change) and decides on the state it finds
then: a write the daemon kept while the study was locked still applies correctly when it is
finally made (mosaicd.storage.writer). The daemon checks every result before it uses one
(mosaic_client.protocol.keeper_result_problem): the keeper runs as its user, who controls it.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from mosaic_client import selection as selections
from mosaic_client import study_reading
from mosaic_client.contract import CANCELLED, DONE, FAILED, PARKED, QUEUED, RUNNING
from mosaicd.keeper import access
from mosaicd.storage.store import RunRecord, Store, StoreError, connect_readonly
from mosaicd.storage.submission_rows import OpenedSubmission

SELECT_BUDGET_S = 5.0  # a user's -request selection, interrupted after this


def wire_record(record: RunRecord | None) -> dict[str, Any] | None:
    # Shallow: asdict's deep copy of every run's modules cost seconds for 100,000 runs.
    if record is None:
        return None
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


# -- reads --------------------------------------------------------------------------------------


def _runs_in_state(store: Store, status: str) -> list[dict[str, Any] | None]:
    return [wire_record(r) for r in store.runs_in_state(status)]


def _submission_rows(store: Store) -> list[list[Any]]:
    rows = store.conn.execute("SELECT submission_id, owner_uid, created_at FROM submissions")
    return [list(row) for row in rows]


def _select(store: Store, selection: dict[str, Any]) -> list[int]:
    """A client's selection of runs (-id, -request SQL) on a read-only connection, interrupted
    after SELECT_BUDGET_S (an endless recursive CTE stops only this keeper)."""
    conn = connect_readonly(store.path)
    deadline = time.monotonic() + SELECT_BUDGET_S
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10000)
    try:
        return selections.resolve(conn, selection)
    except selections.SelectionError as exc:
        if time.monotonic() > deadline:
            raise StoreError(
                f"the selection took more than {SELECT_BUDGET_S:g} s and was stopped; select "
                "run ids with a simpler query"
            ) from None
        raise StoreError(str(exc)) from None
    except Exception as exc:  # a value SQLite cannot bind (a map, a 70-bit integer)
        raise StoreError(f"unusable selection {selection!r:.200}: {exc}") from None
    finally:
        conn.close()


READS: dict[str, Callable[..., Any]] = {
    "status_of": lambda s, run_id: s.status_of(run_id),
    "run_record": lambda s, run_id: wire_record(s.run_record(run_id)),
    "runs_in_state": _runs_in_state,
    "run_records": lambda s, run_ids: [wire_record(r) for r in s.run_records(run_ids)],
    "submission": lambda s, submission_id: s.submission(submission_id),
    "submission_of": lambda s, run_id: s.submission_of(run_id),
    "submission_rows": _submission_rows,
    "submission_counts": lambda s, submission_id: s.submission_counts(submission_id),
    "recent": lambda s, status, limit: [
        {**row, "submission_id": s.submission_of(row["run_id"])} for row in s.recent(status, limit)
    ],
    "describe": lambda s, run_id: s.describe(run_id),
    "pipeline_text": lambda s, run_id: s.pipeline_text(run_id),
    "params_of": lambda s, run_ids: s.params_of(run_ids),
    "pipeline_mates": lambda s, run_ids: sorted(s.pipeline_mates(run_ids)),
    "select": _select,
    # A search's gate and a trial's history (docs/tuning.md): [[group, round], ...] and the
    # finished trials of a group, as mosaic_client.study_reading reads them.
    "search_open_rounds": lambda s, submission_id: [
        [g, r] for g, r in study_reading.search_open_rounds(s.conn, submission_id).items()
    ],
    "search_history": lambda s, submission_id, group, before_round, metric, names: (
        study_reading.search_history(s.conn, submission_id, group, before_round, metric, names)
    ),
}


# -- writes (each in one transaction) -----------------------------------------------------------


def _fail_unstarted(store: Store, run_id: int, cause: str) -> None:
    if store.status_of(run_id) != QUEUED:
        return
    store.transition(run_id, RUNNING, "starting a worker for it")
    store.transition(run_id, FAILED, cause, return_status=cause)


def _start_runs(store: Store, members: list[list[Any]], ensemble: list[int]) -> None:
    """Members: [run_id, start_epoch, detail]. One transaction for a whole group: it starts at
    once, or not at all."""
    for run_id, start_epoch, detail in members:
        store.truncate_history(run_id, start_epoch)
        store.transition(run_id, RUNNING, detail)
    if ensemble:
        store.record_ensemble(ensemble)


def _requeue_interrupted(store: Store) -> list[dict[str, Any] | None]:
    """At a daemon's start: runs that were running go back to the queue; the queue's runs."""
    for record in store.runs_in_state(RUNNING):
        store.transition(
            record.run_id,
            QUEUED,
            f"daemon restarted; resumes after epoch {record.checkpoint_epoch}",
        )
    return _runs_in_state(store, QUEUED)


def _add_submissions(store: Store, batches: list[dict[str, Any]]) -> list[list[Any]]:
    """Each batch: owner_uid, owner, config_path, process, monitor, runs. Returns, per batch,
    [submission_id, run_ids, created_at] (the daemon records the owners before the COMMIT)."""
    added = []
    for batch in batches:
        runs = [tuple(run) for run in batch["runs"]]
        submission_id, run_ids = store.add_submission(
            batch["owner_uid"],
            batch["owner"],
            batch["config_path"],
            batch["process"],
            batch["monitor"],
            runs,  # type: ignore[arg-type]
            int(batch.get("priority", 0)),
            batch.get("search"),
            batch.get("search_runs"),
        )
        row = store.conn.execute(
            "SELECT created_at FROM submissions WHERE submission_id=?", (submission_id,)
        ).fetchone()
        added.append([submission_id, run_ids, row[0] if row else None])
    return added


def _begin_submission(store: Store, batch: dict[str, Any]) -> list[Any]:
    """A big submission's row, in a transaction the keeper holds for its runs (add_runs):
    [submission_id, first run id, first queue_seq, created_at]."""
    opened = store.begin_submission(
        batch["owner_uid"],
        batch["owner"],
        batch["config_path"],
        batch["process"],
        batch["monitor"],
        int(batch.get("priority", 0)),
        batch.get("search"),
    )
    return [opened.submission_id, opened.first_run_id, opened.first_queue_seq, opened.created_at]


def _add_runs(
    store: Store,
    opened: list[Any],
    epochs: int,
    owner: str,
    runs: list[Any],
    offset: int,
    search_runs: list[dict[str, Any]] | None = None,
) -> int:
    """One part of a big submission's runs, in its held transaction; how many were added.
    `search_runs`: each run's search record (docs/tuning.md), None when not a search."""
    submission = OpenedSubmission(*opened)
    parts = [tuple(run) for run in runs]
    store.add_runs(submission, epochs, owner, parts, offset, search_runs)  # type: ignore[arg-type]
    return len(runs)


def _park(store: Store, run_id: int, epoch: int, to: str, detail: str) -> None:
    if to == QUEUED and store.status_of(run_id) != RUNNING:
        # Cancelled while it parked (written first): CANCELLED -> QUEUED is a rerun's move,
        # and a cancelled run must not come back by a park (preemption, daemon stopping).
        return
    store.set_checkpoint_epoch(run_id, epoch)
    store.transition(run_id, to, detail)


def _cancelled(store: Store, run_id: int, epoch: int) -> None:
    # The cancel request set the state already, unless it was waiting for a lock.
    if store.status_of(run_id) != CANCELLED:
        store.transition(run_id, CANCELLED, f"cancelled after epoch {epoch}")


def _settle(
    store: Store, run_id: int, retry: bool, stopping: bool, cause: str, failure: str
) -> dict[str, Any] | None:
    """A run whose worker died: queued again (retry, or the daemon stops) or failed."""
    if store.status_of(run_id) != RUNNING:
        return None  # cancelled or otherwise settled by the daemon before the kill
    if retry:
        store.transition(run_id, QUEUED, f"{cause}; retrying")
        return wire_record(store.run_record(run_id))
    if stopping:
        store.transition(run_id, QUEUED, "daemon stopping")
    else:
        store.transition(run_id, FAILED, cause, return_status=failure)
    return None


def _resume_parked(store: Store, submission_ids: list[int] | None) -> list[dict[str, Any] | None]:
    fresh = []
    for record in store.runs_in_state(PARKED):
        if submission_ids is None or record.submission_id in submission_ids:
            store.transition(record.run_id, QUEUED, "resumed")
            fresh.append(wire_record(store.run_record(record.run_id)))
    return [r for r in fresh if r is not None]


def _cancel(store: Store, run_id: int, detail: str) -> None:
    if store.status_of(run_id) in (QUEUED, PARKED, RUNNING):
        store.transition(run_id, CANCELLED, detail)


def _rerun(store: Store, run_id: int, epochs: int) -> dict[str, Any] | None:
    if store.status_of(run_id) not in (DONE, FAILED, CANCELLED):
        return None
    record = store.run_record(run_id)
    if record is None:
        return None
    # Continue from the last checkpoint: the target is what was trained so far plus the extra.
    store.extend_target(run_id, record.checkpoint_epoch + epochs - record.epochs_target)
    store.transition(run_id, QUEUED, f"rerun for {epochs} more epochs")
    return wire_record(store.run_record(run_id))


def _failed(store: Store, run_id: int, to: str, detail: str, return_status: str) -> None:
    store.transition(run_id, to, detail, return_status=return_status)


def _set_priority(store: Store, submission_ids: list[int], priority: int) -> None:
    store.conn.executemany(
        "UPDATE submissions SET priority=? WHERE submission_id=?",
        [(priority, submission_id) for submission_id in submission_ids],
    )


def _record_plan(store: Store, plan: dict[str, Any]) -> int:
    """A sequential plan of `compare --until-decided` (checked by the daemon: control.plan_row):
    one row of sequential_plans; its plan_id."""
    cursor = store.conn.execute(
        "INSERT INTO sequential_plans (recorded_at, metric, data_key, families, alpha, spent, "
        "looks, verdicts, method) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (time.time(), *(plan[k] for k in PLAN_COLUMNS)),
    )
    return int(cursor.lastrowid or 0)


PLAN_COLUMNS = ("metric", "data_key", "families", "alpha", "spent", "looks", "verdicts", "method")

WRITES: dict[str, Callable[..., Any]] = {
    "fail_unstarted": _fail_unstarted,
    "start_runs": _start_runs,
    "requeue_interrupted": _requeue_interrupted,
    "add_submissions": _add_submissions,
    "begin_submission": _begin_submission,
    "add_runs": _add_runs,
    "record_epochs": lambda s, events: s.record_epochs(events),
    "finish_run": lambda s, run_id, results, summary: s.finish_run(run_id, results, summary),
    "end_run": _failed,
    "record_provenance": lambda s, run_id, environment, code: s.record_provenance(
        run_id, environment, code
    ),
    "park": _park,
    "cancelled": _cancelled,
    "set_ensemble_fallback": lambda s, run_ids, reason: s.set_ensemble_fallback(run_ids, reason),
    "settle": _settle,
    "resume_parked": _resume_parked,
    "cancel": _cancel,
    "rerun": _rerun,
    "set_params": lambda s, changes: s.set_params([tuple(c) for c in changes]),
    "set_priority": _set_priority,
    "record_plan": _record_plan,
}


# -- the user's other files (no study) ----------------------------------------------------------


def _make_dirs(path: str) -> None:
    """The run-files directory of a submission, made by its user (so it is theirs)."""
    os.makedirs(path, exist_ok=True)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _same_filesystem(directory: str, study: str) -> bool:
    try:
        return os.stat(directory).st_dev == os.stat(study).st_dev
    except OSError:
        return False


def _log_tail(path: str, lines: int = 20) -> str:
    """The last lines of a run's output file: a regular file only (a FIFO in its place would
    stop this keeper on open or read), opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "(no output file)"
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return "(output file not read: not a regular file)"
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 8192))
        text = fh.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


FILES: dict[str, Callable[..., Any]] = {
    "writable_problem": access.writable_problem,
    "make_dirs": _make_dirs,
    "exists": _exists,
    "same_filesystem": _same_filesystem,
    "log_tail": _log_tail,
}

assert not (set(READS) & set(WRITES)) and not (set(FILES) & (set(READS) | set(WRITES)))
