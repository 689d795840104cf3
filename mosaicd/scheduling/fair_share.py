"""Fair share across the users of a shared daemon (issue 27): the next free slot goes to the
queued run whose owner is furthest below their share; within one user, first come, first served.

Each user's *usage* is the slot-seconds their runs held (a GPU slot weighs GPU_WEIGHT CPU
slots), decayed with a half-life, as Slurm's fair-share factor decays it: what a user ran a
half-life ago counts half. A user's *share* is a weight (1 each by default; `mosaicd --share
USER=N`). Owners are ranked by usage / share, lowest first: a user who has used nothing
comes before everyone who has; two users who both keep the queue full end up holding slots in
proportion to their shares. A daemon serving one user (or a single-user daemon) keeps the
plain first-come order, as before.

Preemption (off by default; `mosaicd --preempt-after SECONDS`): a user below their share who
has waited that long for a slot, none being free, has the most over-share user's run park at its
next epoch boundary; it is queued again and resumes from its checkpoint, bit-identically
(preempt_choice decides; mosaicd.scheduling.preemption acts).

Pure bookkeeping, no clock of its own: the scheduler passes the time (tests simulate hours in
milliseconds, tests/test_fair_share.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_HALF_LIFE_S = 24 * 3600.0  # yesterday's usage counts half
GPU_WEIGHT = 4.0  # a GPU slot's second weighs this many CPU slot-seconds


@dataclass
class Ledger:
    """Every user's decayed usage, as of `at`."""

    half_life: float = DEFAULT_HALF_LIFE_S
    usage: dict[int, float] = field(default_factory=dict)
    at: float = 0.0

    def decay_to(self, now: float) -> None:
        if now <= self.at:
            return
        factor = 0.5 ** ((now - self.at) / self.half_life)
        for uid in self.usage:
            self.usage[uid] *= factor
        self.at = now

    def charge(self, uid: int, slot_seconds: float) -> None:
        """Add usage at the ledger's time (decay_to first)."""
        self.usage[uid] = self.usage.get(uid, 0.0) + slot_seconds


def slot_weight(kind: str) -> float:
    return GPU_WEIGHT if kind == "cuda" else 1.0


def standing(uid: int, usage: Mapping[int, float], shares: Mapping[int, float]) -> float:
    """How far a user is above their share: usage per unit of share (0: used nothing)."""
    return usage.get(uid, 0.0) / max(shares.get(uid, 1.0), 1e-9)


def owner_order(
    owners: Iterable[int], usage: Mapping[int, float], shares: Mapping[int, float]
) -> dict[int, int]:
    """Each owner's rank (0 first): lowest usage per share first; ties by uid, so that the
    order never depends on a dict's history."""
    ranked = sorted(set(owners), key=lambda uid: (standing(uid, usage, shares), uid))
    return {uid: rank for rank, uid in enumerate(ranked)}


def parse_shares(items: Iterable[str], uid_of: Mapping[str, int]) -> dict[int, float]:
    """`USER=WEIGHT` items (mosaicd --share) as {uid: weight}; raise ValueError naming a bad
    one."""
    shares: dict[int, float] = {}
    for item in items:
        name, sep, weight = item.partition("=")
        if not sep or name not in uid_of:
            raise ValueError(f"--share {item!r}: give USER=WEIGHT with a known user name")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"--share {item!r}: the weight must be a number") from None
        if not value > 0:
            raise ValueError(f"--share {item!r}: the weight must be above 0")
        shares[uid_of[name]] = value
    return shares


@dataclass(frozen=True)
class Limits:
    """Per-user limits of the daemon's configuration (0: none): slots held at once, CPU and GPU
    apart; runs queued at once; runs in one submission."""

    cpu_slots: int = 0
    gpu_slots: int = 0
    queued: int = 0
    runs_per_submission: int = 0

    def slots(self, kind: str) -> int:
        return self.gpu_slots if kind == "cuda" else self.cpu_slots

    def at_slot_limit(self, kind: str, holding: int) -> bool:
        limit = self.slots(kind)
        return bool(limit) and holding >= limit

    def submission_problem(self, user: str, queued_now: int, adding: int) -> str | None:
        """Why a submission of `adding` runs may not be queued for a user who has `queued_now`
        runs queued, naming the limit and the figures; None when it may."""
        if self.runs_per_submission and adding > self.runs_per_submission:
            return (
                f"this submission has {adding} runs and the daemon takes at most "
                f"{self.runs_per_submission} per submission (mosaicd --submission-runs); split "
                "it, or ask the administrator"
            )
        if self.queued and queued_now + adding > self.queued:
            return (
                f"{user} has {queued_now} runs queued and the daemon keeps at most {self.queued} "
                f"per user (mosaicd --user-queued); these {adding} would make "
                f"{queued_now + adding}: wait for some to run, or cancel some"
            )
        return None


@dataclass(frozen=True)
class Preemption:
    """Park the runs of `worker_id` (owned by `victim`) so that `waiter` gets its slot."""

    waiter: int
    worker_id: str
    victim: int


def preempt_choice(
    waiting: Mapping[int, float],
    running: Sequence[tuple[str, int]],
    usage: Mapping[int, float],
    shares: Mapping[int, float],
    after: float,
    in_flight: Collection[int] = (),
    fits: Callable[[int, str], bool] | None = None,
) -> Preemption | None:
    """Which worker to preempt (its runs park at their next epoch boundary), if any.

    `waiting`: each user with a run that could start but finds no slot, and how long (s) they
    have waited; `running`: the busy workers (worker id, owner uid) that may be preempted, the
    one to preempt first first; `after`: how long a user waits before preemption helps them;
    `in_flight`: the users a park was already asked for (one at a time each: it lands at an
    epoch boundary, and asking again meanwhile would take a second slot for the same run);
    `fits(waiter, worker_id)`: whether the waiter's run could start on that worker's slot.

    The waiter furthest below their share goes first; the victim is the running owner furthest
    above theirs, and only one strictly above the waiter: users of equal standing never take
    turns parking each other, and no one is preempted for themself."""
    if after <= 0:
        return None
    eligible = [uid for uid, waited in waiting.items() if waited > after and uid not in in_flight]
    eligible.sort(key=lambda uid: (standing(uid, usage, shares), -waiting[uid], uid))
    for waiter in eligible:
        mine = standing(waiter, usage, shares)
        victims = [
            (worker_id, owner)
            for worker_id, owner in running
            if owner != waiter
            and standing(owner, usage, shares) > mine
            and (fits is None or fits(waiter, worker_id))
        ]
        if victims:
            # max keeps the first of equals: the caller's order decides among one owner's.
            worker_id, owner = max(victims, key=lambda v: standing(v[1], usage, shares))
            return Preemption(waiter, worker_id, owner)
    return None
