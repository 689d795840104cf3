"""Per-run overhead of mosaicd's warm worker pool against a fresh Python + torch process per run.

N one-epoch runs of a tiny model (the OR/AND example's dataset_OR and mlp_funnel) are trained
four ways, one after the other on one CPU slot:

- baseline: `python -c '<import torch, build, train one epoch>'`, one fresh process per run
  (the original design);
- pool, --isolation none: a warm worker, nothing restored between runs;
- pool, --isolation state (the default): a warm worker, global state restored after each run;
- pool, --isolation process: a warm worker that forks a fresh process per run.

A run's overhead is its wall time minus the time its epoch loop took (what the run itself
reports), so a faster or slower model does not change the comparison. The table gives each
mode's overhead per run and its ratio to the baseline's, all measured in this one invocation.

    .venv/bin/python benchmarks/dispatch_overhead.py --runs 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mosaic_client.connection import Client, DaemonUnavailable  # noqa: E402

EXAMPLE = REPO / "examples" / "or_mlp"
DATA_SIZE, TRAIN_PROP, BATCH, LENGTH, WIDTH = 200, 0.8, 20, 2, 3

# The same training a run does in mosaicd, as one self-contained fresh process: import torch,
# load the example classes, one epoch of training and one of evaluation.
BASELINE = textwrap.dedent(f"""
    import importlib.util, json, sys, time
    import torch
    def load(path, name):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    seed = int(sys.argv[1])
    torch.manual_seed(seed)
    data = load({str(EXAMPLE / "dataset.py")!r}, "dataset").dataset_OR(
        {DATA_SIZE}, {TRAIN_PROP}, {BATCH})
    train, test = data.prepare(None, {{}}, {{}})
    info = data.info()
    model = load({str(EXAMPLE / "mlp.py")!r}, "mlp").mlp_funnel(
        input_size=info["input_size"], output_size=info["output_size"], length={LENGTH},
        width={WIDTH})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    criterion = torch.nn.BCELoss()
    started = time.perf_counter()
    model.train()
    for x, y in train:
        loss = criterion(model(x, {{}}, {{}}), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        test_loss = sum(float(criterion(model(x, {{}}, {{}}), y)) for x, y in test)
    print(json.dumps({{"train_s": time.perf_counter() - started}}))
""")

CONFIG = """\
[PROCESS]
lr = 0.01
epochs = 1
data_scheme = dataset
pipeline_scheme = mlp
loss_function = BCELoss
run_files_path = {root}/runs
seed = 0

[MONITOR]
need_gpu = false
gpu_available = None
nb_processus = 1
multiplicity = {runs}

[dataset_OR]
type = dataset
class = dataset_OR
path_to_class = {example}/dataset.py
data_size = {data_size}
train_prop = {train_prop}
batch_size = {batch}
key = data

[mlp_funnel]
type = mlp
class = mlp_funnel
path_to_class = {example}/mlp.py
length = {length}
width = {width}
key = mlp
"""


def config_text(root: Path, runs: int) -> str:
    """The benchmark's sweep: `runs` repetitions of one tiny one-epoch pipeline."""
    return CONFIG.format(
        root=root,
        runs=runs,
        example=EXAMPLE,
        data_size=DATA_SIZE,
        train_prop=TRAIN_PROP,
        batch=BATCH,
        length=LENGTH,
        width=WIDTH,
    )


def measure_baseline(runs: int) -> dict[str, float]:
    walls, trains = [], []
    for seed in range(runs):
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", BASELINE, str(seed)],
            check=True,
            capture_output=True,
            text=True,
            env=_cpu_env(),
        ).stdout
        walls.append(time.perf_counter() - started)
        trains.append(json.loads(out.strip().splitlines()[-1])["train_s"])
    return _summary(walls, trains, sum(walls))


def _cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the same CPU-only setting the pool's CPU slot gets
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _summary(walls: list[float], trains: list[float], total: float) -> dict[str, float]:
    overheads = [w - t for w, t in zip(walls, trains)]
    return {
        "wall": total / len(walls),
        "train": statistics.mean(trains),
        "overhead": statistics.mean(overheads),
        "overhead_median": statistics.median(overheads),
    }


