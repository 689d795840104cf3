"""Run the worker pool on Ray: one long-lived Ray actor per slot instead of one local process.

Everything above the process stays as with the local pool (mosaicd/executors/local.py): each actor
runs the same start-up and loop (``mosaicd.training.worker.start``) as ``python -m
mosaicd.training.worker``, connected back to the daemon's private worker socket over ZeroMQ, so
runs, epoch events, results, park (pause
--now) and exit messages travel exactly as before and the daemon stays the only writer of the
study databases. The scheduler sees the usual ``WorkerHandle``s; their ``proc`` is a
``RayProcess``, which gives an actor the part of the ``subprocess.Popen`` interface the pool and
the scheduler use.

An actor's death (its process killed, its node lost) surfaces as a ``RayActorError`` from the
actor's ``serve()`` call; the pool turns it into a crashed worker with Ray's cause, which the
scheduler handles like any crash (the run fails, or is retried when MONITOR ``retries`` allows,
and the slot gets a fresh actor). There is no SIGCHLD for actors, so the daemon polls ``reap()``.

Ray is optional: this module imports it only inside functions, and the daemon imports this module
only with ``--executor ray``. See docs/cluster.md.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

import zmq

from mosaic_client.protocol import ErrorCode
from mosaicd.errors import Refused
from mosaicd.executors.base import Slot, WorkerHandle, make_slots, worker_environment
from mosaicd.executors.local import Pool

if TYPE_CHECKING:
    from mosaicd.options import Options
    from mosaicd.owners import Owner

log = logging.getLogger("mosaicd")

INSTALL_HINT = "pip install 'mosaic-compare[ray]'"
# The daemon's own Ray (no --ray-address) only carries small control messages in its object
# store; Ray's default (30% of RAM) would reserve far more shared memory than it ever uses.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
PROBE_TIMEOUT = 30.0  # seconds for the Ray nodes to answer the submit-time path check


def require_ray() -> Any:
    """The ray module, or a clear exit saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise SystemExit(
            f"mosaicd: --executor ray needs Ray, which is not installed in this "
            f"Python environment ({exc}); install the extra with:\n"
            f"  {INSTALL_HINT}"
        ) from None
    return ray


# -- the actor ------------------------------------------------------------------------------------


class MosaicWorker:
    """The body of one slot's Ray actor (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, env: dict[str, str], defaults: dict[str, str] | None = None) -> None:
        # Before torch is imported: a CPU slot must not grab a GPU, and the thread count is the
        # slot's share of CPUs, as for the local pool's workers. `defaults` yield to what Ray
        # or --ray-runtime-env already set.
        os.environ.update(env)
        for name, value in (defaults or {}).items():
            os.environ.setdefault(name, value)

    def info(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(),
        }

    def serve(self, address: str, worker_id: str, slot: str, isolation: str) -> int:
        # The whole worker start-up (SIGINT ignored, the CUDA check, torch imported once per
        # actor, warm-up) is the same as `python -m mosaicd.training.worker`'s. The actor is not the
        # daemon's child: it must not die with its parent process (Ray's raylet).
        from mosaicd.training.worker import start

        start(address, worker_id, slot, isolation, die_with_parent=False)
        return 0


def _probe_paths(read: list[tuple[str, str, int]], write: list[tuple[str, str]]) -> list[str]:
    """Run on a Ray node: which of the daemon's paths this node cannot use, in words."""
    problems = []
    for what, path, size in read:
        if not os.path.isfile(path):
            problems.append(f"{what} {path} does not exist there")
        elif not os.access(path, os.R_OK):
            problems.append(f"{what} {path} is not readable there")
        elif os.path.getsize(path) != size:
            problems.append(
                f"{what} {path} differs from the daemon's copy "
                f"({os.path.getsize(path)} bytes there, {size} here)"
            )
    for what, directory in write:
        if not os.path.isdir(directory):
            problems.append(f"{what}: directory {directory} does not exist there")
        elif not os.access(directory, os.W_OK | os.X_OK):
            problems.append(f"{what}: directory {directory} is not writable there")
    return problems


# -- the Popen-like handle ------------------------------------------------------------------------


