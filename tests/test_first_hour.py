"""A new user's first hour: the rough edges found by trying Mosaic on a real study and on the
original tool's own configuration files (issue 18), each a test that failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ini
import pytest
from conftest import EXAMPLE, REPO, Daemon, example_config
from hypothesis import given
from hypothesis import strategies as st

from mosaic_client import class_files, contract, paths, render
from mosaic_client.config import count_text


def cli(
    root: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mosaic_client.cli", *args],
        env=full,
        cwd=cwd or root,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- MOSAIC_SOCKET is a file path -----------------------------------------------------------


def test_a_url_form_socket_is_refused_and_starts_nothing(tmp: Path) -> None:
    config = example_config(tmp)
    for value in ("ipc:///tmp/mosaic-test.sock", "tcp://127.0.0.1:5555", "relative/d.sock"):
        result = cli(
            tmp,
            "run",
            str(config),
            str(tmp / "s.db"),
            env={"MOSAIC_SOCKET": value, "MOSAIC_STATE_DIR": str(tmp / "state")},
        )
        assert result.returncode == 2, result.stderr
        assert "MOSAIC_SOCKET" in result.stderr and "absolute file path" in result.stderr
        # Nothing started in a directory named after the URL, and no study was created.
        assert not (tmp / "ipc:").exists() and not (tmp / "tcp:").exists()
        assert not (tmp / "relative").exists() and not (tmp / "s.db").exists()


def mosaicd_with_socket(tmp: Path, socket: str) -> subprocess.CompletedProcess[str]:
    """Start mosaicd in tmp with `--socket socket` (and its state in tmp/state)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mosaicd",
            "--socket",
            socket,
            "--state-dir",
            str(tmp / "state"),
            "--workers",
            "1",
            "--gpus",
            "",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_mosaicd_refuses_a_url_form_socket(tmp: Path) -> None:
    result = mosaicd_with_socket(tmp, "ipc:///tmp/x.sock")
    assert result.returncode == 2
    assert "--socket" in result.stderr and "absolute file path" in result.stderr
    assert not (tmp / "ipc:").exists()


# -- the original tool's configuration -----------------------------------------------------


def test_empty_optional_values_mean_not_set(tmp: Path) -> None:
    # The seed's shipped config.ini: empty class_loss_function / path_to_class_loss_function
    # beside loss_function = MSELoss.
    config = ini.write(
        tmp,
        ini.process(
            tmp,
            1,
            seed=None,
            loss_function="MSELoss",
            extra="class_loss_function =\npath_to_class_loss_function =",
        ),
        ini.monitor(1, 2),
        ini.dataset(20, 0.5, 5),
        ini.mlp("1,2", 3),
    )
    result = cli(tmp, "generate", str(config), str(tmp / "out.json"))
    assert result.returncode == 0, result.stderr
    # The count in words: distinct pipelines, multiplicity, runs.
    assert "2 distinct pipelines × multiplicity 2 = 4 runs" in result.stdout


# -- class files are checked before anything is queued ------------------------------------


def test_a_class_file_with_a_syntax_error_is_refused_with_its_line(tmp: Path) -> None:
    config = example_config(tmp)
    broken = tmp / "mlp_broken.py"
    broken.write_text((EXAMPLE / "mlp.py").read_text() + "\n\ndef oops(:\n    pass\n")
    text = config.read_text().replace(f"{EXAMPLE}/mlp.py", str(broken))
    config.write_text(text)
    line = len((EXAMPLE / "mlp.py").read_text().splitlines()) + 3
    for command in (
        ["generate", str(config), str(tmp / "out.json")],
        ["run", str(config), str(tmp / "s.db")],
    ):
        result = cli(tmp, *command, env={"MOSAIC_SOCKET": str(tmp / "no" / "d.sock")})
        assert result.returncode == 2, result.stderr
        assert f"{broken}:{line}" in result.stderr and "SyntaxError" in result.stderr
    assert not (tmp / "out.json").exists() and not (tmp / "s.db").exists()


