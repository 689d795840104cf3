"""Smaller weaknesses of the shared daemon an outside review found ("privilege separation"),
each attacked here: workers that could not start in a private home, users' output in the
daemon's journal, worker directories left in /tmp, a Host check that took names for addresses,
checkpoints unpickled in full, and `status` that showed everyone's studies to everyone.

The shared-box tests start a real root daemon with only the unit's three capabilities
(tests/test_shared_box.py's running_box)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import EXAMPLE, Daemon, example_config
from test_execution import Recorder, classes, make_spec  # noqa: F401 (a fixture)
from test_shared_box import Box, _uid, running_box, settled

from mosaic_client import contract
from mosaicd.training import checkpoints, execution, run_log

NOISE = "FAKE-MOSAICD-LINE-7f3a"  # what a user's code writes to fd 2 after its run
SECRET = "SECRET-TRACEBACK-91c2"  # in a private study's failure


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with running_box("moshard-") as made:
        # Real homes: the users' workers start there (run_log.settle_as_owner). A's is private.
        for role in ("a", "b"):
            subprocess.run(
                ["usermod", "-d", str(made.home(role)), made.users[role]],
                check=True,
                capture_output=True,
            )
        made.home("a").chmod(0o700)
        yield made


def _project_with(
    box: Box, role: str, name: str, appended: str, umask: str | None
) -> tuple[str, str]:
    """A project in the user's home whose model module ends with `appended`; (config, db)."""
    directory = box.home(role) / name
    shutil.copytree(EXAMPLE, directory / "classes")
    with open(directory / "classes" / "mlp.py", "a") as fh:
        fh.write(appended)
    config = example_config(
        directory,
        epochs=2,
        nb_processus=1,
        classes=directory / "classes",
        extra_monitor=f"umask = {umask}" if umask else "",
    )
    uid = _uid(box, role)
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, uid, -1)
    return str(config), str(directory / "results.db")


NOISY = f"""
import os as _os, threading as _threading, time as _time


def _noise():
    # Past the end of the run: fd 2 is then the worker's own, no longer the run's log.
    for _ in range(150):
        _os.write(2, b"{NOISE}\\n")
        _time.sleep(0.1)


_threading.Thread(target=_noise, daemon=True).start()
"""

FAILING = f"""

def _fail(self, *args, **kwargs):
    raise RuntimeError("{SECRET}")


mlp_funnel.forward = _fail
"""


