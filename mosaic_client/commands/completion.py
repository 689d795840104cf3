"""`mosaic completion bash|zsh`: a shell completion script, generated from the parser.

Sends no request.
"""

from __future__ import annotations

import argparse
import sys

from mosaic_client.commands.common import OK

NAME = "completion"
HELP = "print a shell completion script (bash or zsh)"
EXAMPLE = "mosaic completion bash > ~/.local/share/bash-completion/completions/mosaic"


def run(args: argparse.Namespace) -> int:
    from mosaic_client.completion import completion_script

    # The whole `mosaic` parser, which cli.build_parser hands every command as root_parser.
    sys.stdout.write(completion_script(args.shell, args.root_parser))
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=["bash", "zsh"])
