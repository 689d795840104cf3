"""The executor interface: what the daemon asks of whatever runs its workers.

Two executors implement it: the local pool (mosaicd/executors/local.py, one child process per slot)
and the Ray executor (mosaicd/executors/ray_cluster.py, one Ray actor per slot). The server and the
scheduler see only this interface; :func:`mosaicd.executors.choice.make_executor` picks one from the
daemon's options. Either way a worker is ``mosaicd.training.worker``'s loop connected to the
daemon's private worker socket, so runs, epochs and results travel the same way.
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from mosaic_client import protocol

if TYPE_CHECKING:
    from mosaicd.owners import Owner

# -- slots -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    kind: str  # "cpu" or "cuda"
    index: int  # CPU slot number, or the physical GPU id for CUDA slots
    gpu: str | None = None

    @property
    def label(self) -> str:
        return f"cpu {self.index}" if self.kind == "cpu" else f"cuda:{self.gpu}"

    @property
    def device(self) -> str:
        # The worker sees only its GPU through CUDA_VISIBLE_DEVICES, so it is always cuda:0.
        return "cpu" if self.kind == "cpu" else "cuda:0"


def make_slots(workers: int, gpus: list[str], runs_per_gpu: int) -> list[Slot]:
    slots = [Slot("cpu", i) for i in range(workers)]
    for n, gpu in enumerate(gpus):
        slots.extend(Slot("cuda", n * runs_per_gpu + k, gpu) for k in range(runs_per_gpu))
    return slots


def worker_environment(
    slot: Slot,
    cpu_threads: int | None,
    base: Mapping[str, str] | None = None,
    gpu_set_by_executor: bool = False,
) -> dict[str, str]:
    """The environment a slot's worker starts with: `base` (default: the daemon's own; a Ray
    actor passes {} and keeps its node's) with the slot's settings on top. Both executors use
    this, so a run sees the same variables under either."""
    env = dict(os.environ if base is None else base)
    # CPU workers must not grab a GPU; GPU workers see exactly their own card (Ray sets it
    # itself for the actors that hold a GPU).
    if slot.kind == "cpu" or not gpu_set_by_executor:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu if slot.kind == "cuda" and slot.gpu else ""
    # One slot = its share of the cores: N workers x all-core BLAS would oversubscribe.
    if cpu_threads:
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads))
    env["MOSAIC_WORKER_SLOT"] = slot.label
    return env


# -- a worker's life -------------------------------------------------------------------------

STARTING, IDLE, BUSY, STOPPING = "starting", "idle", "busy", "stopping"
# Allowed changes of a worker's state, as for runs (contract.TRANSITIONS); a worker's end is
# not a state: the executor reaps it and the handle is dropped.
WORKER_TRANSITIONS: dict[str, tuple[str, ...]] = {
    STARTING: (IDLE,),  # it said hello
    IDLE: (BUSY, STOPPING),
    BUSY: (IDLE, STOPPING),  # its run ended; STOPPING: asked to exit (recycled)
    STOPPING: (),
}


@dataclass
class WorkerHandle:
    worker_id: str  # short, for people: "w3"
    slot: Slot
    proc: Any  # subprocess.Popen, or ray_cluster.RayProcess
    # Whose runs it trains, as that user (mosaicd.owners); None: the daemon's own user.
    owner: Owner | None = None
    # Its zmq routing id: the worker id and a secret the worker got in its environment, which
    # other users cannot read, so that no one else's process can pose as it.
    route: str = ""
    state: str = STARTING
    run: tuple[str, int] | None = None  # (study path, run id): its run, or a group's first live one
    # The run ids of the ensemble it trains that have not reported yet (empty: a single run).
    group: set[int] = field(default_factory=set)
    recycle_after_group: bool = False  # a member failed: replace the worker once the group ends
    runs_done: int = 0
    killed_for: str | None = None  # why the daemon killed it, if it did
    # Its data cache figures, from its last run's provenance (mosaicd.training.data_cache).
    data_cache: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.route = self.route or self.worker_id

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def owner_uid(self) -> int | None:
        return None if self.owner is None else self.owner.uid

    def become(self, state: str) -> None:
        """The one place a worker's state changes."""
        if state not in WORKER_TRANSITIONS[self.state]:
            raise RuntimeError(f"worker {self.worker_id}: cannot go from {self.state} to {state}")
        self.state = state


