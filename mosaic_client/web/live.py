"""Live state for the pages: poll the daemon, push only what changed.

The daemon has no push channel, but its `status` answers in well under a millisecond, so a
thread of the web server asks for it every POLL_INTERVAL seconds (one request, limit 0: no
finished-run lists) and reduces it to a *snapshot* of stable values: figures that drift every
poll (elapsed time, CPU to the tenth of a percent) are rounded so that an unchanged daemon gives
an unchanged snapshot. Each page holds one server-sent-events stream: the full snapshot when it
connects, then a *diff* (the top-level parts that changed, studies one by one) after each poll
that changed something. A daemon event therefore reaches the page within one poll interval plus
the push (docs/web.md has the measured latency).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from mosaic_client import protocol, study_reading
from mosaic_client.analysis import AnalysisError, open_readonly
from mosaic_client.connection import Client, DaemonUnavailable

POLL_INTERVAL = 0.2  # seconds between two status requests while the daemon answers
DOWN_INTERVAL = 1.0  # while it does not
REQUEST_TIMEOUT = 2.0
KEPT_CHANGES = 64


def _round(value: float | None, step: float) -> float | None:
    return None if value is None else round(value / step) * step


def worker_view(worker: protocol.WorkerView) -> dict[str, Any]:
    mib = 2**20
    return {
        "id": worker.get("id"),
        "slot": worker.get("slot"),
        "state": worker.get("state"),
        "pid": worker.get("pid"),
        "run_id": worker.get("run_id"),
        "runs_done": worker.get("runs_done"),
        "cpu_percent": _round(worker.get("cpu_percent"), 1.0),
        "rss_mib": _round((worker.get("rss") or 0) / mib, 1.0) if worker.get("rss") else None,
        "gpu_mib": (
            round((worker.get("gpu_memory") or 0) / mib)
            if worker.get("gpu_memory") is not None
            else None
        ),
        "gpu_device_mib": (
            round((worker.get("gpu_memory_device") or 0) / mib)
            if worker.get("gpu_memory_device") is not None
            else None
        ),
        "gpu_total_mib": (
            round((worker.get("gpu_memory_total") or 0) / mib)
            if worker.get("gpu_memory_total") is not None
            else None
        ),
    }


def running_view(run: protocol.RunningRunView, now: float) -> dict[str, Any]:
    return {
        "run_id": run["run_id"],
        "pipeline": run["pipeline"],
        "epoch": run["epoch"],
        "epochs": run["epochs"],
        "train_loss": run["train_loss"],
        "test_loss": run["test_loss"],
        "worker": run["worker"],
        "owner": run["owner"],
        # A start time, not the elapsed seconds: it does not change from poll to poll.
        "started": round(now - run["elapsed"]),
    }


def snapshot_of(
    status: protocol.StatusReply | None,
    error: str | None,
    local_counts: dict[str, dict[str, int]],
    now: float,
) -> dict[str, Any]:
    """The pages' view of the daemon and the studies, built from one status reply."""
    studies_view: dict[str, Any] = {}
    for db, counts in local_counts.items():
        studies_view[db] = {"db": db, "counts": counts, "running": [], "daemon": False}
    if status is None:
        return {"daemon": {"up": False, "error": error}, "workers": [], "studies": studies_view}
    for study in status.get("studies", []):
        studies_view[study["db"]] = {
            "db": study["db"],
            "counts": dict(study["counts"]),
            "daemon": True,
            "running": [running_view(r, now) for r in study["running"]],
        }
    return {
        "daemon": {
            "up": True,
            "error": None,
            "paused": bool(status.get("paused")),
            "paused_owners": status.get("paused_owners", []),
            "queued": status.get("queued", 0),
        },
        "workers": [worker_view(w) for w in status.get("workers", [])],
        "studies": studies_view,
    }


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What changed from old to new: changed top-level parts; studies one by one, with
    `removed` naming studies no longer there. Empty when nothing changed."""
    out: dict[str, Any] = {}
    for key in ("daemon", "workers"):
        if old.get(key) != new.get(key):
            out[key] = new.get(key)
    old_studies, new_studies = old.get("studies", {}), new.get("studies", {})
    changed = {db: s for db, s in new_studies.items() if old_studies.get(db) != s}
    removed = [db for db in old_studies if db not in new_studies]
    if changed:
        out["studies"] = changed
    if removed:
        out["removed"] = removed
    return out


class LocalStudies:
    """Counts of the databases named on the command line that the daemon does not serve,
    re-read only when SQLite says the file changed (PRAGMA data_version)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._conns: dict[str, Any] = {}
        self._versions: dict[str, int] = {}
        self._counts: dict[str, dict[str, int]] = {}

    def counts(self, skip: set[str]) -> dict[str, dict[str, int]]:
        out = {}
        for path in self.paths:
            if path in skip:
                continue
            try:
                conn = self._conns.get(path) or open_readonly(path)
                self._conns[path] = conn
                version = study_reading.data_version(conn)
                if self._versions.get(path) != version or path not in self._counts:
                    self._counts[path] = study_reading.status_counts(conn)
                    self._versions[path] = version
                out[path] = self._counts[path]
            except (AnalysisError, OSError, Exception):  # a file gone or locked: shown empty
                self._conns.pop(path, None)
                out[path] = {}
        return out

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


