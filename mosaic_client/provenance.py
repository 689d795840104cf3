"""What produced a run, as the study records it: its code, its environment, its determinism.

Part of the shared contract (standard library only): the worker captures a run's provenance
(mosaicd.training.provenance) with :func:`file_digest` and :func:`git_state` from here, the daemon
stores it (mosaicd.storage.store, tables ``code_files``, ``run_code``, ``run_environment``), and
`mosaic show`, `mosaic diff` and `mosaic rerun` read it back through
mosaic_client.study_reading (``run_provenance``, ``recorded_code``); :func:`code_changes` compares
the record with the files now. docs/database.md describes the tables.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from typing import Any

# The columns of run_environment besides run_id, in table order; what the worker sends as a
# run's "environment" (protocol.WORKER_MESSAGES["provenance"]).
ENVIRONMENT_FIELDS: tuple[str, ...] = (
    "python",  # the interpreter's version, e.g. 3.12.3
    "torch",  # torch.__version__
    "cuda",  # torch.version.cuda: the CUDA torch was built with (None on a CPU build)
    "cudnn",  # torch.backends.cudnn.version() (None without cuDNN)
    "device",  # the run's device, e.g. cpu or cuda:0
    "device_name",  # the GPU's name, or the CPU's model name
    "threads",  # torch.get_num_threads() when the run started
    "deterministic",  # 1 when torch.use_deterministic_algorithms was on
    "cudnn_deterministic",  # torch.backends.cudnn.deterministic
    "cudnn_benchmark",  # torch.backends.cudnn.benchmark
    "cublas_workspace_config",  # $CUBLAS_WORKSPACE_CONFIG, which cuBLAS needs to be deterministic
)
# The fields of each code entry the worker sends: one per class file (and loss file) it loaded.
CODE_FIELDS: tuple[str, ...] = ("section", "class", "path", "sha256", "git_commit", "git_dirty")
# The `section` of the loss class's file (no class section is named like this: it is the
# [PROCESS] section, where class_loss_function is set).
LOSS_SECTION = "PROCESS"
# The value of CUBLAS_WORKSPACE_CONFIG that makes cuBLAS deterministic (torch's documentation
# on reproducibility).
CUBLAS_DETERMINISTIC = ":4096:8"
GIT_TIMEOUT = 5.0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str | None:
    """The SHA-256 of a file's bytes, or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return digest(fh.read())
    except OSError:
        return None


def git_state(directory: str) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the git repository holding
    `directory`; (None, None) outside a repository, without git, or when git does not answer
    in GIT_TIMEOUT seconds. Untracked files do not count as dirty: a project's run files and
    databases usually sit untracked next to its classes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", directory, *args],
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT,
                env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # a status must not take locks
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit.strip(), None if status is None else bool(status.strip())


# -- what changed since a run was recorded ------------------------------------------------------


def code_changes(recorded: dict[tuple[str, str], list[int]]) -> list[dict[str, Any]]:
    """The recorded class files (study_reading.recorded_code: {(path, sha256): run ids}) whose
    content differs now (or that are gone): one entry per (path, recorded sha256) with the runs
    concerned, for `mosaic rerun`."""
    now: dict[str, str | None] = {}
    changes = []
    for (path, sha), runs in sorted(recorded.items()):
        if path not in now:
            now[path] = file_digest(path)
        if now[path] != sha:
            changes.append({"path": path, "recorded": sha, "now": now[path], "runs": sorted(runs)})
    return changes
