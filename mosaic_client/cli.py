"""`mosaic`: the thin client. One function per command, named like the daemon handler it calls.

Start-up must stay fast: no torch anywhere here, and matplotlib only inside the plot commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mosaic_client import paths, protocol
from mosaic_client import selection as selections
from mosaic_client.connection import Client, DaemonUnavailable, daemon_log_path, start_daemon

if TYPE_CHECKING:
    from mosaic_client.config import ExpandedConfig

# Exit codes (docs/cli.md).
OK, FAILED, BAD_INPUT, NO_DAEMON, DENIED, INTERRUPTED = 0, 1, 2, 3, 4, 130


class CommandError(Exception):
    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _err(message: str) -> None:
    print(f"mosaic: {message}", file=sys.stderr)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def _call(args: argparse.Namespace, name: str, **fields: Any) -> Any:
    with _client(args) as client:
        return client.request(name, **fields)


def resolve_db(db: str, config_dir: str | None = None) -> str:
    """A database path: the current directory first, then the config file's, sent absolute."""
    candidate = os.path.abspath(db)
    if not os.path.exists(candidate) and config_dir and not os.path.isabs(db):
        alternative = os.path.join(config_dir, db)
        if os.path.exists(alternative):
            return os.path.abspath(alternative)
    parent = os.path.dirname(candidate)
    if not os.path.isdir(parent):
        raise CommandError(f"directory {parent} for the database does not exist; create it "
                           "or give another path", BAD_INPUT)
    if not os.path.exists(candidate) and not os.access(parent, os.W_OK):
        raise CommandError(f"cannot create the database in {parent}: not writable by you",
                           BAD_INPUT)
    return candidate


def existing_db(db: str) -> str:
    path = os.path.abspath(db)
    if not os.path.isfile(path):
        raise CommandError(f"no database at {path}; give the path of a study database "
                           "(`mosaic run CONFIG DB` creates one)", BAD_INPUT)
    return path


def _load(config: str) -> ExpandedConfig:
    # Imported here: only the commands that read a config pay for the config language.
    from mosaic_client.config import ConfigError, load_config

    try:
        expanded = load_config(config)
    except ConfigError as exc:
        for warning in exc.warnings:
            print(f"mosaic: warning: {warning}", file=sys.stderr)
        raise CommandError(f"{len(exc.problems)} problem(s) in {config}; nothing was queued:\n"
                           + "\n".join(f"  {p}" for p in exc.problems), BAD_INPUT) from None
    for warning in expanded.warnings:
        print(f"mosaic: warning: {warning}", file=sys.stderr)
    return expanded


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return selections.make_selection(args.id, args.request, args.param_name_and_value,
                                         args.param_name_and_value_low_threshold,
                                         args.param_name_and_value_high_threshold)
    except selections.SelectionError as exc:
        raise CommandError(str(exc), BAD_INPUT) from None


def socket_denied(socket_path: str) -> str | None:
    """Why the file system keeps this user from the daemon's socket, or None if it does not.

    On a shared box the socket is 0660 in a 0750 directory of the users' group: someone outside
    that group gets EACCES, which must read as "ask to be let in", not "start a daemon"."""
    blocked = None
    directory = os.path.dirname(socket_path)
    while directory not in ("", "/"):
        if os.path.isdir(directory) and not os.access(directory, os.X_OK):
            blocked = directory  # the outermost one wins: it is the one to fix first
        directory = os.path.dirname(directory)
    if blocked is None:
        if not os.path.exists(socket_path) or os.access(socket_path, os.R_OK | os.W_OK):
            return None
        blocked = socket_path
    import grp
    import pwd

    try:
        group = grp.getgrgid(os.stat(blocked).st_gid).gr_name
    except (KeyError, OSError):
        group = "the socket's group"
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (f"permission denied: you may not use the mosaicd socket {socket_path} ({blocked} "
            f"is closed to you). Only members of group {group} may; ask the administrator to "
            f"add you (usermod -aG {group} {user}), then log in again.")


def _ensure_daemon(args: argparse.Namespace) -> None:
    with _client(args) as client:
        try:
            client.request("ping", timeout=5.0)
            return
        except DaemonUnavailable:
            if args.no_autostart or socket_denied(args.socket or paths.default_socket_path()):
                raise  # a daemon we may not reach is still a daemon: do not start another
    pid = start_daemon(args.socket or paths.default_socket_path())
    print(f"mosaic: started mosaicd (pid {pid}) on {args.socket or paths.default_socket_path()};"
          f" its log is {daemon_log_path()}", file=sys.stderr)


