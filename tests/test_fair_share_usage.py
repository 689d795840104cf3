"""Fair-share usage survives a daemon restart (issue 27): it is kept in the daemon's state
database, and decays over the time the daemon was down as over any other time."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import Daemon, example_config


def _usage(daemon: Daemon) -> float:
    rows = daemon.request("status", users=True, limit=0)["users"]
    return sum(row["usage"] for row in rows)


def test_usage_is_kept_across_a_restart(tmp: Path) -> None:
    daemon = Daemon(tmp, workers=1).start()
    try:
        config = example_config(tmp, epochs=2)
        db = str(tmp / "results.db")
        daemon.cli("run", str(config), db, check=True)
        daemon.wait_for(db, total=1)
        used = _usage(daemon)
        assert used > 0
    finally:
        daemon.stop()
    # Saved at the stop, with when it was so (`status --users` rounds to 0.1).
    state = sqlite3.connect(str(Path(daemon.state_dir) / "daemon.db"))
    saved = state.execute("SELECT sum(slot_seconds) FROM fair_share_usage").fetchone()[0]
    state.close()
    assert saved > 0 and saved >= used - 0.05
    daemon.start()
    try:
        # The same usage (a one-day half-life: a few seconds down take off almost nothing;
        # `status --users` rounds to 0.1).
        assert 0.99 * saved - 0.05 <= _usage(daemon) <= saved + 0.05
    finally:
        daemon.stop()
