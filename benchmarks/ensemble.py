"""Ensembles: the repetitions of one pipeline trained as one vmapped model, against a loop.

Part 1, the study: a tiny MLP (2-16-16-1, 80 batches of 50 per epoch, Adam, BCELoss, each seed
its own data) repeated M times (M = 8, 16, 32): ``ensemble.execute_group`` on the M specs
against ``execution.execute`` on each spec in turn — the engine alone, in this process, one
thread, both ways alternated, best of --repeat; the ratio is the loop's wall time over the
group's.

Part 2, the crossover: the same study at M = 16 for widths 16 to 512 (three layers of that
width): where the ensemble stops paying.

Part 3, through the daemon: studies submitted to a real mosaicd (2 workers) with
``[MONITOR] ensemble = auto`` and ``off``, timed from ``mosaic run`` to every run done, all
alternated, best of --repeat; the ratio is off's time over auto's. Everything a user waits for
is in it: dispatch, run states, epoch rows, results, run files. The studies: the one pipeline
above repeated M = 16 times, with nb_processus = 1 and 2 (auto: one group of 16 on one worker
either way), and two pipelines (widths 16 and 32) each repeated M times with nb_processus = 2
(auto: a group of 16 per worker; off: 32 runs over the two workers), the usual shape of a
study: many small models, each repeated over seeds. One more row trains the one-pipeline
study on two workers with ensemble_max = 8 (auto: two groups of 8, one per worker), against
the same off: whether splitting a lone pipeline's repetitions over the workers pays.

    python benchmarks/ensemble.py [--epochs 2] [--repeat 2] [--quick] [--device cpu|cuda]
    python benchmarks/ensemble.py --daemon-only [--members 16] [--epochs 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import or_process  # noqa: E402

from mosaicd.training import ensemble, execution  # noqa: E402

CLASSES = os.path.join(HERE, "bench_classes.py")


def specs(m: int, width: int, epochs: int, files: str, device: str) -> list[dict[str, Any]]:
    return [
        {
            "run_id": 1 + i,
            "seed": i,
            "device": device,
            "run_files_path": files,
            "epochs_target": epochs,
            "start_epoch": 0,
            "checkpoint_every": 1e9,
            "max_log_mb": 50.0,
            "umask": None,
            "process": or_process(),
            "modules": [
                {
                    "type": "data",
                    "class": "synthetic_data",
                    "path_to_class": CLASSES,
                    "n_batches": 80,
                    "batch_size": 50,
                    "n_features": 2,
                    "key": "d",
                    "name": "data",
                },
                {
                    "type": "model",
                    "class": "small_mlp",
                    "path_to_class": CLASSES,
                    "width": width,
                    "key": "m",
                    "name": "model",
                },
            ],
        }
        for i in range(m)
    ]


def _channel() -> ensemble.MemberChannel:
    return ensemble.MemberChannel(on_epoch=lambda event: None, park_requested=lambda: False)


def _clean(files: str) -> None:
    shutil.rmtree(files, ignore_errors=True)
    while execution.loaded_user_modules:
        sys.modules.pop(execution.loaded_user_modules.pop(), None)


def time_loop(group: list[dict[str, Any]], files: str) -> float:
    _clean(files)
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        for spec in group:  # execution prints each epoch, as into a run's log
            execution.execute(spec, _channel())
    return time.perf_counter() - started


def time_group(group: list[dict[str, Any]], files: str) -> float:
    _clean(files)
    started = time.perf_counter()
    # No size limit: the curve measures the engine itself, where `auto` would not group.
    outcomes = ensemble.execute_group(
        group, {int(s["run_id"]): _channel() for s in group}, max_params=None
    )
    elapsed = time.perf_counter() - started
    assert all(o[0] == "done" for o in outcomes.values()), outcomes
    return elapsed


def compare(m: int, width: int, epochs: int, repeat: int, device: str) -> tuple[float, float]:
    files = tempfile.mkdtemp(prefix="mosens-")
    group = specs(m, width, epochs, files, device)
    loop = best = float("inf")
    try:
        for _ in range(repeat):
            loop = min(loop, time_loop(group, files))
            best = min(best, time_group(group, files))
    finally:
        _clean(files)
    return loop, best


DAEMON_CONFIG = """
[PROCESS]
lr = 0.001
epochs = {epochs}
data_scheme = data
pipeline_scheme = model
loss_function = BCELoss
accuracy = binary
run_files_path = {root}/runs
seed = 0

[MONITOR]
need_gpu = false
gpu_available = None
nb_processus = {nb_processus}
multiplicity = {members}
ensemble = {mode}
ensemble_max = {ensemble_max}

[data]
type = data
class = synthetic_data
path_to_class = {classes}
n_batches = 80
batch_size = 50
n_features = 2
key = d

