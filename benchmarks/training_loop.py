"""Training loop: Mosaic's execution of one run against a hand-written PyTorch loop.

Same model, same data, same optimizer, same per-epoch metrics (mean loss over batches, accuracy
over samples, test pass under no_grad); both in this process, alternated, best of --repeat.

    python benchmarks/training_loop.py [--epochs 50] [--batches 200] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_classes import small_mlp, synthetic_data  # noqa: E402
from common import or_process  # noqa: E402

from mosaicd.training import execution  # noqa: E402


def hand_written(epochs: int, batches: int, device: str, batch_size: int) -> float:
    torch.manual_seed(0)
    data = synthetic_data(n_batches=batches, batch_size=batch_size)
    train, test = data.prepare(None, {}, {})
    model = small_mlp(32, 1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    crit = torch.nn.BCELoss()
    dev = torch.device(device)
    started = time.perf_counter()
    for _ in range(epochs):
        for loader, training in ((train, True), (test, False)):
            model.train(training)
            total = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
            n = 0
            with torch.set_grad_enabled(training):
                for x, y in loader:
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    out = model(x, {}, {})
                    loss = crit(out, y)
                    if training:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    total += loss.detach()
                    correct += ((out.detach() > 0.5) == (y > 0.5)).all(dim=1).sum()
                    n += 1
            _ = total.item() / n, correct.item()
    return time.perf_counter() - started


def mosaic(epochs: int, batches: int, device: str, files: str, batch_size: int) -> float:
    spec: dict[str, Any] = {
        "run_id": 1,
        "seed": 0,
        "device": device,
        "run_files_path": files,
        "epochs_target": epochs,
        "start_epoch": 0,
        "checkpoint_every": 30.0,
        "max_log_mb": 50.0,
        "umask": None,
        "process": or_process(),
        "modules": [
            {
                "type": "data",
                "class": "synthetic_data",
                "path_to_class": os.path.join(HERE, "bench_classes.py"),
                "n_batches": batches,
                "batch_size": batch_size,
                "key": "data",
                "name": "data",
            },
            {
                "type": "model",
                "class": "small_mlp",
                "path_to_class": os.path.join(HERE, "bench_classes.py"),
                "key": "mlp",
                "name": "mlp",
            },
        ],
    }
    durations: list[float] = []
    channel = execution.Channel(
        on_epoch=lambda e: durations.append(e["duration"]), park_requested=lambda: False
    )
    execution.execute(spec, channel)
    return sum(durations)


def measure(
    epochs: int, batches: int, device: str, repeat: int, batch_size: int = 64
) -> tuple[float, float]:
    best_hand, best_mosaic = float("inf"), float("inf")
    with tempfile.TemporaryDirectory() as files:
        for _ in range(repeat):
            best_hand = min(best_hand, hand_written(epochs, batches, device, batch_size))
            best_mosaic = min(best_mosaic, mosaic(epochs, batches, device, files, batch_size))
    return best_mosaic, best_hand


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, as a worker of a one-slot-per-core pool has",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m, h = measure(args.epochs, args.batches, args.device, args.repeat, args.batch_size)
    print(
        f"training loop on {args.device} (batch {args.batch_size}): mosaic {m:.3f} s, "
        f"hand-written {h:.3f} s, "
        f"ratio {m / h:.3f} (target <= 1.05)"
    )


if __name__ == "__main__":
    main()