# -- commands (each mirrors mosaicd.handlers.handle_<name>) -----------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from mosaic_client.config import pipelines_to_json

    expanded = _load(args.config)
    with open(args.out, "w") as fh:
        fh.write(pipelines_to_json(expanded.pipelines))
    print(f"wrote {len(expanded.pipelines)} pipeline(s) to {args.out}")
    return OK


def cmd_run(args: argparse.Namespace) -> int:
    """Client side of handle_submit."""
    expanded = _load(args.config)
    db = resolve_db(args.db, os.path.dirname(expanded.config_path))
    _ensure_daemon(args)
    reply = _call(args, "submit", db=db, config_path=expanded.config_path,
                  process=expanded.process, monitor=expanded.monitor,
                  pipelines=expanded.pipelines)
    ids = reply["run_ids"]
    span = f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    print(f"queued {len(ids)} pipeline(s) as runs {span} in {db}")
    if reply.get("paused"):
        print("note: paused (the daemon, or your own submissions): they start after "
              "`mosaic resume`")
    if not args.follow:
        print("watch them with `mosaic status` (or `mosaic status --watch`)")
        return OK
    return follow(args, db, reply["submission_id"], len(ids))


def follow(args: argparse.Namespace, db: str, submission_id: int, total: int) -> int:
    tty = sys.stderr.isatty()
    started = time.monotonic()
    last_line = ""
    try:
        with _client(args) as client:
            while True:
                status = client.request("status", db=db, limit=0, submission=submission_id)
                counts = status.get("submission_counts") or {}
                done, failed = counts.get("done", 0), counts.get("failed", 0)
                cancelled = counts.get("cancelled", 0)
                finished = done + failed + cancelled
                line = progress_line(done, failed, cancelled, counts.get("running", 0), total,
                                     time.monotonic() - started, status.get("paused", False))
                if tty:
                    print("\r" + line.ljust(len(last_line)), end="", file=sys.stderr, flush=True)
                elif line != last_line:
                    print(line, file=sys.stderr, flush=True)
                last_line = line
                if finished >= total:
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nmosaic: stopped following; the runs go on (`mosaic status`)", file=sys.stderr)
        return INTERRUPTED
    if tty:
        print(file=sys.stderr)
    print(f"finished: {done} done, {failed} failed, {cancelled} cancelled")
    return OK if failed == 0 else FAILED


def progress_line(done: int, failed: int, cancelled: int, running: int, total: int,
                  elapsed: float, paused: bool) -> str:
    finished = done + failed + cancelled
    width = 30
    filled = int(width * finished / total) if total else width
    eta = ""
    if 0 < finished < total:
        remaining = elapsed / finished * (total - finished)
        eta = f", ETA {int(remaining // 60)}:{int(remaining % 60):02d}"
    flag = " [paused]" if paused else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} "
            f"({done} done, {failed} failed, {running} running){eta}{flag}")


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _others(run: dict[str, Any]) -> str:
    """Name the owner of a run that is not the caller's (on a shared daemon)."""
    import getpass

    owner = run.get("owner")
    return f"  [owner {owner}]" if owner and owner != getpass.getuser() else ""


