"""What measuring a run's resources costs, and how stable its timings are (issue 26).

Runs the tutorial's pipelines (examples/or_mlp: dataset_OR of 200 samples, the 8 MLP variants,
10 epochs, lr 0.01) in this process, one torch thread, as a worker of a one-slot-per-core pool:

1. overhead: each run's wall and CPU time, and the time spent inside the measuring code (the
   per-epoch PassMeter and the FLOPs/latency/throughput after the last epoch) timed around it; the
   same runs with the measuring replaced by nothing, alternated, medians compared;
2. stability: every pipeline measured twice (a fresh build each time); the relative difference
   of its latency, throughput and peak memory between the two, and of its FLOPs (must be 0);
   for the tutorial's runs and for the longer runs of the resources example (MLP and CNN).

    python benchmarks/resources.py [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import REPO  # noqa: E402

from mosaic_client import schema  # noqa: E402
from mosaicd.training import execution, resources  # noqa: E402

EXAMPLE = REPO / "examples" / "or_mlp"
BARS = REPO / "examples" / "resources"
# The resources example's pipelines: runs of a second or so, with a longer timing budget.
BAR_VARIANTS = [("mlp", 32), ("mlp", 512), ("cnn", 4), ("cnn", 16)]
VARIANTS = [("mlp_funnel", length, width) for length in (2, 3) for width in (3, 4)] + [
    ("mlp_brick", length, width) for length in (2, 3) for width in (2, 4)
]


def _process(loss: str, epochs: int, accuracy: str | None = None) -> Any:
    return schema.process_settings(
        {
            "data_scheme": ["dataset"],
            "pipeline_scheme": ["model"],
            "lr": 0.01,
            "epochs": epochs,
            "optimizer": "Adam",
            "loss_function": loss,
            **({"accuracy": accuracy} if accuracy else {}),
        }
    )


def _module(kind: str, cls: str, path: Path, **params: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "class": cls,
        "path_to_class": str(path),
        **params,
        "key": cls,
        "name": cls,
    }


def spec(files: str, variant: tuple[Any, ...], run_id: int) -> dict[str, Any]:
    """A run of the tutorial (cls, length, width), or of the resources example (cls, width)."""
    if len(variant) == 3:
        cls, length, width = variant
        process, epochs = _process("BCELoss", 10), 10
        modules = [
            _module("dataset", "dataset_OR", EXAMPLE / "dataset.py", data_size=200,
                    train_prop=0.8, batch_size=20),
            _module("model", cls, EXAMPLE / "mlp.py", length=length, width=width),
        ]  # fmt: skip
    else:
        cls, width = variant
        process, epochs = _process("CrossEntropyLoss", 15, "argmax"), 15
        size = {"hidden": width} if cls == "mlp" else {"channels": width}
        modules = [
            _module("dataset", "bars", BARS / "data.py", data_size=600, noise=0.3,
                    train_prop=0.75, batch_size=30),
            _module("model", cls, BARS / "models.py", **size),
        ]  # fmt: skip
    return {
        "run_id": run_id,
        "seed": run_id,
        "device": "cpu",
        "run_files_path": files,
        "epochs_target": epochs,
        "start_epoch": 0,
        "checkpoint_every": 30.0,
        "max_log_mb": 50.0,
        "umask": None,
        "process": process,
        "modules": modules,
    }


class Spent:
    """Seconds spent inside the measuring code, accumulated by wrapping it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu = 0.0  # the process CPU time of the same: less disturbed by a busy machine
        self.enter = resources.PassMeter.__enter__
        self.exit = resources.PassMeter.__exit__
        self.inference = execution.measure_inference

    def install(self) -> None:
        spent = self

        def enter(meter: Any) -> Any:
            started, cpu = time.perf_counter(), time.process_time()
            try:
                return spent.enter(meter)
            finally:
                spent.add(started, cpu)

        def exit_(meter: Any, *exc: object) -> None:
            started, cpu = time.perf_counter(), time.process_time()
            try:
                spent.exit(meter, *exc)
            finally:
                spent.add(started, cpu)

        def inference(run: Any, history: Any) -> dict[str, Any]:
            started, cpu = time.perf_counter(), time.process_time()
            try:
                return spent.inference(run, history)
            finally:
                spent.add(started, cpu)

        resources.PassMeter.__enter__ = enter  # type: ignore[method-assign]
        resources.PassMeter.__exit__ = exit_  # type: ignore[method-assign]
        execution.measure_inference = inference

    def add(self, started: float, cpu: float) -> None:
        self.seconds += time.perf_counter() - started
        self.cpu += time.process_time() - cpu

    def off(self) -> None:
        """Measure nothing: the meter's methods do nothing, nothing after the last epoch."""
        resources.PassMeter.__enter__ = lambda meter: meter  # type: ignore[method-assign]
        resources.PassMeter.__exit__ = lambda meter, *exc: None  # type: ignore[method-assign]
        execution.measure_inference = lambda run, history: {}

    def restore(self) -> None:
        resources.PassMeter.__enter__ = self.enter  # type: ignore[method-assign]
        resources.PassMeter.__exit__ = self.exit  # type: ignore[method-assign]
        execution.measure_inference = self.inference


