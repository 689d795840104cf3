"""The replies that describe the daemon's state: status, show, pending, studies. Each reply is
built here and only here, typed with its declaration in mosaic_client.protocol."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from mosaic_client.contract import DONE, FAILED, QUEUED
from mosaic_client.protocol import (
    ErrorCode,
    FinishedRunView,
    PendingItem,
    RunningRunView,
    ShowReply,
    StatusReply,
    StudyItem,
    StudyView,
    WorkerView,
)
from mosaicd.errors import Refused
from mosaicd.executors.base import Executor, WorkerHandle
from mosaicd.scheduling.core import ActiveRun, served
from mosaicd.scheduling.fair_share import Ledger, Limits
from mosaicd.scheduling.holds import Holds
from mosaicd.scheduling.run_queue import RunQueue
from mosaicd.storage.identity import user_name
from mosaicd.storage.store import StoreError
from mosaicd.storage.studies import Studies

Active = dict[tuple[str, int], ActiveRun]


def _running(run: ActiveRun, now: float) -> RunningRunView:
    return {
        "run_id": run.record.run_id,
        "pipeline": run.pipeline,
        "epoch": run.epoch,
        "epochs": run.record.epochs_target,
        "train_loss": run.train_loss,
        "test_loss": run.test_loss,
        "worker": run.worker.worker_id,
        "slot": run.worker.slot.label,
        "owner": run.submission.owner,
        "elapsed": now - run.started,
        "group": run.group,
    }


def _finished(
    studies: Studies, path: str, state: str, limit: int, uid: int | None, mine: bool
) -> list[FinishedRunView]:
    """The latest finished runs of a state, each with its owner as the daemon recorded it
    (only the caller's: mine)."""
    store = studies[path]
    rows: list[Any] = []
    for row in store.recent(state, limit):
        submission_id = row.pop("submission_id", None)
        owner_uid, row["owner"] = (
            studies.identities.owner(path, submission_id)
            if isinstance(submission_id, int)
            else (None, None)
        )
        if not mine or owner_uid == uid:
            rows.append(row)
    return rows


def _worker(executor: Executor, worker: WorkerHandle) -> WorkerView:
    return {
        "id": worker.worker_id,
        "slot": worker.slot.label,
        "state": worker.state,
        "pid": worker.pid,
        "owner": worker.owner.name if worker.owner is not None else None,
        "run_id": worker.run[1] if worker.run else None,
        "group": sorted(worker.group) if worker.run and len(worker.group) > 1 else None,
        # The Ray executor adds the actor's node.
        "runs_done": worker.runs_done,
        "data_cache": worker.data_cache,
        **executor.resources(worker),
    }  # type: ignore[typeddict-item]


def status(
    studies: Studies,
    active: Active,
    queue: RunQueue,
    executor: Executor,
    holds: Holds,
    db: str | None,
    limit: int,
    uid: int | None,
    mine: bool,
    submission: int | None,
    readable: Callable[[list[str]], set[str]] | None = None,
) -> StatusReply:
    """`mosaic status` (and `status --watch`, `status --json`, `run --follow`).

    `readable`: on a shared daemon, which studies' files the caller may read (None: all, for
    the daemon's own user and administrators). A study they may not read is only counted: its
    path, parameters, results and tracebacks are its owner's to see, as its file is. Workers stay
    listed (slot, owner, state), which says how busy the box is and no more."""
    now = time.time()
    study_views: list[StudyView] = []
    hidden = 0
    paths = [path for path, _ in studies.items() if not db or path == db]
    allowed = set(paths) if readable is None else readable(paths)
    for path, store in studies.items():
        if db and path != db:
            continue
        if path not in allowed:
            hidden += 1
            continue
        running = [
            _running(r, now)
            for r in active.values()
            if r.study == path and (not mine or r.submission.owner_uid == uid)
        ]
        try:
            done = _finished(studies, path, DONE, limit, uid, mine)
            failed = _finished(studies, path, FAILED, limit, uid, mine)
            trouble = None
        except StoreError as exc:  # its keeper is not answering: the others are still shown
            done, failed, trouble = [], [], str(exc)
        view: StudyView = {
            "db": path,
            "counts": dict(store.counts),
            "running": running,
            "done": done,
            "failed": failed,
        }
        writer = studies.writer(path)
        if writer.problem:
            view["problem"] = f"{writer.problem} ({writer.waiting} write(s) wait)"
        elif trouble:
            view["problem"] = trouble
        aside = studies.identities.aside(path)
        if aside:
            view["set_aside"] = aside
        study_views.append(view)
    reply: StatusReply = {
        "paused": holds.all,
        "workers": [_worker(executor, w) for w in executor.workers.values()],
        "studies": study_views,
        "queued": queue.total(),
        "paused_owners": sorted(holds.owners),
    }
    if hidden:
        reply["hidden_studies"] = hidden
    if (
        db
        and submission is not None
        and (readable is None or db in allowed or db in readable([db]))
    ):
        # Only of a study served: another path is refused, unopened (core.served).
        reply["submission_counts"] = served(studies, db).submission_counts(submission)
    return reply


def user_table(
    queue: RunQueue, active: Active, usage: Ledger, shares: dict[int, float], limits: Limits
) -> list[dict[str, Any]]:
    """`mosaic status --users`: every user with runs queued or training, or usage left: their
    runs, usage and share. Totals only, visible to every user (studies stay private)."""
    rows: dict[int, dict[str, Any]] = {}

    def row(uid: int, name: str | None) -> dict[str, Any]:
        if uid not in rows:
            rows[uid] = {"user": name or user_name(uid), "uid": uid, "running": 0, "queued": 0}
        return rows[uid]

    for submission, queued in queue.queued_counts():
        if submission.owner_uid is not None:
            row(submission.owner_uid, submission.owner)["queued"] += queued
    for run in active.values():
        if run.submission.owner_uid is not None:
            row(run.submission.owner_uid, run.submission.owner)["running"] += 1
    for uid, used in usage.usage.items():
        if used > 0:
            row(uid, None)
    for uid, entry in rows.items():
        entry["usage"] = round(usage.usage.get(uid, 0.0), 1)
        entry["share"] = shares.get(uid, 1.0)
        entry["limits"] = dataclasses.asdict(limits)  # the same for everyone (0: none)
    return sorted(rows.values(), key=lambda r: r["user"])


def show(
    studies: Studies,
    active: Active,
    queue: RunQueue,
    db: str,
    run_id: int,
    waiting_for: str | None = None,
) -> ShowReply:
    """`mosaic show RUN`: everything recorded, and where it stands now."""
    store = served(studies, db)
    try:
        info: Any = store.describe(run_id)
    except StoreError as exc:
        raise Refused(ErrorCode.INVALID, f"{db}: {exc}") from None
    if info is None:
        raise Refused(ErrorCode.NOT_FOUND, f"no run {run_id} in {db}")
    reply: ShowReply = info
    run = active.get((db, run_id))
    if run is not None:
        reply["live"] = {
            "epoch": run.epoch,
            "worker": run.worker.worker_id,
            "slot": run.worker.slot.label,
            "pid": run.worker.pid,
            "data_cache": run.worker.data_cache,
        }
    if reply["status"] == QUEUED:
        reply["queued_ahead"] = queue.ahead_of(db, run_id)
        if waiting_for:
            reply["waiting_for"] = waiting_for
    return reply


def pending(
    queue: RunQueue, db: str | None, owner_uid: int | None, everyone: bool
) -> list[PendingItem]:
    """The not-yet-run pipelines with their PROCESS/MONITOR, for `pause FILE.json`: the
    owner's only, unless `everyone` (an administrator)."""
    out: list[PendingItem] = []
    for submission, records in queue.waiting():
        if db and submission.study != db:
            continue
        if submission.owner_uid != owner_uid and not everyone:
            continue  # other users' pipelines are theirs to save
        out.append(
            {
                "db": submission.study,
                "process": submission.process,
                "monitor": submission.monitor,
                "run_ids": [r.run_id for r in records],
                "pipelines": [r.modules for r in records],
            }
        )
    return out


def study_list(studies: Studies, visible: Callable[[list[str]], set[str]]) -> list[StudyItem]:
    allowed = visible([path for path, _ in studies.items()])
    return [
        {"db": path, "counts": dict(store.counts)}
        for path, store in studies.items()
        if path in allowed
    ]
