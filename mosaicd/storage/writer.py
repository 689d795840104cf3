"""The per-study writer: the one door through which the scheduler writes a study database.

Why: the daemon has one loop for every user. A study whose database is locked by another
process (a user's `sqlite3` shell left in `BEGIN EXCLUSIVE`), whose filesystem is full, or
whose trigger never ends (mosaicd.storage.user_files: each statement has a time budget) must
not stop that loop, or every client and every other study waits with it (issue 18).

How: each write is a named operation of the study's keeper (mosaicd.keeper.operations) with
its arguments, applied there in one transaction (one transaction per state change). The
writer tries it at once, without waiting for the lock (Store.BUSY_TIMEOUT_MS);
when the study is locked or its disk is full, the operation is kept, in order, behind the
study's earlier ones, and retried by the loop: a locked study every RETRY_BUSY_S, a full one
(or one whose statement ran past its budget) when `mosaic resume` asks (Scheduler.release) or
at a restart. An operation reads what it needs inside its own transaction, so a write applied
late decides on the state it finds then; its in-memory consequence (``then``) runs only once it
is written. The scheduler starts no run of a
study with waiting writes.

What is kept in memory is lost if the daemon dies while the study is blocked; the database
stays as the last written transaction left it, and a restart goes on from there (runs marked
running resume from their last checkpoint). A keeper that does not answer (mosaicd.keeper.link)
is a locked study here: its writes wait and are tried again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mosaicd.storage.store import DiskFull, StoreError, StudyBusy, StudyFault, StudyStalled

if TYPE_CHECKING:
    from mosaicd.storage.handle import StudyHandle

log = logging.getLogger("mosaicd")

RETRY_BUSY_S = 0.2  # how often the loop tries a locked study again
RETRY_ERROR_S = 5.0  # and a study that failed with another database error

Then = Callable[[Any], None]
COMMITTING = "committing"  # what close_held yields while a COMMIT is on its way


@dataclass
class _Write:
    what: str
    op: str  # a keeper operation (mosaicd.keeper.operations.WRITES)
    args: dict[str, Any]
    then: Then | None


class StudyWriter:
    def __init__(self, store: StudyHandle) -> None:
        self.store = store
        self._waiting: deque[_Write] = deque()
        self.problem: str | None = None  # why writes wait, for `mosaic status`
        self.disk_full = False
        self.full_handled = False  # the scheduler has asked the study's runs to park
        self._next_try = 0.0
        # A big submission being written in parts, in one transaction the study's keeper holds
        # (open_held .. close_held; issue 27): the study's other writes wait behind it.
        self.taking = False

    @property
    def waiting(self) -> int:
        """How many writes wait for the lock or for space."""
        return len(self._waiting)

    @property
    def blocked(self) -> bool:
        """Whether the study's writes are held up: start none of its runs."""
        return bool(self._waiting) or self.problem is not None or self.taking

    def write(self, what: str, op: str, args: dict[str, Any], then: Then | None = None) -> bool:
        """Apply `op` in one transaction now, or keep it behind the study's waiting writes.
        Returns whether it is written."""
        self._waiting.append(_Write(what, op, args, then))
        if len(self._waiting) > 1:
            return False
        return self.flush(force=True)

    def try_now(
        self,
        op: str,
        args: dict[str, Any],
        before_commit: Then | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Apply `op` now or raise StoreError (StudyBusy, DiskFull) and keep nothing: for writes
        whose caller can give up (a submission is refused, a run stays queued).
        `before_commit` sees the result while the transaction is still open; the write is
        committed once it returns, and rolled back if it raises."""
        if self._waiting or self.taking:
            raise StudyBusy(
                f"{self.store.path}: {self.problem or _busy_reason(self.taking)}; "
                f"{self.waiting} write(s) wait"
            )
        try:
            if before_commit is None:
                return self.store.call(op, timeout=timeout, **args)
            result = self.store.call(op, hold=True, timeout=timeout, **args)
            try:
                before_commit(result)
            except BaseException:
                self.store.call("finish", commit=False)
                raise
            self.store.call("finish", commit=True)
            return result
        except (DiskFull, StudyStalled) as exc:
            self._blocked(str(exc), full=True)
            raise
        except StudyBusy as exc:
            self._blocked(str(exc), full=False)
            raise

    def open_held(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        """Begin a write whose transaction stays open for more parts (add_held), as try_now
        would (nothing is kept if it cannot be made now); the study's other writes wait until
        close_held."""
        if self._waiting or self.taking:
            raise StudyBusy(f"{self.store.path}: {self.problem or _busy_reason(self.taking)}")
        result = self._checked(lambda: self.store.call(op, hold=True, timeout=timeout, **args))
        self.taking = True
        return result

    def add_held(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        """One more part of the open write. If it fails the keeper has rolled all of it back
        (or died with it): the write is over, nothing of it is kept."""
        try:
            return self._checked(lambda: self.store.call(op, within=True, timeout=timeout, **args))
        except StoreError:
            self.taking = False
            raise

    def close_held(
        self, commit: bool, timeout: float, before_commit: Then | None = None
    ) -> Iterator[None]:
        """Commit the open write (`before_commit` first sees nothing and may still refuse it by
        raising) or roll it back, within `timeout`; yields while the keeper makes the COMMIT
        (seconds for 150,000 runs: the daemon's loop goes on meanwhile). Then the writes that
        waited behind it go through."""
        try:
            if commit and before_commit is not None:
                try:
                    before_commit(None)
                except BaseException:
                    commit = False
                    raise
        finally:
            try:
                self._checked(lambda: self.store.begin("finish", timeout, commit=commit))
                try:
                    while not self._checked(lambda: self.store.finished()[0]):
                        yield COMMITTING if commit else None
                except GeneratorExit:
                    # Stopped while the keeper ends the transaction: its answer is awaited
                    # (else the keeper's link would wait for it for ever).
                    while not self._checked(lambda: self.store.finished()[0]):
                        time.sleep(0.005)
                    raise
            finally:
                self.taking = False
                self.flush(force=True)

    def _checked(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (DiskFull, StudyStalled) as exc:
            self._blocked(str(exc), full=True)
            raise
        except StudyBusy as exc:
            self._blocked(str(exc), full=False)
            raise

    def flush(self, force: bool = False) -> bool:
        """Write what waits, in order, until one cannot be written. Returns whether none waits.
        Without `force`, a full disk waits for `mosaic resume` and a locked study is tried at
        most every RETRY_BUSY_S."""
        now = time.monotonic()
        if self.taking:
            return not self._waiting
        if not force and (self.disk_full or now < self._next_try):
            return not self._waiting
        while self._waiting:
            item = self._waiting[0]
            try:
                result = self.store.call(item.op, **item.args)
            except (DiskFull, StudyStalled) as exc:
                # A statement that ran past its budget (a user's endless trigger) is set aside
                # like a full disk: tried again at `mosaic resume`, never by the loop alone.
                self._blocked(str(exc), full=True)
                return False
            except StudyBusy as exc:
                self._blocked(str(exc), full=False)
                return False
            except StudyFault as exc:
                self._blocked(str(exc), full=False)
                self._next_try = now + RETRY_ERROR_S
                return False
            except StoreError as exc:
                # The write no longer applies (e.g. a run settled otherwise meanwhile): it
                # must not block the study's later writes.
                log.error("%s: dropped %s: %s", self.store.path, item.what, exc)
                self._waiting.popleft()
                continue

            self._waiting.popleft()
            if item.then is not None:
                item.then(result)
        if self.problem:
            log.info("%s: writes go through again (was: %s)", self.store.path, self.problem)
        self.problem = None
        self.disk_full = False
        self.full_handled = False
        return True

    def _blocked(self, problem: str, full: bool) -> None:
        if problem != self.problem:
            log.warning("%s: writes wait: %s", self.store.path, problem)
        self.problem = problem
        self.disk_full = full
        self._next_try = time.monotonic() + RETRY_BUSY_S


def _busy_reason(taking: bool) -> str:
    return "a submission is being written to it" if taking else "earlier writes wait"
