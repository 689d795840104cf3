"""The daemon's options (`mosaicd`'s command line), read by every part that needs one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mosaicd.scheduling.fair_share import DEFAULT_HALF_LIFE_S, Limits


@dataclass
class Options:
    socket: str
    state_dir: str
    workers: int | None
    gpus: list[str] | None = field(default_factory=list)
    runs_per_gpu: int = 1
    max_runs_per_worker: int = 0
    isolation: str = "state"  # "state", "none" or "process": see mosaicd/training/worker.py
    worker_python: str | None = None  # the workers' interpreter; None: the daemon's own
    checkpoint_every: float = 30.0
    stop_timeout: float = 60.0
    admin_gid: int | None = None
    socket_group: int | None = None
    # One of mosaicd.executors.choice.EXECUTORS, made by mosaicd.executors.choice.make_executor.
    # With "ray", workers/gpus None mean "as many as the Ray cluster has".
    executor: str = "local"
    ray_address: str | None = None
    ray_runtime_env: dict[str, Any] | None = None
    worker_bind: str | None = None  # e.g. tcp://0.0.0.0:5560; default: a private ipc socket
    worker_advertise: str | None = None  # what workers connect to, if not the bound address
    # Fair share on a shared daemon (mosaicd.scheduling.fair_share): uid -> weight (default 1).
    shares: dict[int, float] = field(default_factory=dict)
    fair_share_half_life: float = DEFAULT_HALF_LIFE_S
    limits: Limits = field(default_factory=Limits)
    # Preemption at epoch boundaries (mosaicd.scheduling.preemption): seconds a user below
    # their share waits for a slot before an over-share user's run parks for them; 0: off.
    preempt_after: float = 0.0
