"""What every client command shares: exit codes, the error they raise, talking to the daemon,
finding a study database, reading a config and the run-selection options.

A command module (one per command in this package) imports from here and from nowhere else in
`mosaic_client.commands`; `mosaic_client.cli` maps the errors raised here to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from mosaic_client import connection, paths
from mosaic_client import selection as selections
from mosaic_client.connection import Client

if TYPE_CHECKING:
    from mosaic_client.config import ExpandedConfig

# Exit codes (docs/cli.md).
OK, FAILED, BAD_INPUT, NO_DAEMON, DENIED, INTERRUPTED = 0, 1, 2, 3, 4, 130


class CommandError(Exception):
    """A command cannot go on: `message` for the user, `code` the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@contextmanager
def refused_as_bad_input(*errors: type[Exception]) -> Iterator[None]:
    """Report these exceptions (whose messages are written for users) as bad input."""
    try:
        yield
    except errors as exc:
        # A study the user may not read is a refusal (exit DENIED), like the daemon's.
        code = DENIED if getattr(exc, "denied", False) else BAD_INPUT
        raise CommandError(str(exc), code) from None


def socket_path(args: argparse.Namespace) -> str:
    """The daemon's socket; a URL or relative --socket / $MOSAIC_SOCKET is bad input."""
    with refused_as_bad_input(paths.SocketPathError):
        return paths.socket_path(args.socket)


def client(args: argparse.Namespace) -> Client:
    return Client(socket_path(args))


def call(args: argparse.Namespace, name: str, timeout: float | None = None, **fields: Any) -> Any:
    """Send one request (a name of `protocol.REQUESTS`) and return its reply's data (waiting
    `timeout` seconds for it; None: the client's default)."""
    with client(args) as daemon:
        return daemon.request(name, timeout=timeout, **fields)


def wait_for_submissions(
    args: argparse.Namespace, db: str, submission_ids: list[int], poll: float = 0.5
) -> dict[str, int]:
    """Wait until every run of these submissions is done, failed or cancelled; their counts."""
    from mosaic_client.contract import FINAL_STATES

    total: dict[str, int] = {}
    with client(args) as daemon:
        for submission_id in submission_ids:
            while True:
                reply = daemon.request("status", db=db, submission=submission_id, limit=0)
                counts = reply.get("submission_counts") or {}
                if all(state in FINAL_STATES for state, n in counts.items() if n):
                    break
                time.sleep(poll)
            for state, n in counts.items():
                total[state] = total.get(state, 0) + n
    return total


def add_autostart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-autostart",
        action="store_true",
        help="fail instead of starting a daemon when none answers",
    )


def ensure_daemon(args: argparse.Namespace) -> None:
    """Start a daemon when none answers, unless --no-autostart (see connection.ensure_daemon)."""
    connection.ensure_daemon(socket_path(args), autostart=not args.no_autostart)


def resolve_db(db: str, config_dir: str | None = None) -> str:
    """A database path: the current directory first, then the config file's, sent absolute."""
    candidate = near_config(db, config_dir)
    if os.path.exists(candidate):
        return candidate
    parent = os.path.dirname(candidate)
    if not os.path.isdir(parent):
        raise CommandError(
            f"directory {parent} for the database does not exist; create it or give another path",
            BAD_INPUT,
        )
    if not os.path.exists(candidate) and not os.access(parent, os.W_OK):
        raise CommandError(
            f"cannot create the database in {parent}: not writable by you", BAD_INPUT
        )
    return candidate


def near_config(db: str, config_dir: str | None) -> str:
    """DB as an absolute path: in the current directory, else next to the config file if it
    is there (`mosaic run` and `mosaic rerun` find a study the same way)."""
    candidate = os.path.abspath(db)
    if not os.path.exists(candidate) and config_dir and not os.path.isabs(db):
        alternative = os.path.join(config_dir, db)
        if os.path.exists(alternative):
            return os.path.abspath(alternative)
    return candidate


def existing_db(db: str) -> str:
    path = os.path.abspath(db)
    if not os.path.isfile(path):
        raise CommandError(
            f"no database at {path}; give the path of a study database "
            "(`mosaic run CONFIG DB` creates one)",
            BAD_INPUT,
        )
    return path


def db_or_only(args: argparse.Namespace, purpose: str) -> str:
    """`--db DB`, else the daemon's only study; `purpose` ends "say which study ..."."""
    if args.db:
        return existing_db(args.db)
    studies = call(args, "studies")
    if len(studies) != 1:
        known = ", ".join(s["db"] for s in studies) or "none yet"
        raise CommandError(
            f"say which study {purpose} with --db DB (the daemon knows: {known})", BAD_INPUT
        )
    return str(studies[0]["db"])