# -- the interface ---------------------------------------------------------------------------


class Executor(ABC):
    """Starts, feeds, measures and ends the daemon's workers, one per slot."""

    slots: list[Slot]
    workers: dict[str, WorkerHandle]  # live workers by routing id (WorkerHandle.route)
    # The owner each slot's next worker starts as, once its worker has exited (hand_over).
    next_owner: dict[Slot, Owner | None]
    max_runs: int  # runs a worker trains before it is replaced (0: no limit)
    # None: the daemon learns of a worker's end by SIGCHLD; else it calls reap() this often
    # (seconds), as for Ray actors, which are not its children.
    reap_every: float | None = None

    @abstractmethod
    def start_all(self) -> None:
        """Start one worker per slot."""

    @abstractmethod
    def spawn(self, slot: Slot, owner: Owner | None = None) -> WorkerHandle:
        """Start a worker on a slot, as `owner` (None: as the daemon's own user)."""

    def hand_over(self, handle: WorkerHandle, owner: Owner | None) -> None:
        """Give an idle worker's slot to `owner`: the worker stops (the caller asks it to
        exit) and its replacement starts as `owner` once it is reaped. A worker never trains
        two users' runs (issue 17)."""
        self.next_owner[handle.slot] = owner
        handle.become(STOPPING)

    def next_owner_uids(self) -> set[int | None]:
        """The users whose workers start once a handed-over slot's worker is reaped."""
        return {None if o is None else o.uid for o in self.next_owner.values()}

    def start_failure(self, uid: int | None) -> str | None:
        """Why a worker could not start as this user lately (None: it could, or never tried)."""
        return None

    @abstractmethod
    def replace(self, handle: WorkerHandle, code: int) -> None:
        """Start a new worker on a dead worker's slot (at once, or after a delay)."""

    @abstractmethod
    def respawn_due(self) -> None:
        """Start the replacements whose delay has passed (called from the daemon's loop)."""

    def send(self, sock: zmq.Socket[Any], handle: WorkerHandle, name: str, **fields: Any) -> None:
        """Send a message (mosaic_client.protocol.DAEMON_TO_WORKER) to a worker."""
        sock.send_multipart([handle.route.encode(), protocol.worker_message(name, **fields)])

    def said_hello(self, handle: WorkerHandle) -> None:
        """A starting worker is ready for runs."""
        if handle.state == STARTING:
            handle.become(IDLE)

    def idle(self, kind: str) -> list[WorkerHandle]:
        """Workers of a slot kind ready for a run."""
        # A worker the daemon has killed may still report its run's end before it is reaped;
        # it must not be handed another run in that window.
        return [
            w
            for w in self.workers.values()
            if w.state == IDLE and w.slot.kind == kind and w.killed_for is None
        ]

    def slot_count(self, kind: str) -> int:
        return sum(1 for s in self.slots if s.kind == kind)

    @abstractmethod
    def kill(self, handle: WorkerHandle, reason: str) -> None:
        """End a worker at once; `reason` becomes its run's failure cause."""

    @abstractmethod
    def reap(self) -> list[tuple[WorkerHandle, int]]:
        """Workers that have ended, with their return codes (negative: a signal)."""

    @abstractmethod
    def resources(self, handle: WorkerHandle) -> dict[str, Any]:
        """A worker's CPU %, memory and GPU memory (None where unknown): WorkerView fields."""

    @abstractmethod
    def check_submission(
        self, process: dict[str, Any], pipelines: list[Any], owner: Owner | None
    ) -> None:
        """Refuse (mosaicd.errors.Refused) a submission this executor cannot run, whose runs
        execute as `owner` (mosaicd.owners; None: the daemon's own user)."""

    @abstractmethod
    def stop_all(self, sock: zmq.Socket[Any], grace: float) -> None:
        """Ask every worker to exit, kill those still there after `grace` seconds."""


def describe_exit(code: int) -> str:
    """A worker's exit status in words (either executor's workers)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            "SIGSEGV": " (segmentation fault in native code)",
            "SIGKILL": " (killed: out of memory, or by someone)",
            "SIGABRT": " (aborted)",
        }.get(name, "")
        return f"killed by {name}{hint}"
    return f"exited with code {code}"
