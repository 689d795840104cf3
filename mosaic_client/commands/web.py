"""`mosaic web`: serve the live web view of the daemon and of study databases (docs/web.md).

Sends `status` (polled for the live pages), `pause`, `resume` and `cancel` (the
buttons), exactly as the CLI commands do; reads study databases read-only.

The web stack is an optional extra, imported only inside `run`: the other commands never load
it (a test checks `python -X importtime`).
"""

from __future__ import annotations

import argparse
import os
import sys

from mosaic_client.commands.common import BAD_INPUT, OK

NAME = "web"
HELP = "serve a live web view of the daemon and its studies on 127.0.0.1"
EXAMPLE = "mosaic web --port 8765 results.db"

# Exit codes (docs/cli.md).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dbs",
        nargs="*",
        metavar="DB",
        help="study databases to show besides the daemon's own studies (read "
        "only; also works with a `savedb` copy)",
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: only this machine; "
        "reach it from yours with `ssh -L`, see docs/web.md)",
    )


def _err(message: str) -> None:
    print(f"mosaic: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        _err(
            f"the web view needs its optional dependencies ({exc.name} is missing): "
            "pip install 'mosaic-compare[web]'"
        )
        return BAD_INPUT
    from mosaic_client import paths
    from mosaic_client.analysis import AnalysisError, open_readonly
    from mosaic_client.web import app, security

    dbs = []
    for db in args.dbs:
        path = os.path.realpath(db)
        try:
            open_readonly(path).close()
        except AnalysisError as exc:
            _err(str(exc))
            return BAD_INPUT
        dbs.append(path)
    if not 0 <= args.port <= 65535:
        _err(f"--port {args.port} is not a TCP port; give 1-65535 (or 0 for any free port)")
        return BAD_INPUT
    try:
        sock = app.bind(args.host, args.port)
    except OSError as exc:
        hint = (
            ("; another `mosaic web` may be running: give --port N, or --port 0 for any free port")
            if exc.errno == 98
            else ""
        )
        _err(f"cannot listen on {args.host}:{args.port}: {exc.strerror}{hint}")
        return BAD_INPUT
    port = sock.getsockname()[1]
    settings = app.Settings(
        token=security.new_token(),
        port=port,
        host=args.host,
        socket_path=paths.socket_path(args.socket),
        dbs=dbs,
    )
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Mosaic web view: http://{shown_host}:{port}/?token={settings.token}")
    if security.is_loopback(args.host):
        print(
            f"From another machine: ssh -L {port}:127.0.0.1:{port} THIS_HOST, then open "
            "the same URL there. Ctrl-C stops the server."
        )
    else:
        _err(
            f"warning: listening on {args.host}, beyond this machine, over plain HTTP with "
            "only the token to guard it; prefer the default 127.0.0.1 and `ssh -L` "
            "(docs/web.md)"
        )
    sys.stdout.flush()
    app.serve(settings, sock)
    return OK
