"""A run's determinism settings and provenance, in the worker (imports torch).

:func:`apply_determinism` turns on what ``[PROCESS] deterministic = true`` asks for before a run
is seeded and built; the worker's GlobalState puts the flags back after the run.
:func:`environment` and :func:`code` say what the run's start loaded and ran in: the exact
bytes of every class file the run executed (mosaicd.training.execution.load_user_class keeps them),
the git state of the directories holding them, the library versions, the device and the determinism
in force. The worker sends them as a "provenance" message; the daemon stores them
(mosaicd.storage.store).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from mosaic_client import provenance
from mosaic_client.protocol import RunSpec
from mosaic_client.schema import ProcessSettings


def apply_determinism(process: ProcessSettings) -> None:
    """Turn on deterministic algorithms when the submission asks for them.

    CUBLAS_WORKSPACE_CONFIG is read when cuBLAS first sets up its workspace, so a GPU worker
    gets it at start (mosaicd.training.worker.start); setting it here covers a process that has not
    touched CUDA yet. Without it torch refuses deterministic cuBLAS calls with its own message.
    """
    if not process["deterministic"]:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", provenance.CUBLAS_DETERMINISTIC)
    # Never warn_only: an operation with no deterministic implementation must fail the run
    # with torch's message rather than let it run non-deterministically.
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """provenance.ENVIRONMENT_FIELDS as they are in this process now."""
    cuda = device.type == "cuda"
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError:
        cudnn = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def code(
    spec: RunSpec,
    sources: dict[str, bytes],
    git: dict[str, tuple[str | None, bool | None]] | None = None,
) -> list[dict[str, Any]]:
    """One entry per class file of the spec the run loaded (`sources`: path -> bytes run).
    `git`: directory -> git state, shared by runs that start together (an ensemble's members)
    so that git is asked once per directory, not once per member (two processes each)."""
    wanted: list[tuple[str, str | None, str]] = [
        (str(m.get("name") or m.get("class")), m.get("class"), m["path_to_class"])
        for m in spec["modules"]
    ]
    process = spec["process"]
    if process["class_loss_function"] and process["path_to_class_loss_function"]:
        wanted.append(
            (
                provenance.LOSS_SECTION,
                process["class_loss_function"],
                process["path_to_class_loss_function"],
            )
        )
    if git is None:
        git = {}
    entries = []
    for section, cls, path in wanted:
        data = sources.get(path)
        if data is None:
            continue  # never loaded: the build failed before it
        directory = os.path.dirname(os.path.abspath(path))
        if directory not in git:
            git[directory] = provenance.git_state(directory)
        commit, dirty = git[directory]
        entries.append(
            {
                "section": section,
                "class": cls,
                "path": path,
                "sha256": provenance.digest(data),
                # Text for people to read and diff; the hash is of the exact bytes.
                "text": data.decode("utf-8", errors="replace"),
                "git_commit": commit,
                "git_dirty": dirty,
            }
        )
    return entries