def _workers_of(uid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        if "mosaicd.training.worker" in (proc.info["cmdline"] or []) and proc.info["uids"]:
            if proc.info["uids"].real == uid:
                found.append(proc)
    return found


@pytest.fixture(scope="module")
def a_run(box: Box) -> tuple[str, str]:
    """A finished run of A's, in A's 0700 home, whose model keeps writing to fd 2."""
    config, db = _project_with(box, "a", "noisy", NOISY, umask="022")
    result = box.cli("a", "run", config, db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    return config, db


def test_a_worker_starts_in_a_private_home_as_its_owner(box: Box, a_run: tuple[str, str]) -> None:
    # Review: the spawn changed to the home before the ids changed, as root without a
    # file-access override: a 0700 home got no worker, and its owner's runs all failed.
    assert settled(box, a_run[1]) == {"done": 1}
    workers = _workers_of(_uid(box, "a"))
    assert workers, "A's worker is gone"
    for worker in workers:
        assert "--as-owner" in worker.cmdline()
        assert worker.cwd() == str(box.home("a"))  # moved there itself, once it was A


def test_a_users_output_goes_to_their_own_log_not_the_daemons(
    box: Box, a_run: tuple[str, str]
) -> None:
    # Review: users' workers inherited the daemon's stderr, its journal under systemd, where
    # a user's lines pass for the daemon's own.
    assert settled(box, a_run[1]) == {"done": 1}
    own_logs = Path(run_log.worker_log_path(str(box.home("a")), "cpu 0")).parent

    def written() -> tuple[str, list[Path]]:
        logs = sorted(own_logs.glob("worker-*.log"))
        daemon_log = box.daemon.log_path.read_text(errors="replace")
        return daemon_log, [p for p in logs if NOISE in p.read_text(errors="replace")]

    deadline = time.monotonic() + 30
    daemon_log, noisy = written()
    while NOISE not in daemon_log and not noisy:  # A's code writes for 15 s after its start
        assert time.monotonic() < deadline, "A's code wrote nothing anywhere"
        time.sleep(0.2)
        daemon_log, noisy = written()
    time.sleep(1.0)
    daemon_log, noisy = written()
    assert NOISE not in daemon_log
    assert noisy and all(p.stat().st_uid == _uid(box, "a") for p in noisy)
    assert [p.name for p in noisy] == ["worker-cpu_0.log"]


def test_status_shows_a_private_study_only_to_its_readers(box: Box, a_run: tuple[str, str]) -> None:
    # Review: `mosaic status` listed every user's studies, runs and tracebacks to every user.
    config, db = _project_with(box, "b", "private", FAILING, umask=None)  # a 0600 study
    result = box.cli("b", "run", config, db, "--no-autostart")
    assert result.returncode == 0, result.stderr
    assert settled(box, db) == {"failed": 1}
    assert os.stat(db).st_mode & 0o077 == 0

    def status(role: str, *args: str) -> str:
        result = box.cli(role, "status", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    for text in (status("a", "--json"), status("a")):
        assert db not in text and SECRET not in text, text
    reply = json.loads(status("a", "--json"))
    assert reply["hidden_studies"] >= 1
    assert a_run[1] in [s["db"] for s in reply["studies"]]  # A's own study, in full
    assert all(w["owner"] in (None, box.users["a"], box.users["b"]) for w in reply["workers"])
    # B (its owner) and an administrator see it all.
    for role in ("b", "adm"):
        text = status(role, "--json")
        assert db in text and SECRET in text, role
        assert SECRET in status(role)


def test_the_worker_directory_goes_with_the_daemon(tmp: Path) -> None:
    # Review: every daemon left its mosaicd-workers-* directory (and socket file) in /tmp.
    daemon = Daemon(tmp, workers=1).start()
    try:
        children = psutil.Process(daemon.proc.pid).children()  # type: ignore[union-attr]
        address = next(
            arg
            for child in children
            for arg in child.cmdline()
            if arg.startswith("ipc://") and "mosaicd-workers-" in arg
        )
        worker_dir = os.path.dirname(address.removeprefix("ipc://"))
        assert os.path.isdir(worker_dir)
    finally:
        assert daemon.stop() == 0
    assert not os.path.exists(worker_dir)


# -- checkpoints ------------------------------------------------------------------------------


class _RunsCode:
    """Unpickled in full, this creates `marker`: a stand-in for any code a pickle may run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_a_checkpoint_of_someone_else_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "payload": _RunsCode(str(marker))}, path)
    os.chown(path, 65534, -1)  # not this process's user: never unpickled in full
    with pytest.raises(checkpoints.UntrustedCheckpoint, match="more than weights"):
        checkpoints.load(str(path), "cpu")
    assert not marker.exists()
    # The process's own file (as the run's own checkpoint is): loaded, the reason said.
    os.chown(path, os.geteuid(), -1)
    loaded = checkpoints.load(str(path), "cpu")
    loaded["payload"].close()  # the file open() returned: the pickle's code did run
    assert marker.exists()


def test_mosaics_own_checkpoints_load_weights_only_and_resume_bit_identically(
    classes: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import numpy

    numpy.random.seed(5)  # numpy's RNG state is in every checkpoint once numpy is loaded
    whole = Recorder()
    execution.execute(make_spec(classes, tmp_path / "whole", epochs=3), whole.channel())
    files = tmp_path / "parked"
    first = Recorder(park_after=1)
    with pytest.raises(execution.Parked):
        execution.execute(make_spec(classes, files, epochs=3), first.channel())
    path = contract.checkpoint_path(str(files), 7)
    saved = torch.load(path, weights_only=True)  # no pickled object in what Mosaic saves
    assert isinstance(saved["rng"]["numpy"][1], torch.Tensor)
    loads: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        # The checkpoint's loads only: the worker's data cache also unpickles its own entries
        # (bytes it made itself, or its user's private cache directory: docs/performance.md).
        if args and str(args[0]) == str(path):
            loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    second = Recorder()
    execution.execute(make_spec(classes, files, epochs=3) | {"start_epoch": 1}, second.channel())
    assert loads and loads[0] is True and False not in loads
    numbers = ("train_loss", "test_loss", "train_acc", "test_acc")
    assert [[e[k] for k in numbers] for e in first.events + second.events] == [
        [e[k] for k in numbers] for e in whole.events
    ]
    assert "holds more than weights" not in capsys.readouterr().out
