"""`mosaic compare` (and `mosaic groups`) on a synthetic 10,000-run study: target < 2 s.

The study is written with the daemon's own Store (schema and migrations included, so the
run_groups view is there): FAMILIES model keys x SIZES sizes x REPS seeds on one dataset key,
every run done with results drawn from a known curve plus noise. We time the whole command as a
user runs it (a fresh process: Python start, imports, reading the database, 10,000 bootstrap
resamples per comparison, tests, Holm, power advice, output), median of --repeat runs.

    python benchmarks/compare.py [--families 5 --sizes 200 --reps 10 --repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mosaicd.scheduling.submissions import run_params  # noqa: E402
from mosaicd.storage.store import Store  # noqa: E402


def build_study(path: str, families: int, sizes: int, reps: int) -> int:
    import numpy as np

    rng = np.random.default_rng(0)
    process = {
        "lr": 0.01,
        "epochs": 5,
        "data_scheme": "dataset",
        "pipeline_scheme": "mlp",
        "loss_function": "BCELoss",
        "run_files_path": "/tmp/none",
    }
    runs, results = [], []
    for f in range(families):
        for s in range(sizes):
            width = 10 + 3 * s + f  # nb_params close across families: sizes match
            for seed in range(reps):
                modules = [
                    {
                        "type": "dataset",
                        "class": "D",
                        "path_to_class": "/d.py",
                        "data_size": 200,
                        "key": "data",
                    },
                    {
                        "type": "mlp",
                        "class": f"fam{f}",
                        "path_to_class": "/m.py",
                        "width": width,
                        "key": f"fam{f}",
                    },
                ]
                runs.append(
                    (
                        modules,
                        seed,
                        f"D | fam{f}({width})",
                        run_params(process, modules, seed, 0, "bench"),
                    )
                )
                loss = 1 / np.log(width) + 0.01 * f + rng.normal(0, 0.05)
                results.append((width * 10, float(loss)))
    store = Store(path)
    _, ids = store.add_submission(0, "bench", "/bench.ini", process, {}, runs)
    with store.transaction() as conn:
        conn.execute("UPDATE runs SET status='done'")
        conn.executemany(
            "INSERT INTO run_results (run_id, nb_params, test_loss, train_loss) "
            "VALUES (?, ?, ?, ?)",
            [(i, nb, loss, loss * 0.9) for i, (nb, loss) in zip(ids, results)],
        )
    store.close()
    return len(ids)


def timed(args: list[str], repeat: int) -> tuple[float, float, str]:
    """Median wall time and CPU time (user + system) of the command, and its output. On a
    shared machine the CPU time says what the command costs; the wall time adds the waiting."""
    walls, cpus, out = [], [], ""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        out = result.stdout
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2], out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", type=int, default=5)
    parser.add_argument("--sizes", type=int, default=200)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mosbench-") as root:
        db = os.path.join(root, "study.db")
        n = build_study(db, args.families, args.sizes, args.reps)
        compare_s, compare_cpu, out = timed(["compare", db, "--json"], args.repeat)
        report = json.loads(out)
        groups_s, groups_cpu, _ = timed(["groups", db, "--json"], args.repeat)
        bare_s, bare_cpu, _ = timed(["--help"], args.repeat)
        lines = len(report["lines"])
        print(
            f"study: {n} runs ({args.families} families x {args.sizes} sizes x {args.reps} "
            f"seeds); compare: {lines} comparisons ({report['decided']} decided), "
            f"{report['n_resamples']} bootstrap resamples each; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(
            f"mosaic compare --json: {compare_s:.2f} s wall, {compare_cpu:.2f} s CPU (target "
            f"< 2 s: {'met' if compare_s < 2 else 'NOT met'})"
        )
        print(f"mosaic groups --json: {groups_s:.2f} s wall, {groups_cpu:.2f} s CPU")
        print(f"mosaic --help (start-up alone): {bare_s:.2f} s wall, {bare_cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
