"""The daemon's start-to-ready time and the idle RSS of its main process (no torch in it).

python benchmarks/daemon_startup.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import psutil
from common import BenchDaemon, median


def measure(repeat: int = 5) -> dict[str, float]:
    ready, rss, torch_loaded = [], [], False
    for _ in range(repeat):
        daemon = BenchDaemon(workers=2).start()
        try:
            ready.append(daemon.ready_after)
            time.sleep(3.0)  # let the workers import torch: they must not weigh on the daemon
            assert daemon.proc is not None
            process = psutil.Process(daemon.proc.pid)
            rss.append(process.memory_info().rss / 2**20)
            torch_loaded |= any("libtorch" in m.path for m in process.memory_maps())
        finally:
            daemon.stop()
    return {
        "ready_ms": 1000 * median(ready),
        "idle_rss_mib": median(rss),
        "main_process_imports_torch": torch_loaded,
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(measure()))
