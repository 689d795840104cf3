"""The worker's one start-up (mosaicd.training.worker.start), as the Ray actor calls it: no
argparse, in a process whose environment was set by whoever started it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from conftest import REPO
from test_execution import CLASSES, make_spec

from mosaic_client import contract, protocol
from mosaicd.training import worker

STARTER = """
import os, sys
from mosaicd.training.worker import start
start(sys.argv[1], sys.argv[2], "cpu", sys.argv[3], die_with_parent=False)
print("start returned", flush=True)
"""

# A data module that reports, in the run's log, the CUDA-check setting the run found.
PROBE = """
import os
from classes import points


class probed_points(points):
    def prepare(self, data, run_info, module_info):
        print("NVML=" + os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK", "unset"), flush=True)
        return super().prepare(data, run_info, module_info)
"""


def test_environment_and_warm_up_by_isolation() -> None:
    assert worker.cuda_check_environment("process") == {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    assert worker.cuda_check_environment("state") == {}
    assert worker.cuda_check_environment("none") == {}
    assert worker.warms_up("state", "cuda:0") and worker.warms_up("process", "cpu")
    assert not worker.warms_up("process", "cuda:1")


def test_start_refuses_an_unknown_isolation() -> None:
    with pytest.raises(ValueError, match="unknown isolation 'forked'; expected one of state"):
        worker.start("ipc:///nonexistent", "w", "cpu", "forked", die_with_parent=False)


@pytest.mark.parametrize(
    ("isolation", "preset", "seen"),
    [
        ("process", None, "NVML=1"),
        ("process", "0", "NVML=0"),  # what the starting process set is kept (a Ray runtime env)
    ],
)  # start() in state isolation, through main(), is what every daemon test's workers run
def test_start_serves_runs_until_told_to_exit(
    tmp_path: Path, isolation: str, preset: str | None, seen: str
) -> None:
    (tmp_path / "classes.py").write_text(CLASSES)
    (tmp_path / "probe.py").write_text(PROBE)
    spec = make_spec(str(tmp_path / "classes.py"), tmp_path / "runs", epochs=1)
    spec["modules"][0].update(
        {"class": "probed_points", "path_to_class": str(tmp_path / "probe.py")}
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    if preset is not None:
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = preset
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    address = f"ipc://{tmp_path}/w.sock"
    sock.bind(address)
    proc = subprocess.Popen(
        [sys.executable, "-c", STARTER, address, "w1", isolation],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def receive() -> dict:
            assert sock.poll(60_000), "the worker sent nothing within 60 s"
            identity, payload = sock.recv_multipart()
            assert identity == b"w1"
            return protocol.decode_worker_message(payload, protocol.WORKER_MESSAGES)

        hello = receive()
        assert hello["type"] == "hello" and hello["pid"] == proc.pid and hello["slot"] == "cpu"
        sock.send_multipart([b"w1", protocol.worker_message("run", spec=spec)])
        provenance, epoch, done = receive(), receive(), receive()
        # What the run loaded and ran in comes first, once it is built (issue 16).
        assert (provenance["type"], provenance["run_id"]) == ("provenance", 7)
        assert [e["path"] for e in provenance["code"]] == [
            str(tmp_path / "probe.py"),
            str(tmp_path / "classes.py"),
        ]
        assert (epoch["type"], epoch["run_id"], epoch["epoch"]) == ("epoch", 7, 1)
        assert done["type"] == "done", done
        assert done["results"]["epochs"] == 1
        log = Path(contract.run_log_path(spec["run_files_path"], 7)).read_text()
        assert seen in log and "epoch 1/1" in log
        sock.send_multipart([b"w1", protocol.worker_message("exit")])
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "start returned" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close(linger=0)
        ctx.term()
