"""The Mosaic configuration language: one INI file expanded into many pipelines.

This module is imported by the thin ``mosaic`` client, which must start fast, so it uses the
standard library only: torch and matplotlib are never imported here, and the names of torch's
loss functions and optimizers are checked against static tuples instead.

The INI dialect is read by a small hand-written reader rather than :mod:`configparser` because
the client must report *every* problem of a file at once (configparser in strict mode stops at
the first duplicate, and in lax mode silently lets later duplicates win), must know the line of
each value, and must keep the case of parameter names, which are passed by name to the user's
constructors.  See ``docs/configuration.md`` for the language reference.
"""

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mosaic_client import contract, schema
from mosaic_client.class_files import class_file_problem
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

PROCESS = schema.PROCESS
MONITOR = schema.MONITOR

# Guards against a typo such as {1-1000000000} eating the client's memory before the user
# sees anything; a real study never needs more than this.
MAX_RANGE_SIZE = 100_000
MAX_PIPELINES = 100_000

# Keys of a class section that describe the module; every other key is a parameter.
_SECTION_FIELDS = contract.SECTION_FIELDS
# Module fields Mosaic fills in itself ("name" holds the section name): not a parameter name.
_FORBIDDEN_PARAMS = tuple(f for f in contract.MODULE_FIELDS if f not in contract.SECTION_FIELDS)

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_RANGE_PARTS_RE = re.compile(r"([+-]?[^-]*)-(.*)")
_IDENTIFIER_RE = schema.IDENTIFIER_RE
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
# An indented line that looks like "name = ..." is taken as a new key rather than as the
# continuation of the previous value, so that indenting a section's body does not silently glue
# two parameters together.
_KEY_LINE_RE = re.compile(r"[A-Za-z_][\w.\-]*\s*[=:]")
_INLINE_COMMENT_RE = re.compile(r"\s[#;].*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located as precisely as the reader could."""

    file: str
    section: str | None
    key: str | None
    value: str | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.section is not None:
            where += f" [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
            if self.value is not None:
                where += f" = '{self.value}'"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem of a config file, so the user can fix them in one pass."""

    def __init__(self, problems: Sequence[Problem], warnings: Sequence[str] = ()) -> None:
        self.problems: list[Problem] = list(problems)
        self.warnings: list[str] = list(warnings)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclass
class ExpandedConfig:
    """A validated config file with its pipelines fully expanded."""

    config_path: str
    process: dict[str, Any]
    monitor: dict[str, Any]
    pipelines: list[list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Values


def typed_scalar(raw: str) -> int | float | str:
    """Type one config value the way a Python literal would be: int, then float, else str."""
    text = raw.strip()
    try:
        if _INT_RE.fullmatch(text):
            return int(text)
        if _FLOAT_RE.fullmatch(text):
            return float(text)
    except ValueError:
        # int() refuses literals beyond Python's digit limit; such a thing is not a number a
        # constructor could want, so it stays text.
        return text
    return text


def _check_braces(text: str) -> None:
    depth = 0
    for char in text:
        if char == "{":
            if depth:
                raise ValueError("nested '{' inside a range; a range is written {start-end}")
            depth = 1
        elif char == "}":
            if not depth:
                raise ValueError("'}' without a matching '{'")
            depth = 0
        elif char == "," and depth:
            raise ValueError(
                "',' inside braces; a range is written {start-end}, "
                "separate values are written as a list: 1, 2, 3"
            )
    if depth:
        raise ValueError("'{' is never closed; a range is written {start-end}, e.g. {2-5}")


def _parse_range(item: str) -> list[int]:
    if not (item.startswith("{") and item.endswith("}")):
        raise ValueError(
            f"range '{item}' must be a whole list item, like {{2-5}}; "
            "text around the braces is not allowed"
        )
    inner = item[1:-1].strip()
    if not inner:
        raise ValueError("empty range {}; write {start-end}, e.g. {2-5}")
    match = _RANGE_PARTS_RE.fullmatch(inner)
    if match is None:
        raise ValueError(
            f"range {{{inner}}} needs a start and an end separated by '-', like {{2-5}}"
        )
    start_text, end_text = match.group(1).strip(), match.group(2).strip()
    if not start_text or not end_text:
        missing = "start" if not start_text else "end"
        raise ValueError(f"range {{{inner}}} has no {missing}; write {{start-end}}, e.g. {{2-5}}")
    if not (_INT_RE.fullmatch(start_text) and _INT_RE.fullmatch(end_text)):
        raise ValueError(
            f"range bounds must be integers, got '{start_text}' and '{end_text}'; "
            "for other values write a list, e.g. 0.1, 0.2, 0.5"
        )
    start, end = int(start_text), int(end_text)
    if start > end:
        raise ValueError(f"range start {start} is greater than end {end}; write {{{end}-{start}}}")
    if end - start + 1 > MAX_RANGE_SIZE:
        raise ValueError(
            f"range {{{start}-{end}}} has {end - start + 1} values; the limit is {MAX_RANGE_SIZE}"
        )
    return list(range(start, end + 1))


def parse_value(raw: str) -> list[int | float | str]:
    """Expand one parameter value into its typed values: a string, a list, a range or a mix.

    Raises ``ValueError`` with a message meant for the user when the value is malformed.
    """
    text = raw.strip()
    if not text:
        raise ValueError("empty value; write a value, a list (a, b) or a range ({2-5})")
    _check_braces(text)
    values: list[int | float | str] = []
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            raise ValueError(f"list item {position} is empty; remove the extra ','")
        if "{" in item or "}" in item:
            values.extend(_parse_range(item))
        else:
            values.append(typed_scalar(item))
    return values


def _split_names(text: str) -> list[str]:
    """Split a comma list of plain names; empty items are kept as '' so callers can report."""
    return [item.strip() for item in text.split(",")]


# --------------------------------------------------------------------------------------------
# Paths


def resolve_path(value: str, cwd: str, config_dir: str, must_exist: bool) -> str | None:
    """Resolve a user path: the client's cwd first, then the config file's directory.

    Returns an absolute path, or ``None`` when ``must_exist`` and neither location has it.
    Without ``must_exist`` a path found nowhere is taken relative to the cwd, which is where a
    user expects a new directory such as ``.runs`` to appear.
    """
    text = os.path.expanduser(value.strip())
    if os.path.isabs(text):
        path = os.path.normpath(text)
        return path if not must_exist or os.path.exists(path) else None
    for base in (cwd, config_dir):
        candidate = os.path.normpath(os.path.join(os.path.abspath(base), text))
        if os.path.exists(candidate):
            return candidate
    if must_exist:
        return None
    return os.path.normpath(os.path.join(os.path.abspath(cwd), text))


# --------------------------------------------------------------------------------------------
# INI reader


@dataclass
class _Entry:
    key: str
    value: str
    line: int


@dataclass
class _Section:
    name: str
    line: int
    entries: dict[str, _Entry] = field(default_factory=dict)


class _Report:
    """Collects problems and warnings located in one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.warnings: list[str] = []

    def error(
        self,
        message: str,
        section: str | None = None,
        key: str | None = None,
        value: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problems.append(Problem(self.file, section, key, value, message, line))

    def entry_error(self, section: _Section, entry: _Entry, message: str) -> None:
        self.error(message, section.name, entry.key, entry.value, entry.line)

    def missing(self, section: _Section, key: str, hint: str) -> None:
        self.error(f"required key is missing ({hint})", section.name, key, line=section.line)

    def entry_warning(self, section: _Section, entry: _Entry, message: str) -> None:
        problem = Problem(self.file, section.name, entry.key, entry.value, message, entry.line)
        self.warnings.append(str(problem))


def _read_ini(text: str, report: _Report) -> list[_Section]:
    sections: list[_Section] = []
    seen_sections: dict[str, _Section] = {}
    current: _Section | None = None
    last: _Entry | None = None
    for number, raw_line in enumerate(text.splitlines(), start=1):
        stripped = raw_line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        stripped = _INLINE_COMMENT_RE.sub("", stripped).strip()
        indented = raw_line[:1].isspace()
        if indented and last is not None and not _KEY_LINE_RE.match(stripped):
            # configparser's multi-line values; the break is a plain separator, so a list may
            # be spread over several lines as long as its items keep their commas.
            last.value = f"{last.value} {stripped}".strip()
            continue
        last = None
        if stripped.startswith("["):
            if not stripped.endswith("]"):
                report.error(
                    f"section header '{stripped}' is not closed; write [name]", line=number
                )
                # The lines below still belong to *a* section: reading them into a detached
                # one reports their own mistakes without a cascade of "before any section".
                current = _Section(stripped[1:].strip(), number)
                continue
            name = stripped[1:-1].strip()
            if not name:
                report.error("empty section name '[]'; write [name]", line=number)
                current = _Section("", number)
                continue
            current = _Section(name, number)
            if name in seen_sections:
                report.error(
                    f"duplicate section [{name}] (first defined at line "
                    f"{seen_sections[name].line}); give each section a unique name",
                    section=name,
                    line=number,
                )
                # The duplicate is still read so its own duplicate keys get reported, but it
                # never takes part in the expansion.
            else:
                seen_sections[name] = current
                sections.append(current)
            continue
        positions = [p for p in (stripped.find("="), stripped.find(":")) if p >= 0]
        if not positions:
            report.error(
                f"cannot read line '{stripped}'; expected 'key = value' or a [section] header",
                section=current.name if current else None,
                line=number,
            )
            continue
        split_at = min(positions)
        key, value = stripped[:split_at].strip(), stripped[split_at + 1 :].strip()
        if current is None:
            report.error(
                f"'{stripped}' comes before any [section] header", key=key or None, line=number
            )
            continue
        if not key:
            report.error(
                f"line '{stripped}' has no key name before '{stripped[split_at]}'",
                section=current.name,
                line=number,
            )
            continue
        if key in current.entries:
            report.error(
                f"duplicate key '{key}' (first set at line {current.entries[key].line}); "
                "set each key once, using a list (a, b) for several values",
                section=current.name,
                key=key,
                value=value,
                line=number,
            )
            continue
        last = _Entry(key, value, number)
        current.entries[key] = last
    return sections


# --------------------------------------------------------------------------------------------
# Validation of [PROCESS] and [MONITOR]: one generic check per key of the schema table


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    for choice in choices:
        if choice.lower() == word.lower():
            return f"; did you mean '{choice}'?"
    import difflib  # only on the error path, to keep the client's start-up lean

    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_none(text: str) -> bool:
    return text.strip().lower() in ("", "none")


def _is_type_name(name: str) -> bool:
    return bool(name) and not any(c in "{}" or c.isspace() for c in name)


class _Invalid(Exception):
    """A key's INI text that cannot be read as its kind; the message is for the user."""


@dataclass
class _Place:
    """Where a key is read: the file's report, its section, and the bases of relative paths."""

    report: _Report
    section: _Section
    cwd: str
    config_dir: str


def _number_text(bound: float | None) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _number(key: schema.Key, entry: _Entry, place: _Place) -> int | float:
    typed = typed_scalar(entry.value)
    wrong = isinstance(typed, str) if key.kind == schema.FLOAT else not isinstance(typed, int)
    if wrong or not math.isfinite(typed):
        if key.expects:
            raise _Invalid(f"expected {key.expects}")
        if key.kind == schema.INT:
            raise _Invalid(f"expected {key.named}, an integer >= {_number_text(key.minimum)}")
        raise _Invalid(f"expected a number ({key.named})")
    value = float(typed) if key.kind == schema.FLOAT else typed
    if schema.value_problem(key, value) is None:
        return value
    if key.expects:
        raise _Invalid(f"expected {key.expects}")
    low, high = key.minimum, key.maximum
    if low is not None and value <= low and key.exclusive_minimum:
        bound = "positive" if low == 0 else f"greater than {_number_text(low)}"
    elif low is not None and value < low:
        bound = f"at least {_number_text(low)}"
    else:
        bound = f"at most {_number_text(high)}"
    raise _Invalid(f"must be {bound} ({key.named})")


def _boolean(key: schema.Key, entry: _Entry, place: _Place) -> bool:
    word = entry.value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Invalid("expected true or false (also yes/no, on/off, 1/0)")


def _choice(key: schema.Key, entry: _Entry, place: _Place) -> str:
    text = entry.value.strip()
    word = text.lower() if key.fold_case else text
    if word in key.choices:
        return word
    # A case-folded value is not repeated: it is not what the user wrote.
    unknown = key.label if key.fold_case else f"{key.label} '{text}'"
    suggestion = "" if key.fold_case else _suggest(text, key.choices)
    raise _Invalid(f"unknown {unknown}; expected {key.expects or key.range_text()}{suggestion}")


def _identifier(key: schema.Key, entry: _Entry, place: _Place) -> str:
    text = entry.value.strip()
    if not _IDENTIFIER_RE.fullmatch(text):
        raise _Invalid("expected a Python class name")
    return text


def _path(key: schema.Key, entry: _Entry, place: _Place) -> str | None:
    if key.must_exist:
        return _existing_file(place.report, place.section, entry, place.cwd, place.config_dir)
    text = entry.value.strip()
    if not text:
        raise _Invalid(f"empty path; remove the key to use {key.default}")
    return resolve_path(text, place.cwd, place.config_dir, must_exist=False)


def _scheme(key: schema.Key, entry: _Entry, place: _Place) -> list[str] | None:
    names = _split_names(entry.value)
    if names == [""]:
        raise _Invalid("empty list; name at least one module type")
    ok = True
    for position, name in enumerate(names, start=1):
        if not name:
            place.report.entry_error(
                place.section, entry, f"item {position} is empty; remove the extra ','"
            )
            ok = False
        elif not _is_type_name(name):
            place.report.entry_error(
                place.section, entry, f"'{name}' is not a type name; write plain words like mlp"
            )
            ok = False
    return names if ok else None


def _gpu_list(key: schema.Key, entry: _Entry, place: _Place) -> list[str]:
    names = _split_names(entry.value)
    if "" in names:
        place.report.entry_error(place.section, entry, "empty GPU name; remove the extra ','")
    return [name for name in names if name]


# How the INI text of each kind of key is read. A reader returns the typed value, raises
# _Invalid with one message, or reports its problems itself and returns None.
_READERS: dict[str, Callable[[schema.Key, _Entry, _Place], Any]] = {
    schema.INT: _number,
    schema.FLOAT: _number,
    schema.BOOL: _boolean,
    schema.CHOICE: _choice,
    schema.IDENTIFIER: _identifier,
    schema.PATH: _path,
    schema.SCHEME: _scheme,
    schema.GPU_LIST: _gpu_list,
}


def _default(key: schema.Key, place: _Place) -> Any:
    """An absent key's value: the table's default, made usable (a path resolved, a list)."""
    if key.kind == schema.PATH and key.default is not None:
        return resolve_path(key.default, place.cwd, place.config_dir, must_exist=False)
    return list(key.default) if isinstance(key.default, tuple) else key.default


def _read_key(key: schema.Key, entry: _Entry, place: _Place) -> Any:
    if key.nullable and _is_none(entry.value):
        return _default(key, place)
    try:
        return _READERS[key.kind](key, entry, place)
    except _Invalid as exc:
        place.report.entry_error(place.section, entry, str(exc))
        return None


def _read_section(place: _Place, required: Iterable[str]) -> dict[str, Any]:
    """Every key of the section's schema: read from its INI text, or its default when absent.
    The keys of `required` that are absent are reported missing; unknown keys are warned of."""
    section = place.section
    keys = schema.BY_SECTION[section.name]
    values: dict[str, Any] = {}
    for key in keys.values():
        entry = section.entries.get(key.name)
        if entry is not None:
            values[key.name] = _read_key(key, entry, place)
        elif key.name in required:
            place.report.missing(section, key.name, key.doc)
        else:
            values[key.name] = _default(key, place)
    for entry in section.entries.values():
        if entry.key not in keys:
            message = f"unknown key, ignored{_suggest(entry.key, keys)}"
            place.report.entry_warning(section, entry, message)
    return values


_LOSS_KEYS = ("loss_function", "class_loss_function", "path_to_class_loss_function")


def _given(section: _Section, name: str) -> _Entry | None:
    """The key's entry, or None when it is absent or an optional key left empty ("key =" or
    "key = None"): the seed's own config.ini lists its unused optional keys that way."""
    entry = section.entries.get(name)
    key = schema.BY_SECTION[section.name].get(name)
    if entry is not None and key is not None and key.nullable and _is_none(entry.value):
        return None
    return entry


def _check_loss(place: _Place) -> None:
    """The loss is given one way: a torch.nn class, or a class of the user's with its file."""
    section = place.section
    builtin, *own = (_given(section, name) for name in _LOSS_KEYS)
    if builtin is not None and any(e is not None for e in own):
        place.report.entry_error(
            section,
            builtin,
            "give either loss_function or class_loss_function + path_to_class_loss_function, "
            "not both",
        )
    elif builtin is None and all(e is None for e in own):
        place.report.missing(
            section,
            "loss_function",
            "a torch.nn loss such as MSELoss, or class_loss_function + "
            "path_to_class_loss_function for your own loss class",
        )
    elif builtin is None:
        for name, entry in zip(_LOSS_KEYS[1:], own):
            if entry is None:
                place.report.missing(section, name, schema.BY_SECTION[schema.PROCESS][name].doc)


def _check_process(
    report: _Report, section: _Section, cwd: str, config_dir: str
) -> dict[str, Any] | None:
    start = len(report.problems)
    place = _Place(report, section, cwd, config_dir)
    required = [k.name for k in schema.BY_SECTION[schema.PROCESS].values() if k.required]
    process = _read_section(place, required)
    _check_loss(place)
    if len(report.problems) == start:
        # Only now can the loss be known and a leftover None be told apart from a mistake.
        problem = schema.loss_problem(process)
        if problem:
            entry = section.entries.get("loss_function")
            if entry is not None:
                report.entry_error(section, entry, problem)
            else:
                report.error(problem, section=section.name, line=section.line)
    own_loss = process.get("class_loss_function"), process.get("path_to_class_loss_function")
    if None not in own_loss:
        problem = class_file_problem(own_loss[1], own_loss[0])
        if problem:
            report.entry_error(section, section.entries["path_to_class_loss_function"], problem)
    if process["accuracy"] is None:
        process["accuracy"] = schema.default_accuracy(process["loss_function"])
    # A loss class of the user's is sent only when it is the way the loss is given.
    for name in _LOSS_KEYS[1:]:
        if process.get(name) is None:
            process.pop(name, None)
    return process if len(report.problems) == start else None


def _check_monitor(report: _Report, section: _Section) -> dict[str, Any] | None:
    start = len(report.problems)
    place = _Place(report, section, "", "")
    required = [k.name for k in schema.BY_SECTION[schema.MONITOR].values() if k.required]
    monitor = _read_section(place, required)
    available = section.entries.get("gpu_available")
    if monitor.get("need_gpu") is False and monitor.get("gpu_available") and available:
        message = "GPUs are listed but need_gpu is false; they are not used"
        report.entry_warning(section, available, message)
    return monitor if len(report.problems) == start else None


def _existing_file(
    report: _Report, section: _Section, entry: _Entry, cwd: str, config_dir: str
) -> str | None:
    text = entry.value.strip()
    if not text:
        report.entry_error(section, entry, "empty path; expected a .py file")
        return None
    path = resolve_path(text, cwd, config_dir, must_exist=True)
    if path is None:
        expanded = os.path.expanduser(text)
        if os.path.isabs(expanded):
            message = f"file not found: {os.path.normpath(expanded)}"
        else:
            tried = (os.path.normpath(os.path.join(d, expanded)) for d in (cwd, config_dir))
            message = f"file not found; looked for {' and '.join(dict.fromkeys(tried))}"
        report.entry_error(section, entry, message)
        return None
    if not os.path.isfile(path):
        report.entry_error(section, entry, f"{path} is not a file; expected a .py file")
        return None
    return path


def _render_key(template: str, fields: dict[str, object]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: str(fields[m.group(1).strip()]), template)


@dataclass
class _ClassSection:
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


def _single(report: _Report, section: _Section, entry: _Entry, what: str) -> str | None:
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
    report: _Report, section: _Section, entry: _Entry, available: list[str]
) -> str | None:
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
    report: _Report,
    section: _Section,
    scheme_types: set[str] | None,
    cwd: str,
    config_dir: str,
) -> tuple[str | None, _ClassSection | None]:
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
        path = _existing_file(report, section, path_entry, cwd, config_dir)

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
    return type_name, _ClassSection(section.name, type_name, cls, path, template, params)


