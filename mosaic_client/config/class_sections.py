"""Validation of the class sections: one module type, class and file each, with its parameters.

A section's parameters may hold lists and ranges; :class:`ClassSection` turns them into the
module variants the expansion combines.
"""

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from mosaic_client import contract, schema
from mosaic_client.class_files import class_file_problem
from mosaic_client.config.problems import Entry, Report, Section
from mosaic_client.config.values import existing_file, is_type_name, parse_value, split_names

PROCESS = schema.PROCESS
MONITOR = schema.MONITOR

# Keys of a class section that describe the module; every other key is a parameter.
_SECTION_FIELDS = contract.SECTION_FIELDS
# Module fields Mosaic fills in itself ("name" holds the section name): not a parameter name.
_FORBIDDEN_PARAMS = tuple(f for f in contract.MODULE_FIELDS if f not in contract.SECTION_FIELDS)
_IDENTIFIER_RE = schema.IDENTIFIER_RE
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def _render_key(template: str, fields: dict[str, object]) -> str:
    """A module's key: the section's key template with its {placeholders} filled in."""
    return _PLACEHOLDER_RE.sub(lambda m: str(fields[m.group(1).strip()]), template)


@dataclass
class ClassSection:
    """A valid class section: its module's type, class and file, and each parameter's values."""

    name: str
    type: str
    cls: str
    path: str
    key_template: str
    params: list[tuple[str, list[int | float | str]]]

    def variant_count(self) -> int:
        return math.prod(len(values) for _, values in self.params)

    def variants(self) -> list[dict[str, Any]]:
        names = [name for name, _ in self.params]
        modules: list[dict[str, Any]] = []
        for combination in itertools.product(*(values for _, values in self.params)):
            values = dict(zip(names, combination, strict=True))
            fields: dict[str, object] = {
                "type": self.type,
                "class": self.cls,
                "name": self.name,
                **values,
            }
            key = _render_key(self.key_template, fields)
            modules.append(
                {
                    "type": self.type,
                    "class": self.cls,
                    "path_to_class": self.path,
                    **values,
                    "key": key,
                    "name": self.name,
                }
            )
        return modules


def _single(report: Report, section: Section, entry: Entry, what: str) -> str | None:
    """The entry's one value; a list or nothing is reported and gives None."""
    text = entry.value.strip()
    if not text:
        report.entry_error(section, entry, f"empty value; expected {what}")
        return None
    if "," in text:
        report.entry_error(
            section,
            entry,
            f"'{entry.key}' takes a single value ({what}), not a list; to compare "
            "alternatives write one section per alternative with the same type",
        )
        return None
    return text


def _check_key_template(
    report: Report, section: Section, entry: Entry, available: list[str]
) -> str | None:
    """The key template when its placeholders all name keys of the section, else None."""
    template = _single(report, section, entry, "a key such as mlp_{class}")
    if template is None:
        return None
    ok = True
    leftover = _PLACEHOLDER_RE.sub("", template)
    if "{" in leftover or "}" in leftover:
        report.entry_error(section, entry, "unbalanced '{' or '}'; placeholders are written {name}")
        ok = False
    for match in _PLACEHOLDER_RE.finditer(template):
        name = match.group(1).strip()
        if not name:
            report.entry_error(
                section, entry, "empty placeholder {}; write a key of this section, e.g. {class}"
            )
            ok = False
        elif name not in available:
            report.entry_error(
                section,
                entry,
                f"unknown placeholder {{{name}}}; available: {', '.join(available)}",
            )
            ok = False
    return template if ok else None


