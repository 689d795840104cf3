"""Load: 10,000 queued runs and 50 client processes polling `status` while runs complete.

Marked slow (run by .ci/run, skipped with -m 'not slow'). The daemon is paused while the
10,000 runs are queued (in submissions of 1,000), then resumed with two workers training tiny
one-epoch runs while 50 client processes each ask for `status` 100 times. It cannot finish
10,000 runs in the test's time: the backlog is cancelled at the end and every run that did
complete is checked for exactly one result and its one epoch. The latency figures are printed
and written to load_figures.json in the test's directory (docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Daemon, example_config, query

from mosaic_client.config import load_config

RUNS = int(os.environ.get("MOSAIC_LOAD_RUNS", "10000"))
CHUNK = 1000
CLIENTS = int(os.environ.get("MOSAIC_LOAD_CLIENTS", "50"))
POLLS = 100

# One client process: POLLS status requests back to back, each timed; failures are counted,
# never raised, so one bad reply cannot hide the others.
POLLER = """
import json, sys, time
from mosaic_client.connection import Client
socket, db, polls = sys.argv[1], sys.argv[2], int(sys.argv[3])
latencies, failures = [], []
with Client(socket, timeout=60) as client:
    for _ in range(polls):
        started = time.perf_counter()
        try:
            reply = client.request("status", db=db, limit=10)
            assert reply["studies"] and "counts" in reply["studies"][0]
            latencies.append(time.perf_counter() - started)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            client.close()
print(json.dumps({"latencies": latencies, "failures": failures}))
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


@pytest.mark.slow
def test_ten_thousand_queued_runs_and_fifty_pollers(tmp: Path) -> None:
    d = Daemon(tmp, workers=2).start()
    db = str(tmp / "load.db")
    cfg = example_config(tmp, epochs=1, nb_processus=2)
    cfg.write_text(cfg.read_text().replace("data_size = 200", "data_size = 40"))
    expanded = load_config(str(cfg))
    try:
        d.request("pause")
        started = time.monotonic()
        for _ in range(RUNS // CHUNK):
            d.request(
                "submit",
                timeout=120,
                db=db,
                config_path=expanded.config_path,
                process=expanded.process,
                monitor=expanded.monitor,
                pipelines=expanded.pipelines * CHUNK,
            )
        queue_seconds = time.monotonic() - started
        status = d.request("status", db=db)
        assert status["queued"] == RUNS and status["studies"][0]["counts"]["queued"] == RUNS
        idle = []
        for _ in range(50):
            t0 = time.perf_counter()
            d.request("status", db=db, limit=10)
            idle.append(time.perf_counter() - t0)

        d.request("resume")
        env = {**d.env, "PYTHONPATH": str(REPO)}
        pollers = [
            subprocess.Popen(
                [sys.executable, "-c", POLLER, d.socket, db, str(POLLS)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                text=True,
            )
            for _ in range(CLIENTS)
        ]
        latencies: list[float] = []
        failures: list[str] = []
        for proc in pollers:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            result = json.loads(out)
            latencies += result["latencies"]
            failures += result["failures"]

        d.request("pause")
        cancelled = d.request(
            "cancel",
            timeout=300,
            db=db,
            selection={"kind": "request", "sql": "SELECT run_id FROM runs WHERE status='queued'"},
        )
        deadline = time.monotonic() + 120
        while d.request("status", db=db)["studies"][0]["counts"]["running"]:
            assert time.monotonic() < deadline, "running runs did not finish"
            time.sleep(0.2)
        counts = d.request("status", db=db)["studies"][0]["counts"]
    finally:
        d.stop()

    assert failures == [], failures[:5]
    assert len(latencies) == CLIENTS * POLLS
    done = counts["done"]
    assert done >= 2 and counts["failed"] == 0
    assert done + counts["cancelled"] == RUNS and len(cancelled["cancelled"]) == counts["cancelled"]
    # Lost or duplicated results: every done run has exactly one result row, one epoch and one
    # "done" event; no other run has any.
    lost = query(
        db,
        "SELECT count(*) FROM runs r WHERE status='done' AND NOT EXISTS "
        "(SELECT 1 FROM run_results x WHERE x.run_id=r.run_id)",
    )[0][0]
    stray = query(
        db, "SELECT count(*) FROM run_results x JOIN runs r USING (run_id) WHERE r.status!='done'"
    )[0][0]
    assert query(db, "SELECT count(*), count(DISTINCT run_id) FROM run_results") == [(done, done)]
    epochs = query(db, "SELECT count(*), count(DISTINCT run_id), max(epoch) FROM run_epochs")
    assert epochs == [(done, done, 1)]
    events = query(
        db, "SELECT count(*), count(DISTINCT run_id) FROM run_events WHERE to_status='done'"
    )
    assert events == [(done, done)]
    duplicated = events[0][0] - events[0][1]
    assert lost == 0 and stray == 0 and duplicated == 0
    assert query(db, "PRAGMA integrity_check") == [("ok",)]

    figures = {
        "queued_runs": RUNS,
        "queue_seconds": round(queue_seconds, 2),
        "clients": CLIENTS,
        "status_requests": len(latencies),
        "failed_requests": len(failures),
        "runs_completed": done,
        "runs_cancelled": counts["cancelled"],
        "lost": lost,
        "duplicated": duplicated,
        "status_p50_ms": round(1000 * percentile(latencies, 50), 2),
        "status_p99_ms": round(1000 * percentile(latencies, 99), 2),
        "status_max_ms": round(1000 * max(latencies), 2),
        "idle_status_p50_ms": round(1000 * percentile(idle, 50), 2),
    }
    print(f"\nload figures: {json.dumps(figures)}")
    (tmp / "load_figures.json").write_text(json.dumps(figures, indent=1))
    (tmp.parent / "mosaic-load-figures.json").write_text(json.dumps(figures, indent=1))
