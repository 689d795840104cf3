"""Validation of [PROCESS] and [MONITOR]: one generic check per key of the schema table.

Each key's kind (:mod:`mosaic_client.schema`) names the reader of its INI text; the checks that
involve several keys (how the loss is given, GPUs listed but unused) come after.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mosaic_client import schema, search
from mosaic_client.class_files import class_file_problem
from mosaic_client.config.problems import Entry, Report, Section
from mosaic_client.config.values import (
    existing_file,
    is_type_name,
    resolve_path,
    split_names,
    typed_scalar,
)

PROCESS = schema.PROCESS
MONITOR = schema.MONITOR

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_IDENTIFIER_RE = schema.IDENTIFIER_RE


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


class _Invalid(Exception):
    """A key's INI text that cannot be read as its kind; the message is for the user."""


@dataclass
class _Place:
    """Where a key is read: the file's report, its section, and the bases of relative paths."""

    report: Report
    section: Section
    cwd: str
    config_dir: str


def _number_text(bound: float | None) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _number(key: schema.Key, entry: Entry, place: _Place) -> int | float | str:
    if search.is_distribution_syntax(entry.value):
        if not key.searchable:
            raise _Invalid(
                f"'{key.name}' cannot be searched: a distribution is accepted for [PROCESS] lr "
                "and the parameters of module sections only (docs/tuning.md)"
            )
        try:
            return search.parse(entry.value).text
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
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


def _boolean(key: schema.Key, entry: Entry, place: _Place) -> bool:
    word = entry.value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Invalid("expected true or false (also yes/no, on/off, 1/0)")


def _choice(key: schema.Key, entry: Entry, place: _Place) -> str:
    text = entry.value.strip()
    word = text.lower() if key.fold_case else text
    if word in key.choices:
        return word
    # A case-folded value is not repeated: it is not what the user wrote.
    unknown = key.label if key.fold_case else f"{key.label} '{text}'"
    suggestion = "" if key.fold_case else _suggest(text, key.choices)
    raise _Invalid(f"unknown {unknown}; expected {key.expects or key.range_text()}{suggestion}")


def _identifier(key: schema.Key, entry: Entry, place: _Place) -> str:
    text = entry.value.strip()
    if not _IDENTIFIER_RE.fullmatch(text):
        raise _Invalid("expected a Python class name")
    return text


def _path(key: schema.Key, entry: Entry, place: _Place) -> str | None:
    if key.must_exist:
        return existing_file(place.report, place.section, entry, place.cwd, place.config_dir)
    text = entry.value.strip()
    if not text:
        raise _Invalid(f"empty path; remove the key to use {key.default}")
    return resolve_path(text, place.cwd, place.config_dir, must_exist=False)


def _scheme(key: schema.Key, entry: Entry, place: _Place) -> list[str] | None:
    names = split_names(entry.value)
    if names == [""]:
        raise _Invalid("empty list; name at least one module type")
    ok = True
    for position, name in enumerate(names, start=1):
        if not name:
            place.report.entry_error(
                place.section, entry, f"item {position} is empty; remove the extra ','"
            )
            ok = False
        elif not is_type_name(name):
            place.report.entry_error(
                place.section, entry, f"'{name}' is not a type name; write plain words like mlp"
            )
            ok = False
    return names if ok else None


def _gpu_list(key: schema.Key, entry: Entry, place: _Place) -> list[str]:
    names = split_names(entry.value)
    if "" in names:
        place.report.entry_error(place.section, entry, "empty GPU name; remove the extra ','")
    return [name for name in names if name]


# How the INI text of each kind of key is read. A reader returns the typed value, raises
# _Invalid with one message, or reports its problems itself and returns None.
_READERS: dict[str, Callable[[schema.Key, Entry, _Place], Any]] = {
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


def _read_key(key: schema.Key, entry: Entry, place: _Place) -> Any:
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
        if (section.name, entry.key) in ORIGINAL_KEYS:
            _read_original(place, entry, values)
        elif entry.key not in keys:
            message = f"unknown key, ignored{_suggest(entry.key, keys)}"
            place.report.entry_warning(section, entry, message)
    return values


# The original tool's keys that Mosaic reads as one of its own (docs/configuration.md): its
# on-disk cache was one SQLite database with a size bound; Mosaic's is a directory of entries.
ORIGINAL_KEYS: dict[tuple[str, str], str] = {
    (MONITOR, "cache_database_path"): "cache_dir",
    (MONITOR, "cache_size"): "cache_size_mb",
}


def _read_original(place: _Place, entry: Entry, values: dict[str, Any]) -> None:
    """Read an original key as its Mosaic key, with a note; the Mosaic key wins when both are
    given."""
    section = place.section
    name = ORIGINAL_KEYS[(section.name, entry.key)]
    if name in section.entries:
        message = f"the original tool's key, ignored: {name} is given"
        place.report.entry_warning(section, entry, message)
        return
    value = _read_key(schema.BY_SECTION[section.name][name], entry, place)
    values[name] = value
    unit = " MiB" if name == "cache_size_mb" else ""
    kind = " (a directory of cache entries, not a database file)" if name == "cache_dir" else ""
    message = f"the original tool's key, read as {name} = {value}{unit}{kind}"
    place.report.entry_warning(section, entry, message)


_LOSS_KEYS = ("loss_function", "class_loss_function", "path_to_class_loss_function")


def _given(section: Section, name: str) -> Entry | None:
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
    report: Report, section: Section, cwd: str, config_dir: str
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


def _check_monitor(
    report: Report, section: Section, cwd: str, config_dir: str
) -> dict[str, Any] | None:
    start = len(report.problems)
    place = _Place(report, section, cwd, config_dir)
    required = [k.name for k in schema.BY_SECTION[schema.MONITOR].values() if k.required]
    monitor = _read_section(place, required)
    available = section.entries.get("gpu_available")
    if monitor.get("need_gpu") is False and monitor.get("gpu_available") and available:
        message = "GPUs are listed but need_gpu is false; they are not used"
        report.entry_warning(section, available, message)
    return monitor if len(report.problems) == start else None


def read_search(
    report: Report, by_name: dict[str, Section], cwd: str, config_dir: str
) -> dict[str, Any] | None:
    """[SEARCH] read against the schema table (every key optional), or None when absent."""
    if schema.SEARCH not in by_name:
        return None
    section = by_name[schema.SEARCH]
    for entry in section.entries.values():
        if search.is_distribution_syntax(entry.value):
            report.entry_error(section, entry, "[SEARCH] keys take plain values, not distributions")
    return _read_section(_Place(report, section, cwd, config_dir), ())


def check_settings(
    report: Report, by_name: dict[str, Section], cwd: str, config_dir: str
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
    monitor = (
        _check_monitor(report, by_name[MONITOR], cwd, config_dir) if MONITOR in by_name else None
    )
    if process and monitor and process["deterministic"] and monitor["ensemble"] == "auto":
        # An ensemble member equals its run alone within float rounding only, and the rounding
        # grows over the epochs (docs/ensembles.md): deterministic means the same bits.
        monitor["ensemble"] = "off"
        entry = by_name[MONITOR].entries.get("ensemble")
        if entry is not None:
            message = "not used: deterministic = true trains every run alone (ensemble = off)"
            report.entry_warning(by_name[MONITOR], entry, message)
    return process, monitor
