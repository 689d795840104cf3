"""What produced a run, as the study records it: its code, its environment, its determinism.

Part of the shared contract (standard library only): the worker captures a run's provenance
(mosaicd.training.provenance) with :func:`file_digest` and :func:`git_state` from here, the daemon
stores it (mosaicd.storage.store, tables ``code_files``, ``run_code``, ``run_environment``), and
`mosaic show`, `mosaic diff` and `mosaic rerun` read it back with :func:`read` and
:func:`code_changes`. docs/database.md describes the tables.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
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


# -- reading a study's record ------------------------------------------------------------------


def _has_tables(conn: sqlite3.Connection) -> bool:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return {"code_files", "run_code", "run_environment"} <= names


def read(conn: sqlite3.Connection, run_id: int, with_text: bool = False) -> dict[str, Any] | None:
    """A run's provenance: {"environment": {...} or None, "code": [{section, class, path,
    sha256, git_commit, git_dirty[, text]}]}; None when the study records none for it (a run
    not started yet, or a study older than provenance)."""
    if not _has_tables(conn):
        return None
    row = conn.execute(
        f"SELECT {', '.join(ENVIRONMENT_FIELDS)} FROM run_environment WHERE run_id=?", (run_id,)
    ).fetchone()
    columns = ", ".join(f'c."{f}"' for f in CODE_FIELDS) + (", f.text" if with_text else "")
    code = [
        dict(zip((*CODE_FIELDS, "text"), r))
        for r in conn.execute(
            f"SELECT {columns} FROM run_code c LEFT JOIN code_files f USING (sha256) "
            "WHERE c.run_id=? ORDER BY c.rowid",
            (run_id,),
        )
    ]
    if row is None and not code:
        return None
    for entry in code:
        if entry["git_dirty"] is not None:
            entry["git_dirty"] = bool(entry["git_dirty"])
    return {"environment": dict(zip(ENVIRONMENT_FIELDS, row)) if row else None, "code": code}


def code_changes(conn: sqlite3.Connection, run_ids: list[int]) -> list[dict[str, Any]]:
    """The class files recorded for these runs whose content differs now (or that are gone):
    one entry per (path, recorded sha256) with the runs concerned, for `mosaic rerun`."""
    if not _has_tables(conn) or not run_ids:
        return []
    wanted = set(run_ids)
    recorded: dict[tuple[str, str], list[int]] = {}
    for run_id, path, sha in conn.execute("SELECT run_id, path, sha256 FROM run_code"):
        if run_id in wanted:
            recorded.setdefault((path, sha), []).append(run_id)
    now: dict[str, str | None] = {}
    changes = []
    for (path, sha), runs in sorted(recorded.items()):
        if path not in now:
            now[path] = file_digest(path)
        if now[path] != sha:
            changes.append({"path": path, "recorded": sha, "now": now[path], "runs": sorted(runs)})
    return changes
