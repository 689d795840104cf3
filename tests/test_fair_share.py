"""Fair share (issue 27), as pure functions: a simulation of the scheduler's choice over mixed
workloads, hours of queue in milliseconds. Each user's slot-seconds stay within 10 % of their
share while they keep the queue full, and a user who arrives late is served at the next free
slot (no one starves)."""

from __future__ import annotations

import heapq
import random
from collections import deque

import pytest

from mosaicd.scheduling.fair_share import Ledger, owner_order, parse_shares, standing


def simulate(
    slots: int,
    queues: dict[int, list[tuple[float, float]]],  # uid -> [(arrival, duration)], FCFS
    shares: dict[int, float],
    horizon: float,
    half_life: float,
) -> tuple[dict[int, float], dict[int, float]]:
    """Run the scheduler's rule until `horizon`: at every free slot, the queued run of the
    owner with the lowest usage per share (its oldest run). Returns each user's slot-seconds
    and the wait of their first run."""
    ledger = Ledger(half_life=half_life)
    pending = {uid: deque(sorted(runs)) for uid, runs in queues.items()}
    running: list[tuple[float, int]] = []  # (end, uid)
    held = {uid: 0.0 for uid in queues}
    first_wait: dict[int, float] = {}
    now, last = 0.0, 0.0

    def charge(until: float) -> None:
        nonlocal last
        ledger.decay_to(until)
        for _, uid in running:
            ledger.charge(uid, until - last)
            held[uid] += until - last
        last = until

    while now < horizon:
        ready = [uid for uid, q in pending.items() if q and q[0][0] <= now]
        while len(running) < slots and ready:
            rank = owner_order(ready, ledger.usage, shares)
            uid = min(ready, key=rank.__getitem__)
            arrival, duration = pending[uid].popleft()
            first_wait.setdefault(uid, now - arrival)
            heapq.heappush(running, (now + duration, uid))
            ready = [uid for uid, q in pending.items() if q and q[0][0] <= now]
        arrivals = [q[0][0] for q in pending.values() if q and q[0][0] > now]
        now = min([running[0][0]] if running else [] + arrivals + [horizon])
        if arrivals:
            now = min(now, min(arrivals))
        charge(min(now, horizon))
        while running and running[0][0] <= now:
            heapq.heappop(running)
    return held, first_wait


def _backlog(rng: random.Random, n: int, low: float, high: float) -> list[tuple[float, float]]:
    return [(0.0, rng.uniform(low, high)) for _ in range(n)]


@pytest.mark.parametrize("shares", [{1: 1.0, 2: 1.0}, {1: 2.0, 2: 1.0}, {1: 1.0, 2: 1.0, 3: 2.0}])
def test_backlogged_users_hold_slots_in_proportion_to_their_shares(shares: dict) -> None:
    rng = random.Random(27)
    horizon, slots = 100_000.0, 8
    # Mixed workloads: one user's runs are short (about 10 s), another's ten times longer;
    # each queues enough to keep every slot busy alone for the whole horizon.
    queues = {}
    for uid in shares:
        scale = 10.0 if uid % 2 else 1.0
        queues[uid] = _backlog(rng, int(slots * horizon / (5 * scale)), 5 * scale, 15 * scale)
    held, _ = simulate(slots, queues, shares, horizon, half_life=3600.0)
    total = sum(held.values())
    assert total == pytest.approx(8 * horizon, rel=1e-6)
    for uid, share in shares.items():
        expected = share / sum(shares.values())
        assert held[uid] / total == pytest.approx(expected, rel=0.10), (uid, held, shares)


def test_a_late_small_user_starts_at_the_next_free_slot_and_no_one_starves() -> None:
    rng = random.Random(3)
    queues = {
        1: _backlog(rng, 1_000, 50, 70),  # A: 1,000 runs queued first
        2: [(600.0 + i, 60.0) for i in range(10)],  # B: 10 runs, ten minutes later
        3: [(900.0, 60.0)],  # C: one run
    }
    held, waits = simulate(4, queues, {1: 1.0, 2: 1.0, 3: 1.0}, 5_000.0, half_life=3600.0)
    # B's first run waits only for one of A's runs to end (at most one run's length).
    assert waits[2] <= 70.0
    assert waits[3] <= 70.0
    # B's ten finish long before A's thousand: B held its ten runs' time, A kept the rest.
    assert held[2] == pytest.approx(600.0)
    assert held[1] > 10 * held[2]


def test_usage_decays_with_its_half_life() -> None:
    ledger = Ledger(half_life=100.0)
    ledger.charge(1, 80.0)
    ledger.decay_to(100.0)
    assert ledger.usage[1] == pytest.approx(40.0)
    ledger.decay_to(300.0)
    assert ledger.usage[1] == pytest.approx(10.0)
    ledger.decay_to(200.0)  # time does not run backwards
    assert ledger.usage[1] == pytest.approx(10.0)


def test_order_is_by_usage_per_share_then_uid() -> None:
    usage = {1: 100.0, 2: 100.0, 3: 0.0}
    assert owner_order([1, 2, 3], usage, {}) == {3: 0, 1: 1, 2: 2}
    assert owner_order([1, 2, 3], usage, {2: 4.0}) == {3: 0, 2: 1, 1: 2}
    assert standing(9, usage, {}) == 0.0


def test_shares_are_parsed_with_clear_refusals() -> None:
    uids = {"alice": 1000, "bob": 1001}
    assert parse_shares(["alice=2", "bob=0.5"], uids) == {1000: 2.0, 1001: 0.5}
    for bad, words in (
        ("carol=1", "known user"),
        ("alice", "USER=WEIGHT"),
        ("alice=x", "number"),
        ("alice=0", "above 0"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_shares([bad], uids)


def test_limits_name_the_limit_and_the_users_figures() -> None:
    from mosaicd.scheduling.fair_share import Limits

    none = Limits()
    assert none.submission_problem("alice", 10**6, 10**6) is None
    assert not none.at_slot_limit("cpu", 10**6)
    limits = Limits(cpu_slots=2, gpu_slots=1, queued=100, runs_per_submission=50)
    assert limits.at_slot_limit("cpu", 2) and not limits.at_slot_limit("cpu", 1)
    assert limits.at_slot_limit("cuda", 1) and not limits.at_slot_limit("cuda", 0)
    too_big = limits.submission_problem("alice", 0, 51) or ""
    assert "51 runs" in too_big and "at most 50 per submission" in too_big
    too_many = limits.submission_problem("alice", 60, 41) or ""
    assert "alice has 60 runs queued" in too_many and "at most 100" in too_many
    assert "make 101" in too_many
    assert limits.submission_problem("alice", 59, 41) is None
