"""Users' files as the daemon's single loop may touch them: regular files only, and no SQL
statement on a user's study that runs for longer than a budget (issue 24, item 4).

Why: one loop serves every user, and a user controls their own files. A FIFO at a study's path
(or at a run log's) makes a plain `open` for reading wait for a writer that never comes; a
trigger or view they add to their study runs inside the daemon's writes and reads, and a
recursive one never ends. Either would stop the daemon for everyone.

How:

- :func:`check_study_files` refuses, by lstat, anything but a regular file at a study's path
  (and at its -wal and -shm, which SQLite opens by name): a FIFO, a socket, a device, a
  directory, a symbolic link. Only then does SQLite open the path, and :func:`same_file` checks
  afterwards that the path still names the file that was checked. A study is never opened by
  the daemon besides SQLite (see check_study_files for why).
- :func:`check_regular` opens any other user file (a run's log) with O_NONBLOCK | O_NOFOLLOW
  (with the rights of whoever the caller acts as, mosaicd.owners) and refuses, by fstat,
  anything but a regular file.
- :class:`BudgetedConnection` (a sqlite3.Connection) gives each statement STATEMENT_BUDGET_S of
  wall time, started when the daemon executes it (not when a trigger fires, which the user
  could repeat); SQLite's progress handler interrupts it after that, and the statement fails
  with "interrupted" (:func:`is_interrupted`), like a busy study's write fails.

What remains (docs/deployment.md): SQLite opens the path itself, after the check. A user who
swaps a FIFO in during those microseconds can still stall the loop on a read-only open (a
read-write open of a FIFO does not wait on Linux); the swap is noticed afterwards only if the
FIFO is still there. The next step of the design moves all work on users' files into a
per-user unprivileged process, where a stall stops only that user.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from typing import Any

# How long one SQL statement of the daemon on a user's study may run. The loop serves every
# client meanwhile, so this bounds how long any user's study can hold it up. Real statements
# of the daemon take milliseconds (a state change, one epoch's metrics, a submission's rows).
STATEMENT_BUDGET_S = 0.5
# How many SQLite virtual-machine steps pass between two looks at the clock.
PROGRESS_STEPS = 1000

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class NotRegularFile(Exception):
    """A user's path names something other than a regular file: it is not opened."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: str, kind: str, what: str) -> NotRegularFile:
    return NotRegularFile(
        f"{path} is {kind}, not a regular file; the daemon opens only regular files as {what}: "
        "remove it or give the path of the file itself"
    )


def check_regular(path: str, what: str = "a study database") -> os.stat_result | None:
    """The stat of the regular file at `path`, or None when nothing is there; raise
    NotRegularFile for anything else (without waiting: O_NONBLOCK), PermissionError when the
    acting user may not read it."""
    try:
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symbolic link
            raise _refuse(path, "a symbolic link", what) from None
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):  # a socket, a device
            raise _refuse(path, "a special file", what) from None
        raise
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, _kind(st.st_mode), what)
    return st


def check_study_files(path: str) -> os.stat_result | None:
    """The stat of the regular file at a study's path (None when nothing is there), and its
    -wal and -shm files SQLite opens beside it regular too; raise NotRegularFile otherwise.

    By lstat, never by opening: SQLite holds POSIX advisory locks on an open study, and the
    kernel drops every lock a process holds on a file when that process closes *any*
    descriptor of it. Opening and closing the study here, beside the daemon's own connection,
    would silently release that connection's locks, and another process closing its
    connection would then think itself the last one and checkpoint and reset the WAL under
    the daemon. lstat neither opens the file nor waits on a FIFO, and sees a symbolic link as
    one."""
    found: os.stat_result | None = None
    for name, what in (
        (path, "a study database"),
        (path + "-wal", "a study's journal"),
        (path + "-shm", "a study's journal"),
    ):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            if name == path:
                return None
            continue
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(name, _kind(st.st_mode), what)
        if name == path:
            found = st
    return found


def same_file(path: str, checked: os.stat_result | None) -> None:
    """After SQLite opened `path`: refuse it unless it is still the regular file checked (or,
    when nothing was there, a regular file SQLite created)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        raise NotRegularFile(f"{path} disappeared while the daemon opened it; try again") from None
    if not stat.S_ISREG(now.st_mode):
        raise _refuse(path, _kind(now.st_mode), "a study database")
    if checked is not None and (now.st_dev, now.st_ino) != (checked.st_dev, checked.st_ino):
        raise NotRegularFile(f"{path} was replaced while the daemon opened it; try again")


class BudgetedCursor(sqlite3.Cursor):
    """A cursor that gives each row it fetches a budget of its own: a big result read row by
    row (a restart's recovery of 100,000 runs) is not one long statement, while a single step
    that never ends (a user's recursive trigger or view) still is."""

    def _arm(self) -> None:
        connection = self.connection
        if isinstance(connection, BudgetedConnection):
            connection.arm()

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        self._arm()
        return super().execute(*args, **kwargs)

    def executemany(self, sql: str, rows: Iterable[Any]) -> sqlite3.Cursor:  # type: ignore[override]
        # SQLite pulls one row of parameters per step: each row starts the budget anew, so a
        # submission of 150,000 runs is not one statement over budget.
        def arming() -> Iterator[Any]:
            for row in rows:
                self._arm()
                yield row

        self._arm()
        return super().executemany(sql, arming())

    def executescript(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        self._arm()
        return super().executescript(*args, **kwargs)

    def __next__(self) -> Any:
        self._arm()
        return super().__next__()

    def fetchone(self) -> Any:
        try:
            return next(self)
        except StopIteration:
            return None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        wanted = self.arraysize if size is None else size
        return [row for _, row in zip(range(wanted), self)]

    def fetchall(self) -> list[Any]:
        return list(self)


class BudgetedConnection(sqlite3.Connection):
    """A connection whose SQLite steps are interrupted after STATEMENT_BUDGET_S (pass it as
    sqlite3.connect's factory). The budget starts at each execute of the daemon's, at each row
    its cursors fetch and at each row of an executemany, never from within SQLite, so neither a
    trigger nor a view of the user's can renew it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget_s = STATEMENT_BUDGET_S
        self._deadline = time.monotonic() + self.budget_s
        self.set_progress_handler(self._over_budget, PROGRESS_STEPS)

    def _over_budget(self) -> int:
        return int(time.monotonic() > self._deadline)

    def arm(self) -> None:
        self._deadline = time.monotonic() + self.budget_s

    def cursor(self, factory: Any = BudgetedCursor) -> sqlite3.Cursor:  # type: ignore[override]
        return super().cursor(factory)

    # sqlite3.Connection's own execute* make a plain cursor: these use a budgeted one.
    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        return self.cursor().execute(*args, **kwargs)

    def executemany(self, sql: str, rows: Iterable[Any]) -> sqlite3.Cursor:  # type: ignore[override]
        return self.cursor().executemany(sql, rows)

    def executescript(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        return self.cursor().executescript(*args, **kwargs)


def is_interrupted(exc: BaseException) -> bool:
    """Whether a statement failed because its budget ran out (or it was interrupted)."""
    return isinstance(exc, sqlite3.OperationalError) and "interrupted" in str(exc)


def connect(uri: str, timeout: float, **kwargs: Any) -> BudgetedConnection:
    """sqlite3.connect(uri) with the statement budget, and neither the user's functions with
    side effects nor recursive triggers run by the daemon's statements."""
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, factory=BudgetedConnection, **kwargs)
    assert isinstance(conn, BudgetedConnection)
    try:
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA recursive_triggers = OFF")
    except BaseException:
        conn.close()
        raise
    return conn
