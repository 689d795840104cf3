"""The ideal of the dispatch benchmark: N trainings in a plain loop in one warm process.

python plain_loop.py RUN_FILES FIRST_RUN_ID N   (prints "start T" and "span S")
"""

import contextlib
import io
import sys
import time

import torch
from dispatch import spec

from mosaicd.training import execution

torch.set_num_threads(1)
root, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
channel = execution.Channel(on_epoch=lambda e: None, park_requested=lambda: False)
with contextlib.redirect_stdout(io.StringIO()):
    execution.execute(spec(root, 0), channel)  # warm-up: torch's first-use costs
    started = time.time()
    for run_id in range(first, first + n):
        execution.execute(spec(root, run_id), channel)
    span = time.time() - started
print(f"start {started}\nspan {span}")
