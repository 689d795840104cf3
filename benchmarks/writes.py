"""Epoch events the daemon stores per second while serving status.

1. Through the daemon: 2 workers train runs of many one-batch epochs (each epoch is one event)
   while a client polls `status` without pause; events/s = epochs stored / wall time.
2. In-process: Store.record_epochs batched (one transaction per loop turn, as the daemon does)
   against one transaction per event.

    python benchmarks/writes.py [--epochs 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time

from common import BenchDaemon, tiny_config

from mosaic_client.connection import Client
from mosaicd.storage.store import Store


def through_daemon(epochs: int) -> dict[str, float]:
    daemon = BenchDaemon(workers=2).start()
    polls = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal polls
        with Client(daemon.socket) as client:
            while not stop.is_set():
                client.request("status")
                polls += 1

    try:
        cfg = tiny_config(daemon.root, runs=2, epochs=epochs)
        text = cfg.read_text().replace("n_batches = 4", "n_batches = 1")
        cfg.write_text(text)
        db = str(daemon.root / "w.db")
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        started = time.perf_counter()
        daemon.cli("run", str(cfg), db, "--follow")
        wall = time.perf_counter() - started
        stop.set()
        poller.join(5)
        conn = sqlite3.connect(db)
        stored = conn.execute("SELECT count(*) FROM run_epochs").fetchone()[0]
        conn.close()
        assert stored == 2 * epochs, stored
        return {
            "events": stored,
            "wall_s": wall,
            "events_per_s": stored / wall,
            "status_polls": polls,
        }
    finally:
        stop.set()
        daemon.stop()


def in_process(n: int = 3000) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        store = Store(os.path.join(d, "s.db"))
        module = [{"type": "m", "class": "m", "path_to_class": "/m.py", "key": "m", "name": "m"}]
        store.add_submission(0, "b", "/b.ini", {"epochs": n}, {}, [(module, 0, "m()", {})] * 2)

        def event(run_id: int, epoch: int) -> dict[str, object]:
            return {
                "run_id": run_id,
                "epoch": epoch,
                "train_loss": 0.1,
                "test_loss": 0.2,
                "duration": 0.01,
                "checkpointed": False,
            }

        t = time.perf_counter()
        for start in range(0, n, 100):
            store.record_epochs([event(1, e) for e in range(start + 1, start + 101)])
        batched = time.perf_counter() - t
        t = time.perf_counter()
        for e in range(1, n + 1):
            store.record_epochs([event(2, e)])
        single = time.perf_counter() - t
        store.close()
    return {
        "batched_per_s": n / batched,
        "single_per_s": n / single,
        "batching_gain": single / batched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1500)
    args = parser.parse_args()
    print(json.dumps(through_daemon(args.epochs)))
    print(json.dumps(in_process()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
