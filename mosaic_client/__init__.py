"""mosaic_client: the thin Mosaic client (CLI, protocol, config, selections, plots)."""

__version__ = "0.1.0"
