"""A run's output log: opened safely, capped, and told about what the run left behind.

Capping (MONITOR max_log_mb, issue 18): fds 1 and 2 point at the log file itself, so Python and
C-level output alike land there, and a crash (segfault, kill) loses nothing already written. A
watcher thread of the worker checks the file's size every CHECK_EVERY_S; past the cap it keeps
the first half and the latest half, and writes between them, in place, one fixed-width line
that says how many bytes were cut so far. The file may overshoot the cap by what the run writes
in CHECK_EVERY_S, and output written during the few milliseconds of a trim may be lost with the
cut part. The trim copies in chunks, so the worker's memory stays bounded.

Safety: the log is opened with O_NOFOLLOW: a symbolic link planted at its path is refused
(RunLogRefused), never followed.
"""

from __future__ import annotations

import errno
import os
import re
import threading

import psutil

CHECK_EVERY_S = 0.5
_CHUNK = 1 << 20
_MARKER = "\n[mosaic] ... {cut:>20} bytes of output cut here: MONITOR max_log_mb keeps the first and the last halves ...\n"  # noqa: E501


class RunLogRefused(OSError):
    """The log's path cannot be used (a symbolic link): a message that says what to do."""


def open_log(path: str, append: bool = True) -> int:
    # Appending for the run's output; read-write in place for the trim.
    flags = os.O_CREAT | os.O_NOFOLLOW | (os.O_WRONLY | os.O_APPEND if append else os.O_RDWR)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunLogRefused(
                exc.errno,
                f"refusing to write the run log {path}: it is a symbolic link; remove it (a run "
                "log is never written through a link)",
            ) from None
        raise


def marker(cut: int) -> bytes:
    return _MARKER.format(cut=cut).encode()


class LogCap:
    """Keeps the log at `path` near `max_bytes` while a run writes it (a thread)."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max(4096, max_bytes)
        self.cut = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mosaic-log-cap", daemon=True)

    def __enter__(self) -> LogCap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.trim()
        except OSError:
            pass  # the run's outcome stands; a full disk is reported by its own writes

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            try:
                self.trim()
            except OSError:
                pass  # a full disk or a vanished file: the run's own writes say so

    def trim(self) -> None:
        """Cut the middle of the log when it is over the cap."""
        fd = open_log(self.path, append=False)
        try:
            size = os.fstat(fd).st_size
            if size <= self.max_bytes:
                return
            mark = len(marker(0))
            head = self.max_bytes // 2
            dest = head + mark
            tail = max(0, self.max_bytes - dest)
            start = size - tail
            # Copy forward in chunks (dest < start), then whatever the run wrote meanwhile.
            written = dest
            while True:
                while start < size:
                    chunk = os.pread(fd, min(_CHUNK, size - start), start)
                    if not chunk:
                        break
                    os.pwrite(fd, chunk, written)
                    start += len(chunk)
                    written += len(chunk)
                grown = os.fstat(fd).st_size
                if grown <= size:
                    break
                size = grown
            self.cut += start - written
            os.pwrite(fd, marker(self.cut), head)
            os.ftruncate(fd, written)
        finally:
            os.close(fd)


def new_descendants(before: set[int]) -> list[psutil.Process]:
    """This process's descendants that were not there before the run (with the subreaper bit a
    run's orphans are ours too)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in children if p.pid not in before]


def descendants() -> set[int]:
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def end_leftovers(before: set[int]) -> str | None:
    """Kill and reap the processes a run started and left running; say which."""
    left = new_descendants(before)
    if not left:
        return None
    described = []
    for proc in left:
        try:
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            described.append(f"{proc.pid}")
        try:
            proc.kill()
        except psutil.Error:
            pass
    # Those re-parented to this subreaper are its children: waiting reaps them.
    psutil.wait_procs(left, timeout=5)
    return f"[mosaic] killed {len(left)} process(es) the run left behind: " + "; ".join(described)


WORKER_LOG_MAX_BYTES = 10 * 2**20  # a per-worker log past this starts empty


def worker_log_path(home: str, slot: str) -> str:
    """Where a user's worker writes what it prints outside a run: in the user's own home."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", slot)  # a slot label: "cpu 0", "cuda 1"
    return os.path.join(home, ".cache", "mosaic", f"worker-{name}.log")


def settle_as_owner(slot: str) -> str | None:
    """Start-up of a worker a shared daemon started as a run's owner (``--as-owner``).

    The daemon starts it in ``/``: the daemon has no file-access override, so it could not
    enter a private (0700) home before the worker's ids change. Here, already the user, the
    worker moves to its home, and points fds 1 and 2 (until now a private file of the daemon's,
    which reports a failed start) at a per-worker log the user owns: what the user's code prints
    outside a run must never reach the daemon's journal, where it would pass for the daemon's
    own lines. Returns the log's path, or None (output dropped) when the home is not writable.
    """
    home = os.environ.get("HOME") or "/"
    try:
        os.chdir(home)
    except OSError:
        os.chdir("/")
    path: str | None = worker_log_path(home, slot)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = open_log(path)
        if os.fstat(fd).st_size > WORKER_LOG_MAX_BYTES:
            os.ftruncate(fd, 0)
    except OSError:
        path, fd = None, os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path