def test_a_class_file_without_its_class_is_refused(tmp: Path) -> None:
    config = example_config(tmp)
    other = tmp / "other.py"
    other.write_text("import torch\n\nclass something_else(torch.nn.Module):\n    pass\n")
    config.write_text(config.read_text().replace(f"{EXAMPLE}/mlp.py", str(other)))
    result = cli(tmp, "generate", str(config), str(tmp / "out.json"))
    assert result.returncode == 2
    assert str(other) in result.stderr and "mlp_funnel" in result.stderr
    assert not (tmp / "out.json").exists()


# -- a closed stdout ends a command quietly ------------------------------------------------


def test_a_closed_stdout_ends_the_command_quietly(tmp: Path) -> None:
    d = Daemon(tmp / "d", workers=1).start()
    try:
        read, write = os.pipe()
        os.close(read)  # like `mosaic status | head -1` once head has gone
        proc = subprocess.run(
            [sys.executable, "-m", "mosaic_client.cli", "status"],
            env=d.env,
            cwd=tmp,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        os.close(write)
        assert proc.returncode in (0, 141, -13), proc.stderr
        assert "Broken pipe" not in proc.stderr and proc.stderr == ""
    finally:
        d.stop()


def test_other_commands_end_quietly_on_a_closed_stdout(tmp: Path) -> None:
    config = example_config(tmp)
    read, write = os.pipe()
    os.close(read)
    try:
        for args in (
            ["--help"],
            ["generate", str(config), str(tmp / "o.json")],
            ["completion", "bash"],
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "mosaic_client.cli", *args],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                cwd=tmp,
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
            assert proc.returncode in (0, 141, -13), (args, proc.stderr)
            assert proc.stderr == "", (args, proc.stderr)
    finally:
        os.close(write)


# -- the socket setting, as a pure check ----------------------------------------------------


@pytest.mark.parametrize(
    "value, says",
    [
        ("ipc:///run/m.sock", "is a URL"),
        ("tcp://127.0.0.1:5555", "is a URL"),
        ("inproc://x", "is a URL"),
        ("d.sock", "relative path"),
        ("./run/d.sock", "relative path"),
    ],
)
def test_checked_socket_path_refuses(value: str, says: str) -> None:
    with pytest.raises(paths.SocketPathError) as caught:
        paths.checked_socket_path(value, "MOSAIC_SOCKET")
    message = str(caught.value)
    assert says in message and "absolute file path" in message and "MOSAIC_SOCKET" in message


def test_checked_socket_path_keeps_absolute_paths() -> None:
    assert paths.checked_socket_path("/tmp/a/../m.sock", "--socket") == "/tmp/m.sock"
    assert paths.checked_socket_path("~/m.sock", "--socket") == os.path.expanduser("~/m.sock")


def test_the_socket_option_is_checked_too(tmp: Path) -> None:
    result = cli(tmp, "--socket", "ipc:///tmp/x.sock", "status")
    assert result.returncode == 2
    assert "--socket" in result.stderr and "absolute file path" in result.stderr
    result = mosaicd_with_socket(tmp, "rel.sock")
    assert result.returncode == 2 and "relative path" in result.stderr
    assert not (tmp / "rel.sock").exists() and not (tmp / "state").exists()


# -- class files, as a pure check -----------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "class Net:\n    pass\n",
        "import torch\nNet = torch.nn.Linear\n",
        "from torch.nn import Linear as Net\n",
        "try:\n    from fast import Net\nexcept ImportError:\n    class Net:\n        pass\n",
        "def Net(**kw):\n    return kw\n",
        "from helpers import *\n",
        "globals()['Net'] = object\n",
        "Net: type = object\n",
        "A, Net = object, object\n",
    ],
)
def test_a_class_file_binding_the_name_is_accepted(tmp: Path, source: str) -> None:
    path = tmp / "m.py"
    path.write_text(source)
    assert class_files.class_file_problem(str(path), "Net") is None


