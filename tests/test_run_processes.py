"""What a run leaves behind is its own (issue 18): the processes it forks end with it, its log
is capped (MONITOR max_log_mb) keeping the head and the tail, and a link planted at its log's
path is refused, never followed."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import psutil
from conftest import EXAMPLE, Daemon, example_config, query


def project_with(tmp: Path, body: str, extra_monitor: str = "") -> Path:
    """The OR example with its model replaced by a subclass whose __init__ runs `body`."""
    (tmp / "odd.py").write_text(
        f"exec(open({str(EXAMPLE / 'mlp.py')!r}).read())\n\n"
        "class mlp_odd(mlp_funnel):\n"
        "    def __init__(self, input_size, output_size, length, width):\n"
        "        super().__init__(input_size, output_size, length, width)\n"
        + "".join(f"        {line}\n" for line in textwrap.dedent(body).strip().splitlines())
    )
    cfg = example_config(tmp, epochs=2, multiplicity=1, extra_monitor=extra_monitor)
    cfg.write_text(
        cfg.read_text()
        .replace("class = mlp_funnel", "class = mlp_odd")
        .replace(f"path_to_class = {EXAMPLE}/mlp.py", f"path_to_class = {tmp}/odd.py")
    )
    return cfg


def run_alone(tmp: Path, cfg: Path, db: str) -> dict[str, int]:
    """Run the one-run study on a daemon of its own with one worker, to its end: the counts."""
    d = Daemon(tmp, workers=1).start()
    try:
        d.cli("run", str(cfg), db, check=True)
        return d.wait_for(db, total=1, timeout=60)
    finally:
        d.stop()


def test_a_process_forked_by_a_run_ends_with_it(tmp: Path) -> None:
    cfg = project_with(
        tmp,
        f"""
        import subprocess
        child = subprocess.Popen(["sleep", "300"])
        open({str(tmp / "child.pid")!r}, "w").write(str(child.pid))
        """,
    )
    d = Daemon(tmp, workers=1).start()
    db = str(tmp / "s.db")
    try:
        d.cli("run", str(cfg), db, check=True)
        counts = d.wait_for(db, total=1, timeout=60)
        assert counts["done"] == 1, query(db, "SELECT return_status FROM runs")
        pid = int((tmp / "child.pid").read_text())
        deadline = time.monotonic() + 5
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the run's child outlived it"
            time.sleep(0.05)
        log = (tmp / "runs" / "output_1.log").read_text()
        assert f"killed 1 process(es) the run left behind: {pid}: sleep 300" in log
    finally:
        d.stop()


def test_a_run_log_is_capped_keeping_head_and_tail(tmp: Path) -> None:
    cfg = project_with(
        tmp,
        """
        import sys
        print("FIRST LINE", flush=True)
        for i in range(60000):
            print(f"line {i:08d} " + "x" * 40)
        sys.stdout.flush()
        os.write(1, b"LAST LINE FROM C-LEVEL FD\\n")
        """,
        extra_monitor="max_log_mb = 0.5",
    )
    (tmp / "odd.py").write_text("import os\n" + (tmp / "odd.py").read_text())
    db = str(tmp / "s.db")
    assert run_alone(tmp, cfg, db)["done"] == 1
    log = (tmp / "runs" / "output_1.log").read_bytes()
    printed = 60000 * len(b"line 00000000 " + b"x" * 40 + b"\n")
    assert printed > 3 * 2**20
    assert len(log) <= 0.5 * 2**20 + 4096, len(log)
    assert log.startswith(b"FIRST LINE\n")
    assert b"LAST LINE FROM C-LEVEL FD\n" in log[-100_000:]
    assert b"bytes of output cut here: MONITOR max_log_mb" in log


def test_a_link_planted_at_the_run_log_is_refused(tmp: Path) -> None:
    cfg = example_config(tmp, epochs=1)
    (tmp / "runs").mkdir()
    target = tmp / "precious.txt"
    target.write_text("keep me\n")
    os.symlink(target, tmp / "runs" / "output_1.log")
    db = str(tmp / "s.db")
    assert run_alone(tmp, cfg, db)["failed"] == 1
    assert target.read_text() == "keep me\n"
    ((reason,),) = query(db, "SELECT return_status FROM runs WHERE run_id=1")
    assert "it is a symbolic link" in reason and "output_1.log" in reason
