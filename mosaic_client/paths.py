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


class SocketPathError(ValueError):
    """A socket setting that is not an absolute file path; the message says what to do."""


def checked_socket_path(value: str, source: str) -> str:
    """`value` (from `source`: MOSAIC_SOCKET or --socket) when it is an absolute file path.

    A URL form (ipc:///path, tcp://host:port) would be taken as a relative directory named
    "ipc:", and a relative path names a different socket from every directory: both would
    start a second daemon where the user never looks, so they are refused."""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        hint = rest if scheme == "ipc" and os.path.isabs(rest) else "/tmp/mosaic/d.sock"
        raise SocketPathError(
            f"{source}={value!r} is a URL; it must be an absolute file path such as {hint} "
            "(mosaic adds the ipc:// itself and listens on this machine only); "
            f"set {source} to a file path, or leave it out for the per-user socket"
        )
    if not os.path.isabs(os.path.expanduser(value)):
        raise SocketPathError(
            f"{source}={value!r} is a relative path, which names a different socket from every "
            f"directory; it must be an absolute file path such as {os.path.abspath(value)}"
        )
    return os.path.normpath(os.path.expanduser(value))


def socket_path(option: str | None = None) -> str:
    """The socket to use: `--socket` when given, else $MOSAIC_SOCKET, else the per-user one.
    Raises SocketPathError for a URL or a relative path."""
    if option:
        return checked_socket_path(option, "--socket")
    override = os.environ.get(SOCKET_ENV)
    if override:
        return checked_socket_path(override, SOCKET_ENV)
    return str(runtime_dir() / "mosaicd.sock")


def default_socket_path() -> str:
    return socket_path(None)


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
