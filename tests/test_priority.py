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