def render_status(status: dict[str, Any], limit: int) -> str:
    lines = [f"mosaicd: {'PAUSED' if status['paused'] else 'running'}, "
             f"{len(status['workers'])} worker(s), {status['queued']} queued"]
    for worker in status["workers"]:
        run = f"run {worker['run_id']}" if worker["run_id"] is not None else worker["state"]

        def mib(n: int | None) -> str:
            return "-" if n is None else f"{n / 2**20:.0f} MiB"

        # GPU memory only where NVML answered: this worker's share, else the whole card's.
        gpu = ""
        if worker.get("gpu_memory") is not None:
            gpu = f"  gpu mem {mib(worker['gpu_memory'])}"
        elif worker.get("gpu_memory_device") is not None:
            gpu = (f"  gpu mem (card) {mib(worker['gpu_memory_device'])}/"
                   f"{mib(worker.get('gpu_memory_total'))}")
        lines.append(f"  worker {worker['id']:<4} {worker['slot']:<8} pid {worker['pid']:<7} "
                     f"{run:<10} cpu {_fmt(worker.get('cpu_percent'), '.0f'):>4}%  rss "
                     f"{mib(worker.get('rss'))}{gpu}")
    for study in status["studies"]:
        counts = ", ".join(f"{n} {s}" for s, n in study["counts"].items() if n) or "empty"
        lines.append("")
        lines.append(f"study {study['db']}: {counts}")
        lines.append("  Running:")
        for run in study["running"]:
            lines.append(f"    {run['run_id']:>5}  epoch {run['epoch']}/{run['epochs']}  "
                         f"train_loss {_fmt(run['train_loss'])}  test_loss "
                         f"{_fmt(run['test_loss'])}  {run['pipeline']}{_others(run)}")
        lines.append(f"  Done (latest {limit}):")
        for run in study["done"]:
            lines.append(f"    {run['run_id']:>5}  train_loss {_fmt(run['train_loss'])}  "
                         f"test_loss {_fmt(run['test_loss'])}  duration "
                         f"{_fmt(run['duration'], '.2f')}s  {run['pipeline']}{_others(run)}")
        lines.append(f"  Error (latest {limit}):")
        for run in study["failed"]:
            first = (run["return_status"] or "").strip().splitlines()
            lines.append(f"    {run['run_id']:>5}  {run['pipeline']}{_others(run)}")
            lines.append(f"           {first[0] if first else ''}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"limit": args.limit, "mine": args.mine}
    if args.db:
        fields["db"] = existing_db(args.db)
    if args.watch:
        from mosaic_client.watch import watch

        return watch(args, fields)
    status = _call(args, "status", **fields)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(render_status(status, args.limit))
    return OK


def cmd_pause(args: argparse.Namespace) -> int:
    """Client side of handle_pause (and, with FILE, handle_pending + handle_cancel)."""
    reply = _call(args, "pause", now=args.now, all=args.all)
    if args.file:
        # The seed's form: the not-yet-run pipelines leave the queue for FILE, where they can
        # be edited, and `mosaic resume FILE` queues them again. The client writes the file
        # with the caller's own permissions; the runs leave the queue only once it is written.
        pending = _call(args, "pending")
        tmp = f"{args.file}.partial"
        with open(tmp, "w") as fh:
            json.dump(pending, fh, indent=1)
        os.replace(tmp, args.file)
        moved = 0
        for entry in pending:
            if entry["run_ids"]:
                result = _call(args, "cancel", db=entry["db"],
                               selection={"kind": "ids", "ids": entry["run_ids"]},
                               reason=f"moved to {os.path.abspath(args.file)} by pause")
                moved += len(result["cancelled"])
        print(f"wrote {moved} not-yet-run pipeline(s) to {args.file}; "
              f"`mosaic resume {args.file}` queues them again")
    extra = (f"; parking {reply['parking']} running run(s) at their next epoch boundary"
             if args.now else "; running runs finish")
    if reply.get("scope") == "owner":
        print(f"paused your submissions: none of your runs starts{extra}. "
              "`mosaic resume` starts them again.")
    else:
        print(f"paused: no new run starts{extra}. `mosaic resume` starts again.")
    return OK


def cmd_resume(args: argparse.Namespace) -> int:
    """Client side of handle_resume (with FILE, also handle_submit per saved study)."""
    if args.file:
        try:
            with open(args.file) as fh:
                saved = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise CommandError(f"cannot read {args.file}: {exc}; give a file written by "
                               "`mosaic pause FILE`", BAD_INPUT) from None
        if not isinstance(saved, list) or not all(
                isinstance(e, dict) and {"db", "process", "monitor", "pipelines"} <= set(e)
                for e in saved):
            raise CommandError(f"{args.file} is not a file written by `mosaic pause FILE` "
                               "(a list of {db, process, monitor, pipelines})", BAD_INPUT)
        for entry in saved:
            if entry["pipelines"]:
                reply = _call(args, "submit", db=entry["db"],
                              config_path=os.path.abspath(args.file), process=entry["process"],
                              monitor=entry["monitor"], pipelines=entry["pipelines"])
                ids = reply["run_ids"]
                print(f"queued {len(ids)} pipeline(s) from {args.file} as runs {_span(ids)} "
                      f"in {entry['db']}")
    reply = _call(args, "resume", all=args.all)
    whose = "your submissions" if reply.get("scope") == "owner" else "the daemon"
    print(f"resumed {whose}; {reply['resumed']} parked run(s) continue from their checkpoint")
    return OK


def _rows_summary(label: str, ids: list[int]) -> str:
    return f"{label} {len(ids)} run(s)" + (f": {_span(ids)}" if ids else "")


def _span(ids: Sequence[int]) -> str:
    if not ids:
        return ""
    parts, start, prev = [], ids[0], ids[0]
    for i in list(ids[1:]) + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def cmd_cancel(args: argparse.Namespace) -> int:
    reply = _call(args, "cancel", db=existing_db(args.db), selection=_selection(args))
    if not reply["selected"]:
        raise CommandError(f"the selection ({selections.describe(_selection(args))}) matches no "
                           f"run of {args.db}; nothing was cancelled. `mosaic status --db "
                           f"{args.db}` lists its runs", BAD_INPUT)
    print(_rows_summary("cancelled", reply["cancelled"]))
    if reply["skipped"]:
        print(_rows_summary("left alone (already finished)", reply["skipped"]))
    return OK


def cmd_rerun(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.config):
        raise CommandError(f"config file {args.config} does not exist; give the config the "
                           "runs were queued from (`mosaic show RUN` shows its settings)",
                           BAD_INPUT)
    if args.epochs is None or args.epochs < 1:
        raise CommandError("give -epochs N (N >= 1): how many more epochs to train", BAD_INPUT)
    db = existing_db(args.db)
    reply = _call(args, "rerun", db=db, selection=_selection(args), epochs=args.epochs)
    if not reply["selected"]:
        raise CommandError(f"the selection ({selections.describe(_selection(args))}) matches no "
                           f"run of {args.db}; nothing was queued. `mosaic status --db "
                           f"{args.db}` lists its runs", BAD_INPUT)
    print(_rows_summary(f"queued for {args.epochs} more epoch(s):", reply["queued"]))
    if reply["skipped"]:
        print(_rows_summary("skipped (queued or running):", reply["skipped"]))
    return OK


def cmd_savedb(args: argparse.Namespace) -> int:
    if args.db:
        source = existing_db(args.db)
    else:
        studies = _call(args, "studies")
        if len(studies) != 1:
            known = ", ".join(s["db"] for s in studies) or "none yet"
            raise CommandError(f"say which study to copy with --db DB (the daemon knows: "
                               f"{known})", BAD_INPUT)
        source = studies[0]["db"]
    target = os.path.abspath(args.copy)
    if os.path.exists(target) and os.path.samefile(source, target):
        raise CommandError("the copy would overwrite the live database; give another path",
                           BAD_INPUT)
    copy_database(source, target)
    print(f"copied {source} to {target}")
    return OK


def copy_database(source: str, target: str) -> None:
    """SQLite's online backup from a read-only connection: consistent while the daemon writes."""
    tmp = f"{target}.partial"
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30.0)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst, pages=1024)
            ok = dst.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dst.close()
        if ok != "ok":
            os.unlink(tmp)
            raise CommandError(f"the copy failed its integrity check ({ok}); nothing written. "
                               f"Check the source with `sqlite3 {source} 'PRAGMA "
                               "integrity_check'`")
        os.replace(tmp, target)
    finally:
        src.close()