# --------------------------------------------------------------------------------------------
# Entry point


def load_config(path: str, cwd: str | None = None) -> ExpandedConfig:
    """Read, validate and expand a config file; raise ConfigError listing every problem.

    Relative paths in the file (and ``path`` itself) are resolved against ``cwd``, which
    defaults to the process's working directory.
    """
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    config_path = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
    config_dir = os.path.dirname(config_path)
    report = _Report(path)
    sections = _read_ini(_read_file(path, config_path), report)
    by_name = {section.name: section for section in sections}

    process, monitor = _check_settings(report, by_name, base, config_dir)
    by_type = _check_modules(report, sections, by_name, process, base, config_dir)
    if report.problems or process is None or monitor is None:
        raise ConfigError(_in_file_order(report.problems), report.warnings)
    return ExpandedConfig(
        config_path=config_path,
        process=process,
        monitor=monitor,
        pipelines=_expand(report, process, monitor, by_type),
        warnings=report.warnings,
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


def _check_settings(
    report: _Report, by_name: dict[str, _Section], cwd: str, config_dir: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """[PROCESS] and [MONITOR], each None when missing or wrong."""
    for name in (PROCESS, MONITOR):
        if name not in by_name:
            near = [s for s in by_name if s.lower() == name.lower()]
            hint = f"; found [{near[0]}], but section names are case-sensitive" if near else ""
            report.error(f"required section is missing{hint}", section=name)
    process = (
        _check_process(report, by_name[PROCESS], cwd, config_dir) if PROCESS in by_name else None
    )
    monitor = _check_monitor(report, by_name[MONITOR]) if MONITOR in by_name else None
    return process, monitor


def _check_modules(
    report: _Report,
    sections: list[_Section],
    by_name: dict[str, _Section],
    process: dict[str, Any] | None,
    cwd: str,
    config_dir: str,
) -> dict[str, list[_ClassSection]]:
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
    by_type: dict[str, list[_ClassSection]] = {}
    for section in sections:
        if section.name in (PROCESS, MONITOR):
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


def _expand(
    report: _Report,
    process: dict[str, Any],
    monitor: dict[str, Any],
    by_type: dict[str, list[_ClassSection]],
) -> list[list[dict[str, Any]]]:
    """Every pipeline: one module variant per scheme position, times the multiplicity."""
    positions: list[str] = process["data_scheme"] + process["pipeline_scheme"]
    multiplicity: int = monitor["multiplicity"]
    count = multiplicity * math.prod(
        sum(cs.variant_count() for cs in by_type[type_name]) for type_name in positions
    )
    if count > MAX_PIPELINES:
        # Checked before building anything, since the point is not to build it.
        report.error(
            f"the file expands to {count} pipelines (multiplicity included); the limit is "
            f"{MAX_PIPELINES}: use fewer values or split the study into several files"
        )
        raise ConfigError(report.problems, report.warnings)

    variants_by_type = {
        type_name: [module for cs in group for module in cs.variants()]
        for type_name, group in by_type.items()
    }
    pipelines: list[list[dict[str, Any]]] = []
    for combination in itertools.product(*(variants_by_type[t] for t in positions)):
        for _ in range(multiplicity):
            # Fresh dicts per pipeline, so that a consumer annotating one run's modules cannot
            # change another's.
            pipelines.append([dict(module) for module in combination])
    return pipelines


def _in_file_order(found: list[Problem]) -> list[Problem]:
    # Read top to bottom like the file; problems of the file as a whole (a missing section)
    # come last. The sort is stable, so problems of one line keep the order they were found.
    return sorted(found, key=lambda p: (p.line is None, p.line or 0))


def _quiet_scheme(entry: _Entry | None) -> list[str] | None:
    """Best-effort reading of a scheme whose errors were already reported."""
    if entry is None:
        return None
    names = _split_names(entry.value)
    return names if all(_is_type_name(name) for name in names) else None


def count_text(runs: int, multiplicity: int) -> str:
    """What a config expands to, in words: "16 distinct pipelines × multiplicity 2 = 32 runs"
    (each distinct pipeline is repeated `multiplicity` times, with successive seeds)."""
    distinct = runs // multiplicity if multiplicity > 0 else runs

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return (
        f"{plural(distinct, 'distinct pipeline')} × multiplicity {multiplicity} = "
        f"{plural(runs, 'run')}"
    )


def pipelines_to_json(pipelines: Sequence[Sequence[dict[str, Any]]]) -> str:
    """The seed's pipelines file: a JSON list of pipelines, each a list of module dicts."""
    return json.dumps([list(p) for p in pipelines], indent=2, ensure_ascii=False) + "\n"
