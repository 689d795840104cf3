"""`mosaic status --watch`: a live view of the daemon that redraws in place once per interval.

On a terminal: the alternate screen, the cursor moved home and every line overwritten (then
cleared to its end) so nothing flickers; `q` or Ctrl-C leaves and restores the terminal exactly
as it was. The view fits the terminal: counts per study, every running run with an epoch bar and
its current losses, and as many of the latest finished and failed runs as there are rows left,
so a 10,000-run study costs one screen, not 10,000 lines.

When stdout is not a terminal (a pipe, a file, cron), it prints the plain `mosaic status` text
once per interval under a time stamp, and exits 0 as soon as no run is queued, running or
parked: `mosaic status --watch > log.txt` records a sweep to its end and then returns.

Plain ANSI escapes and termios only: no curses window to manage, nothing beyond the standard
library, and start-up stays as fast as the rest of the client.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import sys
import termios
import time
import tty
from typing import Any

from mosaic_client import render
from mosaic_client.commands import common
from mosaic_client.connection import Client, DaemonUnavailable

ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
CURSOR_HIDE, CURSOR_SHOW = "\x1b[?25l", "\x1b[?25h"
HOME, CLEAR_EOL, CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
BOLD, DIM, RED, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[0m"


def _paint(lines: list[str], color: bool) -> str:
    """One write per frame: home, each line overwritten and cleared to its end, rest cleared."""
    out = [HOME]
    for i, line in enumerate(lines):
        if color and i == 0:
            line = f"{BOLD}{line}{RESET}"
        elif color and line.startswith(("Running", "Latest")):
            line = f"{BOLD}{line}{RESET}"
        elif color and line.startswith("!"):
            line = f"{RED}{line}{RESET}"
        out.append(line + CLEAR_EOL + ("\r\n" if i < len(lines) - 1 else ""))
    out.append(CLEAR_EOS)
    return "".join(out)


def _plain_loop(client: Client, fields: dict[str, Any], limit: int, interval: float) -> int:
    try:
        while True:
            status = client.request("status", **fields)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"--- {stamp}\n{render.status_text(status, limit)}", flush=True)
            if not render.unfinished(status):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return common.INTERRUPTED


class _Terminal:
    """Raw-ish terminal for the live view; always restored, whatever ends the view."""

    def __init__(self) -> None:
        self.out = sys.stdout
        self.in_fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.saved: list[Any] | None = None
        self.resized = False
        self._old_winch: Any = None

    def __enter__(self) -> _Terminal:
        if self.in_fd is not None:
            self.saved = termios.tcgetattr(self.in_fd)
            # cbreak: keys arrive one by one without echo; Ctrl-C still raises SIGINT.
            tty.setcbreak(self.in_fd)
        self._old_winch = signal.signal(signal.SIGWINCH, self._on_resize)
        self.out.write(ALT_SCREEN_ON + CURSOR_HIDE)
        self.out.flush()
        return self

    def _on_resize(self, signum: int, frame: Any) -> None:
        self.resized = True

    def __exit__(self, *exc: object) -> None:
        self.out.write(CURSOR_SHOW + ALT_SCREEN_OFF)
        self.out.flush()
        if self.saved is not None and self.in_fd is not None:
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self.saved)
        signal.signal(signal.SIGWINCH, self._old_winch or signal.SIG_DFL)

    def size(self) -> tuple[int, int]:
        # Ask the terminal itself: $COLUMNS/$LINES (what shutil reads first) go stale on resize.
        try:
            size = os.get_terminal_size(self.out.fileno())
        except OSError:
            size = shutil.get_terminal_size((100, 30))
        return size.columns, size.lines

    def wait_key(self, seconds: float) -> str | None:
        """Wait up to `seconds` for a key; returns early (None) on a terminal resize."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.resized:
                self.resized = False
                return None
            if self.in_fd is None:
                time.sleep(min(left, 0.1))
                continue
            ready, _, _ = select.select([self.in_fd], [], [], min(left, 0.1))
            if ready:
                data = os.read(self.in_fd, 64)
                if not data:  # the terminal went away
                    return "q"
                return data.decode(errors="replace")


def watch(args: argparse.Namespace, fields: dict[str, Any]) -> int:
    """Entry point of `mosaic status --watch`; returns the exit code (0 when quit with q)."""
    # Below a fifth of a second the view would only load the daemon, not show more.
    interval = max(0.2, float(getattr(args, "interval", None) or render.INTERVAL))
    limit = int(fields.get("limit") or 10)
    with Client(common.socket_path(args), timeout=10.0) as client:
        # The first answer decides whether there is anything to watch: no daemon is exit 3
        # with the usual how-to-start message, before the screen is touched.
        status = client.request("status", **fields)
        if not sys.stdout.isatty():
            return _plain_loop(client, fields, limit, interval)
        color = os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"
        try:
            with _Terminal() as term:
                error: str | None = None
                while True:
                    width, height = term.size()
                    frame = render.screen(status, width, height, interval=interval, error=error)
                    term.out.write(_paint(frame, color))
                    term.out.flush()
                    key = term.wait_key(interval)
                    if key and key.strip().lower().startswith("q"):
                        return 0
                    try:
                        # Enough done/failed rows to fill the screen, never the whole study.
                        status = client.request("status", **{**fields, "limit": max(1, height)})
                        error = None
                    except DaemonUnavailable as exc:
                        error = f"{exc} Retrying every {interval:g}s."
        except KeyboardInterrupt:
            # Ctrl-C is the other ordinary way out of a live view, not a failure.
            return 0
