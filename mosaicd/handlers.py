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


def _admins(daemon: Daemon) -> str:
    """Who may act on everyone's runs, in words, for refusal messages."""
    who = "root"
    if os.getuid() != 0:
        try:
            who += f", {pwd.getpwuid(os.getuid()).pw_name} (the daemon's user)"
        except KeyError:
            who += f", uid {os.getuid()} (the daemon's user)"
    if daemon.options.admin_gid is not None:
        try:
            import grp

            who += f" and members of group {grp.getgrgid(daemon.options.admin_gid).gr_name}"
        except KeyError:
            who += f" and members of group {daemon.options.admin_gid}"
    return who


def _may(caller: Caller, groups: set[int], st: os.stat_result, want: int) -> bool:
    """POSIX mode-bit check (owner bits, else group bits, else other bits); ACLs not consulted."""
    if st.st_uid == caller.uid:
        shift = 6
    elif st.st_gid in groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & want == want


def _not_daemon_state(daemon: Daemon, path: str, what: str) -> str:
    """Refuse, for everyone, a client-named path into the daemon's own state; return it real."""
    real = os.path.realpath(path)
    state = os.path.realpath(daemon.options.state_dir)
    socket_files = {os.path.realpath(daemon.options.socket + suffix) for suffix in ("", ".lock")}
    if real == state or real.startswith(state.rstrip("/") + "/") or real in socket_files:
        raise Refused("permission", f"{what} {path} is part of the daemon's own state "
                      f"({state}, its socket); choose a path in your project directory")
    return real


def _check_client_path(daemon: Daemon, caller: Caller, path: str, what: str) -> None:
    """Refuse a path the daemon would write for a client unless that client could write there.

    The daemon may run as another user (the mosaic service user, or root): without this, a
    client could make it create files where the client itself may not. The check is on the
    nearest existing directory of the path (write + search) and search on every directory above.
    """
    real = _not_daemon_state(daemon, path, what)
    if caller.uid == 0 or caller.uid == os.getuid():
        return  # root, or the daemon's own user: the kernel applies the same rules to both
    if caller.uid is None:
        raise Refused("permission", "the daemon could not learn who you are; nothing was done")
    try:
        user = pwd.getpwuid(caller.uid)
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    except KeyError:
        groups = set()
    if caller.gid is not None:
        groups.add(caller.gid)
    directory = real
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    blocked = None
    if not _may(caller, groups, os.stat(directory), 0o3):
        blocked = directory
    parent = directory
    while blocked is None and parent != "/":
        parent = os.path.dirname(parent)
        if not _may(caller, groups, os.stat(parent), 0o1):
            blocked = parent
    if blocked is not None:
        raise Refused("permission", f"{what} {path}: you ({caller.name}) may not write in "
                      f"{blocked}, so the daemon will not write there for you; choose a "
                      "directory you can write. Nothing was queued.")


def _check_owner(daemon: Daemon, caller: Caller, db: str, run_ids: list[int], verb: str) -> None:
    if caller.is_admin(daemon.options.admin_gid):
        return
    store = daemon.scheduler.stores[db]
    for run_id in run_ids:
        owner_uid, owner = store.owner_of(run_id)
        # A run whose owner the daemon could not learn is left to administrators.
        if owner_uid is None or owner_uid != caller.uid:
            who = owner or owner_uid or "an unknown user"
            raise Refused("permission", f"run {run_id} belongs to {who}; only its "
                          f"owner or an administrator ({_admins(daemon)}) may {verb} it. "
                          "Nothing was changed.")


def _pause_scope(daemon: Daemon, caller: Caller, args: dict[str, Any], verb: str) -> int | None:
    """Whose submissions `pause`/`resume` act on: None for the whole daemon (`--all` by an
    administrator, or any call on a per-user daemon, where every run is the caller's), else the
    caller's uid: on a shared daemon a user pauses and resumes only their own submissions."""
    if args.get("all"):
        if not caller.is_admin(daemon.options.admin_gid):
            raise Refused("permission", f"only {_admins(daemon)} may {verb} the whole daemon "
                          f"(--all); you are {caller.name}. Nothing was changed.")
        return None
    if caller.uid == os.getuid():
        return None
    if caller.uid is None:
        raise Refused("permission", "the daemon could not tell who you are; nothing was changed")
    return caller.uid


