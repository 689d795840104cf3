"""The Mosaic configuration language: one INI file expanded into many pipelines.

This package is imported by the thin ``mosaic`` client, which must start fast, so it uses the
standard library only: torch and matplotlib are never imported here, and the names of torch's
loss functions and optimizers are checked against static tuples instead.

The reading goes in steps, one module each: :mod:`.ini` reads the text into sections and
entries (by hand, to report every problem at once with its line), :mod:`.values` types one
value (lists, ranges, paths), :mod:`.settings` checks [PROCESS] and [MONITOR] against the
schema table, :mod:`.class_sections` checks the module sections, :mod:`.expansion` combines them
into pipelines, and :mod:`.load` runs the steps; :mod:`.problems` collects what is wrong.
See ``docs/configuration.md`` for the language reference.
"""

from mosaic_client.config.expansion import MAX_PIPELINES, count_text, pipelines_to_json
from mosaic_client.config.load import ExpandedConfig, load_config
from mosaic_client.config.problems import ConfigError, Problem
from mosaic_client.config.values import MAX_RANGE_SIZE, parse_value, resolve_path, typed_scalar
from mosaic_client.schema import ACCURACY_MODES, TORCH_LOSSES, TORCH_OPTIMIZERS

__all__ = [
    "ACCURACY_MODES",
    "ConfigError",
    "ExpandedConfig",
    "MAX_PIPELINES",
    "MAX_RANGE_SIZE",
    "Problem",
    "TORCH_LOSSES",
    "TORCH_OPTIMIZERS",
    "count_text",
    "load_config",
    "parse_value",
    "pipelines_to_json",
    "resolve_path",
    "typed_scalar",
]