class RayProcess:
    """A slot's actor seen as a process: poll(), pid, send_signal(), kill(), wait()."""

    def __init__(
        self, ray: Any, actor: Any, address: str, worker_id: str, slot: Slot, isolation: str
    ) -> None:
        self._ray = ray
        self.actor = actor
        # Actor calls run in order: info() answers as soon as the actor is up, then serve()
        # holds the actor until the daemon says "exit" or the actor dies.
        self._info_ref = actor.info.remote()
        self.serve_ref = actor.serve.remote(address, worker_id, slot.label, isolation)
        self._info: dict[str, Any] | None = None
        self.returncode: int | None = None
        self.cause: str | None = None  # why the actor ended, when it was not a normal exit

    @property
    def info(self) -> dict[str, Any] | None:
        if self._info is None:
            ready, _ = self._ray.wait([self._info_ref], timeout=0)
            if ready:
                try:
                    self._info = self._ray.get(self._info_ref)
                except Exception:  # the actor died before it started: poll() tells why
                    self._info = {}
        return self._info or None

    @property
    def pid(self) -> int:
        # 0 until the actor has started (the local pool always knows its pid; an actor may wait
        # for a node with free resources first).
        info = self.info
        return int(info["pid"]) if info else 0

    def poll(self, ready: bool | None = None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if ready is None:
            ready = bool(self._ray.wait([self.serve_ref], timeout=0)[0])
        if not ready:
            return None
        from ray.exceptions import RayActorError, RayTaskError

        try:
            self.returncode = int(self._ray.get(self.serve_ref) or 0)
        except RayActorError as exc:
            self.returncode = -signal.SIGKILL
            self.cause = f"Ray actor died: {summarize_actor_error(exc)}"
        except RayTaskError as exc:
            self.returncode = 1
            self.cause = f"failed in its Ray actor: {str(exc).strip().splitlines()[-1][:300]}"
        except Exception as exc:  # a lost connection to the cluster, for one
            self.returncode = 1
            self.cause = f"Ray lost the actor: {type(exc).__name__}: {exc}"[:300]
        # serve() has returned or the actor is gone: release its CPU/GPU for the replacement.
        self.kill()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.kill()
            return
        info = self.info
        if info and info.get("host") == socket.gethostname():
            os.kill(int(info["pid"]), sig)

    def kill(self) -> None:
        try:
            self._ray.kill(self.actor, no_restart=True)
        except Exception:
            pass  # already gone

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired("ray actor", timeout or 0.0)
            time.sleep(0.05)


def summarize_actor_error(exc: BaseException) -> str:
    """Ray's actor-death text is a page long; keep the sentences that say what happened."""
    text = " ".join(str(exc).split())
    parts = []
    for marker in ("The actor is dead because", "Worker exit detail:", "The actor died because"):
        start = text.find(marker)
        if start >= 0:
            end = text.find(". ", start)
            parts.append(text[start : end + 1 if end > 0 else len(text)])
    summary = " ".join(parts) or text
    return summary[:400]


# -- the pool -------------------------------------------------------------------------------------


class RayPool(Pool):
    """The local pool's bookkeeping, with one Ray actor per slot instead of a child process."""

    # Ray actors are not the daemon's children: no SIGCHLD tells of their end.
    reap_every = 0.25

    def __init__(self, ctx: zmq.Context[Any], address: str, options: Options) -> None:
        ray = require_ray()
        self.ray = ray
        self.ray_address = options.ray_address
        runtime_env = options.ray_runtime_env or None
        try:
            if options.ray_address:
                ray.init(
                    address=options.ray_address,
                    runtime_env=runtime_env,
                    namespace="mosaic",
                    logging_level=logging.WARNING,
                )
            else:
                gpus = options.gpus
                if gpus:  # Ray finds its GPUs through CUDA_VISIBLE_DEVICES
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
                workers = options.workers if options.workers is not None else os.cpu_count() or 1
                ray.init(
                    address="local",
                    num_cpus=max(1, workers),
                    num_gpus=None if gpus is None else len(gpus),
                    include_dashboard=False,
                    runtime_env=runtime_env,
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    namespace="mosaic",
                    logging_level=logging.WARNING,
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = options.ray_address or "a local Ray"
            raise SystemExit(
                f"mosaicd: cannot start on Ray ({where}): {exc}\nStart the cluster "
                "first (`ray start --head` on the head node, then `ray status`), or "
                "leave --ray-address out for a Ray started by the daemon."
            ) from None
        resources = ray.cluster_resources()
        workers = options.workers if options.workers is not None else int(resources.get("CPU", 0))
        gpus = (
            options.gpus
            if options.gpus is not None
            else [str(i) for i in range(int(resources.get("GPU", 0)))]
        )
        slots = make_slots(workers, gpus, options.runs_per_gpu)
        super().__init__(
            ctx, address, slots, options.max_runs_per_worker, isolation=options.isolation
        )
        self.runs_per_gpu = options.runs_per_gpu
        # A Ray the daemon started shares this machine as the local pool would: the same
        # threads per run, hence the same results. On a cluster Ray's own setting stays (the
        # actor's one CPU, or what --ray-runtime-env's env_vars say).
        self.threads = None if options.ray_address else self.cpu_threads
        self.address = advertised_address(
            address, options.worker_advertise, ray.util.get_node_ip_address()
        )
        # Over tcp anyone on the network could connect: worker ids the daemon accepts are not
        # guessable then (docs/cluster.md also says to keep the port inside the cluster).
        self.id_suffix = "" if address.startswith("ipc://") else f"-{secrets.token_hex(8)}"
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self._actor_class = ray.remote(MosaicWorker)
        self._probe = ray.remote(_probe_paths)
        needed_cpu = sum(1 for s in slots if s.kind == "cpu")
        needed_gpu = sum(1 for s in slots if s.kind == "cuda") / self.runs_per_gpu
        if needed_cpu > resources.get("CPU", 0) or needed_gpu > resources.get("GPU", 0):
            log.warning(
                "the %d slot(s) need %d CPU(s) and %g GPU(s), the Ray cluster has %g "
                "and %g: the extra actors wait until Ray finds room",
                len(slots),
                needed_cpu,
                needed_gpu,
                resources.get("CPU", 0),
                resources.get("GPU", 0),
            )
        log.info(
            "executor: Ray %s (%s), %g CPU(s) and %g GPU(s) in the cluster; workers connect to %s",
            ray.__version__,
            options.ray_address or "started by mosaicd",
            resources.get("CPU", 0),
            resources.get("GPU", 0),
            self.address,
        )

    def spawn(self, slot: Slot, owner: Owner | None = None) -> WorkerHandle:
        # `owner` is always None: Ray's actors run as the cluster's user (check_submission).
        worker_id = f"w{next(self._ids)}{self.id_suffix}"
        # The actor keeps its node's environment (base {}); Ray sets CUDA_VISIBLE_DEVICES
        # itself for the actors that hold a GPU.
        env = worker_environment(slot, self.threads, base={}, gpu_set_by_executor=True)
        if slot.kind == "cpu":
            options: dict[str, Any] = {"num_cpus": 1}
        else:
            # GPU slots come on top of the CPU slots, as in the local pool: they reserve no CPU,
            # so Ray sets no thread count for them either.
            options = {"num_cpus": 0, "num_gpus": 1 / self.runs_per_gpu}
        defaults = {"OMP_NUM_THREADS": "1"}
        actor = self._actor_class.options(max_restarts=0, **options).remote(env, defaults)
        proc = RayProcess(self.ray, actor, self.address, worker_id, slot, self.isolation)
        handle = WorkerHandle(worker_id, slot, proc)  # type: ignore[arg-type]
        self.workers[worker_id] = handle
        return handle

    def reap(self) -> list[tuple[WorkerHandle, int]]:
        """Workers whose actor has ended, with a return code; a dead actor's cause becomes the
        worker's killed_for, so the run's record says what Ray said."""
        handles = list(self.workers.values())
        if not handles:
            return []
        refs = [h.proc.serve_ref for h in handles]  # type: ignore[attr-defined]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        ready_ids = {ref.hex() for ref in ready}
        dead = []
        for handle in handles:
            proc: RayProcess = handle.proc  # type: ignore[assignment]
            code = proc.poll(ready=proc.serve_ref.hex() in ready_ids)
            if code is None:
                continue
            del self.workers[handle.worker_id]
            self.meter.forget(handle.pid)
            if proc.cause and handle.killed_for is None:
                # "worker ..." like the local pool's crash causes: MONITOR retries apply.
                handle.killed_for = f"worker (pid {handle.pid}, {handle.slot.label}) {proc.cause}"
                log.warning("%s", handle.killed_for)
            dead.append((handle, code))
        return dead

    def resources(self, handle: WorkerHandle) -> dict[str, Any]:
        info = handle.proc.info  # type: ignore[attr-defined]
        if info and info.get("host") == socket.gethostname():
            out = super().resources(handle)
        else:  # the actor's pid is on another machine: psutil here would measure a stranger
            out = {"cpu_percent": None, "rss": None}
        out["node"] = info.get("ip") if info else None
        return out

    def check_submission(
        self, process: dict[str, Any], pipelines: list[Any], owner: Owner | None
    ) -> None:
        """Refuse a submission whose files the Ray nodes cannot reach (docs/cluster.md), or
        whose runs must execute as another user: actors run as the Ray cluster's user."""
        if owner is not None:
            raise Refused(
                ErrorCode.PERMISSION,
                f"the Ray executor cannot run workers as {owner.name}; on a shared box use the "
                "local executor. Nothing was queued.",
            )
        read: list[tuple[str, str]] = []
        if isinstance(process.get("path_to_class_loss_function"), str):
            read.append(("path_to_class_loss_function", process["path_to_class_loss_function"]))
        for pipeline in pipelines or []:
            for module in pipeline if isinstance(pipeline, list) else []:
                if isinstance(module, dict) and isinstance(module.get("path_to_class"), str):
                    read.append(
                        (f"path_to_class of [{module.get('class')}]", module["path_to_class"])
                    )
        write: list[tuple[str, str]] = []
        if isinstance(process.get("run_files_path"), str):
            write.append(("run_files_path", process["run_files_path"]))
        seen: set[str] = set()
        for what, path in [*read, *write]:
            if path in seen:
                continue
            seen.add(path)
            if not os.path.isabs(path):
                raise Refused(
                    ErrorCode.INVALID,
                    f"{what} {path!r} is a relative path: with "
                    "--executor ray the runs execute on Ray nodes, not in your "
                    "directory, so every path must be absolute (the mosaic client "
                    "makes config paths absolute for you). Nothing was queued.",
                )
        nodes = self._other_nodes()
        if not nodes:
            return  # every node is this machine: the daemon's own checks cover its files
        reads = []
        for path, what in {path: what for what, path in read}.items():
            try:
                reads.append((what, path, os.path.getsize(path)))
            except OSError:
                raise Refused(
                    ErrorCode.INVALID,
                    f"{what} {path} does not exist on the daemon's machine. Nothing was queued.",
                ) from None
        # A run files directory need not exist yet: its nearest existing parent here must exist
        # and be writable on every node too, i.e. be on the shared filesystem.
        write_dirs = [(what, _nearest_existing(path)) for what, path in write]
        refs = {
            node["NodeManagerAddress"]: self._probe.options(
                num_cpus=0, scheduling_strategy=self._on_node(node["NodeID"])
            ).remote(reads, write_dirs)
            for node in nodes
        }
        try:
            answers = dict(zip(refs, self.ray.get(list(refs.values()), timeout=PROBE_TIMEOUT)))
        except Exception as exc:  # a node that does not answer must not block submissions
            log.warning("could not check the submission's paths on the Ray nodes: %s", exc)
            return
        problems = [f"on node {ip}: {p}" for ip, found in answers.items() for p in found]
        if problems:
            raise Refused(
                ErrorCode.INVALID,
                "the Ray nodes cannot reach this submission's files: "
                + "; ".join(problems[:5])
                + ". Put the classes and run_files_path on a filesystem every node "
                "mounts at the same path (docs/cluster.md). Nothing was queued.",
            )

    def _other_nodes(self) -> list[dict[str, Any]]:
        host = socket.gethostname()
        out = []
        for node in self.ray.nodes():
            if not node.get("Alive") or node.get("NodeID") == self.node_id:
                continue
            resources = node.get("Resources") or {}
            if not (resources.get("CPU") or resources.get("GPU")):
                continue  # actors never go there
            if (
                node.get("NodeManagerAddress") == self.node_ip
                and node.get("NodeManagerHostname") == host
            ):
                continue  # a second Ray node on this very machine sees the same files
            out.append(node)
        return out

    def _on_node(self, node_id: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id, soft=False)

    def stop_all(self, sock: zmq.Socket[Any], grace: float) -> None:
        super().stop_all(sock, grace)
        # Disconnects from a cluster (its actors of ours die with the driver) or stops the Ray
        # the daemon started.
        self.ray.shutdown()


def _nearest_existing(path: str) -> str:
    directory = os.path.abspath(path)
    while not os.path.isdir(directory) and directory != "/":
        directory = os.path.dirname(directory)
    return directory


def advertised_address(bound: str, advertise: str | None, node_ip: str) -> str:
    """The address the actors connect to: --worker-advertise, else the bound endpoint with a
    wildcard host replaced by this machine's address on the Ray network."""
    if advertise:
        return advertise
    if bound.startswith("tcp://"):
        host, _, port = bound[len("tcp://") :].rpartition(":")
        if host in ("0.0.0.0", "*", "[::]", "::", ""):
            return f"tcp://{node_ip}:{port}"
    return bound
