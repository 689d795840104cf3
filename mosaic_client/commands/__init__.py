"""The `mosaic` commands, one module per command.

Each module exposes ``NAME`` (the command word), ``HELP`` (one line), ``EXAMPLE`` (one command
line), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code), and says in its
docstring which requests of :mod:`mosaic_client.protocol` it sends; the daemon's handler of the
same request name is in ``mosaicd/service/handlers.py``. The shared helpers are in
:mod:`mosaic_client.commands.common`; the registry (their order in ``mosaic --help``) is
``mosaic_client.cli.COMMANDS``. docs/architecture.md walks through adding one.
"""
