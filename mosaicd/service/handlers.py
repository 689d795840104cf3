"""The daemon's request handlers: one per request type of mosaic_client.protocol.REQUESTS,
named like the request (not always like the command: `mosaic run` sends `submit`; each
mosaic_client/commands/*.py docstring names the requests it sends), and the one dispatch table
that routes them.

The rule: a handler checks the caller's rights, shapes the arguments and makes one call to the
scheduler (mosaicd.scheduling.scheduler.Scheduler), whose registries are its own."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mosaic_client.protocol import (
    PROTOCOL_VERSION,
    REQUESTS,
    CancelReply,
    ErrorCode,
    PauseReply,
    PendingItem,
    PingReply,
    PriorityReply,
    RecordPlanReply,
    RekeyReply,
    RepeatReply,
    RerunReply,
    ResumeReply,
    ShowReply,
    ShutdownReply,
    StatusReply,
    StudyItem,
)
from mosaicd import owners
from mosaicd.errors import Refused
from mosaicd.scheduling.control import OwnerCheck
from mosaicd.scheduling.taking import Taking
from mosaicd.service import rights
from mosaicd.service.rights import Caller

if TYPE_CHECKING:
    from mosaicd.options import Options
    from mosaicd.scheduling.scheduler import Scheduler


@dataclass(frozen=True)
class Context:
    """What a handler may use of the daemon: its options, the scheduler, and a way to stop it
    (the server builds one; handlers never see the server itself)."""

    options: Options
    scheduler: Scheduler
    request_stop: Callable[[], None]


def _study(args: dict[str, Any]) -> str:
    db = args["db"]
    if not os.path.isabs(db):
        raise Refused(
            ErrorCode.INVALID, f"database path {db!r} must be absolute (the client sends it so)"
        )
    return db


def _admins(ctx: Context) -> str:
    """Who may act on everyone's runs, in words, for refusal messages."""
    who = "root"
    if os.getuid() != 0:
        try:
            who += f", {pwd.getpwuid(os.getuid()).pw_name} (the daemon's user)"
        except KeyError:
            who += f", uid {os.getuid()} (the daemon's user)"
    if ctx.options.admin_gid is not None:
        try:
            import grp

            who += f" and members of group {grp.getgrgid(ctx.options.admin_gid).gr_name}"
        except KeyError:
            who += f" and members of group {ctx.options.admin_gid}"
    return who


def _not_daemon_state(ctx: Context, path: str, what: str) -> str:
    """Refuse, for everyone, a client-named path into the daemon's own state; return it real."""
    return rights.not_daemon_state(ctx.options.state_dir, ctx.options.socket, path, what)


def _check_client_path(ctx: Context, caller: Caller, path: str, what: str) -> None:
    """Refuse a path the daemon would write for a client unless that client could write it."""
    real = _not_daemon_state(ctx, path, what)
    rights.check_writable(ctx.scheduler.registry, caller, path, real, what)


def _readable_study(ctx: Context, caller: Caller, args: dict[str, Any]) -> str:
    """The request's study, refused unless the caller could read the file themself."""
    db = _study(args)
    _not_daemon_state(ctx, db, "database")
    rights.check_readable(ctx.scheduler.registry, caller, db, "database")
    return db


def _changed_study(ctx: Context, caller: Caller, args: dict[str, Any]) -> str:
    """The study of a request that changes its runs (cancel, rerun, rekey, repeat), refused
    unless the caller could read the file themself, before any selection runs on it or anything
    is opened: a selection's SQL (and what the reply says of the runs it chose) is a read of
    the study. Administrators of the runs may act on every study."""
    db = _study(args)
    _not_daemon_state(ctx, db, "database")
    if not caller.is_admin(ctx.options.admin_gid):
        rights.check_readable(ctx.scheduler.registry, caller, db, "database")
    return db


