"""The checks of a tuned comparison that involve several sections (docs/tuning.md): which
parameters are distributions, whether [SEARCH] can search them, and the grid's trial cap."""

from __future__ import annotations

from typing import Any

from mosaic_client import schema, search
from mosaic_client.config.class_sections import ClassSection
from mosaic_client.config.problems import Report, Section


def _searched_entries(
    by_name: dict[str, Section], by_type: dict[str, list[ClassSection]]
) -> list[tuple[Section, str]]:
    """(section, key) of every parameter written as a distribution, lr included."""
    found: list[tuple[Section, str]] = []
    process = by_name.get(schema.PROCESS)
    lr = process.entries.get("lr") if process else None
    if process is not None and lr is not None and search.is_distribution_syntax(lr.value):
        found.append((process, "lr"))
    for group in by_type.values():
        for cs in group:
            for name, values in cs.params:
                if len(values) == 1 and isinstance(values[0], str):
                    if search.is_distribution_syntax(values[0]):
                        found.append((by_name[cs.name], name))
    return found


def check_search(
    report: Report,
    by_name: dict[str, Section],
    by_type: dict[str, list[ClassSection]],
    values: dict[str, Any] | None,
    monitor: dict[str, Any] | None,
) -> None:
    """Report what makes the file's search unusable: distributions without [SEARCH] (or the
    reverse), a grid over a continuous distribution, pruning on a metric without per-epoch
    values, a module key that names a searched parameter (the key names the family)."""
    searched = _searched_entries(by_name, by_type)
    if values is None:
        for section, key in searched:
            report.entry_error(
                section,
                section.entries[key],
                "a distribution needs a [SEARCH] section (strategy, trials, metric, ...; "
                "docs/tuning.md); for a grid write a list: a, b, c",
            )
        return
    section = by_name[schema.SEARCH]
    if not searched:
        report.error(
            "no parameter is a distribution, so there is nothing to tune; write one, e.g. "
            "lr = loguniform(1e-4, 1e-1) in [PROCESS], or remove [SEARCH]",
            section=schema.SEARCH,
            line=section.line,
        )
    if values.get("strategy") == "grid":
        for where, key in searched:
            entry = where.entries[key]
            try:
                search.parse(entry.value).grid()
            except ValueError as exc:
                report.entry_error(where, entry, str(exc))
    pruning = section.entries.get("pruning")
    if (
        pruning is not None
        and values.get("pruning") not in (None, "none")
        and values.get("metric") not in search.EPOCH_METRICS
    ):
        report.entry_error(
            section,
            pruning,
            f"pruning reads the metric after each epoch, and {values.get('metric')} has no "
            f"per-epoch value; select on one of {', '.join(search.EPOCH_METRICS)}",
        )
    for where, key in searched:
        template = where.entries.get("key")
        if template is not None and "{" + key + "}" in template.value.replace(" ", ""):
            report.entry_error(
                where,
                template,
                f"the key names the family compared, so it cannot name the searched "
                f"parameter {{{key}}}; remove the placeholder",
            )
    monitor_section = by_name.get(schema.MONITOR)
    entry = monitor_section.entries.get("multiplicity") if monitor_section else None
    if entry is not None and monitor is not None and monitor.get("multiplicity", 1) > 1:
        report.entry_warning(
            monitor_section,  # type: ignore[arg-type]
            entry,
            "not used by a search: each family x size runs [SEARCH] trials, then its best "
            "configuration final_repetitions times",
        )


def cap_trials(
    report: Report, values: dict[str, Any], process: dict[str, Any], pipelines: list[Any]
) -> dict[str, Any]:
    """The [SEARCH] values as sent: a grid's trials capped at the smallest group's grid, so
    every group gets the same number of trials."""
    settings = dict(schema.search_settings(values))
    if settings["strategy"] == "grid" and pipelines:
        size = min(
            len(search.grid_points(search.space(process.get("lr"), modules)))
            for modules in pipelines
        )
        if size < settings["trials"]:
            report.warnings.append(
                f"[SEARCH] trials = {settings['trials']}: the grid has {size} point(s) per "
                f"family x size (the smallest), so each gets {size} trial(s)"
            )
            settings["trials"] = size
    return settings
