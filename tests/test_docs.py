"""Every `mosaic` command shown in README.md and docs/*.md runs, exactly as written.

For each document: the commands of its ```sh, ```bash and ```console blocks that start with
`mosaic` (or a seed name like `mosaic_run`) run in order, in a fresh copy of the repository's
examples with a private daemon, and must exit 0, or with the code the document announces in a
trailing `# exits N` comment. Blocks that must not run (systemctl, pip) use another fence
language, `text`, in the document itself; nothing is skipped here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Daemon

from mosaic_client import protocol
from mosaic_client.connection import DaemonUnavailable

RUNNABLE_FENCES = {"sh", "bash", "console", "shell"}
FENCE = re.compile(r"^```+\s*([\w-]*)\s*$")
EXPECTED_EXIT = re.compile(r"#\s*exits\s+(\d+)\s*$")
COMMAND = re.compile(r"^mosaic(_\w+)?(\s|$)")


def shell_blocks(text: str) -> Iterator[tuple[str, list[str]]]:
    """(fence language, lines) of every fenced block."""
    language, lines = None, []
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if match and language is None:
            language, lines = match.group(1).lower(), []
        elif line.strip().startswith("```") and language is not None:
            yield language, lines
            language = None
        elif language is not None:
            lines.append(line)


def commands_of(text: str) -> list[tuple[str, int]]:
    """The mosaic commands of a document, in order, with the exit code each must give."""
    found = []
    for language, lines in shell_blocks(text):
        if language not in RUNNABLE_FENCES:
            continue
        logical: list[str] = []
        pending = ""
        for line in lines:
            if language == "console":
                # Only prompt lines are commands; the rest is the output shown.
                if not (line.startswith("$ ") or pending):
                    continue
                line = line[2:] if line.startswith("$ ") and not pending else line
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        for command in logical:
            command = command.strip()
            if not COMMAND.match(command):
                continue
            match = EXPECTED_EXIT.search(command)
            found.append((command, int(match.group(1)) if match else 0))
    return found


def documents() -> list[Path]:
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [d for d in docs if commands_of(d.read_text())]


def test_the_user_guide_has_commands_to_run() -> None:
    names = {d.name for d in documents()}
    assert {"tutorial.md", "cli.md", "classes.md"} <= names, names


class SharedDaemon:
    """One daemon for every document: its workers import torch once, not once per page.

    Each page still starts from a clean slate: a fresh copy of the repository, the daemon
    resumed, and no run of an earlier page left queued. A page that stops the daemon
    (`mosaic shutdown`) gets a new one before the next page.
    """

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.daemon = Daemon(root)
        self.env = self.daemon.env
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.pop("COLUMNS", None)

    def answering(self) -> bool:
        try:
            self.daemon.request("ping", timeout=5)
            return True
        except DaemonUnavailable:
            return False

    def ready(self) -> None:
        if not self.answering():
            self.daemon.stop()
            self.daemon.start()
        self.daemon.request("resume")

    def clear(self) -> None:
        if not self.answering():
            return
        for study in self.daemon.request("studies"):
            if (
                study["counts"].get("queued")
                or study["counts"].get("running")
                or study["counts"].get("paused")
            ):
                self.daemon.request("cancel", db=study["db"], selection={"kind": "all"})

    def close(self) -> None:
        try:
            self.daemon.request("shutdown", timeout=10)  # also one a command autostarted
        except (DaemonUnavailable, protocol.ProtocolError):
            pass
        self.daemon.stop()


@pytest.fixture(scope="module")
def shared() -> Iterator[SharedDaemon]:
    root = Path(tempfile.mkdtemp(prefix="mosdoc-"))  # short: ipc paths are limited
    daemon = SharedDaemon(root / "daemon")
    yield daemon
    daemon.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_commands_in_doc_run_as_written(doc: Path, tmp: Path, shared: SharedDaemon) -> None:
    # The repository's layout as a newcomer has it (commands run from the repository root),
    # with the daemon's socket and state out of the way in their own directory.
    root = tmp / "repo"
    for part in ("examples", "docs"):  # docs: a command may write an image into docs/images
        shutil.copytree(
            REPO / part, root / part, ignore=shutil.ignore_patterns(".runs", "__pycache__", "*.db*")
        )
    shared.ready()
    try:
        for command, expected in commands_of(doc.read_text()):
            started = time.monotonic()
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=root,
                env=shared.env,
                capture_output=True,
                text=True,
                timeout=300,
                stdin=subprocess.DEVNULL,
            )
            assert result.returncode == expected, (
                f"{doc.name}: `{command}` exited {result.returncode}, expected {expected}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
            # Shown with -s, and in the report of a failure: which command is slow.
            print(f"{time.monotonic() - started:6.2f}s  {command}")
    finally:
        shared.clear()


def test_commands_are_extracted_as_a_reader_sees_them() -> None:
    text = "\n".join(
        [
            "```sh",
            "mosaic run a.ini a.db --follow",
            "sqlite3 a.db 'SELECT 1'",
            "mosaic show 99 --db a.db   # exits 2",
            "mosaic plotloss a.db out.pdf \\",
            "  -id all",
            "```",
            "```text",
            "mosaic never runs",
            "```",
            "```console",
            "$ mosaic status",
            "mosaicd: running, 2 worker(s)",
            "$ mosaic_run a.ini a.db",
            "```",
        ]
    )
    assert commands_of(text) == [
        ("mosaic run a.ini a.db --follow", 0),
        ("mosaic show 99 --db a.db   # exits 2", 2),
        ("mosaic plotloss a.db out.pdf    -id all", 0),
        ("mosaic status", 0),
        ("mosaic_run a.ini a.db", 0),
    ]
