"""How the client shows the daemon's state: the `mosaic status` text, the `status --watch`
screen and the `run --follow` progress line, all built from the `status` reply
(`protocol.StatusReply`). Pure functions of their arguments, so they are tested without a
terminal; `commands/status.py` and `watch.py` print what these return.
"""

from __future__ import annotations

import getpass
import math
import os
import pwd
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mosaic_client import contract

INTERVAL = 1.0


# One format for every measured value the client shows (losses, accuracies, `plotloss`
# titles): 4 significant digits, trailing zeros kept, so 0.9499 is not "0.95", 1.0 reads
# "1.000" and a column of losses keeps its width.
NUMBER = "#.4g"


def fmt(value: Any, spec: str = NUMBER) -> str:
    """A number as shown in tables, "-" where there is none yet; counts stay integers."""
    if value is None:
        return "-"
    if isinstance(value, bool) or (isinstance(value, int) and spec == NUMBER):
        return str(value)
    if isinstance(value, float) and spec == NUMBER and not math.isfinite(value):
        return str(value)  # nan, inf: "#" would not change them, but say so plainly
    return format(value, spec)


def accuracy(run: dict[str, Any]) -> str:
    """ "  acc train 0.9500 / test 0.9375" for a run whose study measures accuracy, else ""."""
    train, test = run.get("train_acc"), run.get("test_acc")
    if train is None and test is None:
        return ""
    return f"  acc train {fmt(train)} / test {fmt(test)}"


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def bar(done: int, total: int, width: int = 12) -> str:
    filled = min(width, int(width * done / total)) if total > 0 else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def user_name(uid: Any) -> str:
    try:
        return pwd.getpwuid(int(uid)).pw_name
    except (KeyError, TypeError, ValueError):
        return str(uid)


def first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


@dataclass(frozen=True)
class Eta:
    """The `--follow` estimate of the time left: `seconds` as of `elapsed`, made when
    `finished` runs had ended (None: nothing to extrapolate from yet)."""

    elapsed: float
    finished: int
    seconds: float | None


def next_eta(
    previous: Eta | None,
    elapsed: float,
    finished: int,
    total: int,
    running_fractions: Sequence[float] = (),
) -> Eta:
    """The time left, from the work done so far: finished runs count 1, running runs the
    fraction of their epochs done. While no run finishes the estimate only counts down (an
    extrapolation from elapsed time alone rises between epochs); a run that ends brings a
    fresh estimate, which may be higher."""
    if finished >= total:
        return Eta(elapsed, finished, 0.0)
    work = finished + sum(min(1.0, max(0.0, f)) for f in running_fractions)
    fresh = None
    if work > 0 and elapsed > 0:
        fresh = max(0.0, elapsed * (total - work) / work)
    if previous is None or previous.seconds is None or previous.finished != finished:
        return Eta(elapsed, finished, fresh)
    countdown = max(0.0, previous.seconds - max(0.0, elapsed - previous.elapsed))
    return Eta(elapsed, finished, countdown if fresh is None else min(countdown, fresh))


def progress_line(
    done: int,
    failed: int,
    cancelled: int,
    running: int,
    total: int,
    paused: bool,
    eta: float | None = None,
) -> str:
    """`mosaic run --follow`: one line, redrawn in place on a terminal."""
    finished = done + failed + cancelled
    width = 30
    filled = int(width * finished / total) if total else width
    # Paused, nothing moves: a countdown would only mislead.
    shown = f", ETA {clock(eta)}" if eta is not None and finished < total and not paused else ""
    flag = " [paused]" if paused else ""
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} "
        f"({done} done, {failed} failed, {running} running){shown}{flag}"
    )


# -- `mosaic status` ---------------------------------------------------------------------------


def _others(run: dict[str, Any]) -> str:
    """Name the owner of a run that is not the caller's (on a shared daemon)."""
    owner = run.get("owner")
    return f"  [owner {owner}]" if owner and owner != getpass.getuser() else ""


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _worker_line(worker: dict[str, Any]) -> str:
    run = f"run {worker['run_id']}" if worker["run_id"] is not None else worker["state"]
    # GPU memory only where NVML answered: this worker's share, else the whole card's.
    gpu = ""
    if worker.get("gpu_memory") is not None:
        gpu = f"  gpu mem {_mib(worker['gpu_memory'])}"
    elif worker.get("gpu_memory_device") is not None:
        gpu = (
            f"  gpu mem (card) {_mib(worker['gpu_memory_device'])}/"
            f"{_mib(worker.get('gpu_memory_total'))}"
        )
    # On a shared daemon each worker runs as one user (docs/deployment.md).
    owner = f"  as {worker['owner']}" if worker.get("owner") else ""
    return (
        f"  worker {worker['id']:<4} {worker['slot']:<8} pid {worker['pid']:<7} "
        f"{run:<10} cpu {fmt(worker.get('cpu_percent'), '.0f'):>4}%  rss "
        f"{_mib(worker.get('rss'))}{gpu}{owner}{data_cache_text(worker.get('data_cache'))}"
    )


