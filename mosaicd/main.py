"""`mosaicd`: start the Mosaic daemon."""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import pwd
import sys
from typing import Any

from mosaic_client import paths
from mosaicd.executors.choice import EXECUTORS
from mosaicd.options import Options
from mosaicd.scheduling.fair_share import DEFAULT_HALF_LIFE_S, Limits, parse_shares
from mosaicd.service.server import AlreadyRunning, Daemon


def detect_gpus() -> list[str]:
    """GPU ids from nvidia-smi, without importing torch in the daemon's main process."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def _group(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SystemExit(
            f"mosaicd: group {name!r} does not exist; create it (groupadd {name}) "
            "or leave the option out"
        ) from None


def _runtime_env(text: str | None) -> dict[str, Any] | None:
    """--ray-runtime-env: JSON text, or @FILE holding it."""
    if text is None:
        return None
    where = "--ray-runtime-env"
    try:
        if text.startswith("@"):
            where = text[1:]
            with open(text[1:]) as fh:
                text = fh.read()
        value = json.loads(text)
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"mosaicd: cannot read the Ray runtime_env from {where}: {exc}; give "
            'a JSON object such as \'{"env_vars": {"OMP_NUM_THREADS": "4"}}\''
        ) from None
    if not isinstance(value, dict):
        raise SystemExit(
            f"mosaicd: the Ray runtime_env from {where} must be a JSON object, "
            f"not {type(value).__name__}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosaicd",
        description="The Mosaic daemon: owns the queue, the worker pool and the study databases.",
        epilog="examples:\n  mosaicd --workers 4\n  mosaicd --gpus 0,1 --runs-per-gpu 2\n"
        "  MOSAIC_SOCKET=/tmp/m.sock mosaicd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The groups are added in this order so that --help lists the options as it always has.
    _add_location_options(parser)
    _add_worker_options(parser)
    _add_service_options(parser)
    _add_executor_options(parser)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def _add_location_options(parser: argparse.ArgumentParser) -> None:
    """Where the daemon is reached and where it keeps its own state."""
    parser.add_argument(
        "--socket",
        default=None,
        help="socket path (default: $MOSAIC_SOCKET, else $XDG_RUNTIME_DIR/mosaic/mosaicd.sock)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="where the daemon keeps its own state (default: $MOSAIC_STATE_DIR, "
        "else ~/.local/state/mosaic)",
    )


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    """How many workers, on which GPUs, how long each lives and what separates its runs."""
    parser.add_argument(
        "--workers", type=int, default=None, help="CPU worker slots (default: the number of CPUs)"
    )
    parser.add_argument(
        "--gpus", default=None, help="GPU ids to use, e.g. 0,1 ('' for none; default: nvidia-smi's)"
    )
    parser.add_argument(
        "--runs-per-gpu",
        type=int,
        default=1,
        help="worker slots per GPU, for small models (default 1)",
    )
    parser.add_argument(
        "--max-runs-per-worker",
        type=int,
        default=0,
        help="recycle a worker after this many runs (0: never); a worker is "
        "always recycled after a failed run",
    )
    parser.add_argument(
        "--isolation",
        default="state",
        choices=["state", "none", "process"],
        help="what separates the runs of one worker: 'state' (default) restores "
        "global state (cwd, environment, sys.path, torch defaults) after "
        "each run; 'process' runs each pipeline in a fresh forked process; "
        "'none' restores nothing (trusted code). See docs/workers.md",
    )
    parser.add_argument(
        "--worker-python",
        default=None,
        help="the Python interpreter of the workers that run other users' runs as those users "
        "(default: the daemon's own): every user must be able to execute it and read Mosaic's "
        "and torch's packages (docs/deployment.md)",
    )


def _add_service_options(parser: argparse.ArgumentParser) -> None:
    """How runs are saved and stopped, and who may act on them and connect."""
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=30.0,
        help="seconds between epoch checkpoints of a run (default 30)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=60.0,
        help="seconds to checkpoint running runs on SIGTERM (default 60)",
    )
    parser.add_argument(
        "--admin-group", default=None, help="members of this group may act on everyone's runs"
    )
    parser.add_argument(
        "--socket-group", default=None, help="make the socket 0660 for this group (system service)"
    )
    parser.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="USER=WEIGHT",
        help="a user's fair share on a shared daemon (default 1 each; repeat per user)",
    )
    for flag, what in (
        ("--user-cpu-slots", "CPU slots one user's runs may hold at once"),
        ("--user-gpu-slots", "GPU slots one user's runs may hold at once"),
        ("--user-queued", "runs one user may have queued at once"),
        ("--submission-runs", "runs one submission may queue"),
    ):
        parser.add_argument(flag, type=int, default=0, metavar="N", help=f"{what} (0: no limit)")
    parser.add_argument(
        "--fair-share-half-life",
        type=float,
        default=DEFAULT_HALF_LIFE_S,
        metavar="SECONDS",
        help="how fast past usage is forgotten in the fair share (default one day)",
    )
    parser.add_argument(
        "--preempt-after",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared daemon, when a user below their share has waited this long for a "
        "slot, park an over-share user's run at its next epoch boundary (default 0: never)",
    )


def _shares(items: list[str]) -> dict[int, float]:
    """--share USER=WEIGHT items as {uid: weight}; a bad one stops the daemon with a message."""
    try:
        return parse_shares(items, {entry.pw_name: entry.pw_uid for entry in pwd.getpwall()})
    except ValueError as exc:
        print(f"mosaicd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _add_executor_options(parser: argparse.ArgumentParser) -> None:
    """Who runs the workers (local processes or Ray actors) and how they reach the daemon."""
    parser.add_argument(
        "--executor",
        default="local",
        choices=EXECUTORS,
        help="who runs the workers: 'local' processes (default) or 'ray' "
        "actors on a Ray cluster (pip install 'mosaic-compare[ray]'; "
        "docs/cluster.md)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="with --executor ray: the cluster to use ('auto' for the one "
        "`ray start` runs on this machine, or HOST:PORT); default: a "
        "local Ray started by mosaicd",
    )
    parser.add_argument(
        "--ray-runtime-env",
        default=None,
        metavar="JSON",
        help="with --executor ray: Ray runtime_env for the workers, as JSON or "
        "@FILE.json (e.g. env_vars, py_modules, pip)",
    )
    parser.add_argument(
        "--worker-bind",
        default=None,
        metavar="ENDPOINT",
        help="where the workers' socket listens, e.g. tcp://0.0.0.0:5560 "
        "for Ray workers on other machines (default: a private ipc socket)",
    )
    parser.add_argument(
        "--worker-advertise",
        default=None,
        metavar="ENDPOINT",
        help="the address workers connect to when it differs from "
        "--worker-bind, e.g. tcp://head-node:5560",
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        # journald adds its own timestamps; a terminal user wants them.
        format=("%(asctime)s " if sys.stderr.isatty() else "")
        + "mosaicd %(levelname)s %(message)s",
    )
    # Before anything is started or created: a URL or relative path names no socket.
    try:
        socket_path = paths.socket_path(args.socket)
    except paths.SocketPathError as exc:
        print(f"mosaicd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.workers is not None and args.workers < 0:
        raise SystemExit("mosaicd: --workers must be 0 or more")
    if args.runs_per_gpu < 1:
        raise SystemExit("mosaicd: --runs-per-gpu must be at least 1")
    if args.max_runs_per_worker < 0:
        raise SystemExit("mosaicd: --max-runs-per-worker must be 0 (never recycle) or more")
    ray = args.executor == "ray"
    if not ray:
        # The local pool's workers are this machine's processes: its private ipc socket is
        # all they need, and it is reachable by this user alone.
        for name in ("ray_address", "ray_runtime_env", "worker_bind", "worker_advertise"):
            if getattr(args, name) is not None:
                raise SystemExit(f"mosaicd: --{name.replace('_', '-')} needs --executor ray")
    for name in ("worker_bind", "worker_advertise"):
        value = getattr(args, name)
        if value is not None and not value.startswith(("tcp://", "ipc://")):
            raise SystemExit(
                f"mosaicd: --{name.replace('_', '-')} {value!r}: give a ZeroMQ "
                "endpoint such as tcp://0.0.0.0:5560 or ipc:///path/w.sock"
            )
    runtime_env = _runtime_env(args.ray_runtime_env) if ray else None
    if ray:
        from mosaicd.executors.ray_cluster import require_ray

        require_ray()  # exits with the install command when Ray is missing
    # With Ray, the cluster's GPUs (not this machine's nvidia-smi) are the default.
    gpus: list[str] | None = (
        [g for g in args.gpus.split(",") if g.strip()]
        if args.gpus is not None
        else None
        if ray
        else detect_gpus()
    )
    options = Options(
        socket=socket_path,
        state_dir=os.path.abspath(args.state_dir) if args.state_dir else paths.default_state_dir(),
        workers=(
            args.workers if args.workers is not None else None if ray else (os.cpu_count() or 1)
        ),
        gpus=None if gpus is None else [g.strip() for g in gpus],
        runs_per_gpu=args.runs_per_gpu,
        max_runs_per_worker=args.max_runs_per_worker,
        isolation=args.isolation,
        worker_python=args.worker_python,
        checkpoint_every=args.checkpoint_every,
        stop_timeout=args.stop_timeout,
        admin_gid=_group(args.admin_group),
        socket_group=_group(args.socket_group),
        executor=args.executor,
        ray_address=args.ray_address,
        ray_runtime_env=runtime_env,
        worker_bind=args.worker_bind,
        worker_advertise=args.worker_advertise,
        shares=_shares(args.share),
        limits=Limits(
            args.user_cpu_slots, args.user_gpu_slots, args.user_queued, args.submission_runs
        ),
        fair_share_half_life=args.fair_share_half_life,
        preempt_after=max(0.0, args.preempt_after),
    )
    try:
        code = Daemon(options).run()
    except AlreadyRunning as exc:
        print(f"mosaicd: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except PermissionError as exc:
        print(f"mosaicd: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
