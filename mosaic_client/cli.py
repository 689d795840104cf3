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
from typing import Any

from mosaic_client import paths, protocol
from mosaic_client import selection as selections
from mosaic_client.config import ConfigError, ExpandedConfig, load_config, pipelines_to_json
from mosaic_client.connection import Client, DaemonUnavailable, daemon_log_path, start_daemon

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
        raise CommandError(f"no database at {path}; give the path of a study database",
                           BAD_INPUT)
    return path


def _load(config: str) -> ExpandedConfig:
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


def _ensure_daemon(args: argparse.Namespace) -> None:
    with _client(args) as client:
        try:
            client.request("ping", timeout=5.0)
            return
        except DaemonUnavailable:
            if args.no_autostart:
                raise
    pid = start_daemon(args.socket or paths.default_socket_path())
    print(f"mosaic: started mosaicd (pid {pid}) on {args.socket or paths.default_socket_path()};"
          f" its log is {daemon_log_path()}", file=sys.stderr)


# -- commands (each mirrors mosaicd.handlers.handle_<name>) -----------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
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


def render_status(status: dict[str, Any], limit: int) -> str:
    lines = [f"mosaicd: {'PAUSED' if status['paused'] else 'running'}, "
             f"{len(status['workers'])} worker(s), {status['queued']} queued"]
    for worker in status["workers"]:
        run = f"run {worker['run_id']}" if worker["run_id"] is not None else worker["state"]
        lines.append(f"  worker {worker['id']:<4} {worker['slot']:<8} pid {worker['pid']:<7} "
                     f"{run}")
    for study in status["studies"]:
        counts = ", ".join(f"{n} {s}" for s, n in study["counts"].items() if n) or "empty"
        lines.append("")
        lines.append(f"study {study['db']}: {counts}")
        lines.append("  Running:")
        for run in study["running"]:
            lines.append(f"    {run['run_id']:>5}  epoch {run['epoch']}/{run['epochs']}  "
                         f"train_loss {_fmt(run['train_loss'])}  test_loss "
                         f"{_fmt(run['test_loss'])}  {run['pipeline']}")
        lines.append(f"  Done (latest {limit}):")
        for run in study["done"]:
            lines.append(f"    {run['run_id']:>5}  train_loss {_fmt(run['train_loss'])}  "
                         f"test_loss {_fmt(run['test_loss'])}  duration "
                         f"{_fmt(run['duration'], '.2f')}s  {run['pipeline']}")
        lines.append(f"  Error (latest {limit}):")
        for run in study["failed"]:
            first = (run["return_status"] or "").strip().splitlines()
            lines.append(f"    {run['run_id']:>5}  {run['pipeline']}")
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
    reply = _call(args, "pause", now=args.now)
    if args.file:
        pending = _call(args, "pending")
        with open(args.file, "w") as fh:
            json.dump(pending, fh, indent=1)
        n = sum(len(p["pipelines"]) for p in pending)
        print(f"wrote {n} not-yet-run pipeline(s) to {args.file}")
    extra = f"; parking {reply['parking']} running run(s) at their next epoch" if args.now else \
        "; running runs finish"
    print(f"paused: no new run starts{extra}. `mosaic resume` starts again.")
    return OK


def cmd_resume(args: argparse.Namespace) -> int:
    if args.file:
        try:
            with open(args.file) as fh:
                saved = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise CommandError(f"cannot read {args.file}: {exc}", BAD_INPUT) from None
        if not isinstance(saved, list):
            raise CommandError(f"{args.file} is not a file written by `mosaic pause FILE`",
                               BAD_INPUT)
        for entry in saved:
            if entry.get("pipelines"):
                # The daemon still holds these runs queued: they run when the daemon resumes.
                # A file from another machine or a deleted study is submitted anew.
                db = entry["db"]
                if not os.path.exists(db):
                    reply = _call(args, "submit", db=db, config_path=args.file,
                                  process=entry["process"], monitor=entry["monitor"],
                                  pipelines=entry["pipelines"])
                    print(f"queued {len(reply['run_ids'])} pipeline(s) from {args.file} in {db}")
    reply = _call(args, "resume")
    print(f"resumed; {reply['resumed']} parked run(s) continue from their checkpoint")
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
        raise CommandError("the selection matches no run; nothing was cancelled", BAD_INPUT)
    print(_rows_summary("cancelled", reply["cancelled"]))
    if reply["skipped"]:
        print(_rows_summary("left alone (already finished)", reply["skipped"]))
    return OK


def cmd_rerun(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.config):
        raise CommandError(f"config file {args.config} does not exist", BAD_INPUT)
    if args.epochs is None or args.epochs < 1:
        raise CommandError("give -epochs N (N >= 1): how many more epochs to train", BAD_INPUT)
    db = existing_db(args.db)
    reply = _call(args, "rerun", db=db, selection=_selection(args), epochs=args.epochs)
    if not reply["selected"]:
        raise CommandError("the selection matches no run; nothing was queued", BAD_INPUT)
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
            raise CommandError("the daemon serves several studies (or none): say which with "
                               "--db DB", BAD_INPUT)
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
            raise CommandError(f"the copy failed its integrity check ({ok}); nothing written")
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
        raise CommandError("say which study with --db DB", BAD_INPUT)
    return str(studies[0]["db"])


