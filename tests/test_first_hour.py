"""A new user's first hour: the rough edges found by trying Mosaic on a real study and on the
original tool's own configuration files (issue 18), each a test that failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import EXAMPLE, REPO, Daemon, example_config, write_project


def cli(root: Path, *args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mosaic_client.cli", *args], env=full,
                          cwd=cwd or root, capture_output=True, text=True, timeout=60)


# -- MOSAIC_SOCKET is a file path -----------------------------------------------------------


def test_a_url_form_socket_is_refused_and_starts_nothing(tmp: Path) -> None:
    config = example_config(tmp)
    for value in ("ipc:///tmp/mosaic-test.sock", "tcp://127.0.0.1:5555", "relative/d.sock"):
        result = cli(tmp, "run", str(config), str(tmp / "s.db"),
                     env={"MOSAIC_SOCKET": value, "MOSAIC_STATE_DIR": str(tmp / "state")})
        assert result.returncode == 2, result.stderr
        assert "MOSAIC_SOCKET" in result.stderr and "absolute file path" in result.stderr
        # Nothing started in a directory named after the URL, and no study was created.
        assert not (tmp / "ipc:").exists() and not (tmp / "tcp:").exists()
        assert not (tmp / "relative").exists() and not (tmp / "s.db").exists()


def test_mosaicd_refuses_a_url_form_socket(tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mosaicd", "--socket", "ipc:///tmp/x.sock", "--state-dir",
         str(tmp / "state"), "--workers", "1", "--gpus", ""],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp, capture_output=True, text=True,
        timeout=20)
    assert result.returncode == 2
    assert "--socket" in result.stderr and "absolute file path" in result.stderr
    assert not (tmp / "ipc:").exists()


# -- the original tool's configuration -----------------------------------------------------


def test_empty_optional_values_mean_not_set(tmp: Path) -> None:
    # The seed's shipped config.ini: empty class_loss_function / path_to_class_loss_function
    # beside loss_function = MSELoss.
    config = write_project(tmp, f"""
        [PROCESS]
        lr = 0.01
        epochs = 1
        data_scheme = dataset
        pipeline_scheme = mlp
        loss_function = MSELoss
        class_loss_function =
        path_to_class_loss_function =
        run_files_path = {tmp}/runs

        [MONITOR]
        need_gpu = false
        gpu_available = None
        nb_processus = 1
        multiplicity = 2

        [dataset_OR]
        type = dataset
        class = dataset_OR
        path_to_class = {EXAMPLE}/dataset.py
        data_size = 20
        train_prop = 0.5
        batch_size = 5
        key = data_{{class}}

        [mlp_funnel]
        type = mlp
        class = mlp_funnel
        path_to_class = {EXAMPLE}/mlp.py
        length = 1,2
        width = 3
        key = mlp_{{class}}
        """)
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
    for command in (["generate", str(config), str(tmp / "out.json")],
                    ["run", str(config), str(tmp / "s.db")]):
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
        proc = subprocess.run([sys.executable, "-m", "mosaic_client.cli", "status"],
                              env=d.env, cwd=tmp, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)
        os.close(write)
        assert proc.returncode in (0, 141, -13), proc.stderr
        assert "Broken pipe" not in proc.stderr and proc.stderr == ""
    finally:
        d.stop()
