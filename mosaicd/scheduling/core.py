"""The scheduler's registries, declared once for all its parts
(mosaicd.scheduling.scheduler.Scheduler is made of mosaicd.scheduling.dispatch,
mosaicd.scheduling.worker_events and mosaicd.scheduling.control on top of this core). They are
private: request handlers reach them only through the scheduler's methods."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mosaic_client.protocol import NOT_SERVED, ErrorCode
from mosaicd.errors import Refused
from mosaicd.executors.base import Executor, WorkerHandle
from mosaicd.scheduling.fair_share import Ledger, Limits
from mosaicd.scheduling.holds import Holds
from mosaicd.scheduling.run_queue import RunQueue
from mosaicd.scheduling.search_gate import SearchGate
from mosaicd.scheduling.submissions import Submission
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.state import DaemonState
from mosaicd.storage.store import RunRecord
from mosaicd.storage.studies import Studies

# How the scheduler sends a message to a worker: send(worker, name)(**fields).
Sender = Callable[[WorkerHandle, str], Callable[..., None]]


@dataclass
class ActiveRun:
    """A run a worker is training, with its latest progress (for `status` and `show`)."""

    study: str
    record: RunRecord
    submission: Submission
    worker: WorkerHandle
    pipeline: str
    started: float = field(default_factory=time.time)
    epoch: int = 0
    train_loss: float | None = None
    test_loss: float | None = None
    park_sent: bool = False
    group: list[int] | None = None  # the run ids sent with it as one ensemble
    # Asked to park for this user's share (mosaicd.scheduling.preemption): once parked, it is
    # queued again by itself, unlike a user's `pause --now`.
    preempted_for: str | None = None


def served(studies: Studies, db: str) -> StudyHandle:
    """The store of a study the daemon already serves. Only `submit` (Studies.open) makes the
    daemon serve a study: a request that merely names another path (status, show, cancel,
    rerun, rekey, repeat) must not open it, create its -wal/-shm, migrate it or record it in
    the daemon's state; it is refused, and nothing of the file is touched."""
    store = studies.get(db)
    if store is None:
        raise Refused(
            ErrorCode.NOT_FOUND,
            f"{NOT_SERVED}: {db}. The daemon serves the studies queued into it with "
            "`mosaic run CONFIG DB` and takes over no other; read an older study without it "
            "(`mosaic export`, `mosaic show RUN --db DB`, `mosaic plotloss`), or queue runs into "
            "it with `mosaic run` to have the daemon serve it. Nothing was done.",
        )
    return store


class SchedulerCore:
    def __init__(
        self,
        state: DaemonState,
        executor: Executor,
        send: Sender,
        checkpoint_every: float,
        shared: bool = False,
        fair_share: Ledger | None = None,
        shares: dict[int, float] | None = None,
        limits: Limits | None = None,
        preempt_after: float = 0.0,
    ) -> None:
        self._executor = executor
        self._send = send
        self._checkpoint_every = checkpoint_every
        # The open study databases, and whose their submissions are (shared: --socket-group).
        self._studies = Studies(state, shared, getattr(executor, "worker_python", None))
        self._identities = self._studies.identities
        self._queue = RunQueue(self._identities)  # queued runs and their submissions
        self._active: dict[tuple[str, int], ActiveRun] = {}  # (study, run id) -> training run
        self._pending_epochs: dict[str, list[dict[str, Any]]] = {}  # study -> epochs to write
        self._holds = Holds(state)
        # Usage per user and their shares: who is furthest below their share starts next
        # (mosaicd.scheduling.fair_share; a shared daemon only).
        self._state = state
        self._usage = fair_share or Ledger()
        # As the last daemon saved it (DaemonState.usage), decayed over the time it was down
        # at the first charge (Ledger.decay_to); a first start begins everyone at zero.
        saved, saved_at = state.usage()
        if saved_at is None:
            self._usage.at = time.time()
        else:
            self._usage.usage, self._usage.at = saved, saved_at
        self._usage_saved = time.monotonic()
        self._shares = dict(shares or {})
        self._limits = limits or Limits()
        # Preemption (mosaicd.scheduling.preemption; 0: off): how long a user below their share
        # waits for a slot before an over-share user's run parks for them; since when each
        # waiting user has waited; the runs asked to park for each (one request at a time).
        self._preempt_after = preempt_after
        self._waiting_since: dict[int, float] = {}
        self._preempting: dict[int, set[tuple[str, int]]] = {}
        self._preempt_checked = 0.0
        # Submissions being taken in steps (mosaicd.scheduling.taking): their runs per user
        # (the per-user limit counts them as queued), and the keepers holding their transaction.
        self._being_taken: dict[int, int] = {}
        self._held_links: set[Any] = set()
        # Which search runs may start (mosaicd.scheduling.search_gate), read per dispatch pass.
        self._search_gate = SearchGate()
        self.shutting_down = False

    def queued_of(self, uid: int | None) -> int:
        """How many runs the user has queued, or is having taken (the per-user limit counts
        these)."""
        queued = sum(n for s, n in self._queue.queued_counts() if s.owner_uid == uid)
        return queued + (self._being_taken.get(uid, 0) if uid is not None else 0)

    def limit_problem(self, uid: int | None, name: str, adding: int) -> str | None:
        """Why `adding` more runs of this user may not be queued (the daemon's limits)."""
        return self._limits.submission_problem(name, self.queued_of(uid), adding)

    @property
    def registry(self) -> Studies:
        """The served studies and the users' keepers, for the rights checks of handlers
        (mosaicd.service.rights): they prove a caller's access through the caller's keeper."""
        return self._studies
