"""Mosaic's benchmarks in one run: a table of ratios and figures, each with its target.

    .venv/bin/python benchmarks/run.py            # a few minutes on a 2-core machine
    .venv/bin/python benchmarks/run.py --quick    # smaller sizes, for a smoke test

Ratios are measured side by side in this one run, so the machine's speed cancels out; absolute
times on a shared machine are noisy and only indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import daemon_startup  # noqa: E402
import dispatch  # noqa: E402
import status_latency  # noqa: E402
import training_loop  # noqa: E402
import writes  # noqa: E402

Row = tuple[str, str, str, bool | None]


def rows(quick: bool) -> list[Row]:
    out: list[Row] = []
    n = 100 if quick else 500
    d = dispatch.measure(n, 2, 6 if quick else 20)
    out.append(
        (
            f"dispatch: {n} one-epoch runs, mosaic / ideal",
            f"{d['mosaic_vs_ideal']:.2f}x ({d['mosaic_s']:.1f} s / {d['ideal_s']:.1f} s)",
            "<= 1.3x",
            d["mosaic_vs_ideal"] <= 1.3,
        )
    )
    out.append(
        (
            "dispatch: fresh process per run / mosaic",
            f"{d['fresh_vs_mosaic']:.1f}x ({d['fresh_overhead_ms_per_run']:.0f} vs "
            f"{d['mosaic_overhead_ms_per_run']:.0f} ms overhead per run)",
            "> 1",
            None,
        )
    )
    import torch

    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        m, h = training_loop.measure(10 if quick else 50, 200, "cpu", 2 if quick else 3)
    out.append(
        (
            "training loop: mosaic / hand-written (cpu, 1 thread)",
            f"{m / h:.3f}x ({m:.2f} s / {h:.2f} s)",
            "<= 1.05x",
            m / h <= 1.05,
        )
    )
    for size in (10_000,) if quick else (10_000, 100_000):
        s = status_latency.measure(size)
        out.append(
            (
                f"status round trip, {size:,} runs",
                f"{s['rtt_p50_ms']:.2f} ms p50, {s['rtt_p99_ms']:.2f} ms p99",
                "< 20 ms",
                s["rtt_p50_ms"] < 20,
            )
        )
        out.append(
            (
                f"`mosaic status` process, {size:,} runs",
                f"{s['process_ms']:.0f} ms (bare python: {s['python_startup_ms']:.0f} ms)",
                "< 150 ms",
                s["process_ms"] < 150,
            )
        )
    w = writes.through_daemon(300 if quick else 1500)
    out.append(
        (
            "writes: epoch events stored while serving status",
            f"{w['events_per_s']:.0f}/s ({w['status_polls']} status polls meanwhile)",
            "(figure)",
            None,
        )
    )
    wi = writes.in_process()
    out.append(
        (
            "writes: batched transactions / one per event (store)",
            f"{wi['batching_gain']:.1f}x ({wi['batched_per_s']:.0f}/s)",
            "(figure)",
            None,
        )
    )
    ds = daemon_startup.measure(3 if quick else 5)
    out.append(("daemon: start to ready", f"{ds['ready_ms']:.0f} ms", "(figure)", None))
    out.append(
        (
            "daemon: idle RSS of the main process",
            f"{ds['idle_rss_mib']:.0f} MiB, torch loaded: {ds['main_process_imports_torch']}",
            "no torch",
            not ds["main_process_imports_torch"],
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    table = rows(args.quick)
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}, "
        f"python {platform.python_version()}"
    )
    width = max(len(r[0]) for r in table)
    print(f"{'benchmark':<{width}}  {'measured':<48}  {'target':<9}  met")
    for name, value, target, met in table:
        verdict = "-" if met is None else ("yes" if met else "NO")
        print(f"{name:<{width}}  {value:<48}  {target:<9}  {verdict}")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
