"""One user submits 150,000 runs while another user's `ping` and `status` are timed (issue 27).

The daemon has no workers, so only the submission loads it. As root, the submitter is a
throw-away user (made with useradd, removed at the end) on a shared daemon (`--socket-group`):
their study is written by their own keeper, as on the shared box, and the timed client is root,
another user. Otherwise both clients are this user (printed as `"users": "same uid"`).

The submitter first queues one run into another study, so that their keeper has started
(a user's first request waits for that start-up). Printed: the submission's total time, the
round trips of the other client during it (p50, p99, max, for ping and status; a request is
due every 10 ms and its time counts from when it was due, so that a stalled loop is not
measured by the one request that waited), and the daemon's resident memory before, at its peak
and after.
Target: p99 < 200 ms.

    python benchmarks/big_submission.py [--runs 150000] [--same-user]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import site
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import zmq
from common import REPO, BenchDaemon, median, percentile

from mosaic_client import paths, protocol

INTERVAL_S = 0.01  # the other user sends a request every 10 ms (ping and status in turn)

SUBMITTER = """
import json, sys, time
from mosaic_client import protocol
from mosaic_client.connection import Client
socket, request = sys.argv[1], json.loads(sys.stdin.read())
protocol.make_request("submit", **request)  # once: the request's packing is not measured
with Client(socket, timeout=600) as client:
    # One run first, elsewhere: the user's keeper starts (a user's first request waits for
    # their keeper's start-up, not measured here).
    warm = dict(request, db=request["db"] + ".warm.db", pipelines=request["pipelines"][:1])
    client.request("submit", **warm)
sent_at, started = time.time(), time.perf_counter()
with Client(socket, timeout=3600) as client:
    try:
        runs, refused = len(client.request("submit", **request)["run_ids"]), None
    except protocol.ProtocolError as exc:
        runs, refused = 0, exc.message[:300]
seconds = time.perf_counter() - started
print(json.dumps({"sent_at": sent_at, "seconds": seconds, "runs": runs, "refused": refused}))
"""


def pipelines(n: int) -> list[list[dict[str, Any]]]:
    """n pipelines of the benchmark classes: 50 model widths, repeated (as a multiplicity)."""
    classes = str(REPO / "benchmarks" / "bench_classes.py")
    data = {
        "type": "data",
        "class": "synthetic_data",
        "path_to_class": classes,
        "n_batches": 4,
        "batch_size": 16,
        "n_features": 8,
        "key": "synthetic",
    }
    return [
        [
            dict(data),
            {
                "type": "model",
                "class": "small_mlp",
                "path_to_class": classes,
                "width": 8 + i % 50,
                "key": "mlp",
            },
        ]
        for i in range(n)
    ]


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0])
    return fields


class ThrowAwayUser:
    """A user and group of their own, removed at the end (root only)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = self.group = f"mosbig{tag}"
        subprocess.run(["groupadd", self.group], check=True)
        subprocess.run(
            ["useradd", "-M", "-N", "-g", self.group, "-s", "/usr/sbin/nologin", self.name],
            check=True,
        )
        self.uid = int(subprocess.check_output(["id", "-u", self.name]))
        self.gid = int(subprocess.check_output(["id", "-g", self.name]))

    def remove(self) -> None:
        subprocess.run(["userdel", self.name], capture_output=True)
        subprocess.run(["groupdel", self.group], capture_output=True)


def user_python() -> tuple[str, list[str]]:
    """An interpreter a throw-away user may run, and the package paths it needs besides (the
    venv's may live under a 0700 /root: then the system's same major.minor, with the venv's
    pure site-packages, as tests/test_shared_box.py does)."""
    path = os.path.realpath(sys.executable)
    if all(os.stat(p).st_mode & 0o001 for p in [path, *Path(path).parents]):
        return sys.executable, []
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidate = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if candidate is None:
        raise SystemExit(f"no {version} that other users may run; or pass --same-user")
    return candidate, [p for p in site.getsitepackages() if os.path.isdir(p)]