def cmd_logs(args: argparse.Namespace) -> int:
    db = _db_or_only(args)
    info = _call(args, "show", db=db, run_id=args.run)
    rfp = info["params"].get("run_files_path")
    path = os.path.join(rfp, f"output_{args.run}.log")
    if not os.path.exists(path):
        raise CommandError(f"run {args.run} has no output yet ({path}); it is {info['status']}")
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


def cmd_not_implemented(args: argparse.Namespace) -> int:
    raise CommandError(f"`{args.command}` is not implemented yet", FAILED)


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
    p.add_argument("config")
    p.add_argument("db")
    p.add_argument("--follow", action="store_true", help="show progress until all runs end")
    p.add_argument("--no-autostart", action="store_true",
                   help="fail instead of starting a daemon when none answers")

    p = add("rerun", cmd_rerun, "train the selected runs for N more epochs",
            "mosaic rerun examples/or_mlp/config.ini results.db -id 1-3 -epochs 5")
    p.add_argument("config")
    p.add_argument("db")
    _add_selection(p)
    p.add_argument("-epochs", "--epochs", type=int, required=True)

    p = add("status", cmd_status, "the daemon's state: workers, queue, runs", "mosaic status")
    p.add_argument("--db", help="only this study")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="live view (q to quit)")
    p.add_argument("--limit", type=int, default=10, help="latest done/failed runs shown")
    p.add_argument("--mine", action="store_true", help="only my runs")

    p = add("pause", cmd_pause, "stop starting new runs (--now: also park running ones)",
            "mosaic pause --now")
    p.add_argument("file", nargs="?", help="also write the not-yet-run pipelines to this JSON")
    p.add_argument("--now", action="store_true",
                   help="checkpoint running runs at their next epoch boundary and park them")

    p = add("resume", cmd_resume, "start runs again (FILE: queue the pipelines saved in it)",
            "mosaic resume")
    p.add_argument("file", nargs="?")

    p = add("cancel", cmd_cancel, "cancel queued or running runs", "mosaic cancel results.db -id 4")
    p.add_argument("db")
    _add_selection(p)

    p = add("savedb", cmd_savedb, "consistent copy of a study database while runs write to it",
            "mosaic savedb copy.db --db results.db")
    p.add_argument("copy")
    p.add_argument("--db", help="the study to copy (default: the daemon's only study)")

    p = add("plotloss", cmd_not_implemented, "loss curves of the selected runs into a PDF",
            "mosaic plotloss results.db losses.pdf -id all")
    p.add_argument("db")
    p.add_argument("pdf")
    _add_selection(p)
    p.add_argument("-plot_size", "--plot-size", type=int, default=2, dest="plot_size")

    p = add("metaplot", cmd_not_implemented, "a criterion against nb_params, per model key",
            "mosaic metaplot results.db meta.png data_dataset_OR test_loss")
    p.add_argument("db")
    p.add_argument("out")
    p.add_argument("dataset_key")
    p.add_argument("criterion")

    p = add("rekey", cmd_not_implemented, "rewrite keys in DB from an edited pipelines file",
            "mosaic rekey pipelines.json results.db")
    p.add_argument("pipelines")
    p.add_argument("db")

    p = add("export", cmd_not_implemented, "one row per run with params and results",
            "mosaic export results.db --format csv results.csv")
    p.add_argument("db")
    p.add_argument("out", nargs="?")
    p.add_argument("--format", choices=["csv", "json"], default="csv")

    p = add("generate", cmd_generate, "write the expanded pipelines without running anything",
            "mosaic generate examples/or_mlp/config.ini out.json")
    p.add_argument("config")
    p.add_argument("out")

    p = add("show", cmd_show, "everything known about one run", "mosaic show 3 --db results.db")
    p.add_argument("run", type=int)
    p.add_argument("--db")
    p.add_argument("--json", action="store_true")

    p = add("logs", cmd_logs, "a run's output (-f: follow it live)", "mosaic logs 3 -f")
    p.add_argument("run", type=int)
    p.add_argument("--db")
    p.add_argument("-f", "--follow", action="store_true")

    add("shutdown", cmd_shutdown, "stop the daemon (running runs are checkpointed)",
        "mosaic shutdown")
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
        _err(str(exc))
        code = NO_DAEMON
    except protocol.ProtocolError as exc:
        _err(exc.message)
        code = {protocol.ErrorCode.PERMISSION: DENIED, protocol.ErrorCode.INVALID: BAD_INPUT,
                protocol.ErrorCode.NOT_FOUND: BAD_INPUT}.get(exc.code, FAILED)
    except sqlite3.DatabaseError as exc:
        _err(f"database error: {exc}")
        code = BAD_INPUT
    except OSError as exc:
        _err(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
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