def test_a_class_file_problem_names_file_line_and_classes(tmp: Path) -> None:
    path = tmp / "m.py"
    path.write_text("class A:\n    pass\n\nclass B:\n  x = 1\n   y = 2\n")
    problem = class_files.class_file_problem(str(path), "A")
    assert (
        problem
        == f"{path}:6: IndentationError: unindent does not match any outer indentation level"
        or (problem or "").startswith(f"{path}:6: IndentationError")
    )
    path.write_text("class A:\n    pass\n\ndef f():\n    pass\n\nclass B(A):\n    pass\n")
    problem = class_files.class_file_problem(str(path), "Net") or ""
    assert problem.startswith(f"{path} defines no class Net") and "A, B" in problem
    # Only the compiler refuses this one; ast.parse alone accepts it.
    path.write_text("class A:\n    pass\nreturn 1\n")
    assert (class_files.class_file_problem(str(path), "A") or "").startswith(
        f"{path}:3: SyntaxError: 'return' outside function"
    )
    # A name bound only inside a function is not a module name.
    path.write_text("def make():\n    class Net:\n        pass\n    return Net\n")
    assert class_files.class_file_problem(str(path), "Net") is not None


def test_an_own_loss_class_file_is_checked(tmp: Path) -> None:
    config = example_config(tmp)
    (tmp / "loss.py").write_text("import torch\n\nclass Other(torch.nn.Module):\n    pass\n")
    text = config.read_text().replace(
        "loss_function = BCELoss",
        f"loss_function =\nclass_loss_function = MyLoss\n"
        f"path_to_class_loss_function = {tmp}/loss.py",
    )
    config.write_text(text)
    result = cli(tmp, "generate", str(config), str(tmp / "out.json"))
    assert result.returncode == 2
    assert f"{tmp}/loss.py defines no class MyLoss" in result.stderr
    assert not (tmp / "out.json").exists()


def test_the_run_count_in_words() -> None:
    assert count_text(32, 2) == "16 distinct pipelines × multiplicity 2 = 32 runs"
    assert count_text(1, 1) == "1 distinct pipeline × multiplicity 1 = 1 run"


# -- numbers, status text, ETA --------------------------------------------------------------


def test_one_number_format() -> None:
    assert render.fmt(0.9499) == "0.9499" and render.fmt(1.0) == "1.000"
    assert render.fmt(0.08976) == "0.08976" and render.fmt(0.377) == "0.3770"
    assert render.fmt(7) == "7" and render.fmt(None) == "-"
    assert render.fmt(2.5, ".2f") == "2.50"


def _study(running: list[dict], done: list[dict], failed: list[dict]) -> dict:
    return {
        "paused": False,
        "workers": [],
        "queued": 0,
        "studies": [
            {
                "db": "/s.db",
                "counts": {"done": len(done)},
                "running": running,
                "done": done,
                "failed": failed,
            }
        ],
    }


def test_status_text_shows_accuracy_and_no_empty_headings() -> None:
    done = [
        {
            "run_id": 1,
            "pipeline": "p",
            "train_loss": 0.5,
            "test_loss": 0.25,
            "duration": 1.5,
            "train_acc": 1.0,
            "test_acc": 0.9499,
        }
    ]
    text = render.status_text(_study([], done, []), 10)
    assert "acc train 1.000 / test 0.9499" in text
    assert "train_loss 0.5000" in text and "test_loss 0.2500" in text
    assert "Running:" not in text and "Error" not in text and "Done (latest 10):" in text
    # A study without accuracy shows none.
    done[0].update(train_acc=None, test_acc=None)
    assert "acc" not in render.status_text(_study([], done, []), 10)
    failed = [{"run_id": 2, "pipeline": "q", "return_status": "Traceback\nboom"}]
    text = render.status_text(_study([], [], failed), 10)
    assert "Error (latest 10):" in text and "Done" not in text and "Traceback" in text


