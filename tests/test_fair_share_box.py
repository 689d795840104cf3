"""Fair share through a real shared daemon (issue 27): user A queues 1,000 runs, then user B
queues 10. On a first-come daemon B would wait for all of A's; with fair share, B's first run
starts as soon as one of A's ends (its slot changes hands), and B's ten are done while A has
done only a few dozen. Every user sees every user's totals (`mosaic status --users`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import example_config, query
from test_shared_box import Box, _uid, running_box


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("mosfair-", workers=2) as made:
        yield made


def _sweep(box: Box, role: str, name: str, runs: int) -> tuple[str, str]:
    directory = box.home(role) / name
    directory.mkdir()
    # One run per slot (no ensembles of repetitions): the order of runs is what is measured.
    config = example_config(
        directory, epochs=1, multiplicity=runs, nb_processus=2, extra_monitor="ensemble = off"
    )
    for path in (directory, config):
        os.chown(path, _uid(box, role), -1)
    return str(config), str(directory / "results.db")


def _started(db: str) -> list[float]:
    return [at for (at,) in query(db, "SELECT at FROM run_events WHERE to_status = 'running'")]


def test_a_small_users_runs_go_before_a_big_users_backlog(box: Box) -> None:
    a_config, a_db = _sweep(box, "a", "big", 1000)
    result = box.cli("a", "run", a_config, a_db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    # A holds both slots, and has used them for a while.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_started(a_db)) < 4:
        time.sleep(0.2)
    assert len(_started(a_db)) >= 4
    b_config, b_db = _sweep(box, "b", "small", 10)
    result = box.cli("b", "run", b_config, b_db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    # Everyone sees every user's totals, and no one's studies.
    users = box.request("b", "status", users=True, limit=0)["ok"]["users"]
    by_name = {row["user"]: row for row in users}
    assert by_name[box.users["a"]]["queued"] > 900 and by_name[box.users["b"]]["queued"] >= 9
    assert by_name[box.users["a"]]["usage"] > 0
    b_sees = box.request("b", "status", limit=0)["ok"]["studies"]
    assert a_db not in [study["db"] for study in b_sees]
    counts = box.daemon.wait_for(b_db, total=10, timeout=300)
    assert counts.get("done") == 10, counts
    first_b = min(_started(b_db))
    (b_queued,) = query(b_db, "SELECT min(at) FROM run_events WHERE to_status = 'queued'")[0]
    # B's first run waited for one of A's runs to end and its slot to change hands (a worker
    # of B's starts), not for A's queue.
    assert first_b - b_queued < 60, first_b - b_queued
    a_done = query(a_db, "SELECT count(*) FROM runs WHERE status = 'done'")[0][0]
    assert a_done < 800, a_done
    text = box.cli("a", "status", "--users")
    assert text.returncode == 0 and box.users["b"] in text.stdout, text.stdout
    # The rest of A's backlog is cancelled: the box's daemon stops at once.
    assert box.cli("a", "cancel", a_db, "-id", "all").returncode == 0
    assert Path(a_db).exists()