def one(files: str, variant: tuple[Any, ...], run_id: int) -> tuple[float, dict[str, Any]]:
    wall, _, results = timed(files, variant, run_id)
    return wall, results


def timed(files: str, variant: tuple[Any, ...], run_id: int) -> tuple[float, float, dict[str, Any]]:
    """One run: its wall and process CPU time, and its results."""
    channel = execution.Channel(on_epoch=lambda e: None, park_requested=lambda: False)
    started, cpu = time.perf_counter(), time.process_time()
    result = execution.execute(spec(files, variant, run_id), channel)
    return time.perf_counter() - started, time.process_time() - cpu, result["results"]


def overhead(files: str, repeat: int) -> None:
    spent = Spent()
    on: list[float] = []
    off: list[float] = []
    shares: list[float] = []
    cpu_shares: list[float] = []
    for r in range(repeat):
        for i, variant in enumerate(VARIANTS):
            spent.seconds = spent.cpu = 0.0
            spent.install()
            wall, cpu, _ = timed(files, variant, 100 * r + i + 1)
            shares.append(spent.seconds / wall)
            cpu_shares.append(spent.cpu / cpu)
            on.append(wall)
            spent.off()
            # Another seed: the worker's data cache must not spare this run its data stage.
            wall, _ = one(files, variant, 100 * r + i + 51)
            off.append(wall)
            spent.restore()
    print(
        f"overhead on the tutorial example ({len(on)} runs of 10 epochs): measuring code "
        f"{statistics.median(shares):.2%} of a run's wall time (median; max {max(shares):.2%}), "
        f"{statistics.median(cpu_shares):.2%} of its CPU time; "
        f"run {statistics.median(on) * 1000:.1f} ms with, {statistics.median(off) * 1000:.1f} ms "
        f"without (median), ratio {statistics.median(on) / statistics.median(off):.3f} "
        "(target: measuring <= 2 %)"
    )


def stability(files: str, variants: list[tuple[Any, ...]], title: str) -> None:
    print(f"stability, {title}: the same pipeline measured twice (relative difference)")
    print("  variant              latency ms     throughput/s        peak MiB      FLOPs")
    worst = 0.0
    for i, variant in enumerate(variants):
        _, first = one(files, variant, 500 + i)
        _, second = one(files, variant, 500 + i)

        def diff(column: str, first: dict = first, second: dict = second) -> float:
            a, b = first[column], second[column]
            return abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) > 0 else 0.0

        worst = max(worst, diff("latency_ms"))
        print(
            f"  {variant[0]}{tuple(variant[1:])}".ljust(23)
            + f"{first['latency_ms']:.4f}/{second['latency_ms']:.4f} {diff('latency_ms'):5.1%}  "
            f"{first['throughput_per_s']:9.0f} {diff('throughput_per_s'):5.1%}  "
            f"{first['peak_memory_mb']:6.3f} {diff('peak_memory_mb'):6.1%}  "
            f"{first['flops_per_sample']:.0f} {diff('flops_per_sample'):.0%}"
        )
    load = resources.machine_load()
    print(
        f"  largest latency difference {worst:.1%} (target <= 10 % on an idle machine); "
        f"load {load['load_1m']:.2f} on {load['cpus']} CPUs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as files:
        # As a worker does at start (execution.warm_up), then one run: first-use costs.
        execution.warm_up()
        one(files, VARIANTS[0], 999)
        overhead(files, args.repeat)
        stability(files, VARIANTS, "tutorial example (runs of ~0.1 s)")
        stability(files, BAR_VARIANTS, "resources example (runs of ~1 s)")


if __name__ == "__main__":
    main()
