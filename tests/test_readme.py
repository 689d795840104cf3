"""The README's set-up commands, run exactly as written, as a new user would.

The second command (`scripts/test`: prepare everything and run the test suite) is what `.ci/run`
runs; this test runs the first one — a fresh venv, the install, and the tutorial's sweep through
an autostarted daemon — in a copy of the repository, with the daemon's socket and state kept
private to the test.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_readme_has_the_two_setup_commands() -> None:
    commands = readme_commands()
    assert len(commands) >= 2
    assert "pip install -q torch==2.13.0 -e ." in commands[0]
    assert "mosaic run examples/or_mlp/config.ini results.db --follow" in commands[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci, "`.ci/run` must run the README's test command as written"


def test_the_test_command_prepares_everything() -> None:
    # scripts/test: the system tools (scripts/test-tools), the venv and install, then pytest
    # with the command's arguments; the tools it checks are those the tests drive.
    command = readme_commands()[1]
    assert command == "scripts/test"
    script = (REPO / command).read_text()
    assert "scripts/test-tools" in script
    assert "pip install -q torch==2.13.0 -e '.[test]'" in script
    assert '-m pytest -q -n 2 --dist loadfile "$@"' in script
    tools = (REPO / "scripts" / "test-tools").read_text()
    for tool, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        assert f'"{tool} {package}"' in tools
    assert "apt-get install" in tools and '"${CI:-}" = true' in tools
    for path in ("scripts/test", "scripts/test-tools", ".ci/run"):
        assert os.access(REPO / path, os.X_OK), f"{path} is not executable"


@pytest.mark.slow
def test_readme_main_command_on_a_fresh_copy() -> None:
    command = readme_commands()[0]
    root = Path(tempfile.mkdtemp(prefix="mos-readme-"))
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        copy = root / "mosaic"
        for name in files:
            source = REPO / name
            if source.is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy / name)
        (root / "daemon").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
        env.update(
            MOSAIC_SOCKET=str(root / "daemon" / "d.sock"),
            MOSAIC_STATE_DIR=str(root / "daemon" / "state"),
        )
        try:
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=copy,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert "finished: 32 done, 0 failed" in result.stdout
            conn = sqlite3.connect(copy / "results.db")
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute("SELECT count(*) FROM run_results").fetchone() == (32,)
            assert conn.execute("SELECT count(*) FROM run_epochs").fetchone() == (320,)
            conn.close()
        finally:
            subprocess.run(
                [str(copy / ".venv" / "bin" / "mosaic"), "shutdown"],
                env=env,
                capture_output=True,
                timeout=120,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
