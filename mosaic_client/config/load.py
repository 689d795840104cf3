"""The entry point: read a config file, check every section, and expand it into pipelines."""

import os
from dataclasses import dataclass, field
from typing import Any

from mosaic_client.config.class_sections import check_modules
from mosaic_client.config.expansion import expand
from mosaic_client.config.ini import read_ini
from mosaic_client.config.problems import ConfigError, Problem, Report, in_file_order
from mosaic_client.config.search_section import cap_trials, check_search
from mosaic_client.config.settings import check_settings, read_search


@dataclass
class ExpandedConfig:
    """A validated config file with its pipelines fully expanded."""

    config_path: str
    process: dict[str, Any]
    monitor: dict[str, Any]
    pipelines: list[list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)
    # [SEARCH], resolved (docs/tuning.md): each pipeline is then one group (family x size)
    # whose distributions the daemon's workers resolve; None: a plain grid.
    search: dict[str, Any] | None = None


def load_config(path: str, cwd: str | None = None) -> ExpandedConfig:
    """Read, validate and expand a config file; raise ConfigError listing every problem.

    Relative paths in the file (and ``path`` itself) are resolved against ``cwd``, which
    defaults to the process's working directory.
    """
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    config_path = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
    config_dir = os.path.dirname(config_path)
    report = Report(path)
    sections = read_ini(_read_file(path, config_path), report)
    by_name = {section.name: section for section in sections}

    process, monitor = check_settings(report, by_name, base, config_dir)
    by_type = check_modules(report, sections, by_name, process, base, config_dir)
    search_values = read_search(report, by_name, base, config_dir)
    check_search(report, by_name, by_type, search_values, monitor)
    if report.problems or process is None or monitor is None:
        raise ConfigError(in_file_order(report.problems), report.warnings)
    if search_values is not None:
        # Each pipeline is one group; its repetitions are the search's final runs.
        monitor["multiplicity"] = 1
    pipelines = expand(report, process, monitor, by_type)
    searched = None
    if search_values is not None:
        searched = cap_trials(report, search_values, process, pipelines)
    return ExpandedConfig(
        config_path=config_path,
        process=process,
        monitor=monitor,
        pipelines=pipelines,
        warnings=report.warnings,
        search=searched,
    )


def _read_file(path: str, config_path: str) -> str:
    """The file's text, or a ConfigError saying why it cannot be read."""

    def fail(message: str) -> ConfigError:
        return ConfigError([Problem(path, None, None, None, message)])

    try:
        with open(config_path, encoding="utf-8-sig") as handle:
            return handle.read()
    except FileNotFoundError:
        raise fail(f"config file not found ({config_path})") from None
    except IsADirectoryError:
        raise fail("is a directory, expected an .ini file") from None
    except UnicodeDecodeError as exc:
        raise fail(f"cannot read config file: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise fail(f"cannot read config file: {exc.strerror or exc}") from None