def measure_pool(runs: int, isolation: str, work: Path) -> dict[str, float]:
    root = work / f"pool-{isolation}"
    daemon_dir = root / "daemon"
    daemon_dir.mkdir(parents=True)
    socket = str(daemon_dir / "d.sock")
    log = open(root / "mosaicd.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mosaicd",
            "--socket",
            socket,
            "--state-dir",
            str(daemon_dir / "state"),
            "--workers",
            "1",
            "--gpus",
            "",
            "--isolation",
            isolation,
        ],
        env=_cpu_env(),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        wait_ready(socket, proc)
        config = root / "config.ini"
        config.write_text(config_text(root, runs))
        db = str(root / "study.db")
        env = _cpu_env()
        env["MOSAIC_SOCKET"] = socket
        subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", "--socket", socket, "run", str(config), db],
            check=True,
            capture_output=True,
            env=env,
        )
        wait_done(socket, db, runs)
        conn = sqlite3.connect(db)
        rows = conn.execute(
            'SELECT m.started_at, m.finished_at, r."duration(s)", r2.status '
            "FROM run_meta m JOIN run_results r USING (run_id) "
            "JOIN runs r2 USING (run_id) ORDER BY m.started_at"
        ).fetchall()
        conn.close()
        if len(rows) != runs or any(r[3] != "done" for r in rows):
            raise SystemExit(f"pool ({isolation}): not every run finished; see {root}")
        # In steady state a run's wall time in the pool is the time from the previous run's
        # end to its own: dispatch, start, train, report and the gap to the next dispatch all
        # count, as the fresh process's start-up and exit do in the baseline. The first run
        # (after the submission's own client round trip) is left out.
        ends = [r[1] for r in rows]
        walls = [b - a for a, b in zip(ends, ends[1:])]
        trains = [r[2] for r in rows[1:]]
        return _summary(walls, trains, sum(walls))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_ready(socket: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """The daemon answers and its worker has imported torch (is idle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("mosaicd exited during start-up")
        try:
            with Client(socket, timeout=1.0) as client:
                status: dict[str, Any] = client.request("status", limit=0)
            if status["workers"] and all(w["state"] == "idle" for w in status["workers"]):
                return
        except DaemonUnavailable:
            pass
        time.sleep(0.05)
    raise SystemExit("mosaicd did not become ready")


def wait_done(socket: str, db: str, runs: int, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    with Client(socket, timeout=30.0) as client:
        while time.monotonic() < deadline:
            status = client.request("status", db=db, limit=0)
            counts = status["studies"][0]["counts"] if status["studies"] else {}
            if sum(counts.get(s, 0) for s in ("done", "failed", "cancelled")) >= runs:
                return
            time.sleep(0.2)  # rare polls: the daemon's loop is what is being measured
    raise SystemExit(f"runs did not finish in {timeout} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per mode (default 200)")
    parser.add_argument(
        "--baseline-runs",
        type=int,
        default=None,
        help="fresh-process runs (default: --runs); each costs seconds",
    )
    parser.add_argument(
        "--modes",
        default="none,state,process",
        help="pool isolation modes to measure (default none,state,process)",
    )
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.runs < 2:
        raise SystemExit("--runs must be at least 2")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = Path(tempfile.mkdtemp(prefix="mosaic-bench-"))
    results: dict[str, dict[str, float]] = {}
    try:
        baseline_runs = args.baseline_runs or args.runs
        print(f"baseline: {baseline_runs} fresh processes ...", file=sys.stderr, flush=True)
        results["fresh process per run"] = measure_baseline(baseline_runs)
        for mode in modes:
            print(f"pool --isolation {mode}: {args.runs} runs ...", file=sys.stderr, flush=True)
            results[f"pool, --isolation {mode}"] = measure_pool(args.runs, mode, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["fresh process per run"]
    print(
        f"{args.runs} one-epoch runs of dataset_OR({DATA_SIZE}) | mlp_funnel({LENGTH},{WIDTH})"
        f" on one CPU slot; python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'mode':<28} {'wall/run':>10} {'train/run':>10} {'overhead/run':>13} "
        f"{'(median)':>10} {'overhead ratio':>15} {'wall ratio':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<28} {r['wall'] * 1e3:>8.1f}ms {r['train'] * 1e3:>8.1f}ms "
            f"{r['overhead'] * 1e3:>11.1f}ms {r['overhead_median'] * 1e3:>8.1f}ms "
            f"{r['overhead'] / base['overhead']:>15.4f} {r['wall'] / base['wall']:>11.4f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"runs": args.runs, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
