"""A keeper: the process that does one user's file work for the daemon, as that user.

The daemon (root on a shared box) never opens a user's file and never changes its own ids
(issue 24). It starts one keeper per user it serves, with the user's ids, groups and a fresh
environment, cwd `/` and no descriptor of its own but one end of a socket pair
(mosaicd.keeper.link). The keeper holds that user's study databases open (one writer per study)
and carries out the operations of mosaicd.keeper.operations, one request at a time: the kernel
checks every open against the user's own rights, and a FIFO, a lock held by a `sqlite3` shell
or an endless trigger stops this keeper only (the daemon stops waiting, kills it and starts
another; its studies say "not answering" meanwhile).

A daemon serving only its own user runs the same Keeper class inside its own process
(mosaicd.keeper.link.LocalLink): the same operations, without the socket.

Requests: {"op", "study", "args", "hold", "within"}: `hold` leaves the write's transaction open
until "finish"; `within` adds to that open transaction (a big submission, in parts: its other
studies, files and reads are served meanwhile, the held study's other writes answer "busy").
Replies: {"ok": True, "result", "counts"} or
{"ok": False, "kind", "message"}; kinds are those of KIND_OF (the daemon maps them back to
the StoreError it would have seen in-process). An "open" reply carries a descriptor of the
study file (opened here, as the user): the daemon learns from the kernel, by fstat, which file
it is and whose, never from what the keeper says.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sqlite3
from typing import Any

from mosaicd.keeper import access, wire
from mosaicd.keeper.operations import FILES, READS, WRITES
from mosaicd.storage.store import (
    DiskFull,
    Store,
    StoreError,
    StudyBusy,
    StudyFault,
    StudyStalled,
)

# A submission of this many runs or more is committed without SQLite's automatic checkpoint,
# which a thread does after (Store.checkpoint_apart: seconds at 150,000 runs, issue 27).
CHECKPOINT_APART_ROWS = 10_000

KIND_OF: tuple[tuple[type[StoreError], str], ...] = (
    (StudyBusy, "busy"),
    (DiskFull, "full"),
    (StudyStalled, "stalled"),
    (StudyFault, "fault"),
    (StoreError, "store"),
)


class Keeper:
    """One user's open studies and the operations on them. `proofs`: hand the daemon a
    descriptor of each study opened (a keeper process); not in the daemon's own process, where
    a second descriptor closed would drop SQLite's locks (mosaicd.storage.user_files)."""

    def __init__(self, proofs: bool) -> None:
        self.proofs = proofs
        self.stores: dict[str, Store] = {}
        self._proof_fds: dict[str, int] = {}
        self._held: contextlib.AbstractContextManager[Any] | None = None
        self._held_rows = 0  # the runs added to the held transaction so far
        self._held_study: str | None = None
        self._to_close: list[int] = []

    # -- one request ----------------------------------------------------------------------------

    def handle(self, request: Any) -> tuple[dict[str, Any], list[int]]:
        """The reply to one request, and the descriptors that go with it. Never raises."""
        try:
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                return _error("store", "a keeper request must be a map with an op"), []
            op, study = request["op"], request.get("study")
            args = request.get("args") or {}
            if op == "finish":
                return self._finish(bool(args.get("commit"))), []
            if request.get("within"):
                return self._within(study, op, args), []
            busy = self._held_problem(study, op, bool(request.get("hold")))
            if busy:
                return _error("busy", busy), []
            if op == "open":
                return self._open(study, bool(args.get("create")), args.get("umask"))
            if op == "prove":
                return self._prove(args.get("paths"), bool(args.get("write")))
            if op == "close":
                self._close(study)
                return {"ok": True, "result": None}, []
            if op in FILES:
                with _umask(args.pop("umask", None)):
                    return {"ok": True, "result": FILES[op](**args)}, []
            store = self.stores.get(study) if isinstance(study, str) else None
            if store is None:
                return _error("unknown", f"{study!r:.200} is not open in this keeper"), []
            if op in READS:
                return self._reply(store, READS[op](store, **args)), []
            if op in WRITES:
                return self._write(store, op, args, bool(request.get("hold"))), []
            return _error("store", f"unknown keeper operation {op!r:.80}"), []
        except StoreError as exc:
            return _error(_kind(exc), str(exc)), []
        except sqlite3.Error as exc:
            return _error("fault", f"cannot use {request.get('study')}: {exc}"), []
        except Exception as exc:  # a bug, or a file that changed under us: that request fails
            return _error("store", f"{type(exc).__name__}: {exc}"), []

    def _reply(self, store: Store, result: Any) -> dict[str, Any]:
        return {"ok": True, "result": result, "counts": dict(store.counts)}

    def _write(self, store: Store, op: str, args: dict[str, Any], hold: bool) -> dict[str, Any]:
        transaction = store.transaction()
        transaction.__enter__()
        try:
            result = WRITES[op](store, **args)
        except BaseException as exc:
            # The transaction rolls back and raises (StoreError kinds), or re-raises this.
            transaction.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if hold:
            # Not committed yet: the daemon records what it must first, then says "finish".
            self._held, self._held_study, self._held_rows = transaction, store.path, 0
            return self._reply(store, result)
        transaction.__exit__(None, None, None)
        return self._reply(store, result)

    def _held_problem(self, study: Any, op: str, hold: bool) -> str | None:
        """Why a request must wait while a transaction is held (a big submission taken in
        parts, issue 27), or None: reads, files and other studies' writes go on meanwhile."""
        if self._held is None:
            return None
        if hold or (study == self._held_study and (op in WRITES or op == "close")):
            return f"{self._held_study}: a submission is being written to it; try again soon"
        return None

    def _within(self, study: Any, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One more part of the held transaction's work; a failed part rolls it all back."""
        store = self.stores.get(study) if isinstance(study, str) else None
        if self._held is None or store is None or study != self._held_study or op not in WRITES:
            return _error("store", f"no transaction of {study!r:.200} is held for {op!r:.80}")
        try:
            result = WRITES[op](store, **args)
        except BaseException:
            self._finish(commit=False)
            raise
        if isinstance(result, int) and not isinstance(result, bool):
            self._held_rows += result  # add_runs: how many it added
        return self._reply(store, result)

    def _finish(self, commit: bool) -> dict[str, Any]:
        held, path = self._held, self._held_study
        self._held = self._held_study = None
        if held is None or path is None:
            return _error("store", "no transaction waits to be finished")
        if commit:
            # Only a big one's checkpoint is worth a thread; a small submission's COMMIT keeps
            # SQLite's own (and so finds a full disk at once, tests/test_study_trouble.py).
            big = self._held_rows >= CHECKPOINT_APART_ROWS
            with self.stores[path].checkpoint_apart() if big else contextlib.nullcontext():
                held.__exit__(None, None, None)  # a failed COMMIT raises the StoreError it was
        else:
            exc = StoreError("abandoned by the daemon")
            with contextlib.suppress(StoreError):
                held.__exit__(StoreError, exc, None)
        return self._reply(self.stores[path], None)

    def _abandon(self) -> None:
        """A held transaction that the daemon did not finish (it went on to something else):
        rolled back."""
        if self._held is not None:
            self._finish(commit=False)

    # -- studies ----------------------------------------------------------------------------------

    def _open(self, study: Any, create: bool, umask: Any) -> tuple[dict[str, Any], list[int]]:
        if not isinstance(study, str) or not os.path.isabs(study):
            return _error("store", f"not an absolute study path: {study!r:.200}"), []
        store = self.stores.get(study)
        if store is None:
            if not create and not os.path.lexists(study):
                return _error("missing", f"no study database at {study}"), []
            with _umask(umask):
                try:
                    store = Store(study, create=create)
                except PermissionError as exc:
                    return _error("permission", f"{study}: {exc.strerror}"), []
            self.stores[study] = store
        fds: list[int] = []
        if self.proofs:
            fd = self._proof_fds.get(study)
            if fd is None:
                # Kept open as long as the store is: closing it would drop SQLite's locks.
                fd = access.open_for_proof(study, write=False)
                if fd is None:
                    self._close(study)
                    return _error("store", f"{study} is not a regular file"), []
                self._proof_fds[study] = fd
            fds = [fd]
        return self._reply(store, None), fds

    def _prove(self, paths: Any, write: bool) -> tuple[dict[str, Any], list[int]]:
        """Descriptors of the files at `paths` this user can open (read, or read and write),
        for the daemon to fstat; which paths have one. A study this keeper holds is proved with
        the descriptor it keeps: opening and closing another would drop SQLite's locks."""
        if not isinstance(paths, list) or len(paths) > wire.MAX_FDS:
            return _error("store", f"prove: at most {wire.MAX_FDS} paths"), []
        opened, fds, mine = [], [], []
        for path in paths:
            held = self._proof_fds.get(path) if isinstance(path, str) and not write else None
            fd = (
                held
                if held is not None
                else (access.open_for_proof(path, write) if isinstance(path, str) else None)
            )
            opened.append(fd is not None)
            if fd is not None:
                fds.append(fd)
                if held is None:
                    mine.append(fd)
        self._to_close = mine  # closed once the reply is sent
        return {"ok": True, "result": opened}, fds

    def sent(self) -> None:
        """The reply went: close the descriptors opened only to be handed over."""
        for fd in self._to_close:
            os.close(fd)
        self._to_close = []

    def _close(self, study: Any) -> None:
        store = self.stores.pop(study, None) if isinstance(study, str) else None
        if store is not None:
            store.close()
        fd = self._proof_fds.pop(study, None) if isinstance(study, str) else None
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        self._abandon()
        for study in list(self.stores):
            self._close(study)


@contextlib.contextmanager
def _umask(mask: Any) -> Any:
    if not isinstance(mask, int):
        yield
        return
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _kind(exc: StoreError) -> str:
    return next(kind for cls, kind in KIND_OF if isinstance(exc, cls))


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "message": message}


def serve(sock: socket.socket) -> None:
    """Answer the daemon until it closes its end (it stopped, or gave up on this keeper)."""
    keeper = Keeper(proofs=True)
    try:
        while True:
            try:
                request, fds = wire.receive(sock)
            except wire.WireError:
                return
            for fd in fds:  # the daemon sends none: never keep one
                os.close(fd)
            reply, out = keeper.handle(request)
            try:
                wire.send(sock, reply, out)
            except wire.WireError:
                if not isinstance(reply, dict) or reply.get("ok") is not False:
                    wire.send(sock, _error("store", "the reply was too large to send"))
            finally:
                keeper.sent()
    finally:
        keeper.close_all()


def main() -> None:
    parser = argparse.ArgumentParser(description="a user's keeper (started by mosaicd)")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    # Where the daemon started it is `/`: the user's home is where their relative paths go.
    with contextlib.suppress(OSError):
        os.chdir(os.path.expanduser("~"))
    serve(sock)


if __name__ == "__main__":
    main()
