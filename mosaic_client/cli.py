"""`mosaic`: the thin client's entry point: the parser, built from the command modules, and the
mapping of errors to exit codes.

Each command lives in its own module of :mod:`mosaic_client.commands` (arguments next to the
function that uses them); COMMANDS below is the one registry, in the order `mosaic --help`
lists them. A command sends zero or more requests of :mod:`mosaic_client.protocol` (each module's
docstring names them), each served by the daemon handler of the same request name; command and
request names are not one to one (`run` sends `submit`, `savedb` sends `studies`, ...).

Start-up must stay fast: no torch anywhere here, and matplotlib only inside the plot commands.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence

from mosaic_client import paths, protocol
from mosaic_client.commands import (
    cancel,
    common,
    compare,
    completion,
    diff,
    export,
    generate,
    groups,
    logs,
    metaplot,
    pareto,
    pause,
    plotloss,
    priority,
    rekey,
    repeat,
    rerun,
    resume,
    savedb,
    show,
    shutdown,
    status,
    tuning,
    web,
)
from mosaic_client.commands import run as run_command
from mosaic_client.commands.common import (
    BAD_INPUT,
    DENIED,
    FAILED,
    INTERRUPTED,
    NO_DAEMON,
    OK,
    CommandError,
)
from mosaic_client.connection import DaemonUnavailable, socket_denied

# Every command, in the order of `mosaic --help`.
COMMANDS = (
    run_command,
    rerun,
    status,
    pause,
    resume,
    cancel,
    savedb,
    plotloss,
    metaplot,
    groups,
    compare,
    pareto,
    tuning,
    repeat,
    priority,
    rekey,
    export,
    generate,
    show,
    diff,
    logs,
    web,
    shutdown,
    completion,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosaic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare many PyTorch pipelines: queue them into mosaicd, watch, analyse.",
        epilog="examples:\n"
        "  mosaic run examples/or_mlp/config.ini results.db --follow\n"
        "  mosaic status\n"
        "  mosaic pause --now && mosaic resume\n"
        "  mosaic rerun examples/or_mlp/config.ini results.db -id 1-3 -epochs 5\n"
        "  mosaic plotloss results.db losses.pdf -id all\n"
        "exit codes: 0 ok, 1 failed, 2 bad input, 3 no daemon, 4 not allowed, "
        "130 interrupted",
    )
    parser.add_argument(
        "--socket",
        default=None,
        help="daemon socket (default $MOSAIC_SOCKET or the per-user socket)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.HELP,
            epilog=f"example:\n  {command.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    # `mosaic completion` describes the whole parser.
    parser.set_defaults(root_parser=parser)
    return parser


def _err(message: str) -> None:
    print(f"mosaic: {message}", file=sys.stderr)


def _stdout_closed() -> int:
    """A closed stdout ends a command quietly, like any Unix filter: the reader (`head -1`)
    has all it wanted. stdout is pointed at /dev/null so the interpreter's last flush of what
    is still buffered does not report the broken pipe on its way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        # Flushed here, where a reader gone away (`mosaic status | head -1`) is still caught.
        sys.stdout.flush()
    except BrokenPipeError:
        # Anywhere: in a command, in --help, in an error path that prints a table first.
        return _stdout_closed()
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return BAD_INPUT
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # not an OSError about a path: main() ends the command quietly
    except CommandError as exc:
        _err(exc.message)
        code = exc.code
    except paths.SocketPathError as exc:
        _err(str(exc))
        code = BAD_INPUT
    except DaemonUnavailable as exc:
        denied = socket_denied(common.socket_path(args))
        _err(denied or str(exc))
        code = DENIED if denied else NO_DAEMON
    except protocol.ProtocolError as exc:
        _err(exc.message)
        code = {
            protocol.ErrorCode.PERMISSION: DENIED,
            protocol.ErrorCode.INVALID: BAD_INPUT,
            protocol.ErrorCode.NOT_FOUND: BAD_INPUT,
        }.get(exc.code, FAILED)
    except sqlite3.DatabaseError as exc:
        _err(
            f"database error: {exc}; is the file a study database written by mosaicd "
            "(`mosaic status` lists the studies it knows)?"
        )
        code = BAD_INPUT
    except OSError as exc:
        _err(
            f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            + "; check the path and its permissions"
        )
        code = BAD_INPUT
    except KeyboardInterrupt:
        code = INTERRUPTED
    return code


def _legacy(command: str) -> Callable[[], None]:
    """The entry point `mosaic_<command>`: the original tool's name for `mosaic <command>`."""

    def entry() -> None:
        sys.exit(main([command, *sys.argv[1:]]))

    entry.__name__ = f"legacy_{command}"
    return entry


# Installed by pyproject.toml [project.scripts]; completion.LEGACY_COMMANDS lists the same.
legacy_run = _legacy("run")
legacy_rerun = _legacy("rerun")
legacy_status = _legacy("status")
legacy_pause = _legacy("pause")
legacy_resume = _legacy("resume")
legacy_savedb = _legacy("savedb")
legacy_plotloss = _legacy("plotloss")
legacy_metaplot = _legacy("metaplot")
legacy_rekey = _legacy("rekey")
legacy_generate = _legacy("generate")


if __name__ == "__main__":
    sys.exit(main())