def test_eta_counts_down_while_nothing_finishes() -> None:
    eta = render.next_eta(None, 10.0, 1, 4, [0.5])  # 1.5 runs' work in 10 s
    assert eta.seconds == pytest.approx(10.0 * 2.5 / 1.5)
    later = render.next_eta(eta, 15.0, 1, 4, [0.5])  # no epoch in 5 s: it only counts down
    assert later.seconds == pytest.approx(eta.seconds - 5.0)
    assert render.next_eta(None, 5.0, 0, 4, []).seconds is None  # nothing to go on yet
    assert render.next_eta(later, 20.0, 4, 4, []).seconds == 0.0
    # The old estimate, elapsed / finished * left, rose from 30 s to 45 s here.
    assert later.seconds < 30.0


@given(
    steps=st.lists(st.tuples(st.floats(0.01, 100.0), st.floats(0.0, 1.0)), min_size=1, max_size=30),
    finished=st.integers(0, 9),
    total=st.integers(10, 50),
    running=st.integers(0, 4),
)
def test_eta_never_rises_while_nothing_finishes(
    steps: list[tuple[float, float]], finished: int, total: int, running: int
) -> None:
    elapsed, fraction = 1.0, 0.0
    eta = render.next_eta(None, elapsed, finished, total, [fraction] * running)
    for dt, more in steps:
        elapsed += dt
        fraction = min(1.0, fraction + more * (1.0 - fraction))  # epochs only go forward
        new = render.next_eta(eta, elapsed, finished, total, [fraction] * running)
        if eta.seconds is not None:
            assert new.seconds is not None and new.seconds <= eta.seconds + 1e-9
            assert new.seconds >= 0.0
        eta = new


def test_progress_line_shows_the_eta_unless_paused() -> None:
    assert render.progress_line(1, 0, 0, 2, 4, False, 75.0).endswith(", ETA 1:15")
    assert "ETA" not in render.progress_line(1, 0, 0, 2, 4, True, 75.0)
    assert "ETA" not in render.progress_line(1, 0, 0, 2, 4, False, None)


def test_plotloss_title_keeps_four_significant_digits() -> None:
    from mosaic_client.analysis import RunLosses
    from mosaic_client.plots import _title

    run = RunLosses(
        run_id=3,
        pipeline="data | mlp",
        status="done",
        epochs=[1, 2],
        train_loss=[0.5, 0.25],
        test_loss=[0.5, 0.3],
        results={
            "train_loss": 0.25,
            "test_loss": 0.3,
            "nb_params": 17,
            "epochs": 2,
            "train_acc": 1.0,
            "test_acc": 0.9499,
        },
    )
    title = _title(run, 60)
    assert "acc train 1.000 / test 0.9499" in title and "17 params" in title


# -- show and logs without a daemon -----------------------------------------------------------


def test_show_and_logs_read_the_study_when_no_daemon_runs(tmp: Path) -> None:
    d = Daemon(tmp / "d", workers=1).start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(example_config(tmp, epochs=2)), db, check=True)
        d.wait_for(db)
        live = d.cli("show", "1", "--db", db, check=True).stdout
    finally:
        d.stop()
    offline = d.cli("show", "1", "--db", db)
    assert offline.returncode == 0, offline.stderr
    assert "daemon not running: read from the study" in offline.stderr
    # The same run as the daemon described it, history included.
    assert offline.stdout == live and "run 1: done" in offline.stdout
    log = Path(contract.run_log_path(str(tmp / "runs"), 1))
    assert log.stat().st_size > 0
    # No --db: the one study the stopped daemon served.
    for args in (["logs", "1"], ["logs", "1", "--db", db], ["logs", "1", "-f"]):
        result = d.cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "daemon not running" in result.stderr
        assert result.stdout == log.read_text(errors="replace")
    missing = d.cli("show", "9", "--db", db)
    assert missing.returncode == 2 and "no run 9" in missing.stderr