def data_cache_text(figures: dict[str, Any] | None) -> str:
    """A worker's data cache figures (protocol: the provenance's "data_cache"), or ""."""
    if not figures or not (figures["hits"] or figures["misses"]):
        return ""
    disk = f" ({figures['disk_hits']} from disk)" if figures["disk_hits"] else ""
    return (
        f"  data cache {figures['hits']} hit(s){disk}, {figures['misses']} miss(es), "
        f"{_mib(figures['bytes'])} in {figures['entries']}"
    )


def together(run: dict[str, Any]) -> str:
    """Which runs a running run trains with in one ensemble (docs/ensembles.md), if any."""
    group = run.get("group")
    if not group:
        return ""
    others = ",".join(str(r) for r in group if r != run["run_id"])
    return f"  [ensemble with {others}]"


def _running_line(run: dict[str, Any]) -> str:
    return (
        f"    {run['run_id']:>5}  epoch {run['epoch']}/{run['epochs']}  "
        f"train_loss {fmt(run['train_loss'])}  test_loss "
        f"{fmt(run['test_loss'])}  {run['pipeline']}{_others(run)}{together(run)}"
    )


def _done_line(run: dict[str, Any]) -> str:
    return (
        f"    {run['run_id']:>5}  train_loss {fmt(run['train_loss'])}  "
        f"test_loss {fmt(run['test_loss'])}{accuracy(run)}  duration "
        f"{fmt(run['duration'], '.2f')}s  {run['pipeline']}{_others(run)}"
    )


def _failed_lines(run: dict[str, Any]) -> str:
    return (
        f"    {run['run_id']:>5}  {run['pipeline']}{_others(run)}\n"
        f"           {first_line(run['return_status'])}"
    )


def status_text(status: dict[str, Any], limit: int) -> str:
    """The plain `mosaic status` text (also what `status --watch` prints when not on a tty).
    A heading is shown only over the runs it lists."""
    lines = [
        f"mosaicd: {'PAUSED' if status['paused'] else 'running'}, "
        f"{len(status['workers'])} worker(s), {status['queued']} queued"
    ]
    lines += [_worker_line(worker) for worker in status["workers"]]
    for study in status["studies"]:
        counts = ", ".join(f"{n} {s}" for s, n in study["counts"].items() if n) or "empty"
        lines.append("")
        lines.append(f"study {study['db']}: {counts}")
        if study.get("problem"):
            lines.append(f"  ! {study['problem']}")
        if study.get("set_aside"):
            lines.append(f"  ! {study['set_aside']}")
        sections = (
            ("running", "Running:", _running_line),
            ("done", f"Done (latest {limit}):", _done_line),
            ("failed", f"Error (latest {limit}):", _failed_lines),
        )
        for key, heading, line in sections:
            # A heading only over the runs it lists.
            if study[key]:
                lines.append(f"  {heading}")
            for run in study[key]:
                lines.append(line(run))
    if status.get("hidden_studies"):
        hidden = status["hidden_studies"]
        lines += ["", f"{hidden} other study(ies) not shown: you may not read them"]
    return "\n".join(lines)


# -- `mosaic status --watch` -------------------------------------------------------------------


def _study_name(path: str, several: bool) -> str:
    return os.path.basename(path) if several else ""


def counts_text(counts: dict[str, int]) -> str:
    order = (contract.RUNNING, contract.QUEUED, contract.PARKED, *contract.FINAL_STATES)
    total = sum(counts.values())
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    return f"{total} runs: " + (", ".join(parts) if parts else "none")


def fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(0, width - 1)] + "~"


