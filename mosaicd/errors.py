"""The one exception a request handler or the scheduler raises to refuse a request."""

from __future__ import annotations


class Refused(Exception):
    """A request the daemon will not carry out; the message goes back to the client.

    `code` is one of mosaic_client.protocol.ErrorCode (the client maps it to an exit code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