def measure(runs: int, same_user: bool) -> dict[str, Any]:
    user = None if same_user or os.geteuid() != 0 else ThrowAwayUser()
    python, packages = user_python() if user is not None else (sys.executable, [])
    extra = [] if user is None else ["--socket-group", user.group, "--worker-python", python]
    daemon = BenchDaemon(*extra, workers=0)
    try:
        project = daemon.root / "project"
        project.mkdir()
        if user is not None:
            # The user reaches their project and the socket; their keeper writes the study.
            for path in (daemon.root, daemon.root / "daemon"):
                path.chmod(0o755)
            os.chown(project, user.uid, user.gid)
        daemon.start()
        request = {
            "db": str(project / "big.db"),
            "config_path": str(project / "big.ini"),
            "process": {
                "lr": 0.001,
                "epochs": 1,
                "data_scheme": ["data"],
                "pipeline_scheme": ["model"],
                "loss_function": "BCELoss",
                "run_files_path": str(project / "runs"),
                "seed": 0,
            },
            "monitor": {"need_gpu": False, "nb_processus": 64, "multiplicity": 1},
            "pipelines": pipelines(runs),
        }
        assert daemon.proc is not None
        before = rss_kib(daemon.proc.pid)
        prefix = (
            []
            if user is None
            else ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "--"]
        )
        submitter = subprocess.Popen(
            [*prefix, python, "-c", SUBMITTER, daemon.socket],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={
                **daemon.env,
                "HOME": str(project),
                "PYTHONPATH": os.pathsep.join([str(REPO), *packages]),
            },
            cwd=project,
        )
        samples: list[tuple[str, float, float]] = []  # (request, when due, round trip)
        done = threading.Event()

        def other_user() -> None:
            # Open loop: a request is due every INTERVAL_S whether or not the earlier ones
            # were answered (several may be in flight on the one socket; the daemon answers
            # them in order), and each one's time counts from when it was due: a loop stalled
            # for 20 s shows as 20 s of slow requests, not as the one request that waited.
            context = zmq.Context.instance()
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(paths.endpoint(daemon.socket))
            in_flight: deque[tuple[str, float]] = deque()
            due, turn = time.time(), 0
            while not done.is_set() or in_flight:
                if not done.is_set() and time.time() >= due:
                    name = ("ping", "status")[turn % 2]
                    args = {"limit": 10} if name == "status" else {}
                    sock.send_multipart([b"", protocol.make_request(name, **args)])
                    in_flight.append((name, due))
                    due, turn = due + INTERVAL_S, turn + 1
                wait = max(0.0, due - time.time()) if not done.is_set() else 1.0
                if sock.poll(int(1000 * wait) + 1):
                    protocol.decode_reply(sock.recv_multipart()[-1])
                    name, was_due = in_flight.popleft()
                    samples.append((name, was_due, time.time() - was_due))
            sock.close()

        timer = threading.Thread(target=other_user)
        timer.start()
        out, _ = submitter.communicate(json.dumps(request))
        done.set()
        timer.join()
        submitted = json.loads(out)
        window = (submitted["sent_at"], submitted["sent_at"] + submitted["seconds"])
        times: dict[str, list[float]] = {"ping": [], "status": []}
        for name, due, seconds in samples:
            if window[0] <= due <= window[1]:
                times[name].append(seconds)
        after = rss_kib(daemon.proc.pid)
        result: dict[str, Any] = {
            "runs": runs,
            "users": "same uid" if user is None else "submitter: a throw-away user; timed: root",
            "submit_s": round(submitted["seconds"], 2),
        }
        if submitted["runs"] != runs:
            result["refused"] = submitted["refused"]
        for name, values in times.items():
            result[f"{name}_n"] = len(values)
            result[f"{name}_p50_ms"] = round(1000 * median(values), 1)
            result[f"{name}_p99_ms"] = round(1000 * percentile(values, 99), 1)
            result[f"{name}_max_ms"] = round(1000 * max(values), 1)
        result["rss_before_mib"] = round(before["VmRSS"] / 1024)
        result["rss_peak_mib"] = round(after["VmHWM"] / 1024)
        result["rss_after_mib"] = round(after["VmRSS"] / 1024)
        result["rss_growth_mib"] = round((after["VmRSS"] - before["VmRSS"]) / 1024)
        # Requests slower than the target, and the machine's load (a shared 2-core VM is noisy).
        result["over_200ms"] = sum(t > 0.2 for values in times.values() for t in values)
        result["load_average"] = round(os.getloadavg()[0], 1)
        return result
    finally:
        daemon.stop()
        if user is not None:
            user.remove()
        shutil.rmtree(daemon.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=150_000)
    parser.add_argument("--same-user", action="store_true", help="both clients as this user")
    args = parser.parse_args()
    print(json.dumps(measure(args.runs, args.same_user)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
