"""Preemption at epoch boundaries through a real shared daemon (issue 27): one slot, user A's
run training, user B's run waiting with `mosaicd --preempt-after 1`. A's run parks at its next
epoch boundary, B's run takes the slot, and A's run is queued again by itself and resumes from
its checkpoint: its per-epoch records equal those of the same run trained uninterrupted, bit for
bit. An ensemble group is preempted whole, and resumes as one group."""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator

import pytest
from conftest import example_config, query
from test_shared_box import Box, _uid, running_box

EPOCHS = 6  # long enough that the park lands before the end on a fast machine too


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("mospre-", workers=1, options=("--preempt-after", "0.5")) as made:
        yield made


def _project(
    box: Box, role: str, name: str, epochs: int, slow: bool, runs: int = 1
) -> tuple[str, str]:
    directory = box.home(role) / name
    directory.mkdir()
    config = example_config(directory, epochs=epochs, multiplicity=runs, nb_processus=1, seed=7)
    if slow:
        # Epochs of a second or so: the run is still training when B's wait is over.
        text = config.read_text()
        config.write_text(
            text.replace("data_size = 200", "data_size = 24000").replace(
                "batch_size = 20", "batch_size = 10"
            )
        )
    for path in (directory, config):
        os.chown(path, _uid(box, role), -1)
    return str(config), str(directory / "results.db")


def _epochs(db: str) -> list[tuple[int, int, float, float]]:
    sql = "SELECT run_id, epoch, train_loss, test_loss FROM run_epochs ORDER BY run_id, epoch"
    return query(db, sql)


def _at(db: str, status: str, run_id: int = 1) -> list[float]:
    sql = "SELECT at FROM run_events WHERE to_status = ? AND run_id = ? ORDER BY event_id"
    return [at for (at,) in query(db, sql, status, run_id)]


def _preempted_like_uninterrupted(box: Box, name: str, runs: int) -> None:
    """A's `runs` repetitions (one ensemble group when more than one) trained alone, then
    again with B's run queued once they have trained an epoch: they are preempted for B and
    end with the uninterrupted records."""
    # The reference: trained alone, never interrupted (and A has used the slot).
    ref_config, ref_db = _project(box, "a", f"{name}-reference", EPOCHS, slow=True, runs=runs)
    assert box.cli("a", "run", ref_config, ref_db, "--no-autostart").returncode == 0
    assert box.daemon.wait_for(ref_db, timeout=300).get("done") == runs
    reference = _epochs(ref_db)
    assert len(reference) == runs * EPOCHS

    # The same runs again (same seeds), and B's run queued once they have trained an epoch.
    config, db = _project(box, "a", f"{name}-preempted", EPOCHS, slow=True, runs=runs)
    assert box.cli("a", "run", config, db, "--no-autostart").returncode == 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _epochs(db):
        time.sleep(0.1)
    assert _epochs(db), "A's run trained no epoch"
    b_config, b_db = _project(box, "b", f"{name}-quick", 1, slow=False)
    result = box.cli("b", "run", b_config, b_db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    assert box.daemon.wait_for(b_db, timeout=300).get("done") == 1
    assert box.daemon.wait_for(db, timeout=300).get("done") == runs

    for run_id in range(1, runs + 1):
        sql = "SELECT to_status, detail FROM run_events WHERE run_id = ? ORDER BY event_id"
        events = query(db, sql, run_id)
        statuses = [status for status, _ in events]
        assert statuses == ["queued", "running", "queued", "running", "done"], events
        # Parked for B at an epoch boundary, then queued again by itself (no `mosaic resume`).
        found = re.fullmatch(
            rf"preempted for {box.users['b']}'s share at epoch (\d+)", events[2][1] or ""
        )
        assert found is not None, events
        parked_at = int(found.group(1))
        assert 1 <= parked_at < EPOCHS
        # Resumed from that epoch's checkpoint, not from the start.
        assert f"from epoch {parked_at}" in events[3][1], events
        if runs > 1:  # as one group, before and after the park
            assert all("in an ensemble with runs" in events[i][1] for i in (1, 3)), events
        # B's run trained in the slot while A's waited: after A's park, before A's end.
        (b_started,) = _at(b_db, "running")
        assert _at(db, "queued", run_id)[1] <= b_started <= _at(db, "running", run_id)[1]
    got = _epochs(db)
    if runs == 1:
        # Bit for bit the uninterrupted run's per-epoch records.
        assert got == reference
    else:
        # A group resumed from its members' checkpoints gives the uninterrupted group's numbers
        # within float rounding, as after `pause --now` (tests/test_ensemble_daemon.py): the
        # same epochs, each figure within 1e-5 relative.
        assert [row[:2] for row in got] == [row[:2] for row in reference]
        for mine, theirs in zip(got, reference, strict=True):
            for a, b in zip(mine[2:], theirs[2:], strict=True):
                assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (mine, theirs)


def test_a_preempted_run_resumes_to_the_uninterrupted_results(box: Box) -> None:
    _preempted_like_uninterrupted(box, "single", runs=1)


def test_preempting_an_ensemble_member_parks_its_whole_group(box: Box) -> None:
    # Two repetitions train as one ensemble group in one worker: both park, both resume
    # together, and both end with the uninterrupted group's records (within float rounding:
    # a group's park and resume is not bit-identical, see the helper).
    _preempted_like_uninterrupted(box, "group", runs=2)