def handle_ping(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    return {"pid": os.getpid(), "version": PROTOCOL_VERSION, "socket": daemon.options.socket,
            "caller": caller.name, "uid": caller.uid}


def handle_submit(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    _check_client_path(daemon, caller, _study(args), "database")
    run_files = args["process"].get("run_files_path")
    if isinstance(run_files, str) and run_files:
        _check_client_path(daemon, caller, run_files, "run_files_path")
    return daemon.scheduler.submit(_study(args), args["config_path"], args["process"],
                                   args["monitor"], args["pipelines"], caller.uid, caller.name)


def handle_status(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    limit = max(0, min(int(args.get("limit", 10)), 1000))
    reply = daemon.scheduler.status(args.get("db"), limit, caller.uid, bool(args.get("mine")))
    if args.get("db") and args.get("submission") is not None:
        store = daemon.scheduler.open_study(args["db"], create=False)
        reply["submission_counts"] = store.submission_counts(args["submission"])
    # Owners of the listed finished runs, and --mine for them (the scheduler filters running).
    for study in reply.get("studies", []):
        store = daemon.scheduler.stores.get(study.get("db"))
        if store is None:
            continue
        for key in ("done", "failed"):
            kept = []
            for row in study.get(key) or []:
                owner_uid, row["owner"] = store.owner_of(row["run_id"])
                if not args.get("mine") or owner_uid == caller.uid:
                    kept.append(row)
            study[key] = kept
    return reply


def handle_pause(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    scope = _pause_scope(daemon, caller, args, "pause")
    return daemon.scheduler.pause(bool(args.get("now")), scope)


def handle_resume(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    scope = _pause_scope(daemon, caller, args, "resume")
    return daemon.scheduler.resume(scope)


def handle_pending(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    """The not-yet-run pipelines with their PROCESS/MONITOR, for `pause FILE.json`."""
    out = []
    for (study, submission_id), queue in daemon.scheduler.queues.items():
        if args.get("db") and study != args["db"]:
            continue
        submission = daemon.scheduler.submissions[(study, submission_id)]
        if submission.owner_uid != caller.uid and not caller.is_admin(daemon.options.admin_gid):
            continue  # other users' pipelines are theirs to save
        out.append({"db": study, "process": submission.process, "monitor": submission.monitor,
                    "run_ids": [r.run_id for r in queue],
                    "pipelines": [r.modules for r in queue]})
    return out


def handle_cancel(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    db = _study(args)
    _not_daemon_state(daemon, db, "database")
    run_ids = daemon.scheduler.select(db, args["selection"])
    _check_owner(daemon, caller, db, run_ids, "cancel")
    reason = str(args.get("reason") or "cancelled by request")[:300]
    return {"selected": run_ids, **daemon.scheduler.cancel(db, run_ids, reason)}


def handle_rerun(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    db = _study(args)
    _not_daemon_state(daemon, db, "database")
    run_ids = daemon.scheduler.select(db, args["selection"])
    _check_owner(daemon, caller, db, run_ids, "rerun")
    return {"selected": run_ids, **daemon.scheduler.rerun(db, run_ids, int(args["epochs"]))}


def handle_rekey(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    """Write `{type}_key` params: keys is a list of [run_id, param_name, key]."""
    db = _study(args)
    _not_daemon_state(daemon, db, "database")
    store = daemon.scheduler.open_study(db, create=False)
    changes = []
    for item in args["keys"]:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)
                and isinstance(item[1], str) and item[1].endswith("_key")
                and isinstance(item[2], str)):
            raise Refused("invalid", "rekey items must be [run_id, '<type>_key', key]")
        changes.append((item[0], item[1], item[2]))
    unknown = sorted({c[0] for c in changes if store.status_of(c[0]) is None})
    if unknown:
        raise Refused("not_found", f"no run {', '.join(map(str, unknown[:10]))} in {db}; "
                      "nothing was changed")
    _check_owner(daemon, caller, db, sorted({c[0] for c in changes}), "rekey")
    store.set_params(changes)
    return {"changed": len(changes)}


def handle_show(daemon: Daemon, caller: Caller, args: dict[str, Any]) -> Any:
    db = _study(args)
    _not_daemon_state(daemon, db, "database")
    store = daemon.scheduler.open_study(db, create=False)
    info = store.describe(args["run_id"])
    if info is None:
        raise Refused("not_found", f"no run {args['run_id']} in {db}")
    active = daemon.scheduler.active.get((db, args["run_id"]))
    if active is not None:
        info["live"] = {"epoch": active.epoch, "worker": active.worker.worker_id,
                        "slot": active.worker.slot.label, "pid": active.worker.pid}
    if info["status"] == QUEUED:
        info["queued_ahead"] = daemon.scheduler.queued_ahead(db, args["run_id"])
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
