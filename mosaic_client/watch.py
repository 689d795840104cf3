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
import pwd
import select
import shutil
import signal
import sys
import termios
import time
import tty
from typing import Any

from mosaic_client.connection import Client, DaemonUnavailable

INTERVAL = 1.0
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
CURSOR_HIDE, CURSOR_SHOW = "\x1b[?25l", "\x1b[?25h"
HOME, CLEAR_EOL, CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
BOLD, DIM, RED, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[0m"


def _user(uid: Any) -> str:
    try:
        return pwd.getpwuid(int(uid)).pw_name
    except (KeyError, TypeError, ValueError):
        return str(uid)


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def bar(done: int, total: int, width: int = 12) -> str:
    filled = min(width, int(width * done / total)) if total > 0 else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _study_name(path: str, several: bool) -> str:
    return os.path.basename(path) if several else ""


def _counts_text(counts: dict[str, int]) -> str:
    order = ("running", "queued", "paused", "done", "failed", "cancelled")
    total = sum(counts.values())
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    return f"{total} runs: " + (", ".join(parts) if parts else "none")


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(0, width - 1)] + "~"


def render(status: dict[str, Any], width: int, height: int, *, now: float | None = None,
           interval: float = INTERVAL, error: str | None = None) -> list[str]:
    """The screen as plain lines, at most `height` of them, none wider than `width`."""
    now = time.time() if now is None else now
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"mosaic status --watch   {stamp}   every {interval:g}s   q quits"]
    if error:
        lines.append(f"! {error}")
    workers = status.get("workers", [])
    busy = sum(1 for w in workers if w.get("run_id") is not None)
    state = "PAUSED (`mosaic resume` starts runs again)" if status["paused"] else "running"
    owners = status.get("paused_owners") or []
    if owners and not status["paused"]:
        # On a shared daemon each user may pause only their own runs.
        state += f", paused for {', '.join(_user(uid) for uid in owners)}"
    lines.append(f"mosaicd {state} | {len(workers)} worker(s), {busy} busy | "
                 f"{status.get('queued', 0)} queued")
    # Workers in columns: a 64-slot GPU box still takes a few lines.
    cells = []
    for w in workers:
        what = f"run {w['run_id']}" if w.get("run_id") is not None else w.get("state", "")
        cells.append(f"{w['id']} {w['slot']}: {what}")
    if cells:
        cell_width = max(len(c) for c in cells) + 3
        per_line = max(1, (width - 2) // cell_width)
        for i in range(0, len(cells), per_line):
            lines.append("  " + "".join(c.ljust(cell_width) for c in cells[i:i + per_line])
                         .rstrip())

    # Studies with work in flight first: their rows are the ones being watched.
    studies = sorted(status.get("studies", []), key=lambda st: not (
        st.get("running") or st["counts"].get("queued") or st["counts"].get("running")))
    several = len(studies) > 1
    running: list[tuple[str, dict[str, Any]]] = []
    done: list[tuple[str, dict[str, Any]]] = []
    failed: list[tuple[str, dict[str, Any]]] = []
    # A daemon remembers every study it served: list what fits, sum up the rest in one line.
    shown = max(1, height // 4)
    for study in studies[:shown]:
        lines.append(f"study {study['db']}: {_counts_text(study['counts'])}")
    if len(studies) > shown:
        rest: dict[str, int] = {}
        for study in studies[shown:]:
            for state, n in study["counts"].items():
                rest[state] = rest.get(state, 0) + n
        lines.append(f"{len(studies) - shown} more studies: {_counts_text(rest)} "
                     "(`--db DB` watches one)")
    for study in studies:
        name = _study_name(study["db"], several)
        running += [(name, r) for r in study.get("running", [])]
        done += [(name, r) for r in study.get("done", [])]
        failed += [(name, r) for r in study.get("failed", [])]
    if not studies:
        lines.append("no study yet: `mosaic run CONFIG DB` queues one")

    # Rows left for the three tables: each has a header line and may need a "none"/"more" line.
    room = height - len(lines) - 6
    show_running = min(len(running), max(1, room - 2)) if running else 0
    room -= show_running + (1 if len(running) > show_running else 0)
    show_failed = min(len(failed), max(0, room // 3 if done else room))
    room -= show_failed
    show_done = min(len(done), max(0, room))

    def prefix(name: str, run_id: int) -> str:
        return f"{name}:{run_id}" if name else str(run_id)

    lines.append(f"Running ({len(running)})")
    for name, run in running[:show_running]:
        elapsed = run.get("elapsed")
        epoch, epochs = run.get("epoch") or 0, run.get("epochs") or 0
        eta = ""
        if elapsed and epoch and epochs > epoch:
            eta = f" ({_clock(elapsed / epoch * (epochs - epoch))} left)"
        lines.append(f"  {prefix(name, run['run_id']):>6} {bar(epoch, epochs)} {epoch}/{epochs}"
                     f"  train {_fmt(run.get('train_loss'))}  test {_fmt(run.get('test_loss'))}"
                     f"  {_clock(elapsed)}{eta}  {run['pipeline']}")
    if len(running) > show_running:
        lines.append(f"  ... and {len(running) - show_running} more running")
    elif not running:
        lines.append("  none")
    lines.append("Latest done" + (f" ({show_done} shown)" if done else ""))
    for name, run in done[:show_done]:
        acc = f"  acc {_fmt(run.get('test_acc'), '.3f')}" if run.get("test_acc") is not None else ""
        lines.append(f"  {prefix(name, run['run_id']):>6}  train {_fmt(run.get('train_loss'))}"
                     f"  test {_fmt(run.get('test_loss'))}{acc}"
                     f"  {_fmt(run.get('duration'), '.2f')}s  {run['pipeline']}")
    if not done:
        lines.append("  none")
    lines.append("Latest failed" + (f" ({show_failed} shown; `mosaic show ID` for the traceback)"
                                    if failed else ""))
    for name, run in failed[:show_failed]:
        first = (run.get("return_status") or "").strip().splitlines()
        lines.append(f"  {prefix(name, run['run_id']):>6}  {first[0] if first else ''}"
                     f"  {run['pipeline']}")
    if not failed:
        lines.append("  none")
    return [_fit(line, width) for line in lines[:height]]


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


def _unfinished(status: dict[str, Any]) -> bool:
    if status.get("queued"):
        return True
    return any(study["counts"].get(s) for study in status.get("studies", [])
               for s in ("queued", "running", "paused"))


def _plain_loop(client: Client, fields: dict[str, Any], limit: int, interval: float) -> int:
    from mosaic_client.cli import INTERRUPTED, render_status

    try:
        while True:
            status = client.request("status", **fields)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"--- {stamp}\n{render_status(status, limit)}", flush=True)
            if not _unfinished(status):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return INTERRUPTED


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
    interval = max(0.2, float(getattr(args, "interval", None) or INTERVAL))
    limit = int(fields.get("limit") or 10)
    with Client(args.socket, timeout=10.0) as client:
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
                    term.out.write(_paint(render(status, width, height, interval=interval,
                                                 error=error), color))
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