def cmd_shutdown(args: argparse.Namespace) -> int:
    _call(args, "shutdown")
    print("mosaicd is stopping (running runs are checkpointed)")
    return OK


def cmd_show(args: argparse.Namespace) -> int:
    info = _call(args, "show", db=_db_or_only(args), run_id=args.run)
    if args.json:
        print(json.dumps(info, indent=1))
        return OK
    print(f"run {info['run_id']}: {info['status']}")
    print(f"  pipeline: {info['pipeline']}")
    print(f"  seed: {info['seed']}, epochs target: {info['epochs_target']}, checkpoint at epoch "
          f"{info['checkpoint_epoch']}")
    if info.get("results"):
        print("  results: " + ", ".join(f"{k}={_fmt(v)}" for k, v in info["results"].items()))
    print("  parameters:")
    for name, value in info["params"].items():
        if name != "pipeline":
            print(f"    {name} = {value}")
    print("  history:")
    for event in info["events"]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
        print(f"    {stamp}  {event['from'] or '-'} -> {event['to']}  {event['detail'] or ''}")
    if info.get("queued_ahead") is not None:
        print(f"  queued: {info['queued_ahead']} run(s) of this study start before it")
    if info["history"]:
        print(f"  epochs recorded: {len(info['history'])}")
    if info["status"] == "failed" and info.get("return_status"):
        print("  failure:")
        print("    " + info["return_status"].replace("\n", "\n    "))
    return OK


