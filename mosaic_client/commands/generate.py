"""`mosaic generate CONFIG OUT`: the expanded pipelines as JSON, without running anything.

Sends no request: the client expands CONFIG itself.
"""

from __future__ import annotations

import argparse

from mosaic_client.commands.common import OK, load_config

NAME = "generate"
HELP = "write the expanded pipelines without running anything"
EXAMPLE = "mosaic generate examples/or_mlp/config.ini out.json"


def run(args: argparse.Namespace) -> int:
    from mosaic_client.config import count_text, pipelines_to_json

    expanded = load_config(args.config)
    with open(args.out, "w") as fh:
        fh.write(pipelines_to_json(expanded.pipelines))
    runs = len(expanded.pipelines)
    print(f"{count_text(runs, expanded.monitor['multiplicity'])}; wrote them to {args.out}")
    if expanded.search is not None:
        search = expanded.search
        print(
            f"a tuned comparison: each pipeline is one family x size group with "
            f"{search['trials']} trial(s) and {search['final_repetitions']} final run(s)"
        )
    return OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    parser.add_argument("out")
