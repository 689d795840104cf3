"""Preemption at epoch boundaries through a real shared daemon (issue 27): one slot, user A's
run training, user B's run waiting with `mosaicd --preempt-after 1`. A's run parks at its next
epoch boundary, B's run takes the slot, and A's run is queued again by itself and resumes from
its checkpoint: its per-epoch records equal those of the same run trained uninterrupted."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest
from conftest import example_config, query
from test_shared_box import Box, _uid, running_box

EPOCHS = 8  # long enough that the park lands before the end on a fast machine too


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("mospre-", workers=1, options=("--preempt-after", "1")) as made:
        yield made


def _project(box: Box, role: str, name: str, epochs: int, slow: bool) -> tuple[str, str]:
    directory = box.home(role) / name
    directory.mkdir()
    config = example_config(directory, epochs=epochs, nb_processus=1, seed=7)
    if slow:
        # Epochs of a second or so: the run is still training when B's wait is over.
        text = config.read_text()
        config.write_text(
            text.replace("data_size = 200", "data_size = 30000").replace(
                "batch_size = 20", "batch_size = 10"
            )
        )
    for path in (directory, config):
        os.chown(path, _uid(box, role), -1)
    return str(config), str(directory / "results.db")


def _epochs(db: str) -> list[tuple[int, float, float]]:
    return query(db, "SELECT epoch, train_loss, test_loss FROM run_epochs ORDER BY epoch")


def _at(db: str, status: str) -> list[float]:
    sql = "SELECT at FROM run_events WHERE to_status = ? ORDER BY event_id"
    return [at for (at,) in query(db, sql, status)]


def test_a_preempted_run_resumes_to_the_uninterrupted_results(box: Box) -> None:
    # The reference: A's run trained alone, never interrupted (and A has used the slot).
    ref_config, ref_db = _project(box, "a", "reference", EPOCHS, slow=True)
    assert box.cli("a", "run", ref_config, ref_db, "--no-autostart").returncode == 0
    assert box.daemon.wait_for(ref_db, timeout=300).get("done") == 1
    reference = _epochs(ref_db)
    assert [e for e, _, _ in reference] == list(range(1, EPOCHS + 1))

    # The same run again (same seed), and B's run queued once it has trained an epoch.
    config, db = _project(box, "a", "preempted", EPOCHS, slow=True)
    assert box.cli("a", "run", config, db, "--no-autostart").returncode == 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _epochs(db):
        time.sleep(0.1)
    assert _epochs(db), "A's run trained no epoch"
    b_config, b_db = _project(box, "b", "quick", 1, slow=False)
    result = box.cli("b", "run", b_config, b_db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    assert box.daemon.wait_for(b_db, timeout=300).get("done") == 1
    assert box.daemon.wait_for(db, timeout=300).get("done") == 1

    events = query(db, "SELECT to_status, detail FROM run_events ORDER BY event_id")
    assert [status for status, _ in events] == ["queued", "running", "queued", "running", "done"]
    # Parked for B at an epoch boundary, then queued again by itself (no `mosaic resume`).
    found = re.fullmatch(
        rf"preempted for {box.users['b']}'s share at epoch (\d+)", events[2][1] or ""
    )
    assert found is not None, events
    parked_at = int(found.group(1))
    assert 1 <= parked_at < EPOCHS
    # Resumed from that epoch's checkpoint, not from the start.
    assert f"from epoch {parked_at}" in events[3][1], events
    # Bit for bit the uninterrupted run's per-epoch records.
    assert _epochs(db) == reference
    # B's run trained in the slot while A's waited: after A's park, before A's end.
    (b_started,) = _at(b_db, "running")
    assert _at(db, "queued")[1] <= b_started <= _at(db, "done")[0]
    assert b_started <= _at(db, "running")[1]