[model]
type = model
class = small_mlp
path_to_class = {classes}
width = {widths}
key = m
"""

# Part 3's studies: (widths of the pipelines, nb_processus, ensemble_max).
DAEMON_STUDIES = (((16,), 1, 16), ((16,), 2, 16), ((16,), 2, 8), ((16, 32), 2, 16))


def time_through_daemon(
    daemon: Any,
    mode: str,
    members: int,
    epochs: int,
    nb_processus: int = 2,
    widths: tuple[int, ...] = (16,),
    ensemble_max: int = 16,
) -> float:
    """Seconds from `mosaic run` to every run of a fresh study done: one pipeline per width,
    each repeated `members` times."""
    root = tempfile.mkdtemp(prefix=f"ens-{mode}-", dir=daemon.root)
    cfg = os.path.join(root, "study.ini")
    with open(cfg, "w") as fh:
        fh.write(
            DAEMON_CONFIG.format(
                epochs=epochs,
                root=root,
                members=members,
                mode=mode,
                classes=CLASSES,
                nb_processus=nb_processus,
                widths=", ".join(str(w) for w in widths),
                ensemble_max=ensemble_max,
            )
        )
    runs = members * len(widths)
    db = os.path.join(root, "s.db")
    started = time.perf_counter()
    daemon.cli("run", cfg, db)
    while True:
        counts = daemon.request("status", db=db, limit=0)["studies"][0]["counts"]
        if counts.get("done", 0) + counts.get("failed", 0) == runs:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    if counts.get("failed"):
        raise RuntimeError(f"{counts['failed']} run(s) failed in the {mode} study")
    return elapsed


def through_daemon(members: int, epochs: int, repeat: int) -> None:
    from common import BenchDaemon

    daemon = BenchDaemon(workers=2).start()
    try:
        time_through_daemon(daemon, "auto", 4, 1)  # the workers' first vmap and first runs
        time_through_daemon(daemon, "off", 2, 1)
        # `off` does not depend on ensemble_max: one off study per (widths, nb_processus).
        offs = sorted({(widths, n) for widths, n, _ in DAEMON_STUDIES}, key=str)
        best_off = {study: math.inf for study in offs}
        best_auto = {study: math.inf for study in DAEMON_STUDIES}
        for _ in range(repeat):
            for widths, n in offs:  # each off study next to its auto ones: the same load
                took = time_through_daemon(daemon, "off", members, epochs, n, widths)
                best_off[widths, n] = min(best_off[widths, n], took)
                for study in DAEMON_STUDIES:
                    if study[:2] == (widths, n):
                        most = study[2]
                        took = time_through_daemon(daemon, "auto", members, epochs, n, widths, most)
                        best_auto[study] = min(best_auto[study], took)
    finally:
        daemon.stop()
    print(
        f"\nthrough the daemon: tiny MLPs 2-w-w-1, M = {members} repetitions of each pipeline, "
        f"{epochs} epochs of 80 batches of 50, 2 workers, best of {repeat}"
    )
    print(
        f"{'widths':>7} {'runs':>5} {'nb_processus':>12} {'ens._max':>8} {'off (s)':>8} "
        f"{'auto (s)':>9} {'ratio':>7} {'runs/s auto':>12}"
    )
    for widths, n, most in DAEMON_STUDIES:
        off, auto = best_off[widths, n], best_auto[widths, n, most]
        runs = members * len(widths)
        print(
            f"{','.join(map(str, widths)):>7} {runs:>5} {n:>12} {most:>8} {off:>8.3f} "
            f"{auto:>9.3f} {off / auto:>6.1f}x {runs / auto:>12.1f}"
        )
    one = [(w, n, most) for w, n, most in DAEMON_STUDIES if len(w) == 1 and most == 16]
    off = min(best_off[w, n] for w, n, _ in one)
    auto = min(best_auto[study] for study in one)
    print(f"one pipeline, each at its best nb_processus: off / auto {off / auto:.1f}x")
    split = best_auto[(16,), 2, 8]
    whole = best_auto[(16,), 2, 16]
    print(
        f"one pipeline on 2 workers, time of two groups of 8 / one group of 16: "
        f"{split / whole:.2f} (above 1: splitting does not pay)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, one repeat")
    parser.add_argument(
        "--daemon-only", action="store_true", help="only part 3, through a real mosaicd"
    )
    parser.add_argument("--members", type=int, default=16, help="M of part 3")
    args = parser.parse_args(argv)
    if args.daemon_only:
        through_daemon(args.members, args.epochs, 1 if args.quick else args.repeat)
        return
    torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else args.repeat
    execution.warm_up()
    compare(2, 16, 1, 1, args.device)  # first-use costs of vmap and the optimizers
    print(
        f"device {args.device}, {torch.get_num_threads()} thread(s), {args.epochs} epochs of "
        "80 batches of 50, Adam, best of",
        repeat,
    )
    print("\nstudy: tiny MLP 2-16-16-1, M repetitions")
    print(
        f"{'M':>4} {'loop (s)':>10} {'ensemble (s)':>13} {'ratio':>7} {'runs/s loop':>12} "
        f"{'runs/s ens.':>12}"
    )
    for m in (8, 16) if args.quick else (8, 16, 32):
        loop, group = compare(m, 16, args.epochs, repeat, args.device)
        print(
            f"{m:>4} {loop:>10.3f} {group:>13.3f} {loop / group:>6.1f}x {m / loop:>12.1f} "
            f"{m / group:>12.1f}",
            flush=True,
        )
    print("\ncrossover: M = 16, width w (2-w-w-1)")
    print(
        f"{'width':>6} {'params':>8} {'loop (s)':>10} {'ensemble (s)':>13} {'ratio':>7} {'auto':>6}"
    )
    for width in (16, 128, 512) if args.quick else (16, 32, 64, 128, 256, 512):
        loop, group = compare(16, width, args.epochs, repeat, args.device)
        params = 2 * width + width + width * width + width + width + 1
        auto = "group" if params <= ensemble.AUTO_MAX_PARAMS else "alone"
        print(
            f"{width:>6} {params:>8} {loop:>10.3f} {group:>13.3f} {loop / group:>6.1f}x {auto:>6}",
            flush=True,
        )
    through_daemon(args.members, args.epochs, repeat)


if __name__ == "__main__":
    main()
