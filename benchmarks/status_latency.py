"""`mosaic status` with 10,000 and 100,000 runs in the study: round trip and process wall time.

The study is written directly (half done with results, half queued) and served by a daemon with
no workers, so nothing changes while we measure.

    python benchmarks/status_latency.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import BenchDaemon, median, percentile

from mosaicd.storage.state import DaemonState
from mosaicd.storage.store import Store


def build_study(path: str, n: int) -> None:
    store = Store(path)
    module = [
        {"type": "data", "class": "d", "path_to_class": "/x.py", "key": "d", "name": "d"},
        {
            "type": "model",
            "class": "m",
            "path_to_class": "/y.py",
            "width": 8,
            "key": "m",
            "name": "m",
        },
    ]
    process = {
        "epochs": 1,
        "lr": 0.001,
        "data_scheme": ["data"],
        "pipeline_scheme": ["model"],
        "run_files_path": "/tmp/none",
    }
    runs = [(module, i, "d() | m(8)", {"m_width": 8, "seed": i}) for i in range(n)]
    store.add_submission(0, "bench", "/bench.ini", process, {"nb_processus": 1}, runs)
    with store.transaction() as conn:
        conn.execute("UPDATE runs SET status='done' WHERE run_id % 2 = 0")
        conn.execute(
            'INSERT INTO run_results (run_id, train_loss, test_loss, "duration(s)", '
            "epochs) SELECT run_id, 0.1, 0.2, 1.0, 1 FROM runs WHERE status='done'"
        )
    store.close()


def measure(n: int) -> dict[str, float]:
    daemon = BenchDaemon(workers=0)
    try:
        db = str(daemon.root / "study.db")
        build_study(db, n)
        DaemonState(daemon.state_dir).add_study(db)
        daemon.start()
        from mosaic_client.connection import Client

        times = []
        with Client(daemon.socket) as client:
            for _ in range(20):
                client.request("status")
            for _ in range(300):
                t = time.perf_counter()
                reply = client.request("status")
                times.append(time.perf_counter() - t)
        assert sum(reply["studies"][0]["counts"].values()) == n
        wall = []
        for _ in range(10):
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "mosaic_client.cli", "status"],
                env=daemon.env,
                check=True,
                capture_output=True,
            )
            wall.append(time.perf_counter() - t)
        bare = []
        for _ in range(10):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - t)
        return {
            "runs": n,
            "rtt_p50_ms": 1000 * median(times),
            "rtt_p99_ms": 1000 * percentile(times, 99),
            "process_ms": 1000 * median(wall),
            "python_startup_ms": 1000 * median(bare),
        }
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(measure(n)))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
