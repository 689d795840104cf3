"""Dispatch: which queued run goes to which idle worker, and starting it there."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mosaic_client.contract import checkpoint_path
from mosaic_client.protocol import RunSpec
from mosaic_client.schema import DATA_CACHE_KEYS
from mosaicd.executors.base import BUSY, IDLE, STARTING, WorkerHandle
from mosaicd.scheduling.core import ActiveRun, SchedulerCore
from mosaicd.scheduling.ensemble_groups import group_key, group_size
from mosaicd.scheduling.fair_share import owner_order, slot_weight
from mosaicd.scheduling.search_gate import spec_part
from mosaicd.scheduling.submissions import Submission
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.store import RunRecord, StoreError

log = logging.getLogger("mosaicd")

# How many groups' worth of a submission's queue dispatch looks through for ensemble mates.
MATE_WINDOW_GROUPS = 4
# How often the fair-share usage is saved (and at every stop): a crash loses at most this much.
USAGE_SAVE_S = 60.0


class Dispatch(SchedulerCore):
    """The scheduler's dispatch step (a part of mosaicd.scheduling.scheduler.Scheduler)."""

    def dispatch(self) -> None:
        self._charge_usage()
        if self._holds.all or self.shutting_down:
            return
        self._search_gate.reset()
        for kind in ("cpu", "cuda"):
            # The daemon's own idle workers first: when a slot must change hands to start a
            # user's run, it is one of theirs, and users' idle workers stay for their users.
            for worker in sorted(self._executor.idle(kind), key=lambda w: w.owner is not None):
                # No `break` when one worker finds nothing: gpu_available may rule out this
                # GPU's slots and allow the next GPU's.
                self._start_next(worker)

    def _startable(self, worker: WorkerHandle, any_owner: bool) -> Callable[[Submission], bool]:
        kind = worker.slot.kind
        holding: dict[int | None, int] = {}
        for busy in {id(r.worker): r for r in self._active.values()}.values():
            if busy.worker.slot.kind == kind:
                holding[busy.submission.owner_uid] = holding.get(busy.submission.owner_uid, 0) + 1

        def startable(submission: Submission) -> bool:
            return (
                # The daemon's per-user slot limit (mosaicd --user-cpu-slots, --user-gpu-slots).
                not self._limits.at_slot_limit(kind, holding.get(submission.owner_uid, 0))
                and
                # Its owner is the daemon's record, and its study agrees with the records
                # (mosaicd.storage.identity); a shared daemon runs nothing as root.
                submission.owner_uid is not None
                and self._identities.aside(submission.study) is None
                and not (self._identities.shared and submission.owner_uid == 0)
                # A worker trains the runs of its own user only (mosaicd.owners).
                and (any_owner or submission.run_as_uid == worker.owner_uid)
                and not self._holds.keeps(submission.owner_uid)
                # A study whose writes wait (locked, disk full) starts nothing until they land.
                and not self._studies.writer(submission.study).blocked
                and submission.running < submission.cap
                and submission.allows(worker.slot)
            )

        return startable

    def _charge_usage(self) -> None:
        """Charge every training run's owner for the slot time since the last charge (a group
        holds one slot), decayed as the ledger's half-life says."""
        now = time.time()
        elapsed = max(0.0, now - self._usage.at)
        self._usage.decay_to(now)
        charged: set[str] = set()
        for run in self._active.values():
            worker = run.worker
            uid = run.submission.owner_uid
            if uid is None or worker.worker_id in charged:
                continue
            charged.add(worker.worker_id)
            self._usage.charge(uid, elapsed * slot_weight(worker.slot.kind))
        if time.monotonic() - self._usage_saved >= USAGE_SAVE_S:
            self.save_usage()

    def save_usage(self) -> None:
        """Keep the usage in the daemon's state (a restart goes on from it)."""
        self._state.save_usage(self._usage.usage, self._usage.at)
        self._usage_saved = time.monotonic()

    def _rank(self) -> Callable[[Submission], int] | None:
        """On a shared daemon, the owners' fair-share order (mosaicd.scheduling.fair_share);
        None: first come, first served (a single-user daemon)."""
        if not self._identities.shared:
            return None
        owners = {s.owner_uid for s, _ in self._queue.queued_counts() if s.owner_uid is not None}
        if len(owners) < 2:
            return None
        order = owner_order(owners, self._usage.usage, self._shares)
        return lambda submission: order.get(submission.owner_uid or -1, len(order))

    def _start_next(self, worker: WorkerHandle) -> bool:
        """Start the first run that may start on this worker's slot (in fair-share order of
        its owner, then first come), if the worker is its user's; else give the slot to that
        user (_hand_over) unless a worker of theirs is on its way, and meanwhile train the
        worker's own user's next run, if any."""
        rank = self._rank()
        ready = self._search_ready
        oldest = self._queue.peek_next(self._startable(worker, any_owner=True), rank, ready)
        if oldest is None:
            return False
        if oldest[0].run_as_uid != worker.owner_uid and not self._has_worker_for(
            oldest[0].run_as_uid
        ):
            self._hand_over(worker, *oldest)
            return False
        found = self._queue.take_next(self._startable(worker, any_owner=False), rank, ready)
        if found is None:
            return False
        return self._start(worker, *found)

    def _search_ready(self, submission: Submission, record: RunRecord) -> bool:
        """Whether a queued run of a search may start (its earlier rounds have finished)."""
        store = self._studies[submission.study]
        return self._search_gate.ready(store, submission, record)

    def wait_reason(self, study: str, run_id: int) -> str | None:
        """Why a queued run has not started, in words (`mosaic show`); None if not queued."""
        submission = self._queue.submission_of_queued(study, run_id)
        if submission is None:
            return None
        owner = submission.owner or "its owner"
        writer = self._studies.writer(study)
        checks = (
            (self._holds.all, "the daemon is paused (`mosaic resume --all`)"),
            (self._holds.keeps(submission.owner_uid), f"{owner}'s submissions are paused"),
            (self._identities.aside(study) is not None, self._identities.aside(study) or ""),
            (writer.blocked, f"its study's writes wait: {writer.problem}"),
            (
                submission.running >= submission.cap,
                f"its submission trains {submission.cap} at a time ([MONITOR] nb_processus)",
            ),
        )
        for true, words in checks:
            if true:
                return words
        if submission.search is not None:
            record = next(
                (
                    r
                    for s, runs in self._queue.waiting()
                    if s is submission
                    for r in runs
                    if r.run_id == run_id
                ),
                None,
            )
            if record is not None:
                words = self._search_gate.wait(self._studies[study], submission, record)
                if words:
                    return words
        holding = sum(
            1 for r in self._active.values() if r.submission.owner_uid == submission.owner_uid
        )
        if self._limits.at_slot_limit("cpu", holding):
            return f"user limit {self._limits.cpu_slots} CPU slots ({owner} holds {holding})"
        rank = self._rank()
        if rank is not None and rank(submission) > 0:
            ahead = [s for s, _ in self._queue.queued_counts() if rank(s) < rank(submission)]
            if ahead:
                return f"behind {ahead[0].owner or 'another user'}'s share (fair share)"
        before = self._queue.ahead_of(study, run_id)
        return f"waiting for a free slot; {before} run(s) of this study start before it"

    def _has_worker_for(self, uid: int | None) -> bool:
        """Whether a worker of this user is starting, idle or about to start: then it takes
        their next run, and no other slot changes hands for it yet."""
        workers = self._executor.workers.values()
        return uid in self._executor.next_owner_uids() or any(
            w.owner_uid == uid and w.state in (STARTING, IDLE) and w.killed_for is None
            for w in workers
        )

    def _hand_over(self, worker: WorkerHandle, submission: Submission, record: RunRecord) -> None:
        """Give an idle worker's slot to the user of the oldest run that could start there: the
        worker exits, and a worker of that user starts in its place (a worker never trains two
        users' runs). The queue is first come, first served, across users as before."""
        failure = self._executor.start_failure(submission.run_as_uid)
        if failure is not None:
            self._queue.drop(submission.study, record.run_id)
            self._fail_unstarted(submission, record, failure)
            return
        log.info(
            "worker %s (%s) hands its slot over to %s",
            worker.worker_id,
            worker.slot.label,
            submission.owner or "the daemon's user",
        )
        self._executor.hand_over(worker, submission.run_as)
        self._send(worker, "exit")()

    def _fail_unstarted(self, submission: Submission, record: RunRecord, cause: str) -> None:
        """A run whose worker cannot be started fails with the reason (it never trained)."""

        self._studies.writer(submission.study).write(
            f"fail run {record.run_id}",
            "fail_unstarted",
            {"run_id": record.run_id, "cause": cause},
        )

    def _start(self, worker: WorkerHandle, submission: Submission, record: RunRecord) -> bool:
        """Start `record` on the worker, with the queued repetitions of its pipeline that train
        together with it when its submission has [MONITOR] ensemble = auto. False when the
        study cannot be written now (locked, or its disk full): the runs go back to the front
        of their queue and the study's writer says why."""
        store = self._studies[submission.study]
        members: list[tuple[RunRecord, RunSpec]] = []
        try:
            members.append((record, self._spec(worker, submission, record)))
            members += self._ensemble_mates(worker, submission, members[0][1])
            run_ids = [r.run_id for r, _ in members]
            grouped = len(members) > 1
            where = f"on {worker.slot.label} (worker {worker.worker_id}, pid {worker.pid})"
            together = f" in an ensemble with runs {run_ids}" if grouped else ""
            starts = [
                [
                    m.run_id,
                    spec["start_epoch"],
                    f"{where}{together} from epoch {spec['start_epoch']}",
                ]
                for m, spec in members
            ]
            # One transaction for the whole group: it starts at once, or not at all.
            self._studies.writer(submission.study).try_now(
                "start_runs", {"members": starts, "ensemble": run_ids if grouped else []}
            )
        except StoreError:
            # Locked, full or its keeper not answering: the runs stay first in their queue;
            # the study's writer says why.
            taken = [m for m, _ in members] or [record]
            for member in sorted(taken, key=lambda m: m.queue_seq, reverse=True):
                self._queue.put_back(submission.study, member)
            return False
        texts = {m.run_id: _pipeline_text(store, m.run_id) for m, _ in members}
        worker.become(BUSY)
        worker.run = (submission.study, record.run_id)
        worker.group = set(run_ids) if grouped else set()
        worker.recycle_after_group = False
        submission.running += 1  # a group takes one worker: nb_processus counts workers
        for member, spec in members:
            self._active[(submission.study, member.run_id)] = ActiveRun(
                submission.study,
                member,
                submission,
                worker,
                texts[member.run_id],
                epoch=spec["start_epoch"],
                group=run_ids if grouped else None,
            )
        if grouped:
            self._send(worker, "run_group")(specs=[spec for _, spec in members])
        else:
            self._send(worker, "run")(spec=members[0][1])
        return True

    def _spec(self, worker: WorkerHandle, submission: Submission, record: RunRecord) -> RunSpec:
        """What the worker needs to train the run (a "run" message's spec): the one place a
        RunSpec is made, from the submission's resolved settings."""
        settings = submission.process_settings
        run_files = settings["run_files_path"]
        from_epoch = record.checkpoint_epoch
        if from_epoch:
            # Looked for by its owner's keeper: the daemon does not look into a home itself.
            keeper = self._studies.keepers.of(submission.run_as)
            found, _ = keeper.call(
                "exists", None, {"path": checkpoint_path(run_files, record.run_id)}
            )
            if not found:
                from_epoch = 0
        return {
            "run_id": record.run_id,
            "process": settings,
            "modules": record.modules,
            "seed": record.seed,
            "device": worker.slot.device,
            "run_files_path": run_files,
            "epochs_target": record.epochs_target,
            "start_epoch": from_epoch,
            "checkpoint_every": self._checkpoint_every,
            "max_log_mb": submission.monitor_settings["max_log_mb"],
            # Only for a user's worker (mosaicd.owners); a single-user daemon's keep theirs.
            "umask": submission.umask if submission.run_as is not None else None,
            # [MONITOR]'s data cache settings (mosaicd.training.data_cache).
            "data_cache": {k: submission.monitor_settings[k] for k in DATA_CACHE_KEYS},
            # A search run's settings and the finished trials it may see (docs/tuning.md).
            **(
                {"search": spec_part(self._studies[submission.study], submission, record)}
                if record.search is not None and submission.search is not None
                else {}
            ),
        }

    def _ensemble_mates(
        self, worker: WorkerHandle, submission: Submission, lead: RunSpec
    ) -> list[tuple[RunRecord, RunSpec]]:
        """The queued runs of the submission that train together with `lead`, taken off the
        queue: same group key (same pipeline, epochs and start epoch), as many as
        ensemble_groups.group_size gives."""
        if submission.monitor_settings["ensemble"] != "auto" or submission.search is not None:
            # A search run resolves its own values when it starts: it trains alone.
            return []
        key = group_key(lead)
        if key is None:
            return []
        ensemble_max = submission.monitor_settings["ensemble_max"]
        specs: dict[int, RunSpec] = {}

        def mate(record: RunRecord) -> bool:
            spec = specs.setdefault(record.run_id, self._spec(worker, submission, record))
            return group_key(spec) == key

        # Repetitions are queued next to each other: look a few groups ahead, not at the
        # whole queue, so that dispatch stays cheap with thousands of queued runs.
        window = ensemble_max * MATE_WINDOW_GROUPS
        matching = self._queue.count_queued(submission, mate, window)
        # The size depends on the study alone, never on which workers happen to be free: the
        # same config trains the same groups, so it gives the same numbers, run after run and
        # on any executor (vmapped arithmetic equals a run alone within float rounding only).
        size = group_size(matching + 1, ensemble_max)
        if size <= 1:
            return []
        taken = self._queue.take_queued(submission, mate, window, size - 1)
        return [(record, specs[record.run_id]) for record in taken]


def _pipeline_text(store: StudyHandle, run_id: int) -> str:
    """A started run's readable pipeline, for `status` (a keeper that stopped answering just
    after the start leaves it blank: the run trains anyway)."""
    try:
        return store.pipeline_text(run_id)
    except StoreError:
        return ""