def _header(status: dict[str, Any], width: int) -> list[str]:
    workers = status.get("workers", [])
    busy = sum(1 for w in workers if w.get("run_id") is not None)
    state = "PAUSED (`mosaic resume` starts runs again)" if status["paused"] else "running"
    owners = status.get("paused_owners") or []
    if owners and not status["paused"]:
        # On a shared daemon each user may pause only their own runs.
        state += f", paused for {', '.join(user_name(uid) for uid in owners)}"
    lines = [
        f"mosaicd {state} | {len(workers)} worker(s), {busy} busy | "
        f"{status.get('queued', 0)} queued"
    ]
    # Workers in columns: a 64-slot GPU box still takes a few lines.
    cells = []
    for w in workers:
        what = f"run {w['run_id']}" if w.get("run_id") is not None else w.get("state", "")
        cells.append(f"{w['id']} {w['slot']}: {what}")
    if cells:
        cell_width = max(len(c) for c in cells) + 3
        per_line = max(1, (width - 2) // cell_width)
        for i in range(0, len(cells), per_line):
            lines.append(
                "  " + "".join(c.ljust(cell_width) for c in cells[i : i + per_line]).rstrip()
            )
    return lines


def screen(
    status: dict[str, Any],
    width: int,
    height: int,
    *,
    now: float | None = None,
    interval: float = INTERVAL,
    error: str | None = None,
) -> list[str]:
    """The `status --watch` screen as plain lines, at most `height`, none wider than `width`."""
    now = time.time() if now is None else now
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"mosaic status --watch   {stamp}   every {interval:g}s   q quits"]
    if error:
        lines.append(f"! {error}")
    lines += _header(status, width)

    # Studies with work in flight first: their rows are the ones being watched.
    studies = sorted(
        status.get("studies", []),
        key=lambda st: (
            not (st.get("running") or st["counts"].get("queued") or st["counts"].get("running"))
        ),
    )
    several = len(studies) > 1
    running: list[tuple[str, dict[str, Any]]] = []
    done: list[tuple[str, dict[str, Any]]] = []
    failed: list[tuple[str, dict[str, Any]]] = []
    # A daemon remembers every study it served: list what fits, sum up the rest in one line.
    shown = max(1, height // 4)
    for study in studies[:shown]:
        lines.append(f"study {study['db']}: {counts_text(study['counts'])}")
        if study.get("problem"):
            lines.append(f"  ! {study['problem']}")
        if study.get("set_aside"):
            lines.append(f"  ! {study['set_aside']}")
    if len(studies) > shown:
        rest: dict[str, int] = {}
        for study in studies[shown:]:
            for state, n in study["counts"].items():
                rest[state] = rest.get(state, 0) + n
        lines.append(
            f"{len(studies) - shown} more studies: {counts_text(rest)} (`--db DB` watches one)"
        )
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
            eta = f" ({clock(elapsed / epoch * (epochs - epoch))} left)"
        lines.append(
            f"  {prefix(name, run['run_id']):>6} {bar(epoch, epochs)} {epoch}/{epochs}"
            f"  train {fmt(run.get('train_loss'))}  test {fmt(run.get('test_loss'))}"
            f"  {clock(elapsed)}{eta}  {run['pipeline']}{together(run)}"
        )
    if len(running) > show_running:
        lines.append(f"  ... and {len(running) - show_running} more running")
    elif not running:
        lines.append("  none")
    lines.append("Latest done" + (f" ({show_done} shown)" if done else ""))
    for name, run in done[:show_done]:
        lines.append(
            f"  {prefix(name, run['run_id']):>6}  train {fmt(run.get('train_loss'))}"
            f"  test {fmt(run.get('test_loss'))}{accuracy(run)}"
            f"  {fmt(run.get('duration'), '.2f')}s  {run['pipeline']}"
        )
    if not done:
        lines.append("  none")
    lines.append(
        "Latest failed"
        + (f" ({show_failed} shown; `mosaic show ID` for the traceback)" if failed else "")
    )
    for name, run in failed[:show_failed]:
        lines.append(
            f"  {prefix(name, run['run_id']):>6}  {first_line(run.get('return_status'))}"
            f"  {run['pipeline']}"
        )
    if not failed:
        lines.append("  none")
    return [fit(line, width) for line in lines[:height]]


def unfinished(status: dict[str, Any]) -> bool:
    """Whether any run is still queued, running or parked (`status --watch` off a tty stops
    when none is)."""
    if status.get("queued"):
        return True
    return any(
        study["counts"].get(s)
        for study in status.get("studies", [])
        for s in (contract.QUEUED, contract.RUNNING, contract.PARKED)
    )


def users_text(users: list[dict[str, Any]]) -> str:
    """`mosaic status --users`: one line per user (usage: slot-seconds, decayed)."""
    if not users:
        return "users: none with runs or recent usage"
    lines = [f"{'user':<16}{'running':>8}{'queued':>8}{'usage (slot-s)':>16}{'share':>7}"]
    for row in users:
        lines.append(
            f"{row['user']:<16}{row['running']:>8}{row['queued']:>8}"
            f"{row['usage']:>16.1f}{row['share']:>7g}"
        )
    limits = users[0].get("limits") or {}
    words = {
        "cpu_slots": "CPU slots",
        "gpu_slots": "GPU slots",
        "queued": "queued runs",
        "runs_per_submission": "runs per submission",
    }
    set_ = [f"{n} {words.get(k, k)}" for k, n in limits.items() if n]
    lines.append("limits per user: " + (", ".join(set_) if set_ else "none"))
    return "\n".join(lines)
