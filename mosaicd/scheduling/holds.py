"""Holds: "start no new runs", of the whole daemon or of one owner's submissions.

`mosaic pause` puts a hold (`pause --all` by an administrator, or any pause on a per-user daemon:
the whole daemon; a user of a shared daemon: their own submissions, including those they make
while held); `mosaic resume` releases it. A hold parks nothing: runs that train go on (`pause
--now` also *parks* them, the run state contract.PARKED). Holds are stored once, in the daemon's
state database, so they survive a restart.
"""

from __future__ import annotations

from mosaicd.storage.state import DaemonState


class Holds:
    def __init__(self, state: DaemonState) -> None:
        self._state = state
        self.all = state.hold_all()
        self.owners: set[int] = state.held_owners()

    def hold(self, owner_uid: int | None) -> None:
        """Hold the whole daemon (None) or one owner's submissions."""
        if owner_uid is None:
            self.all = True
            self._state.set_hold_all(True)
        else:
            self.owners.add(owner_uid)
            self._state.set_held_owners(self.owners)

    def release(self, owner_uid: int | None) -> None:
        """Release one owner's hold, or (None) every hold: the daemon's and every owner's."""
        if owner_uid is None:
            self.all = False
            self._state.set_hold_all(False)
            self.owners.clear()
        else:
            self.owners.discard(owner_uid)
        self._state.set_held_owners(self.owners)

    def keeps(self, owner_uid: int | None) -> bool:
        """Whether a hold of its owner keeps a submission's runs queued (the daemon-wide hold
        is checked once per dispatch, not per submission)."""
        return owner_uid is not None and owner_uid in self.owners

    def holds_submissions_of(self, owner_uid: int | None) -> bool:
        """Whether new submissions of this owner wait: the daemon's or the owner's hold."""
        return self.all or self.keeps(owner_uid)
