"""Which executor runs the workers: the local pool or Ray (`mosaicd --executor`)."""

from __future__ import annotations

from typing import Any

import zmq

from mosaicd.executors.base import Executor, make_slots
from mosaicd.options import Options

EXECUTORS = ("local", "ray")  # mosaicd --executor


def make_executor(ctx: zmq.Context[Any], address: str, options: Options) -> Executor:
    """The executor the daemon's options name (mosaicd --executor)."""
    if options.executor == "ray":
        from mosaicd.executors.ray_cluster import RayPool  # imports ray: only for --executor ray

        return RayPool(ctx, address, options)
    from mosaicd.executors.local import Pool

    return Pool(
        ctx,
        address,
        make_slots(options.workers or 0, options.gpus or [], options.runs_per_gpu),
        options.max_runs_per_worker,
        isolation=options.isolation,
        worker_python=options.worker_python,
    )
