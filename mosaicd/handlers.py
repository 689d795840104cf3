"""The daemon's request handlers: one per request type of mosaic_client.protocol.REQUESTS,
named like the client command that sends it, and the one dispatch table that routes them."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mosaic_client.protocol import PROTOCOL_VERSION, REQUESTS
from mosaicd.scheduler import Refused
from mosaicd.store import QUEUED

if TYPE_CHECKING:
    from mosaicd.server import Daemon


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the kernel told us (SO_PEERCRED through ZAP), never as claimed."""

    uid: int | None
    gid: int | None
    pid: int | None

    @property
    def name(self) -> str:
        if self.uid is None:
            return "unknown"
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def is_admin(self, admin_gid: int | None) -> bool:
        if self.uid == 0 or self.uid == os.getuid():
            return True
        if admin_gid is None or self.uid is None:
            return False
        try:
            user = pwd.getpwuid(self.uid).pw_name
            import grp

            return user in grp.getgrgid(admin_gid).gr_mem or self.gid == admin_gid
        except KeyError:
            return False


def _study(args: dict[str, Any]) -> str:
    db = args["db"]
    if not os.path.isabs(db):
        raise Refused("invalid", f"database path {db!r} must be absolute (the client sends it so)")
    return db


def _check_owner(daemon: Daemon, caller: Caller, db: str, run_ids: list[int], verb: str) -> None:
    if caller.is_admin(daemon.options.admin_gid):
        return
    store = daemon.scheduler.stores[db]
    for run_id in run_ids:
        owner_uid, owner = store.owner_of(run_id)
        if owner_uid is not None and owner_uid != caller.uid:
            raise Refused("permission", f"run {run_id} belongs to {owner or owner_uid}; only its "
                          f"owner or an administrator may {verb} it. Nothing was changed.")


def handle_ping(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    return {"pid": os.getpid(), "version": PROTOCOL_VERSION, "socket": daemon.options.socket,
            "caller": caller.name, "uid": caller.uid}


def handle_submit(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    return daemon.scheduler.submit(_study(args), args["config_path"], args["process"],
                                   args["monitor"], args["pipelines"], caller.uid, caller.name)


def handle_status(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    limit = max(0, min(int(args.get("limit", 10)), 1000))
    reply = daemon.scheduler.status(args.get("db"), limit, caller.uid, bool(args.get("mine")))
    if args.get("db") and args.get("submission") is not None:
        store = daemon.scheduler.open_study(args["db"], create=False)
        reply["submission_counts"] = store.submission_counts(args["submission"])
    return reply


def handle_pause(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    return daemon.scheduler.pause(bool(args.get("now")))


def handle_resume(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    return daemon.scheduler.resume()


def handle_pending(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    """The not-yet-run pipelines with their PROCESS/MONITOR, for `pause FILE.json`."""
    out = []
    for (study, submission_id), queue in daemon.scheduler.queues.items():
        if args.get("db") and study != args["db"]:
            continue
        submission = daemon.scheduler.submissions[(study, submission_id)]
        out.append({"db": study, "process": submission.process, "monitor": submission.monitor,
                    "run_ids": [r.run_id for r in queue],
                    "pipelines": [r.modules for r in queue]})
    return out


def handle_cancel(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    db = _study(args)
    run_ids = daemon.scheduler.select(db, args["selection"])
    _check_owner(daemon, caller, db, run_ids, "cancel")
    return {"selected": run_ids, **daemon.scheduler.cancel(db, run_ids)}


def handle_rerun(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    db = _study(args)
    run_ids = daemon.scheduler.select(db, args["selection"])
    _check_owner(daemon, caller, db, run_ids, "rerun")
    return {"selected": run_ids, **daemon.scheduler.rerun(db, run_ids, int(args["epochs"]))}


def handle_rekey(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    """Write `{type}_key` params: keys is a list of [run_id, param_name, key]."""
    db = _study(args)
    store = daemon.scheduler.open_study(db, create=False)
    changes = []
    for item in args["keys"]:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)
                and isinstance(item[1], str) and item[1].endswith("_key")):
            raise Refused("invalid", "rekey items must be [run_id, '<type>_key', key]")
        changes.append((item[0], item[1], item[2]))
    _check_owner(daemon, caller, db, sorted({c[0] for c in changes}), "rekey")
    store.set_params(changes)
    return {"changed": len(changes)}


def handle_show(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    db = _study(args)
    store = daemon.scheduler.open_study(db, create=False)
    info = store.describe(args["run_id"])
    if info is None:
        raise Refused("not_found", f"no run {args['run_id']} in {db}")
    active = daemon.scheduler.active.get((db, args["run_id"]))
    if active is not None:
        info["live"] = {"epoch": active.epoch, "worker": active.worker.worker_id,
                        "slot": active.worker.slot.label, "pid": active.worker.pid}
    info["queued_position"] = None
    if info["status"] == QUEUED:
        info["queued_position"] = 0
    return info


def handle_studies(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    return [{"db": path, "counts": store.counts}
            for path, store in daemon.scheduler.stores.items()]


def handle_shutdown(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    if not caller.is_admin(daemon.options.admin_gid):
        raise Refused("permission", "only the daemon's user or an administrator may stop it")
    daemon.request_stop()
    return {"stopping": True}


Handler = Callable[["Daemon", Caller, dict[str, Any]], Any]

DISPATCH: dict[str, Handler] = {
    "ping": handle_ping,
    "submit": handle_submit,
    "status": handle_status,
    "pause": handle_pause,
    "resume": handle_resume,
    "pending": handle_pending,
    "cancel": handle_cancel,
    "rerun": handle_rerun,
    "rekey": handle_rekey,
    "show": handle_show,
    "studies": handle_studies,
    "shutdown": handle_shutdown,
}

assert set(DISPATCH) == set(REQUESTS), "every request type needs exactly one handler"