def _check_class_section(
    report: Report,
    section: Section,
    scheme_types: set[str] | None,
    cwd: str,
    config_dir: str,
) -> tuple[str | None, ClassSection | None]:
    """Return the section's declared type (None if unreadable) and, if valid, the section."""
    entries = section.entries
    type_entry = entries.get("type")
    if type_entry is None:
        report.missing(section, "type", "one of the types named in data_scheme or pipeline_scheme")
        return None, None
    start = len(report.problems)
    type_name = _single(report, section, type_entry, "a module type such as mlp")
    if type_name is None:
        return None, None
    if scheme_types is not None and type_name not in scheme_types:
        message = f"type '{type_name}' is not in data_scheme or pipeline_scheme; section ignored"
        report.entry_warning(section, type_entry, message)
        return type_name, None

    cls: str | None = None
    class_entry = entries.get("class")
    if class_entry is None:
        report.missing(section, "class", "the name of the Python class in path_to_class")
    else:
        cls = _single(report, section, class_entry, "a Python class name")
        if cls is not None and not _IDENTIFIER_RE.fullmatch(cls):
            report.entry_error(section, class_entry, "expected a Python class name")
            cls = None

    path: str | None = None
    path_entry = entries.get("path_to_class")
    if path_entry is None:
        report.missing(section, "path_to_class", "the .py file that defines the class")
    elif _single(report, section, path_entry, "the path of a .py file") is not None:
        path = existing_file(report, section, path_entry, cwd, config_dir)

    params: list[tuple[str, list[int | float | str]]] = []
    for entry in entries.values():
        if entry.key in _SECTION_FIELDS:
            continue
        if entry.key in _FORBIDDEN_PARAMS:
            report.entry_error(
                section,
                entry,
                f"'{entry.key}' is reserved (it holds the section name); rename the parameter",
            )
            continue
        injected = contract.run_info_key_problem(section.name, entry.key)
        if injected:
            report.entry_error(section, entry, injected)
            continue
        try:
            params.append((entry.key, parse_value(entry.value)))
        except ValueError as exc:
            report.entry_error(section, entry, str(exc))

    template: str | None = None
    key_entry = entries.get("key")
    if key_entry is None:
        report.missing(section, "key", "a name for database queries, e.g. key = mlp_{class}")
    else:
        available = ["type", "class", "name"] + [
            e.key
            for e in entries.values()
            if e.key not in _SECTION_FIELDS
            and e.key not in _FORBIDDEN_PARAMS
            and e.key not in contract.RUN_INFO_KEYS
        ]
        template = _check_key_template(report, section, key_entry, available)

    if cls is not None and path is not None and path_entry is not None:
        problem = class_file_problem(path, cls)
        if problem:
            report.entry_error(section, path_entry, problem)

    if len(report.problems) != start or cls is None or path is None or template is None:
        return type_name, None
    return type_name, ClassSection(section.name, type_name, cls, path, template, params)


def check_modules(
    report: Report,
    sections: list[Section],
    by_name: dict[str, Section],
    process: dict[str, Any] | None,
    cwd: str,
    config_dir: str,
) -> dict[str, list[ClassSection]]:
    """The class sections that are right, by type; every scheme type must have one."""
    # When the schemes themselves are broken, sections are still checked (so their problems
    # show up now) but none is called "ignored" on the strength of a scheme we could not read.
    data_scheme = process["data_scheme"] if process else None
    pipeline_scheme = process["pipeline_scheme"] if process else None
    if PROCESS in by_name:
        raw = by_name[PROCESS].entries
        data_scheme = data_scheme or _quiet_scheme(raw.get("data_scheme"))
        pipeline_scheme = pipeline_scheme or _quiet_scheme(raw.get("pipeline_scheme"))
    known_types: set[str] | None = None
    if data_scheme is not None and pipeline_scheme is not None:
        known_types = set(data_scheme) | set(pipeline_scheme)

    declared_types: set[str] = set()
    by_type: dict[str, list[ClassSection]] = {}
    for section in sections:
        if section.name in (PROCESS, MONITOR, schema.SEARCH):
            continue
        declared, checked = _check_class_section(report, section, known_types, cwd, config_dir)
        if declared is not None:
            declared_types.add(declared)
        if checked is not None:
            by_type.setdefault(checked.type, []).append(checked)

    if PROCESS in by_name:
        process_section = by_name[PROCESS]
        for key, scheme in (("data_scheme", data_scheme), ("pipeline_scheme", pipeline_scheme)):
            entry = process_section.entries.get(key)
            if entry is None or scheme is None:
                continue
            for type_name in dict.fromkeys(scheme):
                if type_name and type_name not in declared_types:
                    report.entry_error(
                        process_section,
                        entry,
                        f"type '{type_name}' has no section; add a section with "
                        f"'type = {type_name}'",
                    )
    return by_type


def _quiet_scheme(entry: Entry | None) -> list[str] | None:
    """Best-effort reading of a scheme whose errors were already reported."""
    if entry is None:
        return None
    names = split_names(entry.value)
    return names if all(is_type_name(name) for name in names) else None
