"""The queue: the queued runs of every submission, in submission order, and the submissions
they belong to. Rebuilt from the study databases at start-up (Scheduler.recover)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator

from mosaicd.scheduling.submissions import Submission
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.identity import Identities
from mosaicd.storage.store import RunRecord, StoreError

Key = tuple[str, int]  # (study path, submission id)


class RunQueue:
    def __init__(self, identities: Identities) -> None:
        self._identities = identities
        self._submissions: dict[Key, Submission] = {}
        self._queues: dict[Key, deque[RunRecord]] = {}
        # When each queued run reached this daemon's queue, across studies: a study's own
        # queue_seq numbers only its runs (two studies both start at 1), so first come, first
        # served across studies is by this.
        self._arrival: dict[tuple[str, int], int] = {}
        self._arrivals = itertools.count()

    def submission(self, study: str, store: StudyHandle, submission_id: int) -> Submission:
        """The submission, loaded from its study the first time it is needed. Its owner is
        the daemon's record (mosaicd.storage.identity), never the study's row; a row that
        disagrees sets the study aside. No record: no owner (None), and the study is aside."""
        key = (study, submission_id)
        if key not in self._submissions:
            info = store.submission(submission_id)
            record = self._identities.check(study, store.submission_rows(), submission_id)
            try:
                submission = Submission(
                    study,
                    submission_id,
                    None if record is None else record.uid,
                    None if record is None else record.name,
                    info["process"],
                    info["monitor"],
                    priority=int(info.get("priority", 0)),
                    search=info.get("search"),
                )
            except Exception as exc:  # settings its keeper sent that do not resolve
                raise StoreError(f"submission {submission_id}: unusable settings ({exc})") from None
            self._submissions[key] = submission
        return self._submissions[key]

    def add(self, study: str, store: StudyHandle, record: RunRecord) -> None:
        """Queue a run. A study whose submission cannot be read now (its keeper is not
        answering, its rows are unusable) is set aside: nothing of it starts until `resume`."""
        key = (study, record.submission_id)
        try:
            if key in self._submissions and key not in self._queues:
                # Queued again (resume, rerun): its row is compared with the record again.
                self._identities.check(study, store.submission_rows(), record.submission_id)
            self.submission(study, store, record.submission_id)
        except StoreError as exc:
            self._identities.set_aside(study, f"its submissions cannot be read ({exc})")
            return
        # A run queued again (resume, rerun) arrives anew; put_back keeps its place.
        self._arrival[(study, record.run_id)] = next(self._arrivals)
        self._queues.setdefault(key, deque()).append(record)
        if len(self._arrival) > 2 * self.total() + 1000:
            queued = {(k[0], r.run_id) for k, q in self._queues.items() for r in q}
            self._arrival = {k: v for k, v in self._arrival.items() if k in queued}

    def add_new(self, study: str, store: StudyHandle, records: list[RunRecord]) -> None:
        """Queue the runs of a submission just committed, in one go (a big one's 150,000)."""
        if not records:
            return
        submission_id = records[0].submission_id
        try:
            self.submission(study, store, submission_id)
        except StoreError as exc:
            self._identities.set_aside(study, f"its submissions cannot be read ({exc})")
            return
        self._arrival.update(((study, r.run_id), next(self._arrivals)) for r in records)
        self._queues.setdefault((study, submission_id), deque()).extend(records)

    def submission_of_queued(self, study: str, run_id: int) -> Submission | None:
        """The submission of a queued run, or None when it is not queued."""
        for key, queue in self._queues.items():
            if key[0] == study and any(r.run_id == run_id for r in queue):
                return self._submissions[key]
        return None

    def loaded(self, study: str) -> list[Submission]:
        """The study's submissions the queue holds in memory."""
        return [s for (path, _), s in self._submissions.items() if path == study]

    def put_back(self, study: str, record: RunRecord) -> None:
        """A run taken by take_next that could not start: first of its submission again."""
        self._queues.setdefault((study, record.submission_id), deque()).appendleft(record)

    def drop(self, study: str, run_id: int) -> None:
        for key, queue in list(self._queues.items()):
            if key[0] == study:
                for record in queue:
                    if record.run_id == run_id:
                        queue.remove(record)
                        if not queue:
                            del self._queues[key]
                        return

    def peek_next(
        self,
        startable: Callable[[Submission], bool],
        rank: Callable[[Submission], int] | None = None,
        ready: Callable[[Submission, RunRecord], bool] | None = None,
    ) -> tuple[Submission, RunRecord] | None:
        """The first queued run whose submission may start one now, left in the queue: with
        `rank` (fair share), of the best-ranked owner; then of the highest priority; then the
        oldest. With `ready`, the submission's first run that is ready (a search's trials
        wait for their earlier rounds, docs/tuning.md)."""

        def order(key: Key) -> tuple[int, int, int]:
            submission = self._submissions[key]
            first = self._arrival.get((key[0], self._queues[key][0].run_id), 0)
            return (rank(submission) if rank else 0, -submission.priority, first)

        candidates = sorted((key for key, q in self._queues.items() if q), key=order)
        for key in candidates:
            submission = self._submissions[key]
            if not startable(submission):
                continue
            if ready is None or submission.search is None:
                return submission, self._queues[key][0]
            record = next((r for r in self._queues[key] if ready(submission, r)), None)
            if record is not None:
                return submission, record
        return None

    def take_next(
        self,
        startable: Callable[[Submission], bool],
        rank: Callable[[Submission], int] | None = None,
        ready: Callable[[Submission, RunRecord], bool] | None = None,
    ) -> tuple[Submission, RunRecord] | None:
        """peek_next's run, taken off the queue."""
        found = self.peek_next(startable, rank, ready)
        if found is None:
            return None
        submission, record = found
        key = (submission.study, submission.submission_id)
        self._queues[key].remove(record)
        if not self._queues[key]:
            del self._queues[key]
        return found

    def count_queued(
        self, submission: Submission, matches: Callable[[RunRecord], bool], window: int
    ) -> int:
        """How many of the submission's first `window` queued runs match."""
        queue = self._queues.get((submission.study, submission.submission_id), ())
        return sum(1 for record in itertools.islice(queue, window) if matches(record))

    def take_queued(
        self,
        submission: Submission,
        matches: Callable[[RunRecord], bool],
        window: int,
        limit: int,
    ) -> list[RunRecord]:
        """Take up to `limit` matching runs off the first `window` of the submission's queue."""
        key = (submission.study, submission.submission_id)
        queue = self._queues.get(key)
        if not queue:
            return []
        taken = [r for r in itertools.islice(queue, window) if matches(r)][:limit]
        if taken:
            ids = {r.run_id for r in taken}
            self._queues[key] = deque(r for r in queue if r.run_id not in ids)
            if not self._queues[key]:
                del self._queues[key]
        return taken

    def ahead_of(self, study: str, run_id: int) -> int | None:
        """How many queued runs start before this one (None when it is not queued)."""
        queues = [q for (path, _), q in self._queues.items() if path == study]
        seq = next((r.queue_seq for q in queues for r in q if r.run_id == run_id), None)
        if seq is None:
            return None
        return sum(1 for q in queues for r in q if r.queue_seq < seq)

    def total(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queued_counts(self) -> Iterator[tuple[Submission, int]]:
        """Each submission with queued runs, and how many (no copy of the runs: the
        scheduler asks this on every dispatch pass)."""
        for key, queue in self._queues.items():
            if queue:
                yield self._submissions[key], len(queue)

    def waiting(self) -> Iterator[tuple[Submission, list[RunRecord]]]:
        """Each submission with queued runs, and those runs in order."""
        for key, queue in self._queues.items():
            yield self._submissions[key], list(queue)
