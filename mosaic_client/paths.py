"""Where the daemon's socket and state live, shared by the client and the daemon."""

from __future__ import annotations

import os
import stat
from pathlib import Path

SOCKET_ENV = "MOSAIC_SOCKET"
STATE_ENV = "MOSAIC_STATE_DIR"


def _private_dir(path: Path) -> Path:
    """Create a 0700 directory owned by us, refusing one someone else could have planted."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(
            f"{path} is not a directory owned by you; remove it or set {SOCKET_ENV} to another path"
        )
    return path


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "mosaic"
    # No login session runtime dir (containers, su): a per-uid directory in /tmp.
    return Path(f"/tmp/mosaic-{os.getuid()}")


def default_socket_path() -> str:
    override = os.environ.get(SOCKET_ENV)
    if override:
        return os.path.abspath(override)
    return str(runtime_dir() / "mosaicd.sock")


def ensure_socket_dir(socket_path: str) -> None:
    parent = Path(socket_path).parent
    if parent == runtime_dir():
        _private_dir(parent)
    else:
        parent.mkdir(parents=True, exist_ok=True)


def default_state_dir() -> str:
    override = os.environ.get(STATE_ENV)
    if override:
        return os.path.abspath(override)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "mosaic")


def endpoint(socket_path: str) -> str:
    return f"ipc://{socket_path}"
