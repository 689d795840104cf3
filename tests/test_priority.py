"""Priorities among one user's runs (issue 27): `mosaic run --priority N` and `mosaic priority
DB N` order a user's own queued runs, higher first, then first come, first served; a
submission's priority is kept in its study (schema 7) and shown nowhere else."""

from __future__ import annotations

from pathlib import Path

from conftest import Daemon, example_config, query


def _first_start(db: Path) -> float:
    return query(db, "SELECT min(at) FROM run_events WHERE to_status = 'running'")[0][0]


def test_priorities_order_a_users_own_runs(tmp: Path) -> None:
    daemon = Daemon(tmp, workers=1).start()
    try:
        daemon.cli("pause", check=True)  # everything waits in the queue while it is ordered
        studies = {}
        for name, extra in (("low", []), ("high", ["--priority", "5"]), ("later", [])):
            root = tmp / name
            root.mkdir()
            config = example_config(root, epochs=1, multiplicity=2, nb_processus=1)
            studies[name] = root / "results.db"
            daemon.cli("run", str(config), str(studies[name]), *extra, check=True)
        # `later` was queued last; raised above `high`, it goes first.
        result = daemon.cli("priority", str(studies["later"]), "9", check=True)
        assert "priority 9 for submission(s) 1" in result.stdout
        assert query(studies["later"], "SELECT priority FROM submissions") == [(9,)]
        assert query(studies["high"], "SELECT priority FROM submissions") == [(5,)]
        # A queued run says why it waits.
        shown = daemon.cli("show", "1", "--db", str(studies["low"]), check=True).stdout
        assert "waiting: " in shown and "paused" in shown, shown
        daemon.cli("resume", check=True)
        for db in studies.values():
            assert daemon.wait_for(str(db))["done"] == 2
        order = sorted(studies, key=lambda name: _first_start(studies[name]))
        assert order == ["later", "high", "low"], order
        # A submission that is not there is refused, naming it.
        missing = daemon.cli("priority", str(studies["low"]), "1", "--submission", "7")
        assert missing.returncode != 0 and "no submission 7" in missing.stderr
    finally:
        daemon.stop()


def test_the_daemons_per_user_limits(tmp: Path) -> None:
    daemon = Daemon(tmp, "--user-queued", "3", "--user-cpu-slots", "1", workers=2).start()
    try:
        root = tmp / "big"
        root.mkdir()
        config = example_config(
            root, epochs=2, multiplicity=4, nb_processus=2, extra_monitor="ensemble = off"
        )
        refused = daemon.cli("run", str(config), str(root / "results.db"))
        assert refused.returncode != 0
        assert "has 0 runs queued" in refused.stderr and "at most 3 per user" in refused.stderr
        assert "Nothing was queued" in refused.stderr
        assert not (root / "results.db").exists() or not query(
            root / "results.db", "SELECT * FROM runs"
        )
        # Within the limit: queued, and trained one at a time on two workers (one CPU slot).
        small = tmp / "small"
        small.mkdir()
        config = example_config(
            small, epochs=2, multiplicity=3, nb_processus=2, extra_monitor="ensemble = off"
        )
        db = small / "results.db"
        daemon.cli("run", str(config), str(db), check=True)
        assert daemon.wait_for(str(db))["done"] == 3
        spans = query(
            db,
            "SELECT min(at), max(at) FROM run_events WHERE to_status IN ('running', 'done') "
            "GROUP BY run_id ORDER BY 1",
        )
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, spans  # never two at once
        users = daemon.cli("status", "--users", check=True).stdout
        assert "limits per user: 1 CPU slots, 3 queued runs" in users
    finally:
        daemon.stop()
