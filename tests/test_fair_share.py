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

Run = tuple[float, ...]  # (arrival, duration) or (arrival, duration, priority)


def simulate(
    slots: int,
    queues: dict[int, list[Run]],  # uid -> runs
    shares: dict[int, float],
    horizon: float,
    half_life: float,
    started: list[tuple[int, Run]] | None = None,
) -> tuple[dict[int, float], dict[int, float]]:
    """Run the scheduler's rule until `horizon`: at every free slot, the queued run of the
    owner with the lowest usage per share; among that owner's arrived runs, the highest
    priority (default 0), then the oldest (mosaicd.scheduling.run_queue.peek_next's order).
    Returns each user's slot-seconds and the wait of their first run; `started` gets every
    run in the order it started."""
    ledger = Ledger(half_life=half_life)
    future = {uid: deque(sorted(runs)) for uid, runs in queues.items()}
    arrived: dict[int, list[tuple[float, float, int, Run]]] = {uid: [] for uid in queues}
    running: list[tuple[float, int]] = []  # (end, uid)
    held = {uid: 0.0 for uid in queues}
    first_wait: dict[int, float] = {}
    now, last = 0.0, 0.0
    order = 0

    def charge(until: float) -> None:
        nonlocal last
        ledger.decay_to(until)
        for _, uid in running:
            ledger.charge(uid, until - last)
            held[uid] += until - last
        last = until

    def ready() -> list[int]:
        nonlocal order
        for uid, runs in future.items():
            while runs and runs[0][0] <= now:
                run = runs.popleft()
                priority = run[2] if len(run) > 2 else 0
                heapq.heappush(arrived[uid], (-priority, run[0], order, run))
                order += 1
        return [uid for uid, runs in arrived.items() if runs]

    while now < horizon:
        waiting = ready()
        while len(running) < slots and waiting:
            rank = owner_order(waiting, ledger.usage, shares)
            uid = min(waiting, key=rank.__getitem__)
            run = heapq.heappop(arrived[uid])[3]
            if started is not None:
                started.append((uid, run))
            first_wait.setdefault(uid, now - run[0])
            heapq.heappush(running, (now + run[1], uid))
            waiting = ready()
        arrivals = [q[0][0] for q in future.values() if q and q[0][0] > now]
        now = min([running[0][0]] if running else [] + arrivals + [horizon])
        if arrivals:
            now = min(now, min(arrivals))
        charge(min(now, horizon))
        while running and running[0][0] <= now:
            heapq.heappop(running)
    return held, first_wait


def _backlog(rng: random.Random, n: int, low: float, high: float) -> list[Run]:
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


def test_priorities_order_a_users_own_runs_and_leave_the_shares_alone() -> None:
    rng = random.Random(5)
    # A: 2,000 runs at priority 0, then at t=1,000 twenty urgent ones (priority 5); B: a backlog.
    urgent = [(1_000.0, 60.0, 5) for _ in range(20)]
    queues = {1: [*_backlog(rng, 2_000, 50, 70), *urgent], 2: _backlog(rng, 2_000, 50, 70)}
    started: list[tuple[int, Run]] = []
    held, _ = simulate(4, queues, {1: 1.0, 2: 1.0}, 20_000.0, 3600.0, started)
    a_runs = [run for uid, run in started if uid == 1]
    first_urgent = next(i for i, run in enumerate(a_runs) if len(run) > 2)
    # A's urgent runs go before every one of A's older runs still queued when they came...
    assert all(len(run) > 2 for run in a_runs[first_urgent : first_urgent + 20])
    assert a_runs[first_urgent - 1][0] == 0.0  # (they did not wait for A's backlog)
    # ...and only among A's: B keeps its half of the slots.
    assert held[2] / sum(held.values()) == pytest.approx(0.5, rel=0.10)
    # The same workload without priorities: the urgent runs wait behind A's backlog.
    plain = {1: [*queues[1][:-20], *[(t, d) for t, d, _ in urgent]], 2: queues[2]}
    unordered: list[tuple[int, Run]] = []
    simulate(4, plain, {1: 1.0, 2: 1.0}, 20_000.0, 3600.0, unordered)
    later = [i for i, (uid, run) in enumerate(unordered) if uid == 1 and run[0] == 1_000.0]
    assert not later or later[0] > started.index(next(e for e in started if len(e[1]) > 2))


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
