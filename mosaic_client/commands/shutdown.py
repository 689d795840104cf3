"""`mosaic shutdown`: stop the daemon; running runs are checkpointed.

Sends `shutdown`.
"""

from __future__ import annotations

import argparse

from mosaic_client.commands import common
from mosaic_client.commands.common import OK

NAME = "shutdown"
HELP = "stop the daemon (running runs are checkpointed)"
EXAMPLE = "mosaic shutdown"


def run(args: argparse.Namespace) -> int:
    common.call(args, "shutdown")
    print("mosaicd is stopping (running runs are checkpointed)")
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments."""