def _owner_check(ctx: Context, caller: Caller, verb: str) -> OwnerCheck:
    """The caller's rights over the runs a request changes: the scheduler hands it each run's
    owner before it changes anything. None: an administrator may change every run."""
    if caller.is_admin(ctx.options.admin_gid):
        return None

    def check(owners: list[tuple[int, int | None, str | None]], named: bool) -> None:
        for run_id, owner_uid, owner in owners:
            # A run whose owner the daemon could not learn is left to administrators.
            if owner_uid is None or owner_uid != caller.uid:
                who = owner or owner_uid or "an unknown user"
                # A run id the caller did not name (a -request chose it) is not repeated.
                run = f"run {run_id}" if named else "a selected run"
                raise Refused(
                    ErrorCode.PERMISSION,
                    f"{run} belongs to {who}; only its "
                    f"owner or an administrator ({_admins(ctx)}) may {verb} it. "
                    "Nothing was changed.",
                )

    return check


def _pause_scope(ctx: Context, caller: Caller, args: dict[str, Any], verb: str) -> int | None:
    """Whose submissions `pause`/`resume` act on: None for the whole daemon (`--all` by an
    administrator, or any call on a per-user daemon, where every run is the caller's), else the
    caller's uid: on a shared daemon a user pauses and resumes only their own submissions."""
    if args.get("all"):
        if not caller.is_admin(ctx.options.admin_gid):
            raise Refused(
                ErrorCode.PERMISSION,
                f"only {_admins(ctx)} may {verb} the whole "
                f"daemon (--all); you are {caller.name}. Nothing was changed.",
            )
        return None
    if caller.uid == os.getuid():
        return None
    if caller.uid is None:
        raise Refused(
            ErrorCode.PERMISSION, "the daemon could not tell who you are; nothing was changed"
        )
    return caller.uid


def handle_ping(ctx: Context, caller: Caller, args: dict[str, Any]) -> PingReply:
    return {
        "pid": os.getpid(),
        "version": PROTOCOL_VERSION,
        "socket": ctx.options.socket,
        "caller": caller.name,
        "uid": caller.uid,
    }


def handle_submit(ctx: Context, caller: Caller, args: dict[str, Any]) -> Taking:
    """Taken in steps (mosaicd.scheduling.taking): the server replies once it is all taken."""
    db = _study(args)
    _check_client_path(ctx, caller, db, "database")
    run_files = args["process"].get("run_files_path")
    if isinstance(run_files, str) and run_files:
        _check_client_path(ctx, caller, run_files, "run_files_path")

    if ctx.options.socket_group is not None and caller.uid == 0:
        raise Refused(
            ErrorCode.PERMISSION,
            "a shared daemon (--socket-group) runs no one's code as root; submit as your own "
            "user. Nothing was queued.",
        )
    # On a shared daemon the caller's runs execute as the caller (mosaicd.owners): one that
    # cannot switch users refuses rather than run someone's code as itself.
    owner = None
    if caller.uid is not None and caller.uid != os.geteuid():
        owner = owners.lookup(caller.uid, caller.gid)
        try:
            owners.require_switch(owner)
        except owners.CannotSwitch as exc:
            raise Refused(ErrorCode.PERMISSION, f"{exc}. Nothing was queued.") from None

    return ctx.scheduler.submit(
        db,
        args["config_path"],
        args["process"],
        args["monitor"],
        args["pipelines"],
        caller.uid,
        caller.name,
        owner,
        int(args.get("priority") or 0),
        args.get("search"),
    )


def handle_status(ctx: Context, caller: Caller, args: dict[str, Any]) -> StatusReply:
    limit = max(0, min(int(args.get("limit", 10)), 1000))
    # Full details only of the studies the caller may read (their files' rights, as for `show`
    # and `studies`); administrators of the runs see every study, as they may act on every run.
    everything = caller.is_admin(ctx.options.admin_gid)
    return ctx.scheduler.status(
        args.get("db"),
        limit,
        caller.uid,
        bool(args.get("mine")),
        args.get("submission"),
        None
        if everything
        else (lambda paths: rights.readable(ctx.scheduler.registry, caller, paths)),
        bool(args.get("users")),
    )


def handle_pause(ctx: Context, caller: Caller, args: dict[str, Any]) -> PauseReply:
    scope = _pause_scope(ctx, caller, args, "pause")
    return ctx.scheduler.hold(bool(args.get("now")), scope)


def handle_resume(ctx: Context, caller: Caller, args: dict[str, Any]) -> ResumeReply:
    scope = _pause_scope(ctx, caller, args, "resume")
    return ctx.scheduler.release(scope)


