"""The study registry: the study databases the daemon serves, opened once and kept open."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator

from mosaic_client.protocol import ErrorCode
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.owners import Owner
from mosaicd.storage.identity import Identities
from mosaicd.storage.state import DaemonState
from mosaicd.storage.store import Store, StoreError
from mosaicd.storage.writer import StudyWriter

log = logging.getLogger("mosaicd")


class PathOwner:
    """Studies.open's default: act as the owner of the study's path."""


PATH_OWNER = PathOwner()


class Studies:
    """Open stores by path; the daemon's state database remembers them across restarts."""

    def __init__(self, state: DaemonState, shared: bool = False) -> None:
        self._state = state
        # Whose each submission is, from the daemon's state only (mosaicd.storage.identity).
        self.identities = Identities(state, shared)
        self._stores: dict[str, Store] = {}
        self._writers: dict[str, StudyWriter] = {}  # the one door for the daemon's writes
        self._openers: dict[str, Owner | None] = {}  # whose rights each store was opened with

    def open(
        self,
        path: str,
        create: bool,
        owner: Owner | None | PathOwner = PATH_OWNER,
        umask: int = owners.DEFAULT_UMASK,
    ) -> Store:
        """The study's store, opened the first time with `owner`'s rights (mosaicd.owners;
        None: the daemon's own): a new study for the user who submits it, with its -wal and
        -shm files, is theirs. By default, an existing study is opened as the owner of its path
        (lstat: a link is its maker's), never as root; the handlers have already checked that
        the caller may read it."""
        store = self._stores.get(path)
        if store is not None:
            return store
        acting: Owner | None
        if isinstance(owner, PathOwner):
            try:
                acting = owners.of_uid(os.lstat(path).st_uid)
            except OSError:
                acting = None  # missing: _open says so, without touching anything
        else:
            acting = owner
        try:
            with owners.acting_as(acting, umask):
                store = self._open(path, create)
                # The file's owner, by the daemon (never a value inside the file): the owner
                # of its submissions queued before owners were kept in the daemon's state.
                file_uid = os.stat(path).st_uid
        except PermissionError as exc:
            who = f"the daemon, acting as {acting.name}," if acting is not None else "the daemon"
            raise Refused(
                ErrorCode.PERMISSION, f"{path}: {who} may not open it ({exc.strerror})"
            ) from None
        self._stores[path] = store
        self._openers[path] = acting
        self._writers[path] = StudyWriter(store)
        self._state.add_study(path, None if acting is None else acting.uid)
        self.identities.adopt(path, store, file_uid)
        return store

    def _open(self, path: str, create: bool) -> Store:
        if not create and not os.path.exists(path):
            raise Refused(ErrorCode.NOT_FOUND, f"no study database at {path}")
        if os.path.exists(path) and not os.path.isfile(path):
            # A directory, /dev/null, a FIFO: SQLite would create journals beside it.
            raise Refused(
                ErrorCode.INVALID,
                f"{path} is not a regular file; give the path of a study database file",
            )
        try:
            return Store(path, create=create)
        except StoreError as exc:
            raise Refused(ErrorCode.INVALID, str(exc)) from None

    def reopen_known(self) -> Iterator[tuple[str, Store]]:
        """The studies of the previous daemon, opened again; vanished ones are forgotten."""
        for path, opener_uid in self._state.studies():
            # As the one who opened it before (the owner of its path for older state).
            opener = PATH_OWNER if opener_uid is None else owners.of_uid(opener_uid)
            with owners.acting_as(None if isinstance(opener, PathOwner) else opener):
                exists = os.path.exists(path)
            if not exists:
                log.warning("study %s has disappeared; forgetting it", path)
                self._state.remove_study(path)
                self.identities.forget(path)
                continue
            try:
                store = self.open(path, create=False, owner=opener)
            except Refused as exc:
                log.error("cannot reopen study %s: %s", path, exc.message)
                continue
            yield path, store

    def __getitem__(self, path: str) -> Store:
        return self._stores[path]

    def __contains__(self, path: str) -> bool:
        return path in self._stores

    def writer(self, path: str) -> StudyWriter:
        """The study's writer (mosaicd.storage.writer): every write of the scheduler goes there."""
        return self._writers[path]

    def writers(self) -> list[tuple[str, StudyWriter]]:
        return list(self._writers.items())

    def flush(self, force: bool = False) -> None:
        """Write what waits in every study (force: a full disk is tried again too)."""
        for writer in self._writers.values():
            writer.flush(force)

    def get(self, path: str) -> Store | None:
        return self._stores.get(path)

    def items(self) -> list[tuple[str, Store]]:
        return list(self._stores.items())

    def counts(self) -> Counter[str]:
        """Runs per state over every open study."""
        total: Counter[str] = Counter()
        for store in self._stores.values():
            total.update(store.counts)
        return total

    def opener(self, path: str) -> Owner | None:
        """Whose rights the study was opened with (None: the daemon's own)."""
        return self._openers.get(path)

    def close_all(self) -> None:
        for path, store in self._stores.items():
            # SQLite removes the -wal file on the last close: as the one who opened it.
            with owners.acting_as(self._openers.get(path)):
                store.close()