def _db_or_only(args: argparse.Namespace) -> str:
    if args.db:
        return existing_db(args.db)
    studies = _call(args, "studies")
    if len(studies) != 1:
        known = ", ".join(s["db"] for s in studies) or "none yet"
        raise CommandError(f"say which study the run is in with --db DB (the daemon knows: "
                           f"{known})", BAD_INPUT)
    return str(studies[0]["db"])


def cmd_logs(args: argparse.Namespace) -> int:
    db = _db_or_only(args)
    info = _call(args, "show", db=db, run_id=args.run)
    rfp = info["params"].get("run_files_path")
    path = os.path.join(rfp, f"output_{args.run}.log")
    # Following a run that has not started yet means waiting for its output to appear.
    while args.follow and not os.path.exists(path) and info["status"] in ("queued", "running"):
        time.sleep(0.3)
        info = _call(args, "show", db=db, run_id=args.run)
    if not os.path.exists(path):
        hint = "; `mosaic logs RUN -f` waits for it" if info["status"] == "queued" else ""
        raise CommandError(f"run {args.run} has no output yet ({path}): it is "
                           f"{info['status']}{hint}")
    with open(path, "rb") as fh:
        sys.stdout.write(fh.read().decode(errors="replace"))
        sys.stdout.flush()
        if not args.follow:
            return OK
        try:
            with _client(args) as client:
                while True:
                    chunk = fh.read()
                    if chunk:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                        continue
                    status = client.request("show", db=db, run_id=args.run)["status"]
                    if status not in ("queued", "running"):
                        rest = fh.read()
                        sys.stdout.write(rest.decode(errors="replace"))
                        return OK
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return INTERRUPTED


def _analysis_db(path: str) -> sqlite3.Connection:
    from mosaic_client import analysis

    try:
        return analysis.open_readonly(os.path.abspath(path))
    except analysis.AnalysisError as exc:
        raise CommandError(str(exc), BAD_INPUT) from None


def _out_dir_exists(out: str) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CommandError(f"directory {parent} for {out} does not exist; create it first",
                           BAD_INPUT)


def cmd_plotloss(args: argparse.Namespace) -> int:
    """Loss curves from run_epochs alone: works on a savedb copy, no daemon needed."""
    from mosaic_client import analysis

    if not args.pdf.lower().endswith(".pdf"):
        raise CommandError(f"{args.pdf}: plotloss writes a multi-page PDF; end the name with "
                           ".pdf (use --png FILE.png for an image of the first page)", BAD_INPUT)
    if args.plot_size < 1 or args.plot_size > 10:
        raise CommandError(f"-plot_size {args.plot_size}: give 1 to 10 (runs per page side)",
                           BAD_INPUT)
    for out in (args.pdf, args.png):
        if out:
            _out_dir_exists(out)
    selection = _selection(args)
    conn = _analysis_db(args.db)
    try:
        try:
            run_ids = selections.resolve(conn, selection)
        except selections.SelectionError as exc:
            raise CommandError(str(exc), BAD_INPUT) from None
        if not run_ids:
            raise CommandError(f"the selection ({selections.describe(selection)}) matches no run "
                               f"in {args.db}; nothing was drawn", BAD_INPUT)
        runs = analysis.loss_histories(conn, run_ids)
    finally:
        conn.close()
    from mosaic_client import plots

    pages = plots.plot_losses(runs, args.pdf, args.plot_size, os.path.basename(args.db),
                              png=args.png)
    print(f"wrote {pages} page(s), {len(runs)} run(s), to {args.pdf}"
          + (f" (page 1 also as {args.png})" if args.png else ""))
    return OK


