"""The study registry: the study databases the daemon serves, each held open by one keeper.

The daemon does not open a study itself (issue 24): the keeper of the user who submitted to it
first does (mosaicd.keeper), and the daemon sees it through a StudyHandle
(mosaicd.storage.handle), whose calls are that keeper's operations.
"""

from __future__ import annotations

import logging
from collections import Counter

from mosaic_client.protocol import ErrorCode
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.keeper.link import Keepers, StudyMissing, StudyPermission
from mosaicd.owners import Owner
from mosaicd.storage.handle import StudyHandle
from mosaicd.storage.identity import Identities
from mosaicd.storage.state import DaemonState
from mosaicd.storage.store import StoreError
from mosaicd.storage.writer import StudyWriter

log = logging.getLogger("mosaicd")


class Studies:
    """Open studies by path; the daemon's state database remembers them across restarts."""

    def __init__(self, state: DaemonState, shared: bool = False, python: str | None = None):
        self._state = state
        # Whose each submission is, from the daemon's state only (mosaicd.storage.identity).
        self.identities = Identities(state, shared)
        self.keepers = Keepers(python)
        self._handles: dict[str, StudyHandle] = {}
        self._writers: dict[str, StudyWriter] = {}  # the one door for the daemon's writes
        self._openers: dict[str, Owner | None] = {}  # whose keeper holds each study

    def open(
        self, path: str, create: bool, owner: Owner | None, umask: int = owners.DEFAULT_UMASK
    ) -> StudyHandle:
        """The study's handle, opened the first time by `owner`'s keeper (None: the daemon's
        own user): a new study, with its -wal and -shm files, is created by and for the user
        who submits it. The handlers have already checked that the caller may use it."""
        handle = self._handles.get(path)
        if handle is not None:
            return handle
        link = self.keepers.of(owner)
        try:
            # The daemon's own user keeps their umask, as before; a user's keeper takes the
            # submission's ([MONITOR] umask).
            counts, identity = link.open(path, create, umask if owner is not None else None)
        except StudyMissing:
            raise Refused(ErrorCode.NOT_FOUND, f"no study database at {path}") from None
        except StudyPermission as exc:
            who = f"{owner.name}'s keeper" if owner is not None else "the daemon"
            raise Refused(ErrorCode.PERMISSION, f"{who} may not open it: {exc}") from None
        except StoreError as exc:
            raise Refused(ErrorCode.INVALID, str(exc)) from None
        handle = StudyHandle(path, link, counts, identity)
        self._handles[path] = handle
        self._openers[path] = owner
        self._writers[path] = StudyWriter(handle)
        self._state.add_study(path, None if owner is None else owner.uid)
        # The file's owner, from the kernel (never a value inside the file): the owner of its
        # submissions queued before owners were kept in the daemon's state.
        try:
            self.identities.adopt(path, handle.submission_rows(), identity.uid)
        except StoreError as exc:
            log.error("study %s: its submissions could not be read: %s", path, exc)
        return handle

    def reopen_known(self) -> list[tuple[str, StudyHandle]]:
        """The studies of the previous daemon, opened again by the keeper of the user who
        opened them; vanished ones are forgotten."""
        opened = []
        for path, opener_uid in self._state.studies():
            opener = owners.of_uid(opener_uid)
            try:
                opened.append((path, self.open(path, create=False, owner=opener)))
            except Refused as exc:
                if exc.code == ErrorCode.NOT_FOUND:
                    log.warning("study %s has disappeared; forgetting it", path)
                    self._state.remove_study(path)
                    self.identities.forget(path)
                else:
                    log.error("cannot reopen study %s: %s", path, exc.message)
            except owners.CannotSwitch as exc:
                log.error("cannot reopen study %s: %s", path, exc)
        return opened

    def __getitem__(self, path: str) -> StudyHandle:
        return self._handles[path]

    def __contains__(self, path: str) -> bool:
        return path in self._handles

    def writer(self, path: str) -> StudyWriter:
        """The study's writer (mosaicd.storage.writer): every write of the scheduler goes there."""
        return self._writers[path]

    def writers(self) -> list[tuple[str, StudyWriter]]:
        return list(self._writers.items())

    def flush(self, force: bool = False) -> None:
        """Write what waits in every study (force: a full disk is tried again too)."""
        for writer in self._writers.values():
            writer.flush(force)

    def get(self, path: str) -> StudyHandle | None:
        return self._handles.get(path)

    def items(self) -> list[tuple[str, StudyHandle]]:
        return list(self._handles.items())

    def counts(self) -> Counter[str]:
        """Runs per state over every open study."""
        total: Counter[str] = Counter()
        for handle in self._handles.values():
            total.update(handle.counts)
        return total

    def opener(self, path: str) -> Owner | None:
        """Whose keeper holds the study (None: the daemon's own user)."""
        return self._openers.get(path)

    def close_all(self) -> None:
        # Each keeper closes its studies (SQLite removes the -wal file on the last close).
        self.keepers.stop_all()
