"""Taking a submission in bounded steps (issue 27): a submission of 150,000 runs must not stop
the daemon's loop, or every other user's `status` and `ping` waits for it.

A `submit` becomes a Taking: a generator that does a part of the work and yields, which the
server's loop (mosaicd.service.server) advances between other requests, for at most a few tens
of milliseconds at a time; the submitter's reply is sent once it is over. The parts:

1. the per-user limits, counting the runs of the user's submissions still being taken (so two
   taken side by side cannot pass them together);
2. the daemon's checks (mosaicd.scheduling.submissions.check_submission), a part of the
   pipelines per step: a refused submission has written nothing;
3. one transaction in the study, which the study's keeper holds open (Store.begin_submission,
   then Store.add_runs per part, mosaicd.keeper.main's `hold`/`within`), committed at the end
   just after the daemon records the submission's owner: the study shows all of the runs or
   none (one transaction per state change, made in parts). Until then the study's other
   writes wait (StudyWriter.taking) and its runs do not start; a failure or a daemon that
   stops rolls it all back (a keeper that dies does too). The COMMIT's reply is awaited between
   steps (mosaicd.keeper.link.Link.begin): a keeper process makes it while the loop goes on;
4. its runs queued in memory in one go, their records built here (not read back), every run of
   one pipeline sharing one list of modules.

Part sizes follow the time the last part took (STEP_S each), so the same code is bounded on a
fast and a slow machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

from mosaic_client import schema
from mosaic_client.protocol import ErrorCode, SubmitReply
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.keeper.link import CALL_TIMEOUT_S, PER_ROW_S
from mosaicd.owners import Owner
from mosaicd.scheduling.core import SchedulerCore
from mosaicd.scheduling.submissions import Run, build_runs, build_search_runs, check_submission
from mosaicd.storage.store import RunRecord, StoreError
from mosaicd.storage.writer import COMMITTING

STEP_S = 0.02  # the work of one step: other requests are answered between steps
FIRST_PART = 100  # pipelines in a submission's first part; later parts follow the time taken
MAX_PART = 20_000

Steps = Generator[Any, None, Any]


class Taking:
    """A request whose reply comes once its steps are over (the server advances it)."""

    NOT_YET = object()

    def __init__(self, steps: Steps, name: str = "submit") -> None:
        self.steps = steps
        self.name = name  # the request, for the server's error messages
        self.committing = False  # its COMMIT is on its way: it is queued whole, soon

    def step(self) -> Any:
        """Do one part: NOT_YET, or the reply's data (or raise the refusal)."""
        try:
            self.committing = next(self.steps) == COMMITTING
        except StopIteration as done:
            return done.value
        return Taking.NOT_YET

    def finish_now(self) -> Any:
        """Its reply, its steps done one after the other (the daemon stops during a COMMIT)."""
        while (reply := self.step()) is Taking.NOT_YET:
            time.sleep(0.005)
        return reply

    def cancel(self) -> None:
        """Stop it (the daemon stops): what it wrote is rolled back."""
        self.steps.close()


def in_parts(total: int, work: Callable[[int, int], None]) -> Generator[None, None, None]:
    """work(start, stop) over [0, total) in parts, one per step: each part is sized so that
    its work takes about STEP_S, judged by the time the previous part's took."""
    size, start = FIRST_PART, 0
    while start < total:
        stop = min(total, start + size)
        began = time.perf_counter()
        work(start, stop)
        spent = max(time.perf_counter() - began, 1e-6)
        size = max(1, min(MAX_PART, int((stop - start) * STEP_S / spent)))
        start = stop
        yield


def rows_timeout(rows: int) -> float:
    """How long a keeper may take to write `rows` runs of a submission."""
    return CALL_TIMEOUT_S + PER_ROW_S * rows * 8


def modules_interned(pipelines: list[Any], start: int, stop: int) -> None:
    """Equal pipelines of pipelines[start:stop] made one list object (the repetitions of a
    pipeline arrive as separate copies): the queue's records share it."""
    seen: dict[tuple[Any, ...], list[Any]] = {}
    for index in range(start, stop):
        modules = pipelines[index]
        key = tuple(tuple(module.items()) for module in modules)
        pipelines[index] = seen.setdefault(key, modules)