def load_config(config: str) -> ExpandedConfig:
    """Read and expand CONFIG, printing its warnings; every problem becomes one CommandError."""
    # Imported here: only the commands that read a config pay for the config language.
    from mosaic_client.config import ConfigError
    from mosaic_client.config import load_config as load

    try:
        expanded = load(config)
    except ConfigError as exc:
        for warning in exc.warnings:
            print(f"mosaic: warning: {warning}", file=sys.stderr)
        raise CommandError(
            f"{len(exc.problems)} problem(s) in {config}; nothing was queued:\n"
            + "\n".join(f"  {p}" for p in exc.problems),
            BAD_INPUT,
        ) from None
    for warning in expanded.warnings:
        print(f"mosaic: warning: {warning}", file=sys.stderr)
    return expanded


# -- run selections ---------------------------------------------------------------------------


def add_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selection (exactly one)")
    group.add_argument("-id", "--id", metavar="IDS", help="run ids: 1-3,7 or all")
    group.add_argument(
        "-request", "--request", metavar="SQL", help="a read-only SELECT returning run ids"
    )
    # The seed's spellings first, then the usual long form: (seed flag, long flag, meaning).
    for dest, flag, meaning in (
        ("param_name_and_value", "--param", "equals"),
        ("param_name_and_value_low_threshold", "--param-le", "is <="),
        ("param_name_and_value_high_threshold", "--param-ge", "is >="),
    ):
        group.add_argument(
            f"-{dest}",
            flag,
            nargs=2,
            metavar=("NAME", "VALUE"),
            dest=dest,
            help=f"runs whose param NAME {meaning} VALUE",
        )


def selection(args: argparse.Namespace) -> dict[str, Any]:
    with refused_as_bad_input(selections.SelectionError):
        return selections.make_selection(
            args.id,
            args.request,
            args.param_name_and_value,
            args.param_name_and_value_low_threshold,
            args.param_name_and_value_high_threshold,
        )


def matched_nothing(args: argparse.Namespace, outcome: str) -> CommandError:
    """The error of a selection that matches no run of args.db; `outcome`: what did not happen."""
    return CommandError(
        f"the selection ({selections.describe(selection(args))}) matches no "
        f"run of {args.db}; {outcome}. `mosaic status --db {args.db}` lists its "
        "runs",
        BAD_INPUT,
    )


def span(ids: Sequence[int]) -> str:
    """Run ids as ranges: 1-3,7."""
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


def rows_summary(label: str, ids: list[int]) -> str:
    return f"{label} {len(ids)} run(s)" + (f": {span(ids)}" if ids else "")


# -- reading a study database directly (analysis commands: no daemon needed) ------------------


def analysis_db(path: str) -> sqlite3.Connection:
    from mosaic_client import analysis

    with refused_as_bad_input(analysis.AnalysisError):
        return analysis.open_readonly(os.path.abspath(path))


def only_known_study() -> str | None:
    """The study a stopped daemon served, when it served exactly one: read from its own state
    database (read-only), so `mosaic logs RUN` needs no --db in the usual one-study case."""
    path = os.path.join(paths.default_state_dir(), "daemon.db")
    if not os.path.isfile(path):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            rows = conn.execute("SELECT path FROM studies").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return str(rows[0][0]) if len(rows) == 1 else None


# Said when `show` and `logs` read a study because no daemon answers.
OFFLINE_NOTE = "(daemon not running: read from the study)"
# Said when they read a study the daemon does not serve (one not queued into it).
NOT_SERVED_NOTE = "(not a study the daemon serves: read from the study)"


def run_info(args: argparse.Namespace, purpose: str) -> tuple[str, dict[str, Any], bool]:
    """(db, the `show` reply for args.run, whether a daemon gave it). With no daemon and
    --db given, the study is read read-only instead: what it holds is the truth once no
    daemon is running, short of the live fields (epoch, worker) only a daemon knows. So is a
    study --db names that the daemon does not serve (it takes over none it was not given by
    `mosaic run`), with the caller's own rights."""
    from mosaic_client import protocol, study_reading

    note = OFFLINE_NOTE
    try:
        db = db_or_only(args, purpose)
        return db, call(args, "show", db=db, run_id=args.run), True
    except connection.DaemonUnavailable as exc:
        known = args.db or only_known_study()
        if not known:
            raise connection.DaemonUnavailable(
                f"{exc} Without a daemon give the study with --db DB to read it directly."
            ) from None
    except protocol.ProtocolError as exc:
        # A study the daemon does not serve (it adopts none): read it here, with your rights.
        served = exc.code != protocol.ErrorCode.NOT_FOUND or not exc.message.startswith(
            protocol.NOT_SERVED
        )
        if served or not args.db:
            raise
        known, note = args.db, NOT_SERVED_NOTE

    db = existing_db(known)
    conn = analysis_db(db)
    try:
        info = study_reading.describe_run(conn, args.run)
    finally:
        conn.close()
    if info is None:
        raise CommandError(f"no run {args.run} in {db}; `mosaic export` lists its runs", BAD_INPUT)
    print(f"mosaic: {note}", file=sys.stderr)
    return db, info, False


def out_dir_exists(out: str) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CommandError(
            f"directory {parent} for {out} does not exist; create it first", BAD_INPUT
        )