def handle_pending(ctx: Context, caller: Caller, args: dict[str, Any]) -> list[PendingItem]:
    """The not-yet-run pipelines with their PROCESS/MONITOR, for `pause FILE.json`."""
    return ctx.scheduler.pending(
        args.get("db"), caller.uid, everyone=caller.is_admin(ctx.options.admin_gid)
    )


def handle_cancel(ctx: Context, caller: Caller, args: dict[str, Any]) -> CancelReply:
    db = _changed_study(ctx, caller, args)
    reason = str(args.get("reason") or "cancelled by request")[:300]
    return ctx.scheduler.cancel(db, args["selection"], reason, _owner_check(ctx, caller, "cancel"))


def handle_rerun(ctx: Context, caller: Caller, args: dict[str, Any]) -> RerunReply:
    db = _changed_study(ctx, caller, args)
    return ctx.scheduler.rerun(
        db, args["selection"], int(args["epochs"]), _owner_check(ctx, caller, "rerun")
    )


def handle_rekey(ctx: Context, caller: Caller, args: dict[str, Any]) -> RekeyReply:
    """Write `{type}_key` params: keys is a list of [run_id, param_name, key]."""
    db = _changed_study(ctx, caller, args)
    changes = []
    for item in args["keys"]:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], int)
            and isinstance(item[1], str)
            and item[1].endswith("_key")
            and isinstance(item[2], str)
        ):
            raise Refused(ErrorCode.INVALID, "rekey items must be [run_id, '<type>_key', key]")
        changes.append((item[0], item[1], item[2]))
    return ctx.scheduler.rekey(db, changes, _owner_check(ctx, caller, "rekey"))


def handle_repeat(ctx: Context, caller: Caller, args: dict[str, Any]) -> RepeatReply:
    """More repetitions of the selected runs' configuration groups: the caller must own those
    runs (as for rerun), may read the study and may write it (as for submit): the new runs go
    in it."""
    db = _changed_study(ctx, caller, args)
    _check_client_path(ctx, caller, db, "database")
    return ctx.scheduler.repeat(
        db, args["selection"], int(args["add"]), _owner_check(ctx, caller, "repeat")
    )


def handle_record_plan(ctx: Context, caller: Caller, args: dict[str, Any]) -> RecordPlanReply:
    """Keep a sequential plan in the study: its readers who queued runs into it, or an
    administrator (the scheduler checks the owner and the plan's shape)."""
    db = _changed_study(ctx, caller, args)
    return ctx.scheduler.record_plan(
        db, args["plan"], caller.uid, caller.is_admin(ctx.options.admin_gid)
    )


def handle_show(ctx: Context, caller: Caller, args: dict[str, Any]) -> ShowReply:
    return ctx.scheduler.show(_readable_study(ctx, caller, args), args["run_id"])


def handle_priority(ctx: Context, caller: Caller, args: dict[str, Any]) -> PriorityReply:
    """A submission's priority among its owner's runs: its owner's (or an administrator's)."""
    db = _changed_study(ctx, caller, args)
    return ctx.scheduler.set_priority(
        db,
        int(args["priority"]),
        args.get("submission"),
        caller.uid,
        caller.is_admin(ctx.options.admin_gid),
    )


def handle_studies(ctx: Context, caller: Caller, args: dict[str, Any]) -> list[StudyItem]:
    # What a user may see through the daemon is what they could read themself.
    return ctx.scheduler.studies(
        lambda paths: rights.readable(ctx.scheduler.registry, caller, paths)
    )


def handle_shutdown(ctx: Context, caller: Caller, args: dict[str, Any]) -> ShutdownReply:
    if not caller.is_admin(ctx.options.admin_gid):
        raise Refused(
            ErrorCode.PERMISSION, "only the daemon's user or an administrator may stop it"
        )
    ctx.request_stop()
    return {"stopping": True}


Handler = Callable[[Context, Caller, dict[str, Any]], Any]

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
    "repeat": handle_repeat,
    "show": handle_show,
    "priority": handle_priority,
    "studies": handle_studies,
    "shutdown": handle_shutdown,
    "record_plan": handle_record_plan,
}

assert set(DISPATCH) == set(REQUESTS), "every request type needs exactly one handler"
