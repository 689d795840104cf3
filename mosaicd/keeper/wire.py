"""Frames between the daemon and a keeper: a 4-byte length, then msgpack; descriptors ride
with the length (SCM_RIGHTS). Both sides use these functions, each with a deadline.

Why a stream socket of our own and not the workers' ZeroMQ socket: a keeper answers one request
at a time, and proves what it opened by handing the open descriptor over (the daemon then asks
the kernel, by fstat, which file it is and whose). The length is read and bounded before any
payload is, so a keeper cannot make the daemon hold more than MAX_FRAME bytes.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from mosaic_client import protocol

MAX_FRAME = protocol.MAX_KEEPER_MESSAGE_BYTES
MAX_FDS = 64  # descriptors with one frame: proofs of access for a batch of paths
_HEADER = struct.Struct(">I")


class WireError(Exception):
    """The other side sent something that is not a frame, or went away."""


class WireTimeout(WireError):
    """The other side did not answer before the deadline."""


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise WireTimeout("no answer in time")
    return left


def send(
    sock: socket.socket, message: Any, fds: list[int] | None = None, deadline: float | None = None
) -> None:
    payload = protocol.pack(message)
    if len(payload) > MAX_FRAME:
        raise WireError(f"a message of {len(payload)} bytes is over {MAX_FRAME}")
    header = _HEADER.pack(len(payload))
    try:
        sock.settimeout(_remaining(deadline))
        if fds:
            socket.send_fds(sock, [header], fds)
        else:
            sock.sendall(header)
        sock.settimeout(_remaining(deadline))
        sock.sendall(payload)
    except TimeoutError:
        raise WireTimeout("could not send in time") from None
    except OSError as exc:
        raise WireError(f"cannot send: {exc}") from None


def _read_exact(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    chunks = []
    while size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise WireError("the other side closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket, deadline: float | None = None) -> tuple[Any, list[int]]:
    """One frame's message and the descriptors that came with it. Descriptors beyond MAX_FDS
    are closed by the kernel (MSG_CTRUNC); a frame over MAX_FRAME is refused before it is read."""
    fds: list[int] = []
    try:
        sock.settimeout(_remaining(deadline))
        head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, MAX_FDS)
        if not head:
            raise WireError("the other side closed the connection")
        if len(head) < _HEADER.size:
            head += _read_exact(sock, _HEADER.size - len(head), deadline)
        (size,) = _HEADER.unpack(head)
        if size > MAX_FRAME:
            raise WireError(f"a frame of {size} bytes is over {MAX_FRAME}")
        payload = _read_exact(sock, size, deadline)
        return protocol.unpack(payload), fds
    except TimeoutError:
        _close(fds)
        raise WireTimeout("no answer in time") from None
    except WireError:
        _close(fds)
        raise
    except Exception as exc:  # msgpack raises many kinds for bad bytes; OSError for a reset
        _close(fds)
        raise WireError(f"unreadable frame: {exc}") from None


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
