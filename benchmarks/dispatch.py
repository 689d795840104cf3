"""Dispatch: many one-epoch runs of a tiny model, three ways, on the same number of workers.

- mosaic: submitted to a warm mosaicd pool, wall time from submit to the last result;
- fresh process per run (the original design): `python one_run.py` per run, W at a time
  (timed on a sample of --fresh-sample runs and scaled: the per-run cost is what matters);
- ideal: the same trainings called in a plain loop in one process, divided by W.

    python benchmarks/dispatch.py [--runs 500] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import REPO, BenchDaemon, or_process, tiny_config

HERE = Path(__file__).resolve().parent


def spec(root: str, run_id: int) -> dict[str, Any]:
    classes = str(HERE / "bench_classes.py")
    return {
        "run_id": run_id,
        "seed": run_id,
        "device": "cpu",
        "run_files_path": root,
        "epochs_target": 1,
        "start_epoch": 0,
        "checkpoint_every": 30.0,
        "max_log_mb": 50.0,
        "umask": None,
        "process": or_process(),
        "modules": [
            {
                "type": "data",
                "class": "synthetic_data",
                "path_to_class": classes,
                "n_batches": 4,
                "batch_size": 16,
                "n_features": 8,
                "key": "d",
                "name": "data",
            },
            {
                "type": "model",
                "class": "small_mlp",
                "path_to_class": classes,
                "width": 8,
                "key": "m",
                "name": "model",
            },
        ],
    }


def mosaic(runs: int, workers: int) -> float:
    daemon = BenchDaemon(workers=workers).start()
    try:
        deadline = time.monotonic() + 120
        while any(w["state"] != "idle" for w in daemon.request("status")["workers"]):
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        cfg = tiny_config(daemon.root, runs=runs, nb_processus=workers)
        db = str(daemon.root / "d.db")
        daemon.cli("run", str(cfg), db, "--follow")
        # From the submission to the last result, as the daemon recorded them: the client's
        # start-up and its polling interval are not dispatch.
        conn = sqlite3.connect(db)
        (span,) = conn.execute("SELECT max(finished_at) - min(queued_at) FROM run_meta").fetchone()
        conn.close()
        return float(span)
    finally:
        daemon.stop()


def fresh_processes(runs: int, workers: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as root:

        def one(run_id: int) -> None:
            subprocess.run(
                [sys.executable, str(HERE / "one_run.py"), json.dumps(spec(root, run_id))],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )

        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(1, runs + 1)))
        return time.perf_counter() - started


def ideal(runs: int, workers: int) -> float:
    """W processes, each training its share of the runs in a plain loop after a warm-up."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    share = [runs // workers + (1 if i < runs % workers else 0) for i in range(workers)]
    with tempfile.TemporaryDirectory() as root:
        procs = [
            subprocess.Popen(
                [sys.executable, str(HERE / "plain_loop.py"), root, str(first), str(n)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for first, n in zip(itertools.accumulate([1, *share[:-1]]), share)
        ]
        # Each process times its own loop after its warm-up; the ideal spans from the first
        # start to the last end, as the pool's figure spans from submit to the last result.
        outputs = [p.communicate()[0] for p in procs]
    spans = [
        float(line.split()[1])
        for out in outputs
        for line in out.splitlines()
        if line.startswith("span ")
    ]
    starts = [
        float(line.split()[1])
        for out in outputs
        for line in out.splitlines()
        if line.startswith("start ")
    ]
    ends = [s + d for s, d in zip(starts, spans)]
    return max(ends) - min(starts)


def measure(runs: int, workers: int, fresh_sample: int) -> dict[str, float]:
    ideal_s = ideal(runs, workers)
    mosaic_s = mosaic(runs, workers)
    fresh_s = fresh_processes(fresh_sample, workers) * runs / fresh_sample
    return {
        "runs": runs,
        "workers": workers,
        "mosaic_s": mosaic_s,
        "ideal_s": ideal_s,
        "fresh_process_s": fresh_s,
        "mosaic_vs_ideal": mosaic_s / ideal_s,
        "fresh_vs_mosaic": fresh_s / mosaic_s,
        "mosaic_overhead_ms_per_run": 1000 * (mosaic_s - ideal_s) * workers / runs,
        "fresh_overhead_ms_per_run": 1000 * (fresh_s - ideal_s) * workers / runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fresh-sample", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps(measure(args.runs, args.workers, args.fresh_sample)))


if __name__ == "__main__":
    main()