class Hub:
    """The latest snapshot and the streams waiting for the next change.

    The poller thread publishes through the event loop (call_soon_threadsafe); each change sets
    the current asyncio.Event and replaces it, which wakes every open stream at once."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {
            "daemon": {"up": False, "error": "starting"},
            "workers": [],
            "studies": {},
        }
        self.version = 0
        self.changes: dict[int, dict[str, Any]] = {}  # version -> diff from version - 1
        self.closed = False
        self._event: asyncio.Event | None = None

    def bind(self) -> None:
        """Called in the event loop before the first publish."""
        self._event = asyncio.Event()

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Called in the event loop."""
        change = diff(self.snapshot, snapshot)
        if not change:
            return
        self.snapshot = snapshot
        self.version += 1
        self.changes[self.version] = change
        self.changes.pop(self.version - KEPT_CHANGES, None)  # further behind: a snapshot
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._event is not None:
            event, self._event = self._event, asyncio.Event()
            event.set()

    def since(self, seen: int) -> list[dict[str, Any]] | None:
        """The diffs from version `seen` to now, or None when some are no longer kept."""
        wanted = range(seen + 1, self.version + 1)
        if all(v in self.changes for v in wanted):
            return [self.changes[v] for v in wanted]
        return None

    async def wait(self, seen: int, timeout: float) -> None:
        """Until the version passes `seen`, the hub closes, or `timeout` seconds."""
        if self.version > seen or self.closed or self._event is None:
            return
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Poller(threading.Thread):
    """Asks the daemon for its status every POLL_INTERVAL and hands snapshots to `publish`.

    Its own thread and its own ZeroMQ socket: a socket is used by one thread only."""

    def __init__(
        self,
        socket_path: str | None,
        local: LocalStudies,
        publish: Callable[[dict[str, Any]], None],
    ) -> None:
        super().__init__(name="mosaic-web-poller", daemon=True)
        self.socket_path = socket_path
        self.local = local
        self.publish = publish
        self._wake = threading.Event()
        self._stopping = False

    def poll_once(self, client: Client) -> tuple[dict[str, Any], bool]:
        try:
            status = client.request("status", timeout=REQUEST_TIMEOUT, limit=0)
            error = None
        except (DaemonUnavailable, protocol.ProtocolError) as exc:
            status, error = None, str(exc)
        served = {s["db"] for s in status.get("studies", [])} if status else set()
        snap = snapshot_of(status, error, self.local.counts(served), time.time())
        return snap, status is not None

    def run(self) -> None:
        client = Client(self.socket_path, timeout=REQUEST_TIMEOUT)
        try:
            while not self._stopping:
                snap, up = self.poll_once(client)
                self.publish(snap)
                self._wake.wait(POLL_INTERVAL if up else DOWN_INTERVAL)
                self._wake.clear()
        finally:
            client.close()
            self.local.close()

    def poll_now(self) -> None:
        """Poll at once: after a control request the page need not wait for the interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
