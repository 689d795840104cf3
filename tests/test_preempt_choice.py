"""Preemption's decision (issue 27), as a pure function: which worker's run parks for which
waiting user, given how long each has waited, who holds the slots, usage and shares; and the
keeper's write that queues a preempted run again."""

from __future__ import annotations

from pathlib import Path

from mosaic_client.contract import CANCELLED, QUEUED, RUNNING
from mosaicd.keeper.operations import WRITES
from mosaicd.scheduling.fair_share import Preemption, preempt_choice
from mosaicd.storage.store import Store

ALICE, BOB, CAROL = 1001, 1002, 1003


def test_a_user_below_share_who_waited_long_enough_preempts_the_most_over_share_user() -> None:
    usage = {ALICE: 100.0, BOB: 0.0, CAROL: 300.0}
    running = [("w1", ALICE), ("w2", CAROL), ("w3", ALICE)]
    choice = preempt_choice({BOB: 61.0}, running, usage, {}, after=60.0)
    assert choice == Preemption(waiter=BOB, worker_id="w2", victim=CAROL)


def test_nothing_before_the_wait_is_over_or_when_off() -> None:
    usage = {ALICE: 100.0}
    running = [("w1", ALICE)]
    assert preempt_choice({BOB: 59.0}, running, usage, {}, after=60.0) is None
    assert preempt_choice({BOB: 1e6}, running, usage, {}, after=0.0) is None
    assert preempt_choice({BOB: 61.0}, running, usage, {}, after=60.0) is not None


def test_only_a_user_strictly_above_the_waiter_is_preempted() -> None:
    running = [("w1", ALICE)]
    # Equal standing: no one parks for a user as well served as they are.
    assert preempt_choice({BOB: 100.0}, running, {ALICE: 5.0, BOB: 5.0}, {}, after=1.0) is None
    # The waiter above the running user: none either.
    assert preempt_choice({BOB: 100.0}, running, {ALICE: 5.0, BOB: 9.0}, {}, after=1.0) is None
    # Shares count: Bob's 9 on a share of 3 is 3 per share, below Alice's 5.
    choice = preempt_choice({BOB: 100.0}, running, {ALICE: 5.0, BOB: 9.0}, {BOB: 3.0}, after=1.0)
    assert choice == Preemption(BOB, "w1", ALICE)


def test_no_one_is_preempted_for_themself() -> None:
    # Bob waits for a second slot while his own run holds the only one.
    assert preempt_choice({BOB: 100.0}, [("w1", BOB)], {BOB: 50.0}, {}, after=1.0) is None
    # His own worker is passed over for another user's.
    choice = preempt_choice({BOB: 100.0}, [("w1", BOB), ("w2", ALICE)], {ALICE: 9.0}, {}, 1.0)
    assert choice == Preemption(BOB, "w2", ALICE)


def test_one_park_request_in_flight_per_waiting_user() -> None:
    running = [("w1", ALICE), ("w2", ALICE)]
    usage = {ALICE: 50.0}
    assert preempt_choice({BOB: 10.0}, running, usage, {}, 1.0, in_flight={BOB}) is None
    # Another waiting user is not held back by Bob's request.
    choice = preempt_choice({BOB: 10.0, CAROL: 5.0}, running, usage, {}, 1.0, in_flight={BOB})
    assert choice == Preemption(CAROL, "w1", ALICE)


def test_the_waiter_furthest_below_share_goes_first_and_the_callers_order_picks_the_worker() -> (
    None
):
    usage = {ALICE: 90.0, BOB: 10.0, CAROL: 0.0}
    running = [("w7", ALICE), ("w3", ALICE)]
    choice = preempt_choice({BOB: 500.0, CAROL: 2.0}, running, usage, {}, after=1.0)
    # Carol, who has used nothing, before Bob who waited longer; Alice's first listed worker.
    assert choice == Preemption(CAROL, "w7", ALICE)


def test_only_a_slot_the_waiters_run_could_use() -> None:
    usage = {ALICE: 90.0, CAROL: 200.0}
    running = [("gpu0", ALICE), ("cpu0", CAROL)]

    def fits(uid: int, worker_id: str) -> bool:
        return worker_id.startswith("gpu")  # Bob's run needs a GPU

    choice = preempt_choice({BOB: 10.0}, running, usage, {}, 1.0, fits=fits)
    assert choice == Preemption(BOB, "gpu0", ALICE)
    assert preempt_choice({BOB: 10.0}, [("cpu0", CAROL)], usage, {}, 1.0, fits=fits) is None


def test_a_waiter_who_cannot_preempt_leaves_the_turn_to_the_next() -> None:
    # Carol (used nothing) waits for a GPU only her own run holds; Bob may take Alice's.
    usage = {ALICE: 90.0, BOB: 10.0}
    running = [("w1", CAROL), ("w2", ALICE)]

    def fits(uid: int, worker_id: str) -> bool:
        return uid == BOB or worker_id == "w1"

    choice = preempt_choice({CAROL: 10.0, BOB: 10.0}, running, usage, {}, 1.0, fits=fits)
    assert choice == Preemption(BOB, "w2", ALICE)


def test_a_park_that_would_queue_a_run_again_leaves_a_cancelled_run_cancelled(
    tmp_path: Path,
) -> None:
    # The keeper's "park" write, as the daemon sends it for a preempted run: a run cancelled
    # before the park was written (its worker's message crossed the cancel) stays cancelled;
    # a running one is queued again with its checkpoint epoch.
    store = Store(str(tmp_path / "s.db"))
    modules = [{"type": "m", "class": "C", "path_to_class": "/p/c.py", "name": "c"}]
    runs = [(modules, seed, "C()", {"seed": seed}) for seed in range(2)]
    _, (kept, cancelled) = store.add_submission(None, "me", "/c.ini", {"epochs": 4}, {}, runs)
    for run_id in (kept, cancelled):
        store.transition(run_id, RUNNING, "started")
    store.transition(cancelled, CANCELLED, "cancelled (while running)")
    detail = "preempted for bob's share at epoch 2"
    for run_id in (kept, cancelled):
        WRITES["park"](store, run_id=run_id, epoch=2, to=QUEUED, detail=detail)
    assert store.status_of(cancelled) == CANCELLED
    assert store.status_of(kept) == QUEUED
    record = store.run_record(kept)
    assert record is not None and record.checkpoint_epoch == 2