class Submitting(SchedulerCore):
    def submit(self, *args: Any, **kwargs: Any) -> Taking:
        """A submission, checked then queued in one transaction, in steps (Taking); the
        arguments are _take's. The run-files directory and a new study file are made by
        `acting_for`'s keeper (mosaicd.keeper; None: the daemon's own user) with the
        submission's umask, so they are that user's; the directory only once the submission
        is known to be good."""
        return Taking(self._take(*args, **kwargs))

    def _take(
        self,
        db: str,
        config_path: str,
        process: dict[str, Any],
        monitor: dict[str, Any],
        pipelines: list[Any],
        owner_uid: int | None,
        owner: str | None,
        acting_for: Owner | None = None,
        priority: int = 0,
        search: dict[str, Any] | None = None,
    ) -> Generator[Any, None, SubmitReply]:
        if owner_uid is None:
            raise Refused(ErrorCode.PERMISSION, "the daemon could not learn who you are")
        uid: int = owner_uid
        name = owner or str(uid)
        # The limits first (a refusal comes at once); the runs count as queued from now on, so
        # that two big submissions of one user taken side by side cannot pass them together.
        total = len(pipelines) * search_runs_per_pipeline(search)
        problem = self.limit_problem(uid, name, total)
        if problem:
            raise Refused(ErrorCode.INVALID, f"{problem}. Nothing was queued.")
        self._being_taken[uid] = self._being_taken.get(uid, 0) + total
        try:
            self._executor.check_submission(process, pipelines, acting_for)
            gpu_slots = self._executor.slot_count("cuda")
            check_submission(process, monitor, pipelines[:1], gpu_slots, search)  # none: refused

            def check(start: int, stop: int) -> None:
                check_submission(process, monitor, pipelines[start:stop], gpu_slots, search)
                modules_interned(pipelines, start, stop)

            yield from in_parts(len(pipelines), check)
            store = self._open_for(db, process, monitor, acting_for)
            # One held transaction per keeper: a second submission through it waits its turn.
            while store.link in self._held_links:
                yield
            self._held_links.add(store.link)
            try:
                runs = _Runs(process, monitor, pipelines, uid, name, search)
                return (yield from self._write(db, config_path, process, runs, priority))
            finally:
                self._held_links.discard(store.link)
        finally:
            self._being_taken[uid] -= total

    def _open_for(
        self,
        db: str,
        process: dict[str, Any],
        monitor: dict[str, Any],
        acting_for: Owner | None,
    ) -> Any:
        umask = owners.umask_of(monitor)
        try:
            self._studies.keepers.of(acting_for).call(
                "make_dirs",
                None,
                {"path": process["run_files_path"], "umask": umask if acting_for else None},
            )
        except StoreError as exc:
            raise Refused(
                ErrorCode.PERMISSION,
                f"{process['run_files_path']}: you may not create it ({exc}). Nothing was queued.",
            ) from None
        return self._studies.open(db, create=True, owner=acting_for, umask=umask)

    def _write(
        self,
        db: str,
        config_path: str,
        process: dict[str, Any],
        runs: _Runs,
        priority: int,
    ) -> Generator[Any, None, SubmitReply]:
        """The submission's one transaction, in parts; its runs queued once it is committed."""
        writer = self._studies.writer(db)
        uid, name = runs.uid, runs.name
        batch = {
            "owner_uid": uid,
            "owner": name,
            "config_path": config_path,
            "process": process,
            "monitor": runs.monitor,
            "priority": priority,
            "search": runs.search,
        }
        try:
            opened = writer.open_held("begin_submission", {"batch": batch}, CALL_TIMEOUT_S)
        except StoreError as exc:
            raise _refused(exc) from None
        submission_id, first_run_id, first_seq, created_at = opened
        records: list[RunRecord] = []
        epochs = int(process["epochs"])

        def add(start: int, stop: int) -> None:
            part, searches = runs.part(start, stop)
            writer.add_held(
                "add_runs",
                {
                    "opened": opened,
                    "epochs": epochs,
                    "owner": name,
                    "runs": [list(run) for run in part],
                    "offset": start,
                    "search_runs": searches,
                },
                rows_timeout(stop - start),
            )
            records.extend(
                RunRecord(
                    first_run_id + at,
                    submission_id,
                    modules,
                    seed,
                    epochs,
                    0,
                    0,
                    first_seq + at,
                    searches[at - start] if searches else None,
                )
                for at, (modules, seed, _, _) in enumerate(part, start)
            )

        try:
            yield from in_parts(runs.total, add)
            # Its owner, from the kernel, in the daemon's state: just before the study's COMMIT
            # (mosaicd.storage.identity says what a crash in between leaves).
            yield from writer.close_held(
                True, rows_timeout(runs.total), self._recorder(db, opened, uid, name)
            )
        except StoreError as exc:
            raise _refused(exc) from None
        finally:
            if writer.taking:  # refused, failed or stopped midway: nothing of it is kept
                for _ in writer.close_held(False, rows_timeout(runs.total)):
                    time.sleep(0.005)  # the daemon stops: its loop waits for the ROLLBACK
        self._queue.add_new(db, self._studies[db], records)
        return {
            "db": db,
            "submission_id": submission_id,
            "run_ids": [r.run_id for r in records],
            "paused": self._holds.holds_submissions_of(uid),
        }

    def _recorder(self, db: str, opened: list[Any], uid: int, name: str) -> Callable[[Any], None]:
        def record(_: Any) -> None:
            self._identities.record(db, opened[0], uid, name, opened[3])

        return record


def search_runs_per_pipeline(search: dict[str, Any] | None) -> int:
    """How many runs a search queues per pipeline (its trials and final runs); 1 without one."""
    if search is None:
        return 1
    settings = schema.search_settings(search)
    return int(settings["trials"]) + int(settings["final_repetitions"])


class _Runs:
    """A checked submission's runs, built a part at a time (build_runs); a search's are built
    at once (build_search_runs: its rounds interleave the groups; a search is small)."""

    def __init__(
        self,
        process: dict[str, Any],
        monitor: dict[str, Any],
        pipelines: list[Any],
        uid: int,
        name: str,
        search: dict[str, Any] | None,
    ) -> None:
        self.process, self.monitor, self.pipelines = process, monitor, pipelines
        self.uid, self.name, self.search = uid, name, search
        self._search_runs: tuple[list[Run], list[dict[str, Any]]] | None = None
        if search is not None:
            self._search_runs = build_search_runs(process, pipelines, search, uid, name)
        self.total = len(self._search_runs[0]) if self._search_runs else len(pipelines)

    def part(self, start: int, stop: int) -> tuple[list[Run], list[dict[str, Any]] | None]:
        """Runs start..stop, and their search records (None: not a search)."""
        if self._search_runs is not None:
            runs, records = self._search_runs
            return runs[start:stop], records[start:stop]
        built = build_runs(
            self.process, self.monitor, self.pipelines[start:stop], self.uid, self.name, start
        )
        return built, None


def _refused(exc: StoreError) -> Refused:
    return Refused(ErrorCode.INVALID, f"{exc}; nothing was queued: submit again once it is solved")
