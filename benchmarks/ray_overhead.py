"""Per-run overhead of `mosaicd --executor ray` against the local worker pool.

N one-epoch runs of a tiny model (the OR/AND example's dataset_OR and mlp_funnel(2,3)) go
through two daemons, one after the other, each with one CPU worker slot:

- local: the default pool, one worker process;
- ray: `--executor ray`, a local Ray started by the daemon, one actor (add --ray-address to
  measure against an existing cluster instead).

A run's wall time is the time from the previous run's end to its own (dispatch, start, train,
report and the gap to the next dispatch all count), and its overhead is that minus the time its
epoch loop took (what the run itself reports). The ratio ray/local of both is printed; the
daemons' start-up (Ray's own start takes seconds) is not part of it. With --rounds R the two
daemons alternate R times, the first of the pair alternating too, and the best round of each
counts.

    .venv/bin/python benchmarks/ray_overhead.py --runs 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


sys.path.insert(0, str(REPO / "benchmarks"))
# The same sweep and waits as the local pool's benchmark, so the two figures compare.
from dispatch_overhead import config_text, wait_done, wait_ready  # noqa: E402


def measure(executor: str, runs: int, work: Path, ray_address: str | None) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"{executor}-", dir=work))
    daemon_dir = root / "daemon"
    daemon_dir.mkdir()
    socket = str(daemon_dir / "d.sock")
    extra = ["--executor", "ray"] if executor == "ray" else []
    if executor == "ray" and ray_address:
        extra += ["--ray-address", ray_address]
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
            *extra,
        ],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        started = time.monotonic()
        wait_ready(socket, proc, timeout=300.0)
        ready = time.monotonic() - started
        config = root / "config.ini"
        config.write_text(config_text(root, runs))
        db = str(root / "study.db")
        subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", "--socket", socket, "run", str(config), db],
            check=True,
            capture_output=True,
        )
        wait_done(socket, db, runs)
        conn = sqlite3.connect(db)
        rows = conn.execute(
            'SELECT m.finished_at, r."duration(s)", r2.status '
            "FROM run_meta m JOIN run_results r USING (run_id) "
            "JOIN runs r2 USING (run_id) ORDER BY m.finished_at"
        ).fetchall()
        conn.close()
        if len(rows) != runs or any(r[2] != "done" for r in rows):
            raise SystemExit(f"{executor}: not every run finished; see {root}/mosaicd.log")
        # The first run (after the submission's own round trip) is left out.
        ends = [r[0] for r in rows]
        walls = [b - a for a, b in zip(ends, ends[1:])]
        trains = [r[1] for r in rows[1:]]
        overheads = [w - t for w, t in zip(walls, trains)]
        return {
            "wall": statistics.mean(walls),
            "train": statistics.mean(trains),
            "overhead": statistics.mean(overheads),
            "overhead_median": statistics.median(overheads),
            "ready": ready,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="runs per daemon (default 40)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate the two daemons this many times; best of each",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="measure Ray on this existing cluster ('auto', HOST:PORT)",
    )
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.runs < 3:
        raise SystemExit("--runs must be at least 3")
    work = Path(tempfile.mkdtemp(prefix="mosray-bench-"))
    results: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    try:
        for round_ in range(args.rounds):
            # Alternate which goes first, so a drift in the machine's load favours neither.
            for executor in ("local", "ray") if round_ % 2 == 0 else ("ray", "local"):
                results[executor].append(measure(executor, args.runs, work, args.ray_address))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: min(rounds, key=lambda r: r["wall"]) for name, rounds in results.items()}
    print(
        f"{args.runs} one-epoch runs of dataset_OR | mlp_funnel(2,3), one CPU slot, "
        f"best of {args.rounds} round(s)"
    )
    print(
        f"{'executor':<10}{'ready s':>9}{'wall/run ms':>13}{'train ms':>10}"
        f"{'overhead ms':>13}{'median ms':>11}"
    )
    for name, row in best.items():
        print(
            f"{name:<10}{row['ready']:>9.1f}{1000 * row['wall']:>13.1f}"
            f"{1000 * row['train']:>10.1f}{1000 * row['overhead']:>13.1f}"
            f"{1000 * row['overhead_median']:>11.1f}"
        )
    ratio_wall = best["ray"]["wall"] / best["local"]["wall"]
    ratio_overhead = best["ray"]["overhead"] / best["local"]["overhead"]
    print(f"ray / local: wall per run x{ratio_wall:.2f}, overhead per run x{ratio_overhead:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "runs": args.runs,
                    "rounds": results,
                    "best": best,
                    "ratio_wall": ratio_wall,
                    "ratio_overhead": ratio_overhead,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
