"""The data-stage cache: a study whose data stage costs about a second, with and without it.

The study: 4 model families (small MLPs of widths 8, 16, 24 and 32) × 4 seeds, one epoch each,
all on the same data section: a stage that sleeps `--delay` seconds (standing for reading and
decoding a real dataset) and then draws a small synthetic set from the run's seed. Every
family's run of seed i prepares the same data, so a cache prepares each seed once instead of
once per family.

Each configuration is submitted to a real mosaicd, timed from ``mosaic run`` to every run done,
with ``[MONITOR] data_cache_mb = 0`` (no cache) and with the cache, alternated, best of
--repeat (each cached study starts from empty caches: a new data section seed); the hit ratio
comes from the runs' logs (a hit writes "[mosaic] data stages from the data cache"). The
configurations:

- 1 worker, memory cache, ``ensemble = auto`` (the defaults): each family's 4 seeds train as
  one group; the first family prepares, the others hit.
- 2 workers, memory cache, ``ensemble = off``: each worker holds the seeds it prepared; a run
  whose seed the other worker prepared misses (no scheduler affinity yet).
- 2 workers, the stage kept on disk too (``cache_on_disk = True``, ``[MONITOR] cache_dir``):
  the workers share the entries.

    python benchmarks/data_cache.py [--delay 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import math
import os
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import BenchDaemon  # noqa: E402

CLASSES = os.path.join(HERE, "bench_classes.py")
HIT_LINE = "[mosaic] data stages from the data cache"
_studies = itertools.count()

CONFIG = """
[PROCESS]
lr = 0.01
epochs = 1
data_scheme = data
pipeline_scheme = model
loss_function = BCELoss
accuracy = binary
run_files_path = {root}/runs
seed = {seed}

[MONITOR]
need_gpu = false
gpu_available = None
nb_processus = {workers}
multiplicity = {seeds}
ensemble = {ensemble}
data_cache_mb = {cache_mb}
cache_dir = {cache_dir}

[data]
type = data
class = {data_class}
path_to_class = {classes}
delay = {delay}
key = d

[model]
type = model
class = small_mlp
path_to_class = {classes}
width = {widths}
key = m
"""


def time_study(
    daemon: BenchDaemon,
    *,
    workers: int,
    ensemble: str,
    cached: bool,
    on_disk: bool,
    delay: float,
    families: int,
    seeds: int,
) -> tuple[float, int, int]:
    """Seconds from `mosaic run` to every run done, and the runs' data cache hits and runs."""
    root = tempfile.mkdtemp(prefix="cache-", dir=daemon.root)
    widths = ", ".join(str(8 * (i + 1)) for i in range(families))
    cfg = os.path.join(root, "study.ini")
    with open(cfg, "w") as fh:
        fh.write(
            CONFIG.format(
                root=root,
                workers=workers,
                seeds=seeds,
                ensemble=ensemble,
                cache_mb=64 if cached else 0,
                cache_dir=os.path.join(root, "cache") if on_disk and cached else "None",
                data_class="slow_data_on_disk" if on_disk else "slow_data",
                classes=CLASSES,
                delay=delay,
                widths=widths,
                # A new seed per study: no study finds entries an earlier one left.
                seed=next(_studies) * 100,
            )
        )
    runs = families * seeds
    db = os.path.join(root, "s.db")
    started = time.perf_counter()
    daemon.cli("run", cfg, db)
    while True:
        counts = daemon.request("status", db=db, limit=0)["studies"][0]["counts"]
        if counts.get("done", 0) + counts.get("failed", 0) == runs:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    if counts.get("failed"):
        raise RuntimeError(f"{counts['failed']} run(s) failed")
    hits = 0
    for log in glob.glob(os.path.join(root, "runs", "*.log")):
        with open(log, errors="replace") as fh:
            hits += fh.read().count(HIT_LINE)
    return elapsed, hits, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=1.0, help="seconds the data stage costs")
    parser.add_argument("--quick", action="store_true", help="a 0.2 s data stage, 1 repeat")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many, alternated")
    args = parser.parse_args(argv)
    delay = 0.2 if args.quick else args.delay
    families, seeds = 4, 4
    configurations: list[tuple[str, dict[str, Any]]] = [
        ("1 worker, memory, ensemble auto", {"workers": 1, "ensemble": "auto", "on_disk": False}),
        ("2 workers, memory, ensemble off", {"workers": 2, "ensemble": "off", "on_disk": False}),
        (
            "2 workers, memory + disk, ensemble off",
            {"workers": 2, "ensemble": "off", "on_disk": True},
        ),
    ]
    print(f"data stage of {delay:g} s, {families} families x {seeds} seeds, 1 epoch of a tiny MLP")
    print(f"{'configuration':<40} {'no cache (s)':>12} {'cache (s)':>10} {'ratio':>7} {'hits':>10}")
    for name, settings in configurations:
        daemon = BenchDaemon(workers=settings["workers"]).start()
        try:
            # The workers' first run (torch's first use) is outside the timings.
            time_study(daemon, **settings, cached=False, delay=0.0, families=1, seeds=1)
            plain = cached = math.inf
            for _ in range(1 if args.quick else args.repeat):
                took, _, runs = time_study(
                    daemon, **settings, cached=False, delay=delay, families=families, seeds=seeds
                )
                plain = min(plain, took)
                took, hits, _ = time_study(
                    daemon, **settings, cached=True, delay=delay, families=families, seeds=seeds
                )
                cached = min(cached, took)
        finally:
            daemon.stop()
        print(
            f"{name:<40} {plain:>12.2f} {cached:>10.2f} {plain / cached:>6.1f}x "
            f"{hits:>3}/{runs} {hits / runs:>4.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