def cmd_metaplot(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    try:
        fmt = analysis.plot_format(args.out)
        analysis.check_criterion(args.criterion)
    except analysis.AnalysisError as exc:
        raise CommandError(str(exc), BAD_INPUT) from None
    _out_dir_exists(args.out)
    conn = _analysis_db(args.db)
    try:
        data = analysis.metaplot_data(conn, args.dataset_key, args.criterion)
    except analysis.AnalysisError as exc:
        raise CommandError(str(exc), BAD_INPUT) from None
    finally:
        conn.close()
    note = data.skipped_note()
    if note:
        print(f"note: {note}", file=sys.stderr)
    from mosaic_client import plots

    plots.plot_meta(data, args.out, args.spread, fmt)
    if args.data:
        with open(args.data, "w") as fh:
            json.dump(data.as_json(), fh, indent=1)
    points = sum(len(p) for p in data.series.values())
    print(f"wrote {args.out}: {args.criterion} of {data.used} run(s) as {points} point(s) on "
          f"{len(data.series)} model key(s)" + (f"; data in {args.data}" if args.data else ""))
    return OK


def cmd_rekey(args: argparse.Namespace) -> int:
    """The changes are worked out on a read-only connection; the daemon writes them."""
    from mosaic_client import analysis

    try:
        pipelines = analysis.load_pipelines(args.pipelines)
    except analysis.AnalysisError as exc:
        raise CommandError(str(exc), BAD_INPUT) from None
    db = existing_db(args.db)
    conn = _analysis_db(db)
    try:
        plan = analysis.rekey_plan(conn, pipelines, os.path.dirname(os.path.abspath(
            args.pipelines)))
    except analysis.AnalysisError as exc:
        raise CommandError(str(exc), BAD_INPUT) from None
    finally:
        conn.close()
    if not plan.matched_runs:
        raise CommandError(f"no pipeline of {args.pipelines} matches a run of {db} (compared "
                           "without their keys); nothing was changed", BAD_INPUT)
    if plan.changes:
        _ensure_daemon(args)
        _call(args, "rekey", db=db, keys=plan.changes)
    for (name, key), (matched, changed) in sorted(plan.per_key.items()):
        print(f"{name} = {key}: {matched} run(s), {changed} changed")
    if plan.unmatched:
        print(f"note: {len(plan.unmatched)} pipeline(s) of {args.pipelines} match no run: "
              f"#{_span(plan.unmatched)}", file=sys.stderr)
    print(f"{len(plan.matched_runs)} run(s) matched, {len(plan.changes)} key(s) written"
          if plan.changes else f"{len(plan.matched_runs)} run(s) matched; keys already up to "
          "date, nothing written")
    return OK


class _FormatThenOut(argparse.Action):
    """`--format json OUT`: argparse fills an optional positional before the options, so OUT
    written after `--format` would be refused; this takes it as OUT."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        fmt, *rest = values
        if fmt not in ("csv", "json"):
            parser.error(f"argument --format: invalid choice {fmt!r} (choose csv or json)")
        if len(rest) > 1 or (rest and namespace.out):
            parser.error("give at most one output file")
        namespace.format = fmt
        if rest:
            namespace.out = rest[0]


def cmd_export(args: argparse.Namespace) -> int:
    from mosaic_client import analysis

    if args.format is None:
        args.format = "json" if (args.out or "").lower().endswith(".json") else "csv"
    if args.out:
        _out_dir_exists(args.out)
    conn = _analysis_db(args.db)
    try:
        columns, rows = analysis.export_table(conn)
    finally:
        conn.close()
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        if args.format == "json":
            json.dump([dict(zip(columns, row)) for row in rows], out, indent=1)
            out.write("\n")
        else:
            import csv

            writer = csv.writer(out)
            writer.writerow(columns)
            writer.writerows(rows)
    except BrokenPipeError:
        # `mosaic export DB | head` is a normal use; the reader left, nothing went wrong.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"wrote {len(rows)} run(s), {len(columns)} column(s), to {args.out}")
    return OK


def cmd_completion(args: argparse.Namespace) -> int:
    from mosaic_client.completion import completion_script

    sys.stdout.write(completion_script(args.shell, build_parser()))
    return OK


# -- argument parsing -------------------------------------------------------------------------


def _add_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selection (exactly one)")
    group.add_argument("-id", "--id", metavar="IDS", help="run ids: 1-3,7 or all")
    group.add_argument("-request", "--request", metavar="SQL",
                       help="a read-only SELECT returning run ids")
    group.add_argument("-param_name_and_value", "--param", nargs=2, metavar=("NAME", "VALUE"),
                       dest="param_name_and_value", help="runs whose param NAME equals VALUE")
    group.add_argument("-param_name_and_value_low_threshold", "--param-le", nargs=2,
                       metavar=("NAME", "VALUE"), dest="param_name_and_value_low_threshold",
                       help="runs whose param NAME is <= VALUE")
    group.add_argument("-param_name_and_value_high_threshold", "--param-ge", nargs=2,
                       metavar=("NAME", "VALUE"), dest="param_name_and_value_high_threshold",
                       help="runs whose param NAME is >= VALUE")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, str]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosaic", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare many PyTorch pipelines: queue them into mosaicd, watch, analyse.",
        epilog="examples:\n"
               "  mosaic run examples/or_mlp/config.ini results.db --follow\n"
               "  mosaic status\n"
               "  mosaic pause --now && mosaic resume\n"
               "  mosaic rerun examples/or_mlp/config.ini results.db -id 1-3 -epochs 5\n"
               "  mosaic plotloss results.db losses.pdf -id all\n"
               "exit codes: 0 ok, 1 failed, 2 bad input, 3 no daemon, 4 not allowed, "
               "130 interrupted")
    parser.add_argument("--socket", default=None,
                        help="daemon socket (default $MOSAIC_SOCKET or the per-user socket)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
            example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "validate, expand and queue every pipeline of CONFIG into DB",
            "mosaic run examples/or_mlp/config.ini results.db --follow")
    p.add_argument("config", help="the study's INI file (docs/configuration.md)")
    p.add_argument("db", help="study database: created if missing, else the runs are added")
    p.add_argument("--follow", action="store_true", help="show progress until all runs end")
    p.add_argument("--no-autostart", action="store_true",
                   help="fail instead of starting a daemon when none answers")

    p = add("rerun", cmd_rerun, "train the selected runs for N more epochs",
            "mosaic rerun examples/or_mlp/config.ini results.db -id 1-3 -epochs 5")
    p.add_argument("config", help="the INI file the runs were queued from")
    p.add_argument("db", help="their study database")
    _add_selection(p)
    p.add_argument("-epochs", "--epochs", type=int, required=True,
                   help="how many more epochs to train, from each run's last checkpoint")

    p = add("status", cmd_status, "the daemon's state: workers, queue, runs", "mosaic status")
    p.add_argument("--db", help="only this study")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true",
                   help="live view, redrawn every --interval seconds (q or Ctrl-C quits); "
                        "not on a terminal: plain text each interval until no run is left")
    p.add_argument("--interval", type=float, default=1.0, help="--watch refresh in seconds")
    p.add_argument("--limit", type=int, default=10, help="latest done/failed runs shown")
    p.add_argument("--mine", action="store_true", help="only my runs")

    p = add("pause", cmd_pause, "stop starting new runs (--now: also park running ones)",
            "mosaic pause --now")
    p.add_argument("file", nargs="?", help="also write the not-yet-run pipelines to this JSON")
    p.add_argument("--now", action="store_true",
                   help="checkpoint running runs at their next epoch boundary and park them")
    p.add_argument("--all", action="store_true",
                   help="pause the whole shared daemon, everyone's runs (root and the admin "
                        "group only)")

    p = add("resume", cmd_resume, "start runs again (FILE: queue the pipelines saved in it)",
            "mosaic resume")
    p.add_argument("file", nargs="?")
    p.add_argument("--all", action="store_true",
                   help="resume the whole shared daemon (root and the admin group only)")

    p = add("cancel", cmd_cancel, "cancel queued or running runs", "mosaic cancel results.db -id 4")
    p.add_argument("db")
    _add_selection(p)

    p = add("savedb", cmd_savedb, "consistent copy of a study database while runs write to it",
            "mosaic savedb copy.db --db results.db")
    p.add_argument("copy")
    p.add_argument("--db", help="the study to copy (default: the daemon's only study)")

    p = add("plotloss", cmd_plotloss, "loss curves of the selected runs into a PDF",
            "mosaic plotloss results.db losses.pdf -id all")
    p.add_argument("db")
    p.add_argument("pdf")
    _add_selection(p)
    p.add_argument("-plot_size", "--plot-size", type=int, default=2, dest="plot_size")
    p.add_argument("--png", metavar="FILE.png", help="also draw the first page as a PNG image")

    p = add("metaplot", cmd_metaplot, "a criterion against nb_params, per model key",
            "mosaic metaplot results.db meta.png data_dataset_OR test_loss")
    p.add_argument("db")
    p.add_argument("out")
    p.add_argument("dataset_key")
    p.add_argument("criterion", help="train_loss, test_loss, train_acc, test_acc, nb_params, "
                   "duration(s), epochs, overfit, trainability or slope")
    p.add_argument("--spread", choices=["minmax", "std"], default="minmax",
                   help="error bars: min to max over runs (default) or standard deviation")
    p.add_argument("--data", metavar="OUT.json", help="also write the plotted points as JSON")

    p = add("rekey", cmd_rekey, "rewrite keys in DB from an edited pipelines file",
            "mosaic rekey pipelines.json results.db")
    p.add_argument("pipelines")
    p.add_argument("db")
    p.add_argument("--no-autostart", action="store_true",
                   help="fail instead of starting a daemon when none answers")

    p = add("export", cmd_export, "one row per run with params and results",
            "mosaic export results.db --format csv results.csv")
    p.add_argument("db")
    p.add_argument("out", nargs="?", help="output file (default: stdout)")
    p.add_argument("--format", nargs="+", action=_FormatThenOut, metavar="{csv,json}",
                   help="csv or json (default: from OUT's extension, else csv)")

    p = add("generate", cmd_generate, "write the expanded pipelines without running anything",
            "mosaic generate examples/or_mlp/config.ini out.json")
    p.add_argument("config")
    p.add_argument("out")

    p = add("show", cmd_show, "everything known about one run", "mosaic show 3 --db results.db")
    p.add_argument("run", type=int, help="run id")
    p.add_argument("--db", help="its study database (default: the daemon's only study)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("logs", cmd_logs, "a run's output (-f: follow it live)", "mosaic logs 3 -f")
    p.add_argument("run", type=int, help="run id")
    p.add_argument("--db", help="its study database (default: the daemon's only study)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new output until the run ends (waits if queued)")

    add("shutdown", cmd_shutdown, "stop the daemon (running runs are checkpointed)",
        "mosaic shutdown")

    p = add("completion", cmd_completion, "print a shell completion script (bash or zsh)",
            "mosaic completion bash > ~/.local/share/bash-completion/completions/mosaic")
    p.add_argument("shell", choices=["bash", "zsh"])

    # integration hook: registers mosaic_client/commands/web.py (issue 20) until the
    # per-command modules of issue 14 are registered in one place; the integrator replaces it.
    from mosaic_client.commands import web as web_command

    p = add(web_command.NAME, web_command.run, web_command.HELP, web_command.EXAMPLE)
    web_command.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return BAD_INPUT
    try:
        code = args.func(args)
    except CommandError as exc:
        _err(exc.message)
        code = exc.code
    except DaemonUnavailable as exc:
        denied = socket_denied(args.socket or paths.default_socket_path())
        _err(denied or str(exc))
        code = DENIED if denied else NO_DAEMON
    except protocol.ProtocolError as exc:
        _err(exc.message)
        code = {protocol.ErrorCode.PERMISSION: DENIED, protocol.ErrorCode.INVALID: BAD_INPUT,
                protocol.ErrorCode.NOT_FOUND: BAD_INPUT}.get(exc.code, FAILED)
    except sqlite3.DatabaseError as exc:
        _err(f"database error: {exc}; is the file a study database written by mosaicd "
             "(`mosaic status` lists the studies it knows)?")
        code = BAD_INPUT
    except OSError as exc:
        _err(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
             + "; check the path and its permissions")
        code = BAD_INPUT
    except KeyboardInterrupt:
        code = INTERRUPTED
    return code


def _seed(command: str) -> Callable[[], None]:
    def entry() -> None:
        sys.exit(main([command, *sys.argv[1:]]))
    entry.__name__ = f"seed_{command}"
    return entry


seed_run = _seed("run")
seed_rerun = _seed("rerun")
seed_status = _seed("status")
seed_pause = _seed("pause")
seed_resume = _seed("resume")
seed_savedb = _seed("savedb")
seed_plotloss = _seed("plotloss")
seed_metaplot = _seed("metaplot")
seed_rekey = _seed("rekey")
seed_generate = _seed("generate")


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
