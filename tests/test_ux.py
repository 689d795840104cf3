"""The researcher's view: the live status screen in a real terminal, logs, show, completion.

`status --watch` is driven in a real tmux terminal against a real daemon training a sweep, and
the test reads the screen the way a person would (tmux capture-pane).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Daemon, example_config, require_tools

from mosaic_client.cli import build_parser
from mosaic_client.completion import describe


class Tmux:
    """One tmux server on a private socket, so the test never touches a user's sessions."""

    def __init__(self, root: Path) -> None:
        self.socket = str(root / "tmux.sock")

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.socket, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def start(self, name: str, command: str, width: int = 140, height: int = 30) -> None:
        self("new-session", "-d", "-s", name, "-x", str(width), "-y", str(height), command)

    def screen(self, name: str) -> str:
        return self("capture-pane", "-p", "-t", name)

    def wait_screen(self, name: str, ready: Callable[[str], bool], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(name)
            if ready(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"the screen never became ready; last screen:\n{screen}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def daemon(tmp: Path) -> Iterator[Daemon]:
    # The daemon refuses to write studies inside its own directory: give it one of its own,
    # beside the project directory (`proj`) where the studies and run files go.
    root = tmp / "daemon"
    root.mkdir()
    d = Daemon(root).start()
    yield d
    d.stop()


@pytest.fixture
def proj(tmp: Path) -> Path:
    path = tmp / "proj"
    path.mkdir()
    return path


@pytest.fixture
def tmux(tmp: Path) -> Iterator[Tmux]:
    require_tools("tmux", packages="tmux")
    t = Tmux(tmp)
    yield t
    t.kill()


def _mosaic_in_terminal(d: Daemon, args: str, exit_file: Path) -> str:
    """A shell command for tmux: the CLI with the daemon's env, recording its exit code."""
    env = " ".join(
        f"{k}={shlex.quote(d.env[k])}" for k in ("MOSAIC_SOCKET", "MOSAIC_STATE_DIR", "PYTHONPATH")
    )
    # The pane stays open after the command so the screen can be read once it has quit.
    return (
        f"env {env} TERM=xterm-256color {shlex.quote(sys.executable)} -m mosaic_client.cli "
        f"{args}; echo $? > {shlex.quote(str(exit_file))}; sleep 60"
    )


def _wait_file(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"{path} was not written in {timeout} s")


def test_watch_shows_workers_and_running_runs_and_q_quits(
    daemon: Daemon, tmp: Path, proj: Path, tmux: Tmux
) -> None:
    # Long enough runs (a few seconds each) that the screen catches them mid-training.
    # Runs trained one per worker, so that both workers show as busy (an ensemble takes one).
    config = example_config(proj, epochs=400, multiplicity=2, extra_monitor="ensemble = off")
    db = str(proj / "watch.db")
    daemon.cli("run", str(config), db, check=True)
    exit_file = tmp / "exit"
    tmux.start("watch", _mosaic_in_terminal(daemon, f"status --watch --db {db}", exit_file))

    def training(screen: str) -> bool:
        return "Running (2)" in screen and "/400" in screen and "train " in screen

    screen = tmux.wait_screen("watch", training)
    assert "mosaicd running | 2 worker(s), 2 busy" in screen
    assert "w1 cpu" in screen and "w2 cpu" in screen
    assert f"study {db}: 2 runs: 2 running" in screen
    assert "[#" in screen or "[." in screen  # the epoch progress bar
    assert "dataset_OR(200,0.8,20) | mlp_funnel(2,3)" in screen  # fits in 140 columns
    first_line = screen.splitlines()[0]
    assert first_line.startswith("mosaic status --watch") and "q quits" in first_line

    # It redraws in place: the epoch counters move while the header stays on the first line.
    later = tmux.wait_screen("watch", lambda s: s != screen and "Running" in s, timeout=10)
    assert later.splitlines()[0].startswith("mosaic status --watch")

    tmux("send-keys", "-t", "watch", "q")
    assert _wait_file(exit_file) == "0"
    # The alternate screen is gone: the terminal is back as it was, no view left behind.
    assert "mosaic status --watch" not in tmux.screen("watch")
    daemon.cli("cancel", db, "-id", "all", check=True)


def test_watch_ctrl_c_quits_cleanly_and_fits_a_10000_run_study(
    daemon: Daemon, tmp: Path, proj: Path, tmux: Tmux
) -> None:
    daemon.cli("pause", check=True)  # nothing starts: 10,000 runs stay queued
    config = example_config(proj, epochs=1, multiplicity=10000)
    db = str(proj / "big.db")
    result = daemon.cli("run", str(config), db, check=True)
    assert "queued 10000 pipeline(s)" in result.stdout
    exit_file = tmp / "exit"
    height = 20
    tmux.start(
        "big",
        _mosaic_in_terminal(daemon, f"status --watch --db {db}", exit_file),
        width=100,
        height=height,
    )
    screen = tmux.wait_screen("big", lambda s: "10000 queued" in s)
    lines = screen.rstrip("\n").splitlines()
    assert len(lines) <= height
    assert "PAUSED" in lines[1]
    assert f"study {db}: 10000 runs: 10000 queued" in screen
    assert all(len(line) <= 100 for line in lines)

    tmux("send-keys", "-t", "big", "C-c")
    assert _wait_file(exit_file) == "0"
    daemon.cli("cancel", db, "-id", "all", check=True)


def test_watch_without_a_terminal_prints_plain_frames_until_the_sweep_ends(
    daemon: Daemon, proj: Path
) -> None:
    config = example_config(proj, epochs=20, multiplicity=2)
    db = str(proj / "plain.db")
    daemon.cli("run", str(config), db, check=True)
    result = daemon.cli("status", "--watch", "--interval", "0.2", "--db", db, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # no escape codes in a file or a pipe
    frames = result.stdout.split("--- ")[1:]
    assert frames, result.stdout
    assert "2 done" in frames[-1]


def test_watch_without_daemon_says_how_to_start_one(tmp: Path) -> None:
    d = Daemon(tmp)  # never started
    result = d.cli("status", "--watch")
    assert result.returncode == 3
    assert "no mosaicd answers" in result.stderr and "mosaicd &" in result.stderr


def test_logs_follow_reads_a_run_to_its_end(daemon: Daemon, proj: Path) -> None:
    config = example_config(proj, epochs=150, nb_processus=1)
    db = str(proj / "logs.db")
    daemon.cli("run", str(config), db, check=True)
    # Started while the run is queued or just starting: -f waits for the output, then follows.
    result = daemon.cli("logs", "1", "-f", "--db", db, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[mosaic] run 1 epoch 1/150" in result.stdout
    assert "[mosaic] run 1 epoch 150/150" in result.stdout
    assert daemon.request("show", db=db, run_id=1)["status"] == "done"
    # Without -f, the same text at once.
    again = daemon.cli("logs", "1", "--db", db, check=True)
    assert again.stdout == result.stdout


def test_logs_of_unknown_run_is_bad_input(daemon: Daemon, proj: Path) -> None:
    config = example_config(proj, epochs=1)
    db = str(proj / "l.db")
    daemon.cli("run", str(config), db, check=True)
    result = daemon.cli("logs", "99", "--db", db)
    assert result.returncode == 2
    assert "no run 99" in result.stderr


def test_show_prints_pipeline_params_history_and_results(daemon: Daemon, proj: Path) -> None:
    config = example_config(proj, epochs=3)
    db = str(proj / "show.db")
    daemon.cli("run", str(config), db, check=True)
    daemon.wait_for(db, total=1)
    out = daemon.cli("show", "1", "--db", db, check=True).stdout
    assert out.startswith("run 1: done")
    assert "pipeline: dataset_OR(200,0.8,20) | mlp_funnel(2,3)" in out
    assert "seed: 0" in out
    assert "results: train_loss=" in out and "nb_params=" in out
    assert "mlp_funnel_width = 3" in out and "lr = 0.01" in out
    assert "None -> queued" in out or "- -> queued" in out
    assert "queued -> running" in out and "running -> done" in out
    assert "epochs recorded: 3" in out


def test_show_of_a_failed_run_prints_its_traceback(daemon: Daemon, proj: Path) -> None:
    config = example_config(proj, epochs=2, mlp_width="0")  # the class refuses width 0
    db = str(proj / "fail.db")
    daemon.cli("run", str(config), db, check=True)
    daemon.wait_for(db, total=1)
    out = daemon.cli("show", "1", "--db", db, check=True).stdout
    assert out.startswith("run 1: failed")
    assert "failure:" in out and "Traceback" in out and "width must be at least 1" in out


def _commands() -> list[str]:
    _, commands = describe(build_parser())
    return [c.name for c in commands]


def test_completion_scripts_mention_every_command() -> None:
    names = _commands()
    assert {"run", "status", "logs", "show", "completion"} <= set(names)
    for shell in ("bash", "zsh"):
        result = subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", "completion", shell],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        script = result.stdout
        assert script.strip()
        for name in names:
            assert name in script, (shell, name)
    zsh = subprocess.run(
        [sys.executable, "-m", "mosaic_client.cli", "completion", "zsh"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert zsh.startswith("#compdef mosaic mosaic_run")


def _bash_complete(script: Path, words: list[str]) -> list[str]:
    """What bash offers for `words` (the last one being completed), using the real script."""
    array = " ".join(shlex.quote(w) for w in words)
    program = (
        f"source {shlex.quote(str(script))}\n"
        f"COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}\n"
        "_mosaic\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_is_valid_and_completes(tmp: Path) -> None:
    script = tmp / "mosaic.bash"
    script.write_text(
        subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", "completion", "bash"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert _bash_complete(script, ["mosaic", "sta"]) == ["status"]
    assert set(_bash_complete(script, ["mosaic", ""])) == set(_commands())
    assert "--watch" in _bash_complete(script, ["mosaic", "status", "--w"])
    assert _bash_complete(script, ["mosaic", "--socket", "/tmp/s", "lo"]) == ["logs"]
    assert _bash_complete(script, ["mosaic", "completion", ""]) == ["bash", "zsh"]
    # The seed's command names complete their own options.
    assert _bash_complete(script, ["mosaic_run", "--fo"]) == ["--follow"]
    assert "-param_name_and_value" in _bash_complete(script, ["mosaic", "rerun", "-param"])
